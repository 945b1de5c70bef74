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

import fcntl
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import socket
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from config import ConfigError, RunAborted, RunConfig, is_disk_full
from distributed import rank0_print


def save_checkpoint(out: Path, step: int, policy, ref, optimizer, scheduler, processor, cfg: RunConfig,
                    counters: dict | None = None) -> Path:
    """Writes `checkpoint-<step>` under a temporary name, then its manifest (every file's size and sha256), and
    renames it when complete. `counters` (the run's skipped samples and updates) go into trainer_state.json for a
    resumed run. A full disk on any rank is RunAborted on every rank, with the partial checkpoint removed."""
    final, tmp = out / f"checkpoint-{step}", out / f"checkpoint-{step}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    failure = None
    try:
        dcp.save(_train_state(policy, ref, optimizer), checkpoint_id=tmp / "train_state")  # raises on every rank
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
    except Exception as e:  # noqa: BLE001 - every rank must hear of it; torch's CheckpointException is caught below
        failure = e
    except BaseException as e:  # CheckpointException derives from BaseException; an interrupt is re-raised
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        failure = e
    _agree(failure, final, tmp)
    try:
        write_manifest(tmp)  # a collective; hashed in shares by every rank
    except Exception as e:  # noqa: BLE001
        failure = e
    _agree(failure, final, tmp)
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # atomic: a crash before this line leaves the previous checkpoint whole
    dist.barrier()
    return final


def _agree(failure: BaseException | None, final: Path, tmp: Path) -> None:
    """A collective: when any rank failed to write, every rank raises (RunAborted for a full disk) and the partial
    checkpoint is removed; one rank alone raising would leave the others waiting forever in the next collective."""
    verdicts = [None] * dist.get_world_size()
    dist.all_gather_object(verdicts, None if failure is None else (is_disk_full(failure), repr(failure)[:300]))
    failed = [(r, v) for r, v in enumerate(verdicts) if v is not None]
    if not failed:
        return
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    if any(full for _, (full, _) in failed):
        raise RunAborted(f"{final}: no space left on device while saving (the earlier checkpoints are intact); "
                         "free space, then resume with --resume_from_checkpoint latest") from failure
    if failure is not None:
        raise failure
    raise RuntimeError(f"saving {final} failed on rank {failed[0][0]}: {failed[0][1][1]}")


def _train_state(policy, ref, optimizer) -> dict:  # sharded: each rank saves and loads its own shards
    model_sd, optim_sd = get_state_dict(policy, optimizer)
    return {"model": model_sd, "optim": optim_sd, **({"ref": get_model_state_dict(ref)} if ref is not None else {})}


def _load_plain(path: Path):
    """torch.load with weights_only: tensors, numbers and containers only, so a crafted file cannot run code
    (DCP's own .metadata is still pickled: resume only checkpoints you trust)."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConfigError(f"{path}: not a plain tensor file, refused ({str(e).splitlines()[0][:200]})") from None


def load_checkpoint(path: Path, policy, ref, optimizer, scheduler) -> int:
    """Restores a save_checkpoint: weights, optimizer, EMA reference, schedule and this rank's RNG; returns the step."""
    state = _train_state(policy, ref, optimizer)
    dcp.load(state, checkpoint_id=path / "train_state")
    set_state_dict(policy, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if ref is not None:
        set_model_state_dict(ref, state["ref"])
    scheduler.load_state_dict(_load_plain(path / "scheduler.pt"))
    rng = _load_plain(path / f"rng_state_{dist.get_rank()}.pt")
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
    """The run files (`files`, checkpoint-N and checkpoint-N.tmp) already in `out`, to delete. A used dir is refused
    unless the run resumes (it then owns them: nothing to delete) or `overwrite`. Read-only: every rank may call it."""
    used = sorted(p for p in out.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+(\.tmp)?", p.name))
    used += [out / f for f in files if (out / f).exists()]
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


MANIFEST = "manifest.json"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")  # checkpoint-2.bak, a user's copy, is not one


def checkpoint_step(path: Path) -> int | None:
    """N for a directory named checkpoint-<N>, else None."""
    m = _CHECKPOINT.fullmatch(path.name)
    return int(m.group(1)) if m and path.is_dir() else None


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _shared(work: list, job) -> list:
    """[job(x) for x in work], each rank doing every world-th item (a 7B checkpoint is ~130 GB to hash), the
    results concatenated over the ranks. A collective when the process group is up; `work` is the same on all."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = [job(x) for x in work[rank::world]]
    if world == 1:
        return mine
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    return [y for ys in everyone for y in ys]


def write_manifest(ckpt: Path) -> None:
    """`ckpt`/manifest.json: {file: [size, sha256]} of every file in `ckpt`. A collective."""
    files = sorted((p for p in ckpt.rglob("*") if p.is_file() and p != ckpt / MANIFEST),
                   key=lambda p: (-p.stat().st_size, str(p)))
    entries = _shared(files, lambda p: (p.relative_to(ckpt).as_posix(), p.stat().st_size, _sha256(p)))
    if not dist.is_initialized() or dist.get_rank() == 0:
        (ckpt / MANIFEST).write_text(json.dumps({name: [size, digest] for name, size, digest in sorted(entries)},
                                                indent=0))


def checkpoint_problem(ckpt: Path) -> str | None:
    """What is wrong with `ckpt`, "<file>: <problem>", or None when every file its manifest lists is there with
    its size and sha256 (files added later, an evaluation's say, are not judged). A collective."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
        entries = sorted(((name, int(size), str(digest)) for name, (size, digest) in manifest.items()),
                         key=lambda e: (-e[1], e[0]))
    except FileNotFoundError:
        return f"{ckpt / MANIFEST}: missing (the save did not finish, or predates manifests)"
    except (OSError, ValueError, TypeError, AttributeError) as e:  # cut or edited
        return f"{ckpt / MANIFEST}: unreadable ({type(e).__name__})"
    for name, size, _ in entries:  # sizes first: a cut file is found without reading anything
        path = ckpt / name
        if os.path.isabs(name) or ".." in Path(name).parts:
            return f"{ckpt / MANIFEST}: {name!r} is outside the checkpoint"
        if not path.is_file():
            return f"{path}: missing"
        if path.stat().st_size != size:
            return f"{path}: {path.stat().st_size} bytes, the manifest says {size}"
    bad = _shared(entries, lambda e: None if _sha256(ckpt / e[0]) == e[2] else f"{ckpt / e[0]}: contents differ "
                                                                                "from the manifest's sha256 (corrupt)")
    return min((b for b in bad if b), default=None)


def last_checkpoint_before(out: Path, step: int) -> Path | None:
    """The newest checkpoint-N of `out` with N < `step` (saved before that step's update), or None."""
    before = [p for p in out.iterdir() if checkpoint_step(p) is not None and checkpoint_step(p) < step]
    return max(before, key=checkpoint_step, default=None)


def find_resume_checkpoint(out: Path, resume: str) -> Path:
    """The checkpoint `resume` names, verified (`checkpoint_problem`), or for "latest" the newest good checkpoint-N
    of `out`, saying which newer ones were passed over and why. ConfigError naming the file when there is none."""
    if resume != "latest":
        ckpt = Path(resume)
        problem = checkpoint_problem(ckpt) if ckpt.is_dir() else f"{ckpt}: no such directory"
        if problem:
            raise ConfigError(f"--resume_from_checkpoint {resume}: {problem}")
        return ckpt
    found = sorted((p for p in out.iterdir() if checkpoint_step(p) is not None), key=checkpoint_step, reverse=True)
    damaged = []
    for ckpt in found:
        problem = checkpoint_problem(ckpt)
        if problem is None:
            for name, why in damaged:
                rank0_print(f"resume: {name} is damaged, passed over ({why})")
            if damaged:
                rank0_print(f"resume: the newest good checkpoint is {ckpt.name}")
            return ckpt
        damaged.append((ckpt.name, problem))
    why = f" ({len(damaged)} damaged, the newest: {damaged[0][1]})" if damaged else ""
    raise ConfigError(f"--resume_from_checkpoint latest: no {'good ' if damaged else ''}checkpoint in {out}{why}")


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


_HELD: dict[Path, object] = {}  # output dir -> its open, locked .lock file, for the life of the process


def claim_output_dir(out: Path) -> None:
    """Rank 0 takes an exclusive flock on `out`/.lock before anything is read or written there, and holds it until
    the process ends; ConfigError on every rank when another run holds it. The kernel drops a flock when its
    process ends, however it ends (kill -9 included), so a crashed run leaves no stale lock behind and nothing has
    to tell one apart: the pid and host written in the file only name the holder. A collective."""
    error = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        key = out.resolve()
        if key in _HELD:  # this process claimed it before (an earlier main() in the same process)
            _HELD.pop(key).close()
        fh = open(out / ".lock", "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            fh.flush()
            _HELD[key] = fh
        except BlockingIOError:
            fh.seek(0)
            error = f"--output_dir {out} is in use by another run ({fh.read().strip() or 'holder unknown'})"
            fh.close()
        except OSError as e:  # a file system without flock (Lustre mounted without -o flock, say)
            rank0_print(f"warning: cannot lock {out / '.lock'} ({e.strerror}): two runs in {out} are not told apart")
            fh.close()
    if dist.is_initialized() and dist.get_world_size() > 1:
        error = [error]
        dist.broadcast_object_list(error, src=0)
        error = error[0]
    if error:
        raise ConfigError(error)
