"""Benchmark (not a test): one RL step of ours vs one step of TRL's `GRPOTrainer`, side by side on CPU.

    python3 -m venv .venv-bench && .venv-bench/bin/pip install -r requirements.txt -r bench/requirements.txt
    .venv-bench/bin/python bench/vs_trl.py                 # both vocabularies, 1 and 4 prompts per step; writes BENCHMARKS.md
    .venv-bench/bin/python bench/vs_trl.py --vocab toy --no_write              # ~6 min on 2 cores
    .venv-bench/bin/python bench/vs_trl.py --vocab toy --prompts 4 --no_write

TRL is installed only for this benchmark, in its own venv (bench/requirements.txt); the project never
imports it. Both sides get the same tiny Qwen2.5-VL (toy.py; at the toy vocabulary of 704 and at the
real 152,064 on the same hidden size 64), the same image-only prompts (toy images upscaled to the
reference's 448x448 image budget: 256 vision tokens), G = 8, 1 and 4 prompts per step (`--prompts`; TRL:
per_device_train_batch_size = prompts x G), fp32 on CPU,
exactly `--max_new_tokens` sampled tokens per completion (EOS suppressed by min_new_tokens on both
sides), beta = 0 and no reference model, one update per rollout, AdamW, no gradient checkpointing,
the same thread count and seed. Each side runs in its own subprocess (so one side's allocations
cannot show up in the other's peak RSS): a warm-up step, then `--steps` timed steps; we report medians.

Ours is the training loop's own code with consistency_reward="none": grpo_care.load_model (FSDP2 over a 1-process
gloo group), data.Collator, rollout.generate_groups (the P x G rows of P prompts in one call),
grpo_care.base_rewards, rewards.group_advantages, then the two parts of grpo_care.policy_update:
accumulate_policy_gradients (vision with gradient, completion log-probs, backward; loss / P per prompt)
and optimizer_step (clipping, AdamW). Its step splits into generation (vision + sampling + rewards),
forward + backward, and optimizer.

Defaults the issue leaves open: 1 torch thread per side (on a shared 2-core machine, 2 threads time
OpenMP barriers waiting for descheduled partners, not work) and top-p 1.0, TRL's default (HF's top-p
sorts the whole vocabulary at every token, the same cost on both sides; `--top_p 0.95` for ours).

Lever used here and not in training: `min_new_tokens=T` (rollout.generate_group passes it to `generate`;
training leaves it at 0).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REAL_VOCAB = 152064
BEGIN, END = "<!-- vs_trl:begin -->", "<!-- vs_trl:end -->"


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def trl_config(a, output_dir: str, prompts: int):
    """TRL's side, every setting that matters to cost spelled out (and printed) so the match can be checked."""
    return dict(
        output_dir=output_dir, use_cpu=True, bf16=False, fp16=False, seed=a.seed,
        per_device_train_batch_size=prompts * a.G, gradient_accumulation_steps=1, num_generations=a.G,  # P x G
        max_completion_length=a.max_new_tokens, generation_kwargs={"min_new_tokens": a.max_new_tokens},
        temperature=1.0, top_p=a.top_p, top_k=0, repetition_penalty=1.0,
        use_vllm=False, loss_type="grpo", beta=0.0, num_iterations=1, epsilon=0.2, scale_rewards="group",
        gradient_checkpointing=False, optim="adamw_torch", learning_rate=1e-6, weight_decay=0.01,
        max_grad_norm=5.0, lr_scheduler_type="constant", max_steps=a.warmup + a.steps,
        shuffle_dataset=False, dataloader_num_workers=0, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, log_completions=False)


# --- one side, in its own process ---


def run_ours(a, examples):
    """The training loop's step (grpo_care.main, consistency_reward="none", beta=0, num_iterations=1): the same phase
    functions, timed in parts."""
    import torch
    from transformers import AutoProcessor

    import grpo_care
    import rollout
    from data import Collator, VisionSpec
    from rewards import group_advantages, total_reward

    cfg = grpo_care.Config(model_path=a.model, num_generations=a.G, max_new_tokens=a.max_new_tokens, top_p=a.top_p,
                           consistency_reward="none", beta=0.0, bf16=False, gradient_checkpointing=False,
                           attn_implementation="sdpa", learning_rate=1e-6, seed=a.seed)
    device = grpo_care.setup_distributed().device
    processor = AutoProcessor.from_pretrained(a.model)
    policy = grpo_care.load_model(a.model, cfg, device, trainable=True)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    collate = Collator(processor, VisionSpec())  # the reference's image budget: 448x448 stays 448x448
    G, T = cfg.num_generations, cfg.max_new_tokens

    def step(s, exs):  # the loop's phase functions, timed in parts
        t0, c0 = time.perf_counter(), time.process_time()
        policy.eval()
        batches = [collate([ex])[0] for ex in exs]  # one batch per prompt, as the loop collates
        ros = rollout.generate_groups(policy, batches, G, processor, max_new_tokens=T, temperature=cfg.temperature,
                                      top_p=cfg.top_p, seeds=[grpo_care.sample_seed(cfg.seed, s, ex["id"]) for ex in exs],
                                      min_new_tokens=T)  # every completion exactly T tokens
        assert all(int(ro.completion_mask.sum()) == G * T for ro in ros), "min_new_tokens did not force T tokens"
        advantages = group_advantages(total_reward(*grpo_care.base_rewards(ros, exs, G)))  # (B, G)
        t1 = time.perf_counter()
        policy.train()  # as grpo_care.policy_update (mu = 1, no KL), in its two parts
        loss, _ = grpo_care.accumulate_policy_gradients(policy, ros, advantages, None, None, cfg.clip_eps, 0.0,
                                                        cfg.logprob_chunk)
        t2 = time.perf_counter()
        grpo_care.optimizer_step(policy, optimizer, cfg.max_grad_norm, loss)
        t3 = time.perf_counter()
        return dict(step=t3 - t0, cpu=time.process_time() - c0, generation=t1 - t0, forward_backward=t2 - t1,
                    optimizer=t3 - t2, completion_tokens=T,
                    prompt_tokens=round(sum(b["input_ids"].shape[1] for b in batches) / len(batches)))

    P = a.prompts
    return lambda: [step(s, examples[s * P:(s + 1) * P]) for s in range(len(examples) // P)]


def run_trl(a, examples):
    """TRL's GRPOTrainer on the same model, prompts and rewards; a callback times each optimizer step."""
    import torch
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rewards import accuracy_reward, format_reward

    def accuracy(completions, solution, **_):
        return accuracy_reward([c[0]["content"] for c in completions], solution)

    def format_(completions, **_):
        return format_reward([c[0]["content"] for c in completions])

    class StepTimer(TrainerCallback):  # on_step_begin..on_step_end: generation, loss, backward, clip, AdamW
        def __init__(self):
            self.times = []

        def on_step_begin(self, *_, **__):
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_step_end(self, *_, **__):
            self.times.append((time.perf_counter() - self.t, time.process_time() - self.c))

    processor = AutoProcessor.from_pretrained(a.model)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa")
    rows = [dict(prompt=[dict(role="user", content=ex["prompt"])], image=Image.open(ex["image"]).convert("RGB"),
                 solution=ex["solution"]) for ex in examples]  # TRL puts the image before the text, as data.messages

    class TimedGRPOTrainer(GRPOTrainer):  # instrumentation only: times TRL's rollout phase
        def _generate_and_score_completions(self, inputs):
            t = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            generation.append(time.perf_counter() - t)
            return out

    generation, timer = [], StepTimer()
    trainer = TimedGRPOTrainer(model=model, reward_funcs=[accuracy, format_], args=GRPOConfig(**trl_config(a, a.out, a.prompts)),
                               train_dataset=Dataset.from_list(rows), processing_class=processor, callbacks=[timer])

    def steps():
        trainer.train()
        logs = [h for h in trainer.state.log_history if "num_tokens" in h]
        assert all(h["completions/min_length"] == a.max_new_tokens == h["completions/max_length"] for h in logs), \
            "min_new_tokens did not force T tokens per completion"
        seen = [0] + [h["num_tokens"] for h in logs]  # cumulative prompt + completion tokens of the P x G rows
        return [dict(step=t, cpu=c, generation=g, loss_and_update=t - g, completion_tokens=a.max_new_tokens,
                     prompt_tokens=round((n1 - n0) / (a.prompts * a.G) - a.max_new_tokens))
                for (t, c), g, n0, n1 in zip(timer.times, generation, seen, seen[1:])]

    return steps


def child(a):
    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    if len(a.prompts) != 1:
        raise SystemExit(f"--side runs one --prompts value, not {a.prompts}")
    (a.prompts,) = a.prompts
    examples = json.loads(Path(a.examples).read_text())[:(a.warmup + a.steps) * a.prompts]
    steps = (run_ours if a.side == "ours" else run_trl)(a, examples)
    setup_peak, base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, _rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS: peak of the steps
    rows = steps()
    timed = rows[a.warmup:]
    med = {k: statistics.median(r[k] for r in timed) for k in timed[0] if k not in ("prompt_tokens", "completion_tokens")}
    print(json.dumps(dict(side=a.side, median=med, steps=[r["step"] for r in timed], setup_peak_mb=setup_peak,
                          rss_before_steps_mb=base, step_peak_mb=_rss_mb("VmHWM"),
                          prompt_tokens=[r["prompt_tokens"] for r in rows],
                          completion_tokens=[r["completion_tokens"] for r in rows])))


# --- the parent: world, both sides, ratios, BENCHMARKS.md ---


def prepare(tmp: Path, a) -> tuple[Path, dict]:
    """Toy world; image-only examples with the images upscaled to `image_px`; the model per vocabulary."""
    from PIL import Image
    from transformers import AutoProcessor

    import toy
    import toy_qwen
    from data import load_examples

    world = toy.build(tmp / "toy", seed=a.seed, n_train=(a.warmup + a.steps) * max(a.prompts), n_val=1)
    examples = load_examples(world / "data/annotations/training_6k.jsonl", world / "data", a.seed)
    (tmp / "images").mkdir()
    for ex in examples:  # nearest: the toy's flat colours stay flat, the prompt becomes 256 vision tokens
        path = tmp / "images" / Path(ex["image"]).name
        Image.open(ex["image"]).resize((a.image_px, a.image_px), Image.NEAREST).save(path)
        ex.update(image=str(path), video=None)  # TRL's VLM path takes images, not video
    (tmp / "examples.json").write_text(json.dumps(examples))
    models = {}
    for vocab in (["toy", "real"] if a.vocab == "both" else [a.vocab]):
        if vocab == "toy":
            models[vocab] = world / "model"
            continue
        processor = AutoProcessor.from_pretrained(world / "model")
        model = toy_qwen.build_model(processor.tokenizer, seed=a.seed, vocab_size=REAL_VOCAB)
        models[vocab] = tmp / f"model_{vocab}"
        model.save_pretrained(models[vocab])
        processor.save_pretrained(models[vocab])
    return tmp / "examples.json", models


def run_side(side: str, model: Path, examples: Path, a, out: Path, P: int) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--model", str(model), "--examples", str(examples),
           "--out", str(out), *sum(([f"--{k}", str(getattr(a, k))] for k in
                                    ("G", "max_new_tokens", "top_p", "steps", "warmup", "threads", "seed")), []),
           "--prompts", str(P)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(a.threads))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert res.returncode == 0, f"{side} failed:\n{res.stderr[-4000:]}"
    return json.loads(res.stdout.strip().splitlines()[-1])


def compare(ours: dict, trl: dict) -> dict:
    assert ours["prompt_tokens"] == trl["prompt_tokens"], f"prompts differ: {ours['prompt_tokens']} vs {trl['prompt_tokens']}"
    assert ours["completion_tokens"] == trl["completion_tokens"], "completion lengths differ"
    extra = lambda r: r["step_peak_mb"] - r["rss_before_steps_mb"]
    peak = lambda r: max(r["setup_peak_mb"], r["step_peak_mb"])
    return dict(time_ratio=ours["median"]["step"] / trl["median"]["step"], rss_ratio=peak(ours) / peak(trl),
                cpu_ratio=ours["median"]["cpu"] / trl["median"]["cpu"],
                step_rss_ratio=ours["step_peak_mb"] / trl["step_peak_mb"], extra_ratio=extra(ours) / max(extra(trl), 1.0),
                ours_peak=peak(ours), trl_peak=peak(trl), ours_extra=extra(ours), trl_extra=extra(trl))


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def report(results: dict, a, load: tuple, versions: dict) -> str:
    lines = [f"Run {time.strftime('%Y-%m-%d')} on {cpu_name()}, {os.cpu_count()} cores, {a.threads} torch thread(s) per "
             f"side, the sides one after the other; load average {load[0]:.2f} before, {load[1]:.2f} after (other jobs "
             f"shared the machine). {versions}.", "",
             f"Tiny Qwen2.5-VL (hidden 64, 2 layers, toy vision tower), fp32, G = {a.G}, image prompts "
             f"({a.image_px}x{a.image_px} px: 256 vision tokens), exactly {a.max_new_tokens} new tokens per completion, "
             f"top-p {a.top_p}; median of {a.steps} steps after {a.warmup} warm-up.", "",
             "| vocab | prompts per step | prompt tokens | ours step s | TRL step s | **time ours/TRL** | CPU time ours/TRL | ours peak RSS MB "
             "| TRL peak RSS MB | **peak RSS ours/TRL** | step extra MB, ours / TRL |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (vocab, P), (ours, trl, c) in results.items():
        lines.append(f"| {REAL_VOCAB if vocab == 'real' else 704:,} | {P} | {min(ours['prompt_tokens'])}-{max(ours['prompt_tokens'])} "
                     f"| {ours['median']['step']:.2f} | {trl['median']['step']:.2f} | **{c['time_ratio']:.2f}** "
                     f"| {c['cpu_ratio']:.2f} | {c['ours_peak']:.0f} | {c['trl_peak']:.0f} | **{c['rss_ratio']:.2f}** "
                     f"| {c['ours_extra']:.0f} / {c['trl_extra']:.0f} ({c['extra_ratio']:.2f}) |")
    lines += ["", "Where the time goes (medians, seconds). Generation: prompt processing, vision, sampling, rewards. "
              "Ours then: forward + backward = vision with gradient, completion log-prob forward, backward "
              "(grpo_care.accumulate_policy_gradients); optimizer = clipping + AdamW (grpo_care.optimizer_step). "
              "TRL: its loss forward, backward, clipping, AdamW.", "",
              "| vocab | prompts per step | ours generation | ours forward + backward | ours optimizer | TRL generation "
              "| TRL loss + update | generation ours/TRL | after generation ours/TRL |", "|---|---|---|---|---|---|---|---|---|"]
    for (vocab, P), (ours, trl, c) in results.items():
        m, t = ours["median"], trl["median"]
        rest = m["forward_backward"] + m["optimizer"]
        lines.append(f"| {REAL_VOCAB if vocab == 'real' else 704:,} | {P} | {m['generation']:.2f} | {m['forward_backward']:.2f} "
                     f"| {m['optimizer']:.2f} | {t['generation']:.2f} | {t['loss_and_update']:.2f} "
                     f"| {m['generation'] / t['generation']:.2f} | {rest / t['loss_and_update']:.2f} |")
    cfg = {k: v for k, v in trl_config(a, "<tmp>", 1).items() if k not in ("output_dir", "logging_steps", "save_strategy",
                                                                      "report_to", "disable_tqdm", "log_completions")}
    lines += ["", "CPU time: the process's user + system seconds per step (time.process_time), less sensitive than wall "
              "time to other jobs on the machine.", "",
              "Peak RSS: the whole process's peak (imports, model, set-up and steps; ru_maxrss). Step extra: the "
              "peak during the steps minus the RSS just before them (VmHWM reset through /proc/self/clear_refs).", "",
              "TRL's side: `GRPOTrainer(model=<the same Qwen2_5_VLForConditionalGeneration, fp32, sdpa>, "
              "reward_funcs=[accuracy, format] (rewards.py), processing_class=<the same processor>, "
              "train_dataset=<the same prompts, conversational, with an image column>, args=GRPOConfig(**cfg))` with "
              "per_device_train_batch_size = prompts per step x G and",
              "", "```", json.dumps(cfg), "```"]
    return "\n".join(lines)


def write_benchmarks(section: str, command: str, path: Path = ROOT / "BENCHMARKS.md") -> None:
    text = path.read_text()
    assert BEGIN in text and END in text, f"{path} lost its {BEGIN} / {END} markers"
    head, rest = text.split(BEGIN, 1)
    body = f"{BEGIN}\n<!-- written by `{command}`; edit the text outside the markers -->\n{section}\n{END}"
    path.write_text(head + body + rest.split(END, 1)[1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", choices=["toy", "real", "both"], default="both")
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=64, help="forced length of every completion")
    p.add_argument("--steps", type=int, default=5, help="timed steps per side (median), after the warm-up")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prompts", type=int, nargs="+", default=[1, 4], help="prompts per step, each run separately")
    p.add_argument("--top_p", type=float, default=1.0, help="1.0 = TRL's default (no vocabulary sort per token)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per side (see the docstring)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image_px", type=int, default=448, help="image side; 448 = the reference's 256*28*28 budget")
    p.add_argument("--no_write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    for hidden in ("--side", "--model", "--examples", "--out"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.side:
        return child(a)
    try:
        import trl
    except ImportError:
        sys.exit("bench/vs_trl.py needs TRL, which the project does not depend on. Install it in its own venv:\n"
                 "  python3 -m venv .venv-bench && .venv-bench/bin/pip install -r requirements.txt -r bench/requirements.txt\n"
                 "  .venv-bench/bin/python bench/vs_trl.py")
    import torch
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}"
    load0 = os.getloadavg()[0]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        examples, models = prepare(Path(tmp), a)
        for vocab, model in models.items():
            for P in a.prompts:
                ours = run_side("ours", model, examples, a, Path(tmp) / f"ours_{vocab}_{P}", P)
                theirs = run_side("trl", model, examples, a, Path(tmp) / f"trl_{vocab}_{P}", P)
                results[vocab, P] = (ours, theirs, compare(ours, theirs))
                c = results[vocab, P][2]
                print(f"vocab {vocab}, {P} prompt(s) per step: step time ours/TRL = {c['time_ratio']:.2f} ({ours['median']['step']:.2f} s vs "
                      f"{theirs['median']['step']:.2f} s; CPU time {c['cpu_ratio']:.2f}), peak RSS ours/TRL = {c['rss_ratio']:.2f} "
                      f"({c['ours_peak']:.0f} vs {c['trl_peak']:.0f} MB), step extra ours/TRL = {c['extra_ratio']:.2f}; "
                      f"ours: generation {ours['median']['generation']:.2f} s, forward + backward "
                      f"{ours['median']['forward_backward']:.2f} s, optimizer {ours['median']['optimizer']:.2f} s", flush=True)
    section = report(results, a, (load0, os.getloadavg()[0]), versions)
    print(section)
    if not a.no_write:
        write_benchmarks(section, " ".join(["python bench/vs_trl.py", *sys.argv[1:]]))
        print(f"written to {ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
