"""The skip budget: unreadable samples are skipped, counted and named, and too many of them stop the run.

A sample whose video or image is missing or cannot be decoded is skipped (never replaced by another); the
step trains on the other prompts. More than `--max_skip_frac` of a step's or of the run's samples unreadable
(each judged from MIN_JUDGED samples on, and at the last step whatever the count) aborts with a summary, so
that no run ends "done" after losing its data. The counts are kept in every checkpoint and carried on.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from config import RunAborted


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
