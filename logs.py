"""The run's logs: one metrics.jsonl line per step, completions.jsonl (every sample and the values the update
used), optional tensorboard scalars, and curves.png at the end. Rank 0 writes; the others send it their lines.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist


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
