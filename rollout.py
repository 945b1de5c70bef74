"""Group rollouts: G sampled completions per prompt, vision encoded once, completion log-probs, answer spans.

    ros = generate_groups(model, batches, G, tokenizer, seeds=seeds)  # one Rollout per batch, ONE generate call
    old = completion_logprobs(model, ro, ro.mm)                       # (N, T), the rollout's vision features
    ref = completion_logprobs(ref_model, ro, encode_vision(ref_model, ro.batch))
    spans = answer_span_mask(ro.completion_ids, tokenizer, ro.completion_mask)  # the tokens CARE scores

Rows are grouped by prompt: row r samples prompt `ro.prompt_index[r]`, N = B*G. Sampling is seeded per
sample (Gumbel-max over the vocabulary after HF's temperature and top-p), so a sample depends on its seed
only, not on which prompts share the call, the process count or a resume (up to float rounding of the
logits where two tokens' noisy scores nearly tie). Vision runs once per prompt per set of weights, and only
completion positions reach the LM head, in checkpointed chunks: no (N, L, vocab) tensor. A library: the
same code runs on 1 GPU and under `accelerate launch` (each rank rolls out its own prompts; FSDP2 units
are gathered once per rollout, distributed.gathered). The speed trick kept for scale, one prefill per
prompt for its G rows, is prefill.py. Departures from the reference: DEPARTURES.md.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.modeling_outputs import BaseModelOutputWithPooling

from distributed import gathered
from prefill import shared_prefill
from rewards import ANSWER_RE

# modality -> (pixel key, grid key, placeholder-token config key)
MODALITIES = {"image": ("pixel_values", "image_grid_thw", "image_token_id"),
              "video": ("pixel_values_videos", "video_grid_thw", "video_token_id")}
_BYTE_OF = {c: b for b, c in bytes_to_unicode().items()}  # byte-level BPE symbol -> byte
_ANSWER_BYTES = re.compile(ANSWER_RE.pattern.encode(), ANSWER_RE.flags & ~re.UNICODE)  # the graded answer, on bytes


# --- the record of a rollout ---


@dataclass
class Rollout:
    batch: dict  # the B prompts as collated (left-padded processor outputs, pixels included)
    prompt_index: torch.Tensor  # (N,) prompt of each row, rows grouped by prompt
    completion_ids: torch.Tensor  # (N, T)
    completion_mask: torch.Tensor  # (N, T) 1 up to and including the first EOS
    truncated: torch.Tensor  # (N,) no EOS within the budget
    texts: list[str] = field(default_factory=list)
    mm: dict = field(default_factory=dict)  # policy vision features of the B prompts
    vision_calls: int = 0

    @property
    def prompt_ids(self):  # (N, P)
        return self.batch["input_ids"][self.prompt_index]

    @property
    def prompt_mask(self):  # (N, P)
        return self.batch["attention_mask"][self.prompt_index]


def completion_mask(completion_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T) ids -> (mask (N, T) long: 1 up to the first EOS inclusive, truncated (N,) bool)."""
    is_eos = completion_ids == eos_id  # (N, T)
    before = is_eos.long().cumsum(-1) - is_eos.long()  # (N, T) EOS seen strictly before t
    return (before == 0).long(), ~is_eos.any(-1)


# --- generation: G samples per prompt, each from its own seed, one generate call ---


def row_seed(prompt_seed: int, g: int) -> int:
    """The generator seed of sample g of a prompt: a function of (prompt seed, g) only."""
    return random.Random(f"{prompt_seed}/{g}").getrandbits(63)


class SeededSampler(LogitsProcessor):
    """Sampling as a logits processor for greedy `generate`, row r from its own generator.

    argmax(z + Gumbel noise) is an exact sample from softmax(z) (the Gumbel-max trick; Gumbel = -log(-log U), U
    uniform), z = the scores after HF's temperature and top-p warpers, in the order HF's sampling applies them
    (earlier processors' -inf stays -inf). Row r's t-th token reads the t-th vector of V uniforms of generator r,
    drawn k tokens at a time, so its samples depend on its seed alone. Returns 0 at the sampled token and -inf
    elsewhere, for `generate`'s argmax."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device, max_new_tokens: int,
                 block: int = 1 << 16):
        self.generators = [torch.Generator(device).manual_seed(s) for s in seeds]
        self.warpers = [TemperatureLogitsWarper(temperature)] + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else [])
        # each row's noise is drawn for k steps at once (k from the vocabulary size and max_new_tokens only)
        self.block, self.max_new_tokens, self.noise, self.used = block, max_new_tokens, None, 0

    def _uniforms(self, scores):  # (N, V) -> this step's (N, V) uniforms, row r from generator r
        N, V = scores.shape
        if self.noise is None or self.used == self.noise.shape[1]:  # the next k steps' noise, one draw per row
            k = max(1, min(self.max_new_tokens, self.block // V))
            self.noise = torch.stack([torch.rand(k, V, generator=g, device=scores.device) for g in self.generators])
            self.used = 0
        self.used += 1
        return self.noise[:, self.used - 1]

    def __call__(self, input_ids, scores):  # scores (N, V) float32 -> (N, V): 0 at the sampled token, else -inf
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        pick = (scores - self._uniforms(scores).log().neg().log()).argmax(-1, keepdim=True)  # (N, 1), + Gumbel
        return torch.full_like(scores, -float("inf")).scatter_(-1, pick, 0.0)


@torch.no_grad()
def generate_groups(model, batches: list[dict], G: int, tokenizer, max_new_tokens: int = 768,
                    temperature: float = 1.0, top_p: float = 0.95, seeds: list[int] | None = None,
                    eos_token: str = "<|im_end|>", min_new_tokens: int = 0) -> list[Rollout]:
    """G sampled completions for every prompt of `batches` (data.Collator outputs), one Rollout per batch,
    all rows decoded in ONE `generate` call: on a GPU decoding is memory-bound, so B*G rows in one call cost
    little more than G rows. `seeds`: one per prompt, in batch order (None: drawn from the global RNG).

    HF `generate` has no per-row generator, so it runs greedy over SeededSampler's noisy scores. Rows of
    different prompts are left-padded to a common length; the padding is masked, so a row's logits do not
    depend on its neighbours up to float rounding (on the toy: 0 of 128 rows differ between 4 prompts together
    and each alone, fp32 and bf16, CPU)."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor works too
    eos = tokenizer.convert_tokens_to_ids(eos_token)
    pad = model.generation_config.pad_token_id
    pad = tokenizer.pad_token_id if pad is None else pad
    sizes = [b["input_ids"].shape[0] for b in batches]
    if seeds is None:
        seeds = torch.randint(2 ** 62, (sum(sizes),)).tolist()
    assert len(seeds) == sum(sizes), f"{len(seeds)} seeds for {sum(sizes)} prompts"
    if not batches:
        return []
    # a sampled image/video placeholder would claim vision features in every later forward
    placeholders = [getattr(model.config, token) for _, _, token in MODALITIES.values()]
    mms = [encode_vision(model, b) for b in batches]  # one tower call per batch, as every later pass makes
    sampler = SeededSampler([row_seed(s, g) for s in seeds for g in range(G)], temperature, top_p,
                            batches[0]["input_ids"].device, max_new_tokens)
    with gathered(model):
        if getattr(model.generation_config, "cache_implementation", None) is None:
            prompts = _merge_rows([select_prompts(model, b, mm, list(range(B))) for b, mm, B in zip(batches, mms, sizes)], pad)
            rows = shared_prefill(model, prompts, G)  # each prompt prefilled once, its cache repeated for its G rows
        else:  # generate makes its own cache (a static one: bench/gpu.py): each row prefills in full
            rows = _merge_rows([select_prompts(model, b, mm, [p for p in range(B) for _ in range(G)])
                                for b, mm, B in zip(batches, mms, sizes)], pad)
        out = model.generate(**rows, do_sample=False, logits_processor=LogitsProcessorList([sampler]),
                             temperature=None, top_p=None, top_k=None,  # sampling is the sampler's
                             repetition_penalty=1.0, max_new_tokens=max_new_tokens,
                             min_new_tokens=min_new_tokens,  # > 0 only for benchmarks
                             eos_token_id=eos, pad_token_id=pad, synced_gpus=False, suppress_tokens=placeholders)
    completions = out[:, rows["input_ids"].shape[1]:]  # (sum(B) * G, T)
    rollouts, at = [], 0
    for batch, mm, B in zip(batches, mms, sizes):
        ids = completions[at:at + B * G]
        at += B * G
        mask, truncated = completion_mask(ids, eos)
        T = int(mask.sum(-1).max())  # the length this batch alone would have run to
        ids, mask = ids[:, :T], mask[:, :T]
        texts = [tokenizer.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(ids, mask)]
        index = torch.arange(B, device=ids.device).repeat_interleave(G)  # (B*G,)
        rollouts.append(Rollout(batch, index, ids, mask, truncated, texts, mm, vision_calls=1 if mm else 0))
    return rollouts


def generate_group(model, batch, G: int, tokenizer, **kwargs) -> Rollout:
    """G sampled completions for each of the B prompts of `batch` (a data.Collator output):
    generate_groups with one batch (keyword arguments and seeding as there)."""
    return generate_groups(model, [batch], G, tokenizer, **kwargs)[0]


# --- vision once: the tower runs once per prompt, its features handed to the G rows by reference ---


def encode_vision(model, batch) -> dict:
    """All images and videos of `batch` through the vision tower in ONE call.

    Returns `mm_encoder_outputs` {modality: BaseModelOutputWithPooling(pooler_output=tuple of
    (tokens_i, hidden) per image/video)}; gradient flows when enabled. One call, not one per
    modality: under FSDP2 a tower call is a collective, and a rank whose prompt has no video must
    make as many calls as one whose prompt has. The tower attends within each grid item, so the
    features equal per-modality calls; `get_image_features` takes any list of (t, h, w) grids."""
    present = [(m, pixels, grid) for m, (pixels, grid, _) in MODALITIES.items() if batch.get(pixels) is not None]
    if not present:
        return {}
    grids = torch.cat([batch[grid] for _, _, grid in present])  # (n_items, 3)
    pixels = torch.cat([batch[p] for _, p, _ in present])  # (n_patches, C*T*P*P)
    features = model.get_image_features(pixels, grids, return_dict=True).pooler_output  # one per item
    mm, at = {}, 0
    for modality, _, grid in present:
        n = len(batch[grid])
        mm[modality] = BaseModelOutputWithPooling(pooler_output=tuple(features[at:at + n]))
        at += n
    return mm


def _media_of_prompts(config, batch, modality) -> list[list[int]]:
    """For each prompt, the indices of its images (videos) in batch order, from placeholder counts."""
    _, grid, token = MODALITIES[modality]
    sizes = (batch[grid].prod(-1) // config.vision_config.spatial_merge_size ** 2).tolist()
    per_prompt, i = [], 0
    for n in (batch["input_ids"] == getattr(config, token)).sum(-1).tolist():
        items = []
        while n > 0:
            items.append(i)
            n, i = n - sizes[i], i + 1
        assert n == 0, f"{modality} placeholders of prompt {len(per_prompt)} do not match the grid sizes"
        per_prompt.append(items)
    assert i == len(sizes), f"{len(sizes)} {modality}s in the batch, {i} with placeholders"
    return per_prompt


def select_prompts(model, batch, mm: dict, prompts: list[int]) -> dict:
    """Model inputs whose rows are the prompts `prompts` (indices into `batch`, repeats allowed).

    Vision features are repeated by reference, in row order, as the placeholders consume them."""
    inputs = {k: batch[k][prompts] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    inputs["mm_encoder_outputs"] = {}
    for modality, (_, grid, _) in MODALITIES.items():
        if batch.get(grid) is None:
            continue
        per_prompt = _media_of_prompts(model.config, batch, modality)
        items = [i for p in prompts for i in per_prompt[p]]
        if not items:
            continue
        inputs[grid] = batch[grid][items]
        if modality == "video" and batch.get("second_per_grid_ts") is not None:
            inputs["second_per_grid_ts"] = batch["second_per_grid_ts"][items]
        if modality in mm:
            features = tuple(mm[modality].pooler_output[i] for i in items)
            inputs["mm_encoder_outputs"][modality] = BaseModelOutputWithPooling(pooler_output=features)
    return inputs


def _merge_rows(inputs: list[dict], pad: int) -> dict:
    """Model inputs of several `select_prompts` results as one left-padded batch, rows in order."""
    P = max(x["input_ids"].shape[1] for x in inputs)
    merged = {k: torch.cat([F.pad(x[k], (P - x[k].shape[1], 0), value=pad if k == "input_ids" else 0) for x in inputs])
              for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts"):
        if any(k in x for x in inputs):
            merged[k] = torch.cat([x[k] for x in inputs if k in x])
    merged["mm_encoder_outputs"] = {}
    for modality in MODALITIES:
        features = [f for x in inputs if modality in x["mm_encoder_outputs"]
                    for f in x["mm_encoder_outputs"][modality].pooler_output]
        if features:  # in row order, as the placeholders consume them
            merged["mm_encoder_outputs"][modality] = BaseModelOutputWithPooling(pooler_output=tuple(features))
    return merged


# --- log-probs of completion tokens only ---


def token_logprobs(hidden: torch.Tensor, lm_head, targets: torch.Tensor, chunk_size: int = 512,
                   temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(lm_head(hidden) / temperature) at `targets`, `chunk_size` positions at a time.

    hidden (N, T, H), targets (N, T) -> (N, T) float32. Under grad each chunk is checkpointed, so
    its (chunk_size, vocab) logits are rebuilt in backward instead of being kept."""
    h = hidden.reshape(-1, hidden.shape[-1])  # (N*T, H)
    y = targets.reshape(-1)  # (N*T,)
    run = (lambda *a: checkpoint(_chunk_logprobs, *a, use_reentrant=False)) if torch.is_grad_enabled() \
        else _chunk_logprobs
    out = [run(h[s:s + chunk_size], y[s:s + chunk_size], lm_head, temperature) for s in range(0, len(y), chunk_size)]
    return torch.cat(out).view(targets.shape)


def _chunk_logprobs(h, y, lm_head, temperature):
    logits = lm_head(h).float() / temperature  # (c, V)
    return logits.gather(-1, y[:, None]).squeeze(-1) - logits.logsumexp(-1)  # (c,)


def completion_logprobs(model, rollout: Rollout, mm: dict, chunk_size: int = 512,
                        temperature: float = 1.0) -> torch.Tensor:
    """(N, T) log-probs of the rollout's completion tokens under `model`, whose vision features of
    the B prompts are `mm` (from `encode_vision(model, batch)`; `rollout.mm` for the sampling
    weights). Positions after the EOS are masked from attention and hold meaningless values."""
    placeholders = [getattr(model.config, token) for _, _, token in MODALITIES.values()]
    assert not torch.isin(rollout.completion_ids, torch.tensor(placeholders, device=rollout.completion_ids.device)).any(), \
        "a completion holds an image/video placeholder token: sample with generate_group, which suppresses them"
    inputs = select_prompts(model, rollout.batch, mm, rollout.prompt_index.tolist())
    P, T = inputs["input_ids"].shape[1], rollout.completion_ids.shape[1]
    ids = torch.cat([inputs.pop("input_ids"), rollout.completion_ids], 1)  # (N, P+T)
    attention = torch.cat([inputs.pop("attention_mask"), rollout.completion_mask.to(ids.dtype)], 1)  # (N, P+T)
    types = F.pad(inputs.pop("mm_token_type_ids"), (0, T))  # (N, P+T) completion tokens are text
    # explicit 3D positions: never the rope_deltas that generate cached on the model
    grids = {k: inputs.pop(k, None) for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")}
    position_ids, _ = model.model.get_rope_index(ids, types, attention_mask=attention, **grids)  # (3, N, P+T)
    head = _TargetLogProbs(model.lm_head, rollout.completion_ids, chunk_size, temperature)
    model.lm_head = head  # the LM head runs inside the root forward, where FSDP2 has gathered it
    try:  # positions P-1 .. P+T-2 predict the T completion tokens: keep the last T+1, drop the final one
        return model(input_ids=ids, attention_mask=attention, position_ids=position_ids, use_cache=False,
                     logits_to_keep=T + 1, **inputs).logits  # (N, T)
    finally:
        model.lm_head = head.lm_head


class _TargetLogProbs(torch.nn.Module):
    """Stands in for `lm_head` during one forward: returns the (N, T) log-probs of `targets`
    instead of (N, T, vocab) logits, so the full logits never exist."""

    def __init__(self, lm_head, targets, chunk_size, temperature):
        super().__init__()
        self.lm_head, self.targets, self.chunk_size, self.temperature = lm_head, targets, chunk_size, temperature

    def forward(self, hidden):  # (N, T+1, H)
        return token_logprobs(hidden[:, :-1], self.lm_head, self.targets, self.chunk_size, self.temperature)


# --- answer spans: the tokens of the graded answer, which CARE's reference scores ---


def answer_span_mask(completion_ids: torch.Tensor, tokenizer, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(N, T) 1 on completion tokens overlapping the answer that rewards.parse_answer grades: the text
    inside the first complete `<answer>...</answer>`, surrounding whitespace left out. No complete
    pair (or an empty answer): no token. Only tokens under `mask` (e.g. the completion mask) are read.

    Offsets are byte offsets of the byte-level BPE pieces, so tags split or merged with letters,
    spaces and multi-byte characters need no re-tokenisation."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    span = torch.zeros_like(completion_ids, dtype=torch.long)  # (N, T)
    for r, row in enumerate(completion_ids.tolist()):
        n = len(row) if mask is None else int(mask[r].sum())
        # ids past the tokenizer (the embedding is padded: 152,064 rows for 151,665 tokens) have no text
        pieces = [b"" if t is None else bytes(_BYTE_OF[c] for c in t) if all(c in _BYTE_OF for c in t)
                  else t.encode() for t in tokenizer.convert_ids_to_tokens(row[:n])]
        found = _ANSWER_BYTES.search(b"".join(pieces))
        if found is None:
            continue
        inner = found.group(1)
        start = found.start(1) + len(inner) - len(inner.lstrip())
        end = found.end(1) - (len(inner) - len(inner.rstrip()))
        if start >= end:  # blank answer
            continue
        at = 0
        for t, piece in enumerate(pieces):
            if at < end and at + len(piece) > start:
                span[r, t] = 1
            at += len(piece)
    return span
