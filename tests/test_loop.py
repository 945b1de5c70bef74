"""The training loop's arithmetic, by hand: the named sums of a step, the metrics made from them, the
step's gradient as the mean over prompts, and the phase functions the loop calls. CPU, the toy model."""
import dataclasses
import json
import math

import pytest
import torch

from data import Collator, load_examples
import rollout
from grpo_care import accumulate_policy_gradients, base_rewards, ema_due, policy_loss, policy_update
from logs import completion_records, group_sums, step_metrics
from rollout import completion_logprobs, encode_vision, generate_groups
from types import SimpleNamespace

G = 4

# Four groups of G = 4 samples, one of each kind a step sees:
#   0: mixed, the bonus on one of its two accurate samples (selective)
#   1: all correct, every confidence at the cap: the bonus on all (eligible, not selective)
#   2: all wrong, well formatted;   3: all wrong, no format, every row truncated
ACC = torch.tensor([[1., 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]])
FMT = torch.tensor([[1., 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]])
CONF = torch.tensor([[0.9, 0.5, 0.2, 0.1], [0.95] * 4, [0.1] * 4, [0.] * 4])
BONUS = torch.tensor([[0.5, 0, 0, 0], [0.5] * 4, [0.] * 4, [0.] * 4])  # consistency_bonus(ACC, CONF): level 0.7 in group 0
REWARDS = ACC + FMT + BONUS  # [[2.5, 2, 1, 0], [2.5] * 4, [1] * 4, [0] * 4]
LENGTHS = torch.tensor([[10., 20, 30, 40], [5] * 4, [48] * 4, [48] * 4])
TRUNCATED = torch.tensor([[0., 0, 0, 0], [0] * 4, [0, 0, 0, 1], [1] * 4])


def test_group_sums_by_hand():
    s = group_sums(ACC, FMT, CONF, BONUS, REWARDS, LENGTHS, TRUNCATED)
    assert s["samples"] == 16 and s["groups"] == 4
    assert s["reward"] == 19.5  # 5.5 + 10 + 4 + 0
    assert s["reward_sq"] == 40.25  # (6.25 + 4 + 1 + 0) + 4 * 6.25 + 4 * 1 + 0
    assert s["accuracy"] == 6 and s["format"] == 11  # 2 + 4; 3 + 4 + 4 + 0
    assert s["bonus"] == 2.5 and s["bonus_given"] == 5  # 0.5 + 4 * 0.5, on 1 + 4 samples
    assert s["confidence"] == pytest.approx(5.9, abs=1e-6)  # 1.7 + 3.8 + 0.4 + 0
    assert s["all_correct"] == 1 and s["all_wrong"] == 2  # group 1; groups 2 and 3
    assert s["selective"] == 1 and s["eligible"] == 2  # group 0 of groups 0 and 1 (2 and 3: nothing accurate)
    assert s["completion_len"] == 504 and s["truncated"] == 5  # 100 + 20 + 192 + 192; 1 + 4


def test_step_metrics_by_hand():
    # the sums above, as if over 2 processes, plus the loop's own: 4 per-group losses summing to 0.8, clip
    # fractions to 0.4; timings summed over the 2 processes
    s = dict(group_sums(ACC, FMT, CONF, BONUS, REWARDS, LENGTHS, TRUNCATED), loss=0.8, clip_frac=0.4,
             completion_len_max=48.0, vision_calls=12.0, skipped=1.0, t_generation=3.0, t_reference=1.0, t_update=2.0)
    m = step_metrics(s, world=2, step=7, grad_norm=0.5, lr=1e-6, skipped_total=3, nonfinite_steps=0)
    assert m["reward_mean"] == 19.5 / 16 == 1.21875
    # E[r^2] - E[r]^2 = 40.25/16 - 1.21875^2 = 2.515625 - 1.4853515625 = 1.0302734375
    assert m["reward_std"] == pytest.approx(math.sqrt(1.0302734375), abs=1e-12)  # 1.01502...
    assert m["accuracy"] == 6 / 16 and m["format"] == 11 / 16  # per sample, not per group
    assert m["bonus_mean"] == 2.5 / 16 and m["bonus_frac"] == 5 / 16
    assert m["confidence"] == pytest.approx(5.9 / 16, abs=1e-7)
    assert m["bonus_selective_frac"] == 0.5  # 1 selective of 2 eligible groups
    assert m["all_correct_frac"] == 0.25 and m["all_wrong_frac"] == 0.5  # per group: 1/4, 2/4
    assert m["completion_len_mean"] == 504 / 16 == 31.5 and m["completion_len_max"] == 48
    assert m["truncated_frac"] == 5 / 16
    assert m["loss"] == pytest.approx(0.2) and m["clip_frac"] == pytest.approx(0.1)  # per group: 0.8/4, 0.4/4
    assert (m["t_generation"], m["t_reference"], m["t_update"]) == (1.5, 0.5, 1.0)  # per process: / world
    assert m["gen_tokens_per_s"] == 504 / 1.5  # all processes' tokens over one process's time
    assert (m["step"], m["grad_norm"], m["lr"], m["skipped"], m["skipped_total"]) == (7, 0.5, 1e-6, 1, 3)


def test_step_metrics_of_an_empty_step():
    # every prompt unreadable everywhere: no division by zero, ratios 0
    empty = torch.zeros(0, G)
    s = dict(group_sums(empty, empty, None, None, empty, empty, empty), loss=0.0, clip_frac=0.0, completion_len_max=0.0,
             vision_calls=0.0, skipped=4.0, t_generation=0.0, t_reference=0.0, t_update=0.0)
    m = step_metrics(s, world=1, step=1, grad_norm=0.0, lr=0.0, skipped_total=4, nonfinite_steps=0)
    assert m["accuracy"] == m["reward_std"] == m["bonus_selective_frac"] == m["loss"] == 0 and m["skipped"] == 4


@pytest.fixture(scope="module")
def two_groups(toy_world, toy_model, toy_vision):
    """Two prompts (each collated alone, as the loop does), G = 4 samples each, from one generate call."""
    model, processor = toy_model
    examples = load_examples(toy_world / "data/annotations/training_6k.jsonl", toy_world / "data")[:2]
    collate = Collator(processor, toy_vision)
    batches = [collate([ex])[0] for ex in examples]
    with torch.no_grad():
        ros = generate_groups(model, batches, G, processor, max_new_tokens=6, seeds=[3, 4])
    return examples, ros


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_the_step_gradient_is_the_mean_over_prompts(toy_model, two_groups):
    model, _ = toy_model
    _, ros = two_groups
    adv = torch.tensor([[1.0, -1.0, 0.5, 0.5], [0.2, 0.2, 0.2, 0.2]])  # (B, G)
    model.zero_grad(set_to_none=True)
    loss_sum, clip_sum = accumulate_policy_gradients(model, ros, adv, None, None, clip_eps=0.2, beta=0.0, chunk=5)
    together = _grads(model)
    # at ratio 1 (old = the log-probs themselves) a prompt's loss is -mean over rows of A: -0.25 and -0.2
    assert loss_sum == pytest.approx(-0.45, abs=1e-6) and clip_sum == 0.0
    alone = []
    for ro, a in zip(ros, adv):
        model.zero_grad(set_to_none=True)
        logps = completion_logprobs(model, ro, encode_vision(model, ro.batch), chunk_size=5)
        policy_loss(logps, logps.detach(), a, ro.completion_mask)[0].backward()
        alone.append(_grads(model))
    model.zero_grad(set_to_none=True)
    assert together.keys() == alone[0].keys() and len(together) > 10
    for n, g in together.items():  # the mean of the two prompts' gradients, not their sum
        torch.testing.assert_close(g, (alone[0][n] + alone[1][n]) / 2, atol=1e-7, rtol=1e-5)


def test_base_rewards_and_completion_records(two_groups):
    examples, ros = two_groups
    acc, fmt = base_rewards(ros, examples, G)
    assert acc.shape == fmt.shape == (2, G)
    texts = ["<think>a</think><answer>" + examples[0]["solution"] + "</answer>", "<answer>Z</answer>", "no tags",
             "<think>b</think><answer>Z</answer>"]
    ros = [dataclasses.replace(ros[0], texts=texts), ros[1]]
    acc, fmt = base_rewards(ros, examples, G)
    assert acc[0].tolist() == [1, 0, 0, 0] and fmt[0].tolist() == [1, 0, 0, 1]
    adv = torch.arange(8.0).view(2, G) / 3  # (B, G)
    lines = completion_records(5, examples, ros, dict(accuracy=acc, confidence=None, advantage=adv))
    assert [(x["sample_id"], x["g"]) for x in lines] == [(ex["id"], g) for ex in examples for g in range(G)]
    assert lines[0]["accuracy"] == 1.0 and lines[0]["confidence"] is None and lines[0]["step"] == 5
    assert lines[5]["advantage"] == round(5 / 3, 6) == 1.666667 and lines[2]["text"] == "no tags"


def test_ema_is_due_after_every_nth_step():
    # every 2: after the 2nd, 4th and 6th steps (0-based 1, 3, 5); every 1: after each; every 10: the 10th only
    assert [ema_due(s, 2) for s in range(6)] == [False, True, False, True, False, True]
    assert all(ema_due(s, 1) for s in range(3))
    assert [s for s in range(25) if ema_due(s, 10)] == [9, 19]


class _OneWeight(torch.nn.Module):  # a "policy" whose completion log-probs are theta * c_r, row by row
    def __init__(self, theta):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(theta))


def test_policy_update_with_two_iterations_by_hand(monkeypatch):
    """mu = 2 on one prompt of G = 2 samples (one token each), logp_r = theta * c_r with c = (1, 2), advantages
    (1, -1), SGD lr 0.1, clip 0.03. Iteration 1 at ratio 1: loss -(1 - 1)/2 = 0, d loss/d theta = -(1*1 - 1*2)/2
    = 0.5, theta 0 -> -0.05. Iteration 2 against the SAMPLING policy's log-probs (theta 0): ratios
    exp(-0.05) = 0.951229 (A = 1, below the band but the min keeps the unclipped 0.951229) and exp(-0.1) = 0.904837
    (A = -1: clipped to -0.97, the pessimistic bound, so clip_frac 1/2 and no gradient from it); loss
    -(0.9512294 - 0.97)/2 = 0.0093853, gradient -(0.951229 * 1)/2 = -0.4756145, theta -0.05 + 0.04756145 =
    -0.00243855. The returned loss and clip fraction are the means over the two iterations: 0.0046926, 0.25."""
    c = torch.tensor([[1.0], [2.0]])  # (G, T)
    monkeypatch.setattr(rollout, "encode_vision", lambda model, batch: {})
    monkeypatch.setattr(rollout, "completion_logprobs", lambda model, ro, mm, chunk_size: model.theta * c)
    policy = _OneWeight(0.0)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
    ro = SimpleNamespace(batch={}, mm={}, vision_calls=0, completion_mask=torch.ones(2, 1))
    out = policy_update(policy, optimizer, [ro], torch.tensor([[1.0, -1.0]]), None, num_iterations=2, clip_eps=0.03,
                        beta=0.0, max_grad_norm=100.0, chunk=1)
    assert policy.theta.item() == pytest.approx(-0.00243855, abs=1e-7)
    assert out["loss"] == pytest.approx(0.0046926, abs=1e-7)
    assert out["clip_frac"] == pytest.approx(0.25)
    assert out["grad_norm"] == pytest.approx(0.4756145, abs=1e-6) and out["stepped"] == [True, True]  # the last iteration's


def test_plot_comparison_reads_the_runs_and_their_evaluations(tmp_path):
    import logs

    line = {k: 0.5 for k in logs.CURVES}
    for run in ("a", "b"):
        (tmp_path / f"{run}.jsonl").write_text("".join(json.dumps(dict(line, step=s)) + "\n" for s in (1, 2)))
    orange = {k: 25.0 for k in logs.FLAW_CELLS.values()}
    levels = {lv: dict(strict=50.0) for lv in ("L1", "L2", "L3")}
    levels["L1"]["flaw_classes"] = {"orange": orange}
    for run in ("w", "a", "b"):
        (tmp_path / f"{run}.json").write_text(json.dumps(dict(levels=levels)))
    png = tmp_path / "comparison.png"
    logs.plot_comparison({r: tmp_path / f"{r}.jsonl" for r in "ab"}, {r: tmp_path / f"{r}.json" for r in "wab"}, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    del levels["L1"]["flaw_classes"]  # an evaluation without --toy has no classes to compare
    (tmp_path / "w.json").write_text(json.dumps(dict(levels=levels)))
    with pytest.raises(KeyError, match="flaw_classes"):
        logs.plot_comparison({}, {"w": tmp_path / "w.json"}, png)
