"""evaluate.py: scoring on hand-made outputs, aggregation, the judge path, resume, and the toy end to end."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import evaluate as ev
import judge
import toy
from data import Collator, DataError, load_examples

ROOT = Path(__file__).resolve().parents[1]


# --- scoring -------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, strict, lenient", [
    ("<think>x</think> <answer>B</answer>", "B", "B"),
    ("<think>x</think> <answer>B. wash the cup</answer>", None, "B"),  # strict wants the bare letter
    ("<think>x</think> <answer>b</answer>", None, "B"),  # lower case: lenient only, inside the tag
    ("The answer is B", None, "B"),  # missing tags
    ("B", "B", "B"),  # the reference scores the whole output when there is no tag
    ("<answer>A or C</answer>", None, "A"),  # several letters: the first
    ("<think>A cup is on the table</think> <answer>C</answer>", "C", "C"),  # the tag beats free text
    ("<answer></answer> so D", None, "D"),  # empty tag: lenient falls back to the output
    ("<answer>Dry the cup</answer> a cup", None, None),  # "Dry" is no letter; "a" outside is an article
    ("<answer>B", None, "B"),  # unclosed tag
    ("<answer> C </answer><answer>D</answer>", "C", "C"),  # first complete tag
    ("<answer></answer>", None, None),
    ("\n\n", None, None),  # "" and "AB" are substrings of "ABCD", but no letters
    ("<answer>AB</answer>", None, None),
])
def test_strict_and_lenient_picks(text, strict, lenient):
    assert ev.strict_pick(text) == strict
    assert ev.lenient_pick(text) == lenient


def _example(gold="A", domain=None, options=("w", "x", "y", "z"), id=0):
    return dict(id=id, options=list(options), solution=gold, question="q?", domain=domain, prompt=f"prompt {id}")


def test_score_record():
    r = ev.score(_example(gold="B"), "L1", "<think>hm</think> <answer>B</answer>", length=7)
    assert (r["answer"], r["strict_correct"], r["lenient_correct"], r["format"]) == ("B", True, True, True)
    assert (r["reasoning"], r["length"], r["skipped"]) == ("hm", 7, False) and "judge_consistent" not in r
    assert "rule_pick" not in r  # only with toy_world=True
    r = ev.score(_example(gold="B"), "L1", "<answer>B. x</answer>", length=3)
    assert (r["answer"], r["strict_correct"], r["lenient_correct"], r["format"]) == (None, False, True, False)


def test_toy_rule_pick():
    options = ["cut the blue fruit", "cut the red fruit", "cut the green fruit", "cut the pink fruit"]
    assert ev.toy_rule_pick(toy.cot_text("red", "cut the red fruit"), options) == "B"
    assert ev.toy_rule_pick(toy.cot_text("red", "wash the red knife"), options) is None  # names no option
    assert ev.toy_rule_pick("Hmm, let me think.", options) is None
    assert ev.toy_rule_pick(None, options) is None


@pytest.mark.parametrize("pred, truth, expected", [
    (100, 100, 1.0),
    (96, 100, 1.0),  # relative error 0.04 < 1 - 0.95
    (105, 100, 0.9),  # 0.05 is not < 0.05: passes 0.50 ... 0.90, not 0.95 (the reference's float32 passes it)
    (130, 100, 0.4),  # 0.3 < 1 - t for t = 0.50, 0.55, 0.60, 0.65
    (60, 100, 0.2),  # 0.4 < 1 - t for t = 0.50, 0.55
    (150, 100, 0.0),  # 0.5 is not < 0.5
    (-100, 100, 0.0),
    (0, 0, 1.0), (0.1, 0, 0.0),  # truth 0: an exact hit only
    # decimals whose error lands exactly on a threshold (in float64 the first two come out 0.0499..., the
    # third 0.0999..., and would pass one threshold more)
    (3.15, 3, 0.9),  # |3.15 - 3| / 3 = 0.15 / 3 = 0.05: passes 1 - t = 0.50 ... 0.10, not 0.05
    (2.85, 3, 0.9),  # 0.15 / 3 = 0.05 again, from below
    (0.9, 1, 0.8),  # 0.1 / 1 = 0.1: passes 0.50 ... 0.15, not 0.10 or 0.05
    (21, 20, 0.9),  # 1 / 20 = 0.05 (the reference's float32 passes it at 0.95)
])
def test_mean_relative_accuracy(pred, truth, expected):
    assert ev.mean_relative_accuracy(pred, truth) == expected


@pytest.mark.parametrize("output, gold, problem_type, reward", [
    ("<think>x</think> <answer>B</answer>", "B", "multiple choice", 1.0),
    ("B", "B", "multiple choice", 1.0),  # no tag: the whole output is the prediction (the reference's fallback)
    ("<answer></answer> B", "B", "multiple choice", 0.0),  # empty tag: the whole output, "<answer></answer> B"
    ("<answer>b</answer>", "B", "multiple choice", 0.0),
    ("<answer>E</answer>", "E", "multiple choice", 1.0),  # MMVU has five options
    ("<answer>12</answer>", "10", "regression", 0.6),  # relative error 0.2: t = 0.50 ... 0.75
    ("<answer>twelve</answer>", "10", "regression", 0.0),
    ("<answer>3.15</answer>", "3", "regression", 0.9),  # relative error exactly 0.05: not < 1 - 0.95
    ("<answer>3</answer>", "3", "numerical", 1.0),
    ("<answer>3.0</answer>", "3", "numerical", 0.0),
])
def test_benchmark_score(output, gold, problem_type, reward):
    ex = dict(_example(gold=gold), problem_type=problem_type)
    r = ev.benchmark_score(ex, "vsibench", output, length=4)
    assert r["reward"] == reward and (r["level"], r["gold"], r["problem_type"]) == ("vsibench", gold, problem_type)
    assert "judge_consistent" not in r and not r["skipped"]


def test_max_frames_default_to_the_reference_scripts():
    assert ev.max_frames(None, None) == 16  # SEED-Bench-R1: eval_seed_bench_r1.sh --fps_max_frames 16
    assert ev.max_frames(None, ["mvbench"]) == 32  # general: eval_general_video_bench.sh --fps_max_frames 32
    assert ev.max_frames(8, ["mvbench"]) == 8 and ev.max_frames(32, None) == 32  # the flag wins


def test_decoding():
    greedy = dict(do_sample=False, max_new_tokens=1024)
    assert ev.decoding("mmvu", 1024) == ev.decoding("mvbench", 1024, True) == ev.decoding("L1", 1024, True) == greedy
    # eval_bench.py's MMVU sampling for "Video-R1" model paths: temperature 1, top-p 0.95, 768 tokens
    assert ev.decoding("mmvu", 1024, True) == dict(do_sample=True, temperature=1.0, top_p=0.95, top_k=0,
                                                   max_new_tokens=768)
    assert ev.decoding("mmvu", 8, True)["max_new_tokens"] == 8


def test_benchmark_stats_and_table():
    def rec(bench, id, problem_type, reward, skipped=False):
        if skipped:
            return dict(id=id, level=bench, domain=None, skipped=True)
        return dict(id=id, level=bench, problem_type=problem_type, reward=reward, format=id % 2 == 0, length=10 * id,
                    skipped=False)

    records = [rec("mvbench", 1, "multiple choice", 1.0), rec("mvbench", 2, "multiple choice", 1.0),
               rec("vsibench", 1, "multiple choice", 1.0), rec("vsibench", 2, "multiple choice", 0.0),
               rec("vsibench", 3, "regression", 0.6), rec("vsibench", 4, "regression", 0.2),
               rec("vsibench", 5, None, None, skipped=True)]
    s = ev.summarize(records)
    assert list(s) == ["vsibench", "mvbench"], "the paper's column order"
    # VSI-Bench: accuracy 1/2 multiple choice, MRA (0.6+0.2)/2, score (1+0+0.6+0.2)/4; format ids 2, 4 of 4
    assert s["vsibench"] == dict(n=4, skipped=1, score=45.0, accuracy=50.0, mra=40.0, format=50.0, mean_length=25.0)
    assert (s["mvbench"]["score"], s["mvbench"]["accuracy"], s["mvbench"]["mra"]) == (100.0, 100.0, None)
    md = ev.markdown(s, "m")
    assert "| | VSI-Bench | MVBench |" in md and "| score (%) | 45.0 | 100.0 |" in md
    assert "| mean relative accuracy, regression (%) | 40.0 | – |" in md and "strict" not in md


# --- aggregation ---------------------------------------------------------------------------------
def _rec(level, strict, lenient, fmt, length, answer, judge, domain=None, skipped=False, **kw):
    """`judge`: the verdict, True (consistent), False, or None (unjudged)."""
    if skipped:
        return dict(id=0, level=level, domain=domain, skipped=True)
    return dict(level=level, domain=domain, id=kw.get("id", 0), strict_correct=strict, lenient_correct=lenient,
                format=fmt, length=length, answer=answer, reasoning="r", judge_consistent=judge,
                judge_protocol="supports", skipped=False, **kw)


def test_summarize_levels_and_domains():
    records = [
        _rec("L1", True, True, True, 10, "A", True, first_letter_correct=True),
        # no answer letter: nothing to judge; "<answer>A. x</answer>" is right by SEED-Bench-R1 v1's first letter
        _rec("L1", False, True, False, 20, None, None, first_letter_correct=True),
        _rec("L1", None, None, None, None, None, None, skipped=True),
        _rec("L3", True, True, True, 30, "B", False, domain="Work"),  # correct, judged inconsistent
        _rec("L3", False, False, True, 20, "A", True, domain="Work"),  # wrong, judged consistent
        _rec("L3", True, True, True, 10, "D", True, domain="Hobbies"),
    ]
    s = ev.summarize(records)
    assert list(s) == ["L1", "L3", "L3/Hobbies", "L3/Work"]
    # L1: 2 scored (1 skipped); strict 1/2, lenient 2/2, first letter 2/2, format 1/2, length (10+20)/2, 1 judged
    # and consistent
    assert s["L1"] == dict(n=2, skipped=1, strict=50.0, lenient=100.0, first_letter=100.0, format=50.0, mean_length=15.0,
                           n_judged=1, n_unjudged=0, judge_protocol="supports", consistency=100.0,
                           consistency_correct=100.0)
    # L3: strict 2/3; consistent 2 of 3 judged; of the 2 correct (B, D) only D is consistent; first letter: not recorded
    assert s["L3"] == dict(n=3, skipped=0, strict=66.67, lenient=66.67, first_letter=None, format=100.0, mean_length=20.0,
                           n_judged=3, n_unjudged=0, judge_protocol="supports", consistency=66.67,
                           consistency_correct=50.0)
    assert (s["L3/Work"]["n"], s["L3/Work"]["strict"], s["L3/Work"]["consistency"]) == (2, 50.0, 50.0)
    assert s["L3/Work"]["consistency_correct"] == 0.0
    assert (s["L3/Hobbies"]["n"], s["L3/Hobbies"]["strict"], s["L3/Hobbies"]["consistency"]) == (1, 100.0, 100.0)
    md = ev.markdown(s, "m")
    assert "| | L1 | L3 | Hobbies | Work |" in md and "| strict accuracy (%) | 50.0 | 66.7 | 100.0 | 50.0 |" in md


def test_generation_does_not_depend_on_the_batch(toy_world, toy_vision, toy_model):
    model, processor = toy_model
    examples = load_examples(toy_world / "data/annotations/validation_L3.jsonl", toy_world / "data")[:4]
    collator = Collator(processor, toy_vision)
    kw = dict(do_sample=False, max_new_tokens=6, return_dict_in_generate=True, output_scores=True,
              pad_token_id=model.generation_config.pad_token_id)
    batch, kept = collator(examples)
    assert batch["attention_mask"].min() == 0, "the examples should need padding"
    with torch.no_grad():
        together = torch.stack(model.generate(**batch, **kw).scores, 1)  # (4, T, V)
        for i, ex in enumerate(kept):
            alone = torch.stack(model.generate(**collator([ex])[0], **kw).scores, 1)  # (1, T, V)
            assert_close(together[i:i + 1], alone, atol=1e-4, rtol=1e-4)


# --- end to end ----------------------------------------------------------------------------------
def _args(world, data, out, n=3):
    return ["--model_path", str(world / "model"), "--data_root", str(data), "--output_dir", str(out),
            "--max_samples", str(n), "--max_new_tokens", "8", "--batch_size", "2", "--toy"]


@pytest.fixture(scope="module")
def evaluated(toy_world, tmp_path_factory):
    """The untrained toy, 3 samples per level; the first L1 sample's image is corrupt."""
    tmp = tmp_path_factory.mktemp("eval")
    data = shutil.copytree(toy_world / "data", tmp / "data")
    first = min(load_examples(data / "annotations/validation_L1.jsonl", data), key=lambda e: e["id"])
    Path(first["image"]).write_bytes(b"not a png")
    start = time.time()
    results = ev.main(_args(toy_world, data, tmp / "out"))
    return dict(data=data, out=tmp / "out", results=results, seconds=time.time() - start, bad=first["id"])


def test_end_to_end_toy(evaluated):
    assert evaluated["seconds"] <= 60, f"toy evaluation took {evaluated['seconds']:.0f} s"
    out, results = evaluated["out"], evaluated["results"]
    assert json.loads((out / "results.json").read_text()) == results
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 9 and sum(r["skipped"] for r in lines) == 1
    assert [r["id"] for r in lines if r["skipped"]] == [evaluated["bad"]]
    done = next(r for r in lines if not r["skipped"])
    for field in ("id", "level", "domain", "prompt_id", "output", "answer", "gold", "strict_correct",
                  "lenient_correct", "rule_pick"):
        assert field in done, field
    lv = results["levels"]
    assert results["skipped"] == 1 and (lv["L1"]["n"], lv["L1"]["skipped"]) == (2, 1)
    assert lv["L2"]["n"] == lv["L3"]["n"] == 3
    assert sum(s["n"] for k, s in lv.items() if k.startswith("L3/")) == 3  # domains partition L3
    assert 0 < lv["L1"]["mean_length"] <= 8
    assert "| strict accuracy (%) |" in (out / "results.md").read_text()
    assert results["judge"] == dict(model="self", api_base=None, protocol="supports",
                                    prompt=judge.PROMPTS["supports"], unjudged={})


def test_resume_skips_finished_samples(evaluated, toy_world, tmp_path, monkeypatch):
    out = shutil.copytree(evaluated["out"], tmp_path / "out")
    with open(out / "predictions.jsonl", "a") as f:
        f.write('{"id": 99, "lev')  # a line cut by an interruption
    seen = []
    real = ev.evaluate_batch

    def counting(model, processor, collator, gen_config, examples, *a):
        seen.extend((ex["id"]) for ex in examples)
        return real(model, processor, collator, gen_config, examples, *a)

    monkeypatch.setattr(ev, "evaluate_batch", counting)
    results = ev.main(_args(toy_world, evaluated["data"], out, n=4))
    # one new sample per level, and the corrupt one is retried
    assert len(seen) == 4 and evaluated["bad"] in seen
    lines = (out / "predictions.jsonl").read_text().splitlines()
    # the cut line is gone; the corrupt sample's new line replaced its old one (the judge phase rewrites the file)
    assert len(lines) == 9 + 3 and all(json.loads(x) for x in lines)
    assert (results["levels"]["L1"]["n"], results["levels"]["L2"]["n"], results["skipped"]) == (3, 4, 1)
    seen.clear()
    assert ev.main(_args(toy_world, evaluated["data"], out, n=4)) == results
    assert seen == [evaluated["bad"]]  # nothing else is generated again


def test_two_processes_give_the_same_results(evaluated, toy_world, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "evaluate.py"), *_args(toy_world, evaluated["data"], tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "out/results.json").read_text()) == evaluated["results"]
    # the samples really were split: L1 ids a<b<c go to rank 0 [a, c] and rank 1 [b]; each rank's
    # step 0 lists generated records before skipped ones (a is corrupt), gathered rank by rank
    l1 = [json.loads(x)["id"] for x in (tmp_path / "out/predictions.jsonl").read_text().splitlines()][:3]
    a, b, c = sorted(l1)
    assert l1 == [c, a, b]


def test_toy_flaw_class_breakdown():
    """Reasoning x answer per teacher-flaw class: the rows GRPO can get right for the wrong reason."""
    options = ["cut the blue fruit", "cut the green fruit", "cut the orange fruit", "cut the red fruit"]
    orange = dict(options=options, solution="C", question="... in order to make a fruit salad?", domain=None)
    say = lambda colour, letter: f"<think>{toy.cot_text(colour, f'cut the {colour} fruit')}</think><answer>{letter}</answer>"  # noqa: E731
    outputs = [say("orange", "C"),  # right reasoning, right answer
               say("red", "C"),  # red reasoning, orange answer: right for the wrong reason
               say("red", "C"),
               say("red", "D"),  # misread, followed consistently: wrong, wrong
               say("orange", "B")]  # right reasoning, wrong answer
    clean = dict(orange, solution="A")  # blue is no flaw's colour
    examples = [dict(orange, id=i, prompt=str(i)) for i in range(5)] + [dict(clean, id=5, prompt="5")]
    records = [ev.score(e, "L1", o, 9, toy_world=True) for e, o in zip(examples, outputs + [say("blue", "A")])]
    assert [r["flaw_class"] for r in records] == ["orange"] * 5 + ["clean"]
    s = ev.summarize(records)["L1"]["flaw_classes"]
    # orange: 5 rows; right reasoning + right answer 1/5 = 20 %, right + wrong 1/5, wrong + right 2/5 = 40 %,
    # wrong + wrong 1/5; strict 3/5 = 60 %; rule consistency (answer = the option the reasoning names):
    # rows 1 and 4 = 2/5 = 40 %
    assert s["orange"] == dict(n=5, strict=60.0, rule_consistency=40.0, right_reasoning_right_answer=20.0,
                               right_reasoning_wrong_answer=20.0, wrong_reasoning_right_answer=40.0,
                               wrong_reasoning_wrong_answer=20.0)
    assert s["clean"]["n"] == 1 and s["clean"]["right_reasoning_right_answer"] == 100.0
    md = ev.markdown(ev.summarize(records), "m")
    assert "| L1 | orange | 5 | 60.0 | 40.0 | 20.0 | 20.0 | 40.0 | 20.0 |" in md


def test_a_level_mixing_int_and_string_ids_is_evaluated(toy_world, tmp_path):
    # EgoPlan-Bench2 (L3's source) ids are strings like "ca6e9ec9-..._2"; before, sorting raised TypeError
    data = shutil.copytree(toy_world / "data", tmp_path / "data")
    f = data / "annotations/validation_L3.jsonl"
    rows = [json.loads(line) for line in f.read_text().splitlines()]
    rows = [dict(r, sample_id=f"ca6e9ec9-{r['sample_id']}_2") if i % 2 else r for i, r in enumerate(rows)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [ev.id_order({"id": i}) for i in (10, 2, "b", "a")] == [(0, 10), (0, 2), (1, "b"), (1, "a")]
    assert sorted([10, "b", 2, "a"], key=lambda i: ev.id_order({"id": i})) == [2, 10, "a", "b"]
    results = ev.main(_args(toy_world, data, tmp_path / "out", n=2) + ["--levels", "L3", "--max_new_tokens", "2"])
    ints = sorted(r["sample_id"] for r in rows if isinstance(r["sample_id"], int))
    lines = [json.loads(x) for x in (tmp_path / "out/predictions.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in lines) == ints[:2], "--max_samples takes the first ids: integers first"
    assert results["levels"]["L3"]["n"] + results["levels"]["L3"]["skipped"] == 2


@pytest.mark.parametrize("change, flags, message", [
    # before: the model and the judge were loaded first, and two rows with one id counted once
    (lambda rows: rows.__setitem__(2, dict(rows[2], sample_id=rows[0]["sample_id"])), [],
     r"validation_L2\.jsonl:3: sample_id: .* is also the id of the row at .*validation_L2\.jsonl:1$"),
    (lambda rows: rows.__setitem__(1, dict(rows[1], question="wash the red cup " * 100)), ["--max_prompt_length", "300"],
     r"validation_L2\.jsonl:2: question: the prompt is \d+ tokens, more than --max_prompt_length 300"),
])
def test_annotation_files_are_checked_before_any_model(toy_world, tmp_path, monkeypatch, change, flags, message):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the annotation files were checked")

    monkeypatch.setattr(ev, "load_eval_model", refuse)
    data = tmp_path / "data"
    (data / "annotations").mkdir(parents=True)
    rows = [json.loads(x) for x in (toy_world / "data/annotations/validation_L2.jsonl").read_text().splitlines()]
    change(rows)
    (data / "annotations/validation_L2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=message):
        ev.main(_args(toy_world, data, tmp_path / "out") + ["--levels", "L2", *flags])


def test_a_hub_id_needs_an_output_dir(toy_world, tmp_path, monkeypatch):
    from config import ConfigError

    monkeypatch.chdir(tmp_path)  # the default MODEL_PATH/eval_* would be ./Qwen/... and shadow the hub id after
    with pytest.raises(ConfigError, match="--model_path Qwen/Qwen2-VL-7B-Instruct: a hub id needs --output_dir"):
        ev.main(["--model_path", "Qwen/Qwen2-VL-7B-Instruct", "--data_root", str(toy_world / "data")])
    assert not (tmp_path / "Qwen").exists()
