"""The training loop on the toy world: a step end to end, exact resume, FSDP2 over 2 processes,
the EMA reference, the non-finite guard, and crash-safe checkpoints. CPU, gloo."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import grpo_care
import checkpoints

ROOT = Path(__file__).resolve().parents[1]
METRIC_FIELDS = {"reward_mean", "reward_std", "accuracy", "format", "bonus_mean", "bonus_frac", "confidence",
                 "bonus_selective_frac",
                 "all_correct_frac", "all_wrong_frac", "completion_len_mean", "completion_len_max",
                 "truncated_frac", "clip_frac", "grad_norm", "lr", "t_generation", "t_reference", "t_update",
                 "gen_tokens_per_s", "vision_calls", "skipped", "skipped_total", "nonfinite_steps"}
TIMING = {"t_generation", "t_reference", "t_update", "gen_tokens_per_s"}


def args(toy_world, out, *extra):
    # lr high enough that 2 steps visibly move a tiny model; EMA every step so it is exercised
    return ["--model_path", str(toy_world / "model"), "--data_root", str(toy_world / "data"),
            "--output_dir", str(out), "--max_new_tokens", "12", "--num_generations", "4",
            "--learning_rate", "1e-3", "--ref_ema_every", "1", "--ref_ema_decay", "0.5",
            "--temperature", "1.5", "--top_p", "1.0", "--logprob_chunk", "5", "--save_steps", "100",
            "--video_max_pixels", "3136", "--video_min_pixels", "3136", "--image_max_pixels", "3136",
            "--image_min_pixels", "3136", "--video_max_frames", "4", *extra]


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def completions(out):
    """completions.jsonl as {(step, sample_id, g): line}."""
    lines = [json.loads(line) for line in (Path(out) / "completions.jsonl").read_text().splitlines()]
    return {(c["step"], c["sample_id"], c["g"]): c for c in lines}


def weights(ckpt):
    """A save_pretrained directory's weights, keyed by module names (as the EMA's are)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt).state_dict()


def ema_weights(ckpt):
    """The EMA reference from the torch.distributed.checkpoint shard files, as full tensors."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    tmp = Path(ckpt) / "_full.pt"
    dcp_to_torch_save(Path(ckpt) / "train_state", tmp)
    state = torch.load(tmp, weights_only=True)
    tmp.unlink()
    return state.get("ref")


def test_one_step_end_to_end(toy_world, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    grpo_care.main(args(toy_world, tmp_path, "--max_steps", "1"))
    (m,) = metrics(tmp_path)
    assert METRIC_FIELDS <= set(m), METRIC_FIELDS - set(m)
    assert m["step"] == 1 and 0 <= m["accuracy"] <= 1 and m["completion_len_max"] <= 12
    # vision once: 1 prompt x (policy for generation, EMA reference, policy with gradient) = 3 tower calls,
    # whatever G is (4 here) and whether the prompt has a video and an image or an image only
    assert m["vision_calls"] == 3, m["vision_calls"]
    # completions.jsonl: the G = 4 samples of the step's one prompt, with the values the update used
    lines = list(completions(tmp_path).values())
    assert len(lines) == 4 and {c["step"] for c in lines} == {1} and [c["g"] for c in lines] == [0, 1, 2, 3]
    assert {"sample_id", "text", "accuracy", "format", "confidence", "bonus", "reward", "advantage"} <= set(lines[0])
    assert sum(c["accuracy"] for c in lines) / 4 == pytest.approx(m["accuracy"], abs=1e-6)
    assert sum(c["reward"] for c in lines) / 4 == pytest.approx(m["reward_mean"], abs=1e-6)
    for c in lines:  # reward = accuracy + format + bonus; confidence <= 0.95, the cap (0: no answer span)
        assert c["reward"] == pytest.approx(c["accuracy"] + c["format"] + c["bonus"], abs=1e-5)
        assert 0 <= c["confidence"] <= 0.95
    r = torch.tensor([c["reward"] for c in lines], dtype=torch.float64)
    expected = (r - r.mean()) / (r.std() + 1e-4)  # the group-relative advantage (sample std)
    assert [c["advantage"] for c in lines] == pytest.approx(expected.tolist(), abs=1e-5)
    ckpt = tmp_path / "checkpoint-1"
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt)  # plain transformers, no training code
    assert model.config.vision_config.patch_size == 14
    assert (tmp_path / "curves.png").stat().st_size > 0
    ema = ema_weights(ckpt)
    assert ema is not None and all(v.dtype == torch.float32 for v in ema.values()), "EMA kept in fp32"


def first_in_order(n_rows, seed=42):
    """The row index that step_examples trains on first (1 prompt per step, epoch 0)."""
    import random

    order = list(range(n_rows))
    random.Random(f"{seed}/order/0").shuffle(order)
    return order[0]


def test_resume_is_exact(toy_world, tmp_path):
    # the row of step 1 has a missing image: the run's skipped count (1) must survive the resume from step 2
    rows = (toy_world / "data/annotations/training_6k.jsonl").read_text().splitlines()
    broken = first_in_order(len(rows))
    rows[broken] = json.dumps(dict(json.loads(rows[broken]), current_observation_basename="missing.png"))
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    data = ("--train_file", str(tmp_path / "train.jsonl"))
    grpo_care.main(args(toy_world, straight, "--max_steps", "4", *data))
    grpo_care.main(args(toy_world, resumed, "--max_steps", "4", "--save_steps", "2", *data))  # checkpoint-2 ...
    (resumed / "checkpoint-4").rename(resumed / "ignored-4")  # ... and checkpoint-4: redo steps 3-4 from 2
    grpo_care.main(args(toy_world, resumed, "--max_steps", "4", "--save_steps", "2", *data,
                        "--resume_from_checkpoint", "latest"))
    a, b = weights(straight / "checkpoint-4"), weights(resumed / "checkpoint-4")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    ea, eb = ema_weights(straight / "checkpoint-4"), ema_weights(resumed / "checkpoint-4")
    for k in ea:
        torch.testing.assert_close(ea[k], eb[k], atol=1e-6, rtol=0)
    ma, mb = metrics(straight), metrics(resumed)
    assert [m["step"] for m in mb] == [1, 2, 3, 4]
    assert completions(resumed) == completions(straight)  # steps 3-4 rewritten, not appended twice
    assert [m["skipped"] for m in mb] == [1, 0, 0, 0] and [m["skipped_total"] for m in mb] == [1, 1, 1, 1]
    for x, y in zip(ma[2:], mb[2:]):
        assert {k: v for k, v in x.items() if k not in TIMING} == {k: v for k, v in y.items() if k not in TIMING}
    assert not any(a[k].equal(weights(resumed / "checkpoint-2")[k]) for k in a if "layers.0.mlp" in k), \
        "steps 3-4 moved the weights (the test is not vacuous)"


def test_two_processes_match_one(toy_world, tmp_path):
    """2 ranks x 1 prompt under FSDP2 (gloo) == 1 rank x 2 prompts: same losses and weights."""
    one, two = tmp_path / "one", tmp_path / "two"
    grpo_care.main(args(toy_world, one, "--max_steps", "2", "--prompts_per_device", "2"))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29533", str(ROOT / "tests" / "fsdp_probe.py"), *args(toy_world, two, "--max_steps", "2")],
                       env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "policy DTensor: True" in r.stdout and "ref DTensor: True" in r.stdout and "world 2" in r.stdout
    # policy and reference: rank 0 reads the checkpoint twice, rank 1 gets its shards by broadcast
    assert "rank 0 checkpoint reads: 2" in r.stdout and "rank 1 checkpoint reads: 0" in r.stdout, r.stdout
    c1, c2 = completions(one), completions(two)  # rank 1's samples reach rank 0's file
    assert c1.keys() == c2.keys() and len(c1) == 2 * 2 * 4
    assert all(c1[k]["text"] == c2[k]["text"] and c1[k]["advantage"] == pytest.approx(c2[k]["advantage"], abs=1e-5)
               for k in c1)
    for x, y in zip(metrics(one), metrics(two)):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
        assert x["reward_mean"] == pytest.approx(y["reward_mean"], abs=1e-6)
    a, b = weights(one / "checkpoint-2"), weights(two / "checkpoint-2")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)


def test_plain_grpo_loads_no_reference(toy_world, tmp_path, monkeypatch):
    loaded = []
    real = grpo_care.load_model
    monkeypatch.setattr(grpo_care, "load_model", lambda *a, **k: loaded.append(k["trainable"]) or real(*a, **k))
    grpo_care.main(args(toy_world, tmp_path, "--max_steps", "1", "--consistency_reward", "none", "--beta", "0"))
    assert loaded == [True], "only the policy is loaded"
    assert ema_weights(tmp_path / "checkpoint-1") is None
    assert metrics(tmp_path)[0]["bonus_mean"] == 0
    # no reference: no confidence (null); no consistency reward: bonus 0 (every arm logs its own, 0 where none)
    assert all(c["confidence"] is None and c["bonus"] == 0 for c in completions(tmp_path).values())


def test_ema_follows_its_schedule(toy_world, tmp_path):
    # decay 0.5 every 2 steps, a checkpoint after each of 3 steps: the reference is theta_0 after step 1 (no
    # update yet), 0.5 * theta_0 + 0.5 * theta_2 after step 2 (the policy after that step's update), and
    # unchanged after step 3
    grpo_care.main(args(toy_world, tmp_path, "--max_steps", "3", "--ref_ema_every", "2", "--save_steps", "1"))
    k = "model.language_model.layers.0.mlp.up_proj.weight"
    theta = [weights(toy_world / "model")[k]] + [weights(tmp_path / f"checkpoint-{s}")[k] for s in (1, 2, 3)]
    ema = [None] + [ema_weights(tmp_path / f"checkpoint-{s}")[k] for s in (1, 2, 3)]
    assert not theta[0].equal(theta[1]) and not theta[1].equal(theta[2]), "the policy moves every step"
    assert ema[1].equal(theta[0])
    torch.testing.assert_close(ema[2], 0.5 * theta[0] + 0.5 * theta[2], atol=1e-6, rtol=0)
    assert ema[3].equal(ema[2])


def test_nonfinite_loss_skips_the_update(toy_world, tmp_path, monkeypatch):
    real = grpo_care.policy_loss

    def nan_loss(*a, **k):
        loss, stats = real(*a, **k)
        return loss * float("nan"), stats

    monkeypatch.setattr(grpo_care, "policy_loss", nan_loss)
    grpo_care.main(args(toy_world, tmp_path, "--max_steps", "1", "--consistency_reward", "none"))
    theta0 = weights(toy_world / "model")
    theta1 = weights(tmp_path / "checkpoint-1")
    for k in theta1:
        assert theta0[k].equal(theta1[k]), k
    assert metrics(tmp_path)[0]["nonfinite_steps"] == 1
    # the count is the run's: a resumed run carries it on (before: it restarted at 0)
    monkeypatch.setattr(grpo_care, "policy_loss", real)
    grpo_care.main(args(toy_world, tmp_path, "--max_steps", "2", "--consistency_reward", "none", "--resume_from_checkpoint", "latest"))
    assert [m["nonfinite_steps"] for m in metrics(tmp_path)] == [1, 1]


def test_crash_while_saving_keeps_the_previous_checkpoint(toy_world, tmp_path, monkeypatch):
    from transformers import Qwen2_5_VLForConditionalGeneration

    calls = []
    real = checkpoints.save_checkpoint

    def crash_on_second(out, step, policy, ref, optimizer, scheduler, processor, cfg, **kw):
        calls.append(step)
        if len(calls) == 2:  # die half-way: the policy is written, the rest is not
            class Dying:
                def save_pretrained(self, *a, **k):
                    raise KeyboardInterrupt("killed while writing")
            return real(out, step, policy, ref, optimizer, scheduler, Dying(), cfg, **kw)
        return real(out, step, policy, ref, optimizer, scheduler, processor, cfg, **kw)

    monkeypatch.setattr(checkpoints, "save_checkpoint", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        grpo_care.main(args(toy_world, tmp_path, "--max_steps", "2", "--save_steps", "1"))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    assert (tmp_path / "checkpoint-2.tmp").exists() and not (tmp_path / "checkpoint-2").exists()
    assert checkpoints.find_resume_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-1"
    Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "checkpoint-1")
    monkeypatch.setattr(checkpoints, "save_checkpoint", real)
    grpo_care.main(args(toy_world, tmp_path, "--max_steps", "2", "--save_steps", "1", "--resume_from_checkpoint", "latest"))
    assert (tmp_path / "checkpoint-2").exists()


def test_help_lists_every_field():
    r = subprocess.run([sys.executable, str(ROOT / "grpo_care.py"), "--help"], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    for f in grpo_care.Config.__dataclass_fields__:
        assert f"--{f}" in r.stdout, f


def test_two_processes_survive_mixed_media_and_unreadable_samples(toy_world, tmp_path):
    """Under FSDP2 every rank must run the same collectives: a rank whose prompt has no video, or whose
    sample is unreadable, must neither hang nor crash the others."""
    rows = [json.loads(line) for line in (toy_world / "data/annotations/training_6k.jsonl").read_text().splitlines()]
    video = [r for r in rows if r["task_progress_metadata"]]
    image_only = [r for r in rows if not r["task_progress_metadata"]]
    broken = dict(video[1], current_observation_basename="missing.png")
    picked = [video[0], image_only[0], broken, image_only[1]]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in picked))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29534", str(ROOT / "grpo_care.py"), *args(toy_world, out, "--max_steps", "2"),
                        "--train_file", str(tmp_path / "mixed.jsonl")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = metrics(out)
    assert [x["step"] for x in m] == [1, 2] and sorted(x["skipped"] for x in m) == [0, 1] and m[-1]["skipped_total"] == 1
    # the step holding the unreadable sample trains on no prompt (the other rank waits it out), the other on 2
    assert sorted(x["vision_calls"] for x in m) == [0, 6]
