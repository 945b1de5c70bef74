"""bench/: the roofline and FLOP formulas by hand, gpu.py's dry run (the GPU code path on CPU), our side
of vs_trl.py, and how both write BENCHMARKS.md. TRL itself is not installed here: vs_trl.py must say so."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
ENV = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")

import gpu  # noqa: E402
import vs_trl  # noqa: E402


def test_decode_roofline_by_hand():
    # 3 new tokens: 2 decode steps (the first token comes out of the prefill), each reading the 100 weight
    # bytes once: 200. KV: rows x (3 + 1 + 3 + 2) = 2 x 9 = 18 positions x 2 bytes = 36. (200 + 36) / 4 B/s = 59 s.
    assert gpu.decode_roofline_seconds(100, 2, rows=2, prompt_len=3, new_tokens=3, peak_bytes_per_s=4) == 59.0
    # one new token: no decode step at all
    assert gpu.decode_roofline_seconds(100, 2, rows=2, prompt_len=3, new_tokens=1, peak_bytes_per_s=4) == 0.0


def test_forward_flops_by_hand():
    # projections 2 x 10 params x 2 rows x 3 tokens = 120; causal attention 2 x 2 layers x 4 hidden x 3^2 x 2 rows
    # = 288; LM head on the 1 completion position of each row: 2 x 8 x 4 x 2 x 1 = 128. Total 536.
    assert gpu.text_forward_flops(10, hidden=4, layers=2, vocab=8, rows=2, seq_len=3, completion_len=1) == 536
    # matmuls: 2 x (5 + 3) x 8 patches = 128, merger 2 x 8 x 8 / 4 = 32; attention 4 x 2 x (1 window layer x
    # 8 patches x 4 + 1 full layer x (4^2 + 4^2)) = 8 x 64 = 512. Total 672.
    assert gpu.vision_forward_flops(5, 8, 3, patches=8, merge=4, hidden=2, window_patches=4, group_patches=[4, 4],
                                    window_layers=1, full_layers=1) == 672
    assert gpu.mfu(100.0, 2.0, 100.0) == 0.5 and gpu.mfu(100.0, 2.0, None) is None


def test_gpu_dry_run(tmp_path):
    out = tmp_path / "gpu.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench/gpu.py"), "--dry-run", "--out", str(out),
                          "--model_dir", str(tmp_path / "model")], capture_output=True, text=True, env=ENV, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["dry_run"] and r["G"] == 8 and r["max_new_tokens"] == 4 and r["ref_weights"] == "separate"
    assert all(r["group_seconds"][k] > 0 for k in ("generation", "old_logprobs", "reference", "update"))
    # toy sizes, counted on the FSDP2-wrapped policy: per decoder layer q, o 64x64, k, v 64x32 (2 kv heads of 16),
    # MLP 3 x 64x128: 36,864; 2 layers: 73,728. Vision blocks: qkv 32x96 + proj 32x32 + MLP 3 x 32x64 = 10,240 x 2.
    assert r["counts"]["text_matmul"] == 73728 and r["counts"]["block_matmul"] == 20480
    # 4 frames of 56x56 = 2 frame pairs of 4x4 patches, and the 56x56 image: 48 patches in 3 attention groups
    assert r["vision"] == dict(patches=48, window_patches=64, group_patches=[16, 16, 16])
    assert r["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 2  # K and V x 2 layers x 2 kv heads x head dim 16 x bf16
    assert r["train"]["flops"] > 0 and r["train"]["mfu"] is None  # no peak FLOP/s known for a CPU
    assert list(r["sweep"]) == ["1", "2", "4", "8"] and [d["rows"] for d in r["sweep"].values()] == [8, 16, 32, 64]
    assert all(d["seconds"] > 0 for d in r["sweep"].values())
    assert len(r["decode"]) == 3 and all("error" not in d and d["tokens_per_s"] > 0 for d in r["decode"].values()), r["decode"]
    # the JSON renders into BENCHMARKS.md between the markers and nowhere else
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(f"# B\nbefore\n{gpu.BEGIN}\nold figures\n{gpu.END}\nafter\n")
    gpu.write_benchmarks(gpu.render(r), "cmd", md)
    text = md.read_text()
    assert text.startswith("# B\nbefore\n") and text.endswith(f"{gpu.END}\nafter\n") and "old figures" not in text
    assert "static cache, compiled" in text and "cpu (dry run)" in text and "| 8 | 64 |" in text


def test_vs_trl_says_how_to_install_trl():
    if importlib.util.find_spec("trl") is not None:
        pytest.skip("trl is installed here; the message is for the project's own venv")
    res = subprocess.run([sys.executable, str(ROOT / "bench/vs_trl.py"), "--no_write"], capture_output=True, text=True,
                         env=ENV, timeout=60)
    assert res.returncode != 0 and "-r bench/requirements.txt" in res.stderr, res.stderr[-2000:]


def test_vs_trl_our_side(toy_world, tmp_path):
    from data import load_examples

    examples = load_examples(toy_world / "data/annotations/training_6k.jsonl", toy_world / "data")[:4]
    for ex in examples:
        ex["video"] = None  # image-only, as TRL's side gets them
    (tmp_path / "ex.json").write_text(json.dumps(examples))
    cmd = [sys.executable, str(ROOT / "bench/vs_trl.py"), "--side", "ours", "--model", str(toy_world / "model"),
           "--examples", str(tmp_path / "ex.json"), "--out", str(tmp_path), "--G", "2", "--max_new_tokens", "4",
           "--top_p", "1.0", "--steps", "1", "--warmup", "1", "--threads", "1", "--seed", "0",
           "--prompts", "2"]  # 2 steps of 2 prompts: one generate call for 2 x 2 rows
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["completion_tokens"] == [4, 4], "min_new_tokens forces the length on our side"
    m = r["median"]
    assert m["step"] >= m["generation"] + m["forward_backward"] + m["optimizer"] - 1e-6 > 0
    assert r["step_peak_mb"] >= r["rss_before_steps_mb"] > 0


def test_vs_trl_compare_and_write(tmp_path):
    side = lambda step, peak, prompts: dict(median=dict(step=step, cpu=step / 2), prompt_tokens=prompts, completion_tokens=[4],
                                            setup_peak_mb=100.0, rss_before_steps_mb=90.0, step_peak_mb=peak)
    c = vs_trl.compare(side(1.0, 150.0, [7]), side(4.0, 300.0, [7]))
    # time 1/4, CPU time 0.5/2; peaks max(100, 150) / max(100, 300) = 0.5; extra (150 - 90) / (300 - 90) = 60 / 210
    assert (c["time_ratio"], c["cpu_ratio"], c["rss_ratio"]) == (0.25, 0.25, 0.5)
    assert abs(c["extra_ratio"] - 60 / 210) < 1e-12
    with pytest.raises(AssertionError, match="prompts differ"):
        vs_trl.compare(side(1.0, 150.0, [7]), side(4.0, 300.0, [8]))
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(f"intro\n{vs_trl.BEGIN}\nold\n{vs_trl.END}\nnotes\n")
    for figures in ("first", "second"):  # rewriting replaces the block, keeps the rest
        vs_trl.write_benchmarks(figures, "cmd", md)
    text = md.read_text()
    assert text.startswith("intro\n") and text.endswith("notes\n") and "second" in text
    assert "first" not in text and "old" not in text


def test_the_precomputed_vision_features_reach_the_model(tmp_path):
    # transformers 5.17.0 (a lent GPU's) drops rollout's mm_encoder_outputs silently: log-probs blind to the media
    res = subprocess.run([sys.executable, str(ROOT / "bench/vision_features_check.py"), "--model_dir", str(tmp_path)],
                         capture_output=True, text=True, env=ENV, timeout=120)
    assert res.returncode == 0 and "|features - pixels|" in res.stdout, res.stdout + res.stderr[-2000:]
