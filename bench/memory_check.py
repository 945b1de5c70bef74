"""memory.py's plan against measured peaks, on CPU: one group of the training path, phase by phase.

    export MALLOC_MMAP_THRESHOLD_=65536 OMP_NUM_THREADS=1   # freed tensors go back to the OS: RSS follows live memory
    python bench/memory_check.py --model_dir .cache/memcheck-wide                       # 1 process
    torchrun --nproc_per_node 2 bench/memory_check.py --model_dir .cache/memcheck-wide  # 2 processes, gloo
    python bench/memory_check.py --size toy --model_dir .cache/memcheck-toy             # the toy's sizes

A Qwen2.5-VL of --size (random weights, the toy tokenizer, untied head; bench/gpu.py builds it) is loaded as
grpo_care.py loads it (FSDP2 policy and EMA reference, fp32 on CPU unless --bf16), with one SEED-Bench-R1-
shaped prompt (--frames frames, an image, the reference prompt). Each phase runs as the loop runs it:
a warm-up group (AdamW's state appears at its step), then generation (rollout.generate_group, G rows,
--new_tokens tokens, EOS suppressed), the update's forward + backward (grpo_care.accumulate_policy_gradients
over the rollout twice, as for two prompts: the second backward meets the first's gradients, as the plan
counts them) and the optimizer step. For each, the peak RSS (VmHWM, reset through /proc/self/clear_refs) above the RSS
before any model was loaded, on every rank, beside memory.plan's figure for the same shapes. The plan counts
tensors only; RSS also holds the allocator's and the libraries' own memory, hence --size toy's gap.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import gpu  # noqa: E402
import grpo_care  # noqa: E402
import memory  # noqa: E402
import rollout  # noqa: E402

SIZES = {
    "toy": gpu.TINY,
    "wide": dict(text=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
                           num_key_value_heads=2, vocab_size=32768, max_position_embeddings=32768, rope_theta=1e6,
                           rms_norm_eps=1e-6, tie_word_embeddings=False, mrope_section=[16, 24, 24]),
                 vision=dict(depth=2, hidden_size=256, intermediate_size=512, num_heads=4, out_hidden_size=1024,
                             patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                             fullatt_block_indexes=[1], tokens_per_second=2)),
}


def rss_gib(key: str = "VmRSS") -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1]) / 2 ** 20


def peak_of(fn, floor: float):
    """fn()'s result and the peak RSS while it ran, above `floor` (GiB)."""
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    out = fn()
    return out, rss_gib("VmHWM") - floor


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=list(SIZES), default="wide")
    p.add_argument("--model_dir", required=True, help="where the random checkpoint is kept (built once)")
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--pixels", type=int, default=112, help="side of each frame and of the image, px")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bf16 compute over fp32 weights, as on a GPU")
    a = p.parse_args()
    device = grpo_care.setup_distributed().device
    rank, world = dist.get_rank(), dist.get_world_size()
    floor = rss_gib()
    if rank == 0:
        gpu.make_model_dir(Path(a.model_dir), SIZES[a.size], device)
    dist.barrier()
    from transformers import AutoConfig, AutoProcessor

    processor = AutoProcessor.from_pretrained(a.model_dir)
    batch = gpu.make_batch(processor, a.frames, (a.pixels, a.pixels), (a.pixels, a.pixels))
    floor = rss_gib()  # the process with its libraries and the processor: the plan's zero
    cfg = grpo_care.Config(model_path=a.model_dir, num_generations=a.G, max_new_tokens=a.new_tokens, bf16=a.bf16,
                           gradient_checkpointing=a.gradient_checkpointing, attn_implementation="sdpa")
    measured = {}
    policy = grpo_care.load_model(a.model_dir, cfg, device, trainable=True)
    measured["policy_params"] = rss_gib() - floor
    ref = grpo_care.load_model(a.model_dir, cfg, device, trainable=False).eval()  # noqa: F841 - held, as in training
    measured["ema_reference"] = rss_gib() - floor - measured["policy_params"]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    G, T, chunk = a.G, a.new_tokens, cfg.logprob_chunk
    advantages = torch.linspace(-1, 1, G)[None]  # (1, G)

    def generate(n):
        policy.eval()
        return rollout.generate_group(policy, batch, G, processor, max_new_tokens=n, seeds=[0], min_new_tokens=n)

    def update(ros):
        policy.train()
        grpo_care.accumulate_policy_gradients(policy, ros, advantages[:1].expand(len(ros), G), None, None,
                                              cfg.clip_eps, 0.0, chunk)

    def step():
        return grpo_care.optimizer_step(policy, optimizer, cfg.max_grad_norm, 0.0)

    before = rss_gib()
    update([generate(2)])  # warm-up group: AdamW's state appears at its step (the gradients go)
    step()
    measured["optimizer"] = rss_gib() - before
    phases = {}
    ro, phases["generation"] = peak_of(lambda: generate(T), floor)
    assert int(ro.completion_mask.sum()) == G * T, "EOS was not suppressed"
    before = rss_gib() - floor
    _, phases["update"] = peak_of(lambda: update([ro, ro]), floor)  # the second backward meets the first's grads
    measured["grads"] = rss_gib() - floor - before
    _, phases["optimizer_step"] = peak_of(step, floor)

    P = batch["input_ids"].shape[1]
    cfg_m = AutoConfig.from_pretrained(a.model_dir)
    vision = int(torch.isin(batch["input_ids"], torch.tensor([cfg_m.image_token_id, cfg_m.video_token_id])).sum())
    inputs = dict(**memory.model_sizes(policy), **memory.config_dims(cfg_m), prompts=1, G=G, prompt_tokens=P,
                  new_tokens=T, vision_tokens=vision, bf16=a.bf16, checkpointing=a.gradient_checkpointing,
                  gqa_expanded=True, reference=True, chunk=chunk)
    plan = memory.plan(**inputs)
    mine = dict(measured_gb={k: round(v, 3) for k, v in measured.items()},
                phases_measured_gb={k: round(v, 3) for k, v in phases.items()})
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        print(json.dumps(dict(size=a.size, world=world, prompt_tokens=P, vision_tokens=vision, G=G, new_tokens=T,
                              bf16=a.bf16, gradient_checkpointing=a.gradient_checkpointing, plan=plan,
                              ranks=everyone)))
        print(f"{a.size}, {world} process(es), {'bf16' if a.bf16 else 'fp32'}, checkpointing "
              f"{a.gradient_checkpointing}: prompt {P} tokens ({vision} vision), G = {G}, {T} new tokens")
        for k, v in phases.items():
            got = max(r["phases_measured_gb"][k] for r in everyone)
            print(f"  {k:<15} plan {plan['phases_gb'][k]:7.3f} GiB   measured {got:7.3f} GiB   "
                  f"plan/measured {plan['phases_gb'][k] / max(got, 1e-9):.2f}")
        print("  components, rank 0 (plan / measured): " + ", ".join(
            f"{k} {plan['per_gpu_gb'][k]:.3f} / {v:.3f}" for k, v in measured.items()))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
