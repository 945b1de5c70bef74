"""rollout.py on the toy Qwen2.5-VL: masks, chunked log-probs, vision once, seeding, answer spans."""
import copy

import pytest
import torch
import torch.nn.functional as F

from data import Collator, load_examples
from rewards import parse_answer
from rollout import (Rollout, SeededSampler, answer_span_mask, completion_logprobs, completion_mask, encode_vision, generate_group, generate_groups, select_prompts, token_logprobs)

G = 2


@pytest.fixture(scope="module")
def prompts(toy_world, toy_model, toy_vision):
    """Three validation prompts; the middle one has no video."""
    _, processor = toy_model
    rows = load_examples(toy_world / "data/annotations/validation_L1.jsonl", toy_world / "data")
    with_video = [e for e in rows if e["video"] is not None]
    examples = [with_video[0], next(e for e in rows if e["video"] is None), with_video[1]]
    batch, kept = Collator(processor, toy_vision)(examples)
    return batch, kept


@pytest.fixture(scope="module")
def rollout(toy_model, prompts):
    model, processor = toy_model
    return generate_group(model, prompts[0], G, processor, max_new_tokens=6, seeds=[11, 12, 13])


def _vision_counter(model):
    """Counts calls of the vision tower and the images/videos they encode."""
    seen = {"calls": 0, "media": 0}

    def hook(module, args, kwargs, out):
        seen["calls"] += 1
        seen["media"] += kwargs["grid_thw"].shape[0]

    return seen, model.model.visual.register_forward_hook(hook, with_kwargs=True)


def _full_logprobs(model, batch_rep, completion_ids, mask):
    """The naive pass: plain model(**inputs) with pixels repeated per row, log-softmax of all logits."""
    P, T = batch_rep["input_ids"].shape[1], completion_ids.shape[1]
    inputs = {k: v for k, v in batch_rep.items()}
    inputs["input_ids"] = torch.cat([batch_rep["input_ids"], completion_ids], 1)
    inputs["attention_mask"] = torch.cat([batch_rep["attention_mask"], mask], 1)
    inputs["mm_token_type_ids"] = F.pad(batch_rep["mm_token_type_ids"], (0, T))
    logits = model(**inputs, use_cache=False).logits  # (N, P+T, V)
    return logits[:, P - 1:-1].log_softmax(-1).gather(-1, completion_ids[..., None]).squeeze(-1)


def test_completion_mask_ends_at_first_eos_inclusive():
    eos = 9
    ids = torch.tensor([[5, 9, 7, 7],   # EOS at 1 -> 1 1 0 0
                        [9, 1, 1, 1],   # EOS first -> 1 0 0 0
                        [1, 2, 3, 4],   # no EOS -> all 1, truncated
                        [1, 2, 3, 9],   # EOS last -> all 1, not truncated
                        [5, 9, 9, 0]])  # a second EOS is padding -> 1 1 0 0
    mask, truncated = completion_mask(ids, eos)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert truncated.tolist() == [False, False, True, False, False]


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 33, 1000])  # N*T = 33: 4 and 7 do not divide it
def test_token_logprobs_equal_full_log_softmax(chunk_size):
    torch.manual_seed(0)
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False)
    targets = torch.randint(0, 50, (3, 11))
    weights = torch.randn(3, 11)  # a loss that weighs every position differently
    for temperature in (1.0, 0.7):
        full = (head(hidden) / temperature).log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)  # (3, 11)
        full_grads = torch.autograd.grad((full * weights).sum(), (hidden, head.weight))
        with torch.no_grad():
            ours = token_logprobs(hidden, head, targets, chunk_size, temperature)
        torch.testing.assert_close(ours, full, atol=1e-5, rtol=0)
        ours = token_logprobs(hidden, head, targets, chunk_size, temperature)
        torch.testing.assert_close(ours, full, atol=1e-5, rtol=0)
        for g, ref in zip(torch.autograd.grad((ours * weights).sum(), (hidden, head.weight)), full_grads):
            torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-5)


def test_rollout_shapes_texts_and_flags(rollout, prompts, toy_model):
    _, processor = toy_model
    batch, _ = prompts
    N, T = 3 * G, rollout.completion_ids.shape[1]
    assert rollout.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert rollout.prompt_ids.shape == (N, batch["input_ids"].shape[1]) and rollout.completion_mask.shape == (N, T)
    mask, truncated = completion_mask(rollout.completion_ids, processor.tokenizer.convert_tokens_to_ids("<|im_end|>"))
    assert torch.equal(rollout.completion_mask, mask) and torch.equal(rollout.truncated, truncated)
    assert rollout.texts == [processor.tokenizer.decode(r[m.bool()], skip_special_tokens=True)
                             for r, m in zip(rollout.completion_ids, mask)]
    assert T == 6 or not truncated.any()  # truncated means the whole budget was used


def test_seeded_samples_do_not_depend_on_batch(rollout, prompts, toy_model, toy_vision):
    model, processor = toy_model
    _, kept = prompts
    state = torch.get_rng_state()
    alone, _ = Collator(processor, toy_vision)(kept[2:3])  # other padding, other vision batch
    again = generate_group(model, alone, G, processor, max_new_tokens=6, seeds=[13])
    assert torch.equal(torch.get_rng_state(), state), "seeded sampling must not move the global RNG"
    T = again.completion_ids.shape[1]
    assert torch.equal(again.completion_ids, rollout.completion_ids[4:6, :T])
    other = generate_group(model, alone, G, processor, max_new_tokens=6, seeds=[14])
    assert not torch.equal(other.completion_ids, again.completion_ids)


def test_batches_decoded_together_sample_as_alone(rollout, prompts, toy_model, toy_vision):
    """Prompts split over two batches, decoded in one call: each batch's rows equal the 3-prompt batch's."""
    model, processor = toy_model
    _, kept = prompts
    collate = Collator(processor, toy_vision)
    (first, _), (second, _) = collate(kept[:2]), collate(kept[2:])
    a, b = generate_groups(model, [first, second], G, processor, max_new_tokens=6, seeds=[11, 12, 13])
    assert a.prompt_index.tolist() == [0, 0, 1, 1] and b.prompt_index.tolist() == [0, 0]
    assert a.batch is first and b.batch is second and a.vision_calls == b.vision_calls == 1
    for ro, rows in ((a, slice(0, 4)), (b, slice(4, 6))):
        T = ro.completion_ids.shape[1]  # each batch's own length: its rows' longest completion
        assert T == int(ro.completion_mask.sum(-1).max())
        assert torch.equal(ro.completion_ids, rollout.completion_ids[rows, :T])
        assert torch.equal(ro.truncated, rollout.truncated[rows])
    assert not torch.equal(rollout.completion_ids[0], rollout.completion_ids[1]), "the G rows draw their own noise"


def test_shared_prefill_samples_as_a_full_prefill(rollout, prompts, toy_model):
    """The G rows continue from one prefill per prompt; with a cache generate builds itself (cache_implementation
    set: the G rows prefilled one by one, the path a static cache takes) the samples are the same."""
    model, processor = toy_model
    before, model.generation_config.cache_implementation = model.generation_config.cache_implementation, "dynamic"
    try:
        full = generate_group(model, prompts[0], G, processor, max_new_tokens=6, seeds=[11, 12, 13])
    finally:
        model.generation_config.cache_implementation = before
    assert torch.equal(full.completion_ids, rollout.completion_ids)


@pytest.mark.parametrize("temperature, top_p, expected", [
    # top-p 0.8 keeps the smallest set whose mass reaches 0.8 (HF's rule): 0.5 + 0.3, renormalised 0.625, 0.375
    (1.0, 0.8, [0.625, 0.375, 0.0, 0.0]),
    # temperature 2: p ** (1/2) = .7071, .5477, .3873, .2236, sum 1.8657 -> .379, .294, .208, .120
    (2.0, 1.0, [0.379, 0.294, 0.208, 0.120]),
])
def test_seeded_sampler_samples_the_filtered_softmax(temperature, top_p, expected):
    scores = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()  # (1, V)
    sampler = SeededSampler([0], temperature, top_p, torch.device("cpu"), max_new_tokens=7)  # draws 7 steps at a time
    n = 4000  # sd of a frequency near 0.5: sqrt(.25 / 4000) = 0.008
    picks = torch.stack([sampler(None, scores.clone()).argmax(-1) for _ in range(n)])
    freq = torch.bincount(picks.view(-1), minlength=4).float() / n
    torch.testing.assert_close(freq, torch.tensor(expected), atol=0.03, rtol=0)
    again = SeededSampler([0], temperature, top_p, torch.device("cpu"), max_new_tokens=7)
    assert [again(None, scores.clone()).argmax(-1).item() for _ in range(20)] == picks[:20].view(-1).tolist()


@pytest.mark.parametrize("top_p", [0.9, 1.0])  # 1.0: no top-p warper
def test_seeded_sampler_picks_the_full_vocabulary_gumbel_max(top_p):
    """Row r's token t is argmax over the vocabulary of HF's top-p scores + Gumbel noise from the t-th row of
    torch.rand(k, V) of generator r; the call returns 0 there and -inf elsewhere."""
    from transformers import TopPLogitsWarper

    torch.manual_seed(0)
    scores = torch.randn(6, 50) * 5  # (N, V)
    seeds, k = [3, 1, 4, 1, 5, 9], 3  # max_new_tokens 3: each row draws its 3 tokens' noise at once
    sampler = SeededSampler(seeds, 1.0, top_p, torch.device("cpu"), max_new_tokens=k)
    u = torch.stack([torch.rand(k, 50, generator=torch.Generator().manual_seed(s)) for s in seeds])  # (N, k, V)
    z = TopPLogitsWarper(top_p)(None, scores) if top_p < 1 else scores
    for t in range(k):
        out = sampler(None, scores.clone())
        expected = (z - u[:, t].log().neg().log()).argmax(-1)  # (N,)
        assert torch.equal(out.argmax(-1), expected)
        assert (out == 0).sum().item() == 6 and out.isinf().sum().item() == 6 * 49


def test_min_new_tokens_holds_back_eos(prompts, toy_model):
    model, processor = toy_model
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def eos_first(module, args, out):  # the LM head now all but always picks EOS
        out[..., eos] += 100.0
        return out

    handle = model.lm_head.register_forward_hook(eos_first)
    try:
        free = generate_group(model, prompts[0], G, processor, max_new_tokens=5, seeds=[1, 2, 3])
        held = generate_group(model, prompts[0], G, processor, max_new_tokens=5, seeds=[1, 2, 3], min_new_tokens=5)
    finally:
        handle.remove()
    assert free.completion_mask.sum(-1).tolist() == [1] * 3 * G, "EOS first in every row"
    assert held.completion_mask.sum(-1).tolist() == [5] * 3 * G and held.truncated.all()


def test_vision_once_logits_equal_repeated_pixels(rollout, prompts, toy_model, toy_vision):
    model, processor = toy_model
    batch, kept = prompts
    batch_rep, _ = Collator(processor, toy_vision)([ex for ex in kept for _ in range(G)])
    assert torch.equal(batch_rep["input_ids"], rollout.prompt_ids)
    with torch.no_grad():
        inputs = select_prompts(model, batch, encode_vision(model, batch), rollout.prompt_index.tolist())
        ours = model(**inputs, use_cache=False).logits  # (N, P, V)
        naive = model(**batch_rep, use_cache=False).logits  # pixels of each prompt repeated G times
    torch.testing.assert_close(ours, naive, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk_size", [5, 512])
def test_completion_logprobs_equal_full_forward(rollout, prompts, toy_model, toy_vision, chunk_size):
    """With an EOS mid-row (padding after it), without and with gradient (features shared by G rows)."""
    model, processor = toy_model
    batch, kept = prompts
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = rollout.completion_ids.clone()
    ids[1, 2], ids[1, 3:] = eos, model.generation_config.pad_token_id
    mask, truncated = completion_mask(ids, eos)
    ro = Rollout(batch, rollout.prompt_index, ids, mask, truncated)
    batch_rep, _ = Collator(processor, toy_vision)([ex for ex in kept for _ in range(G)])
    with torch.no_grad():
        ours = completion_logprobs(model, ro, rollout.mm, chunk_size)  # no new vision call
        full = _full_logprobs(model, batch_rep, ids, mask)
    torch.testing.assert_close(ours[mask.bool()], full[mask.bool()], atol=1e-5, rtol=0)

    params = [model.model.visual.patch_embed.proj.weight, model.lm_head.weight]
    ours = completion_logprobs(model, ro, encode_vision(model, batch), chunk_size)  # training forward
    grads = torch.autograd.grad((ours * mask).sum(), params)
    full = _full_logprobs(model, batch_rep, ids, mask)
    full_grads = torch.autograd.grad((full * mask).sum(), params)
    torch.testing.assert_close(ours[mask.bool()], full[mask.bool()].detach(), atol=1e-5, rtol=0)
    for g, ref in zip(grads, full_grads):
        torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-4)


def test_one_vision_pass_per_weight_version(prompts, toy_model):
    """Generation + old log-probs share one encoding; the reference (other weights) encodes once."""
    model, processor = toy_model
    batch, _ = prompts
    ref_model = copy.deepcopy(model)
    policy, h1 = _vision_counter(model)
    ref, h2 = _vision_counter(ref_model)
    try:
        with torch.no_grad():
            ro = generate_group(model, batch, 4, processor, max_new_tokens=5, seeds=[1, 2, 3])
            completion_logprobs(model, ro, ro.mm)
            completion_logprobs(ref_model, ro, encode_vision(ref_model, batch))
    finally:
        h1.remove()
        h2.remove()
    n_media = batch["image_grid_thw"].shape[0] + batch["video_grid_thw"].shape[0]  # 3 images + 2 videos
    # one tower call per modality for all prompts, each image/video encoded once: not 4 (G) x 2 (passes) times
    # one tower call for images and videos together, per prompt batch per set of weights
    assert policy == {"calls": 1, "media": n_media} and ro.vision_calls == 1
    assert ref == {"calls": 1, "media": n_media}


@pytest.fixture(scope="module")
def tokenizer(toy_model):
    tok = copy.deepcopy(toy_model[1].tokenizer)
    tok.add_tokens([">B"])  # the toy BPE never merges '>' with a letter; Qwen's does
    return tok


@pytest.mark.parametrize("pieces, expected", [
    (["<", "answer", ">", "B", "</", "answer", ">"], ["B"]),
    (["<", "answer", ">B", "</", "answer", ">"], [">B"]),  # tag merged with the letter
    (["<", "answer", ">", "ĠB", "Ġ</", "answer", ">"], ["ĠB"]),  # '<answer> B </answer>': spaces left out
    (["<", "answer", ">", "B"], []),  # no closing tag
    # the first complete pair, the one rewards.parse_answer grades
    (["<", "answer", ">", "A", "</", "answer", ">", "Ġ<", "answer", ">", "C", "</", "answer", ">"], ["A"]),
    (["<", "answer", ">", "<", "answer", ">", "C", "</", "answer", ">"], ["<", "answer", ">", "C"]),  # '<answer>C'
    (["<", "answer", ">", "B", "</", "answer", ">", "Ġd", "on", "e"], ["B"]),  # text after </answer>
    (["<", "answer", ">", "Ã", "©", "</", "answer", ">"], ["Ã", "©"]),  # 'é' is two byte tokens
    (["<", "answer", ">", "Ġ", "</", "answer", ">"], []),  # blank answer
    (["<", "answer", ">", "B", "</", "answer", ">", "<|im_end|>", "<", "answer", ">", "C", "</", "answer", ">"],
     ["B"]),  # nothing after the EOS is read
])
def test_answer_span_mask(tokenizer, pieces, expected):
    ids = torch.tensor([tokenizer.convert_tokens_to_ids(pieces)])
    mask, _ = completion_mask(ids, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    span = answer_span_mask(ids, tokenizer, mask)
    assert [p for p, s in zip(pieces, span[0].tolist()) if s] == expected
    graded = parse_answer(tokenizer.convert_tokens_to_string(pieces))
    assert (graded in tokenizer.convert_tokens_to_string(expected)) if expected else not graded, \
        "the span covers the answer rewards.parse_answer grades"
