"""Learning you can watch, shortened for CI (~2.5 min): ./train.sh's default run on a smaller toy world
with fewer SFT and RL steps. Seeded, so the figures are the same run to run on the same machine.

The warm start inherits the toy teacher's planted flaws (orange read as red, answered red or, right for
the wrong reason, orange; answers that slip to the next letter in "wash the dishes" rows), so its greedy
L1 accuracy is well below 100 %; GRPO-CARE's samples still hold the right behaviour some of the time and
the group-relative reward reinforces it. The same run pins CARE's mechanism from completions.jsonl:
where the bonus picks among the accurate samples of a group, it picks those whose reasoning names the
right option, not those right for the wrong reason.
"""
import collections
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
    # (with all rows, whether a step drew flawed or clean prompts swamps 40 steps of learning)
    rows = read_jsonl(world / "data/annotations/training_6k.jsonl")
    flawed = [r for r in rows if toy.flaw_class(r["question"], r["answer"]) != "clean"]
    (world / "data/annotations/flawed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in flawed))
    rl = tmp_path / "rl"
    grpo_care.main(["--toy", "true", "--model_path", str(sft_dir), "--data_root", str(world / "data"),
                    "--train_file", "annotations/flawed.jsonl", "--num_epochs", "4", "--output_dir", str(rl),
                    "--max_steps", "40", "--save_steps", "40"])  # TOY_DEFAULTS: 4 prompts x 8 samples per step
    after = l1_strict(rl / "checkpoint-40", world, tmp_path / "eval_after")
    picked = bonus_by_reasoning(rl / "completions.jsonl", {r["sample_id"]: r for r in rows})
    reward = [json.loads(line)["reward_mean"] for line in open(rl / "metrics.jsonl")]
    first, last = sum(reward[:8]) / 8, sum(reward[-8:]) / 8
    print(f"L1 strict {before:.1f} -> {after:.1f} %; mean reward, first 8 steps {first:.2f}, last 8 {last:.2f}")
    # measured (2 CPU cores, 2026-12-01): L1 68.8 -> 83.3 %, mean reward 1.75 -> 2.13
    assert 25 <= before <= 75, f"the warm start should be mediocre, got L1 {before:.1f} %"
    assert last > first + 0.15, f"the RL reward should rise over its first steps: {first:.2f} -> {last:.2f}"
    assert after >= before + 10, f"toy-L1 after RL {after:.1f} % should beat the warm start's {before:.1f} %"
    print(f"CARE's bonus picked among the accurate samples in {picked['selective']} of {picked['eligible']} groups; "
          f"there it went to {picked[True]} of {picked[True, 'n']} right-reasoning and {picked[False]} of "
          f"{picked[False, 'n']} wrong-reasoning accurate samples")
    # measured (2 CPU cores, 2026-12-01): selective in 62 of 155 groups; there the bonus went to 123 of 165
    # right-reasoning accurate samples (75 %) and 88 of 257 right for the wrong reason (34 %)
    assert picked["selective"] >= 0.1 * picked["eligible"], f"the bonus rarely picks among accurate samples: {picked}"
    assert picked[False, "n"] >= 5, f"too few right-for-the-wrong-reason samples where the bonus picked: {picked}"
    right, wrong = picked[True] / picked[True, "n"], picked[False] / picked[False, "n"]
    assert right >= wrong + 0.25, f"the bonus should favour right reasoning: {right:.2f} vs {wrong:.2f} ({picked})"


def bonus_by_reasoning(completions_file, rows: dict) -> collections.Counter:
    """In the groups where CARE's bonus went to some accurate samples and not others ("selective"), how
    often it went to an accurate sample whose reasoning names the right option (picked[True] of
    picked[True, "n"]) and to one right for the wrong reason (picked[False] of picked[False, "n"])."""
    groups = collections.defaultdict(list)
    for line in open(completions_file):
        c = json.loads(line)
        groups[c["step"], c["sample_id"]].append(c)
    picked = collections.Counter()
    for (_, sample_id), samples in groups.items():
        row = rows[sample_id]
        options = sorted([row["answer"], *row["negative_answers"]])  # --shuffle_options false
        gold = "ABCD"[options.index(row["answer"])]
        mean = sum(c["accuracy"] for c in samples) / len(samples)
        accurate = [c for c in samples if c["accuracy"] > 0.1 and c["accuracy"] >= mean]  # CARE's eligible set
        picked["eligible"] += bool(accurate)
        if not any(c["bonus"] > 0 for c in accurate) or all(c["bonus"] > 0 for c in accurate):
            continue
        picked["selective"] += 1
        for c in accurate:
            right = evaluate.toy_rule_pick(evaluate.reasoning_of(c["text"]), options) == gold
            picked[right, "n"] += 1
            picked[right] += c["bonus"] > 0
    return picked
