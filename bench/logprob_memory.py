"""Benchmark (not a test): completion log-probs of one GRPO group, naive vs rollout.py.

At the real vocabulary (152,064) on a tiny Qwen2.5-VL (hidden 64, 2 layers, toy vision tower),
G rows share one prompt of >= 1,500 tokens (a 16-frame 336x336 video, an image, the reference
prompt) and carry random completions. Variants, each in a fresh subprocess on CPU:

* naive: the reference's pass: `model(**inputs).logits` over every position with the prompt's
  pixels repeated for each row, then a log-softmax row by row, then the completion slice.
* ours: `completion_logprobs` (vision once, completion positions only, LM head in chunks), without
  gradient (old-policy / reference pass) and with gradient (forward + backward, training pass).
* vision: the vision encoding of one pass, with the pixels repeated G times vs once, and
  the whole log-prob pass with each.

Extra peak memory = peak RSS during the pass (VmHWM, reset through /proc/self/clear_refs) minus RSS
before it. Run (about 1 min on 2 cores, ~11 GB free RAM needed by the naive pass):

    .venv/bin/python bench/logprob_memory.py [--G 8] [--completion 256] [--chunk_size 512]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
VOCAB = 152064


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _setup(world: Path, G: int, completion: int):
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoProcessor

    import toy_qwen
    from data import prompt_text
    from rollout import Rollout, completion_mask

    processor = AutoProcessor.from_pretrained(world / "model")
    model = toy_qwen.build_model(processor.tokenizer, seed=0, vocab_size=VOCAB).eval()
    frames = np.random.RandomState(0).randint(0, 255, (16, 364, 364, 3), dtype=np.uint8)
    content = [dict(type="video", video="v"), dict(type="image", image="i"),
               dict(type="text", text=prompt_text("What should I do next?", ["a", "b", "c", "d"]))]
    text = processor.apply_chat_template([dict(role="user", content=content)], tokenize=False,
                                         add_generation_prompt=True)
    meta = dict(fps=2.0, total_num_frames=16, frames_indices=list(range(16)))
    kw = dict(do_resize=False, do_sample_frames=False, cap_pixels_per_frame=True, padding=True, return_tensors="pt")
    batch = processor(text=[text], images=[Image.fromarray(frames[-1])], videos=[frames], video_metadata=[meta], **kw)
    batch_rep = processor(text=[text] * G, images=[Image.fromarray(frames[-1])] * G, videos=[frames] * G,
                          video_metadata=[meta] * G, **kw)  # what the reference feeds: pixels per row
    torch.manual_seed(0)
    ids = torch.randint(0, 600, (G, completion))  # (G, T) ordinary tokens, no EOS
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    mask, truncated = completion_mask(ids, eos)
    ro = Rollout(batch, torch.zeros(G, dtype=torch.long), ids, mask, truncated)
    ro_rep = Rollout(batch_rep, torch.arange(G), ids, mask, truncated)
    return model, batch, batch_rep, ro, ro_rep


def _naive(model, batch_rep, ids):
    import torch
    import torch.nn.functional as F

    P = batch_rep["input_ids"].shape[1]
    inputs = dict(batch_rep, input_ids=torch.cat([batch_rep["input_ids"], ids], 1),
                  attention_mask=F.pad(batch_rep["attention_mask"], (0, ids.shape[1]), value=1),
                  mm_token_type_ids=F.pad(batch_rep["mm_token_type_ids"], (0, ids.shape[1])))
    logits = model(**inputs, use_cache=False).logits[:, :-1]  # (N, L-1, V) every position
    targets = inputs["input_ids"][:, 1:]
    rows = [row.log_softmax(-1).gather(-1, t[:, None]).squeeze(-1) for row, t in zip(logits, targets)]
    return torch.stack(rows)[:, P - 1:]  # (N, T)


def _best(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def child(args):
    import torch

    from rollout import completion_logprobs, encode_vision

    torch.set_num_threads(os.cpu_count() or 2)
    model, batch, batch_rep, ro, ro_rep = _setup(Path(args.world), args.G, args.completion)
    result = dict(variant=args.variant, prompt_tokens=batch["input_ids"].shape[1])
    assert result["prompt_tokens"] >= 1500, f"prompt of {result['prompt_tokens']} tokens"
    if args.variant == "vision":  # best of a few runs: the machine may be shared
        with torch.no_grad():
            for name, b, r in (("repeated", batch_rep, ro_rep), ("once", batch, ro)):
                result[f"vision_s_{name}"] = _best(lambda: encode_vision(model, b), 3)
                result[f"pass_s_{name}"] = _best(
                    lambda: completion_logprobs(model, r, encode_vision(model, b), args.chunk_size), 2)
    else:
        base = _rss_mb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
        t = time.perf_counter()
        if args.variant == "naive":
            with torch.no_grad():
                logps = _naive(model, batch_rep, ro.completion_ids)
        elif args.variant == "ours":
            with torch.no_grad():
                logps = completion_logprobs(model, ro, encode_vision(model, batch), args.chunk_size)
        else:  # ours_grad: the training pass, forward + backward
            logps = completion_logprobs(model, ro, encode_vision(model, batch), args.chunk_size)
            logps.sum().backward()
            logps = logps.detach()
        result["seconds"] = time.perf_counter() - t
        result["extra_peak_mb"] = _rss_mb("VmHWM") - base
        torch.save(logps, Path(args.world) / f"{args.variant}.pt")
    print(json.dumps(result))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--completion", type=int, default=256, help="completion tokens per row")
    p.add_argument("--chunk_size", type=int, default=512)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--world", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        return child(args)

    import torch

    import toy

    with tempfile.TemporaryDirectory() as tmp:
        world = toy.build(Path(tmp) / "toy", seed=0, n_train=8, n_val=2)  # for its tokenizer/processor
        res = {}
        for variant in ("naive", "ours", "ours_grad", "vision"):
            cmd = [sys.executable, __file__, "--variant", variant, "--world", str(world), "--G", str(args.G),
                   "--completion", str(args.completion), "--chunk_size", str(args.chunk_size)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
            assert out.returncode == 0, f"{variant} failed:\n{out.stderr[-3000:]}"
            res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        naive_t, ours_t = (torch.load(world / f"{v}.pt", weights_only=True) for v in ("naive", "ours"))
        diff = (naive_t - ours_t).abs().max().item()
    naive, ours, grad, vis = res["naive"], res["ours"], res["ours_grad"], res["vision"]
    print(f"vocab {VOCAB}, hidden 64, G={args.G}, prompt {naive['prompt_tokens']} tokens, "
          f"completion {args.completion} tokens, chunk_size {args.chunk_size}, {torch.get_num_threads()} threads")
    print(f"{'log-prob pass':34s} {'extra peak MB':>14s} {'seconds':>8s}")
    print(f"{'naive (full logits, no grad)':34s} {naive['extra_peak_mb']:14.0f} {naive['seconds']:8.2f}")
    print(f"{'ours (chunked, no grad)':34s} {ours['extra_peak_mb']:14.0f} {ours['seconds']:8.2f}")
    print(f"{'ours (chunked, fwd + bwd)':34s} {grad['extra_peak_mb']:14.0f} {grad['seconds']:8.2f}")
    print(f"ours / naive peak: {ours['extra_peak_mb'] / naive['extra_peak_mb']:.3f} (no grad), "
          f"{grad['extra_peak_mb'] / naive['extra_peak_mb']:.3f} (with grad); max |logp diff| {diff:.1e}")
    print(f"{'vision (best of 3 / 2 runs)':34s} {'repeated px':>14s} {'once':>8s}")
    print(f"{'vision encoding, seconds':34s} {vis['vision_s_repeated']:14.3f} {vis['vision_s_once']:8.3f}")
    print(f"{'whole log-prob pass, seconds':34s} {vis['pass_s_repeated']:14.3f} {vis['pass_s_once']:8.3f}")


if __name__ == "__main__":
    main()
