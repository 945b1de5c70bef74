"""Benchmark (not a test): rollout generation time against prompts per process, on the toy (CPU).

    .venv/bin/python toy.py --out .cache/toy && .venv/bin/python sft.py --toy_dir .cache/toy   # the SFT warm start
    .venv/bin/python bench/generation_sweep.py --model_path outputs/toy_sft --data_root .cache/toy/data
    .venv/bin/python bench/generation_sweep.py ... --prompts 1 4 --repeats 9   # the 4-vs-1 ratio only

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
    a = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers import AutoProcessor

    import grpo_care
    import rollout
    from data import Collator, load_examples

    torch.set_num_threads(a.threads)
    cfg = grpo_care.parse_config(["--toy", "true", "--model_path", a.model_path, "--data_root", a.data_root,
                                  "--output_dir", tempfile.mkdtemp()])  # nothing is written there
    device = grpo_care.setup_distributed().device
    grpo_care.resolve_run(cfg, device)
    processor = AutoProcessor.from_pretrained(cfg.model_path)
    policy = grpo_care.load_model(cfg.model_path, cfg, device, trainable=True).eval()
    collate = Collator(processor, cfg.vision_spec())
    examples = load_examples(Path(cfg.data_root) / cfg.train_file, cfg.data_root)
    batched = hasattr(rollout, "generate_groups")

    def generate(exs, step):
        batches = [collate([ex])[0].to(device) for ex in exs]
        seeds = [grpo_care.sample_seed(cfg.seed, step, ex["id"]) for ex in exs]
        kw = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
        t0, c0 = time.perf_counter(), time.process_time()
        if batched:
            ros = rollout.generate_groups(policy, batches, cfg.num_generations, processor, seeds=seeds, **kw)
        else:  # the loop before generate_groups: one call per prompt
            ros = [rollout.generate_group(policy, b, cfg.num_generations, processor, seeds=[s], **kw)
                   for b, s in zip(batches, seeds)]
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        lens = torch.cat([ro.completion_mask.sum(-1) for ro in ros]).float()
        return dict(wall=wall, cpu=cpu, len_mean=lens.mean().item(), len_max=lens.max().item())

    print(f"{'one batched call' if batched else 'one call per prompt'}; G={cfg.num_generations}, "
          f"max_new_tokens={cfg.max_new_tokens}, top_p={cfg.top_p}, {a.threads} thread(s)", flush=True)
    with torch.no_grad():
        generate(examples[:1], 0)  # warm-up
        runs, at = [], 0
        for rep in range(a.repeats):
            for P in a.prompts:
                exs = [examples[(at + i) % len(examples)] for i in range(P)]
                at += P
                load = os.getloadavg()[0]
                r = dict(P=P, rep=rep, load=load, **generate(exs, rep + 1))
                runs.append(r)
                print(f"P={P} rep {rep}: wall {r['wall']:.3f} s, CPU {r['cpu']:.3f} s (len mean {r['len_mean']:.1f}, "
                      f"max {r['len_max']:.0f}), load {load:.2f}", flush=True)
    med = {P: {k: statistics.median(r[k] for r in runs if r["P"] == P) for k in ("wall", "cpu", "len_mean")}
           for P in a.prompts}
    base = med.get(a.prompts[0])
    print(f"\n| prompts per process | rows | wall s | wall vs {a.prompts[0]} | CPU s | CPU vs {a.prompts[0]} "
          "| mean length | load average |")
    print("|---|---|---|---|---|---|---|---|")
    for P in a.prompts:
        loads = [r["load"] for r in runs if r["P"] == P]
        m = med[P]
        print(f"| {P} | {P * cfg.num_generations} | {m['wall']:.3f} | {m['wall'] / base['wall']:.2f}x | {m['cpu']:.3f} "
              f"| {m['cpu'] / base['cpu']:.2f}x | {m['len_mean']:.1f} | {min(loads):.2f}-{max(loads):.2f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(runs, indent=1))
    import torch.distributed as dist

    dist.destroy_process_group()


if __name__ == "__main__":
    main()
