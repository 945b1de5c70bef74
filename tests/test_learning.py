"""Learning you can watch, shortened for CI (~2 min): ./train.sh's default run on a smaller toy world
with fewer SFT and RL steps. Seeded, so the figures are the same run to run on the same machine.

The warm start inherits the toy teacher's planted flaws (orange read as red; answers that slip to the
next letter in "wash the dishes" rows), so its greedy L1 accuracy is well below 100 %; GRPO-CARE's
samples still hold the right behaviour some of the time and the group-relative reward reinforces it.
"""
import json

import evaluate
import grpo_care
import sft
import toy
from data import read_jsonl

TOY_MEDIA = [f"--{k}={v}" for k, v in toy.TOY_VISION.items()]


def l1_strict(model_dir, world, out):
    evaluate.main(["--model_path", str(model_dir), "--data_root", str(world / "data"), "--toy", "--levels", "L1",
                   "--max_new_tokens", "64", "--batch_size", "16", "--output_dir", str(out)])
    return json.loads((out / "results.json").read_text())["levels"]["L1"]["strict"]


def test_grpo_care_improves_on_the_sft_warm_start(tmp_path):
    world = toy.build(tmp_path / "toy", seed=0, n_train=96, n_val=48)
    sft_dir = tmp_path / "sft"
    sft.main(["--model_path", str(world / "model"), "--data_root", str(world / "data"), "--output_dir", str(sft_dir),
              "--learning_rate", "3e-3", "--prompts_per_device", "16", "--max_steps", "150", "--num_epochs", "25",
              "--shuffle_options", "false", *TOY_MEDIA])
    before = l1_strict(sft_dir, world, tmp_path / "eval_before")
    # RL on the rows the teacher's flaws touch: every step's reward then measures the same thing
    # (with all rows, whether a step drew flawed or clean prompts swamps 24 steps of learning)
    rows = read_jsonl(world / "data/annotations/training_6k.jsonl")
    flawed = [r for r in rows if f" {toy.COT_CONFUSION[0]} " in r["answer"] or r["task_goal"] == toy.COT_SLIP_GOAL]
    (world / "data/annotations/flawed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in flawed))
    rl = tmp_path / "rl"
    grpo_care.main(["--toy", "true", "--model_path", str(sft_dir), "--data_root", str(world / "data"),
                    "--train_file", "annotations/flawed.jsonl", "--num_epochs", "4", "--output_dir", str(rl),
                    "--max_steps", "24", "--save_steps", "24"])  # TOY_DEFAULTS: 4 prompts x 8 samples per step
    after = l1_strict(rl / "checkpoint-24", world, tmp_path / "eval_after")
    reward = [json.loads(line)["reward_mean"] for line in open(rl / "metrics.jsonl")]
    first, last = sum(reward[:8]) / 8, sum(reward[-8:]) / 8
    print(f"L1 strict {before:.1f} -> {after:.1f} %; mean reward, first 8 steps {first:.2f}, last 8 {last:.2f}")
    # measured (2 CPU cores, 2026-11-22): L1 58.3 -> 79.2 %, mean reward 1.52 -> 1.78
    assert 25 <= before <= 75, f"the warm start should be mediocre, got L1 {before:.1f} %"
    assert last > first + 0.15, f"the RL reward should rise over its first steps: {first:.2f} -> {last:.2f}"
    assert after >= before + 10, f"toy-L1 after RL {after:.1f} % should beat the warm start's {before:.1f} %"
