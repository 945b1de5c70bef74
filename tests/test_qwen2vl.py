"""SEED-Bench-R1's own study: a tiny Qwen2-VL as the policy (GRPO-CARE and the v1 GRPO recipe, SFT, evaluation,
resume, 2 processes = 1), and the v1 recipe's pieces (prompt, first-letter scorer, fixed media size). CPU, gloo."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

import evaluate as ev
import grpo_care
import memory
import sft
import toy
import toy_qwen
from config import ConfigError
from data import Collator, DataError, VisionSpec, load_examples, messages, prompt_text
from rewards import accuracy_reward
from test_train import args, completions, ema_weights, metrics

ROOT = Path(__file__).resolve().parents[1]
# the v1 recipe (README "SEED-Bench-R1's study"): accuracy only with the first-letter scorer, the v1 prompt, a
# fixed media size (56 here, 256 at scale), k3 KL to the frozen initial model and no consistency reward
V1 = ["--prompt_template", "v1", "--answer_scorer", "first_letter", "--format_reward", "false", "--media_size", "56",
      "--consistency_reward", "none", "--beta", "0.1"]


@pytest.fixture(scope="module")
def qwen2vl(toy_world, tmp_path_factory):
    """A tiny Qwen2-VL (toy_qwen.build_model_dir arch="qwen2_vl") beside the toy world's data."""
    out = tmp_path_factory.mktemp("qwen2vl")
    toy_qwen.build_model_dir(out, toy_world / "data", seed=0, arch="qwen2_vl")
    return out


def q2_args(toy_world, model, out, *extra):
    a = args(toy_world, out, *extra)
    a[a.index("--model_path") + 1] = str(model)
    return a


# --- the v1 recipe's pieces ---------------------------------------------------------------------
def test_v1_prompt_scorer_and_media_size(toy_world, tmp_path):
    # SEED-Bench-R1's grpo.py: the question, its options lettered on their own lines, then the instruction
    assert prompt_text("What next?", ["x", "y", "z", "w"], "v1") == (
        "What next?\nA. x\nB. y\nC. z\nD. w\n Output the thinking process in <think> </think> and final answer in "
        "<answer> </answer> tags, i.e., <think> reasoning process here </think><answer> answer here </answer>. ")
    texts = ["<answer>B.</answer>", "<answer> B </answer>", "<answer>b</answer>", "<answer>Because</answer>", "B"]
    # exact: only " B " stripped is "B"; first letter: "B.", " B " and "Because" start with B ("b" does not)
    assert accuracy_reward(texts, ["B"] * 5) == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert accuracy_reward(texts, ["B"] * 5, scorer="first_letter") == [1.0, 1.0, 0.0, 1.0, 0.0]
    # other problem types keep their own scoring: 3.7 is not 3.5, though both start with 3
    assert accuracy_reward(["<answer>3.7</answer>"], ["3.5"], ["numerical"], scorer="first_letter") == [0.0]
    data = toy_world / "data"
    ex = load_examples(data / "annotations/validation_L1.jsonl", data, prompt_template="v1")[0]
    assert ex["prompt"] == prompt_text(ex["question"], ex["options"], "v1")
    with pytest.raises(DataError, match="Video-R1 rows have the reference's prompt only"):
        load_examples(data / "Video-R1-toy.json", data, prompt_template="v1")
    # every image and frame 256 x 256 -> 252 x 252 (qwen-vl-utils rounds to 28): 18 x 18 patches of 14 px
    vision = VisionSpec(media_size=256)
    assert {(c.get("resized_height"), c.get("resized_width")) for c in messages(ex, vision)[0]["content"]
            if c["type"] != "text"} == {(256, 256)}
    processor = ev.load_eval_processor(toy_world / "model")
    video = next(e for e in load_examples(data / "annotations/validation_L1.jsonl", data) if e["video"])
    batch, kept = Collator(processor, vision)([video])
    assert batch["image_grid_thw"].tolist() == [[1, 18, 18]] and batch["video_grid_thw"][0, 1:].tolist() == [18, 18]


def test_other_model_types_are_one_line_errors_before_weights(toy_world, tmp_path):
    (tmp_path / "llava").mkdir()
    (tmp_path / "llava/config.json").write_text(json.dumps({"model_type": "llava"}))
    for main in (grpo_care.main, sft.main):
        with pytest.raises(ConfigError, match="model_type 'llava' is not supported .one of qwen2_5_vl, qwen2_vl"):
            main(["--model_path", str(tmp_path / "llava"), "--data_root", str(toy_world / "data"),
                  "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    # the memory plan reads Qwen2-VL's vision widths where it keeps them: embed_dim, mlp_ratio x embed_dim
    config = Qwen2VLConfig(vision_config=dict(embed_dim=1280, hidden_size=3584, mlp_ratio=4, depth=32))
    dims = memory.config_dims(config)
    assert (dims["Hv"], dims["Iv"], dims["depth"]) == (1280, 5120, 32)


# --- Qwen2-VL as the policy ----------------------------------------------------------------------
def test_qwen2vl_care_trains_and_resumes_exactly(toy_world, qwen2vl, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    grpo_care.main(q2_args(toy_world, qwen2vl, straight, "--max_steps", "2"))
    grpo_care.main(q2_args(toy_world, qwen2vl, resumed, "--max_steps", "2", "--save_steps", "1"))
    (resumed / "checkpoint-2").rename(resumed / "ignored-2")  # redo step 2 from checkpoint-1
    grpo_care.main(q2_args(toy_world, qwen2vl, resumed, "--max_steps", "2", "--save_steps", "1",
                           "--resume_from_checkpoint", "latest"))
    model = Qwen2VLForConditionalGeneration.from_pretrained(straight / "checkpoint-2")  # saved as a Qwen2-VL
    assert model.config.model_type == "qwen2_vl"
    a, b = model.state_dict(), Qwen2VLForConditionalGeneration.from_pretrained(resumed / "checkpoint-2").state_dict()
    initial = Qwen2VLForConditionalGeneration.from_pretrained(qwen2vl).state_dict()
    assert not all(a[k].equal(initial[k]) for k in a), "two steps moved the weights (the test is not vacuous)"
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    ea, eb = ema_weights(straight / "checkpoint-2"), ema_weights(resumed / "checkpoint-2")
    for k in ea:
        torch.testing.assert_close(ea[k], eb[k], atol=1e-6, rtol=0)
    assert completions(straight) == completions(resumed)
    timing = {"t_generation", "t_reference", "t_update", "gen_tokens_per_s"}
    assert [{k: v for k, v in m.items() if k not in timing} for m in metrics(straight)] == \
        [{k: v for k, v in m.items() if k not in timing} for m in metrics(resumed)]
    assert {m["vision_calls"] for m in metrics(straight)} == {3}  # policy generation, EMA reference, update


def test_qwen2vl_v1_recipe_two_processes_match_one(toy_world, qwen2vl, tmp_path):
    """The v1 GRPO recipe on a Qwen2-VL: 2 ranks x 1 prompt under FSDP2 (gloo) == 1 rank x 2 prompts."""
    one, two = tmp_path / "one", tmp_path / "two"
    grpo_care.main(q2_args(toy_world, qwen2vl, one, "--max_steps", "2", "--prompts_per_device", "2", *V1))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29537", str(ROOT / "tests" / "fsdp_probe.py"),
                        *q2_args(toy_world, qwen2vl, two, "--max_steps", "2", *V1)],
                       env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "policy DTensor: True" in r.stdout and "ref DTensor: True" in r.stdout and "world 2" in r.stdout
    c1, c2 = completions(one), completions(two)
    assert c1.keys() == c2.keys() and len(c1) == 2 * 2 * 4
    for c in c1.values():  # accuracy only: the reward is the first-letter accuracy, no format, no bonus
        assert c["reward"] == c["accuracy"] and c["bonus"] == 0
    assert all(c1[k]["text"] == c2[k]["text"] for k in c1)
    # no sample earns a reward (an untrained model writes no answer tag): step 1 has no gradient; weight decay
    # moves the policy off the frozen model, so step 2's gradient is the KL's alone, and tiny
    assert [m["grad_norm"] for m in metrics(one)][0] == 0 and 0 < metrics(one)[1]["grad_norm"] < 1e-3
    for x, y in zip(metrics(one), metrics(two)):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
        assert x["reward_mean"] == pytest.approx(y["reward_mean"], abs=1e-6)
    # Adam's first step is about lr x the gradient's sign: where the KL's gradient is near 0 the sign is float
    # noise, and one bias element in 32 differs by 2e-5 between 1 and 2 processes
    a = Qwen2VLForConditionalGeneration.from_pretrained(one / "checkpoint-2").state_dict()
    b = Qwen2VLForConditionalGeneration.from_pretrained(two / "checkpoint-2").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=0)


def test_qwen2vl_fine_tunes_and_evaluates(toy_world, qwen2vl, tmp_path):
    out = tmp_path / "sft"
    vision = [f"--{k}={v}" for k, v in toy.TOY_VISION.items()]
    sft.main(["--model_path", str(qwen2vl), "--data_root", str(toy_world / "data"), "--output_dir", str(out),
              "--max_steps", "2", "--prompts_per_device", "2", "--learning_rate", "3e-3", "--prompt_template", "v1",
              "--media_size", "56", *vision])
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)
    assert Qwen2VLForConditionalGeneration.from_pretrained(out).config.model_type == "qwen2_vl"
    results = ev.main(["--model_path", str(out), "--data_root", str(toy_world / "data"), "--output_dir",
                       str(tmp_path / "eval"), "--levels", "L1", "--max_samples", "2", "--max_new_tokens", "8",
                       "--prompt_template", "v1", "--media_size", "56", "--toy"])
    L1 = results["levels"]["L1"]
    assert L1["n"] == 2 and L1["first_letter"] is not None and results["prompt_template"] == "v1"
    assert results["vision"]["media_size"] == 56
    assert "first-letter accuracy" in (tmp_path / "eval/results.md").read_text()
    lvb = ev.main(["--model_path", str(out), "--data_root", str(toy_world / "data/LongVideoBench"), "--output_dir",
                   str(tmp_path / "lvb"), "--benchmark", "longvideobench", "--max_samples", "2", "--max_new_tokens",
                   "8", "--lvb_subtitles", "--toy"])
    assert lvb["benchmarks"]["longvideobench"]["n"] == 2  # the study's second benchmark, subtitles between clips
