"""GRPO-CARE training: the config, the core math of the update, and one straight loop.

    ./train.sh                                   # toy world, CPU, a few minutes
    accelerate launch grpo_care.py --model_path Qwen/Qwen2.5-VL-7B-Instruct --data_root SEED-Bench-R1
    accelerate launch --config_file configs/fsdp_8gpu.yaml grpo_care.py ...   # one node, 8 GPUs

One step: each process takes `prompts_per_device` prompts, samples G completions per prompt,
scores them (accuracy + format + CARE's consistency bonus from the EMA reference), turns the
rewards into group-relative advantages, and takes `num_iterations` clipped policy-gradient steps.
Every `ref_ema_every` steps the EMA reference moves toward the policy. Each step appends one line
to metrics.jsonl and, per sampled completion, one to completions.jsonl (text, rewards, confidence,
bonus, advantage: what the update used), which shows which reasoning CARE rewarded.

The policy and the reference are always wrapped with FSDP2 `fully_shard` (per vision block, the
vision tower, per decoder layer, then the root), also for one process: one code path, and FSDP2's
mixed-precision policy gives bf16 compute over fp32 master weights on GPU. On CPU the group is gloo.
Only rank 0 reads a checkpoint; the other ranks build the model on the meta device and receive
their shards by broadcast (`load_model`), so a node holds one fp32 copy in host memory, not one per
process.

Departures from the paper / reference code (TencentARC/GRPO-CARE), and why:
- The reference runs DeepSpeed ZeRO-3 through TRL's trainer; here FSDP2 and a plain loop.
- The EMA reference is held in fp32 (the reference lerps in bf16, where small updates vanish).
- The reference re-encodes the video for each of the G samples in every pass, and builds logits
  over the prompt; here vision is encoded once per prompt per set of weights and only completion
  log-probs are formed, in chunks (rollout.py).
- Sampling is seeded per (run seed, step, sample id), so rollouts do not depend on how prompts
  are spread over processes, nor on whether the run was resumed.
- The policy loss keeps PPO's clip, which is inactive at `num_iterations=1` (the reference).
- No length bonus, as the reference's SEED-Bench-R1 scripts (`--len_control false`; its grpo.py
  default adds +0.2 for accurate answers of 320-512 tokens).

Before any model is loaded the run checks its flags (`validate_config`: each error names the flag and
its range), every annotation row (data.py), its output dir (`check_output_dir`: a used one is refused
unless resuming or `--overwrite_output_dir true`) and, on resume, the checkpoint's config
(`compare_resume_config`). Unreadable samples are skipped and counted against `--max_skip_frac`
(`skip_verdict`); the counts are carried through resume. As a command (`run_cli`), such user errors
print one line and exit 2.

Core math of the update, as pure functions (tensors in, tensors out, no model, no config):
- `policy_loss`: the clipped GRPO surrogate with optional k3 KL. With `old_logps = logps.detach()`
  it is exactly the reference's loss. The reference clamps `ref - logp` to [-10, 10] inside the KL;
  we do not, so the KL is the plain k3 estimator. An all-masked row counts as zero (the reference
  would divide by 0).
- `ema_update_`: the EMA reference model update, shard-local under FSDP2.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import random
import re
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

# --- core math of the update (pure functions) ---


def policy_loss(logps, old_logps, advantages, mask, clip_eps=0.2, ref_logps=None, beta=0.0):
    """Clipped GRPO loss. `logps`, `old_logps`, `mask`, `ref_logps`: (N, T); `advantages`: (N,).

    Returns (loss, stats); stats hold detached 0-d tensors (no host sync): `clip_frac`,
    `ratio_mean` and, when `ref_logps` is given, `kl`.
    """
    assert logps.shape == old_logps.shape == mask.shape, (
        f"logps {tuple(logps.shape)}, old_logps {tuple(old_logps.shape)}, mask {tuple(mask.shape)} must match")
    assert advantages.shape == logps.shape[:1], f"advantages {tuple(advantages.shape)} must be ({logps.shape[0]},)"
    mask = mask.to(logps.dtype)  # (N, T)
    adv = advantages.unsqueeze(-1)  # (N, 1)
    ratio = torch.exp(logps - old_logps)  # (N, T)
    unclipped = ratio * adv  # (N, T)
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv  # (N, T)
    per_token = torch.minimum(unclipped, clipped)  # (N, T), pessimistic bound
    stats = {}
    if ref_logps is not None:
        assert ref_logps.shape == logps.shape, f"ref_logps {tuple(ref_logps.shape)} vs logps {tuple(logps.shape)}"
        delta = ref_logps - logps  # (N, T)
        kl = torch.exp(delta) - delta - 1  # (N, T), k3: unbiased, always >= 0
        if beta != 0.0:  # skip rather than add 0 * kl, which is NaN where kl is inf
            per_token = per_token - beta * kl
        stats["kl"] = ((kl * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean().detach()
    # Mean over each sequence's tokens, then over sequences (the reference's normalisation).
    loss = -((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    n_tokens = mask.sum().clamp(min=1)
    stats["clip_frac"] = (((clipped < unclipped).to(mask.dtype) * mask).sum() / n_tokens).detach()
    stats["ratio_mean"] = ((ratio * mask).sum() / n_tokens).detach()
    return loss, stats


@torch.no_grad()
def ema_update_(ema_params, params, decay):
    """In place, `ema <- decay * ema + (1 - decay) * theta`, parameter by parameter.

    Keep the EMA in fp32 even when the policy runs in bf16: at decay 0.995 the step
    0.005 * (theta - ema) is below half a bf16 ulp of ema, so a bf16 EMA never moves.
    FSDP2 DTensors are updated on their local shards: both models are sharded alike,
    so no gather and no communication is needed.
    """
    ema_params, params = list(ema_params), list(params)
    assert len(ema_params) == len(params), f"{len(ema_params)} EMA params vs {len(params)} params"
    for ema, p in zip(ema_params, params):
        ema = ema.to_local() if isinstance(ema, DTensor) else ema
        p = p.to_local() if isinstance(p, DTensor) else p
        assert ema.shape == p.shape, f"EMA shard {tuple(ema.shape)} vs param shard {tuple(p.shape)}"
        ema.lerp_(p.to(ema.dtype), 1.0 - decay)


# --- config ---


@dataclass
class MediaSystemConfig:
    """The data, media and system fields shared by grpo_care.Config and sft.SFTConfig."""
    shuffle_options: bool = field(default=True, metadata={"help": "shuffle training options (false: alphabetical)"})
    # media (qwen-vl-utils)
    video_fps: float = field(default=2.0, metadata={"help": "frames sampled per second"})
    video_min_frames: int = field(default=4, metadata={"help": "fewest frames per video"})
    video_max_frames: int = field(default=16, metadata={"help": "most frames per video"})
    video_max_pixels: int = field(default=128 * 28 * 28, metadata={"help": "pixels per video frame (max)"})
    video_min_pixels: int = field(default=128 * 28 * 28, metadata={"help": "pixels per video frame (min)"})
    image_max_pixels: int = field(default=256 * 28 * 28, metadata={"help": "pixels per image (max)"})
    image_min_pixels: int = field(default=4 * 28 * 28, metadata={"help": "pixels per image (min)"})
    # system
    bf16: bool | None = field(default=None, metadata={"help": "bf16 compute over fp32 weights; default: on GPU"})
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "default: on GPU"})
    attn_implementation: str | None = field(default=None, metadata={"help": "default: flash_attention_2 if installed, else sdpa"})

    def vision_spec(self):
        from data import VisionSpec

        return VisionSpec(**{f.name: getattr(self, f.name) for f in dataclasses.fields(VisionSpec)})


@dataclass
class Config(MediaSystemConfig):
    # model and data (leave model_path empty for the built-in toy world)
    model_path: str | None = field(default=None, metadata={"help": "save_pretrained dir or hub id; empty = toy world"})
    data_root: str | None = field(default=None, metadata={"help": "SEED-Bench-R1 root (annotations/, videos/, images/)"})
    train_file: str = field(default="annotations/training_6k.jsonl", metadata={"help": "relative to data_root"})
    output_dir: str = field(default="outputs/grpo_care", metadata={"help": "checkpoints, metrics.jsonl, curves.png"})
    toy_dir: str = field(default=".cache/toy", metadata={"help": "where the toy world is built when model_path is empty"})
    toy: bool | None = field(default=None, metadata={"help": "toy-sized settings (TOY_DEFAULTS); default: when model_path is empty"})
    seed: int = field(default=42, metadata={"help": "seeds data order, option shuffles and sampling"})
    # rollouts
    num_generations: int = field(default=8, metadata={"help": "G, samples per prompt"})
    prompts_per_device: int = field(default=1, metadata={"help": "prompts per process per step"})
    max_new_tokens: int = field(default=768, metadata={"help": "completion budget"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling"})
    logprob_chunk: int = field(default=256, metadata={"help": "completion tokens per LM-head chunk"})
    # the update
    learning_rate: float = field(default=1e-6, metadata={"help": "peak learning rate, cosine decay to 0"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "linear warm-up fraction of the steps"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=5.0, metadata={"help": "gradient clipping"})
    num_iterations: int = field(default=1, metadata={"help": "mu, updates per rollout (1 = the reference)"})
    clip_eps: float = field(default=0.2, metadata={"help": "PPO clip range (inactive when mu = 1)"})
    beta: float = field(default=0.0, metadata={"help": "k3 KL weight to the reference (the reference: 0)"})
    num_epochs: int = field(default=1, metadata={"help": "passes over the training file"})
    max_steps: int = field(default=-1, metadata={"help": "stop after this many steps (-1: the epochs decide)"})
    # CARE
    use_care: bool = field(default=True, metadata={"help": "consistency bonus from the EMA reference; false = GRPO"})
    bonus_coefficient: float = field(default=0.5, metadata={"help": "bonus = coef * accuracy"})
    confidence_upper_bound: float = field(default=0.95, metadata={"help": "cap on the reference's answer confidence"})
    consistency_margin: float = field(default=0.0, metadata={"help": "confident = conf >= level - margin"})
    ref_ema_decay: float = field(default=0.995, metadata={"help": "EMA decay of the reference"})
    ref_ema_every: int = field(default=10, metadata={"help": "steps between EMA updates"})
    save_steps: int = field(default=500, metadata={"help": "checkpoint every N steps (and at the end)"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "checkpoint dir, or 'latest'"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "start over in a used output_dir (deletes its run)"})
    max_skip_frac: float = field(default=0.5, metadata={"help": "abort when more of a step's or the run's samples are unreadable (1: never)"})
    report_to: str = field(default="none", metadata={"help": "'tensorboard' to also write event files"})
    log_completions: bool = field(default=True, metadata={"help": "write every sampled completion and its rewards "
                                                                  "to completions.jsonl"})


# The toy world's sizes, applied with --toy (the default when --model_path is empty) to every field not
# given on the command line. ./train.sh's default run passes --toy with the SFT warm start as model_path:
# 60 steps of 4 prompts x 8 samples (one epoch of the toy's 240 rows), ~1 min on 2 CPU cores (at 40, GRPO
# had not yet drifted far enough from the warm start for CARE's consistency gain to show in every seed).
# The fast EMA (every 2 steps, decay 0.9) lets the reference move within so short a run; the paper's
# 0.995 every 10 steps is for ~1,000 steps (a slower 0.975 gave the same bonus decisions, step for step).
TOY_DEFAULTS = dict(shuffle_options=False, max_new_tokens=48, prompts_per_device=4, learning_rate=1e-4,
                    warmup_ratio=0.0, max_steps=60, save_steps=30, ref_ema_every=2, ref_ema_decay=0.9,
                    output_dir="outputs/toy")


def parse_config(argv: list[str] | None = None) -> Config:
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_flags(Config, argv)
    if cfg.toy is None:
        cfg.toy = not cfg.model_path
    if cfg.toy:
        apply_toy_defaults(cfg, argv, TOY_DEFAULTS)
    validate_config(cfg, CONFIG_RULES)
    return cfg


class ConfigError(ValueError):
    """A flag is unknown, out of range, or would silently not apply on resume; the message names the flag."""


class RunAborted(RuntimeError):
    """The run stopped on purpose (too many unreadable samples, a full disk); the message says why and what next."""


def parse_flags(cls, argv: list[str]):
    """`cls` from `argv` by HfArgumentParser, with no flag abbreviations: `--num_generation 4` is an error."""
    from transformers import HfArgumentParser

    cfg, rest = HfArgumentParser(cls, allow_abbrev=False).parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True)
    if rest:
        raise ConfigError(f"unknown flag(s) {' '.join(rest)} (flags are not abbreviated; see --help)")
    return cfg


def _between(lo, hi, lo_open=False, hi_open=False):
    """A (text, test) rule for a number in [lo, hi], ends open as told; NaN always fails."""
    text = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    return text, lambda v: (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)


_INT_GE = lambda n: (f"an integer >= {n}", lambda v: v >= n)  # noqa: E731
_POSITIVE = ("> 0", lambda v: 0 < v < math.inf)
_NONNEG = (">= 0", lambda v: 0 <= v < math.inf)
MEDIA_RULES = {  # flag -> (allowed values, test); the media and system fields of both configs
    "video_fps": _POSITIVE, "video_min_frames": _INT_GE(1), "video_max_frames": _INT_GE(1),
    "video_max_pixels": _INT_GE(1), "video_min_pixels": _INT_GE(1), "image_max_pixels": _INT_GE(1),
    "image_min_pixels": _INT_GE(1),
    "attn_implementation": ("None, eager, sdpa or flash_attention_2", lambda v: v in (None, "eager", "sdpa", "flash_attention_2")),
}
CONFIG_RULES = {
    **MEDIA_RULES,
    "num_generations": ("an integer >= 2 (a group of 1 has no relative advantage)", lambda v: v >= 2),
    "prompts_per_device": _INT_GE(1), "max_new_tokens": _INT_GE(1), "temperature": _POSITIVE,
    "top_p": _between(0, 1, lo_open=True), "logprob_chunk": _INT_GE(1), "learning_rate": _NONNEG,
    "warmup_ratio": _between(0, 1), "weight_decay": _NONNEG, "max_grad_norm": _POSITIVE,
    "num_iterations": _INT_GE(1), "clip_eps": _POSITIVE, "beta": _NONNEG, "num_epochs": _INT_GE(1),
    "max_steps": ("-1 or an integer >= 1", lambda v: v == -1 or v >= 1), "bonus_coefficient": _NONNEG,
    "confidence_upper_bound": _between(0, 1, lo_open=True), "consistency_margin": _between(0, 1),
    "ref_ema_decay": _between(0, 1), "ref_ema_every": _INT_GE(1), "save_steps": _INT_GE(1),
    "max_skip_frac": _between(0, 1), "report_to": ("none or tensorboard", lambda v: v in ("none", "tensorboard")),
}


def validate_config(cfg, rules: dict) -> None:
    """Raises ConfigError "--flag value: must be <allowed>" for the first flag out of range, and for paths
    that cannot work. Runs before any model is loaded."""
    for flag, (allowed, ok) in rules.items():
        value = getattr(cfg, flag)
        if not ok(value):
            raise ConfigError(f"--{flag} {value!r}: must be {allowed}")
    for kind in ("video", "image"):
        lo, hi = getattr(cfg, f"{kind}_min_pixels"), getattr(cfg, f"{kind}_max_pixels")
        if lo > hi:
            raise ConfigError(f"--{kind}_min_pixels {lo} must be <= --{kind}_max_pixels {hi}")
    if cfg.video_min_frames > cfg.video_max_frames:
        raise ConfigError(f"--video_min_frames {cfg.video_min_frames} must be <= --video_max_frames {cfg.video_max_frames}")
    if cfg.model_path:
        if not os.path.isdir(cfg.model_path) and not _HUB_ID.fullmatch(cfg.model_path):
            raise ConfigError(f"--model_path {cfg.model_path}: no such directory (nor a hub id 'org/name')")
        if not cfg.data_root:
            raise ConfigError("--data_root is required with --model_path (the SEED-Bench-R1 directory)")
    if cfg.data_root and not os.path.isdir(cfg.data_root):
        raise ConfigError(f"--data_root {cfg.data_root}: no such directory")
    if getattr(cfg, "resume_from_checkpoint", None) and getattr(cfg, "overwrite_output_dir", False):
        raise ConfigError("--resume_from_checkpoint continues the run in --output_dir, --overwrite_output_dir true "
                          "deletes it: pass one of the two")


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def apply_toy_defaults(cfg, argv: list[str], defaults: dict) -> None:
    """Sets `defaults` and toy.TOY_VISION on `cfg` (this Config or sft's), except fields given in `argv`."""
    import toy

    given = {a.lstrip("-").split("=")[0] for a in argv if a.startswith("--")}
    for k, v in {**defaults, **toy.TOY_VISION}.items():
        if k not in given:
            setattr(cfg, k, v)


# --- distributed set-up (the same lines for 1 process and N, GPU or CPU) ---


def setup_distributed():
    """Accelerate sets up device and process group; a lone process gets a 1-rank group so that
    FSDP2 wraps it like any other (one code path)."""
    import torch.distributed as dist
    from accelerate import Accelerator

    acc = Accelerator(cpu=not torch.cuda.is_available())  # cpu=True: gloo group under a multi-process launch
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return acc


def resolve_run(cfg, device) -> Path:
    """Fills the device-dependent defaults of `cfg` (also sft.py's config) and, with no model_path,
    builds the toy world (rank 0 builds, the others wait); seeds torch; returns the output dir."""
    import importlib.util

    import torch.distributed as dist

    on_gpu = device.type == "cuda"
    cfg.bf16 = on_gpu if cfg.bf16 is None else cfg.bf16
    cfg.gradient_checkpointing = on_gpu if cfg.gradient_checkpointing is None else cfg.gradient_checkpointing
    if cfg.attn_implementation is None:
        cfg.attn_implementation = "flash_attention_2" if on_gpu and importlib.util.find_spec("flash_attn") else "sdpa"
    if not cfg.model_path:
        import toy

        if dist.get_rank() == 0:
            toy.build(cfg.toy_dir)
        dist.barrier()
        cfg.model_path, cfg.data_root = str(Path(cfg.toy_dir) / "model"), str(Path(cfg.toy_dir) / "data")
    assert cfg.data_root, "--data_root is required with --model_path (the SEED-Bench-R1 directory)"
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    return out


def load_model(path, cfg: Config, device, trainable: bool):
    """A Qwen2.5-VL in fp32 (master weights), sharded with FSDP2; compute in bf16 when cfg.bf16.

    Rank 0 alone reads the checkpoint; the other ranks build the model on the meta device and
    receive their shards from rank 0, so host memory holds one fp32 copy (30 GB for 7B), not one
    per process (8 x 2 models x 30 GB on an 8-GPU node)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    from transformers import AutoConfig, GenerationConfig, Qwen2_5_VLForConditionalGeneration

    rank0 = dist.get_rank() == 0
    source = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation=cfg.attn_implementation) if rank0 else None
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            AutoConfig.from_pretrained(path), dtype=torch.float32, attn_implementation=cfg.attn_implementation)
    if (Path(path) / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.eval()  # as from_pretrained leaves it
    if trainable and cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.requires_grad_(trainable)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cfg.bf16 else None, reduce_dtype=torch.float32)
    for block in model.model.visual.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model.model.visual, mesh=mesh, mp_policy=mp)  # gathered only while vision is encoded
    for layer in model.model.language_model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    # FSDP2 keeps the root unsharded after forward, for backward; a frozen model has no backward to reshard it
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=not trainable)
    for method in ("get_image_features", "get_video_features"):  # rollout.py encodes vision on its own
        register_fsdp_forward_method(model, method)
    # those methods return views (per-image splits); nothing modifies them in place, so FSDP2's warning is moot
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    model.to_empty(device=device)
    set_model_state_dict(model, source.state_dict() if rank0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for name, buffer in model.named_buffers():  # non-persistent (rotary frequencies): not in the state dict
        if rank0:
            buffer.copy_(source.get_buffer(name))
        dist.broadcast(buffer, src=0)
    return model


def rank0_print(*args):
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print(*args, flush=True)


# --- checkpoints: policy as save_pretrained, training state via torch.distributed.checkpoint ---


def save_checkpoint(out: Path, step: int, policy, ref, optimizer, scheduler, processor, cfg: Config,
                    counters: dict | None = None) -> Path:
    """Writes `checkpoint-<step>` under a temporary name and renames it when complete. `counters`
    (the run's skipped samples, non-finite steps) go into trainer_state.json for a resumed run."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    final, tmp = out / f"checkpoint-{step}", out / f"checkpoint-{step}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(policy, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    if ref is not None:
        state["ref"] = get_model_state_dict(ref)
    dcp.save(state, checkpoint_id=tmp / "train_state")
    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               tmp / f"rng_state_{rank}.pt")  # dcp.save made tmp/ and ended with a barrier
    if rank == 0:
        policy.save_pretrained(tmp, state_dict=full)  # loadable by plain transformers
        processor.save_pretrained(tmp)
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "config": asdict(cfg), "counters": counters or {}}, indent=1))
    dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # atomic: a crash before this line leaves the previous checkpoint whole
    dist.barrier()
    return final


def latest_checkpoint(out: Path) -> Path | None:
    done = [p for p in out.glob("checkpoint-*") if not p.name.endswith(".tmp") and (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def load_checkpoint(path: Path, policy, ref, optimizer, scheduler) -> int:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(policy, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    if ref is not None:
        state["ref"] = get_model_state_dict(ref)
    dcp.load(state, checkpoint_id=path / "train_state")
    set_state_dict(policy, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if ref is not None:
        set_model_state_dict(ref, state["ref"])
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng = torch.load(path / f"rng_state_{dist.get_rank()}.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / "trainer_state.json").read_text())["step"]


def plot_metrics(metrics_file: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    keys = ["reward_mean", "accuracy", "format", "bonus_mean", "confidence", "completion_len_mean"]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    for ax, k in zip(axes.flat, keys):
        ax.plot([r["step"] for r in rows], [r[k] for r in rows])
        ax.set_title(k)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)


def completion_records(step: int, sample_id, texts: list[str], acc, fmt, conf, bonus, reward, advantages) -> list[dict]:
    """completions.jsonl lines of one group: the values the update used, per sample. `acc`, `fmt`,
    `reward`: (1, G); `conf`, `bonus`: (1, G) or None (no CARE); `advantages`: (G,)."""
    per_sample = lambda t: [None] * len(texts) if t is None else [round(v, 6) for v in t.reshape(-1).tolist()]  # noqa: E731
    columns = dict(accuracy=per_sample(acc), format=per_sample(fmt), confidence=per_sample(conf),
                   bonus=per_sample(bonus), reward=per_sample(reward), advantage=per_sample(advantages))
    return [dict(step=step, sample_id=sample_id, g=g, text=text, **{k: v[g] for k, v in columns.items()})
            for g, text in enumerate(texts)]


# --- the run directory: never clobber a run, compare configs on resume, count lost samples ---

RUN_FILES = ("metrics.jsonl", "completions.jsonl", "curves.png", "tensorboard")  # with checkpoint-*: a run's own


def check_output_dir(out: Path, resuming: bool, overwrite: bool, files=RUN_FILES) -> list[Path]:
    """The run files (`files`, checkpoint-*) already in `out`, to delete. A used dir is refused unless the
    run resumes (it then owns them: nothing to delete) or `overwrite`. Read-only: every rank may call it."""
    used = sorted(out.glob("checkpoint-*")) + [out / f for f in files if (out / f).exists()]
    if used and not resuming and not overwrite:
        names = ", ".join(p.name for p in used[:4]) + (", ..." if len(used) > 4 else "")
        raise ConfigError(f"--output_dir {out} holds a run ({names}): pass --resume_from_checkpoint latest to "
                          "continue it, or --overwrite_output_dir true to delete it and start over")
    return used if not resuming else []


def remove_run(paths: list[Path]) -> None:
    for p in paths:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def truncate_history(path: Path, step: int) -> None:
    """Keeps the lines of a per-step .jsonl with "step" <= `step` (the steps a resumed run does not redo).
    A line cut by a crash (not JSON) is dropped."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    path.write_text("".join(line + "\n" for line in kept))


def find_resume_checkpoint(out: Path, resume: str) -> Path:
    ckpt = latest_checkpoint(out) if resume == "latest" else Path(resume)
    if ckpt is None or not (ckpt / "trainer_state.json").exists():
        where = f"no checkpoint in {out}" if resume == "latest" else f"{resume} is not a checkpoint (no trainer_state.json)"
        raise ConfigError(f"--resume_from_checkpoint {resume}: {where}")
    return ckpt


# Flags whose change a resume would silently drop: the checkpoint's optimizer and schedule restore their own
# learning rate and weight decay, its weights replace model_path's, and it holds a reference model or not.
RESUME_REFUSED = {
    "learning_rate": "the optimizer and the schedule restore the checkpoint's",
    "weight_decay": "the optimizer restores the checkpoint's",
    "model_path": "the weights come from the checkpoint",
    "reference model (use_care or beta > 0)": "the checkpoint holds a reference model or not",
}
RESUME_IGNORED = ("output_dir", "resume_from_checkpoint", "overwrite_output_dir")


def compare_resume_config(saved: dict, new: dict) -> tuple[list[str], list[str]]:
    """(refused, applied): "flag: old -> new" for each difference between a checkpoint's config and this
    run's. Refused ones would silently not apply (RESUME_REFUSED); the others apply from the resumed step.
    Fields absent from `saved` (older checkpoints) are not compared."""
    def ref(c):
        return bool(c.get("use_care")) or (c.get("beta") or 0) > 0

    def same(k, a, b):
        if k == "model_path" and a and b and os.path.exists(a) and os.path.exists(b):
            return os.path.realpath(a) == os.path.realpath(b)
        return a == b

    refused, applied = [], []
    for k in new:
        if k in saved and k not in RESUME_IGNORED and not same(k, saved[k], new[k]):
            (refused if k in RESUME_REFUSED else applied).append(f"{k}: {saved[k]!r} -> {new[k]!r}")
    if {"use_care", "beta"} <= saved.keys() and ref(saved) != ref(new):
        refused.append(f"reference model (use_care or beta > 0): {ref(saved)} -> {ref(new)}")
    return refused, applied


def check_resume(saved: dict, new: dict, ckpt: Path) -> list[str]:
    """Raises ConfigError listing the refused differences (with the reason); returns the applied ones."""
    refused, applied = compare_resume_config(saved, new)
    if refused:
        why = "; ".join(f"{r} ({RESUME_REFUSED[r.split(':')[0]]})" for r in refused)
        raise ConfigError(f"resuming {ckpt} with changed flags that would not apply: {why}. Resume with the "
                          "checkpoint's values, or start a new run in another --output_dir")
    return applied


MIN_JUDGED = 4  # samples before a step's or the run's skipped fraction is judged: one bad file of 1 is not a trend


def skip_verdict(step_skipped: int, step_seen: int, run_skipped: int, run_seen: int, max_frac: float,
                 last_step: bool = False) -> str | None:
    """Why the run must stop, or None: more than `max_frac` of the step's or of the run's samples are
    unreadable, each judged from MIN_JUDGED samples on; at the last step the run is judged whatever
    its size, so that no run ends "done" after losing its data."""
    if step_seen >= MIN_JUDGED and step_skipped > max_frac * step_seen:
        return f"{step_skipped} of this step's {step_seen} samples are unreadable (more than --max_skip_frac {max_frac})"
    if run_seen >= (1 if last_step else MIN_JUDGED) and run_skipped > max_frac * run_seen:
        return f"{run_skipped} of the run's {run_seen} samples are unreadable (more than --max_skip_frac {max_frac})"
    return None


@dataclass
class SkipLog:
    """The run's unreadable samples: totals, counts per reason, the first few files. Saved in every
    checkpoint's trainer_state.json, so a resumed run carries them on."""
    skipped: int = 0
    seen: int = 0
    reasons: dict = field(default_factory=dict)  # reason -> count
    first: list = field(default_factory=list)  # the first few "file: reason"

    def add(self, n_seen: int, failures: list[tuple]) -> None:
        self.seen += n_seen
        self.skipped += len(failures)
        for _, path, reason in failures:
            kind = reason.split(" (")[0]
            self.reasons[kind] = self.reasons.get(kind, 0) + 1
            if len(self.first) < 5:
                self.first.append(f"{path}: {reason}")

    def summary(self) -> str:
        if not self.skipped:
            return f"no sample skipped ({self.seen} read)"
        reasons = ", ".join(f"{n} {k}" for k, n in sorted(self.reasons.items(), key=lambda kv: -kv[1]))
        return f"skipped {self.skipped} of {self.seen} samples ({reasons}); first: " + "; ".join(self.first)


def gather_failures(failures: list[tuple], n_seen: int, device) -> tuple[int, list[tuple]]:
    """(samples seen, failures) of one step over all processes. A collective: every rank calls it."""
    import torch.distributed as dist

    counts = torch.tensor([n_seen, len(failures)], device=device)
    dist.all_reduce(counts)
    if dist.get_world_size() == 1 or counts[1].item() == 0:  # the object gather only when a rank skipped
        return int(counts[0]), list(failures)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, list(failures))
    return int(counts[0]), [f for fs in everyone for f in fs]


def check_skip_budget(skips: SkipLog, failures: list[tuple], n_seen: int, max_frac: float, last_step: bool,
                      device) -> None:
    """Adds one step's unreadable samples (all processes) to `skips`; raises RunAborted with the run's
    summary when the budget is spent. Every rank calls it and every rank decides alike."""
    n_seen, failures = gather_failures(failures, n_seen, device)
    skips.add(n_seen, failures)
    verdict = skip_verdict(len(failures), n_seen, skips.skipped, skips.seen, max_frac, last_step)
    if verdict:
        raise RunAborted(f"{verdict}; {skips.summary()}. Check --data_root (videos/, images/) and the files "
                         "named, then rerun (--resume_from_checkpoint latest keeps the steps done), or pass "
                         "--max_skip_frac 1 to train on the readable samples only")


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC anywhere in the exception chain; torch.save on a full disk says only "unexpected pos"."""
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        text = str(e)
        if "No space left on device" in text or "unexpected pos" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def disk_full_is_an_error(ckpt: Path):
    """Around a checkpoint save: a full disk becomes one clear RunAborted naming the checkpoint, and the
    half-written `<ckpt>.tmp` is removed (the previous checkpoint is whole: the save renames last)."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised unless the disk is full
        if not is_disk_full(e):
            raise
        shutil.rmtree(f"{ckpt}.tmp", ignore_errors=True)
        raise RunAborted(f"{ckpt}: no space left on device while saving (the earlier checkpoints are intact); "
                         "free space, then resume with --resume_from_checkpoint latest") from e


def run_cli(main) -> None:
    """`main()` as a command: a user error (a flag, a data file, lost samples, a full disk) is one line
    "error: ..." on stderr and exit status 2, without a traceback; a bug still raises with one."""
    from data import DataError

    try:
        main()
    except (ConfigError, DataError, RunAborted) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def sample_seed(seed: int, step: int, sample_id) -> int:
    """The generator seed of one prompt's G samples: a function of (run seed, step, sample id) only."""
    return random.Random(f"{seed}/{step}/{sample_id}").getrandbits(63)


# --- the training loop ---


def main(argv: list[str] | None = None):
    import torch.distributed as dist
    from tqdm import tqdm
    from transformers import AutoProcessor, get_cosine_schedule_with_warmup

    import rollout
    from data import Collator, check_media_dirs, load_examples, step_examples
    from rewards import (accuracy_reward, answer_confidence, bonus_selective, consistency_bonus, format_reward,
                         group_advantages, total_reward)

    cfg = parse_config(argv)
    device = setup_distributed().device
    rank, world = dist.get_rank(), dist.get_world_size()
    out = resolve_run(cfg, device)

    # --- before any model is loaded: every annotation row checked, the output dir and the resume point ---
    train_path = Path(cfg.data_root) / cfg.train_file
    examples = load_examples(train_path, cfg.data_root)  # a malformed row: DataError naming file:line, field
    check_media_dirs(examples, train_path)
    n_rows = len(examples)
    prompts_per_step = cfg.prompts_per_device * world
    steps_per_epoch = n_rows // prompts_per_step
    if steps_per_epoch == 0:
        raise ConfigError(f"--prompts_per_device {cfg.prompts_per_device} x {world} process(es) = {prompts_per_step} "
                          f"prompts per step, more than the {n_rows} rows of {train_path}")
    total_steps = steps_per_epoch * cfg.num_epochs
    if cfg.max_steps > 0:
        total_steps = min(total_steps, cfg.max_steps)
    ckpt = find_resume_checkpoint(out, cfg.resume_from_checkpoint) if cfg.resume_from_checkpoint else None
    saved = json.loads((ckpt / "trainer_state.json").read_text()) if ckpt else {}
    for change in check_resume(saved["config"], asdict(cfg), ckpt) if ckpt else []:
        rank0_print(f"resume: {change} (applies from step {saved['step'] + 1})")
    if saved.get("step", 0) > total_steps:
        raise ConfigError(f"--resume_from_checkpoint {ckpt} is at step {saved['step']}, past this run's {total_steps} steps")
    stale = check_output_dir(out, ckpt is not None, cfg.overwrite_output_dir)
    if stale and rank == 0:
        remove_run(stale)
        rank0_print(f"--overwrite_output_dir: deleted the previous run in {out} ({len(stale)} entries)")
    dist.barrier()

    # --- models: policy, and the EMA reference (CARE) or a frozen one (beta > 0) ---
    processor = AutoProcessor.from_pretrained(cfg.model_path)
    tokenizer = processor.tokenizer
    policy = load_model(cfg.model_path, cfg, device, trainable=True)
    ref = load_model(cfg.model_path, cfg, device, trainable=False) if (cfg.use_care or cfg.beta > 0) else None
    if ref is not None:
        ref.eval()

    # --- data: a fixed order per epoch; step s takes prompts [s*B, (s+1)*B) of it, this rank every world-th ---
    vision = cfg.vision_spec()
    collate = Collator(processor, vision)

    prompts_for = step_examples(  # options reshuffled per epoch, order seeded per epoch
        lambda epoch: load_examples(train_path, cfg.data_root, cfg.seed, epoch, cfg.shuffle_options),
        cfg.seed, prompts_per_step, steps_per_epoch, rank, world)

    # --- optimizer, schedule, resume ---
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    start = 0
    if ckpt is not None:
        start = load_checkpoint(ckpt, policy, ref, optimizer, scheduler)
        rank0_print(f"resumed from {ckpt} at step {start}")
    metrics_file, completions_file = out / "metrics.jsonl", out / "completions.jsonl"
    if rank == 0:  # a resumed run rewrites the lines of the steps it will redo (a new run has no file)
        for f in (metrics_file, completions_file):
            truncate_history(f, start)
    writer = None
    if cfg.report_to == "tensorboard" and rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(out / "tensorboard")
    rank0_print(f"GRPO-CARE: {total_steps} steps, {world} process(es) x {cfg.prompts_per_device} prompt(s) x "
                f"G={cfg.num_generations}, care={cfg.use_care}, device={device}")
    bar = tqdm(range(start, total_steps), initial=start, total=total_steps, disable=rank != 0, desc="grpo-care")
    counters = saved.get("counters", {})  # carried through resume, like the weights
    skips, nonfinite_steps = SkipLog(**counters.get("skips", {})), counters.get("nonfinite_steps", 0)

    for step in bar:
        # --- rollouts: G samples per prompt, vision encoded once per prompt ---
        t0 = time.perf_counter()
        policy.eval()
        fail_mark = len(collate.failures)
        batches = [(ex, batch) for ex in prompts_for(step) for batch, _ in [collate([ex])] if batch is not None]
        check_skip_budget(skips, collate.failures[fail_mark:], len(prompts_for(step)), cfg.max_skip_frac,
                          step + 1 == total_steps, device)
        # FSDP2 needs every rank to run the same passes: after unreadable samples were skipped, all ranks
        # take as many prompts as the rank with the fewest (a step may thus train on fewer prompts)
        n_common = torch.tensor(len(batches), device=device)
        dist.all_reduce(n_common, op=dist.ReduceOp.MIN)
        kept = [(ex, batch.to(device)) for ex, batch in batches[:int(n_common)]]
        with torch.no_grad():  # one generate call for all of this process's prompts, each from its own seed
            ros = rollout.generate_groups(policy, [batch for _, batch in kept], cfg.num_generations, tokenizer,
                                          max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                          top_p=cfg.top_p, seeds=[sample_seed(cfg.seed, step, ex["id"]) for ex, _ in kept])
        groups = []  # (example, batch, rollout) per prompt
        for (ex, batch), ro in zip(kept, ros):
            ro.completion_mask = ro.completion_mask.to(device)
            groups.append((ex, batch, ro))
        t_gen = time.perf_counter() - t0

        # --- rewards: accuracy + format, then CARE's bonus from the EMA reference ---
        t0 = time.perf_counter()
        stats, completions = [], []
        for ex, batch, ro in groups:
            G = cfg.num_generations
            acc_r = torch.tensor(accuracy_reward(ro.texts, [ex["solution"]] * G, [ex["problem_type"]] * G)).view(1, G)  # (1, G)
            fmt_r = torch.tensor(format_reward(ro.texts)).view(1, G)  # (1, G)
            ro.ref_logps, conf, bonus = None, torch.zeros(1, G), None
            if ref is not None:
                with torch.no_grad():
                    ref_mm = rollout.encode_vision(ref, batch)  # the reference's own weights: its own encoding
                    ro.ref_logps = rollout.completion_logprobs(ref, ro, ref_mm, chunk_size=cfg.logprob_chunk)  # (G, T)
                ro.vision_calls += bool(ref_mm)
            if cfg.use_care:
                span = rollout.answer_span_mask(ro.completion_ids, tokenizer, ro.completion_mask)  # (G, T)
                conf = answer_confidence(ro.ref_logps.float().cpu(), span.cpu(), cfg.confidence_upper_bound).view(1, G)
                bonus = consistency_bonus(acc_r, conf, cfg.bonus_coefficient, cfg.consistency_margin)  # (1, G)
            rewards = total_reward(acc_r, fmt_r, bonus)  # (1, G)
            ro.advantages = group_advantages(rewards).view(G).to(device)  # (G,)
            stats.append(dict(acc=acc_r, fmt=fmt_r, reward=rewards, conf=conf,
                              bonus=bonus if bonus is not None else torch.zeros(1, G)))
            if cfg.log_completions:
                completions += completion_records(step + 1, ex["id"], ro.texts, acc_r, fmt_r,
                                                  conf if cfg.use_care else None, bonus, rewards, ro.advantages)
        t_ref = time.perf_counter() - t0

        # --- update: mu clipped steps on this rollout; gradients accumulate over the prompts ---
        t0 = time.perf_counter()
        policy.train()
        if cfg.num_iterations > 1:  # the old policy's log-probs, with the generation's vision features
            for _, _, ro in groups:
                with torch.no_grad():
                    ro.old_logps = rollout.completion_logprobs(policy, ro, ro.mm, chunk_size=cfg.logprob_chunk)
        loss_sum = clip_sum = 0.0
        grad_norm = torch.tensor(0.0)
        n_groups = max(len(groups), 1)
        for _ in range(cfg.num_iterations):
            for ex, batch, ro in groups:
                mm = rollout.encode_vision(policy, batch)  # once per prompt per iteration, with gradient
                ro.vision_calls += bool(mm)
                logps = rollout.completion_logprobs(policy, ro, mm, chunk_size=cfg.logprob_chunk)  # (G, T)
                old = logps.detach() if cfg.num_iterations == 1 else ro.old_logps
                loss, st = policy_loss(logps, old, ro.advantages, ro.completion_mask, cfg.clip_eps,
                                       ro.ref_logps if cfg.beta > 0 else None, cfg.beta)
                (loss / n_groups).backward()  # each process: mean over its prompts; FSDP averages processes
                loss_sum += loss.item() / n_groups / cfg.num_iterations
                clip_sum += st["clip_frac"].item() / n_groups / cfg.num_iterations
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            if torch.isfinite(grad_norm) and math.isfinite(loss_sum):
                optimizer.step()
            else:  # every rank sees the same all-reduced norm, so all skip together
                nonfinite_steps += 1
                rank0_print(f"step {step + 1}: non-finite loss or gradient norm ({grad_norm.item()}), update skipped")
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if ref is not None and cfg.use_care and (step + 1) % cfg.ref_ema_every == 0:
            ema_update_(ref.parameters(), policy.parameters(), cfg.ref_ema_decay)
        t_upd = time.perf_counter() - t0

        # --- log: sums over all processes, one metrics.jsonl line per step ---
        G = cfg.num_generations
        cat = {k: torch.cat([s[k] for s in stats]) if stats else torch.zeros(0, G) for k in
               ("acc", "fmt", "reward", "conf", "bonus")}  # each (B_local, G)
        selective, eligible = bonus_selective(cat["acc"], cat["bonus"])  # (B_local,) each
        lens = torch.stack([ro.completion_mask.sum(-1).float().cpu() for *_, ro in groups]) if groups else torch.zeros(0, G)
        trunc = torch.stack([ro.truncated.float().cpu() for *_, ro in groups]) if groups else torch.zeros(0, G)
        sums = torch.tensor([
            cat["reward"].numel(), cat["reward"].sum(), (cat["reward"] ** 2).sum(), cat["acc"].sum(), cat["fmt"].sum(),
            cat["bonus"].sum(), (cat["bonus"] > 0).sum(), cat["conf"].sum(), len(groups),
            (cat["acc"] >= 1).all(-1).sum(), (cat["acc"] <= 0).all(-1).sum(), lens.sum(), trunc.sum(),
            clip_sum * len(groups), sum(ro.vision_calls for *_, ro in groups), len(collate.failures) - fail_mark,
            t_gen, t_ref, t_upd, loss_sum * len(groups), selective.sum(), eligible.sum()],
            dtype=torch.float64, device=device)
        maxlen = torch.tensor([lens.max().item() if lens.numel() else 0.0], device=device)
        dist.all_reduce(sums)
        dist.all_reduce(maxlen, op=dist.ReduceOp.MAX)
        (n, r, r2, a, f, b, nb, c, ng, allc, allw, ln, tr, cl, vc, sk, tg, tf, tu, ls, sel, elig) = sums.tolist()
        n, ng = max(n, 1), max(ng, 1)
        m = dict(step=step + 1, reward_mean=r / n, reward_std=math.sqrt(max(r2 / n - (r / n) ** 2, 0.0)),
                 accuracy=a / n, format=f / n, bonus_mean=b / n, bonus_frac=nb / n, confidence=c / n,
                 bonus_selective_frac=sel / max(elig, 1),
                 all_correct_frac=allc / ng, all_wrong_frac=allw / ng, completion_len_mean=ln / n,
                 completion_len_max=maxlen.item(), truncated_frac=tr / n, clip_frac=cl / ng, loss=ls / ng,
                 grad_norm=grad_norm.item(), lr=scheduler.get_last_lr()[0],
                 t_generation=tg / world, t_reference=tf / world, t_update=tu / world,
                 gen_tokens_per_s=ln / max(tg / world, 1e-9), vision_calls=vc, skipped=sk,
                 skipped_total=skips.skipped, nonfinite_steps=nonfinite_steps)
        gathered = [None] * world if rank == 0 else None
        if cfg.log_completions:
            dist.gather_object(completions, gathered, dst=0)
        if rank == 0:
            with open(metrics_file, "a") as fh:
                fh.write(json.dumps(m) + "\n")
            if cfg.log_completions:
                with open(completions_file, "a") as fh:
                    fh.writelines(json.dumps(c) + "\n" for per_rank in gathered for c in per_rank)
            if writer is not None:
                for k, v in m.items():
                    writer.add_scalar(k, v, step + 1)
            bar.set_postfix(reward=f"{m['reward_mean']:.2f}", acc=f"{m['accuracy']:.2f}", bonus=f"{m['bonus_mean']:.2f}")

        # --- checkpoint ---
        if (step + 1) % cfg.save_steps == 0 or step + 1 == total_steps:
            with disk_full_is_an_error(out / f"checkpoint-{step + 1}"):
                save_checkpoint(out, step + 1, policy, ref, optimizer, scheduler, processor, cfg,
                                counters=dict(skips=asdict(skips), nonfinite_steps=nonfinite_steps))

    rank0_print(skips.summary())
    if rank == 0 and metrics_file.exists() and metrics_file.stat().st_size:
        plot_metrics(metrics_file, out / "curves.png")
        rank0_print(f"done: {out}/checkpoint-{total_steps}, metrics in {metrics_file}, curves in {out}/curves.png")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
