"""Supervised fine-tuning on chain-of-thought rows: SEED-Bench-R1's SFT baseline, and the toy's warm start.

    python sft.py                                          # toy world: warm-starts the toy model, ~2 min on CPU
    accelerate launch sft.py --model_path Qwen/Qwen2.5-VL-7B-Instruct --data_root SEED-Bench-R1
    accelerate launch --config_file configs/fsdp_8gpu.yaml sft.py ...   # one node, 8 GPUs

Each row of `annotations/training_with_cot_6k.jsonl` becomes the training prompt (data.py: same options, same
shuffle, same media) followed by `<think>{cot}</think><answer>{X}</answer><|im_end|>`, X the letter at which the
CoT's chosen option (`cot_answer`, else `answer`) lands in this epoch's options; a Video-R1 file (rows with
`process`) works too. The loss is the mean cross-entropy over target tokens only, whose positions alone reach the
LM head, in chunks (rollout.completion_logprobs, as GRPO's update); <|im_end|> is a target, so the model learns to
stop. Step s takes rows [s*B*world, (s+1)*B*world) of the epoch's order, this rank every world-th, as
grpo_care.py. The result is a `save_pretrained` directory in --output_dir. Departures: DEPARTURES.md.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm
from transformers import AutoProcessor, get_cosine_schedule_with_warmup

import toy
from data import (LETTERS, Collator, DataError, check_media_dirs, check_prompt_lengths, load_examples, read_located_rows,
                  step_examples)
from budgets import UpdateLog, check_updates
from checkpoints import claim_output_dir, open_run_dir
from config import (RunAborted, RunConfig, int_ge, parse_run_config, plan_steps, redefault, run_cli, set_device_defaults,
                    setting, use_toy_world)
from distributed import all_reduce_named, load_model, optimizer_step, rank0_print, setup_distributed
from logs import write_logs
from rollout import Rollout, completion_logprobs, encode_vision

RESPONSE = "<think>{cot}</think><answer>{answer}</answer>"


def sft_response(example: dict) -> str:
    """The target text of one example, without the closing <|im_end|>. The answer is the letter of
    `cot_answer` (an option text) where given, else the example's solution."""
    answer = example["solution"]
    if example.get("cot_answer") is not None:
        if example["cot_answer"] not in example["options"]:
            raise DataError(f"sample {example['id']}: the CoT's answer {example['cot_answer']!r} is not among the options")
        answer = LETTERS[example["options"].index(example["cot_answer"])]
    return RESPONSE.format(cot=example["cot"], answer=answer)


def target_ids(targets: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Target ids -> right-padded `(B, R)` ids and their mask `(B, R)`, 1 on target tokens: the targets stand as
    completions after their prompts (rollout.Rollout), so that only their positions reach the LM head."""
    ids = pad_sequence([torch.tensor(t) for t in targets], batch_first=True, padding_value=pad_id)  # (B, R)
    mask = pad_sequence([torch.ones(len(t), dtype=torch.long) for t in targets], batch_first=True)  # (B, R)
    return ids, mask


def sft_loss(model, batch, targets: list[list[int]], pad_id: int, chunk_size: int) -> torch.Tensor:
    """Mean cross-entropy over the target tokens of the B prompts of `batch` (a data.Collator output), from
    rollout.completion_logprobs: the vision tower once, the LM head over target positions only, in checkpointed
    chunks, so no (B, prompt + target, vocab) logits exist (at 7B: ~1,400-token video prompts, 152,064 entries)."""
    ids, mask = (x.to(batch["input_ids"].device) for x in target_ids(targets, pad_id))
    B = len(targets)
    ro = Rollout(batch, torch.arange(B, device=ids.device), ids, mask, truncated=torch.zeros(B, dtype=torch.bool))
    logps = completion_logprobs(model, ro, encode_vision(model, batch), chunk_size)  # (B, R)
    return -(logps * mask).sum() / mask.sum()


@dataclass
class SFTConfig(RunConfig):  # the settings shared with grpo_care.Config: config.RunConfig; here the defaults that differ
    train_file: str = redefault(RunConfig, "train_file", "annotations/training_with_cot_6k.jsonl")
    output_dir: str = redefault(RunConfig, "output_dir", "outputs/sft")  # the fine-tuned model + processor
    learning_rate: float = redefault(RunConfig, "learning_rate", 1e-5)
    warmup_ratio: float = redefault(RunConfig, "warmup_ratio", 0.03)
    max_grad_norm: float = redefault(RunConfig, "max_grad_norm", 1.0)
    logprob_chunk: int = setting(256, "target tokens per LM-head chunk", int_ge(1))


SFT_FILES = ("metrics.jsonl", "config.json", "model.safetensors", "model.safetensors.index.json")  # a finished SFT


def parse_config(argv: list[str] | None = None) -> SFTConfig:
    """SFTConfig from `argv` (default sys.argv); --toy (the default without --model_path) applies toy.SFT_DEFAULTS."""
    return parse_run_config(SFTConfig, sys.argv[1:] if argv is None else argv, toy.SFT_DEFAULTS)


def rows_with_reasoning(train_path: Path, data_root, seed: int, shuffle_options: bool):
    """(rows, keep): every row of `train_path` checked (DataError names file:line), and whether each has a
    reasoning to imitate. A row with an empty `cot` (Video-R1: `process`) is skipped and reported, not fatal."""
    located = read_located_rows(train_path)
    examples = load_examples(train_path, data_root, seed, 0, shuffle_options)
    keep = [bool(ex["cot"]) for ex in examples]
    missing = [where for (where, _), k in zip(located, keep) if not k]
    if len(missing) == len(keep):
        raise DataError(f"{train_path}: no row has a reasoning ('cot', or Video-R1's 'process') to imitate")
    check_media_dirs([ex for ex, k in zip(examples, keep) if k], train_path)
    if missing:
        rank0_print(f"skipping {len(missing)} of {len(keep)} rows with no reasoning ('cot'/'process' empty or "
                    f"absent): {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}")
    return [r for _, r in located], keep


def main(argv: list[str] | None = None):
    cfg = parse_config(argv)
    device = setup_distributed().device
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(cfg.output_dir)
    claim_output_dir(out)  # held till the process ends: a second run into out/ stops here
    set_device_defaults(cfg, device)  # bf16, gradient checkpointing, attention kernel: where the flags left them unset
    if not cfg.model_path:
        use_toy_world(cfg)  # builds it (rank 0, cached) and points --model_path and --data_root at it
    torch.manual_seed(cfg.seed)

    # before any model is loaded: every row checked, the output dir
    train_path = Path(cfg.data_root) / cfg.train_file
    rows, keep = rows_with_reasoning(train_path, cfg.data_root, cfg.seed, cfg.shuffle_options)
    steps_per_epoch, total = plan_steps(sum(keep), cfg.prompts_per_device, world, cfg.num_epochs, cfg.max_steps,
                                        train_path)
    processor = AutoProcessor.from_pretrained(cfg.model_path)
    tok = processor.tokenizer
    check_prompt_lengths(load_examples(train_path, cfg.data_root, prompt_template=cfg.prompt_template), processor,
                         cfg.max_prompt_length)
    # last of the checks: a used output dir is refused, or cleared with --overwrite_output_dir
    open_run_dir(out, cfg, total, files=SFT_FILES)

    model = load_model(cfg.model_path, cfg, device, trainable=True)
    model.train()
    collate = Collator(processor, cfg.vision_spec(), cfg.max_prompt_length)
    updates = UpdateLog()

    def load_epoch(epoch: int) -> list[dict]:  # grpo_care's options and order: independent of the process count
        exs = load_examples(train_path, cfg.data_root, cfg.seed, epoch, cfg.shuffle_options, cfg.prompt_template)
        return [dict(ex, cot_answer=r.get("cot_answer")) for ex, r, k in zip(exs, rows, keep) if k]

    examples_for = step_examples(load_epoch, cfg.seed, cfg.prompts_per_device * world, steps_per_epoch, rank, world)

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total), total)
    rank0_print(f"SFT: {total} steps, {world} process(es) x {cfg.prompts_per_device} row(s), {len(rows)} rows, device={device}")
    last = None
    for step in (bar := tqdm(range(total), disable=rank != 0, desc="sft")):
        batch, kept = collate(examples_for(step))
        weight = 1.0
        if batch is None:  # every row unreadable: repeat the last batch at weight 0 so the ranks' collectives match
            if last is None:
                raise RunAborted(f"every sample of this process's first step is unreadable: "
                                 f"{'; '.join(f'{p}: {r}' for _, p, r in collate.failures[:3])}")
            (batch, kept), weight = last, 0.0
        last = (batch, kept)
        targets = [tok(sft_response(ex) + tok.eos_token, add_special_tokens=False).input_ids for ex in kept]
        loss = sft_loss(model, batch.to(device), targets, tok.pad_token_id, cfg.logprob_chunk)
        (loss * weight).backward()
        grad_norm, stepped = optimizer_step(model, optimizer, cfg.max_grad_norm, loss.item())  # no step if not finite
        scheduler.step()
        updates.add(step + 1, [stepped])
        check_updates(updates, cfg.max_nonfinite_streak, cfg.max_nonfinite_frac, lambda _: None)  # no checkpoints
        s = all_reduce_named(dict(loss=loss.item() * weight, weight=weight), device)  # the rows' mean over processes
        m = dict(step=step + 1, loss=s["loss"] / max(s["weight"], 1.0), grad_norm=grad_norm,
                 lr=scheduler.get_last_lr()[0], skipped=collate.skipped)
        write_logs(out, m, None)  # metrics.jsonl, by rank 0
        bar.set_postfix(loss=f"{m['loss']:.3f}")

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(out, state_dict=full)  # loadable by plain transformers
        processor.save_pretrained(out)
        rank0_print(f"skipped {collate.skipped} unreadable sample(s) and {keep.count(False)} row(s) without reasoning; "
                    f"{updates.summary()}")
        rank0_print(f"done: {out} (loss {m['loss']:.3f}), metrics in {out / 'metrics.jsonl'}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
