"""Processes and sharding: the same lines for 1 process and N, GPU or CPU. Every model is wrapped with FSDP2.

    python grpo_care.py                                          # one process: a 1-rank group, sharded alike
    accelerate launch --config_file configs/fsdp_8gpu.yaml grpo_care.py ...   # 8 GPUs (torchrun works too)

`load_model` builds a Qwen2.5-VL in fp32 (master weights) and `shard_model` wraps it: `fully_shard` per vision
block, the vision tower, per decoder layer and the root, bf16 compute on GPU (the reference runs DeepSpeed
ZeRO-3 through TRL). Only rank 0 reads the checkpoint; the others receive their shards by broadcast, so a
node holds one fp32 copy in host memory. `gathered` all-gathers every unit once for a whole rollout, so that
generation runs with no collectives. The functions marked "a collective" must be called by every rank.
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from transformers import (AutoConfig, GenerationConfig, Qwen2_5_VLForConditionalGeneration,
                          Qwen2VLForConditionalGeneration)


def setup_distributed():
    """Accelerate sets up device and process group; a lone process gets a 1-rank group so that
    FSDP2 wraps it like any other (one code path)."""
    acc = Accelerator(cpu=not torch.cuda.is_available())  # cpu=True: gloo group under a multi-process launch
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return acc


def rank0_print(*args):
    """print on rank 0 only; before the process group exists, the launcher's RANK decides."""
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
    if rank == 0:
        print(*args, flush=True)


# the policies this code trains, by config.json's model_type: Qwen2.5-VL (GRPO-CARE) and Qwen2-VL (SEED-Bench-R1's study)
MODEL_CLASSES = {"qwen2_5_vl": Qwen2_5_VLForConditionalGeneration, "qwen2_vl": Qwen2VLForConditionalGeneration}


def model_class(config):
    """The model class for `config` (a checkpoint's AutoConfig); ValueError naming any other model type."""
    if config.model_type not in MODEL_CLASSES:
        raise ValueError(f"model_type {config.model_type!r} is not supported (one of {', '.join(MODEL_CLASSES)})")
    return MODEL_CLASSES[config.model_type]


def load_model(path, cfg, device, trainable: bool):
    """A Qwen2.5-VL or Qwen2-VL (`model_class`) in fp32 (master weights), sharded with FSDP2 (`shard_model`);
    compute in bf16 when cfg.bf16. A collective.

    Rank 0 alone reads the checkpoint; the other ranks build the model on the meta device and
    receive their shards from rank 0, so host memory holds one fp32 copy (30 GB for 7B), not one
    per process (8 x 2 models x 30 GB on an 8-GPU node)."""
    config = AutoConfig.from_pretrained(path)
    rank0, cls = dist.get_rank() == 0, model_class(config)
    source = cls.from_pretrained(path, dtype=torch.float32, attn_implementation=cfg.attn_implementation) if rank0 else None
    with torch.device("meta"):
        model = cls._from_config(config, dtype=torch.float32, attn_implementation=cfg.attn_implementation)
    if (Path(path) / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.eval()  # as from_pretrained leaves it
    if trainable and cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.requires_grad_(trainable)
    shard_model(model, init_device_mesh(device.type, (dist.get_world_size(),)), cfg.bf16, trainable)
    model.to_empty(device=device)
    set_model_state_dict(model, source.state_dict() if rank0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for name, buffer in model.named_buffers():  # non-persistent (rotary frequencies): not in the state dict
        if rank0:
            buffer.copy_(source.get_buffer(name))
        dist.broadcast(buffer, src=0)
    return model


def shard_model(model, mesh, bf16: bool, trainable: bool) -> None:
    """FSDP2 in place: each vision block and each decoder layer (the model's own `_no_split_modules` classes), the
    vision tower, then the root; fp32 gradient reduction, bf16 compute when `bf16`."""
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for unit in [m for m in model.modules() if type(m).__name__ in model._no_split_modules]:
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    fully_shard(model.model.visual, mesh=mesh, mp_policy=mp)  # gathered only while vision is encoded
    # FSDP2 keeps the root unsharded after forward, for backward; a frozen model has no backward to reshard it
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=not trainable)
    for method in ("get_image_features", "get_video_features"):  # rollout.py encodes vision on its own
        register_fsdp_forward_method(model, method)
    # those methods return views (per-image splits); nothing modifies them in place, so FSDP2's warning is moot
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


@contextlib.contextmanager
def gathered(model):
    """All-gathers every FSDP unit once and keeps it until the block ends; a no-op without FSDP2.

    Sharded generation would all-gather every layer once per decoded token (for 7B in bf16 ~15 GB of traffic
    per token) and make all ranks decode in lock-step; gathered once, the rollout holds one full copy of the
    policy (~15 GB for 7B in bf16) and runs with no collectives. Assumes the non-root units reshard after
    forward (FSDP2's default) and restores that."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        if m is not model:  # the root keeps its own (auto) setting
            m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in units:
            if m is not model:
                m.set_reshard_after_forward(True, recurse=False)
            m.reshard()


def optimizer_step(policy, optimizer, max_grad_norm: float, loss: float) -> tuple[float, bool]:
    """Clips the gradient and steps AdamW unless the loss or the (all-reduced) norm is not finite, the same
    verdict on every rank; returns (grad norm, stepped). A collective."""
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
    grad_norm = (grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm).item()
    stepped = math.isfinite(grad_norm) and math.isfinite(loss)
    if stepped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, stepped


def all_reduce_named(values: dict[str, float], device, op=dist.ReduceOp.SUM) -> dict[str, float]:
    """`values` reduced over all processes (summed, or `op`) in one float64 all-reduce; the same names back.
    A collective."""
    t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return dict(zip(values, t.tolist()))
