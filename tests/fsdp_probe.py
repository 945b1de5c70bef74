"""Run grpo_care.main under torchrun and report whether the policy and the EMA reference are sharded."""
import sys

import torch.distributed as dist
from torch.distributed.tensor import DTensor

import grpo_care

real = grpo_care.load_model


def probe(*a, **k):
    model = real(*a, **k)
    name = "policy" if k["trainable"] else "ref"
    p = next(model.model.language_model.layers[0].parameters())
    if dist.get_rank() == 0:
        print(f"{name} DTensor: {isinstance(p, DTensor)} world {dist.get_world_size()}", flush=True)
    return model


grpo_care.load_model = probe
grpo_care.main(sys.argv[1:])
