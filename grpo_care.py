"""GRPO-CARE training: the Config and the training loop come below the core math.

Core math of the update, as pure functions (tensors in, tensors out, no model, no config):
- `policy_loss`: the clipped GRPO surrogate with optional k3 KL. The reference runs one
  update per rollout (old = current policy), where clipping never acts; keeping the clip
  lets a run reuse a rollout for several updates. With `old_logps = logps.detach()` it
  is exactly the reference's loss. The reference clamps `ref - logp` to [-10, 10] inside
  the KL; we do not, so the KL is the plain k3 estimator. An all-masked row counts as
  zero (the reference would divide by 0).
- `ema_update_`: the EMA reference model. The reference lerps in the reference model's
  own dtype (bf16 when loaded in bf16), where small updates round away; we keep the EMA
  in fp32 and update FSDP2 shards locally.
"""

import torch
from torch.distributed.tensor import DTensor

# --- core math of the update (pure functions) ---


def policy_loss(logps, old_logps, advantages, mask, clip_eps=0.2, ref_logps=None, beta=0.0):
    """Clipped GRPO loss. `logps`, `old_logps`, `mask`, `ref_logps`: (N, T); `advantages`: (N,).

    Returns (loss, stats); stats hold detached 0-d tensors (no host sync): `clip_frac`,
    `ratio_mean` and, when `ref_logps` is given, `kl`.
    """
    assert logps.shape == old_logps.shape == mask.shape, (
        f"logps {tuple(logps.shape)}, old_logps {tuple(old_logps.shape)}, mask {tuple(mask.shape)} must match")
    assert advantages.shape == logps.shape[:1], f"advantages {tuple(advantages.shape)} must be ({logps.shape[0]},)"
    mask = mask.to(logps.dtype)  # (N, T)
    adv = advantages.unsqueeze(-1)  # (N, 1)
    ratio = torch.exp(logps - old_logps)  # (N, T)
    unclipped = ratio * adv  # (N, T)
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv  # (N, T)
    per_token = torch.minimum(unclipped, clipped)  # (N, T), pessimistic bound
    stats = {}
    if ref_logps is not None:
        assert ref_logps.shape == logps.shape, f"ref_logps {tuple(ref_logps.shape)} vs logps {tuple(logps.shape)}"
        delta = ref_logps - logps  # (N, T)
        kl = torch.exp(delta) - delta - 1  # (N, T), k3: unbiased, always >= 0
        if beta != 0.0:  # skip rather than add 0 * kl, which is NaN where kl is inf
            per_token = per_token - beta * kl
        stats["kl"] = ((kl * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean().detach()
    # Mean over each sequence's tokens, then over sequences (the reference's normalisation).
    loss = -((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    n_tokens = mask.sum().clamp(min=1)
    stats["clip_frac"] = (((clipped < unclipped).to(mask.dtype) * mask).sum() / n_tokens).detach()
    stats["ratio_mean"] = ((ratio * mask).sum() / n_tokens).detach()
    return loss, stats


@torch.no_grad()
def ema_update_(ema_params, params, decay):
    """In place, `ema <- decay * ema + (1 - decay) * theta`, parameter by parameter.

    Keep the EMA in fp32 even when the policy runs in bf16: at decay 0.995 the step
    0.005 * (theta - ema) is below half a bf16 ulp of ema, so a bf16 EMA never moves.
    FSDP2 DTensors are updated on their local shards: both models are sharded alike,
    so no gather and no communication is needed.
    """
    ema_params, params = list(ema_params), list(params)
    assert len(ema_params) == len(params), f"{len(ema_params)} EMA params vs {len(params)} params"
    for ema, p in zip(ema_params, params):
        ema = ema.to_local() if isinstance(ema, DTensor) else ema
        p = p.to_local() if isinstance(p, DTensor) else p
        assert ema.shape == p.shape, f"EMA shard {tuple(ema.shape)} vs param shard {tuple(p.shape)}"
        ema.lerp_(p.to(ema.dtype), 1.0 - decay)
