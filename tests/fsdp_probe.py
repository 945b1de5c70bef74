"""Run grpo_care.main under torchrun; report whether the policy and the EMA reference are sharded,
and how many times each rank read the checkpoint."""
import sys

import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import Qwen2_5_VLForConditionalGeneration

import grpo_care

real = grpo_care.load_model
reads = []
read_checkpoint = Qwen2_5_VLForConditionalGeneration.from_pretrained.__func__


def counted(cls, *a, **k):
    reads.append(a[0])
    return read_checkpoint(cls, *a, **k)


def probe(*a, **k):
    model = real(*a, **k)
    name = "policy" if k["trainable"] else "ref"
    p = next(model.model.language_model.layers[0].parameters())
    if dist.get_rank() == 0:
        print(f"{name} DTensor: {isinstance(p, DTensor)} world {dist.get_world_size()}", flush=True)
    print(f"rank {dist.get_rank()} checkpoint reads: {len(reads)}", flush=True)
    return model


Qwen2_5_VLForConditionalGeneration.from_pretrained = classmethod(counted)
grpo_care.load_model = probe
grpo_care.main(sys.argv[1:])
