"""Benchmark (not a test) on one GPU: decode against the memory-bandwidth roofline, time per group, training MFU.

    python bench/gpu.py --out gpu.json --model_dir .cache/bench-3b   # one H100/H200 (estimated 5-10 min)
    python bench/gpu.py --report gpu.json                 # here: the JSON's figures into BENCHMARKS.md
    python bench/gpu.py --dry-run --out /tmp/gpu.json     # CPU, tiny config, 4 tokens: the same code path (CI)

The model is Qwen2.5-VL-3B-Instruct's architecture with random weights built from its config (written
out below, no download), fp32 master weights with bf16 compute: grpo_care.load_model (FSDP2 over one
rank), as training runs it. The tokenizer is the toy's (toy.py): only token ids reach the model, so
the prompt's text (~240 tokens with the chat template) is the reference prompt in the toy's BPE, and
the vision placeholders carry the 3B config's vision tokens: 1,455 prompt tokens in all. One prompt as in SEED-Bench-R1: a 16-frame video at the reference's per-frame
budget (128*28*28 px: 224x420, 960 tokens), the current-observation image (256*28*28 px: 336x588,
252 tokens) and the reference prompt. G = 8 completions of 768 tokens each (EOS suppressed by
`min_new_tokens`, which training leaves at 0).

Phase "group" (the training path, grpo_care.main's step with CARE):
* time per group: generation (rollout.generate_group: vision once, HF generate with the FSDP2 policy
  gathered), old log-probs (no grad, the rollout's vision features), reference (the EMA reference's
  vision + log-probs; on a GPU under 100 GiB the policy's weights stand in for it, `--ref policy`:
  the same work without the 15 GB of a second fp32 copy, which does not fit next to AdamW's state)
  and update (vision with gradient, completion log-probs, backward, clipping, AdamW);
* decode tokens/s = G * (T - 1) / (t_generate(T) - t_generate(1)), and its fraction of the roofline:
  each decode step must read every text weight once (bf16) and the KV cache of every row so far,
  roofline = those bytes / the GPU's peak bandwidth (data sheet; a measured copy bandwidth is shown too);
* training MFU: model FLOPs of the policy's forward + backward (3 x forward: every projection of every
  token, causal attention, the LM head on completion positions only, the vision tower once) divided by
  its time and the peak dense bf16 FLOP/s. Gradient checkpointing's recompute is not counted (MFU, not HFU);
* peak GPU memory of each phase.
Phase "sweep" (with "group", on the same FSDP2 policy): generation time of P = 1, 2, 4, 8 prompts per process
(`--sweep_prompts`; the same prompt P times, each with its own seed, --sweep_tokens new tokens per row, EOS
suppressed), all P x G rows in one rollout.generate_groups call, as the training loop decodes them; the
ratio to P = 1 is the figure (on a memory-bound GPU, 4x the rows should cost far less than 4x the time).
Phase "decode": the same generate_group on a plain bf16 copy (no FSDP), eager with the dynamic cache and
with `cache_implementation="static"`, for which transformers compiles the decode step (CUDA graphs):
the lever the training path does not use yet.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BEGIN, END = "<!-- gpu:begin -->", "<!-- gpu:end -->"

# Qwen/Qwen2.5-VL-3B-Instruct's config.json, the sizes that set the cost.
QWEN25_VL_3B = dict(
    text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
              num_key_value_heads=2, vocab_size=151936, max_position_embeddings=128000, rope_theta=1e6,
              rms_norm_eps=1e-6, tie_word_embeddings=True, mrope_section=[16, 24, 24]),
    vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2))
# --dry-run: toy.py's sizes.
TINY = dict(
    text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=704, max_position_embeddings=32768, rope_theta=1e6,
              rms_norm_eps=1e-6, tie_word_embeddings=True, mrope_section=[2, 3, 3]),
    vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1],
                tokens_per_second=2))
# (dense bf16 FLOP/s, HBM bytes/s) from NVIDIA's data sheets, matched in this order against the device name.
PEAKS = [("H200", 989e12, 4.8e12), ("H100 NVL", 835e12, 3.9e12), ("H100 PCIe", 756e12, 2.0e12),
         ("H100", 989e12, 3.35e12)]


# --- the hardware limits (pure functions) ---


def decode_roofline_seconds(weight_bytes, kv_bytes_per_token, rows, prompt_len, new_tokens, peak_bytes_per_s):
    """Least time for the decode steps of `new_tokens` tokens (the first comes out of the prefill).

    Step j = 1 .. new_tokens-1 reads every weight once and, for each row, the KV of prompt_len + j positions."""
    steps = new_tokens - 1
    kv_positions = rows * (steps * prompt_len + steps * (steps + 1) // 2)  # sum over j of (prompt_len + j)
    return (steps * weight_bytes + kv_positions * kv_bytes_per_token) / peak_bytes_per_s


def text_forward_flops(matmul_params, hidden, layers, vocab, rows, seq_len, completion_len):
    """Forward FLOPs of the language model over `rows` sequences of `seq_len` tokens.

    2 per weight per token for the decoder's projections; causal attention QK^T and AV, 2 x (S^2 / 2) x d x 2
    per layer; the LM head (vocab x hidden) on completion positions only, as rollout.completion_logprobs."""
    projections = 2 * matmul_params * rows * seq_len
    attention = 2 * layers * hidden * seq_len ** 2 * rows
    head = 2 * vocab * hidden * rows * completion_len
    return projections + attention + head


def vision_forward_flops(block_params, merger_params, embed_params, patches, merge, hidden, window_patches,
                         group_patches, window_layers, full_layers):
    """Forward FLOPs of the vision tower over `patches` patches (once per prompt).

    Blocks and the patch embedding act on every patch, the merger on every merge-th patch (2x2 merged).
    Attention (QK^T + AV, 4 x n x m x d): windowed layers over windows of `window_patches`, full layers
    within each image / frame pair (`group_patches`, one entry per group)."""
    matmuls = 2 * (block_params + embed_params) * patches + 2 * merger_params * patches // merge
    attention = 4 * hidden * (window_layers * patches * window_patches + full_layers * sum(n * n for n in group_patches))
    return matmuls + attention


def mfu(flops, seconds, peak_flops):
    return None if not peak_flops else flops / seconds / peak_flops


# --- set-up ---


def build_config(sizes: dict, tokenizer):
    """A Qwen2_5_VLConfig of `sizes`; special token ids from `tokenizer` (the toy's: the ids only index rows)."""
    from transformers import Qwen2_5_VLConfig

    import toy_qwen

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in toy_qwen.SPECIAL_TOKENS}
    text = dict(sizes["text"])
    text["rope_scaling"] = {"type": "mrope", "mrope_section": text.pop("mrope_section")}
    return Qwen2_5_VLConfig(
        text_config=dict(text, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=sizes["vision"], tie_word_embeddings=text["tie_word_embeddings"],
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def make_model_dir(path: Path, sizes: dict, device) -> Path:
    """Random weights from the config, saved in bf16 with the toy processor; reused when already there."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    import toy_qwen
    from data import MC_INSTRUCTION, THINK_INSTRUCTION, prompt_text

    stamp = path / "bench_sizes.json"
    if stamp.exists() and json.loads(stamp.read_text()) == sizes:
        return path
    tokenizer = toy_qwen.build_tokenizer([THINK_INSTRUCTION, MC_INSTRUCTION, prompt_text(QUESTION, OPTIONS),
                                     "<think> </think> <answer>A</answer>"])
    config = build_config(sizes, tokenizer)
    torch.manual_seed(0)
    with torch.device(device):  # initialising 3.8B parameters is minutes on a CPU, seconds on the GPU
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.to(torch.bfloat16).save_pretrained(path)
    toy_qwen.build_processor(tokenizer).save_pretrained(path)
    stamp.write_text(json.dumps(sizes))
    del model
    return path


QUESTION = ("Considering the progress shown in the video and my current observation in the last frame, "
            "what action should I take next in order to make a fruit salad?")
OPTIONS = ["cut the red fruit", "wash the green knife", "pick up the blue bowl", "rinse the yellow plate"]


def make_batch(processor, frames: int, frame_hw, image_hw):
    """One SEED-Bench-R1-shaped prompt: [video, image, text] as data.messages orders it, pixels already at size."""
    import numpy as np
    from PIL import Image

    from data import prompt_text

    rng = np.random.RandomState(0)
    video = rng.randint(0, 255, (frames, *frame_hw, 3), dtype=np.uint8)
    image = Image.fromarray(rng.randint(0, 255, (*image_hw, 3), dtype=np.uint8))
    content = [dict(type="video", video="v"), dict(type="image", image="i"),
               dict(type="text", text=prompt_text(QUESTION, OPTIONS))]
    text = processor.apply_chat_template([dict(role="user", content=content)], tokenize=False, add_generation_prompt=True)
    meta = dict(fps=2.0, total_num_frames=frames, frames_indices=list(range(frames)))
    # data.Collator's call: qwen-vl-utils has resized and sampled already
    return processor(text=[text], images=[image], videos=[video], video_metadata=[meta], do_resize=False,
                     do_sample_frames=False, cap_pixels_per_frame=True, padding=True, return_tensors="pt")


class Clock:
    """Wall time with the GPU drained at both ends, and the peak GPU memory of what ran in between."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"

    def __call__(self, fn):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        out = fn()
        if self.cuda:
            self.torch.cuda.synchronize()
        peak = self.torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None
        return out, time.perf_counter() - t, peak


def copy_bandwidth(device, gib: float = 2.0):
    """Measured device-to-device copy bandwidth (read + write bytes / s): the practical ceiling."""
    import torch

    if device.type != "cuda":
        return None
    x = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * 5 * x.numel() / (time.perf_counter() - t)


def model_counts(model) -> dict:
    """Parameter counts the FLOP and byte formulas need (FSDP2 DTensors report their global size)."""
    import torch

    def linear(module):
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))

    visual = model.model.visual
    return dict(text_params=sum(p.numel() for n, p in model.named_parameters() if ".visual." not in f".{n}"),
                text_matmul=linear(model.model.language_model.layers), block_matmul=linear(visual.blocks),
                merger_matmul=linear(visual.merger), embed_params=visual.patch_embed.proj.weight.numel())


def vision_geometry(batch, vcfg) -> dict:
    """Patches, windowed-attention window size and the full-attention groups of the batch's media."""
    grids = [g for k in ("video_grid_thw", "image_grid_thw") if batch.get(k) is not None for g in batch[k].tolist()]
    side = vcfg.window_size // vcfg.patch_size  # patches per window side, e.g. 112 / 14 = 8
    return dict(patches=sum(t * h * w for t, h, w in grids), window_patches=side * side,
                group_patches=[h * w for t, h, w in grids for _ in range(t)])


# --- phases ---


def decode_figures(t_full, t_prefill, G, T, weight_bytes, kv_bytes_per_token, prompt_len, peak_bw, copy_bw):
    decode_s = max(t_full - t_prefill, 1e-9)
    roof = lambda bw: decode_roofline_seconds(weight_bytes, kv_bytes_per_token, G, prompt_len, T, bw) if bw else None
    return dict(seconds=t_full, prefill_seconds=t_prefill, decode_seconds=decode_s, tokens_per_s=G * (T - 1) / decode_s,
                roofline_seconds=roof(peak_bw), roofline_fraction=roof(peak_bw) / decode_s if peak_bw else None,
                copy_roofline_fraction=roof(copy_bw) / decode_s if copy_bw else None)


def run_group(a, path, batch, device, clock, res):
    """The training path: timings of one group (after a short warm-up group), decode, MFU, memory."""
    import torch

    import grpo_care
    import rollout
    from transformers import AutoProcessor

    cfg = grpo_care.Config(model_path=str(path), num_generations=a.G, max_new_tokens=a.max_new_tokens, bf16=True,
                           gradient_checkpointing=True, attn_implementation=res["attn_implementation"])
    processor = AutoProcessor.from_pretrained(path)
    policy = grpo_care.load_model(path, cfg, device, trainable=True)
    ref = grpo_care.load_model(path, cfg, device, trainable=False).eval() if res["ref_weights"] == "separate" else policy
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    G, chunk = cfg.num_generations, cfg.logprob_chunk
    advantages = torch.linspace(-1, 1, G, device=device)  # (G,) any non-zero values: the work does not depend on them

    def generate(T):
        policy.eval()
        return rollout.generate_group(policy, batch, G, processor, max_new_tokens=T, temperature=cfg.temperature,
                                      top_p=cfg.top_p, seeds=[0], min_new_tokens=T)  # EOS suppressed: T tokens a row

    def update(ro):  # grpo_care.policy_update (mu = 1, no KL) in its two parts, timed apart for the MFU
        policy.train()
        grpo_care.accumulate_policy_gradients(policy, [ro], advantages[None], None, None, cfg.clip_eps, 0.0, chunk)

    def step():
        grpo_care.optimizer_step(policy, optimizer, cfg.max_grad_norm, 0.0)

    def group(T):
        ro, t_gen, m_gen = clock(lambda: generate(T))
        assert int(ro.completion_mask.sum()) == G * T, "EOS was not suppressed: rows shorter than max_new_tokens"
        with torch.no_grad():
            _, t_old, m_old = clock(lambda: rollout.completion_logprobs(policy, ro, ro.mm, chunk_size=chunk))
            _, t_ref, m_ref = clock(lambda: grpo_care.reference_logprobs(ref, [ro], chunk))
        _, t_fb, m_fb = clock(lambda: update(ro))
        _, t_step, m_step = clock(step)
        return ro, dict(generation=t_gen, old_logprobs=t_old, reference=t_ref, update=t_fb + t_step,
                        forward_backward=t_fb), \
            dict(generation=m_gen, old_logprobs=m_old, reference=m_ref, update=max(m_fb or 0, m_step or 0) or None)

    group(a.warmup_tokens)  # kernels, allocator, AdamW's state
    ro, seconds, memory = group(a.max_new_tokens)
    _, t_prefill, _ = clock(lambda: generate(1))
    counts, geo = model_counts(policy), vision_geometry(batch, policy.config.vision_config)
    tc, vc = policy.config.text_config, policy.config.vision_config
    P, T = batch["input_ids"].shape[1], a.max_new_tokens
    head_dim = tc.hidden_size // tc.num_attention_heads
    kv_bytes_per_token = 2 * tc.num_hidden_layers * tc.num_key_value_heads * head_dim * 2  # K and V, bf16
    fwd = text_forward_flops(counts["text_matmul"], tc.hidden_size, tc.num_hidden_layers, tc.vocab_size, G, P + T, T) \
        + vision_forward_flops(counts["block_matmul"], counts["merger_matmul"], counts["embed_params"], geo["patches"],
                               vc.spatial_merge_size ** 2, vc.hidden_size, geo["window_patches"], geo["group_patches"],
                               vc.depth - len(vc.fullatt_block_indexes), len(vc.fullatt_block_indexes))
    res.update(prompt_tokens=P, counts=counts, vision=geo, kv_bytes_per_token=kv_bytes_per_token,
               group_seconds=seconds, group_peak_memory_gib=memory,
               peak_memory_gib=max((m for m in memory.values() if m is not None), default=None),
               train=dict(flops=3 * fwd, seconds=seconds["forward_backward"],
                          mfu=mfu(3 * fwd, seconds["forward_backward"], res["peak_flops"])))
    res["decode"]["training path (FSDP2, eager, dynamic cache)"] = decode_figures(
        seconds["generation"], t_prefill, G, T, 2 * counts["text_params"], kv_bytes_per_token, P,
        res["peak_bandwidth"], res["copy_bandwidth"])
    if "sweep" in a.phases:
        policy.eval()
        n = a.sweep_tokens
        sweep = lambda k: rollout.generate_groups(policy, [batch] * k, G, processor, max_new_tokens=n,
                                                  temperature=cfg.temperature, top_p=cfg.top_p, seeds=list(range(k)),
                                                  min_new_tokens=n)
        clock(lambda: sweep(1))  # warm-up at these shapes
        res["sweep"] = {}
        for k in a.sweep_prompts:
            ros, t, mem = clock(lambda: sweep(k))
            assert all(int(ro.completion_mask.sum()) == G * n for ro in ros), "EOS was not suppressed"
            res["sweep"][str(k)] = dict(rows=k * G, new_tokens=n, seconds=t, peak_memory_gib=mem)


def run_decode(a, path, batch, device, clock, res):
    """Decode levers on a plain bf16 copy: eager with the dynamic cache vs a static cache (compiled on CUDA)."""
    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    import rollout

    processor = AutoProcessor.from_pretrained(path)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, dtype=torch.bfloat16, attn_implementation=res["attn_implementation"]).to(device).eval()
    counts = model_counts(model)
    tc = model.config.text_config
    kv = 2 * tc.num_hidden_layers * tc.num_key_value_heads * (tc.hidden_size // tc.num_attention_heads) * 2
    P, G, T = batch["input_ids"].shape[1], a.G, a.max_new_tokens

    def generate(n):
        return rollout.generate_group(model, batch, G, processor, max_new_tokens=n, seeds=[0], min_new_tokens=n)

    for name, cache in (("plain bf16, eager, dynamic cache", None), ("plain bf16, static cache, compiled", "static")):
        model.generation_config.cache_implementation = cache
        try:
            clock(lambda: generate(T if cache else a.warmup_tokens))  # warm-up; static: compile for these shapes
            ro, t_full, mem = clock(lambda: generate(T))
            assert int(ro.completion_mask.sum()) == G * T, "EOS was not suppressed"
            _, t_prefill, _ = clock(lambda: generate(1))
            res["decode"][name] = dict(decode_figures(t_full, t_prefill, G, T, 2 * counts["text_params"], kv, P,
                                                      res["peak_bandwidth"], res["copy_bandwidth"]), peak_memory_gib=mem)
        except Exception as e:  # noqa: BLE001 - a lever that fails is a finding; the other figures still land
            res["decode"][name] = dict(error=f"{type(e).__name__}: {str(e)[:500]}")


def main_bench(a):
    import torch

    import grpo_care

    if not a.dry_run:
        assert torch.cuda.is_available(), "bench/gpu.py needs a CUDA GPU; use --dry-run on a CPU"
    device = grpo_care.setup_distributed().device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    peak = next(((f, b) for key, f, b in PEAKS if all(w in name for w in key.split())), (None, None))
    total = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None
    import importlib.util

    attn = "flash_attention_2" if device.type == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"
    ref = a.ref if a.ref != "auto" else ("separate" if total is None or total >= 100 else "policy")
    res = dict(device=name, device_memory_gib=total, dry_run=a.dry_run, torch=torch.__version__,
               peak_flops=a.peak_tflops * 1e12 if a.peak_tflops else peak[0],
               peak_bandwidth=a.peak_tbs * 1e12 if a.peak_tbs else peak[1], copy_bandwidth=copy_bandwidth(device),
               attn_implementation=attn, ref_weights=ref, G=a.G, max_new_tokens=a.max_new_tokens, frames=a.frames,
               config="tiny (toy sizes)" if a.dry_run else "Qwen2.5-VL-3B", decode={})
    sizes = TINY if a.dry_run else QWEN25_VL_3B
    with tempfile.TemporaryDirectory() as tmp:
        path = make_model_dir(Path(a.model_dir or Path(tmp) / "model"), sizes, device)
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(path)
        frame_hw, image_hw = ((56, 56), (56, 56)) if a.dry_run else ((224, 420), (336, 588))
        batch = make_batch(processor, a.frames, frame_hw, image_hw).to(device)
        clock = Clock(device)
        if "group" in a.phases:
            run_group(a, path, batch, device, clock, res)
            gc.collect()  # the policy, reference and AdamW state go before the plain copy comes
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if "decode" in a.phases:
            res.setdefault("prompt_tokens", batch["input_ids"].shape[1])
            run_decode(a, path, batch, device, clock, res)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(render(res))
    print(f"written to {a.out}")


# --- BENCHMARKS.md ---


def render(res: dict) -> str:
    pct = lambda x: "n/a" if x is None else f"{100 * x:.0f} %"
    f2 = lambda x: "n/a" if x is None else f"{x:.2f}"
    tera = lambda x: "n/a" if x is None else f"{x / 1e12:.2f}"
    lines = [f"Device: **{res['device']}** ({f2(res['device_memory_gib'])} GiB), torch {res['torch']}, "
             f"{res['attn_implementation']}, {res['config']}, G = {res['G']}, {res['frames']}-frame video + image "
             f"prompt of {res.get('prompt_tokens')} tokens, {res['max_new_tokens']} new tokens per row (EOS suppressed). "
             f"Peaks: {tera(res['peak_flops'])} TFLOP/s bf16 dense, {tera(res['peak_bandwidth'])} TB/s (data sheet); "
             f"measured copy bandwidth {tera(res['copy_bandwidth'])} TB/s.", ""]
    if "group_seconds" in res:
        s, m = res["group_seconds"], res["group_peak_memory_gib"]
        lines += ["| per group | generation | old log-probs | reference | update | total |", "|---|---|---|---|---|---|",
                  f"| seconds | {s['generation']:.2f} | {s['old_logprobs']:.2f} | {s['reference']:.2f} | {s['update']:.2f} "
                  f"| {s['generation'] + s['old_logprobs'] + s['reference'] + s['update']:.2f} |",
                  f"| peak GiB | {f2(m['generation'])} | {f2(m['old_logprobs'])} | {f2(m['reference'])} | {f2(m['update'])} "
                  f"| {f2(res['peak_memory_gib'])} |", "",
                  f"Reference weights: {res['ref_weights']}. Training forward + backward: "
                  f"{res['train']['flops'] / 1e12:.1f} TFLOP in {res['train']['seconds']:.2f} s, "
                  f"**MFU {pct(res['train']['mfu'])}** (goal 40 %).", ""]
    lines += ["| decode | tokens/s | decode s | roofline s | **of roofline** | of copy roofline |", "|---|---|---|---|---|---|"]
    for name, d in res["decode"].items():
        if "error" in d:
            lines.append(f"| {name} | failed: {d['error'][:200]} | | | | |")
        else:
            lines.append(f"| {name} | {d['tokens_per_s']:.0f} | {d['decode_seconds']:.2f} | {f2(d['roofline_seconds'])} "
                         f"| **{pct(d['roofline_fraction'])}** | {pct(d['copy_roofline_fraction'])} |")
    lines += ["", "Decode goal: 50 % of the roofline."]
    if res.get("sweep"):
        sw = res["sweep"]
        base = sw[min(sw, key=int)]["seconds"]
        lines += ["", f"Generation against prompts per process (training path, one generate_groups call, "
                  f"{next(iter(sw.values()))['new_tokens']} new tokens per row):", "",
                  "| prompts | rows | seconds | vs fewest | peak GiB |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {d['rows']} | {d['seconds']:.2f} | {d['seconds'] / base:.2f}x | {f2(d['peak_memory_gib'])} |"
                  for k, d in sw.items()]
    return "\n".join(lines)


def write_benchmarks(section: str, command: str, path: Path = ROOT / "BENCHMARKS.md") -> None:
    text = path.read_text()
    assert BEGIN in text and END in text, f"{path} lost its {BEGIN} / {END} markers"
    head, rest = text.split(BEGIN, 1)
    path.write_text(f"{head}{BEGIN}\n<!-- written by `{command}` -->\n{section}\n{END}{rest.split(END, 1)[1]}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", dest="dry_run", action="store_true", help="CPU, tiny config, 4 tokens (CI)")
    p.add_argument("--out", default="gpu.json", help="where the JSON goes")
    p.add_argument("--report", nargs="+", metavar="JSON", help="render these result files into BENCHMARKS.md, run nothing")
    p.add_argument("--phases", default="group,sweep,decode",
                   help="group (the training path), sweep (prompts per process, needs group), decode (the levers)")
    p.add_argument("--sweep_prompts", type=int, nargs="*", default=[1, 2, 4, 8], help="prompts per process to time")
    p.add_argument("--sweep_tokens", type=int, default=None, help="new tokens per row in the sweep, default 128 (dry run: 4)")
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=None, help="default 768 (dry run: 4)")
    p.add_argument("--warmup_tokens", type=int, default=16, help="tokens of the warm-up group")
    p.add_argument("--frames", type=int, default=None, help="video frames, default 16 (dry run: 4)")
    p.add_argument("--ref", choices=["auto", "separate", "policy"], default="auto",
                   help="reference weights: a second fp32 copy, or the policy's (same work); auto: separate if >= 100 GiB")
    p.add_argument("--model_dir", help="keep the random 3B checkpoint here between runs (default: a temp dir)")
    p.add_argument("--peak_tflops", type=float, help="override the data-sheet bf16 dense TFLOP/s")
    p.add_argument("--peak_tbs", type=float, help="override the data-sheet memory bandwidth, TB/s")
    a = p.parse_args()
    if a.report:
        res = {}
        for f in a.report:  # later files add phases (e.g. group and decode taken in two runs)
            r = json.loads(Path(f).read_text())
            res = {**res, **r, "decode": {**res.get("decode", {}), **r.get("decode", {})},
                   "sweep": {**res.get("sweep", {}), **r.get("sweep", {})}}
        section = render(res)
        write_benchmarks(section, "python bench/gpu.py --report " + " ".join(a.report))
        print(section)
        return
    a.max_new_tokens = a.max_new_tokens or (4 if a.dry_run else 768)
    a.frames = a.frames or (4 if a.dry_run else 16)
    a.sweep_tokens = a.sweep_tokens or (4 if a.dry_run else 128)
    a.warmup_tokens = min(a.warmup_tokens, a.max_new_tokens)
    main_bench(a)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
