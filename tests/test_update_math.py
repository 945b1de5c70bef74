"""Core math of the GRPO-CARE update (grpo_care.py): the clipped policy loss and the EMA."""

import math

import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

from grpo_care import ema_update_, policy_loss


def leaf(*rows):
    return torch.tensor(rows, dtype=torch.float32, requires_grad=True)


# --- policy_loss --------------------------------------------------------------------


def test_ratio_inside_band_equals_unclipped_loss():
    old = torch.tensor([[-1.0, -2.0]])
    logps = leaf([-0.9, -2.1])  # ratios exp(0.1)=1.105171, exp(-0.1)=0.904837: inside [0.8, 1.2]
    loss, stats = policy_loss(logps, old, torch.tensor([2.0]), torch.ones(1, 2))
    # -(2*1.105171 + 2*0.904837)/2 = -2.010008
    assert_close(loss, torch.tensor(-2.010008), atol=1e-6, rtol=1e-6)
    assert_close(stats["clip_frac"], torch.tensor(0.0))
    assert_close(stats["ratio_mean"], torch.tensor(1.005004), atol=1e-6, rtol=1e-6)  # (1.105171+0.904837)/2
    assert "kl" not in stats
    assert not stats["ratio_mean"].requires_grad


def test_old_equals_detached_logps_is_reference_loss():
    logps = leaf([-0.5, -1.5, -3.0], [-0.2, -0.7, -9.0])
    adv, mask = torch.tensor([1.5, -0.5]), torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    loss, _ = policy_loss(logps, logps.detach(), adv, mask)
    # the reference: exp(logp - logp.detach()) * A, masked mean per sequence, mean over sequences
    ref = torch.exp(logps - logps.detach()) * adv.unsqueeze(1)
    ref_loss = ((-ref * mask).sum(1) / mask.sum(1)).mean()
    assert_close(loss, ref_loss)
    assert_close(loss, torch.tensor(-0.5))  # ratio 1: -(1.5 + (-0.5))/2


def test_clipped_tokens_have_zero_gradient():
    # token 0: ratio 1.5 > 1.2 with A>0 -> clipped; token 1: ratio 1.1, inside the band
    logps = leaf([math.log(1.5), math.log(1.1)])
    loss, stats = policy_loss(logps, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2))
    loss.backward()
    # loss = -(1.2*1 + 1.1*1)/2 = -1.15; d/dlogp_1 = -(ratio*A)/2 = -0.55
    assert_close(loss, torch.tensor(-1.15))
    assert_close(logps.grad, torch.tensor([[0.0, -0.55]]))
    assert_close(stats["clip_frac"], torch.tensor(0.5))

    # token 0: ratio 0.5 < 0.8 with A<0 -> clipped; token 1: ratio 1.5 > 1.2 with A<0 is NOT
    # clipped (the min keeps the worse, unclipped term -1.5 < -1.2)
    logps = leaf([math.log(0.5), math.log(1.5)])
    loss, stats = policy_loss(logps, torch.zeros(1, 2), torch.tensor([-1.0]), torch.ones(1, 2))
    loss.backward()
    # loss = -(0.8*-1 + 1.5*-1)/2 = 1.15; d/dlogp_1 = -(1.5*-1)/2 = 0.75
    assert_close(loss, torch.tensor(1.15))
    assert_close(logps.grad, torch.tensor([[0.0, 0.75]]))
    assert_close(stats["clip_frac"], torch.tensor(0.5))


def test_gradient_at_ratio_one_is_reinforce():
    # A small softmax policy so that grad logp is a real parameter gradient.
    torch.manual_seed(0)
    W = torch.randn(5, 7, requires_grad=True)
    x = torch.randn(2, 3, 5)  # (N, T, d)
    tokens = torch.randint(0, 7, (2, 3))  # (N, T)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # |o_1| = 3, |o_2| = 2
    adv = torch.tensor([1.5, -0.5])

    def logps_fn():
        return torch.log_softmax(x @ W, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (N, T)

    logps = logps_fn()
    loss, _ = policy_loss(logps, logps.detach(), adv, mask)
    (grad,) = torch.autograd.grad(loss, W)
    # REINFORCE: -(1/N) sum_i A_i / |o_i| sum_t grad logp_it
    reinforce = -(adv[0] / 3 * logps_fn()[0].sum() + adv[1] / 2 * logps_fn()[1, :2].sum()) / 2
    (expected,) = torch.autograd.grad(reinforce, W)
    assert_close(grad, expected)

    # and per token, w.r.t. the log-probs themselves: -A_i / |o_i| / N
    lp = leaf([-1.0, -2.0, -3.0], [-1.0, -2.0, -3.0])
    loss, _ = policy_loss(lp, lp.detach(), adv, mask)
    loss.backward()
    # row 1: -1.5/3/2 = -0.25; row 2: 0.5/2/2 = 0.125, masked token 0
    assert_close(lp.grad, torch.tensor([[-0.25, -0.25, -0.25], [0.125, 0.125, 0.0]]))


def test_masked_tokens_contribute_nothing():
    old = torch.tensor([[-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    a = leaf([-1.0, -0.9, -1.0])
    b = leaf([-1.0, -0.9, 40.0])  # an absurd ratio e^41 on the masked token
    loss_a, stats_a = policy_loss(a, old, torch.tensor([1.0]), mask)
    loss_b, stats_b = policy_loss(b, old, torch.tensor([1.0]), mask)
    (loss_a + loss_b).backward()
    # -(1 + 1.105171)/2 = -1.052585 either way; the mean is over the 2 unmasked tokens
    assert_close(loss_a, torch.tensor(-1.052585), atol=1e-6, rtol=1e-6)
    assert_close(loss_b, loss_a)
    assert_close(stats_b["ratio_mean"], stats_a["ratio_mean"])
    assert b.grad[0, 2] == 0.0


def test_k3_kl_term():
    logps = leaf([-1.0, -2.0])
    ref = torch.tensor([[-0.5, -2.0]])
    loss, stats = policy_loss(logps, logps.detach(), torch.tensor([0.0]), torch.ones(1, 2), ref_logps=ref, beta=0.1)
    # token 0: d = ref - logp = 0.5 -> e^0.5 - 0.5 - 1 = 0.148721; token 1: d = 0 -> 0
    # kl = 0.074361; with A = 0 the loss is +beta*kl = 0.0074361
    assert_close(stats["kl"], torch.tensor(0.074361), atol=1e-6, rtol=1e-6)
    assert_close(loss, torch.tensor(0.0074361), atol=1e-7, rtol=1e-6)
    # beta = 0 reports the KL but leaves the loss alone
    loss0, stats0 = policy_loss(logps, logps.detach(), torch.tensor([0.0]), torch.ones(1, 2), ref_logps=ref)
    assert_close(loss0, torch.tensor(0.0))
    assert_close(stats0["kl"], stats["kl"])


def test_policy_loss_checks_shapes():
    x = torch.zeros(2, 3)
    with pytest.raises(AssertionError, match="advantages"):
        policy_loss(x, x, torch.zeros(2, 1), x)
    with pytest.raises(AssertionError, match="mask"):
        policy_loss(x, x, torch.zeros(2), torch.zeros(2, 4))


# --- ema_update_ --------------------------------------------------------------------


def test_ema_decay_zero_copies_and_decay_one_is_noop():
    ema = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    theta = [torch.tensor([5.0, -7.0], dtype=torch.bfloat16), torch.tensor([[0.125]])]
    ema_update_(ema, theta, decay=1.0)
    assert_close(ema, [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])], atol=0.0, rtol=0.0)
    ema_update_(ema, theta, decay=0.75)
    # 0.75*ema + 0.25*theta: (0.75+1.25, 1.5-1.75), (2.25+0.03125)
    assert_close(ema, [torch.tensor([2.0, -0.25]), torch.tensor([[2.28125]])], atol=0.0, rtol=0.0)
    ema_update_(ema, theta, decay=0.0)
    assert_close(ema, [torch.tensor([5.0, -7.0]), torch.tensor([[0.125]])], atol=0.0, rtol=0.0)
    assert ema[0].dtype == torch.float32  # the EMA keeps its own dtype
    with pytest.raises(AssertionError, match="shard"):
        ema_update_([torch.zeros(2)], [torch.zeros(3)], 0.5)


@pytest.mark.parametrize("drift, growth", [(1.01, 2.7065), (1.001, 1.0796)])
def test_ema_fp32_tracks_fp64_while_bf16_falls_behind(drift, growth):
    # growth of an EMA (decay 0.995) of w * drift^t over t = 1..200, from w:
    #   0.995^200 + 0.005 * sum_t 0.995^(200-t) drift^t = 0.367 + 2.340 = 2.7065 (1 %/step)
    #                                                   = 0.367 + 0.713 = 1.0796 (0.1 %/step)
    torch.manual_seed(0)
    master = torch.randn(4096).abs() + 0.5  # fp32 master weights of a bf16 policy
    start = master.to(torch.bfloat16)
    ema32, ema16, ema64 = start.float(), start.clone(), start.double()
    worst_lag = 0.0
    for step in range(1, 201):
        master *= drift
        policy = master.to(torch.bfloat16)  # the policy as it runs, cast each step
        ema_update_([ema32], [policy], 0.995)
        ema_update_([ema16], [policy], 0.995)  # the trap: the same update, stored in bf16
        ema64 = 0.995 * ema64 + 0.005 * policy.double()
        worst_lag = max(worst_lag, ((ema64 - ema16.double()) / ema64).mean().item())
        if step == 25:
            # a step of at most 0.005 * (1.01^25 - 1) = 0.14 % of ema is below half a bf16
            # ulp (0.2-0.4 %): every update so far rounded away, the bf16 EMA has not moved
            assert torch.equal(ema16, start)
    # Not vacuous: the exact EMA really moved (within 1 %: start and policy are bf16-rounded).
    assert_close(ema64 / start.double(), torch.full_like(ema64, growth), atol=0.0, rtol=1e-2)
    assert_close(ema32.double(), ema64, atol=0.0, rtol=1e-5)
    # bf16 stays frozen until the policy is ~40-80 % ahead, so at 0.1 %/step it never moves
    # (lag 1 - 1/1.0796 = 7.4 %); at 1 %/step it gets there by step ~46 (lag ~4 %) and then
    # catches up in one-ulp jumps.
    assert worst_lag > 0.03, f"bf16 EMA never fell behind: worst lag {worst_lag:.4f}"


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_ema_update_on_fsdp2_dtensor_shards_without_communication(tmp_path, monkeypatch):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        # as FSDP2 holds them: parameters that are DTensors sharded on dim 0
        ema = torch.nn.Parameter(distribute_tensor(torch.zeros(4, 2), mesh, [Shard(0)]), requires_grad=False)
        theta = torch.nn.Parameter(distribute_tensor(torch.ones(4, 2, dtype=torch.bfloat16), mesh, [Shard(0)]))
        # on one rank a gather would be a silent no-op, so forbid the gathering calls outright
        for name in ("full_tensor", "redistribute"):
            monkeypatch.setattr(DTensor, name, lambda *a, **k: pytest.fail("EMA update gathered a DTensor"))
        with CommDebugMode() as comm:
            ema_update_([ema], [theta], decay=0.75)
        assert comm.get_total_counts() == 0
        assert isinstance(ema, DTensor) and ema.dtype == torch.float32
        assert_close(ema.to_local(), torch.full((4, 2), 0.25))  # 0.75*0 + 0.25*1
        assert theta.grad is None
    finally:
        dist.destroy_process_group()
