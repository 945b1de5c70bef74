"""Reward math of GRPO-CARE, pinned with hand-computed values (see rewards.py)."""

import math

import pytest
import torch
from torch.testing import assert_close

from rewards import (
    accurate_samples,
    accuracy_reward,
    answer_confidence,
    bonus_selective,
    consistency_bonus,
    format_reward,
    group_advantages,
    parse_answer,
    total_reward,
)


def T(*rows):
    """T([..], [..]) -> (B, G) float32; T(a, b) -> (2,)."""
    return torch.tensor(rows, dtype=torch.float32)


# --- parse_answer / accuracy_reward / format_reward -------------------------------


def test_parse_answer():
    assert parse_answer("<think>x</think><answer> B \n</answer>") == "B"
    assert parse_answer("<answer>A</answer><answer>B</answer>") == "A"  # first pair wins
    assert parse_answer("<answer>B") is None  # no closing tag
    assert parse_answer("no tags at all") is None


@pytest.mark.parametrize(
    "completion, solution, expected",
    [
        ("<think>ok</think><answer>B</answer>", "B", 1.0),
        ("<think>ok</think><answer>B</answer>", "<answer>B</answer>", 1.0),  # tagged solution
        ("<think>ok</think><answer>  B\n</answer>", "B", 1.0),  # spaces inside tags are stripped
        ("<think>ok</think><answer>b</answer>", "B", 0.0),  # case-sensitive, as the reference
        ("<think>ok</think><answer>B. the red cup</answer>", "B", 0.0),  # exact letter only
        ("<think>ok</think><answer>A</answer><answer>B</answer>", "B", 0.0),  # first answer counts
        ("<think>ok</think><answer>A</answer><answer>B</answer>", "A", 1.0),
        ("<think>ok</think><answer>B", "B", 0.0),  # missing closing tag: no answer
        ("<answer>B</answer><think>ok</think>", "B", 1.0),  # order is format's business
        ("<think>ok</think><answer>B</answer> so B it is", "B", 1.0),  # trailing text too
        ("B", "B", 0.0),  # a bare letter is not an answer
    ],
)
def test_accuracy_reward_tricky_strings(completion, solution, expected):
    assert accuracy_reward([completion], [solution]) == [expected]


def test_accuracy_reward_is_elementwise():
    out = accuracy_reward(["<answer>A</answer>", "<answer>C</answer>"], ["A", "<answer>D</answer>"])
    assert out == [1.0, 0.0]
    assert all(isinstance(x, float) for x in out)


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>ok</think><answer>B</answer>", 1.0),
        ("<think>line 1\nline 2</think>\n\n<answer>\nB\n</answer>", 1.0),  # dot matches newlines
        ("<think> ok </think> <answer> B </answer>", 1.0),  # spaces inside and between tags
        ("<think></think><answer></answer>", 1.0),  # the format does not judge content
        ("<think>ok</think><answer>b</answer>", 1.0),  # lowercase letter: still well formed
        ("<answer>B</answer><think>ok</think>", 0.0),  # answer before think
        ("<think>ok</think><answer>B</answer> extra", 0.0),  # text after the answer
        ("<think>ok</think><answer>B</answer>\n", 0.0),  # even a trailing newline (fullmatch)
        ("so: <think>ok</think><answer>B</answer>", 0.0),  # text before think
        ("<think>ok</think><answer>B", 0.0),  # missing closing tag
        ("<think>ok<answer>B</answer>", 0.0),  # missing </think>
        ("<think>ok</think>done", 0.0),  # no answer
        # Two answer tags pass: `.*?` stretches over "A</answer><answer>B" (reference quirk).
        ("<think>ok</think><answer>A</answer><answer>B</answer>", 1.0),
    ],
)
def test_format_reward_tricky_strings(completion, expected):
    assert format_reward([completion]) == [expected]


# --- total_reward -------------------------------------------------------------------


def test_total_reward_two_tier_and_plain_grpo():
    acc, fmt, bonus = T([1.0, 0.0]), T([1.0, 1.0]), T([0.5, 0.0])
    assert_close(total_reward(acc, fmt, bonus), T([2.5, 1.0]))  # 1+1+0.5, 0+1+0
    assert_close(total_reward(acc, fmt), T([2.0, 1.0]))  # bonus off: plain GRPO


# --- group_advantages ---------------------------------------------------------------


def test_group_advantages_worked_example():
    r = T([2.0, 1.0, 1.0, 0.0], [1.5, 0.0, 0.0, 0.0])
    # group 1: mean=1, deviations (1,0,0,-1), var(unbiased)=2/3, std=0.816497
    #   -> 1/(0.816497+1e-4) = 1.224590
    # group 2: mean=0.375, deviations (1.125,-0.375,-0.375,-0.375),
    #   var(unbiased)=(1.265625+3*0.140625)/3=0.5625, std=0.75
    #   -> 1.125/0.7501=1.499800, -0.375/0.7501=-0.499933
    expected = T([1.224590, 0.0, 0.0, -1.224590], [1.499800, -0.499933, -0.499933, -0.499933])
    assert_close(group_advantages(r), expected, atol=1e-5, rtol=1e-5)


def test_group_advantages_zero_variance_group_is_zero_and_finite():
    r = torch.tensor([[2.1] * 7, [0.9] * 7, [1.0] + [0.0] * 6])
    adv = group_advantages(r)
    assert torch.isfinite(adv).all()
    # exactly zero: the float32 mean of seven 2.1s is off by an ulp, which / (0 + 1e-4)
    # would turn into -0.0024 (the reference's behaviour)
    assert_close(adv[:2], torch.zeros(2, 7), atol=0.0, rtol=0.0)
    # mean=1/7, std(unbiased)=sqrt(1/7)=0.377964
    #   -> (6/7)/(0.377964+1e-4)=2.267187, (-1/7)/(0.377964+1e-4)=-0.377864
    assert_close(adv[2], torch.tensor([2.267187] + [-0.377864] * 6), atol=1e-5, rtol=1e-5)
    assert_close(group_advantages(T([1.0], [0.0])), torch.zeros(2, 1), atol=0.0, rtol=0.0)  # G=1: no NaN


# --- answer_confidence --------------------------------------------------------------


def test_answer_confidence_matches_hand_computation():
    ref = T([math.log(0.5), math.log(0.8), -9.0], [math.log(0.3), -9.0, -9.0])
    mask = T([1, 1, 0], [1, 0, 0])
    # row 1: exp((ln .5 + ln .8)/2) = sqrt(0.4) = 0.632456; the masked -9 is ignored
    # row 2: exp(ln .3) = 0.3
    assert_close(answer_confidence(ref, mask), T(0.632456, 0.3), atol=1e-6, rtol=1e-6)


def test_answer_confidence_cap():
    ref = T([math.log(0.99), math.log(0.99)], [math.log(0.5), 0.0])
    mask = T([1, 1], [1, 0])
    assert_close(answer_confidence(ref, mask), T(0.95, 0.5))  # 0.99 capped at 0.95
    assert_close(answer_confidence(ref, mask, upper_bound=0.98), T(0.98, 0.5))
    assert_close(answer_confidence(ref, mask, upper_bound=None), T(0.99, 0.5))


def test_answer_confidence_empty_span_is_zero():
    ref = T([-float("inf"), -1.0], [-0.1, -0.1])  # padding may hold -inf
    mask = T([0, 0], [1, 1])
    # row 1 has no answer token -> 0 (the reference's 1e-6 denominator would give exp(0)=1)
    # row 2: exp(-0.1) = 0.904837
    assert_close(answer_confidence(ref, mask), T(0.0, 0.904837), atol=1e-6, rtol=1e-6)


# --- consistency_bonus --------------------------------------------------------------


def test_bonus_all_correct():
    acc = T([1.0, 1.0, 1.0, 1.0])
    conf = T([0.9, 0.8, 0.7, 0.6])
    # all accurate (1 >= mean 1); level = mean(0.9,0.8,0.7,0.6) = 0.75
    # confident: 0.9, 0.8 >= 0.75 -> bonus 0.5*1 for those two
    assert_close(consistency_bonus(acc, conf), T([0.5, 0.5, 0.0, 0.0]))


def test_bonus_all_wrong():
    acc = T([0.0, 0.0, 0.0, 0.0])
    conf = T([0.9, 0.8, 0.7, 0.6])
    # nobody has acc > 0.1 -> no level, no bonus (and no NaN from an empty mean)
    assert_close(consistency_bonus(acc, conf), torch.zeros(1, 4), atol=0.0, rtol=0.0)


def test_bonus_one_accurate_sample_is_its_own_level():
    acc = T([0.0, 1.0, 0.0, 0.0])
    conf = T([0.9, 0.1, 0.9, 0.9])
    # accurate: only sample 1 (mean acc 0.25); level = 0.1 = its own confidence -> bonus;
    # confident wrong samples get nothing
    assert_close(consistency_bonus(acc, conf), T([0.0, 0.5, 0.0, 0.0]))


def test_bonus_ties_at_the_mean():
    acc = T([0.5, 0.5, 0.25, 0.75])
    conf = T([0.75, 0.25, 0.9, 0.5])
    # mean acc = 0.5 -> accurate = acc >= 0.5: samples 0, 1 (ties count) and 3
    # level = (0.75+0.25+0.5)/3 = 0.5 -> confident accurate: 0 (0.75) and 3 (0.5, a tie)
    # bonus = 0.5*acc there: 0.25, 0.375
    assert_close(consistency_bonus(acc, conf), T([0.25, 0.0, 0.0, 0.375]))


def test_bonus_exact_ties_all_get_it():
    # The cap makes ties common. In float32 the mean of G equal values can land one ulp
    # above them (0.85 at G=3, 0.9 at G=7, 0.95 at G=24, checked), which must not
    # cost every sample of the group its bonus.
    for value, g in ((0.85, 3), (0.9, 7), (0.95, 24)):
        acc, conf = torch.ones(1, g), torch.full((1, g), value)
        assert_close(consistency_bonus(acc, conf), torch.full((1, g), 0.5))  # all accurate and confident
    # the same for the accuracy mean, with a partial accuracy (0.55 at G=10 overshoots)
    acc = torch.full((1, 10), 0.55)
    assert_close(consistency_bonus(acc, torch.full((1, 10), 0.7)), torch.full((1, 10), 0.275))  # 0.5*0.55


def test_bonus_margin_admits_slightly_less_confident_sample():
    acc = T([1.0, 1.0, 1.0, 0.0])
    conf = T([0.9, 0.8, 0.67, 0.99])
    # level = (0.9+0.8+0.67)/3 = 0.79; sample 3 is wrong, so its 0.99 is irrelevant
    # margin 0:    0.67 < 0.79        -> no bonus for sample 2
    # margin 0.15: 0.67 >= 0.79-0.15 = 0.64 -> bonus
    assert_close(consistency_bonus(acc, conf), T([0.5, 0.5, 0.0, 0.0]))
    assert_close(consistency_bonus(acc, conf, margin=0.15), T([0.5, 0.5, 0.5, 0.0]))
    # margin 0.1: 0.67 < 0.69 -> still out
    assert_close(consistency_bonus(acc, conf, margin=0.1), T([0.5, 0.5, 0.0, 0.0]))


def test_bonus_coef():
    acc = T([1.0, 1.0, 1.0, 1.0])
    conf = T([0.9, 0.8, 0.7, 0.6])
    assert_close(consistency_bonus(acc, conf, coef=1.0), T([1.0, 1.0, 0.0, 0.0]))  # bonus = 1.0*acc
    assert_close(consistency_bonus(acc, conf, coef=0.2), T([0.2, 0.2, 0.0, 0.0]))
    assert_close(consistency_bonus(acc, conf, coef=0.0), torch.zeros(1, 4))


def test_bonus_partial_accuracies():
    acc = T([0.05, 0.3, 0.6, 0.9])
    conf = T([0.9, 0.9, 0.5, 0.7])
    # mean acc = 1.85/4 = 0.4625 -> accurate: samples 2 (0.6) and 3 (0.9)
    # level = (0.5+0.7)/2 = 0.6 -> only sample 3 confident; bonus = 0.5*0.9 = 0.45
    assert_close(consistency_bonus(acc, conf), T([0.0, 0.0, 0.0, 0.45]))
    # acc must exceed 0.1: these are all >= their mean 0.06 but none counts as accurate
    assert_close(consistency_bonus(T([0.08, 0.08, 0.08, 0.0]), conf), torch.zeros(1, 4), atol=0.0, rtol=0.0)


def test_bonus_groups_are_independent():
    acc1, conf1 = [1.0, 1.0, 0.0, 1.0], [0.9, 0.5, 0.1, 0.8]
    # group 1 alone: mean acc 0.75, accurate 0, 1, 3; level = (0.9+0.5+0.8)/3 = 0.7333
    # -> bonus for 0 (0.9) and 3 (0.8). Pooled with the confident group 2 below, the
    # level would be (2.2+4*0.99)/7 = 0.88 and sample 3 would lose its bonus.
    expected1 = torch.tensor([0.5, 0.0, 0.0, 0.5])
    group2s = [
        ([0.0, 0.0, 0.0, 0.0], [0.2, 0.2, 0.2, 0.2]),  # all wrong: batch mean acc would drop
        ([1.0, 1.0, 1.0, 1.0], [0.99, 0.99, 0.99, 0.99]),  # very confident: batch level would rise
        ([1.0, 0.0, 0.0, 0.0], [0.01, 0.9, 0.9, 0.9]),  # barely confident: batch level would fall
    ]
    for acc2, conf2 in group2s:
        bonus = consistency_bonus(T(acc1, acc2), T(conf1, conf2))
        assert_close(bonus[0], expected1)
        assert_close(bonus[1], consistency_bonus(T(acc2), T(conf2))[0])


# --- accuracy by problem type (Video-R1): the reference's semantics ------------------


def _acc(pred, gold, problem_type):
    """Score one answer text as a completion would carry it."""
    return accuracy_reward([f"<think>t</think><answer>{pred}</answer>"], [f"<answer>{gold}</answer>"], [problem_type])[0]


@pytest.mark.parametrize("pred, gold, expected", [
    ("3", "3", 1.0),
    ("3.0", "3", 0.0),  # only one side has a decimal point: another precision was asked for
    ("3.0", "3.00", 1.0),  # both have one: 3.0 == 3.0
    ("1000", "1,000", 0.0),  # only one side has a comma, same rule (the reference's)
    ("1,000", "1,000", 1.0),
    ("1,000.5", "1000.5", 1.0),  # both have a "." -> commas dropped, 1000.5 == 1000.5
    ("3.141", "3.14", 1.0),  # rounded to 2 decimals: 3.14 == 3.14
    ("3.15", "3.14", 0.0),
    ("-2", "-2", 1.0),
    ("", "3", 0.0),  # empty answer
    ("three", "3", 0.0),  # not a number
    ("3 cups", "3", 0.0),
    ("inf", "3", 0.0), ("nan", "3", 0.0), ("9" * 400, "3", 0.0),  # 9...9 overflows to inf
])
def test_numerical(pred, gold, expected):
    assert _acc(pred, gold, "numerical") == expected


@pytest.mark.parametrize("pred, gold, expected", [
    ("10", "10", 1.0),
    ("12", "10", 0.8),  # 1 - |12-10|/10
    ("7", "10", 0.7),
    ("10.0", "10", 1.0),  # no decimal-point rule for regression
    ("1,000", "1000", 1.0),
    ("30", "10", 0.0),  # relative error 2, capped at 1
    ("-10", "10", 0.0),
    ("0", "0", 1.0),  # truth 0: an exact 0 is right (the reference's epsilons give it 0) ...
    ("0.5", "0", 0.0),  # ... anything else is infinitely wrong, relatively
    ("", "10", 0.0), ("ten", "10", 0.0), ("nan", "10", 0.0), ("1e999", "10", 0.0),
])
def test_regression(pred, gold, expected):
    assert _acc(pred, gold, "regression") == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("pred, gold, expected", [
    ("red cup", "red cup", 1.0),
    ("the red cup", "red cup", 0.5),  # 1 insertion / 2 reference words
    ("red", "red cup", 0.5),  # 1 deletion / 2
    ("Red cup", "red cup", 0.5),  # case counts, as in the reference
    ("blue mug", "red cup", 0.0),  # 2 substitutions / 2
    ("a b c d e", "red cup", 0.0),  # 5 edits / 2 = WER 2.5, clipped to 0
    ("", "red cup", 0.0),
])
def test_ocr(pred, gold, expected):
    assert _acc(pred, gold, "OCR") == expected


def test_ocr_empty_gold():
    assert _acc("", "", "OCR") == 1.0  # WER of no words against no words: 0 edits / max(1, 0)
    # no complete tag: no answer, 0 (the reference reads it as "" and scores 1.0 here)
    assert accuracy_reward(["<think>t</think> blank"], ["<answer></answer>"], ["OCR"]) == [0.0]


@pytest.mark.parametrize("pred, gold, expected", [
    ("the red cup", "the red cup", 1.0),
    ("red cups", "red cup", 1.0),  # stemmed
    # unigrams [a red cup is there] vs [the red cup are here]: 2 of 5 each way -> F 0.4;
    # bigrams: "red cup" of 4 -> 0.25; longest common subsequence "red cup": 2/5 -> 0.4; mean 0.35
    ("a red cup is there", "the red cups are here", 0.35),
    ("blue mug", "red cup", 0.0),
    ("", "red cup", 0.0),
])
def test_free_form(pred, gold, expected):
    assert _acc(pred, gold, "free-form") == pytest.approx(expected)


@pytest.mark.parametrize("problem_type", ["multiple choice", "numerical", "OCR", "free-form", "regression"])
def test_malformed_completions_score_zero(problem_type):
    bad = ["", "no tags 3", "<answer>3", "</answer>3<answer>", "<answer>\x00\ufffd</answer>", "<answer>" + "9" * 5000 + "</answer>"]
    assert accuracy_reward(bad, ["<answer>3</answer>"] * len(bad), [problem_type] * len(bad)) == [0.0] * len(bad)


def test_problem_types_default_to_multiple_choice():
    completions, solutions = ["<answer>B</answer>", "<answer>3.0</answer>"], ["B", "3"]
    assert accuracy_reward(completions, solutions) == [1.0, 0.0]
    assert accuracy_reward(completions, solutions, None) == accuracy_reward(completions, solutions, ["multiple choice"] * 2)
    with pytest.raises(AssertionError, match="unknown problem_type 'essay'"):
        accuracy_reward(completions, solutions, ["essay", "essay"])
    with pytest.raises(AssertionError, match="1 problem types vs 2 completions"):
        accuracy_reward(completions, solutions, ["numerical"])


def test_bonus_on_graded_accuracies():
    regression = [accuracy_reward([f"<answer>{p}</answer>"], ["10"], ["regression"])[0] for p in ("10", "14", "7", "19", "x")]
    ocr = [accuracy_reward([f"<answer>{p}</answer>"], ["red cup"], ["OCR"])[0]
           for p in ("red cup", "red", "blue mug", "the red cup", "")]
    assert_close(T(regression, ocr), T([1.0, 0.6, 0.7, 0.1, 0.0], [1.0, 0.5, 0.0, 0.5, 0.0]))
    conf = T([0.5, 0.9, 0.8, 0.95, 0.1], [0.2, 0.6, 0.9, 0.6, 0.9])
    # regression: mean acc 2.4/5 = 0.48 -> accurate 1.0, 0.6, 0.7 (0.1 is below the mean, however confident);
    #   level = (0.5+0.9+0.8)/3 = 0.733 -> confident: 0.6 and 0.7 -> bonus 0.5*acc = 0.3, 0.35
    # OCR: mean 2.0/5 = 0.4 -> accurate 1.0, 0.5, 0.5; level = (0.2+0.6+0.6)/3 = 0.467 -> the two 0.5s: 0.25 each
    assert_close(consistency_bonus(T(regression, ocr), conf), T([0.0, 0.3, 0.35, 0.0, 0.0], [0.0, 0.25, 0.0, 0.25, 0.0]))


def test_bonus_floor_keeps_an_accuracy_of_0_1_out():
    # a graded near-miss can sit above its group's mean; the floor (the reference's acc > 0.1) keeps it out.
    # group 0: acc 0.1 and zeros, mean 0.025: 0.1 >= the mean but not > 0.1 -> nothing accurate, no bonus.
    # group 1: acc 0.15 and zeros, mean 0.0375: accurate; the level is its own confidence -> 0.5 * 0.15
    acc = T([0.1, 0, 0, 0], [0.15, 0, 0, 0])
    assert accurate_samples(acc).tolist() == [[False] * 4, [True, False, False, False]]
    assert_close(consistency_bonus(acc, T([0.9] * 4, [0.9] * 4)), T([0, 0, 0, 0], [0.075, 0, 0, 0]))


def test_bonus_selective_flags_groups_where_consistency_decided():
    acc = T([1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 0.5, 0.05, 0])
    conf = T([0.9, 0.5, 0, 0], [0.95, 0.95, 0, 0], [0, 0, 0, 0], [0.9, 0.2, 0, 0])
    bonus = consistency_bonus(acc, conf)
    # group 0: level 0.7, bonus on sample 0 only -> selective; group 1: both at the cap -> every accurate
    # sample gets it (a rescaled accuracy); group 2: nothing accurate; group 3: mean acc 0.3875 -> samples
    # 0 and 1 accurate, level 0.55 -> bonus on 0 only -> selective
    selective, eligible = bonus_selective(acc, bonus)
    assert selective.tolist() == [True, False, False, True]
    assert eligible.tolist() == [True, True, False, True]
    assert not bonus_selective(acc, torch.zeros_like(acc))[0].any(), "plain GRPO has no bonus to be selective with"
