"""The arms of the paper's Table 3 as pure math, against hand-computed values: the KL weightings (GRPO / KL-EMA,
KL-EMA-HA, SepKL-EMA-HA) and the consistency rewards (DenseCons, RefGen); RefGen's reasoning prefix and its
seeded answer regeneration on the toy Qwen2.5-VL."""
import math
import re
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import grpo_care
from config import ConfigError
from data import Collator, load_examples
from grpo_care import kl_token_weights, policy_loss
from rewards import accurate_samples, dense_consistency_reward, refgen_consistency_reward
from refgen import reasoning_prefix_lengths, regenerate_answers
from rollout import Rollout, completion_mask

MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])  # 3 and 2 completion tokens
ANSWER = torch.tensor([[0, 0, 1, 0], [0, 1, 0, 0]])  # the graded answer's span: token 2, token 1


# --- the consistency rewards ---------------------------------------------------------------------
def test_dense_consistency_reward():
    acc = torch.tensor([[1.0, 0.0, 1.0, 0.5]])
    conf = torch.tensor([[0.9, 0.95, 0.2, 0.4]])
    # lambda * acc * p_ref: 0.5*1*0.9, 0.5*0*0.95, 0.5*1*0.2, 0.5*0.5*0.4 (every sample, no group statistics)
    assert_close(dense_consistency_reward(acc, conf, coef=0.5), torch.tensor([[0.45, 0.0, 0.1, 0.1]]))


def test_refgen_consistency_reward():
    regenerated = torch.tensor([[1.0, 0.0, 0.5]])  # the reference's own answers' accuracy, after each reasoning
    assert_close(refgen_consistency_reward(regenerated, coef=0.5), torch.tensor([[0.5, 0.0, 0.25]]))


# --- the KL arms ---------------------------------------------------------------------------------
def test_kl_weights_all_tokens():
    """GRPO and KL-EMA (they differ in the reference, not the weights): beta / n_tokens per completion token."""
    w = kl_token_weights(MASK, beta=0.1)
    assert_close(w, torch.tensor([[0.1 / 3, 0.1 / 3, 0.1 / 3, 0.0], [0.05, 0.05, 0.0, 0.0]]))


def test_kl_weights_high_accuracy_rows():
    """KL-EMA-HA: the rows of CARE's first stage only (acc > 0.1 and >= the group mean)."""
    acc = torch.tensor([[1.0, 0.0]])  # group mean 0.5: sample 0 is high-accuracy, sample 1 not
    rows = accurate_samples(acc).view(-1)
    assert rows.tolist() == [True, False]
    w = kl_token_weights(MASK, beta=0.1, rows=rows)
    assert_close(w, torch.tensor([[0.1 / 3, 0.1 / 3, 0.1 / 3, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    # a graded group: 0.05 is under the 0.1 floor, 0.3 under the mean (0.05 + 0.3 + 0.9 + 0.9) / 4 = 0.5375
    assert accurate_samples(torch.tensor([[0.05, 0.3, 0.9, 0.9]])).tolist() == [[False, False, True, True]]


def test_kl_weights_separate_reasoning_and_answer():
    """SepKL-EMA-HA: beta * mean over reasoning tokens + beta_answer * mean over answer tokens, HA rows only."""
    w = kl_token_weights(MASK, beta=0.1, answer_mask=ANSWER, beta_answer=0.4)
    # row 0: reasoning tokens 0, 1 -> 0.1 / 2 each; answer token 2 -> 0.4 / 1
    # row 1: reasoning token 0 -> 0.1, answer token 1 -> 0.4
    assert_close(w, torch.tensor([[0.05, 0.05, 0.4, 0.0], [0.1, 0.4, 0.0, 0.0]]))
    w = kl_token_weights(MASK, beta=0.1, rows=torch.tensor([False, True]), answer_mask=ANSWER, beta_answer=0.4)
    assert_close(w, torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.1, 0.4, 0.0, 0.0]]))
    # a two-token answer ("B", ".") shares its term: 4 tokens, answer 2-3 -> reasoning 0.1 / 2, answer 0.4 / 2
    w = kl_token_weights(torch.ones(1, 4), beta=0.1, answer_mask=torch.tensor([[0, 0, 1, 1]]), beta_answer=0.4)
    assert_close(w, torch.tensor([[0.05, 0.05, 0.2, 0.2]]))
    # no answer span (no complete answer tag): the reasoning term covers every token, no answer term
    w = kl_token_weights(MASK, beta=0.1, answer_mask=torch.zeros_like(ANSWER), beta_answer=0.4)
    assert_close(w, kl_token_weights(MASK, beta=0.1))


def test_policy_loss_with_kl_weights():
    logps = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-1.0, -1.0, 0.0, 0.0]], requires_grad=True)
    ref = logps.detach() + torch.tensor([[math.log(2), 0.0, 0.5, 9.0], [0.0, math.log(2), 0.0, math.inf]])
    # k3 = e^d - d - 1: d = ln 2 -> 1 - ln 2 = 0.306853; d = 0.5 -> 0.148721; d = 0 -> 0; the masked d's are ignored
    zero = torch.zeros(2)  # A = 0: the loss is the KL penalty alone
    w = kl_token_weights(MASK, 0.1, answer_mask=ANSWER, beta_answer=0.4)  # [[.05, .05, .4, 0], [.1, .4, 0, 0]]
    loss, stats = policy_loss(logps, logps.detach(), zero, MASK, ref_logps=ref, kl_weights=w)
    # row 0: 0.05 * 0.306853 + 0.4 * 0.148721 = 0.074831; row 1: 0.4 * 0.306853 = 0.122741; mean 0.098786
    assert_close(loss, torch.tensor(0.098786), atol=1e-6, rtol=1e-6)
    assert torch.isfinite(loss) and torch.isfinite(torch.autograd.grad(loss, logps)[0]).all()  # inf under the mask
    # stats["kl"]: per row the mean over its tokens: (0.306853 + 0 + 0.148721) / 3, 0.306853 / 2; their mean
    assert_close(stats["kl"], torch.tensor((0.455574 / 3 + 0.153427) / 2), atol=1e-6, rtol=1e-6)
    # the default weights are beta / n_tokens: row 0 0.1 * 0.455574 / 3, row 1 0.1 * 0.306853 / 2; mean 0.015264
    loss, _ = policy_loss(logps, logps.detach(), zero, MASK, ref_logps=ref, beta=0.1)
    assert_close(loss, torch.tensor(0.015264), atol=1e-6, rtol=1e-5)


# --- RefGen: the reasoning prefix and the regeneration --------------------------------------------
def _encode(processor, texts):
    tok = processor.tokenizer
    ids = [tok.encode(t, add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")] for t in texts]
    T = max(map(len, ids))
    return torch.tensor([x + [tok.pad_token_id] * (T - len(x)) for x in ids])


def test_reasoning_prefix_lengths(toy_model):
    _, processor = toy_model
    tok = processor.tokenizer
    texts = ["<think>I see the red object.</think> <answer>B</answer>", "<answer>B</answer>",
             "<think>a</think><think>b</think><answer>C</answer>", "<think>never closed <answer>A</answer>"]
    ids = _encode(processor, texts)
    mask, _ = completion_mask(ids, tok.convert_tokens_to_ids("<|im_end|>"))
    n = reasoning_prefix_lengths(ids, processor, mask)
    for row, k, text in zip(ids, n.tolist(), texts):
        if "</think>" not in text:
            assert k == 0
            continue
        # the shortest prefix that holds the first "</think>": k tokens hold it, k - 1 do not
        assert "</think>" in tok.decode(row[:k]) and "</think>" not in tok.decode(row[:k - 1])
        assert tok.decode(row[:k]).startswith(text[:text.index("</think>") + len("</think>")])
    assert n[1] == 0 and n[3] == 0 and n[0] > 0 and n[2] > 0
    # a tag past the mask is not read
    assert reasoning_prefix_lengths(ids[:1], processor, torch.zeros_like(mask[:1])).tolist() == [0]


@pytest.fixture(scope="module")
def reasoned(toy_world, toy_model, toy_vision):
    """A hand-made rollout of one toy prompt, three samples: two with reasoning, one without."""
    _, processor = toy_model
    rows = load_examples(toy_world / "data/annotations/validation_L1.jsonl", toy_world / "data")
    batch, _ = Collator(processor, toy_vision)(rows[:1])
    texts = ["<think>I see the red object.</think> <answer>A</answer>", "<answer>B</answer>",
             "<think>Let me think. In my current observation I see the blue object.</think><answer>C</answer>"]
    ids = _encode(processor, texts)
    mask, truncated = completion_mask(ids, processor.tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return Rollout(batch, torch.zeros(3, dtype=torch.long), ids, mask, truncated, texts)


def test_regenerate_answers_is_seeded_per_sample(toy_model, reasoned):
    model, processor = toy_model
    n = reasoning_prefix_lengths(reasoned.completion_ids, processor, reasoned.completion_mask)
    kw = dict(max_new_tokens=5, temperature=1.0, top_p=1.0)
    out = regenerate_answers(model, reasoned, n, [1, 2, 3], processor, **kw)
    assert out[1] is None and isinstance(out[0], str) and isinstance(out[2], str)  # no reasoning: nothing regenerated
    assert regenerate_answers(model, reasoned, n, [1, 2, 3], processor, **kw) == out  # the same seeds, the same
    # a row's answer depends on its own seed only: row 2 alone (row 0 dropped, so another padding) is the same
    alone = regenerate_answers(model, reasoned, torch.tensor([0, 0, int(n[2])]), [7, 8, 3], processor, **kw)
    assert alone == [None, None, out[2]]
    others = [regenerate_answers(model, reasoned, n, [s, 2, 3 + s], processor, **kw) for s in (10, 11, 12)]
    assert any(o[0] != out[0] for o in others) and any(o[2] != out[2] for o in others)  # other seeds, other samples
    assert "</think>" not in out[0] + out[2]  # the text after the sample's own reasoning


def test_regenerate_answers_runs_the_collectives_without_rows(toy_model, reasoned, monkeypatch):
    """Under FSDP2 the tower's forward and the reference's gathering are collectives: a rank whose samples hold no
    `</think>` must still run them, or a rank with rows to regenerate waits forever."""
    import contextlib

    import refgen

    calls = []
    real_encode = refgen.encode_vision
    monkeypatch.setattr(refgen, "encode_vision", lambda *a: calls.append("vision") or real_encode(*a))
    monkeypatch.setattr(refgen, "gathered", lambda m: calls.append("gathered") or contextlib.nullcontext())
    model, processor = toy_model
    out = regenerate_answers(model, reasoned, torch.zeros(3, dtype=torch.long), [1, 2, 3], processor,
                             max_new_tokens=5)
    assert out == [None, None, None] and calls == ["vision", "gathered"]


# --- the README's table: every row parses to the arm it names ------------------------------------
ARMS = {  # the paper's name -> (consistency reward, KL weighs something, KL on, SepKL, the reference moves (EMA))
    "GRPO": ("none", True, "all", None, False), "KL-EMA": ("none", True, "all", None, True),
    "KL-EMA-HA": ("none", True, "accurate", None, True), "SepKL-EMA-HA": ("none", True, "accurate", 0.04, True),
    "noKL": ("none", False, "all", None, False), "DenseCons": ("dense", False, "all", None, True),
    "RefGen": ("refgen", False, "all", None, True), "GRPO-CARE": ("care", False, "all", None, True),
}


def test_readme_table3_rows_select_their_arm():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = dict(re.findall(r"^\| ([\w-]+) \| `(--[^`]+)` \|$", readme, re.MULTILINE))
    assert list(rows) == list(ARMS), "one row per Table 3 arm, in the paper's order"
    for name, flags in rows.items():
        cfg = grpo_care.parse_config(flags.split())
        got = (cfg.consistency_reward, cfg.has_kl(), cfg.kl_on, cfg.sep_kl_answer_coef,
               cfg.ema_reference())
        assert got == ARMS[name], name


@pytest.mark.parametrize("flags, message", [
    (["--kl_on", "accurate"], "there is none: set --beta > 0"),
    (["--consistency_reward", "none", "--kl_reference", "ema"], "there is none: set --beta > 0"),
    (["--beta", "0.04"], "--kl_reference initial: --consistency_reward care moves the one reference model"),
    (["--consistency_reward", "sparse"], "--consistency_reward 'sparse': must be care, dense, refgen or none"),
    (["--sep_kl_answer_coef", "-1", "--beta", "0.1", "--kl_reference", "ema"], "--sep_kl_answer_coef -1.0: must be"),
])
def test_arm_flag_errors(flags, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        grpo_care.parse_config(flags)


def test_consistency_reward_per_arm():
    acc, conf, regen = torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[0.9, 0.5, 0.8]]), torch.tensor([[0.0, 1.0, 1.0]])
    arm = lambda name: grpo_care.consistency_reward(name, acc, conf, regen, 0.5, 0.0)  # noqa: E731
    # care: accurate {0, 1}, level (0.9 + 0.5) / 2 = 0.7: only sample 0 is confident -> 0.5 * 1
    assert_close(arm("care"), torch.tensor([[0.5, 0.0, 0.0]]))
    assert_close(arm("dense"), torch.tensor([[0.45, 0.25, 0.0]]))  # 0.5 * acc * conf
    assert_close(arm("refgen"), torch.tensor([[0.0, 0.5, 0.5]]))  # 0.5 * regenerated accuracy
    assert_close(arm("none"), torch.zeros(1, 3))
