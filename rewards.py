"""Rewards of GRPO-CARE: rule-based accuracy and format, group-relative advantages, and the consistency bonus
that gives CARE its name. Pure functions of tensors and strings.

    r = accuracy + format + bonus,    bonus = coef * accuracy  if the sample is accurate (accuracy > 0.1 and
                                      >= its group's mean) and the EMA reference, reading the sampled reasoning,
                                      is about as confident in its answer as in the group's other accurate ones

The bonus rewards reasoning that leads to the answer: a reference model that reads the reasoning should find the
answer likely. Plain GRPO is `bonus=None`. Accuracy is graded per problem type (`score_answer`: SEED-Bench-R1 is
all multiple choice; Video-R1 mixes multiple choice, numerical, OCR, free-form and regression) with the
reference's semantics. Departures from the reference: DEPARTURES.md.
"""

import functools
import math
import re

import torch

PROBLEM_TYPES = ("multiple choice", "numerical", "OCR", "free-form", "regression")

# Non-greedy so the *first* complete <answer>...</answer> pair is the answer (rollout.answer_span_mask
# finds the same span in the token bytes, for the EMA reference's confidence).
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# Used with fullmatch: nothing may precede <think> or follow </answer>. Note the
# second `.*?` can stretch over "A</answer><answer>B", so two answer tags still
# count as well formed, as in the reference.
_FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)


def parse_answer(text: str) -> str | None:
    """Stripped text inside the first complete `<answer>...</answer>`, or None."""
    m = ANSWER_RE.search(text)
    return m.group(1).strip() if m else None


def first_letter_pick(text: str) -> str | None:
    """SEED-Bench-R1's v1 scorer: the first character of the first answer tag's stripped text (None: no tag, or
    empty). Its reward tries math_verify first, which parses nothing from a gold "<answer>C.</answer>" (0.9.0),
    so for a letter this rule alone decides: "<answer>C. cut it</answer>" and "<answer>Cut</answer>" pick C."""
    answer = parse_answer(text)
    return answer[0] if answer else None


def to_number(text: str) -> float | None:
    """`text` as a finite float, commas removed ("1,000" -> 1000.0); None for anything else."""
    try:
        x = float(text.replace(",", ""))
    except ValueError:
        return None
    return x if math.isfinite(x) else None


@functools.lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def score_answer(pred: str | None, gold: str, problem_type: str = "multiple choice") -> float:
    """Accuracy in [0, 1] of one stripped answer text against the stripped truth. Never raises on `pred`.

    multiple choice: exact match. numerical: 0 when exactly one side has a "." or ",", else equality
    after rounding to 2 decimals. OCR: 1 - word error rate. free-form: mean ROUGE-1/2/L F (stemmed).
    regression: 1 - min(1, |pred - truth| / |truth|). A missing answer (None) scores 0.
    """
    assert problem_type in PROBLEM_TYPES, f"unknown problem_type {problem_type!r}; expected one of {PROBLEM_TYPES}"
    if pred is None:
        return 0.0
    if problem_type == "multiple choice":
        return float(pred == gold)
    if problem_type == "OCR":
        from nltk.metrics.distance import edit_distance

        ref = gold.split()
        return max(0.0, 1.0 - edit_distance(ref, pred.split()) / max(1, len(ref)))
    if problem_type == "free-form":
        s = _rouge().score(gold, pred)
        return min(1.0, max(0.0, (s["rouge1"].fmeasure + s["rouge2"].fmeasure + s["rougeL"].fmeasure) / 3))
    decimal = lambda t: "." in t or "," in t  # noqa: E731
    if problem_type == "numerical" and decimal(pred) != decimal(gold):  # "3" vs "3.0": another precision asked
        return 0.0
    p, g = to_number(pred), to_number(gold)
    if p is None or g is None:
        return 0.0
    if problem_type == "numerical":
        return float(round(p, 2) == round(g, 2))
    if g == 0:  # regression: no relative error around 0, only an exact hit counts
        return float(p == 0)
    return 1.0 - min(1.0, abs(p - g) / abs(g))


def accuracy_reward(completions: list[str], solutions: list[str], problem_types: list[str] | None = None,
                    scorer: str = "exact") -> list[float]:
    """Accuracy of each completion's first answer against its solution, by problem type (`score_answer`).

    Solutions may be "B" or "<answer>B</answer>". `problem_types=None` means all multiple choice:
    1.0 when the answer equals the letter, else 0.0, exact and case-sensitive after stripping
    whitespace ("b" and "B." are both wrong for "B"), as in the reference. `scorer` "first_letter": a
    multiple-choice answer is right when its first character is the letter (`first_letter_pick`, "B." is right).
    """
    assert len(completions) == len(solutions), f"{len(completions)} completions vs {len(solutions)} solutions"
    problem_types = problem_types or ["multiple choice"] * len(completions)
    assert len(problem_types) == len(completions), f"{len(problem_types)} problem types vs {len(completions)} completions"
    rewards = []
    for completion, solution, problem_type in zip(completions, solutions, problem_types):
        gold = parse_answer(solution)
        gold = solution.strip() if gold is None else gold
        if scorer == "first_letter" and problem_type == "multiple choice":
            rewards.append(float(first_letter_pick(completion) == gold[:1]))
        else:
            rewards.append(score_answer(parse_answer(completion), gold, problem_type))
    return rewards


def format_reward(completions: list[str]) -> list[float]:
    """1.0 when the whole completion is `<think>...</think> <answer>...</answer>`, else 0.0."""
    return [1.0 if _FORMAT_RE.fullmatch(c) else 0.0 for c in completions]


def total_reward(accuracy: torch.Tensor, format_: torch.Tensor, bonus: torch.Tensor | None = None) -> torch.Tensor:
    """The two-tier reward `accuracy + format + bonus`; `bonus=None` is plain GRPO."""
    assert accuracy.shape == format_.shape, f"accuracy {tuple(accuracy.shape)} vs format {tuple(format_.shape)}"
    if bonus is None:
        return accuracy + format_
    assert bonus.shape == accuracy.shape, f"bonus {tuple(bonus.shape)} vs accuracy {tuple(accuracy.shape)}"
    return accuracy + format_ + bonus


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages: rewards `(B, G)` normalised within each group of G samples.

    `(r - mean) / (std + eps)` with the unbiased std, as the reference. A group whose
    rewards are all equal carries no signal and gets exactly zeros, also when G = 1
    (where the unbiased std is NaN).
    """
    assert rewards.dim() == 2, f"rewards must be (B, G), got {tuple(rewards.shape)}"
    if rewards.shape[-1] == 1:  # a lone sample has nothing to be relative to
        return torch.zeros_like(rewards)
    mean = rewards.mean(dim=-1, keepdim=True)  # (B, 1)
    std = rewards.std(dim=-1, keepdim=True)  # (B, 1), unbiased
    adv = (rewards - mean) / (std + eps)  # (B, G)
    # exact zeros: (r - mean) of equal floats is not always 0, and / eps would magnify it
    flat = (rewards == rewards[:, :1]).all(dim=-1, keepdim=True)  # (B, 1)
    return torch.where(flat, torch.zeros_like(adv), adv)


def answer_confidence(
    ref_logps: torch.Tensor, answer_mask: torch.Tensor, upper_bound: float | None = 0.95
) -> torch.Tensor:
    """Reference model's confidence in each sampled answer, `(N, T)` -> `(N,)`.

    `min(exp(mean ref log-prob over the answer tokens), upper_bound)`: a geometric-mean
    token probability. The cap (the paper's `confidence_upper_bound`) stops near-certain
    answers from setting a level the rest of the group cannot reach. Rows with no
    answer token get 0: with no answer there is nothing to be consistent with.
    """
    assert ref_logps.shape == answer_mask.shape, (
        f"ref_logps {tuple(ref_logps.shape)} vs answer_mask {tuple(answer_mask.shape)}")
    mask = answer_mask.bool()
    # where, not multiply: padding may hold -inf, and -inf * 0 is NaN.
    logps = torch.where(mask, ref_logps.detach().float(), 0.0)  # (N, T)
    n = mask.sum(dim=-1)  # (N,)
    conf = torch.exp(logps.sum(dim=-1) / n.clamp(min=1))  # (N,)
    if upper_bound is not None:
        conf = conf.clamp(max=upper_bound)
    return torch.where(n > 0, conf, 0.0)


def accurate_samples(accuracy: torch.Tensor) -> torch.Tensor:
    """`(B, G)` -> `(B, G)` bool: the samples CARE may reward, acc > 0.1 and >= the group's mean."""
    # A mean never exceeds its largest term; clamping removes the one-ulp overshoot
    # that would otherwise drop exact ties (all-correct groups, capped confidences).
    mean_acc = accuracy.mean(dim=-1, keepdim=True)  # (B, 1)
    mean_acc = torch.minimum(mean_acc, accuracy.amax(dim=-1, keepdim=True))  # (B, 1)
    return (accuracy > 0.1) & (accuracy >= mean_acc)  # (B, G)


def consistency_bonus(
    accuracy: torch.Tensor, confidence: torch.Tensor, coef: float = 0.5, margin: float = 0.0
) -> torch.Tensor:
    """CARE's consistency bonus, `(B, G)` tensors -> `(B, G)`.

    Per group of G samples of one prompt:
    - accurate  = acc > 0.1 and acc >= the group's mean acc (ties at the mean count);
    - level     = mean confidence of the group's accurate samples;
    - confident = confidence >= level - margin (the margin spares samples just below);
    - bonus     = coef * acc where accurate and confident, else 0.
    Graded accuracies (OCR, free-form, regression) need nothing more: the 0.1 floor keeps
    near-misses out and the bonus scales with the accuracy earned.
    A group with no accurate sample gets zeros. The reference computes these means over
    everything on one device (one group there, one prompt per device); here they are
    per group, so groups never influence each other's bonus.
    """
    assert accuracy.shape == confidence.shape, (
        f"accuracy {tuple(accuracy.shape)} vs confidence {tuple(confidence.shape)}")
    assert accuracy.dim() == 2, f"expected (B, G), got {tuple(accuracy.shape)}"
    accurate = accurate_samples(accuracy)  # (B, G)
    conf_acc = torch.where(accurate, confidence, 0.0)  # (B, G)
    n_acc = accurate.sum(dim=-1, keepdim=True)  # (B, 1)
    level = conf_acc.sum(dim=-1, keepdim=True) / n_acc.clamp(min=1)  # (B, 1)
    top = torch.where(accurate, confidence, -torch.inf).amax(dim=-1, keepdim=True)  # (B, 1)
    level = torch.minimum(level, top)  # (B, 1)
    confident = confidence >= level - margin  # (B, G)

    return torch.where(accurate & confident, coef * accuracy, 0.0)  # (B, G)


def bonus_selective(accuracy: torch.Tensor, bonus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(B, G)` accuracy and bonus -> (selective `(B,)`, eligible `(B,)`) bool, a diagnostic.

    eligible: the group has an accurate sample. selective: the bonus went to some accurate samples
    and not to others. A bonus on every accurate sample is a rescaled accuracy reward, which group
    normalisation mostly cancels: only selective groups carry CARE's consistency signal."""
    accurate = accurate_samples(accuracy)  # (B, G)
    selective = (accurate & (bonus == 0)).any(-1) & (bonus > 0).any(-1)  # (B,)
    return selective, accurate.any(-1)


# --- the other consistency rewards of the paper's Table 3 (ablations; CARE is `consistency_bonus`) ---


def dense_consistency_reward(accuracy: torch.Tensor, confidence: torch.Tensor, coef: float = 0.5) -> torch.Tensor:
    """DenseCons, `(B, G)` -> `(B, G)`: r_cons = coef * r_acc * p_ref(answer | x, reasoning) on every sample.

    `confidence` is the reference's (capped) answer confidence, `answer_confidence`: no group statistics, no
    selection, so every accurate sample is paid in proportion to how likely the reference finds its answer."""
    assert accuracy.shape == confidence.shape, (
        f"accuracy {tuple(accuracy.shape)} vs confidence {tuple(confidence.shape)}")
    return coef * accuracy * confidence


def refgen_consistency_reward(regenerated_accuracy: torch.Tensor, coef: float = 0.5) -> torch.Tensor:
    """RefGen, `(B, G)` -> `(B, G)`: r_cons = coef * accuracy of the answer the reference samples after the
    sample's own reasoning (refgen.regenerate_answers). It ignores the sample's own answer: reasoning from
    which the reference reaches the right answer is paid, whether or not the policy then answered so."""
    return coef * regenerated_accuracy
