"""Benchmark (not a test): rollout generation time against prompts per process, on the toy (CPU).

    .venv/bin/python toy.py --out .cache/toy && .venv/bin/python sft.py --toy_dir .cache/toy   # the SFT warm start
    .venv/bin/python bench/generation_sweep.py --model_path outputs/toy_sft --data_root .cache/toy/data
    .venv/bin/python bench/generation_sweep.py ... --prompts 1 4 --repeats 9   # the 4-vs-1 ratio only
    .venv/bin/python bench/generation_sweep.py ... --baseline /tmp/rollout_before.py   # before/after, interleaved

The training loop's rollout block, timed alone: the policy loaded as grpo_care.main loads it (FSDP2 over a
1-process gloo group, fp32 on CPU), each prompt collated on its own (data.Collator), then the generation of
P prompts x G rows with the toy defaults (G = 8, up to 48 new tokens, temperature 1, top-p 0.95), seeded as
in training (grpo_care.sample_seed). Generation = vision + sampling, as metrics.jsonl's `t_generation`.
Commits before `rollout.generate_groups` existed are timed the way their loop generated: one
`generate_group` call per prompt, one after the other (so the same script measures before and after).

Each P runs --repeats times, interleaved (P = 1, 2, 4, 8, 1, 2, ...) so load on a shared machine spreads
over all P, each repeat on the next P training prompts; one untimed warm-up first. Reported: medians of
wall time and of CPU time (time.process_time, 1 thread: less sensitive than wall time to other jobs), and
their ratios to P = 1. The completion lengths are printed too: a batched call runs until its longest row ends.

--baseline FILE (a rollout.py of another commit: `git show <commit>:rollout.py > /tmp/rollout_before.py`) times
that module too, call by call with this checkout's on the same prompts and seeds, in alternating order, so a
load that drifts during the run (a shared machine) hits both alike; and it checks that both sampled the same
tokens. The baseline must run with this checkout's other files (grpo_care, data).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_path", required=True, help="the toy SFT warm start (or the untrained toy/model)")
    p.add_argument("--data_root", required=True)
    p.add_argument("--prompts", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write every timed call here")
    p.add_argument("--baseline", default=None, help="a rollout.py to time against this checkout's, interleaved")
    a = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import importlib.util

    import torch
    from transformers import AutoProcessor

    import grpo_care
    import rollout
    from data import Collator, load_examples

    torch.set_num_threads(a.threads)
    cfg = grpo_care.parse_config(["--toy", "true", "--model_path", a.model_path, "--data_root", a.data_root,
                                  "--output_dir", tempfile.mkdtemp()])  # nothing is written there
    device = grpo_care.setup_distributed().device
    grpo_care.set_device_defaults(cfg, device)
    processor = AutoProcessor.from_pretrained(cfg.model_path)
    policy = grpo_care.load_model(cfg.model_path, cfg, device, trainable=True).eval()
    collate = Collator(processor, cfg.vision_spec())
    examples = load_examples(Path(cfg.data_root) / cfg.train_file, cfg.data_root)
    variants = {"this": rollout}
    if a.baseline:
        spec = importlib.util.spec_from_file_location("rollout_baseline", a.baseline)
        variants = {"baseline": importlib.util.module_from_spec(spec), **variants}
        sys.modules["rollout_baseline"] = variants["baseline"]  # (its dataclasses look their module up)
        spec.loader.exec_module(variants["baseline"])

    def generate(module, exs, step):
        batches = [collate([ex])[0].to(device) for ex in exs]
        seeds = [grpo_care.sample_seed(cfg.seed, step, ex["id"]) for ex in exs]
        kw = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
        t0, c0 = time.perf_counter(), time.process_time()
        if hasattr(module, "generate_groups"):
            ros = module.generate_groups(policy, batches, cfg.num_generations, processor, seeds=seeds, **kw)
        else:  # the loop before generate_groups: one call per prompt
            ros = [module.generate_group(policy, b, cfg.num_generations, processor, seeds=[s], **kw)
                   for b, s in zip(batches, seeds)]
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        lens = torch.cat([ro.completion_mask.sum(-1) for ro in ros]).float()
        ids = [ro.completion_ids.tolist() for ro in ros]
        return dict(wall=wall, cpu=cpu, len_mean=lens.mean().item(), len_max=lens.max().item()), ids

    print(", ".join(f"{name}: {'one batched call' if hasattr(m, 'generate_groups') else 'one call per prompt'}"
                    for name, m in variants.items()) + f"; G={cfg.num_generations}, max_new_tokens="
          f"{cfg.max_new_tokens}, top_p={cfg.top_p}, {a.threads} thread(s)", flush=True)
    same = []  # baseline and this sampled the same tokens, per call
    with torch.no_grad():
        for m in variants.values():
            generate(m, examples[:1], 0)  # warm-up
        runs, at = [], 0
        for rep in range(a.repeats):
            for P in a.prompts:
                exs = [examples[(at + i) % len(examples)] for i in range(P)]
                at += P
                ids = {}
                for name in (list(variants) if rep % 2 == 0 else list(variants)[::-1]):  # alternating order
                    load = os.getloadavg()[0]
                    r, ids[name] = generate(variants[name], exs, rep + 1)
                    r = dict(variant=name, P=P, rep=rep, load=load, **r)
                    runs.append(r)
                    print(f"{name} P={P} rep {rep}: wall {r['wall']:.3f} s, CPU {r['cpu']:.3f} s (len mean "
                          f"{r['len_mean']:.1f}, max {r['len_max']:.0f}), load {load:.2f}", flush=True)
                if a.baseline:
                    same.append(ids["baseline"] == ids["this"])
    med = {(v, P): {k: statistics.median(r[k] for r in runs if r["P"] == P and r["variant"] == v)
                    for k in ("wall", "cpu", "len_mean")} for v in variants for P in a.prompts}
    P0 = a.prompts[0]
    vs = {(v, P, k): med[v, P][k] / med[v, P0][k] for v in variants for P in a.prompts for k in ("wall", "cpu")}
    cols = [("baseline", "before: ")] if a.baseline else []
    cols.append(("this", "after: " if a.baseline else ""))
    print("\n| prompts per process | rows | " + " | ".join(f"{t}wall s | {t}wall vs {P0} | {t}CPU s | {t}CPU vs {P0}"
                                                      for _, t in cols) + " | mean length | load average |")
    print("|---|---|" + "---|---|---|---|" * len(cols) + "---|---|")
    for P in a.prompts:
        loads = [r["load"] for r in runs if r["P"] == P]
        cells = " | ".join(f"{med[v, P]['wall']:.3f} | {vs[v, P, 'wall']:.2f}x | {med[v, P]['cpu']:.3f} | "
                           f"{vs[v, P, 'cpu']:.2f}x" for v, _ in cols)
        print(f"| {P} | {P * cfg.num_generations} | {cells} | {med['this', P]['len_mean']:.1f} | "
              f"{min(loads):.2f}-{max(loads):.2f} |")
    if a.baseline:
        print(f"\nsame tokens as the baseline: {sum(same)} of {len(same)} calls")
    if a.json:
        Path(a.json).write_text(json.dumps(runs, indent=1))
    import torch.distributed as dist

    dist.destroy_process_group()


if __name__ == "__main__":
    main()
