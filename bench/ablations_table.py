"""bench/ablations.sh's table and figure: the toy Table 3 (mean ± sample sd over seeds) beside the paper's.

    python bench/ablations_table.py OUT "1 2 3" "bench/ablations.sh ..." START_EPOCH RESULTS.md

Writes the section "## Table 3 in miniature" of RESULTS.md (replacing an earlier one, keeping the rest of the file
and a hand-written "### Reading" inside the section) and OUT/../ablations.png beside RESULTS.md.
"""
import json
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# arXiv 2506.16141 v1, Table 3 (SEED-Bench-R1, Qwen2.5-VL-7B): L1, L2, L3 accuracy and GPT-4.1 consistency, %
PAPER = {"GRPO": (52.3, 53.2, 46.7, 57.9), "KL-EMA": (54.7, 54.1, 49.4, 60.0), "KL-EMA-HA": (55.1, 53.8, 49.2, 61.7),
         "SepKL-EMA-HA": (54.8, 54.9, 47.5, 76.8), "noKL": (55.4, 54.4, 51.3, 70.0),
         "DenseCons": (56.6, 55.5, 50.6, 80.3), "RefGen": (55.2, 54.2, 49.4, 86.4), "GRPO-CARE": (57.0, 57.0, 53.4, 82.4)}
HEADER = "## Table 3 in miniature"


def mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell(values):
    m, sd = mean_sd(values)
    return "–" if m is None else f"{m:.1f} ± {sd:.1f}"


def main(out, seeds, command, start, results):
    out, seeds, results = Path(out), seeds.split(), Path(results)
    arms = dict(line.rstrip("\n").split("\t") for line in open(out / "arms.tsv"))
    res = {a: [json.loads((out / f"{a}_seed{s}/eval/results.json").read_text())["levels"] for s in seeds] for a in arms}
    metrics = {("L1", "strict"): "L1", ("L2", "strict"): "L2", ("L3", "strict"): "L3",
               ("L1", "rule_consistency"): "L1 rule consistency", ("L2", "rule_consistency"): "L2 rule consistency"}
    lines = ["| arm | flags | " + " | ".join(f"{v} (%)" for v in metrics.values())
             + " | paper L1 / L2 / L3 / consistency |", "|---|---|" + "---:|" * (len(metrics) + 1)]
    for a, flags in arms.items():
        cells = [cell([r[lv].get(k) for r in res[a]]) for lv, k in metrics]
        lines.append(f"| {a} | `{flags}` | " + " | ".join(cells) + " | " + " / ".join(map(str, PAPER[a])) + " |")

    png = results.parent / "ablations.png"
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(metrics)
    for j, ((lv, k), label) in enumerate(metrics.items()):
        stats = [mean_sd([r[lv].get(k) for r in res[a]]) for a in arms]
        ax.bar([i + j * width for i in range(len(arms))], [m or 0 for m, _ in stats], width,
               yerr=[sd or 0 for _, sd in stats], capsize=2, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(arms))], list(arms), fontsize=8)
    ax.set_ylabel("%")
    ax.set_title(f"Table 3 arms on the toy world: strict accuracy and rule consistency, mean ± sd over {len(seeds)} seeds")
    ax.legend(fontsize=7, ncol=len(metrics))
    fig.tight_layout()
    fig.savefig(png, dpi=120)

    text = (f"{HEADER}\n\nCommand: `{command}`; {time.time() - float(start):.0f} s for the runs not already done. "
            f"Seeds {', '.join(seeds)}; mean ± sample standard deviation over seeds. Strict accuracy per level and rule "
            "consistency (the answer is the option the toy reasoning names) on the toy's validation levels; the paper's "
            "numbers (SEED-Bench-R1, 7B, GPT-4.1 judge) for comparison of the ordering only.\n\n"
            + "\n".join(lines) + f"\n\n![Table 3 arms on the toy world]({png.name})\n")
    old = results.read_text() if results.exists() else ""
    before, _, rest = old.partition(f"\n{HEADER}\n") if f"\n{HEADER}\n" in old else (old, "", "")
    section, nxt, after = rest.partition("\n## ")
    reading = section[section.index("\n### Reading"):] if "\n### Reading" in section else ""
    results.write_text(before.rstrip("\n") + ("\n\n" if before else "") + text + reading
                       + (f"\n## {after}" if nxt else ""))
    print(text)


if __name__ == "__main__":
    main(*sys.argv[1:])
