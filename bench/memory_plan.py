"""Does a run fit its GPUs? The per-GPU memory plan of a GRPO-CARE step, from the model's config alone.

    python bench/memory_plan.py --model_path Qwen/Qwen2.5-VL-7B-Instruct --gpus 8 --gpu_memory_gb 80
    python bench/memory_plan.py --model_path DIR --gpus 4 --gpu_memory_gb 80 --num_generations 8 --json

Every grpo_care.py flag is accepted (--num_generations, --max_new_tokens, --prompts_per_device,
--gradient_checkpointing, --bf16, --consistency_reward, --attn_implementation, --logprob_chunk, the media flags); the
defaults are a GPU run's (bf16, checkpointing, SDPA). The model is built on the meta device from DIR's
config.json, or for Qwen/Qwen2.5-VL-7B-Instruct from its published config written out below (it cannot be
downloaded here), and sharded by the project's FSDP2 calls over a fake process group of --gpus ranks
(torch's "fake" backend: no communication, each rank's shard as FSDP2 cuts it). The arithmetic is memory.py's;
bench/memory_check.py measures it against real peaks.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.testing._internal.distributed.fake_pg  # noqa: E402,F401 - registers the "fake" backend
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from transformers import AutoConfig, Qwen2_5_VLConfig  # noqa: E402

import memory  # noqa: E402
import toy  # noqa: E402
from config import ConfigError, RunConfig, int_ge, redefault, parse_run_config, run_cli, setting  # noqa: E402
from grpo_care import Config  # noqa: E402

# Qwen/Qwen2.5-VL-7B-Instruct's config.json (the values that set memory; untied LM head).
QWEN25_VL_7B_ID = "Qwen/Qwen2.5-VL-7B-Instruct"
QWEN25_VL_7B = dict(
    text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rope_theta=1e6,
                     rms_norm_eps=1e-6, sliding_window=32768, max_window_layers=28, use_sliding_window=False,
                     tie_word_embeddings=False, hidden_act="silu", bos_token_id=151643, eos_token_id=151645,
                     rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_chans=3,
                       out_hidden_size=3584, patch_size=14, spatial_merge_size=2, spatial_patch_size=14,
                       temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                       tokens_per_second=2, hidden_act="silu"),
    tie_word_embeddings=False, image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
    vision_end_token_id=151653, vision_token_id=151654, bos_token_id=151643, eos_token_id=151645)


TOKENS = ("an integer >= 1", lambda v: v is None or v >= 1)


@dataclass
class PlanConfig(Config):
    data_root: str | None = redefault(RunConfig, "data_root", ".")  # no data is read
    gpus: int = setting(1, "processes (GPUs) the model is sharded over", int_ge(1))
    gpu_memory_gb: float | None = setting(None, "memory of one GPU, GiB (80 for an 80 GB card)",
                                          ("> 0", lambda v: v is None or v > 0))
    prompt_tokens: int | None = setting(None, "default: the longest the media flags allow", TOKENS)
    vision_tokens: int | None = setting(None, "default: prompt_tokens less 216 text tokens", TOKENS)
    json: bool = setting(False, "print one JSON object instead of the table")


def model_config(path: str):
    if path.lower() == QWEN25_VL_7B_ID.lower() and not Path(path).is_dir():
        return Qwen2_5_VLConfig(**QWEN25_VL_7B)
    if not (Path(path) / "config.json").exists():
        raise ConfigError(f"--model_path {path}: no config.json there (the built-in config is {QWEN25_VL_7B_ID})")
    return AutoConfig.from_pretrained(path)


def parse(argv: list[str]) -> PlanConfig:
    if not any(a.split("=")[0] == "--model_path" for a in argv):
        raise ConfigError(f"--model_path is required (a save_pretrained dir, or {QWEN25_VL_7B_ID})")
    cfg = parse_run_config(PlanConfig, argv, toy.RL_DEFAULTS)
    cfg.bf16 = True if cfg.bf16 is None else cfg.bf16  # a GPU run's defaults
    cfg.gradient_checkpointing = True if cfg.gradient_checkpointing is None else cfg.gradient_checkpointing
    cfg.attn_implementation = cfg.attn_implementation or "sdpa"
    return cfg


def plan_for(cfg: PlanConfig) -> tuple[dict, dict]:
    """(plan, its inputs) with the model sharded over a fake group of cfg.gpus ranks (this process is rank 0)."""
    config = model_config(cfg.model_path)
    dist.init_process_group("fake", store=dist.HashStore(), rank=0, world_size=cfg.gpus)
    try:
        mesh = init_device_mesh("cpu", (cfg.gpus,))
        inputs = memory.plan_inputs(config, mesh, cfg, cfg.gpu_memory_gb, cfg.prompt_tokens, cfg.vision_tokens)
    finally:
        dist.destroy_process_group()
    return memory.plan(**inputs), inputs


def main(argv: list[str] | None = None):
    cfg = parse(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(1)
    p, inputs = plan_for(cfg)
    if cfg.json:
        print(json.dumps(p))
        return
    print(memory.render(p, cfg.gpus))
    if p["fits"] is False:
        print("what lowers the peak:\n  " + "\n  ".join(memory.levers(inputs)))


if __name__ == "__main__":
    run_cli(main)
