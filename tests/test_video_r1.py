"""The general domain: Video-R1-format rows (training and the general benchmarks' eval files), a mixed
image/video batch, a training step on the toy's mixed file, and `evaluate.py --benchmark` end to end."""
import json
from pathlib import Path

import pytest

import data
import evaluate as ev
import grpo_care
from data import Collator, DataError, load_examples

THINK = data.THINK_INSTRUCTION
ROWS = [
    dict(problem_id=1, problem="What colour is the cup?", data_type="image", problem_type="multiple choice",
         options=["A. red", "B. blue"], process="<think>I see red.</think>", solution="<answer>A</answer>",
         path="./imgs/a.png", data_source="toy/src"),
    dict(problem_id=2, problem="How many cups?", data_type="video", problem_type="numerical", options=[],
         process="<think>\nTwo cups.\n</think>", solution="<answer>2</answer>", path="./vids/b.mp4",
         data_source="LLaVA-Video-178K"),
    dict(problem_id=3, problem="Read the sign.", data_type="image", problem_type="OCR", solution="<answer>no entry</answer>",
         path="imgs/c.png"),  # no "./", no options, process or data_source
    dict(problem_id=4, problem="Describe it.", data_type="video", problem_type="free-form", options=[],
         solution="<answer> a red cup </answer>", path="./vids/d.mp4"),
    dict(problem_id=5, problem="How far, in metres?", data_type="video", problem_type="regression", options=[],
         solution="<answer>2.5</answer>", path="./vids/e.mp4"),
]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_video_r1_rows(tmp_path, suffix):
    f = tmp_path / f"mix{suffix}"
    f.write_text(json.dumps(ROWS, indent=1) if suffix == ".json" else "".join(json.dumps(r) + "\n" for r in ROWS))
    mc, num, ocr, free, reg = load_examples(f, "/root")
    assert (mc["id"], mc["problem_type"], mc["solution"], mc["answer"], mc["options"]) == (
        1, "multiple choice", "A", "A", ["A. red", "B. blue"])
    assert (mc["image"], mc["video"], mc["domain"], mc["cot"]) == ("/root/imgs/a.png", None, "toy/src", "I see red.")
    assert mc["prompt"] == ("What colour is the cup?Options:\nA. red\nB. blue\n\n" + THINK + " Please provide only the "
                            "single option letter (e.g., A, B, C, D, etc.) within the <answer> </answer> tags.")
    assert (num["video"], num["image"], num["solution"], num["cot"], num["domain"]) == (
        "/root/vids/b.mp4", None, "2", "Two cups.", "LLaVA-Video-178K")
    number = " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags."
    assert num["prompt"] == "How many cups?\n" + THINK + number and reg["prompt"] == "How far, in metres?\n" + THINK + number
    assert (ocr["image"], ocr["options"], ocr["cot"], ocr["domain"], ocr["solution"]) == ("/root/imgs/c.png", [], None, None,
                                                                                          "no entry")
    assert ocr["prompt"].endswith(THINK + " Please transcribe text from the image/video clearly and provide your text "
                                  "answer within the <answer> </answer> tags.")
    assert free["solution"] == "a red cup" and free["prompt"] == (
        "Describe it.\n" + THINK + " Please provide your text answer within the <answer> </answer> tags.")
    assert [e["problem_type"] for e in (mc, num, ocr, free, reg)] == list(data.TYPE_INSTRUCTIONS)
    assert [c["type"] for c in data.messages(mc, data.VisionSpec())[0]["content"]] == ["image", "text"]
    assert [c["type"] for c in data.messages(num, data.VisionSpec())[0]["content"]] == ["video", "text"]


def test_seed_bench_r1_rows_stay_multiple_choice(toy_world):
    ex = load_examples(toy_world / "data/annotations/validation_L1.jsonl", toy_world / "data")[0]
    assert ex["problem_type"] == "multiple choice" and ex["solution"] in "ABCD" and ex["image"] is not None


@pytest.mark.parametrize("change, message", [
    (dict(problem_type="essay"), r"problem_type: 'essay' is not one of .* \(problem_id=1\)"),
    (dict(data_type="audio"), r"data_type: 'audio' is neither"),
    (dict(options=[]), r"options: a multiple-choice row needs options"),
    (dict(path=None), r"path: missing field \(problem_id=1\)"),
    # before: each character of the string became an option line
    (dict(options="A. red B. blue"), r"options: expected a list of strings \('A. ...'\), got str 'A. red B. blue'"),
    (dict(options=["A. red", 2]), r"options: expected a list of strings"),
    # before: read and trained on, files outside --data_root
    (dict(path="/etc/a.png"), r"path: '/etc/a.png' leads outside --data_root"),
    (dict(path="./imgs/../../a.png"), r"path: '\./imgs/\.\./\.\./a\.png' leads outside --data_root"),
])
def test_bad_video_r1_rows_name_the_problem(tmp_path, change, message):
    row = {k: v for k, v in {**ROWS[0], **change}.items() if v is not None}
    (tmp_path / "bad.json").write_text(json.dumps([row]))
    with pytest.raises(DataError, match=r"bad\.json:1\[#0\]: " + message):
        load_examples(tmp_path / "bad.json", tmp_path)
    (tmp_path / "cut.json").write_text('[{"problem_id": 1,\n "problem": }]')
    with pytest.raises(DataError, match=r"cut\.json:2: malformed JSON"):
        load_examples(tmp_path / "cut.json", tmp_path)


def test_toy_video_r1_set(toy_world):
    root = toy_world / "data"
    train = load_examples(root / "Video-R1-toy.json", root)
    assert {e["problem_type"] for e in train} == set(data.TYPE_INSTRUCTIONS)
    assert any(e["video"] for e in train) and any(e["image"] for e in train)
    evals = {name: load_examples(root / "Evaluation" / f"eval_{name}.json", root) for name in ev.BENCHMARKS}
    assert {e["problem_type"] for e in evals["vsibench"]} == {"multiple choice", "regression", "numerical"}
    for e in train + [e for rows in evals.values() for e in rows]:
        assert Path(e["video"] or e["image"]).is_file(), e


def test_mixed_batch_and_a_missing_file(toy_world, toy_model, toy_vision, tmp_path, caplog):
    _, processor = toy_model
    rows = json.loads((toy_world / "data/Video-R1-toy.json").read_text())
    image = next(r for r in rows if r["data_type"] == "image")
    video = next(r for r in rows if r["data_type"] == "video")
    gone = dict(video, problem_id=99, path="./video_r1_toy/nowhere.mp4")
    (tmp_path / "mix.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (image, gone, video)))
    examples = load_examples(tmp_path / "mix.jsonl", toy_world / "data")
    collate = Collator(processor, toy_vision)
    batch, kept = collate(examples)
    assert [e["id"] for e in kept] == [image["problem_id"], video["problem_id"]] and collate.skipped == 1
    assert "nowhere.mp4: file not found" in caplog.text
    # one 56x56 image (4 tokens) and one 4-frame 56x56 video (8 tokens) in one left-padded batch
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]] and batch["video_grid_thw"].tolist() == [[2, 4, 4]]
    assert batch["input_ids"].shape[0] == 2


def test_training_step_on_the_mixed_file(toy_world, tmp_path, monkeypatch):
    rows = json.loads((toy_world / "data/Video-R1-toy.json").read_text())
    by_type = {r["problem_type"]: r for r in rows if r["data_source"] != "toy/mc_video"}  # 3 images, 2 videos
    (tmp_path / "mix.json").write_text(json.dumps(list(by_type.values())))
    calls, real = [], grpo_care.accuracy_reward

    def spy(completions, solutions, problem_types=None, scorer="exact"):
        calls.append((problem_types, solutions))
        return real(completions, solutions, problem_types, scorer)

    monkeypatch.setattr(grpo_care, "accuracy_reward", spy)  # as base_rewards calls it
    out = tmp_path / "out"
    grpo_care.main(["--model_path", str(toy_world / "model"), "--data_root", str(toy_world / "data"),
                    "--train_file", str(tmp_path / "mix.json"),  # absolute: data_root / it is itself
                    "--output_dir", str(out), "--max_steps", "1", "--prompts_per_device", "5",
                    "--num_generations", "2", "--max_new_tokens", "8", "--save_steps", "100",
                    "--video_max_pixels", "3136", "--video_min_pixels", "3136", "--image_max_pixels", "3136",
                    "--image_min_pixels", "3136", "--video_max_frames", "4"])
    # every prompt is scored under its own type, against the text inside its <answer></answer>
    got = {types[0]: sols[0] for types, sols in calls}
    assert all(len(set(types)) == 1 and len(types) == 2 for types, _ in calls)
    assert got == {t: r["solution"].removeprefix("<answer>").removesuffix("</answer>") for t, r in by_type.items()}
    (m,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert m["skipped"] == 0 and 0 <= m["accuracy"] <= 1 and (out / "checkpoint-1").is_dir()


def test_benchmark_evaluation_end_to_end(toy_world, tmp_path):
    results = ev.main(["--model_path", str(toy_world / "model"), "--data_root", str(toy_world / "data"),
                       "--output_dir", str(tmp_path), "--benchmark", *ev.BENCHMARKS, "--max_new_tokens", "8",
                       "--batch_size", "4", "--toy", "--video_r1_mmvu"])
    assert json.loads((tmp_path / "results.json").read_text()) == results and results["skipped"] == 0
    bench = results["benchmarks"]
    assert list(bench) == list(ev.BENCHMARKS)
    # --video_r1_mmvu: MMVU sampled (the reference's decoding for Video-R1 checkpoints), the others greedy
    assert results["decoding"]["mmvu"] == dict(do_sample=True, temperature=1.0, top_p=0.95, top_k=0, max_new_tokens=8)
    assert all(results["decoding"][b] == dict(do_sample=False, max_new_tokens=8) for b in bench if b != "mmvu")
    assert [bench[b]["n"] for b in bench] == [3, 2, 2, 2, 2, 2]  # VSI-Bench: multiple choice, regression, numerical
    assert bench["vsibench"]["mra"] is not None and all(bench[b]["mra"] is None for b in bench if b != "vsibench")
    lines = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 13 and all(0.0 <= r["reward"] <= 1.0 and 0 < r["length"] <= 8 for r in lines)
    md = (tmp_path / "results.md").read_text()
    assert "| | VSI-Bench | VideoMMMU | MMVU | MVBench | TempCompass | VideoMME |" in md and "| score (%) |" in md
