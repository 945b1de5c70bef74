"""memory.py and bench/memory_plan.py: the activation bytes by hand, the plan of a hand-counted tiny model
sharded over a fake process group, the built-in 7B config, and the grpo_care.py hook (CUDA only)."""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import memory  # noqa: E402
import memory_plan  # noqa: E402


def test_layer_and_block_bytes_by_hand():
    # H 4, I 8, kv 2, bf16: norms 2 x (4*4 + 2*2*4) = 64; attention 2 x (2*4 + 2*2) = 24 (q, out; k, v narrow);
    # MLP 4 x 2 x 8 = 64. Total 152; SDPA's repeated k, v: 2 x (2*4 + 2*4) = 32 instead of 24: 160.
    assert memory.decoder_layer_bytes(4, 8, 2, 2, gqa_expanded=False) == 152
    assert memory.decoder_layer_bytes(4, 8, 2, 2, gqa_expanded=True) == 160
    # fp32: norms 2 x (16 + 32) = 96, attention 4 x (8 + 4) = 48, MLP 16 x 8 = 128: 272
    assert memory.decoder_layer_bytes(4, 8, 2, 4, gqa_expanded=False) == 272
    # vision, Hv 4, Iv 8, bf16: norms 64, attention 7 x 2 x 4 = 56, MLP 64: 184
    assert memory.vision_block_bytes(4, 8, 2) == 184
    # the media flags' longest prompt: 216 text + 16/2 frames x 128 + 256 image tokens = 1,496
    assert memory.prompt_tokens_bound(16, 128 * 28 * 28, 256 * 28 * 28) == 1496


def test_update_activations_by_hand():
    # 2 rows x 5 positions = 10 tokens (4 through the head), 8 patches; 2 layers (H 4, I 8, kv 2: 152 bytes a token),
    # 1 vision block (Hv 4, Iv 8: 184 a patch), bf16. Saved without checkpointing: layers 2 x 152 x 10 = 3,040,
    # block 184 x 8 = 1,472, patch embedding + merger (8 + 16) x 4 x 8 = 768, final norm (4 + 2) x 4 x 10 = 240,
    # rotary cos, sin 2 x 2 x 2 x 10 = 80, head input 2 x 4 x 4 = 32, mask 2 x 2 x 5 x 5 = 100: 5,732. Then the
    # larger of the head's chunk 2 x 16 x (2 + 12) = 448 and one layer's backward 10 x 2 x (3 x 8 + 2 x 4) = 640.
    kw = dict(tokens=10, completion_tokens=4, rows=2, seq=5, patches=8, layers=2, depth=1, H=4, I=8, kv=2, head_dim=2,
              Hv=4, Iv=8, vocab=16, chunk=2, b=2, gqa_expanded=False)
    assert memory.update_activation_bytes(checkpointing=False, **kw) == 5732 + 640
    # checkpointing: each layer keeps its input, 2 x (2 x 4) x 10 = 160, the block 8 x 8 = 64; the rest as above
    # (768 + 240 + 80 + 32 + 100): 1,444; then one layer recomputed, max(152 x 10, 184 x 8) = 1,520, + 640
    assert memory.update_activation_bytes(checkpointing=True, **kw) == 1444 + 1520 + 640


TINY = dict(  # text: hidden 16, 2 heads of 8, 1 KV head, MLP 32, 1 layer, vocabulary 64, untied head
    text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, vocab_size=64, tie_word_embeddings=False,
                     rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}),
    vision_config=dict(depth=1, hidden_size=8, intermediate_size=16, num_heads=1, out_hidden_size=16,
                       fullatt_block_indexes=[0]),
    tie_word_embeddings=False)


def run_plan(capsys, *flags):
    memory_plan.main([*flags, "--json", "true"])
    return json.loads(capsys.readouterr().out)


def test_plan_of_a_hand_counted_model(tmp_path, capsys):
    from transformers import Qwen2_5_VLConfig

    Qwen2_5_VLConfig(**TINY).save_pretrained(tmp_path)
    p = run_plan(capsys, "--model_path", str(tmp_path), "--gpus", "2", "--num_generations", "4",
                 "--max_new_tokens", "10", "--prompt_tokens", "100", "--vision_tokens", "8", "--gpu_memory_gb", "1")
    assert set(p["per_gpu_gb"]) == {"policy_params", "grads", "optimizer", "ema_reference", "generation_copy",
                                    "kv_cache", "activations"} and p["fits"] is True
    # Parameters: embeddings 64 x 16 = 1,024, untied head 1,024, final norm 16; the layer: q 16x16 + 16 = 272,
    # k and v 16x8 + 8 = 136 each, o 256, MLP 3 x 16x32 = 1,536, two norms 32: 2,368. Vision: patch embedding
    # 8 x (3 x 2 x 14 x 14) = 9,408; the block: norms 16, qkv 8x24 + 24 = 216, proj 72, MLP 144 + 144 + 136:
    # 728; merger: norm 8, 32x32 + 32 = 1,056, 32x16 + 16 = 528: 1,592. Total 16,160; every first dim even,
    # so 2 ranks hold 8,080 each, no padding.
    assert p["params"] == 16160 and p["shard_params"] == 8080
    b = p["per_gpu_bytes"]
    assert (b["policy_params"], b["grads"], b["optimizer"], b["ema_reference"]) == (32320, 32320, 64640, 32320)
    assert b["generation_copy"] == 2 * 16160  # gathered in bf16 (a GPU run's default)
    # KV: (4 rows x 110 positions + the prompt's own 100) x 1 layer x K and V, + one K of 4 x 110 growing by
    # torch.cat; x 8 (1 head of 8) x 2 bytes
    assert b["kv_cache"] == (540 * 1 * 2 + 440) * 8 * 2
    # without CARE no reference; 3 ranks pad: ceil(16/3) = 6 rows of a 16-row norm, so 3 shards > 16,160
    q = run_plan(capsys, "--model_path", str(tmp_path), "--gpus", "3", "--consistency_reward", "none")
    assert q["per_gpu_bytes"]["ema_reference"] == 0 and q["params"] == 3 * q["shard_params"] > 16160
    assert q["fits"] is None  # no --gpu_memory_gb
    # checkpointing keeps one input per layer instead of every activation
    a = q["activations_gb"]
    assert a["checkpointing"] < a["no_checkpointing"]


def test_7b_plan_and_levers(capsys):
    p = run_plan(capsys, "--model_path", "Qwen/Qwen2.5-VL-7B-Instruct", "--gpus", "8", "--gpu_memory_gb", "80")
    # Qwen2.5-VL-7B-Instruct: 8,292,166,656 parameters (untied head), padded by FSDP2 to a multiple of 8 rows
    assert 8_292_166_656 <= p["params"] < 8_292_166_656 * 1.001 and p["params"] == 8 * p["shard_params"]
    assert p["settings"]["prompt_tokens"] == 1496 and p["fits"] is True
    assert p["peak_gb"] == max(p["phases_gb"].values())
    memory_plan.main(["--model_path", "Qwen/Qwen2.5-VL-7B-Instruct", "--gpus", "8", "--gpu_memory_gb", "24"])
    text = capsys.readouterr().out
    assert "DOES NOT FIT" in text and "--num_generations 4: peak" in text and "twice the GPUs" in text


def test_plan_flag_errors(capsys):
    with pytest.raises(SystemExit) as e:
        memory_plan.run_cli(lambda: memory_plan.main(["--model_path", "Qwen/Qwen2.5-VL-7B-Instruct", "--gpus", "0"]))
    assert e.value.code == 2 and "--gpus 0: must be an integer >= 1" in capsys.readouterr().err


def test_grpo_care_prints_the_plan_only_on_cuda(capsys):
    memory.print_plan(None, torch.device("cpu"))  # the loop's call: nothing on a CPU, not even the config read
    assert capsys.readouterr().out == ""


def test_plan_report_warns_with_the_flags(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import Qwen2_5_VLConfig

    import grpo_care

    Qwen2_5_VLConfig(**TINY).save_pretrained(tmp_path)
    cfg = grpo_care.Config(model_path=str(tmp_path), bf16=True, gradient_checkpointing=True,
                           attn_implementation="sdpa")
    dist.init_process_group("fake", store=dist.HashStore(), rank=0, world_size=2)
    try:  # what print_plan shows on a GPU, here for a 2-rank mesh and a GPU far too small
        text = memory.plan_report(cfg, init_device_mesh("cpu", (2,)), gpu_memory_gb=1e-4)
    finally:
        dist.destroy_process_group()
    assert "over 2 GPU(s)" in text and "DOES NOT FIT" in text and "warning: the peak" in text
    assert "--num_generations 4: peak" in text and "--max_new_tokens 384: peak" in text
