"""Checkpoints and the run directory: a run never clobbers another, and resumes exactly where it stopped.

    accelerate launch grpo_care.py ... --resume_from_checkpoint latest     # 1 GPU or N: the same files

`checkpoint-<step>/` holds the policy as `save_pretrained` (loadable by plain transformers) with its processor,
and the training state (sharded policy, EMA reference, optimizer) by torch.distributed.checkpoint, the schedule,
every rank's RNG and the run's counters. It is written under a temporary name and renamed when complete, so a
crash or a full disk leaves the earlier checkpoints whole. `open_run_dir` refuses a used output dir unless the
run resumes or `--overwrite_output_dir true`, compares the checkpoint's config with the new flags, and cuts the
logs back to the checkpoint's step.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from config import ConfigError, RunAborted
from distributed import rank0_print


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



# --- the run directory: never clobber a run, compare configs on resume ---

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
    "reference model (a consistency reward or a KL)": "the checkpoint holds a reference model or not",
    "kl_reference": "the checkpoint's reference is the frozen initial model or an EMA, whatever the flag says",
}
RESUME_IGNORED = ("output_dir", "resume_from_checkpoint", "overwrite_output_dir")


def compare_resume_config(saved: dict, new: dict) -> tuple[list[str], list[str]]:
    """(refused, applied): "flag: old -> new" for each difference between a checkpoint's config and this
    run's. Refused ones would silently not apply (RESUME_REFUSED); the others apply from the resumed step.
    Fields absent from `saved` (older checkpoints) are not compared."""
    def ref(c):  # older checkpoints: use_care
        reward = c.get("consistency_reward", "care" if c.get("use_care") else "none")
        return reward != "none" or (c.get("beta") or 0) > 0 or (c.get("sep_kl_answer_coef") or 0) > 0

    def same(k, a, b):
        if k == "model_path" and a and b and os.path.exists(a) and os.path.exists(b):
            return os.path.realpath(a) == os.path.realpath(b)
        return a == b

    refused, applied = [], []
    for k in new:
        if k in saved and k not in RESUME_IGNORED and not same(k, saved[k], new[k]):
            (refused if k in RESUME_REFUSED else applied).append(f"{k}: {saved[k]!r} -> {new[k]!r}")
    if "beta" in saved and ref(saved) != ref(new):
        refused.append(f"reference model (a consistency reward or a KL): {ref(saved)} -> {ref(new)}")
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
