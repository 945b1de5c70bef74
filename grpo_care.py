"""GRPO-CARE training: the core math of the update, the config, and one straight loop.

    ./train.sh                                   # toy world, CPU, a few minutes
    accelerate launch grpo_care.py --model_path Qwen/Qwen2.5-VL-7B-Instruct --data_root SEED-Bench-R1
    accelerate launch --config_file configs/fsdp_8gpu.yaml grpo_care.py ...   # one node, 8 GPUs

One step: each process samples G completions for each of its `prompts_per_device` prompts, scores them
(accuracy + format + a consistency reward, by default CARE's bonus from the EMA reference), turns the rewards
into group-relative advantages and takes `num_iterations` clipped policy-gradient steps; every `ref_ema_every`
steps the EMA reference moves toward the policy. Each step appends a line to metrics.jsonl and, per sample, one
to completions.jsonl (text, rewards, confidence, bonus, advantage: what the update used). Each arm of the
paper's Table 3 is a set of flags (README). Core math as pure functions: `kl_token_weights` (the KL arms),
`policy_loss`, `ema_update_` (rewards: rewards.py); then the config, the phases, `main` (metrics: logs.py).
The machinery is distributed.py, checkpoints.py, config.py, budgets.py and logs.py; the same code runs for 1
process and N. Departures from the reference: DEPARTURES.md.
"""
from __future__ import annotations

import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from tqdm import tqdm
from transformers import AutoProcessor, get_cosine_schedule_with_warmup

import refgen
import rollout
import toy
from data import Collator, check_media_dirs, check_prompt_lengths, load_examples, step_examples
import budgets
import checkpoints
import logs
import memory
from config import (NONNEG, POSITIVE, ConfigError, RunConfig, between, int_ge, parse_run_config, plan_steps,
                    run_cli, set_device_defaults, setting, use_toy_world)
from distributed import all_reduce_named, load_model, optimizer_step, rank0_print, setup_distributed
from rewards import (accuracy_reward, accurate_samples, answer_confidence, consistency_bonus,
                     dense_consistency_reward, format_reward, group_advantages, refgen_consistency_reward, total_reward)

# --- core math of the update (pure functions) ---


def kl_token_weights(mask, beta, rows=None, answer_mask=None, beta_answer=0.0):
    """(N, T) weight of each token's k3 KL in the loss; `mask`, `answer_mask`: (N, T); `rows`: (N,) bool or None.

    The Table 3 arms are weightings of one per-token KL: GRPO and KL-EMA weigh every completion token
    beta / n_tokens (the mean over the sequence, as the reference); KL-EMA-HA keeps only the `rows` of
    high-accuracy samples (rewards.accurate_samples); SepKL-EMA-HA (`answer_mask` given) makes two terms,
    beta times the mean over the reasoning tokens (completion tokens outside the graded answer's span) plus
    beta_answer times the mean over the answer's tokens, so a one-token answer weighs as much as the
    reasoning instead of 1 / n_tokens of it."""
    mask = mask.to(torch.float32)  # (N, T)
    mean_over = lambda m: m / m.sum(-1, keepdim=True).clamp(min=1)  # noqa: E731  (N, T), rows sum to 1 (or 0)
    if answer_mask is None:
        weights = beta * mean_over(mask)  # (N, T)
    else:
        answer = answer_mask.to(torch.float32) * mask  # (N, T)
        weights = beta * mean_over(mask - answer) + beta_answer * mean_over(answer)  # (N, T)
    return weights if rows is None else weights * rows.to(weights.dtype).unsqueeze(-1)  # (N, T)


def policy_loss(logps, old_logps, advantages, mask, clip_eps=0.2, ref_logps=None, beta=0.0, kl_weights=None):
    """Clipped GRPO loss. `logps`, `old_logps`, `mask`, `ref_logps`, `kl_weights`: (N, T); `advantages`: (N,).

    The KL penalty is sum_t kl_weights * k3 per sequence, averaged over sequences; `kl_weights` default
    kl_token_weights(mask, beta): beta times the mean over each sequence's tokens. Returns (loss, stats);
    stats hold detached 0-d tensors (no host sync): `clip_frac`, `ratio_mean` and, when `ref_logps` is
    given, `kl` (the mean over sequences of the mean over tokens, whatever the weights).
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
    # Mean over each sequence's tokens, then over sequences (the reference's normalisation).
    loss = -((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    stats = {}
    if ref_logps is not None:
        assert ref_logps.shape == logps.shape, f"ref_logps {tuple(ref_logps.shape)} vs logps {tuple(logps.shape)}"
        k3 = lambda d: torch.exp(d) - d - 1  # noqa: E731  unbiased, always >= 0
        weights = kl_token_weights(mask, beta) if kl_weights is None else kl_weights.to(logps.dtype)  # (N, T)
        # d = 0 where a token's weight is 0 (padding, beta = 0, a row left out): an inf there would make 0 * inf = NaN
        on = (weights != 0) & (mask != 0)  # (N, T)
        loss = loss + (weights * k3(torch.where(on, ref_logps - logps, 0.0))).sum(-1).mean()
        kl = k3(torch.where(mask != 0, ref_logps - logps.detach(), 0.0))  # (N, T)
        stats["kl"] = (kl.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    n_tokens = mask.sum().clamp(min=1)
    stats["clip_frac"] = (((clipped < unclipped).to(mask.dtype) * mask).sum() / n_tokens).detach()
    stats["ratio_mean"] = ((ratio * mask).sum() / n_tokens).detach()
    return loss, stats


def ema_due(step: int, every: int) -> bool:
    """Whether the EMA reference moves after 0-based `step`: after every `every`-th step (the reference's schedule)."""
    return (step + 1) % every == 0


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


# --- config ---


@dataclass
class Config(RunConfig):  # the model, data, optimizer, media and system settings: config.RunConfig
    # rollouts
    num_generations: int = setting(8, "G, samples per prompt",
                                   ("an integer >= 2 (a group of 1 has no relative advantage)", lambda v: v >= 2))
    max_new_tokens: int = setting(768, "completion budget", int_ge(1))
    temperature: float = setting(1.0, "sampling temperature", POSITIVE)
    top_p: float = setting(0.95, "nucleus sampling", between(0, 1, lo_open=True))
    logprob_chunk: int = setting(256, "completion tokens per LM-head chunk", int_ge(1))
    # the update (learning rate, weight decay, clipping: RunConfig)
    num_iterations: int = setting(1, "mu, updates per rollout (1 = the reference)", int_ge(1))
    clip_eps: float = setting(0.2, "PPO clip range (inactive when mu = 1)", POSITIVE)
    beta: float = setting(0.0, "k3 KL weight to the reference (the reference: 0)", NONNEG)
    kl_reference: str = setting("initial", "the KL's reference: the frozen initial model or the EMA one",
                                ("initial or ema", lambda v: v in ("initial", "ema")))
    kl_on: str = setting("all", "the samples the KL weighs: all, or accurate (CARE's high-accuracy ones)",
                         ("all or accurate", lambda v: v in ("all", "accurate")))
    sep_kl_answer_coef: float | None = setting(None, "SepKL: a separate KL term, the mean over the graded answer's "
                                               "tokens, with this weight (beta weighs the reasoning's mean)",
                                               ("None or >= 0", lambda v: v is None or v >= 0))
    # the base reward
    answer_scorer: str = setting("exact", "multiple choice right when the answer is the letter (exact, the reference's) "
                                 "or starts with it (first_letter, SEED-Bench-R1 v1's)",
                                 ("exact or first_letter", lambda v: v in ("exact", "first_letter")))
    format_reward: bool = setting(True, "add the format reward (false: accuracy only, as SEED-Bench-R1 v1)")
    # the consistency reward (Table 3's arms), from the EMA reference
    consistency_reward: str = setting("care", "care (CARE's sparse bonus), dense (DenseCons), refgen (RefGen) or none",
                                      ("care, dense, refgen or none", lambda v: v in CONSISTENCY_REWARDS))
    bonus_coefficient: float = setting(0.5, "lambda: care coef * acc, dense coef * acc * p_ref, refgen coef * "
                                       "acc(regenerated)", NONNEG)
    confidence_upper_bound: float = setting(0.95, "cap on the reference's answer confidence",
                                            between(0, 1, lo_open=True))
    consistency_margin: float = setting(0.0, "confident = conf >= level - margin", between(0, 1))
    ref_ema_decay: float = setting(0.995, "EMA decay of the reference", between(0, 1))
    ref_ema_every: int = setting(10, "steps between EMA updates", int_ge(1))
    # the run
    save_steps: int = setting(500, "checkpoint every N steps (and at the end)", int_ge(1))
    resume_from_checkpoint: str | None = setting(None, "checkpoint dir, or 'latest'")
    max_skip_frac: float = setting(0.5, "abort past this unreadable fraction (1: never)", between(0, 1))
    report_to: str = setting("none", "'tensorboard' to also write event files",
                             ("none or tensorboard", lambda v: v in ("none", "tensorboard")))
    log_completions: bool = setting(True, "every sample and its rewards to completions.jsonl")

    # the arm of Table 3 these settings select
    def has_kl(self) -> bool:
        return self.beta > 0 or (self.sep_kl_answer_coef or 0) > 0

    def arm_kl(self) -> str:
        return f"on {self.kl_on} samples, to the {self.kl_reference} reference" if self.has_kl() else "none"

    def ema_reference(self) -> bool:
        """The reference moves toward the policy (CARE's EMA schedule) for every consistency reward and KL-EMA."""
        return self.consistency_reward != "none" or (self.has_kl() and self.kl_reference == "ema")

    def uses_reference(self) -> bool:
        """A second model is loaded: an EMA or frozen reference."""
        return self.consistency_reward != "none" or self.has_kl()


def parse_config(argv: list[str] | None = None) -> Config:
    """Config from `argv` (default sys.argv); --toy (the default without --model_path) applies toy.RL_DEFAULTS."""
    cfg = parse_run_config(Config, sys.argv[1:] if argv is None else argv, toy.RL_DEFAULTS)
    if not cfg.has_kl() and (cfg.kl_reference, cfg.kl_on, cfg.sep_kl_answer_coef) != ("initial", "all", None):
        raise ConfigError(f"--kl_reference {cfg.kl_reference} --kl_on {cfg.kl_on} --sep_kl_answer_coef "
                          f"{cfg.sep_kl_answer_coef}: shape a KL penalty, and there is none: set --beta > 0")
    if cfg.has_kl() and cfg.kl_reference == "initial" and cfg.consistency_reward != "none":
        raise ConfigError(f"--kl_reference initial: --consistency_reward {cfg.consistency_reward} moves the one "
                          "reference model (EMA); use --kl_reference ema, --beta 0 or --consistency_reward none")
    return cfg


CONSISTENCY_REWARDS = ("care", "dense", "refgen", "none")


# --- the phases of a step, each returning plain data ---


def sample_seed(seed: int, step: int, sample_id) -> int:
    """The generator seed of one prompt's G samples: a function of (run seed, step, sample id) only."""
    return random.Random(f"{seed}/{step}/{sample_id}").getrandbits(63)


def base_rewards(rollouts: list, examples: list[dict], G: int, scorer: str = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    """(accuracy, format), each `(B, G)`: every completion graded against its prompt's solution, by problem type
    (multiple choice by `scorer`: rewards.accuracy_reward)."""
    acc = [accuracy_reward(ro.texts, [ex["solution"]] * G, [ex["problem_type"]] * G, scorer)
           for ro, ex in zip(rollouts, examples)]
    fmt = [format_reward(ro.texts) for ro in rollouts]
    return torch.tensor(acc).view(-1, G), torch.tensor(fmt).view(-1, G)


@torch.no_grad()
def reference_logprobs(ref, rollouts: list, chunk: int) -> list[torch.Tensor]:
    """(G, T) completion log-probs of each rollout under the reference, which encodes the vision itself."""
    out = []
    for ro in rollouts:
        mm = rollout.encode_vision(ref, ro.batch)  # the reference's own weights: its own encoding
        ro.vision_calls += bool(mm)
        out.append(rollout.completion_logprobs(ref, ro, mm, chunk_size=chunk))  # (G, T)
    return out


def answer_confidences(rollouts: list, ref_logps: list, tokenizer, upper_bound: float, G: int) -> torch.Tensor:
    """(B, G): the reference's confidence in each sampled answer, over the graded answer's tokens."""
    spans = [rollout.answer_span_mask(ro.completion_ids, tokenizer, ro.completion_mask) for ro in rollouts]  # (G, T)
    conf = [answer_confidence(lp.float().cpu(), span.cpu(), upper_bound) for lp, span in zip(ref_logps, spans)]  # (G,)
    return torch.stack(conf) if conf else torch.zeros(0, G)


def consistency_reward(arm: str, accuracy, confidence, regenerated, coef: float, margin: float) -> torch.Tensor:
    """(B, G): the arm's consistency reward (`confidence`, `regenerated`: (B, G), or None where the arm needs none)."""
    return {"care": lambda: consistency_bonus(accuracy, confidence, coef, margin),
            "dense": lambda: dense_consistency_reward(accuracy, confidence, coef),
            "refgen": lambda: refgen_consistency_reward(regenerated, coef),
            "none": lambda: torch.zeros_like(accuracy)}[arm]()


def sample_kl_weights(rollouts: list, accuracy, tokenizer, beta: float, kl_on: str,
                      sep_answer_coef: float | None) -> list[torch.Tensor]:
    """(G, T) per prompt: kl_token_weights for the arm (all samples or the accurate ones; one term, or
    reasoning and answer apart)."""
    rows = accurate_samples(accuracy) if kl_on == "accurate" else [None] * len(rollouts)  # (B, G)
    return [kl_token_weights(ro.completion_mask, beta, None if r is None else r.to(ro.completion_mask.device),
                             None if sep_answer_coef is None else
                             rollout.answer_span_mask(ro.completion_ids, tokenizer, ro.completion_mask),
                             sep_answer_coef or 0.0) for ro, r in zip(rollouts, rows)]


def accumulate_policy_gradients(policy, rollouts: list, advantages, old_logps, ref_logps, clip_eps: float,
                                beta: float, chunk: int, kl_weights: list | None = None) -> tuple[float, float]:
    """Backpropagates this process's loss, the mean over its B prompts of each prompt's policy_loss; returns the
    sums over prompts of the loss and the clip fraction. `advantages` (B, G); `old_logps`, `ref_logps`,
    `kl_weights`: one (G, T) per prompt, or None (old = the log-probs themselves, detached: mu = 1; no KL;
    beta / n_tokens)."""
    loss_sum = clip_sum = 0.0
    for i, ro in enumerate(rollouts):
        mm = rollout.encode_vision(policy, ro.batch)  # once per prompt per iteration, with gradient
        ro.vision_calls += bool(mm)
        logps = rollout.completion_logprobs(policy, ro, mm, chunk_size=chunk)  # (G, T)
        old = logps.detach() if old_logps is None else old_logps[i]
        loss, stats = policy_loss(logps, old, advantages[i].to(logps.device), ro.completion_mask, clip_eps,
                                  None if ref_logps is None else ref_logps[i], beta,
                                  None if kl_weights is None else kl_weights[i])
        (loss / len(rollouts)).backward()  # the mean over this process's prompts; FSDP2 averages the processes
        loss_sum, clip_sum = loss_sum + loss.item(), clip_sum + stats["clip_frac"].item()
    return loss_sum, clip_sum


def policy_update(policy, optimizer, rollouts: list, advantages, ref_logps, num_iterations: int, clip_eps: float,
                  beta: float, max_grad_norm: float, chunk: int, kl_weights: list | None = None) -> dict:
    """`num_iterations` clipped policy-gradient steps on one rollout. Returns the per-prompt sums of the loss and
    clip fraction (each averaged over the iterations), the last grad norm and, per iteration, whether it stepped
    (False: skipped as non-finite)."""
    policy.train()
    old = None
    if num_iterations > 1:  # the sampling policy's log-probs, with the generation's vision features
        with torch.no_grad():
            old = [rollout.completion_logprobs(policy, ro, ro.mm, chunk_size=chunk) for ro in rollouts]
    out = dict(loss=0.0, clip_frac=0.0, grad_norm=0.0, stepped=[])
    for _ in range(num_iterations):
        loss, clip = accumulate_policy_gradients(policy, rollouts, advantages, old, ref_logps, clip_eps, beta, chunk,
                                                 kl_weights)
        out["grad_norm"], stepped = optimizer_step(policy, optimizer, max_grad_norm, loss)
        out["loss"], out["clip_frac"] = out["loss"] + loss / num_iterations, out["clip_frac"] + clip / num_iterations
        out["stepped"].append(stepped)
    return out


# --- the training loop ---


def main(argv: list[str] | None = None):
    cfg = parse_config(argv)
    device = setup_distributed().device
    rank, world, G = dist.get_rank(), dist.get_world_size(), cfg.num_generations
    out = Path(cfg.output_dir)
    checkpoints.claim_output_dir(out)  # held till the process ends: a second run into out/ stops here
    set_device_defaults(cfg, device)  # bf16, gradient checkpointing, attention kernel: where the flags left them unset
    if not cfg.model_path:
        use_toy_world(cfg)  # builds it (rank 0, cached) and points --model_path and --data_root at it
    torch.manual_seed(cfg.seed)

    # --- before any model is loaded: every annotation row, the output dir and the resume point checked ---
    train_path = Path(cfg.data_root) / cfg.train_file
    # a malformed row: DataError naming file:line, field
    all_examples = load_examples(train_path, cfg.data_root, prompt_template=cfg.prompt_template)
    check_media_dirs(all_examples, train_path)
    steps_per_epoch, total_steps = plan_steps(len(all_examples), cfg.prompts_per_device, world, cfg.num_epochs,
                                              cfg.max_steps, train_path)
    processor = AutoProcessor.from_pretrained(cfg.model_path)  # its tokenizer decodes and finds answer spans
    check_prompt_lengths(all_examples, processor, cfg.max_prompt_length)  # a 5 MB question: refused here
    # the last check, as --overwrite_output_dir clears the old run: a collective, checkpoints verified
    ckpt, saved = checkpoints.open_run_dir(out, cfg, total_steps)

    # --- models: the policy, and the reference: EMA (a consistency reward, KL-EMA) or frozen (GRPO's KL) ---
    memory.print_plan(cfg, device)  # on a GPU: the per-GPU memory plan, and a warning if it does not fit
    policy = load_model(cfg.model_path, cfg, device, trainable=True)
    ref = load_model(cfg.model_path, cfg, device, trainable=False).eval() if cfg.uses_reference() else None

    # --- data: a fixed order per epoch; step s takes prompts [s*B, (s+1)*B) of it, this rank every world-th ---
    collate = Collator(processor, cfg.vision_spec(), cfg.max_prompt_length)
    prompts_for = step_examples(  # options reshuffled per epoch, order seeded per epoch
        lambda epoch: load_examples(train_path, cfg.data_root, cfg.seed, epoch, cfg.shuffle_options,
                                    cfg.prompt_template),
        cfg.seed, cfg.prompts_per_device * world, steps_per_epoch, rank, world)

    # --- optimizer, schedule, resume ---
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    start = checkpoints.load_checkpoint(ckpt, policy, ref, optimizer, scheduler) if ckpt else 0
    rank0_print(f"GRPO-CARE: {total_steps} steps, {world} process(es) x {cfg.prompts_per_device} prompt(s) x G={G}, "
                f"consistency reward {cfg.consistency_reward}, KL {cfg.arm_kl()}, device={device}")
    counters = saved.get("counters", {})  # carried through resume, like the weights
    skips, updates = budgets.SkipLog(**counters.get("skips", {})), budgets.UpdateLog(**counters.get("updates", {}))
    writer = logs.tensorboard_writer(out, cfg.report_to == "tensorboard")

    for step in (bar := tqdm(range(start, total_steps), initial=start, total=total_steps, disable=rank != 0,
                             desc="grpo-care")):
        # --- rollouts: G samples per prompt, all of this process's prompts in one generate call ---
        t0 = time.perf_counter()
        policy.eval()
        # a collective: unreadable samples counted over all ranks; every rank keeps as many prompts as the fewest
        examples, batches, skipped = budgets.readable_prompts(prompts_for(step), collate, skips, cfg.max_skip_frac,
                                                              step + 1 == total_steps, device)
        with torch.no_grad():  # each prompt's samples from its own seed
            rollouts = rollout.generate_groups(policy, batches, G, processor, max_new_tokens=cfg.max_new_tokens,
                                               temperature=cfg.temperature, top_p=cfg.top_p,
                                               seeds=[sample_seed(cfg.seed, step, ex["id"]) for ex in examples])
        t_gen, t0 = time.perf_counter() - t0, time.perf_counter()

        # --- rewards: accuracy + format ---
        acc, fmt = base_rewards(rollouts, examples, G, cfg.answer_scorer)  # (B, G) each

        # --- reference: the samples' log-probs (CARE, DenseCons, a KL), its capped answer confidence from them ---
        reads = cfg.consistency_reward in ("care", "dense") or cfg.has_kl()
        ref_logps = reference_logprobs(ref, rollouts, cfg.logprob_chunk) if reads else None  # B x (G, T)
        conf = answer_confidences(rollouts, ref_logps, processor, cfg.confidence_upper_bound, G) \
            if reads else None  # (B, G)
        regenerated = refgen.regenerated_accuracy(ref, rollouts, examples, processor, cfg.seed, step, G,
                                                  cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                                                  cfg.answer_scorer) \
            if cfg.consistency_reward == "refgen" else None  # (B, G)

        # --- consistency reward (the arm's): CARE's sparse bonus, DenseCons, RefGen or none (zeros) ---
        bonus = consistency_reward(cfg.consistency_reward, acc, conf, regenerated, cfg.bonus_coefficient,
                                   cfg.consistency_margin)  # (B, G)

        # --- advantages: each reward relative to its group ---
        rewards = total_reward(acc, fmt if cfg.format_reward else torch.zeros_like(fmt), bonus)  # (B, G)
        advantages = group_advantages(rewards)  # (B, G)
        t_ref, t0 = time.perf_counter() - t0, time.perf_counter()

        # --- update: mu clipped policy-gradient steps on this rollout, the KL weighted as the arm says ---
        kl_weights = sample_kl_weights(rollouts, acc, processor, cfg.beta, cfg.kl_on, cfg.sep_kl_answer_coef) \
            if cfg.has_kl() else None  # B x (G, T)
        update = policy_update(policy, optimizer, rollouts, advantages, ref_logps if cfg.has_kl() else None,
                               cfg.num_iterations, cfg.clip_eps, cfg.beta, cfg.max_grad_norm, cfg.logprob_chunk,
                               kl_weights)
        scheduler.step()
        updates.add(step + 1, update["stepped"])
        if not all(update["stepped"]):  # every rank sees the same all-reduced norm, so all skip together
            rank0_print(f"step {step + 1}: non-finite loss or gradient norm ({update['grad_norm']}), update skipped")

        # --- EMA: the reference moves toward the policy every ref_ema_every steps ---
        if cfg.ema_reference() and ema_due(step, cfg.ref_ema_every):
            ema_update_(ref.parameters(), policy.parameters(), cfg.ref_ema_decay)
        t_upd = time.perf_counter() - t0

        # --- log: named sums over all processes (collectives), one metrics.jsonl line per step ---
        lengths = torch.stack([ro.completion_mask.sum(-1).float().cpu() for ro in rollouts]) \
            if rollouts else torch.zeros(0, G)  # (B, G)
        truncated = torch.stack([ro.truncated.float().cpu() for ro in rollouts]) if rollouts else torch.zeros(0, G)
        sums = all_reduce_named(dict(logs.group_sums(acc, fmt, conf, bonus, rewards, lengths, truncated),
                                     loss=update["loss"], clip_frac=update["clip_frac"],
                                     vision_calls=sum(ro.vision_calls for ro in rollouts), skipped=skipped,
                                     t_generation=t_gen, t_reference=t_ref, t_update=t_upd), device)
        sums |= all_reduce_named(dict(completion_len_max=lengths.max() if rollouts else 0), device, dist.ReduceOp.MAX)
        metrics = logs.step_metrics(sums, world, step + 1, update["grad_norm"], scheduler.get_last_lr()[0],
                                    skips.skipped, updates.skipped)
        records = logs.completion_records(step + 1, examples, rollouts, dict(
            accuracy=acc, format=fmt, confidence=conf, bonus=bonus, reward=rewards, advantage=advantages)) \
            if cfg.log_completions else None
        logs.write_logs(out, metrics, records, writer)  # a collective: rank 0 gathers the completions
        bar.set_postfix(reward=f"{metrics['reward_mean']:.2f}", acc=f"{metrics['accuracy']:.2f}",
                        bonus=f"{metrics['bonus_mean']:.2f}")

        # --- checkpoint (a collective), unless too many updates were skipped: the weights have diverged ---
        budgets.check_updates(updates, cfg.max_nonfinite_streak, cfg.max_nonfinite_frac,
                              lambda first_bad: checkpoints.last_checkpoint_before(out, first_bad))
        if (step + 1) % cfg.save_steps == 0 or step + 1 == total_steps:
            checkpoints.save_checkpoint(out, step + 1, policy, ref, optimizer, scheduler, processor, cfg,
                                        counters=dict(skips=asdict(skips), updates=asdict(updates)))

    rank0_print(skips.summary())
    rank0_print(updates.summary())
    if rank == 0 and (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size:
        logs.plot_metrics(out / "metrics.jsonl", out / "curves.png")
        rank0_print(f"done: {out}/checkpoint-{total_steps}, metrics in {out}/metrics.jsonl, curves in {out}/curves.png")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
