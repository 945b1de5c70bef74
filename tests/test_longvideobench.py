"""longvideobench.py: the reader, the v1 scorer, the subtitle interleaving, the clips it builds, and
`evaluate.py --benchmark longvideobench` on the toy file, with and without subtitles."""
import json
from pathlib import Path

import pytest

import evaluate as ev
import longvideobench as lvb
import toy
from config import ConfigError, run_cli
from data import Collator, DataError

V1 = ("Output the thinking process in <think> </think> and final answer in <answer> </answer> tags, i.e., "
      "<think> reasoning process here </think><answer> answer here </answer>. ")


def _row(**kw):
    row = dict(id="abc_0", question="Who waves?", candidates=["a man", "a dog", "a cat", "no one", "a bird"],
               correct_choice=2, video_path="abc.mp4", subtitle_path="abc_en.json",
               starting_timestamp_for_subtitles=100.0, duration=30.0, duration_group=60, question_category="S2E")
    return row | kw


def _write(root: Path, rows, name="lvb_val.json", subtitles=None):
    (root / "subtitles").mkdir(parents=True, exist_ok=True)
    (root / "subtitles/abc_en.json").write_text(json.dumps(subtitles if subtitles is not None else [
        {"start": "0:01:41.500", "end": "0:01:43.000", "line": "hello"}]))
    (root / name).write_text(json.dumps(rows, indent=1))
    return root / name


# --- reading -------------------------------------------------------------------------------------
def test_reader_builds_the_v1_prompt_and_the_gold_letter(tmp_path):
    ex, = lvb.load_examples(_write(tmp_path, [_row()]), tmp_path)
    assert ex["prompt"] == ("Who waves?\nA. a man\nB. a dog\nC. a cat\nD. no one\nE. a bird\n " + V1)  # infer.py's
    assert ex["solution"] == "C"  # correct_choice 2 -> the third letter
    assert ex["options"] == ["a man", "a dog", "a cat", "no one", "a bird"] and ex["image"] is None
    assert ex["video"] == str(tmp_path / "videos/abc.mp4")
    assert (ex["duration_group"], ex["question_category"]) == (60, "S2E")
    assert "subtitles" not in ex and "context" not in ex  # video and question only by default
    test, = lvb.load_examples(_write(tmp_path, [{k: v for k, v in _row().items() if k != "correct_choice"}],
                                     "lvb_test_wo_gt.json"), tmp_path)
    assert test["solution"] is None  # the test file: predictions only
    sub, = lvb.load_examples(tmp_path / "lvb_val.json", tmp_path, subtitles=True)
    # 0:01:41.500 = 60 + 41.5 s; kept in the source clock, shifted when interleaved
    assert sub["subtitles"] == [(101.5, 103.0, "hello")] and sub["subtitle_offset"] == 100.0
    assert ev.prompt_id(sub) != ev.prompt_id(ex)  # with subtitles: a new sample, never a resumed one


def test_both_subtitle_formats(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps([{"timestamp": [3.25, 4], "text": "one"}, {"timestamp": [5, None], "text": "two"},
                                {"start": "1:00:00.5", "end": "1:00:02", "line": "three"}]))
    assert lvb.read_subtitles(path) == [(3.25, 4.0, "one"), (5.0, None, "two"), (3600.5, 3602.0, "three")]


@pytest.mark.parametrize("row, field, problem", [
    (_row(correct_choice=5), "correct_choice", "5 is not an index into the 5 candidates"),
    (_row(candidates=["a"] * 6), "candidates", "expected a list of 2 to 5 strings"),
    (_row(candidates="a man"), "candidates", "expected a list of 2 to 5 strings"),
    (_row(video_path=""), "video_path", "expected a non-empty string"),
    ({k: v for k, v in _row().items() if k != "question_category"}, "question_category", "missing field"),
])
def test_malformed_row_names_file_line_and_field(tmp_path, row, field, problem):
    path = _write(tmp_path, [_row(id="ok_0"), row])
    with pytest.raises(DataError) as e:
        lvb.load_examples(path, tmp_path)
    # the second object opens on line 20: "[" on 1, the first object on 2-19 ("{", nine one-line fields, the
    # candidates over 7 lines, "},")
    assert str(e.value).startswith(f"{path}:20[#1]: {field}: {problem}"), str(e.value)
    assert str(e.value).endswith("(id=abc_0)")


def test_malformed_subtitles_name_their_file(tmp_path):
    path = _write(tmp_path, [_row()], subtitles=[{"start": "0:00:01", "end": "soon", "line": "x"}])
    lvb.load_examples(path, tmp_path)  # without --lvb_subtitles the subtitle files are not read
    with pytest.raises(DataError, match=r"subtitles/abc_en.json:1\[#0\]: end: expected a time H:MM:SS.fff, got 'soon'"):
        lvb.load_examples(path, tmp_path, subtitles=True)
    _write(tmp_path, [_row()], subtitles=[{"start": "0:00:01.000", "end": "0:00:02,500", "line": "x"}])  # SRT's comma
    with pytest.raises(DataError, match=r"end: expected a time H:MM:SS.fff, got '0:00:02,500'"):
        lvb.load_examples(path, tmp_path, subtitles=True)
    path = _write(tmp_path, [_row(starting_timestamp_for_subtitles="0")])
    with pytest.raises(DataError, match=r"lvb_val.json:2\[#0\]: starting_timestamp_for_subtitles: expected a number"):
        lvb.load_examples(path, tmp_path, subtitles=True)


# --- scoring -------------------------------------------------------------------------------------
@pytest.mark.parametrize("output, pick", [
    ("<think>x</think><answer>C</answer>", "C"),
    ("<answer> C. a cat</answer>", "C"),  # stripped, then the first character
    ("<answer>E</answer>", "E"),  # five options
    ("<answer>The answer is C</answer>", "T"),  # the v1 rule is the first character, whatever it is
    ("<answer>c</answer>", "c"),  # case kept: "c" != "C"
    ("<answer>D</answer><answer>C</answer>", "D"),  # the first tag
    ("<answer></answer>", None), ("<answer>  </answer>", None),  # infer.py: IndexError, caught: reward 0
    ("C", None), ("<answer>C", None),  # no complete tag: reward 0
])
def test_first_letter_pick(output, pick):
    assert lvb.first_letter_pick(output) == pick


def _rec(id, correct, group, category, fmt=True, length=10, skipped=False):
    if skipped:
        return dict(id=id, level=lvb.NAME, skipped=True)
    return dict(id=id, level=lvb.NAME, correct=correct, duration_group=group, question_category=category,
                format=fmt, length=length, skipped=False)


def test_summary_overall_per_duration_group_and_category():
    records = [_rec(1, True, 15, "S2E"), _rec(2, False, 15, "T3O", fmt=False, length=20), _rec(3, True, 600, "S2E"),
               _rec(4, True, 3600, "T3O", length=30), _rec(5, None, None, None, skipped=True)]
    s = ev.summarize(records)
    assert list(s) == ["longvideobench", "longvideobench/duration_group=15", "longvideobench/duration_group=600",
                       "longvideobench/duration_group=3600", "longvideobench/question_category=S2E",
                       "longvideobench/question_category=T3O"]  # duration groups in numeric order
    # 3 of 4 right; format 3 of 4; lengths (10 + 20 + 10 + 30) / 4 = 17.5; one skipped
    assert s["longvideobench"] == dict(n=4, skipped=1, accuracy=75.0, format=75.0, mean_length=17.5)
    assert s["longvideobench/duration_group=15"]["accuracy"] == 50.0  # ids 1 and 2
    assert s["longvideobench/question_category=S2E"]["accuracy"] == 100.0  # ids 1 and 3
    assert s["longvideobench/question_category=T3O"] == dict(n=2, skipped=0, accuracy=50.0, format=50.0,
                                                              mean_length=25.0)  # ids 2 and 4
    unanswered = ev.summarize([_rec(1, None, 15, "S2E"), _rec(2, None, 15, "S2E")])  # the test file
    assert unanswered["longvideobench"]["accuracy"] is None and unanswered["longvideobench"]["n"] == 2
    table = lvb.markdown(s, "M")
    assert "| all | 4 | 75.0 | 75.0 | 17.5 |" in table and "| duration_group=15 | 2 | 50.0 | 50.0 | 15.0 |" in table


# --- subtitles between frames ----------------------------------------------------------------------
def test_interleave_by_hand():
    # The toy's 18 s clip, 4 frames sampled at indices 0, 12, 23, 35 of 36 at 2 fps: t = 0, 6, 11.5, 17.5.
    # Subtitles in the source clock, the clip starting at 5: blue [0, 6), purple [6, 12), green [12, 18) and a
    # line at [-4, -2) before the clip.
    times = [0.0, 6.0, 11.5, 17.5]
    subs = [(1.0, 3.0, "intro"), (5.0, 11.0, "blue"), (11.0, 17.0, "purple"), (17.0, 23.0, "green")]
    # intro: midpoint -3, no frame before it, none inside: dropped. blue: midpoint 3 takes frame 0 (t=0 <= 3);
    # no frame strictly inside (0, 6): dropped. purple: midpoint 9 takes frame 1 (t=6); 11.5 is inside: kept.
    # green: midpoint 15 takes frame 2; 17.5 inside: kept. Frame 3 after all subtitles.
    assert lvb.interleave(times, subs, 5.0, 18.0) == [0, 1, "purple", 2, "green", 3]
    # a frame exactly at a midpoint goes before the subtitle: [2, 4) has midpoint 3
    assert lvb.interleave([3.0, 3.5], [(2.0, 4.0, "x")], 0.0, 10.0) == [0, "x", 1]
    # shorter than 1 s: the second around its midpoint 3.3, (2.8, 3.8), holds 3.5 but not 4
    assert lvb.interleave([3.5], [(3.2, 3.4, "short")], 0.0, 10.0) == ["short", 0]
    assert lvb.interleave([4.0], [(3.2, 3.4, "short")], 0.0, 10.0) == ["short", 0][1:]
    # an open end runs to the clip's end: [108, None) with offset 100 is (8, 10), midpoint 9, 9.5 inside
    assert lvb.interleave([1.0, 9.5], [(108.0, None, "last")], 100.0, 10.0) == [0, "last", 1]
    assert lvb.interleave([1.0, 2.0], [], 0.0, 10.0) == [0, 1]


@pytest.fixture(scope="module")
def toy_lvb(toy_world):
    from transformers import AutoProcessor

    root = toy_world / "data/LongVideoBench"
    return root, AutoProcessor.from_pretrained(toy_world / "model")


def test_subtitle_collator_puts_the_kept_lines_between_clips(toy_lvb, toy_vision):
    root, processor = toy_lvb
    ex = lvb.load_examples(root / "lvb_val.json", root, subtitles=True)[0]
    # toylvb000: 18 s, offset 5, blue/purple/green 6 s each: the hand-worked case of test_interleave_by_hand
    assert ex["subtitles"][1:] == [(5.0, 11.0, "Here is the blue object."), (11.0, 17.0, "Here is the purple object."),
                                   (17.0, 23.0, "Here is the green object.")]
    batch, kept = lvb.SubtitleCollator(processor, toy_vision)([ex])
    text = processor.tokenizer.decode(batch["input_ids"][0])
    clip = "<|vision_start|>" + "<|video_pad|>" * 4 + "<|vision_end|>"  # one 2-frame step of 2x2 merged patches
    assert (clip + "Here is the purple object.\n" + clip + "Here is the green object.\n" + clip + ex["prompt"]) in text
    assert batch["video_grid_thw"].tolist() == [[1, 4, 4]] * 3  # frames {0, 1}, {2} (padded to 2), {3}
    plain, _ = Collator(processor, toy_vision)([ex])
    # every clip keeps the whole video's time per temporal step: 2 frames / (4 frames / 18 s) = 9 s
    assert batch["second_per_grid_ts"].tolist() == plain["second_per_grid_ts"].tolist() * 3 == [9.0] * 3
    # no kept subtitle: exactly the inputs without subtitles (one clip = the video)
    none_kept, _ = lvb.SubtitleCollator(processor, toy_vision)([ex | dict(subtitles=ex["subtitles"][:1])])
    assert none_kept.keys() == plain.keys()
    assert all((none_kept[k] == plain[k]).all() for k in plain)


# --- evaluate.py -----------------------------------------------------------------------------------
def _args(world, out, *extra):
    return ["--model_path", str(world / "model"), "--data_root", str(world / "data/LongVideoBench"), "--benchmark",
            "longvideobench", "--output_dir", str(out), "--max_new_tokens", "8", "--batch_size", "2", "--toy", *extra]


@pytest.mark.parametrize("subtitles", [False, True])
def test_evaluate_end_to_end(toy_world, tmp_path, subtitles):
    results = ev.main(_args(toy_world, tmp_path, "--max_samples", "4", *(["--lvb_subtitles"] if subtitles else [])))
    lines = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and not any(r["skipped"] for r in lines)
    val = json.loads((toy_world / "data/LongVideoBench/lvb_val.json").read_text())[:4]
    assert [r["gold"] for r in lines] == ["ABCDE"[r["correct_choice"]] for r in val]
    for r in lines:
        assert r["answer"] == lvb.first_letter_pick(r["output"]) and r["correct"] == (r["answer"] == r["gold"])
    s = results["benchmarks"]
    assert s["longvideobench"]["n"] == 4
    assert s["longvideobench"]["accuracy"] == round(100 * sum(r["correct"] for r in lines) / 4, 2)
    for g in {r["duration_group"] for r in lines}:
        rows = [r for r in lines if r["duration_group"] == g]
        assert s[f"longvideobench/duration_group={g}"]["n"] == len(rows)
    assert results["decoding"]["longvideobench"] == dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                                         max_new_tokens=8)
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert "| all | 4 |" in (tmp_path / "results.md").read_text()
    assert {r["prompt_id"] for r in lines} == {ev.prompt_id(e) for e in lvb.load_examples(
        toy_world / "data/LongVideoBench/lvb_val.json", toy_world / "data/LongVideoBench", subtitles)[:4]}


def test_the_test_file_gives_predictions_only(toy_world, tmp_path):
    results = ev.main(_args(toy_world, tmp_path, "--lvb_file", "lvb_test_wo_gt.json"))
    lines = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(r["gold"] is None and r["correct"] is None for r in lines)
    assert results["benchmarks"]["longvideobench"]["accuracy"] is None


def test_malformed_row_stops_before_any_model_loads(tmp_path, capsys):
    path = _write(tmp_path, [_row(), _row(id="abc_1", correct_choice=-1)])
    args = ["--model_path", str(tmp_path / "no_model"), "--data_root", str(tmp_path), "--benchmark", "longvideobench"]
    with pytest.raises(SystemExit) as e:  # a model load would fail first on the missing --model_path
        run_cli(lambda: ev.main(args))
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"error: {path}:20[#1]: correct_choice: -1 is not an index into the 5 "
                                       "candidates (id=abc_1)\n")


def test_flag_rules(tmp_path):
    with pytest.raises(ConfigError, match="--benchmark longvideobench vsibench: longvideobench must be given alone"):
        ev.main(["--model_path", "M", "--data_root", str(tmp_path), "--benchmark", "longvideobench", "vsibench"])
    with pytest.raises(ConfigError, match="must be used with --benchmark longvideobench"):
        ev.main(["--model_path", "M", "--data_root", str(tmp_path), "--lvb_subtitles"])
    assert ev.max_frames(None, ["longvideobench"]) == 16  # infer.py's qwen-vl-utils: 4-16 frames at 2 fps
    assert ev.decoding("longvideobench", 1024) == dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                                       max_new_tokens=256)


def test_toy_longvideobench_files_are_seeded_and_complete(tmp_path):
    toy.build_longvideobench(tmp_path / "a", seed=0)
    toy.build_longvideobench(tmp_path / "b", seed=0)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 2 + 2 * 10  # two question files, a clip and a subtitle file per row
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    rows = json.loads((tmp_path / "a/LongVideoBench/lvb_val.json").read_text())
    assert all(len(r["candidates"]) == 5 for r in rows) and {r["duration_group"] for r in rows} == {15, 60}
