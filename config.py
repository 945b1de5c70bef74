"""The run's settings: the config base shared by grpo_care.py and sft.py, each setting declared once (default,
--help and allowed range together), the toy's overrides, and the one-line errors of a command.

    python grpo_care.py --help      # every setting, with its range
    python sft.py --help

A setting is `setting(default, help, allowed)`; `validate_config` checks every field that declares a range
before any model is loaded, and `run_cli` turns a user error into `error: ...` and exit status 2. Without
--model_path the toy world is used and the toy's sizes (toy.RL_DEFAULTS, toy.SFT_DEFAULTS) fill the flags not
given; start-up prints which.
"""
from __future__ import annotations

import copy
import errno
import importlib.util
import math
import os
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch.distributed as dist
import transformers
from packaging.version import Version
from transformers import AutoConfig, HfArgumentParser

import toy
from data import PROMPT_TEMPLATES, DataError, VisionSpec
from distributed import model_class, rank0_print


class ConfigError(ValueError):
    """A flag is unknown, out of range, or would silently not apply on resume; the message names the flag."""


class RunAborted(RuntimeError):
    """The run stopped on purpose (too many unreadable samples, a full disk); the message says why and what next."""


# --- allowed ranges: (text for the error and --help, test) ---
def between(lo, hi, lo_open=False, hi_open=False):
    """A number in [lo, hi], ends open as told; NaN always fails."""
    text = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    return text, lambda v: (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)


def int_ge(n):
    return f"an integer >= {n}", lambda v: v >= n


POSITIVE = ("> 0", lambda v: 0 < v < math.inf)
NONNEG = (">= 0", lambda v: 0 <= v < math.inf)


def setting(default, help: str, allowed: tuple | None = None):
    """A config field: its default, its --help and, when given, its allowed range (text, test)."""
    return field(default=default, metadata={"help": help if allowed is None else f"{help} ({allowed[0]})",
                                            "allowed": allowed})


def redefault(base, name: str, default):
    """Field `name` of dataclass `base` with another default; its help and range stay the base's."""
    return field(default=default, metadata={f.name: f for f in fields(base)}[name].metadata)


@dataclass
class RunConfig:
    """The settings that mean the same in grpo_care.Config and sft.SFTConfig (each overrides a default or two)."""
    # model and data (leave model_path empty for the built-in toy world)
    model_path: str | None = setting(None, "save_pretrained dir or hub id; empty = toy world")
    data_root: str | None = setting(None, "SEED-Bench-R1 root (annotations/, videos/, images/)")
    train_file: str = setting("annotations/training_6k.jsonl", "relative to data_root")
    output_dir: str = setting("outputs/grpo_care", "checkpoints or model, metrics.jsonl")
    overwrite_output_dir: bool = setting(False, "start over in a used output_dir (deletes its run)")
    toy_dir: str = setting(".cache/toy", "where the toy world is built when model_path is empty")
    toy: bool | None = setting(None, "toy-sized settings (toy.py); default: when model_path is empty")
    seed: int = setting(42, "seeds data order, option shuffles (and GRPO's sampling)")
    shuffle_options: bool = setting(True, "shuffle training options (false: alphabetical)")
    prompt_template: str = setting("care", "care: the reference's think prompt; v1: SEED-Bench-R1's own study's "
                                   "shorter one (SEED-Bench-R1 rows only)",
                                   ("care or v1", lambda v: v in PROMPT_TEMPLATES))
    max_prompt_length: int = setting(16384, "prompt tokens at most, media included (the reference's); a longer "
                                     "row is refused at load, or skipped once its media are read", int_ge(1))
    prompts_per_device: int = setting(1, "prompts per process per step", int_ge(1))
    num_epochs: int = setting(1, "passes over the training file", int_ge(1))
    max_steps: int = setting(-1, "stop after this many steps (-1: the epochs decide)",
                             ("-1 or an integer >= 1", lambda v: v == -1 or v >= 1))
    # the optimizer
    learning_rate: float = setting(1e-6, "peak learning rate, cosine decay to 0", NONNEG)
    warmup_ratio: float = setting(0.0, "linear warm-up fraction of the steps", between(0, 1))
    weight_decay: float = setting(0.01, "AdamW weight decay", NONNEG)
    max_grad_norm: float = setting(5.0, "gradient clipping", POSITIVE)
    max_nonfinite_streak: int = setting(2, "abort past this many updates in a row skipped as non-finite", int_ge(0))
    max_nonfinite_frac: float = setting(0.1, "abort past this fraction of the last 50 updates skipped as non-finite "
                                        "(1: never)", between(0, 1))
    # media (qwen-vl-utils)
    video_fps: float = setting(2.0, "frames sampled per second", POSITIVE)
    video_min_frames: int = setting(4, "fewest frames per video", int_ge(1))
    video_max_frames: int = setting(16, "most frames per video", int_ge(1))
    video_max_pixels: int = setting(128 * 28 * 28, "pixels per video frame (max)", int_ge(1))
    video_min_pixels: int = setting(128 * 28 * 28, "pixels per video frame (min)", int_ge(1))
    image_max_pixels: int = setting(256 * 28 * 28, "pixels per image (max)", int_ge(1))
    image_min_pixels: int = setting(4 * 28 * 28, "pixels per image (min)", int_ge(1))
    media_size: int | None = setting(None, "resize every image and frame to SIZE x SIZE, rounded to 28 (SEED-Bench-R1 "
                                     "v1: 256 -> 252); default: by the pixel bounds above",
                                     ("None or an integer >= 28", lambda v: v is None or v >= 28))
    # system
    bf16: bool | None = setting(None, "bf16 compute over fp32 weights; default: on GPU")
    gradient_checkpointing: bool | None = setting(None, "default: on GPU")
    attn_implementation: str | None = setting(
        None, "default: flash_attention_2 if installed, else sdpa",
        ("None, eager, sdpa or flash_attention_2", lambda v: v in (None, "eager", "sdpa", "flash_attention_2")))

    def vision_spec(self) -> VisionSpec:
        return VisionSpec(**{f.name: getattr(self, f.name) for f in fields(VisionSpec)})


MIN_TRANSFORMERS = "5.23.0"  # rollout.py hands the model precomputed vision features (mm_encoder_outputs)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def validate_config(cfg) -> None:
    """Raises ConfigError "--flag value: must be <allowed>" for the first setting out of its range, and for paths
    and combinations that cannot work. Runs before any model is loaded."""
    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):  # an older one computes wrong log-probs
        raise ConfigError(f"transformers {transformers.__version__}: {MIN_TRANSFORMERS} or later is needed "
                          "(requirements.txt); 5.17.0 ignores the precomputed vision features without an error, so "
                          "the log-probs would be computed without the video (BENCHMARKS.md section 2)")
    for f in fields(cfg):
        allowed = f.metadata.get("allowed")
        if allowed and not allowed[1](getattr(cfg, f.name)):
            raise ConfigError(f"--{f.name} {getattr(cfg, f.name)!r}: must be {allowed[0]}")
    for kind in ("video", "image"):
        lo, hi = getattr(cfg, f"{kind}_min_pixels"), getattr(cfg, f"{kind}_max_pixels")
        if lo > hi:
            raise ConfigError(f"--{kind}_min_pixels {lo} must be <= --{kind}_max_pixels {hi}")
    if cfg.video_min_frames > cfg.video_max_frames:
        raise ConfigError(f"--video_min_frames {cfg.video_min_frames} must be <= --video_max_frames {cfg.video_max_frames}")
    if cfg.model_path:
        if not os.path.isdir(cfg.model_path) and not HUB_ID.fullmatch(cfg.model_path):
            raise ConfigError(f"--model_path {cfg.model_path}: no such directory (nor a hub id 'org/name')")
        if not cfg.data_root:
            raise ConfigError("--data_root is required with --model_path (the SEED-Bench-R1 directory)")
    if cfg.data_root and not os.path.isdir(cfg.data_root):
        raise ConfigError(f"--data_root {cfg.data_root}: no such directory")
    if cfg.model_path and os.path.isdir(cfg.model_path):  # a hub id's config is read when the model loads
        try:
            model_class(AutoConfig.from_pretrained(cfg.model_path))  # config.json only: no weights
        except (ValueError, OSError) as e:
            raise ConfigError(f"--model_path {cfg.model_path}: {e}") from None
    if getattr(cfg, "resume_from_checkpoint", None) and getattr(cfg, "overwrite_output_dir", False):
        raise ConfigError("--resume_from_checkpoint continues the run in --output_dir, --overwrite_output_dir true "
                          "deletes it: pass one of the two")


class _Parser(HfArgumentParser):
    @staticmethod
    def _parse_dataclass_field(parser, field):  # argparse takes no "allowed": validate_config checks it
        field = copy.copy(field)
        field.metadata = {k: v for k, v in field.metadata.items() if k != "allowed"}
        HfArgumentParser._parse_dataclass_field(parser, field)


def parse_run_config(cls, argv: list[str], toy_defaults: dict):
    """`cls` from `argv` by HfArgumentParser (no abbreviations: `--num_generation 4` is an error); with --toy (the
    default without --model_path) `toy_defaults` and toy.TOY_VISION fill every field not given, and say so; then
    every setting is checked."""
    cfg, rest = _Parser(cls, allow_abbrev=False).parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True)
    if rest:
        raise ConfigError(f"unknown flag(s) {' '.join(rest)} (flags are not abbreviated; see --help)")
    if cfg.toy is None:
        cfg.toy = not cfg.model_path
    if cfg.toy:
        given = {a.lstrip("-").split("=")[0] for a in argv if a.startswith("--")}
        applied = {k: v for k, v in {**toy_defaults, **toy.TOY_VISION}.items() if k not in given}
        for k, v in applied.items():
            setattr(cfg, k, v)
        rank0_print("toy settings (--toy true; flags given win): " + ", ".join(f"{k}={v}" for k, v in applied.items()))
    validate_config(cfg)
    return cfg


def set_device_defaults(cfg, device) -> None:
    """bf16, gradient checkpointing and the attention kernel, where the flags left them unset: on a GPU, bf16
    compute, checkpointing and flash-attention when installed; on a CPU, fp32 and sdpa."""
    on_gpu = device.type == "cuda"
    cfg.bf16 = on_gpu if cfg.bf16 is None else cfg.bf16
    cfg.gradient_checkpointing = on_gpu if cfg.gradient_checkpointing is None else cfg.gradient_checkpointing
    if cfg.attn_implementation is None:
        cfg.attn_implementation = "flash_attention_2" if on_gpu and importlib.util.find_spec("flash_attn") else "sdpa"


def use_toy_world(cfg) -> None:
    """Builds the toy world in cfg.toy_dir (rank 0; cached) and points model_path and data_root at it."""
    if dist.get_rank() == 0:
        toy.build(cfg.toy_dir)
    dist.barrier()
    cfg.model_path, cfg.data_root = str(Path(cfg.toy_dir) / "model"), str(Path(cfg.toy_dir) / "data")


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


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC (or a quota) anywhere in the exception chain, or in a CheckpointException's per-rank failures;
    torch.save on a full disk says only "unexpected pos"."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(is_disk_full(exc) for exc, _ in getattr(e, "failures", {}).values()):  # torch's CheckpointException
            return True
        text = str(e)
        if "No space left on device" in text or "unexpected pos" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def run_cli(main) -> None:
    """`main()` as a command: a user error (a flag, a data file, lost samples, a full disk) is one line
    "error: ..." on stderr and exit status 2, without a traceback; a bug still raises with one."""
    try:
        main()
    except (ConfigError, DataError, RunAborted) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except BaseException as e:  # torch's CheckpointException is a BaseException
        if not is_disk_full(e):
            raise
        where = getattr(e, "filename", None)
        print(f"error: {where or 'a write'}: no space left on device; free space, then rerun (a training run: "
              "--resume_from_checkpoint latest keeps the steps of its checkpoints)", file=sys.stderr, flush=True)
        sys.exit(2)
