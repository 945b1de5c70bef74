"""RefGen, an arm of the paper's Table 3: the EMA reference reads a sample's reasoning and answers itself.

    prefix = reasoning_prefix_lengths(ro.completion_ids, tokenizer, ro.completion_mask)    # (N,) through </think>
    texts = regenerate_answers(ref, ro, prefix, seeds, tokenizer, max_new_tokens=48)     # what follows, per row
    acc = regenerated_accuracy(ref, rollouts, examples, tokenizer, seed, step, G, ...)   # (B, G) for the reward

grpo_care.py's `--consistency_reward refgen` pays rewards.refgen_consistency_reward(acc): reasoning from which the
reference, sampling ("sampling-based answer regeneration", the paper's words), reaches the right answer. The
reference continues prompt + the sample's own tokens through `</think>` in one `generate` call for all rows of a
rollout, each row from its own seeded generator (rollout.SeededSampler), so a regenerated answer depends on its
seed alone, as the rollouts. Runs under FSDP2 as the rollouts do (the reference gathered once for the call).
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from transformers import LogitsProcessorList

from distributed import gathered
from rewards import accuracy_reward
from rollout import (_BYTE_OF, MODALITIES, Rollout, SeededSampler, completion_mask, encode_vision, end_ids, row_seed,
                     select_prompts)


def reasoning_prefix_lengths(completion_ids: torch.Tensor, tokenizer, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) the number of completion tokens up to the one that completes the first `</think>` (inclusive); 0 when
    the completion (under `mask`) has none. Byte offsets of the BPE pieces, as answer_span_mask."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    lengths = torch.zeros(completion_ids.shape[0], dtype=torch.long)  # (N,)
    for r, row in enumerate(completion_ids.tolist()):
        n = len(row) if mask is None else int(mask[r].sum())
        pieces = [b"" if t is None else bytes(_BYTE_OF[c] for c in t) if all(c in _BYTE_OF for c in t)
                  else t.encode() for t in tokenizer.convert_ids_to_tokens(row[:n])]
        end = b"".join(pieces).find(b"</think>")
        if end >= 0:
            end, at = end + len(b"</think>"), 0
            lengths[r] = next(t + 1 for t, piece in enumerate(pieces) if (at := at + len(piece)) >= end)
    return lengths


@torch.no_grad()
def regenerate_answers(model, rollout: Rollout, prefix_lengths: torch.Tensor, seeds: list[int], tokenizer,
                       max_new_tokens: int, temperature: float = 1.0, top_p: float = 0.95) -> list[str | None]:
    """RefGen: `model` (the EMA reference) continues each row's prompt + its first `prefix_lengths[r]` completion
    tokens (the reasoning through `</think>`) with its own sampled tokens, row r from generator `seeds[r]`, all
    rows in one `generate` call, ended as the rollouts are (rollout.END_TOKENS). Returns per row the text after
    `</think>` (the regenerated answer part), None for a row without reasoning (prefix length 0), which is not
    regenerated. Collectives under FSDP2 (the tower's and the gathered reference's) run whatever the rows."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    eos, pad = end_ids(tokenizer), tokenizer.pad_token_id
    keep = [r for r, n in enumerate(prefix_lengths.tolist()) if n > 0]
    mm = encode_vision(model, rollout.batch)  # the reference's own vision features; a collective
    if not keep:  # nothing to regenerate here, but the other ranks gather the reference: so does this one
        with gathered(model):
            pass
        return [None] * len(prefix_lengths)
    rows = select_prompts(model, rollout.batch, mm, rollout.prompt_index[keep].tolist())  # (K, P) prompts
    K = max(int(prefix_lengths[r]) for r in keep)
    prefixes = [rollout.completion_ids[r, :int(prefix_lengths[r])] for r in keep]
    # prompt + reasoning, left-padded again to one length: the padding stays on the left, where generate wants it
    for name, fill in (("input_ids", None), ("attention_mask", 1), ("mm_token_type_ids", 0)):
        rows[name] = torch.stack([F.pad(torch.cat([row, p if fill is None else torch.full_like(p, fill)]),
                                        (K - len(p), 0), value=pad if name == "input_ids" else 0)
                                  for row, p in zip(rows[name], prefixes)])
    placeholders = [getattr(model.config, token) for _, _, token in MODALITIES.values()]
    sampler = SeededSampler([seeds[r] for r in keep], temperature, top_p, rows["input_ids"].device, max_new_tokens)
    with gathered(model):
        out = model.generate(**rows, do_sample=False, logits_processor=LogitsProcessorList([sampler]),
                             temperature=None, top_p=None, top_k=None, repetition_penalty=1.0,
                             max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, synced_gpus=False,
                             suppress_tokens=placeholders)
    new, texts = out[:, rows["input_ids"].shape[1]:], [None] * len(prefix_lengths)  # (K, T_new)
    new_mask, _ = completion_mask(new, eos)
    for i, r in enumerate(keep):
        text = tokenizer.decode(torch.cat([prefixes[i], new[i][new_mask[i].bool()]]), skip_special_tokens=True)
        texts[r] = text.split("</think>", 1)[1]  # the prefix's last token may hold text after the tag
    return texts


def regenerated_accuracy(ref, rollouts: list, examples: list[dict], tokenizer, seed: int, step: int, G: int,
                         max_new_tokens: int, temperature: float, top_p: float, scorer: str = "exact") -> torch.Tensor:
    """RefGen's (B, G): the accuracy of the answer the reference samples after each sample's reasoning (0 for a
    sample without `</think>`), graded as the samples are (`scorer`). Seeded per (run seed, step, sample id, g),
    like the rollouts."""
    acc = []
    for ro, ex in zip(rollouts, examples):
        prefix = reasoning_prefix_lengths(ro.completion_ids, tokenizer, ro.completion_mask)  # (G,)
        seeds = [row_seed(random.Random(f"refgen/{seed}/{step}/{ex['id']}").getrandbits(63), g) for g in range(G)]
        texts = regenerate_answers(ref, ro, prefix, seeds, tokenizer, max_new_tokens, temperature, top_p)
        ro.vision_calls += 1
        acc.append(accuracy_reward([t or "" for t in texts], [ex["solution"]] * G, [ex["problem_type"]] * G, scorer))
    return torch.tensor(acc).view(-1, G)
