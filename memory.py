"""The memory plan: what one GPU holds during a GRPO-CARE step, from the model's config alone (no weights).

    python bench/memory_plan.py --model_path Qwen/Qwen2.5-VL-7B-Instruct --gpus 8 --gpu_memory_gb 80
    accelerate launch grpo_care.py ...   # on CUDA, prints the same plan before loading weights (print_plan)

The model is built on the meta device and sharded by the project's own FSDP2 calls over N ranks (a fake
process group in bench/memory_plan.py, the run's own in grpo_care.py), so every shard size is FSDP2's.
Per GPU: the fp32 policy shard, its fp32 gradients and AdamW's two moments; the fp32 EMA reference shard;
the full copy that generation gathers (rollout.gathered, in the compute dtype) and the KV cache of
prompts x G rows x (prompt + new tokens); the update's working set for one prompt's G rows (saved
activations, with or without gradient checkpointing, the units FSDP2 gathers meanwhile, or the root's
gradient reduction if larger). Phases: generation, update (counted with the gradients of an earlier prompt
present) and optimizer step each add to what stays resident; the peak is the largest. GB are GiB (2^30
bytes), as torch.cuda reports them. bench/memory_check.py compares the figures with measured peaks
(BENCHMARKS.md section 4). Not counted: the CUDA context, NCCL buffers, allocator fragmentation (hence
HEADROOM), the reference's no-grad pass (smaller than the update).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from distributed import model_class, rank0_print, shard_model

GIB = 2 ** 30
HEADROOM = 0.10  # of the GPU's memory left for the CUDA context, NCCL and fragmentation
TEXT_TOKENS = 216  # the longest real SEED-Bench-R1 prompt (1,428 tokens) less its 960 video and 252 image tokens


# --- bytes of activations (pure functions; b = bytes of the compute dtype) ---


def decoder_layer_bytes(H: int, I: int, kv: int, b: int, gqa_expanded: bool) -> int:
    """Bytes one decoder layer saves for backward, per token: two RMSNorms (fp32 input, normalised input of
    the weight: 4H + bH; the output, saved by the next matmul: bH), attention (q, k after rotary, v, the output;
    k and v at full width when SDPA repeats them for a padding mask) and the SwiGLU MLP (gate, silu, up,
    product: 4bI). Checked against the tensors autograd saves (saved_tensors_hooks): within 0.1 %."""
    attention = b * (2 * H + 2 * (H if gqa_expanded else kv))
    return 2 * (4 * H + 2 * b * H) + attention + 4 * b * I


def vision_block_bytes(Hv: int, Iv: int, b: int) -> int:
    """The same per patch for a vision block: the fused qkv output (kept alive by its v view), q and k after
    rotary, the attention output and proj's input (7bHv), two RMSNorms and the SwiGLU MLP."""
    return 2 * (4 * Hv + 2 * b * Hv) + 7 * b * Hv + 4 * b * Iv


def update_activation_bytes(tokens: int, completion_tokens: int, rows: int, seq: int, patches: int, layers: int,
                            depth: int, H: int, I: int, kv: int, head_dim: int, Hv: int, Iv: int, vocab: int,
                            chunk: int, b: int, checkpointing: bool, gqa_expanded: bool) -> int:
    """Peak bytes of one prompt's forward + backward beyond the weights: `tokens` = rows x seq positions,
    `completion_tokens` of them through the LM head `chunk` at a time (checkpointed: its logits are rebuilt
    in backward, c x vocab in the compute dtype, fp32 copy, scaled copy, gradient: c x V x (b + 12)).
    With checkpointing each layer keeps only its input (bH per token) and one layer is recomputed at a time."""
    layer, block = decoder_layer_bytes(H, I, kv, b, gqa_expanded), vision_block_bytes(Hv, Iv, b)
    kept_layer, kept_block = (b * H, b * Hv) if checkpointing else (layer, block)
    saved = (layers * kept_layer * tokens + depth * kept_block * patches
             + (8 + 8 * b) * Hv * patches  # patch embedding, merger
             + (4 + b) * H * tokens + 2 * b * head_dim * tokens  # the final norm; rotary cos and sin
             + b * H * completion_tokens  # the head's input, a contiguous copy of the completion positions
             + b * rows * seq * seq)  # the attention mask (padded rows), in the compute dtype
    backward = tokens * b * (3 * I + 2 * H)  # gradients through one layer's MLP at a time
    recompute = max(layer * tokens, block * patches) if checkpointing else 0
    return saved + max(chunk * vocab * (b + 12), recompute + backward)


# --- the plan ---


def plan(*, shard: int, full: int, root: int, unit: int, layers: int, H: int, I: int, kv: int, head_dim: int,
         vocab: int, depth: int, Hv: int, Iv: int, merge: int, prompts: int, G: int, prompt_tokens: int,
         new_tokens: int, vision_tokens: int, bf16: bool, checkpointing: bool, gqa_expanded: bool, reference: bool,
         chunk: int, gpu_memory_gb: float | None = None) -> dict:
    """Per-GPU bytes of a step from plain numbers: `shard` parameters in this rank's (largest) FSDP2 shard,
    `full` parameters gathered (padded), `root` of them in the root unit (embeddings, head: kept gathered
    from forward to backward, with their unsharded gradients), `unit` in the largest other unit."""
    b = 2 if bf16 else 4
    rows, seq = prompts * G, prompt_tokens + new_tokens
    act = lambda ckpt: update_activation_bytes(  # noqa: E731 - one prompt's G rows at a time
        G * seq, G * new_tokens, G, seq, vision_tokens * merge, layers, depth, H, I, kv, head_dim, Hv, Iv, vocab,
        chunk, b, ckpt, gqa_expanded)
    fsdp = b * (root + vocab * H + 2 * unit)  # gathered: the root (kept to backward), the head's gradient, 2 units
    # the end of backward: the root still gathered, its gradients, their fp32 copy for the reduce-scatter
    root_reduce = root * (2 * b + 4)
    work = lambda ckpt: max(act(ckpt) + fsdp, root_reduce)  # noqa: E731
    parts = dict(policy_params=4 * shard, grads=4 * shard, optimizer=8 * shard,
                 ema_reference=4 * shard if reference else 0, generation_copy=b * full,
                 # + the prompts' own prefill cache (before it is repeated G times) and one layer's K growing by
                 # torch.cat (HF's dynamic cache copies it for every token)
                 kv_cache=((rows * seq + prompts * prompt_tokens) * layers * 2 + rows * seq) * kv * b,
                 activations=work(checkpointing))
    resident = parts["policy_params"] + parts["optimizer"] + parts["ema_reference"]
    # one layer of the prefill; per token the logits, HF's top-p sort (values, int64 indices, softmax, cumsum)
    prefill = prompts * prompt_tokens * b * (3 * I + 4 * H) + rows * vocab * 32
    phases = dict(generation=resident + parts["generation_copy"] + parts["kv_cache"] + prefill,
                  update=resident + parts["grads"] + parts["activations"],
                  optimizer_step=resident + parts["grads"] + 4 * shard)  # AdamW's foreach sqrt temporary
    gb = lambda x: round(x / GIB, 3)  # noqa: E731
    peak = max(phases.values())
    return dict(per_gpu_gb={k: gb(v) for k, v in parts.items()}, per_gpu_bytes=parts,
               phases_gb={k: gb(v) for k, v in phases.items()},
               activations_gb=dict(checkpointing=gb(work(True)), no_checkpointing=gb(work(False))),
               peak_gb=gb(peak), gpu_memory_gb=gpu_memory_gb, params=full, shard_params=shard,
               fits=None if gpu_memory_gb is None else peak / GIB <= (1 - HEADROOM) * gpu_memory_gb,
               settings=dict(prompts_per_device=prompts, num_generations=G, prompt_tokens=prompt_tokens,
                             max_new_tokens=new_tokens, bf16=bf16, gradient_checkpointing=checkpointing,
                             reference=reference, logprob_chunk=chunk))


def prompt_tokens_bound(video_max_frames: int, video_max_pixels: int, image_max_pixels: int, merge_px: int = 28,
                        temporal: int = 2) -> int:
    """Longest prompt the media flags allow: text + frames/2 x pixels/28^2 video tokens + pixels/28^2 image
    tokens (16 frames at 128*28*28 px and 256*28*28 px: 216 + 1,024 + 256 = 1,496; real ones 1,311-1,428)."""
    video = math.ceil(video_max_frames / temporal) * (video_max_pixels // merge_px ** 2)
    return TEXT_TOKENS + video + image_max_pixels // merge_px ** 2


def model_sizes(model) -> dict:
    """Parameter counts of an FSDP2-sharded model (on meta is enough): this rank's shard, the gathered total
    (padded as FSDP2 pads), the root unit's own and the largest other unit's, gathered."""
    units = {n for n, m in model.named_modules() if isinstance(m, FSDPModule)}
    world = dist.get_world_size()
    per_unit, shard, full = {}, 0, 0
    for name, p in model.named_parameters():
        local = p.to_local().numel() if isinstance(p, DTensor) else p.numel()
        owner = max((u for u in units if u == "" or name.startswith(u + ".")), key=len)
        shard, full = shard + local, full + local * world
        per_unit[owner] = per_unit.get(owner, 0) + local * world
    root = per_unit.pop("", 0)
    return dict(shard=shard, full=full, root=root, unit=max(per_unit.values(), default=0))


def config_dims(config) -> dict:
    """The sizes the activation formulas need, from a Qwen2_5_VLConfig or a Qwen2VLConfig (whose vision width is
    `embed_dim`, its MLP `mlp_ratio` times that)."""
    t, v = config.text_config, config.vision_config
    Hv, Iv = ((v.embed_dim, int(v.embed_dim * v.mlp_ratio)) if config.model_type == "qwen2_vl" else
              (v.hidden_size, v.intermediate_size))
    return dict(layers=t.num_hidden_layers, H=t.hidden_size, I=t.intermediate_size, vocab=t.vocab_size,
                kv=t.num_key_value_heads * (t.hidden_size // t.num_attention_heads),
                head_dim=t.hidden_size // t.num_attention_heads, depth=v.depth, Hv=Hv, Iv=Iv,
                merge=v.spatial_merge_size ** 2)


def plan_inputs(config, mesh, cfg, gpu_memory_gb=None, prompt_tokens=None, vision_tokens=None) -> dict:
    """plan()'s arguments for run config `cfg` (grpo_care.Config; bf16, checkpointing, attention resolved) and a
    model of `config`: built on the meta device, sharded over `mesh` as training shards it (no communication)."""
    with torch.device("meta"):
        model = model_class(config)._from_config(config, dtype=torch.float32)
    shard_model(model, mesh, cfg.bf16, trainable=True)
    bound = prompt_tokens_bound(cfg.video_max_frames, cfg.video_max_pixels, cfg.image_max_pixels)
    prompt_tokens = prompt_tokens or bound
    vision_tokens = vision_tokens or max(prompt_tokens - TEXT_TOKENS, 0)
    return dict(**model_sizes(model), **config_dims(config), prompts=cfg.prompts_per_device, G=cfg.num_generations,
                prompt_tokens=prompt_tokens, new_tokens=cfg.max_new_tokens, vision_tokens=vision_tokens,
                bf16=cfg.bf16, checkpointing=cfg.gradient_checkpointing,
                gqa_expanded=cfg.attn_implementation != "flash_attention_2",
                reference=cfg.uses_reference(), chunk=cfg.logprob_chunk, gpu_memory_gb=gpu_memory_gb)


LABELS = dict(policy_params="policy (fp32 shard)", grads="gradients (fp32 shard)",
              optimizer="AdamW state (2 x fp32 shard)", ema_reference="EMA reference (fp32 shard)",
              generation_copy="generation copy (gathered, {dtype})",
              kv_cache="KV cache ({rows} rows x {seq} positions)",
              activations="update activations ({ckpt}) + FSDP2 units")


def render(p: dict, world: int) -> str:
    s = p["settings"]
    fmt = dict(dtype="bf16" if s["bf16"] else "fp32", rows=s["prompts_per_device"] * s["num_generations"],
               seq=s["prompt_tokens"] + s["max_new_tokens"],
               ckpt="checkpointing" if s["gradient_checkpointing"] else "no checkpointing")
    lines = [f"memory plan: {p['params'] / 1e9:.2f} B parameters over {world} GPU(s) ({p['shard_params'] / 1e9:.2f} B "
             f"a shard), G = {s['num_generations']}, {s['prompts_per_device']} prompt(s) per GPU, "
             f"{s['prompt_tokens']} prompt + {s['max_new_tokens']} new tokens; per GPU, GB:"]
    lines += [f"  {LABELS[k].format(**fmt):<48} {v:7.2f}" for k, v in p["per_gpu_gb"].items()]
    a = p["activations_gb"]
    lines += [f"  (activations with checkpointing {a['checkpointing']:.2f}, without {a['no_checkpointing']:.2f})",
              "  phases: " + ", ".join(f"{k} {v:.2f}" for k, v in p["phases_gb"].items())]
    m = p["gpu_memory_gb"]
    verdict = "" if m is None else f" of {m:g}: " + (
        "fits" if p["fits"] else "DOES NOT FIT") + f" (with {HEADROOM:.0%} headroom)"
    return "\n".join(lines + [f"  peak {p['peak_gb']:.2f} GB{verdict}"])


def levers(inputs: dict) -> list[str]:
    """The flags that lower the peak of plan(**inputs), each with the peak it gives (twice the GPUs: every
    shard halved, the gathered copies unchanged)."""
    a = inputs
    tries = [("--gradient_checkpointing true", dict(checkpointing=True)) if not a["checkpointing"] else None,
             (f"--num_generations {a['G'] // 2}", dict(G=a["G"] // 2)) if a["G"] >= 4 else None,
             (f"--max_new_tokens {a['new_tokens'] // 2}", dict(new_tokens=a["new_tokens"] // 2)),
             ("--prompts_per_device 1", dict(prompts=1)) if a["prompts"] > 1 else None,
             ("twice the GPUs", dict(shard=math.ceil(a["shard"] / 2)))]
    return [f"{flag}: peak {plan(**{**a, **change})['peak_gb']:.2f} GB" for flag, change in filter(None, tries)]


def plan_report(cfg, mesh, gpu_memory_gb: float) -> str:
    """The plan of run `cfg` sharded over `mesh`, as text; when it does not fit, a warning naming the flags."""
    from transformers import AutoConfig

    inputs = plan_inputs(AutoConfig.from_pretrained(cfg.model_path), mesh, cfg, gpu_memory_gb)
    p = plan(**inputs)
    text = render(p, mesh.size())
    if not p["fits"]:
        text += (f"\nwarning: the peak ({p['peak_gb']:.1f} GB) exceeds {1 - HEADROOM:.0%} of this GPU's "
                 f"{gpu_memory_gb:.1f} GB; what lowers it:\n  " + "\n  ".join(levers(inputs)))
    return text


def print_plan(cfg, device) -> None:
    """On a CUDA device, rank 0 prints the run's plan before any weights load (a warning if it does not fit);
    nothing elsewhere. No communication: the meta model is sharded locally."""
    if device.type != "cuda":
        return
    mesh = init_device_mesh("cuda", (dist.get_world_size(),))
    rank0_print(plan_report(cfg, mesh, torch.cuda.get_device_properties(device).total_memory / GIB))
