"""The run's logs: one metrics.jsonl line per step (from named sums per process, summed over the processes),
completions.jsonl (every sample and the values the update used), optional tensorboard scalars, and curves.png
at the end. Rank 0 writes; the others send it their lines.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist

from config import RunAborted, is_disk_full
from rewards import bonus_selective


def group_sums(accuracy, format_, confidence, bonus, rewards, lengths, truncated) -> dict[str, float]:
    """One process's groups as named sums; every argument `(B, G)`, `confidence` and `bonus` may be None
    (zeros). Summed over the processes (distributed.all_reduce_named), step_metrics turns them into metrics."""
    confidence, bonus = [torch.zeros_like(accuracy) if t is None else t for t in (confidence, bonus)]
    selective, eligible = bonus_selective(accuracy, bonus)  # (B,) each
    sums = dict(samples=accuracy.numel(), groups=accuracy.shape[0], reward=rewards.sum(),
                reward_sq=(rewards ** 2).sum(), accuracy=accuracy.sum(), format=format_.sum(), bonus=bonus.sum(),
                bonus_given=(bonus > 0).sum(), confidence=confidence.sum(), all_correct=(accuracy >= 1).all(-1).sum(),
                all_wrong=(accuracy <= 0).all(-1).sum(), selective=selective.sum(), eligible=eligible.sum(),
                completion_len=lengths.sum(), truncated=truncated.sum())
    return {k: float(v) for k, v in sums.items()}


def step_metrics(s: dict[str, float], world: int, step: int, grad_norm: float, lr: float, skipped_total: int,
                 nonfinite_steps: int) -> dict:
    """A metrics.jsonl line from the step's sums over all `world` processes: group_sums' and the loop's own
    (loss and clip_frac summed per group, completion_len_max a max, timings and counts)."""
    n, ng = max(s["samples"], 1), max(s["groups"], 1)  # per-sample and per-group ratios
    mean = s["reward"] / n
    return dict(step=step, reward_mean=mean, reward_std=math.sqrt(max(s["reward_sq"] / n - mean ** 2, 0.0)),
                accuracy=s["accuracy"] / n, format=s["format"] / n, bonus_mean=s["bonus"] / n,
                bonus_frac=s["bonus_given"] / n, confidence=s["confidence"] / n,
                bonus_selective_frac=s["selective"] / max(s["eligible"], 1), all_correct_frac=s["all_correct"] / ng,
                all_wrong_frac=s["all_wrong"] / ng, completion_len_mean=s["completion_len"] / n,
                completion_len_max=s["completion_len_max"], truncated_frac=s["truncated"] / n,
                clip_frac=s["clip_frac"] / ng, loss=s["loss"] / ng, grad_norm=grad_norm, lr=lr,
                t_generation=s["t_generation"] / world, t_reference=s["t_reference"] / world,
                t_update=s["t_update"] / world,
                gen_tokens_per_s=s["completion_len"] / max(s["t_generation"] / world, 1e-9),
                vision_calls=s["vision_calls"], skipped=s["skipped"], skipped_total=skipped_total,
                nonfinite_steps=nonfinite_steps)


def completion_records(step: int, examples: list[dict], rollouts: list, columns: dict) -> list[dict]:
    """completions.jsonl lines, one per sample: its text and the values the update used. `columns`: name ->
    `(B, G)` tensor, or None (not computed, e.g. confidence without CARE: null)."""
    return [dict(step=step, sample_id=ex["id"], g=g, text=text,
                 **{k: None if v is None else round(v[b, g].item(), 6) for k, v in columns.items()})
            for b, (ex, ro) in enumerate(zip(examples, rollouts)) for g, text in enumerate(ro.texts)]


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
    error = [None]
    if dist.get_rank() == 0:
        lines = {"metrics.jsonl": [metrics]} | ({} if completions is None else
                                               {"completions.jsonl": [c for per_rank in gathered for c in per_rank]})
        for name, rows in lines.items():
            try:
                with open(out / name, "a") as fh:
                    fh.writelines(json.dumps(r) + "\n" for r in rows)
            except OSError as e:
                if not is_disk_full(e):
                    raise
                error = [f"{out / name}: no space left on device while logging step {metrics['step']} (the "
                         "checkpoints are intact; a line cut here is dropped on resume); free space, then resume "
                         "with --resume_from_checkpoint latest"]
                break
        for k, v in metrics.items() if writer is not None else ():
            writer.add_scalar(k, v, metrics["step"])
    dist.broadcast_object_list(error, src=0)  # every rank stops together, none waits in a collective
    if error[0]:
        raise RunAborted(error[0])


CURVES = ["reward_mean", "accuracy", "format", "bonus_mean", "confidence", "completion_len_mean"]
FLAW_CELLS = {"reasoning right,\nanswer right": "right_reasoning_right_answer",
              "reasoning right,\nanswer wrong": "right_reasoning_wrong_answer",
              "reasoning wrong,\nanswer right": "wrong_reasoning_right_answer",
              "reasoning wrong,\nanswer wrong": "wrong_reasoning_wrong_answer"}


def _pyplot():
    import matplotlib  # the Agg backend chosen before pyplot loads: no display needed

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(metrics_file: Path, png: Path) -> None:
    plt = _pyplot()
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    for ax, k in zip(axes.flat, CURVES):
        ax.plot([r["step"] for r in rows], [r[k] for r in rows])
        ax.set_title(k)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)


def plot_comparison(runs: dict[str, Path], evals: dict[str, Path], png: Path) -> None:
    """One picture comparing runs: their curves overlaid (`runs`: label -> metrics.jsonl), then from each
    evaluation (`evals`: label -> results.json of a toy evaluation) the L1 orange rows' reasoning x answer
    classes, where "reasoning wrong, answer right" is right for the wrong reason, and strict accuracy per level."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 4, figsize=(18, 7))
    for label, path in runs.items():
        rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
        for ax, k in zip(axes.flat, CURVES):
            ax.plot([r["step"] for r in rows], [r[k] for r in rows], label=label)
    for ax, k in zip(axes.flat, CURVES):
        ax.set_title(k)
        ax.set_xlabel("step")
    if runs:
        axes.flat[0].legend()
    levels = {label: json.loads(Path(p).read_text())["levels"] for label, p in evals.items()}
    width = 0.8 / max(len(levels), 1)
    for i, (label, lv) in enumerate(levels.items()):
        orange = lv["L1"]["flaw_classes"]["orange"]
        axes.flat[6].bar([j + i * width for j in range(4)], [orange[k] for k in FLAW_CELLS.values()], width,
                         label=label)
        axes.flat[7].bar([j + i * width for j in range(3)], [lv[x]["strict"] for x in ("L1", "L2", "L3")], width,
                         label=label)
    axes.flat[6].set_xticks([j + 0.4 - width / 2 for j in range(4)], list(FLAW_CELLS), fontsize=7)
    axes.flat[6].set_title("L1 orange rows (% of them)")
    axes.flat[7].set_xticks([j + 0.4 - width / 2 for j in range(3)], ["L1", "L2", "L3"])
    axes.flat[7].set_title("strict accuracy (%)")
    axes.flat[6].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)
