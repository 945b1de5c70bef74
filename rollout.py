"""Group rollouts: G sampled completions per prompt, their per-token log-probs, and answer spans.

    ro = generate_group(model, batch, G, tokenizer, seeds=seeds)    # batch: data.Collator output
    ros = generate_groups(model, batches, G, tokenizer, seeds=seeds)  # one Rollout per batch, ONE generate call
    old = completion_logprobs(model, ro, ro.mm)                      # (N, T), reuses the rollout's encoding
    ref = completion_logprobs(ref_model, ro, encode_vision(ref_model, batch))
    new = completion_logprobs(model, ro, encode_vision(model, batch))      # with gradient
    spans = answer_span_mask(ro.completion_ids, tokenizer, ro.completion_mask)

Rows are grouped by prompt: row r samples prompt `ro.prompt_index[r]`, N = B*G. A library file, no main:
the same code runs on 1 GPU and under `accelerate launch` (each rank rolls out its own prompts).

* One `generate` call for all prompts of a process (generate_groups): on a GPU decoding is memory-bound,
  so B*G rows in one call cost little more than G rows, where B calls one after the other cost B times.
  Sampling stays per row: `generate` runs greedy over SeededSampler's scores, HF's own temperature and
  top-p warpers plus Gumbel noise from one generator per row (seeded by (prompt seed, g)), so a row's
  samples depend only on its seed, not on which prompts share the call, the rank count or a resume.
  Rows of different prompts are left-padded to one length; the padding is masked, so this holds up to
  float rounding of the logits, which can flip a sample only where two tokens' noisy scores are within
  that rounding (on the toy: 0 of 128 rows differ between 4 prompts together and each alone, in fp32
  and in bf16, CPU; GPU kernels not measured).
* Prefill once per prompt: HF's `num_return_sequences` expands a prompt to G rows before its prefill
  (G times the prompt's work); `_shared_prefill` runs every prompt token but the last once per prompt and
  repeats the KV cache (and the 3D rope offsets) for the G rows, and `generate` continues from it. With
  a `cache_implementation` set (a static cache, which `generate` allocates itself) the rows prefill in full.
* Lean decoding steps: on a CPU (the toy) a decoding step costs more with every row, and padding (prompts
  of different lengths) adds its own cost. So the KV cache is preallocated for the prompt plus
  max_new_tokens (`_PreallocatedLayer`: a token is written in place, where HF's dynamic cache copies the
  whole cache per token); Gumbel noise is made for the top-p candidates only (SeededSampler); and a padded
  step's attention mask, for one new token the 2D padding mask, is handed to the model ready-made
  (`_decode_mask`), not built by HF's general mask functions. None of these changes a sampled token (toy
  warm start: 512 of 512 rows the same); BENCHMARKS.md section 3 times them.
* Vision once: `encode_vision` runs the vision tower once for all images and videos of the B
  prompts (a "vision call" is one call of `model.model.visual`); `select_prompts` hands the features to the
  G rows of each prompt by reference (transformers 5 `mm_encoder_outputs`), never recomputing them.
* Log-probs of completion tokens only: the final hidden states go through the LM head
  `chunk_size` positions at a time (checkpointed under grad), so no (N, L, vocab) tensor exists and
  the extra peak memory is O(chunk_size * vocab) with or without gradient. The chunked head stands
  in for `lm_head` during the root forward, so FSDP2 has the head's weights gathered when it runs.
* FSDP2: sharded generation would all-gather every layer once per decoded token (for 7B in bf16
  ~15 GB of traffic per token) and needs all ranks to decode in lock-step. `gathered(model)`
  instead all-gathers each unit once for the whole rollout (memory: one full copy of the policy,
  ~15 GB for 7B) and generation then runs with no collectives at all. Forward passes go
  through the root module's forward (and `get_*_features`, registered with
  `register_fsdp_forward_method` in grpo_care.load_model) so FSDP's hooks gather and reduce-scatter.

Departures from the reference code (TencentARC/GRPO-CARE), and why:
* it runs the vision tower for each of the G samples in every pass and builds logits for every
  prompt position; here it runs once per prompt per set of weights, and only completion positions
  reach the LM head.
* it samples with the global RNG; here each sample depends only on its own seed (not on batch
  composition or rank count, up to the rounding above), so a run is reproducible and resumable.
* sampling is set in full (temperature, top-p, no top-k, no repetition penalty, EOS = <|im_end|>),
  so the checkpoint's generation_config.json (Qwen2.5-VL-Instruct's is near-greedy) cannot leak
  in. The reference's GenerationConfig(top_p=0.95, temperature=1) leaves HF's top_k=50 in force
  and takes EOS from the checkpoint (<|im_end|> and <|endoftext|>); at top-p 0.95 the top-50 cut
  rarely binds.
* the confidence span (`answer_span_mask`) is the answer the accuracy reward grades: the tokens
  overlapping the stripped text of the first complete <answer>...</answer>. The reference scans
  back to the last token holding the `answer` of an `<answer>`, starts the span right after it and
  ends it 3 tokens before the EOS, which assumes the completion ends exactly `</answer><|im_end|>`;
  text after `</answer>` runs into its span. The tag's `>` is in that span unless the tokenizer
  merged it into the answer's first token: Qwen's merges `>B`, but splits digits one by one, so for
  every numeric answer (`>`, `1`, `2` for "12") and for a spaced one (`<answer> B </answer>`: `>` and
  ` B`) the near-certain `>` enters the mean (for a one-token answer about the square root of p(B)).
"""
from __future__ import annotations

import contextlib
import random
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper
from transformers.cache_utils import DynamicLayer
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.modeling_outputs import BaseModelOutputWithPooling

from distributed import gathered
from rewards import ANSWER_RE

# modality -> (pixel key, grid key, placeholder-token config key)
MODALITIES = {"image": ("pixel_values", "image_grid_thw", "image_token_id"),
              "video": ("pixel_values_videos", "video_grid_thw", "video_token_id")}
_BYTE_OF = {c: b for b, c in bytes_to_unicode().items()}  # byte-level BPE symbol -> byte
_ANSWER_BYTES = re.compile(ANSWER_RE.pattern.encode(), ANSWER_RE.flags & ~re.UNICODE)  # the graded answer, on bytes


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


def row_seed(prompt_seed: int, g: int) -> int:
    """The generator seed of sample g of a prompt: a function of (prompt seed, g) only."""
    return random.Random(f"{prompt_seed}/{g}").getrandbits(63)


class SeededSampler(LogitsProcessor):
    """Sampling as a logits processor for greedy `generate`, row r from its own generator.

    argmax(z + Gumbel noise) is an exact sample from softmax(z) (the Gumbel-max trick; Gumbel = -log(-log U),
    U uniform; U = 0, probability 2^-24 per entry in float32, rules its token out); z = HF's temperature
    warper and top-p rule (`_top`, else HF's warper) applied to the scores the earlier processors (suppress_tokens,
    min_new_tokens: -inf stays -inf) left, the order HF's sampling uses. Row r's t-th token reads the t-th
    vector of V uniforms of generator r (drawn k tokens at a time), so its samples depend on its seed alone,
    not on which other rows share the call (up to float rounding of the logits themselves: see generate_groups).
    Only the nucleus can win, so only its entries (the `candidates` ids when `_top` answers) become Gumbel
    noise, and the call returns 0 at the sampled token and -inf elsewhere for `generate`'s argmax: the same
    token as argmax over the whole vocabulary of z + noise, without (N, V) logs, masks and sums per token
    (but a row whose every nucleus entry drew U = 0, 2^-24 a token for a one-token nucleus, gets its most
    likely token, where the full argmax gave token id 0)."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device, max_new_tokens: int,
                 block: int = 1 << 16, candidates: int = 64):
        self.generators = [torch.Generator(device).manual_seed(s) for s in seeds]
        self.temperature, self.top_p, self.candidates = TemperatureLogitsWarper(temperature), top_p, candidates
        self.full_top_p = TopPLogitsWarper(top_p)
        # each row's noise is drawn for k steps at once (k from the vocabulary size and max_new_tokens only)
        self.block, self.max_new_tokens, self.noise, self.used = block, max_new_tokens, None, 0

    def _top(self, scores):  # (N, V) -> (index (N, k), in_nucleus (N, k) bool), or None
        """HF's top-p rule (keep a token when the mass ranked above it is < top_p) on the `candidates` most likely
        tokens, when they hold top_p of the mass in every row, as they all but always do: a top-k, not HF's sort
        of the whole vocabulary per row and token. None when they do not."""
        probs = scores.softmax(-1)
        top, index = probs.topk(min(self.candidates, scores.shape[-1]), dim=-1)  # (N, k) descending
        if not bool((top.sum(-1) >= self.top_p).all()):
            return None
        return index, top.cumsum(-1) - top < self.top_p

    def _uniforms(self, scores):  # (N, V) -> this step's (N, V) uniforms, row r from generator r
        N, V = scores.shape
        if self.noise is None or self.used == self.noise.shape[1]:  # the next k steps' noise, one draw per row
            k = max(1, min(self.max_new_tokens, self.block // V))
            if self.noise is None:
                self.noise = torch.empty(N, k, V, device=scores.device)
            for r, g in enumerate(self.generators):
                torch.rand(k, V, generator=g, out=self.noise[r])  # (k, V), in place
            self.used = 0
        self.used += 1
        return self.noise[:, self.used - 1]

    def __call__(self, input_ids, scores):  # scores (N, V) float32 -> (N, V): 0 at the sampled token, else -inf
        scores = self.temperature(input_ids, scores)
        u = self._uniforms(scores)
        top = self._top(scores) if self.top_p < 1.0 else None
        if top is None:  # the whole vocabulary
            z = self.full_top_p(input_ids, scores) if self.top_p < 1.0 else scores
            noisy, index = z - u.log().neg_().log_(), None  # + Gumbel noise
        else:  # only the nucleus can win: noise for the candidates alone
            index, kept = top
            z = scores.gather(-1, index).masked_fill_(~kept, -float("inf"))  # (N, k)
            noisy = z - u.gather(-1, index).log_().neg_().log_()
        pick = noisy.argmax(-1, keepdim=True)  # (N, 1)
        pick = pick if index is None else index.gather(-1, pick)
        return torch.full_like(scores, -float("inf")).scatter_(-1, pick, 0.0)


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


@torch.no_grad()
def generate_groups(model, batches: list[dict], G: int, tokenizer, max_new_tokens: int = 768,
                    temperature: float = 1.0, top_p: float = 0.95, seeds: list[int] | None = None,
                    eos_token: str = "<|im_end|>", min_new_tokens: int = 0) -> list[Rollout]:
    """G sampled completions for every prompt of `batches` (data.Collator outputs), one Rollout per batch,
    all rows decoded in ONE `generate` call. `seeds`: one per prompt, in batch order (None: drawn from
    the global RNG).

    HF `generate` has no per-row generator, so it runs greedy over SeededSampler's noisy scores: sample
    g of a prompt with seed s reads only the generator seeded with row_seed(s, g). Rows of different
    prompts are left-padded to a common length; padding is masked, so a row's logits do not depend on its
    neighbours up to float rounding, and a sample can differ between batch compositions only where two
    tokens' noisy scores are within that rounding (never seen in fp32 on the toy; bf16 rounds more)."""
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
    share = getattr(model.generation_config, "cache_implementation", None) is None  # else generate makes the cache
    prompts = _merge_rows([select_prompts(model, b, mm, list(range(B)) if share else [p for p in range(B) for _ in range(G)])
                           for b, mm, B in zip(batches, mms, sizes)], pad)
    rows = {k: prompts[k].repeat_interleave(G, 0) for k in ("input_ids", "attention_mask", "mm_token_type_ids")} \
        if share else prompts
    sampler = SeededSampler([row_seed(s, g) for s in seeds for g in range(G)], temperature, top_p,
                            rows["input_ids"].device, max_new_tokens)
    text = model.model.language_model
    fast_mask = text.config._attn_implementation == "sdpa" and set(text.config.layer_types) == {"full_attention"}
    hook = text.register_forward_pre_hook(_decode_mask, with_kwargs=True) if fast_mask else None
    try:
        with gathered(model):
            if share:
                rows["past_key_values"] = _shared_prefill(model, prompts, G, max_new_tokens)
            out = model.generate(**rows, do_sample=False, logits_processor=LogitsProcessorList([sampler]),
                                 temperature=None, top_p=None, top_k=None,  # sampling is the sampler's
                                 repetition_penalty=1.0, max_new_tokens=max_new_tokens,
                                 min_new_tokens=min_new_tokens,  # > 0 only for benchmarks
                                 eos_token_id=eos, pad_token_id=pad, synced_gpus=False, suppress_tokens=placeholders)
    finally:
        if hook is not None:
            hook.remove()
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


def _decode_mask(text_model, args, kwargs):
    """Forward pre-hook of the text model (SDPA, full attention only) during generate_groups: for a decoding step
    (one new token per row) it hands over the mask HF would build, made in one op. The new token attends to every
    cached position, so HF's causal mask is then the 2D padding mask as (N, 1, 1, L) bool, or None when nothing
    is padded (as HF, which builds it through its general mask functions: for 32 padded toy rows ~0.4 ms a
    token, 15 ms of a 0.28 s rollout). Prefill steps, and masks that are not 2D over exactly the cache plus the
    new token, go to HF unchanged."""
    mask, cache, embeds = kwargs.get("attention_mask"), kwargs.get("past_key_values"), kwargs.get("inputs_embeds")
    if (isinstance(mask, torch.Tensor) and mask.ndim == 2 and embeds is not None and embeds.shape[1] == 1
            and cache is not None and mask.shape[1] == cache.get_seq_length() + 1):
        kwargs["attention_mask"] = {"full_attention": None if bool(mask.all()) else mask.bool()[:, None, None, :]}
    return args, kwargs


def _shared_prefill(model, prompts: dict, G: int, room: int):
    """The KV cache of every prompt token but the last, computed once per prompt and repeated for its G rows,
    with room for `room` more tokens per row (_PreallocatedLayer).

    `generate` would expand the prompt to G rows before its prefill (G times the prompt's work); here
    it continues from this cache and runs only the last prompt token per row. The 3D rope offsets
    (`rope_deltas`) the prefill stores are repeated alike: `generate` reads them for the later tokens."""
    keep = ("input_ids", "attention_mask", "mm_token_type_ids")
    inputs = {k: v[:, :-1] if k in keep else v for k, v in prompts.items()}  # the last token is text, never vision
    grids = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in inputs}
    # explicit positions, as in completion_logprobs: never the rope_deltas an earlier call left on the model
    position_ids, deltas = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                      attention_mask=inputs["attention_mask"], **grids)  # (3, B, P-1)
    cache = model(**inputs, position_ids=position_ids, use_cache=True, logits_to_keep=1).past_key_values
    cache.layers = [_PreallocatedLayer(layer, G, room) for layer in cache.layers]
    model.model.rope_deltas = deltas.repeat_interleave(G, 0)  # (B*G, 1)
    return cache


class _PreallocatedLayer(DynamicLayer):
    """A DynamicLayer of (B, H, L, D) keys and values repeated G times over rows, stored in buffers with room for
    `room` more tokens: decoding writes each token in place and attends over a view of the first L + t positions.

    DynamicLayer `torch.cat`s the whole cache for every token (for 32 rows of a 280-token toy prompt, 2.4 MB
    per layer per token, freshly allocated: 21 ms of a 0.3 s rollout); the values read are the same, so the
    samples are too. Past the room it falls back to DynamicLayer's concatenation."""

    def __init__(self, layer: DynamicLayer, G: int, room: int):
        super().__init__()
        self.dtype, self.device, self.is_initialized = layer.keys.dtype, layer.keys.device, True
        self.buffers = []
        for cached in (layer.keys, layer.values):  # (B, H, L, D)
            B, H, L, D = cached.shape
            buffer = cached.new_empty(B * G, H, L + room, D)
            buffer.view(B, G, H, L + room, D)[:, :, :, :L] = cached[:, None]  # row b*G + g holds prompt b
            self.buffers.append(buffer)
        self.keys, self.values = (b[:, :, :L] for b in self.buffers)

    def update(self, key_states, value_states, *args, **kwargs):
        L, n = self.keys.shape[-2], key_states.shape[-2]
        if L + n > self.buffers[0].shape[-2]:
            return super().update(key_states, value_states, *args, **kwargs)
        for buffer, new in zip(self.buffers, (key_states, value_states)):
            buffer[:, :, L:L + n] = new
        self.keys, self.values = (b[:, :, :L + n] for b in self.buffers)
        return self.keys, self.values


def generate_group(model, batch, G: int, tokenizer, **kwargs) -> Rollout:
    """G sampled completions for each of the B prompts of `batch` (a data.Collator output):
    generate_groups with one batch (keyword arguments and seeding as there)."""
    return generate_groups(model, [batch], G, tokenizer, **kwargs)[0]


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
