"""The machinery around the loops of grpo_care.py and sft.py: their config base and flag checks, distributed
set-up and FSDP2 loading, the run directory, the skip budget, checkpoints, logs and curves. A library: the
same calls run for 1 process and N (`python grpo_care.py`, `accelerate launch grpo_care.py`, `torchrun`).

* One code path: models are always wrapped with FSDP2 `fully_shard` (per vision block, the vision tower, per
  decoder layer, the root), also for one process: bf16 compute over fp32 master weights on GPU, gloo on CPU
  (the reference runs DeepSpeed ZeRO-3 through TRL). Only rank 0 reads a checkpoint; the others receive
  their shards by broadcast, so a node holds one fp32 copy in host memory, not one per process.
* Before any model is loaded a run checks its flags (each error names the flag and its range), its output
  dir (a used one is refused unless resuming or `--overwrite_output_dir true`) and, on resume, the saved
  config. Unreadable samples count against `--max_skip_frac`, through resume. As a command (`run_cli`),
  such user errors print one line and exit 2.
* A checkpoint is written under a temporary name, renamed when complete: the policy as `save_pretrained`,
  the training state (optimizer, EMA reference, schedule, every rank's RNG) by torch.distributed.checkpoint.
"""
from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import math
import os
import random
import re
import shutil
import sys
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, GenerationConfig, HfArgumentParser, Qwen2_5_VLForConditionalGeneration

import toy
from data import DataError, VisionSpec

# --- the config base and its checks ---


class ConfigError(ValueError):
    """A flag is unknown, out of range, or would silently not apply on resume; the message names the flag."""


class RunAborted(RuntimeError):
    """The run stopped on purpose (too many unreadable samples, a full disk); the message says why and what next."""

def parse_flags(cls, argv: list[str]):
    """`cls` from `argv` by HfArgumentParser, with no flag abbreviations: `--num_generation 4` is an error."""
    cfg, rest = HfArgumentParser(cls, allow_abbrev=False).parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True)
    if rest:
        raise ConfigError(f"unknown flag(s) {' '.join(rest)} (flags are not abbreviated; see --help)")
    return cfg


@dataclass
class RunConfig:
    """The fields that mean the same in grpo_care.Config and sft.SFTConfig (each overrides a default or two)."""
    # model and data (leave model_path empty for the built-in toy world)
    model_path: str | None = field(default=None, metadata={"help": "save_pretrained dir or hub id; empty = toy world"})
    data_root: str | None = field(default=None, metadata={"help": "SEED-Bench-R1 root (annotations/, videos/, images/)"})
    train_file: str = field(default="annotations/training_6k.jsonl", metadata={"help": "relative to data_root"})
    output_dir: str = field(default="outputs/grpo_care", metadata={"help": "checkpoints or model, metrics.jsonl"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "start over in a used output_dir (deletes its run)"})
    toy_dir: str = field(default=".cache/toy", metadata={"help": "where the toy world is built when model_path is empty"})
    toy: bool | None = field(default=None, metadata={"help": "toy-sized settings (toy.py); default: when model_path is empty"})
    seed: int = field(default=42, metadata={"help": "seeds data order, option shuffles (and GRPO's sampling)"})
    shuffle_options: bool = field(default=True, metadata={"help": "shuffle training options (false: alphabetical)"})
    prompts_per_device: int = field(default=1, metadata={"help": "prompts per process per step"})
    num_epochs: int = field(default=1, metadata={"help": "passes over the training file"})
    max_steps: int = field(default=-1, metadata={"help": "stop after this many steps (-1: the epochs decide)"})
    # the optimizer
    learning_rate: float = field(default=1e-6, metadata={"help": "peak learning rate, cosine decay to 0"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "linear warm-up fraction of the steps"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=5.0, metadata={"help": "gradient clipping"})
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

    def vision_spec(self) -> VisionSpec:
        return VisionSpec(**{f.name: getattr(self, f.name) for f in fields(VisionSpec)})


def between(lo, hi, lo_open=False, hi_open=False):
    """A (text, test) rule for a number in [lo, hi], ends open as told; NaN always fails."""
    text = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    return text, lambda v: (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)


INT_GE = lambda n: (f"an integer >= {n}", lambda v: v >= n)  # noqa: E731
POSITIVE = ("> 0", lambda v: 0 < v < math.inf)
NONNEG = (">= 0", lambda v: 0 <= v < math.inf)
RUN_RULES = {  # flag -> (allowed values, test): the fields of RunConfig
    "video_fps": POSITIVE, "video_min_frames": INT_GE(1), "video_max_frames": INT_GE(1),
    "video_max_pixels": INT_GE(1), "video_min_pixels": INT_GE(1), "image_max_pixels": INT_GE(1),
    "image_min_pixels": INT_GE(1),
    "attn_implementation": ("None, eager, sdpa or flash_attention_2",
                            lambda v: v in (None, "eager", "sdpa", "flash_attention_2")),
    "prompts_per_device": INT_GE(1), "num_epochs": INT_GE(1),
    "max_steps": ("-1 or an integer >= 1", lambda v: v == -1 or v >= 1), "learning_rate": NONNEG,
    "warmup_ratio": between(0, 1), "weight_decay": NONNEG, "max_grad_norm": POSITIVE,
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


def parse_run_config(cls, argv: list[str], toy_defaults: dict, rules: dict):
    """`cls` from `argv`; with --toy (the default without --model_path) `toy_defaults` and toy.TOY_VISION fill
    every field not given; then every flag checked against `rules`."""
    cfg = parse_flags(cls, argv)
    if cfg.toy is None:
        cfg.toy = not cfg.model_path
    if cfg.toy:
        given = {a.lstrip("-").split("=")[0] for a in argv if a.startswith("--")}
        for k, v in {**toy_defaults, **toy.TOY_VISION}.items():
            if k not in given:
                setattr(cfg, k, v)
    validate_config(cfg, rules)
    return cfg


# --- distributed set-up (the same lines for 1 process and N, GPU or CPU) ---


def setup_distributed():
    """Accelerate sets up device and process group; a lone process gets a 1-rank group so that
    FSDP2 wraps it like any other (one code path)."""
    acc = Accelerator(cpu=not torch.cuda.is_available())  # cpu=True: gloo group under a multi-process launch
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return acc


def resolve_run(cfg, device) -> Path:
    """Fills the device-dependent defaults of `cfg` (also sft.py's config) and, with no model_path,
    builds the toy world (rank 0 builds, the others wait); seeds torch; returns the output dir."""
    on_gpu = device.type == "cuda"
    cfg.bf16 = on_gpu if cfg.bf16 is None else cfg.bf16
    cfg.gradient_checkpointing = on_gpu if cfg.gradient_checkpointing is None else cfg.gradient_checkpointing
    if cfg.attn_implementation is None:
        cfg.attn_implementation = "flash_attention_2" if on_gpu and importlib.util.find_spec("flash_attn") else "sdpa"
    if not cfg.model_path:
        if dist.get_rank() == 0:
            toy.build(cfg.toy_dir)
        dist.barrier()
        cfg.model_path, cfg.data_root = str(Path(cfg.toy_dir) / "model"), str(Path(cfg.toy_dir) / "data")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    return out


def plan_steps(n_rows: int, prompts_per_device: int, world: int, num_epochs: int, max_steps: int,
               path: Path) -> tuple[int, int]:
    """(steps per epoch, steps of the run): the run ends after `num_epochs` or at `max_steps` (> 0) if sooner."""
    per_step = prompts_per_device * world
    steps_per_epoch = n_rows // per_step
    if steps_per_epoch == 0:
        raise ConfigError(f"--prompts_per_device {prompts_per_device} x {world} process(es) = {per_step} rows per "
                          f"step, more than the {n_rows} usable rows of {path}")
    total = steps_per_epoch * num_epochs
    return steps_per_epoch, min(total, max_steps) if max_steps > 0 else total


def load_model(path, cfg: RunConfig, device, trainable: bool):
    """A Qwen2.5-VL in fp32 (master weights), sharded with FSDP2; compute in bf16 when cfg.bf16.

    Rank 0 alone reads the checkpoint; the other ranks build the model on the meta device and
    receive their shards from rank 0, so host memory holds one fp32 copy (30 GB for 7B), not one
    per process (8 x 2 models x 30 GB on an 8-GPU node)."""
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


def optimizer_step(policy, optimizer, max_grad_norm: float, loss: float) -> tuple[float, bool]:
    """Clips the gradient and steps AdamW unless the loss or the (all-reduced) norm is not finite, the same
    verdict on every rank; returns (grad norm, stepped)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
    grad_norm = (grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm).item()
    stepped = math.isfinite(grad_norm) and math.isfinite(loss)
    if stepped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, stepped


def rank0_print(*args):
    if dist.get_rank() == 0:
        print(*args, flush=True)


# --- checkpoints (policy as save_pretrained, training state via torch.distributed.checkpoint) and logs ---


def save_checkpoint(out: Path, step: int, policy, ref, optimizer, scheduler, processor, cfg: RunConfig,
                    counters: dict | None = None) -> Path:
    """Writes `checkpoint-<step>` under a temporary name and renames it when complete. `counters`
    (the run's skipped samples, non-finite steps) go into trainer_state.json for a resumed run."""
    final, tmp = out / f"checkpoint-{step}", out / f"checkpoint-{step}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    dcp.save(_train_state(policy, ref, optimizer), checkpoint_id=tmp / "train_state")
    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               tmp / f"rng_state_{rank}.pt")  # dcp.save made tmp/ and ended with a barrier
    if rank == 0:
        policy.save_pretrained(tmp, state_dict=full)  # loadable by plain transformers
        processor.save_pretrained(tmp)
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        state = {"step": step, "config": asdict(cfg), "counters": counters or {}}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # atomic: a crash before this line leaves the previous checkpoint whole
    dist.barrier()
    return final


def _train_state(policy, ref, optimizer) -> dict:  # sharded: each rank saves and loads its own shards
    model_sd, optim_sd = get_state_dict(policy, optimizer)
    return {"model": model_sd, "optim": optim_sd, **({"ref": get_model_state_dict(ref)} if ref is not None else {})}


def load_checkpoint(path: Path, policy, ref, optimizer, scheduler) -> int:
    """Restores a save_checkpoint: weights, optimizer, EMA reference, schedule and this rank's RNG; returns the step."""
    state = _train_state(policy, ref, optimizer)
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
    step = json.loads((path / "trainer_state.json").read_text())["step"]
    rank0_print(f"resumed from {path} at step {step}")
    return step


def all_reduce_named(values: dict[str, float], device, op=dist.ReduceOp.SUM) -> dict[str, float]:
    """`values` reduced over all processes (summed, or `op`) in one float64 all-reduce; the same names back."""
    t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return dict(zip(values, t.tolist()))


def tensorboard_writer(out: Path, wanted: bool):
    """Rank 0's SummaryWriter in out/tensorboard when `wanted` (--report_to tensorboard), else None."""
    if not wanted or dist.get_rank() != 0:
        return None
    from torch.utils.tensorboard import SummaryWriter  # optional: only with --report_to tensorboard

    return SummaryWriter(out / "tensorboard")


def write_logs(out: Path, metrics: dict, completions: list[dict] | None, writer=None) -> None:
    """Appends the step's metrics.jsonl line and its completions.jsonl lines, gathered from every rank to
    rank 0 (None: no completions.jsonl); tensorboard scalars when `writer`. A collective: every rank calls it."""
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    if completions is not None:
        dist.gather_object(completions, gathered, dst=0)
    if dist.get_rank() != 0:
        return
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps(metrics) + "\n")
    if completions is not None:
        with open(out / "completions.jsonl", "a") as fh:
            fh.writelines(json.dumps(c) + "\n" for per_rank in gathered for c in per_rank)
    for k, v in metrics.items() if writer is not None else ():
        writer.add_scalar(k, v, metrics["step"])


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
    """The checkpoint `resume` names, or for "latest" the complete checkpoint-N of `out` with the highest N."""
    done = [p for p in out.glob("checkpoint-*") if not p.name.endswith(".tmp") and (p / "trainer_state.json").exists()]
    ckpt = max(done, key=lambda p: int(p.name.split("-")[1]), default=None) if resume == "latest" else Path(resume)
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


def open_run_dir(out: Path, cfg, total_steps: int, files=RUN_FILES) -> tuple[Path | None, dict]:
    """(checkpoint to resume from or None, its trainer_state.json). Refuses a resume whose changed flags would
    not apply or that is past the run's end, and a used `out` unless resuming or --overwrite_output_dir (then
    rank 0 deletes the old run's `files` and checkpoints). A collective: every rank calls it."""
    resume = getattr(cfg, "resume_from_checkpoint", None)
    ckpt = find_resume_checkpoint(out, resume) if resume else None
    saved = json.loads((ckpt / "trainer_state.json").read_text()) if ckpt else {}
    for change in check_resume(saved["config"], asdict(cfg), ckpt) if ckpt else []:
        rank0_print(f"resume: {change} (applies from step {saved['step'] + 1})")
    if saved.get("step", 0) > total_steps:
        raise ConfigError(f"--resume_from_checkpoint {ckpt} is at step {saved['step']}, past this run's "
                          f"{total_steps} steps")
    stale = check_output_dir(out, ckpt is not None, cfg.overwrite_output_dir, files)
    if stale and dist.get_rank() == 0:
        for p in stale:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        rank0_print(f"--overwrite_output_dir: deleted the previous run in {out} ({len(stale)} entries)")
    for f in ("metrics.jsonl", "completions.jsonl") if ckpt and dist.get_rank() == 0 else ():
        truncate_history(out / f, saved["step"])  # a resumed run rewrites the lines of the steps it redoes
    dist.barrier()
    return ckpt, saved


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


def readable_prompts(examples: list[dict], collate, skips: SkipLog, max_skip_frac: float, last_step: bool,
                     device) -> tuple[list[dict], list[dict], int]:
    """(readable examples, their batches on `device`, the number unreadable here), each prompt collated alone.
    A collective: the step's unreadable samples of all processes go into `skips`, and RunAborted (with the run's
    summary) is raised on every rank alike when the budget is spent. FSDP2 needs every rank to run the same
    passes, so all keep as many prompts as the rank with the fewest (a step may train on fewer prompts)."""
    n_failed = len(collate.failures)
    batches = [(ex, batch) for ex in examples for batch, _ in [collate([ex])] if batch is not None]
    failures = collate.failures[n_failed:]
    counts = torch.tensor([len(examples), len(failures)], device=device)  # summed: samples seen, unreadable
    dist.all_reduce(counts)
    if dist.get_world_size() > 1 and counts[1].item() > 0:  # the object gather only when a rank skipped
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, list(failures))
        failures = [f for fs in everyone for f in fs]
    skips.add(int(counts[0]), failures)
    verdict = skip_verdict(len(failures), int(counts[0]), skips.skipped, skips.seen, max_skip_frac, last_step)
    if verdict:
        raise RunAborted(f"{verdict}; {skips.summary()}. Check --data_root (videos/, images/) and the files "
                         "named, then rerun (--resume_from_checkpoint latest keeps the steps done), or pass "
                         "--max_skip_frac 1 to train on the readable samples only")
    n_common = torch.tensor(len(batches), device=device)
    dist.all_reduce(n_common, op=dist.ReduceOp.MIN)
    batches = batches[:int(n_common)]
    return [ex for ex, _ in batches], [batch.to(device) for _, batch in batches], len(collate.failures) - n_failed


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
    try:
        main()
    except (ConfigError, DataError, RunAborted) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)

