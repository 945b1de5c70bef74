"""Evaluation: SEED-Bench-R1 (L1/L2/L3 accuracy, L3 per domain, the consistency rate) and the six general video
benchmarks of the paper's transfer table, for any `save_pretrained` checkpoint.

    python evaluate.py --model_path P --data_root D [--levels L1 L2 L3] [--max_samples N] [--output_dir O]
    accelerate launch --num_processes 8 evaluate.py ...      # samples i with i % world == rank; rank 0 writes
    python evaluate.py --model_path toy/model --data_root toy/data --toy   # toy media sizes + rule consistency
    python evaluate.py --model_path P --data_root D --benchmark vsibench videommmu mmvu mvbench tempcompass videomme
    python evaluate.py --model_path P --data_root LongVideoBench --benchmark longvideobench [--lvb_subtitles]

Writes predictions.jsonl (one line per sample; a rerun resumes per sample), results.json and results.md.
Scores per level and L3 domain: strict accuracy (the reference's: the answer tag's stripped text equals the
letter), lenient accuracy (the first standalone A-D), format rate, length, and consistency: after generation a
judge (judge.py: a checkpoint, by default the evaluated model, or an OpenAI-compatible endpoint) says whether
the reasoning supports the answer (the paper's protocol; --judge_protocol picks: the answer hidden, it picks an
option). With --toy, rule consistency (the option the toy reasoning names) per teacher-flaw class. Decoding is
greedy, 1,024 new tokens, as the reference's scripts, up to <|im_end|> or <|endoftext|> (rollout.END_TOKENS, as
in training); left padding is masked, so 1 and N processes agree. Departures: DEPARTURES.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
from collections import Counter
from dataclasses import asdict
from fractions import Fraction
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm import tqdm
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer,
                          GenerationConfig)

import longvideobench as lvb
import toy
from checkpoints import claim_output_dir
from config import HUB_ID, ConfigError, run_cli
from data import (BENCHMARKS, LETTERS, PROMPT_TEMPLATES, Collator, VisionSpec, check_prompt_lengths,
                  load_examples)
from judge import PROMPTS, PROTOCOLS, api_judge, check_judge_flags, judge_records, local_judge
from rewards import first_letter_pick, format_reward, parse_answer, score_answer, to_number
from rollout import end_ids

LEVELS = ("L1", "L2", "L3")
_STANDALONE = re.compile(r"\b([A-D])\b")
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_TOY_STEP = re.compile(r"the next step is to (.+?)\.")


# ---------------------------------------------------------------------------------------------
# scoring (pure functions of the output text)
def strict_pick(text: str) -> str | None:
    """The reference's prediction: the answer-tag text, else the whole output; a letter or None."""
    pred = parse_answer(text) or text.strip()
    return pred if pred in tuple(LETTERS) else None  # a tuple: "" and "AB" are substrings of "ABCD"


def lenient_pick(text: str) -> str | None:
    """First standalone A-D inside the answer tag (any case), else first standalone A-D of the output."""
    inside = parse_answer(text)
    m = _STANDALONE.search(inside.upper()) if inside else None
    m = m or _STANDALONE.search(text)
    return m.group(1) if m else None


def reasoning_of(text: str) -> str | None:
    """The stripped text of the first <think>...</think>, None when missing or empty."""
    m = _THINK.search(text)
    return (m.group(1).strip() or None) if m else None


def toy_rule_pick(reasoning: str | None, options: list[str]) -> str | None:
    """Toy world only: the option whose text is the action toy.cot_text names; None if it names none."""
    m = _TOY_STEP.search(reasoning or "")
    action = m.group(1).strip() if m else None
    return LETTERS[options.index(action)] if action in options else None


def score(example: dict, level: str, output: str, length: int, toy_world: bool = False) -> dict:
    """One predictions.jsonl line (the judge's fields are set later, by judge.judge_records)."""
    answer, lenient, reasoning = strict_pick(output), lenient_pick(output), reasoning_of(output)
    rec = dict(id=example["id"], level=level, domain=example["domain"], prompt_id=prompt_id(example),
               output=output, length=length, answer=answer, lenient=lenient,
               gold=example["solution"], strict_correct=answer == example["solution"],
               lenient_correct=lenient == example["solution"],
               first_letter_correct=first_letter_pick(output) == example["solution"],
               format=format_reward([output])[0] == 1.0, reasoning=reasoning, skipped=False)
    if toy_world:
        rec["rule_pick"] = toy_rule_pick(reasoning, example["options"])
        rec["flaw_class"] = toy.flaw_class(example["question"], example["options"][LETTERS.index(example["solution"])])
    return rec


def mean_relative_accuracy(pred: float, truth: float) -> float:
    """Fraction of thresholds t = 0.50, 0.55, ..., 0.95 with |pred - truth| / |truth| < 1 - t.

    In exact rational arithmetic on the numbers as written (str(3.15) == "3.15", so 3.15 - 3 is 3/20,
    not the binary 0.1499999...): an error exactly on a threshold never passes."""
    if truth == 0:  # no relative error around 0: only an exact hit counts
        return float(pred == 0)
    p, t = Fraction(str(pred)), Fraction(str(truth))  # str: the shortest decimal that reads back as the float
    rel = abs(p - t) / abs(t)
    return sum(rel < Fraction(10 - i, 20) for i in range(10)) / 10  # 1 - (0.50 + 0.05 i) = (10 - i) / 20


def benchmark_score(example: dict, benchmark: str, output: str, length: int) -> dict:
    """One predictions.jsonl line of a general benchmark: `reward` in [0, 1] by problem type."""
    pred, gold, problem_type = parse_answer(output) or output.strip(), example["solution"], example["problem_type"]
    if problem_type == "regression":
        p, g = to_number(pred), to_number(gold)
        reward = 0.0 if p is None or g is None else mean_relative_accuracy(p, g)
    else:
        reward = score_answer(pred, gold, problem_type)
    return dict(id=example["id"], level=benchmark, domain=example["domain"], prompt_id=prompt_id(example),
                output=output, length=length, problem_type=problem_type, answer=pred, gold=gold, reward=reward,
                format=format_reward([output])[0] == 1.0, reasoning=reasoning_of(output), skipped=False)


def prompt_id(example: dict) -> str:
    """Names exactly what the model was asked: a changed prompt or option order (or context: LongVideoBench's
    subtitles) is a new sample."""
    return hashlib.sha1((example.get("context", "") + example["prompt"]).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# aggregation
def _pct(flags: list) -> float | None:
    return round(100.0 * sum(map(bool, flags)) / len(flags), 2) if flags else None


def group_stats(records: list[dict]) -> dict:
    ok = [r for r in records if not r["skipped"]]
    answered = [r for r in ok if r.get("reasoning") and r.get("answer")]  # what a judge reads
    judged = [r for r in answered if r.get("judge_consistent") is not None]
    first = [r.get("first_letter_correct") for r in ok]  # None: a prediction written before it was recorded
    stats = dict(n=len(ok), skipped=len(records) - len(ok),
                 strict=_pct([r["strict_correct"] for r in ok]), lenient=_pct([r["lenient_correct"] for r in ok]),
                 first_letter=_pct(first) if None not in first else None,  # SEED-Bench-R1 v1's scorer
                 format=_pct([r["format"] for r in ok]),
                 mean_length=round(sum(r["length"] for r in ok) / len(ok), 1) if ok else None,
                 n_judged=len(judged), n_unjudged=len(answered) - len(judged),
                 judge_protocol=next(iter({r["judge_protocol"] for r in judged}), None),
                 consistency=_pct([r["judge_consistent"] for r in judged]),
                 consistency_correct=_pct([r["judge_consistent"] for r in judged if r["strict_correct"]]))
    if any("rule_pick" in r for r in ok):
        stats["rule_consistency"] = _pct([r.get("rule_pick") == r["answer"] for r in answered])
    if any("flaw_class" in r for r in ok):
        stats["flaw_classes"] = {c: flaw_class_stats([r for r in ok if r.get("flaw_class") == c])
                                 for c in sorted({r.get("flaw_class") for r in ok} - {None})}
    return stats


def flaw_class_stats(records: list[dict]) -> dict:
    """Toy only: reasoning x answer for the rows of one teacher-flaw class (toy.flaw_class), in % of its
    rows. Right reasoning = the option the reasoning names (rule_pick) is the gold one; reasoning
    that names no option counts as wrong. `wrong_reasoning_right_answer` is right for the wrong reason."""
    cell = lambda reasoning_ok, answer_ok: _pct([(r["rule_pick"] == r["gold"]) == reasoning_ok  # noqa: E731
                                                and r["strict_correct"] == answer_ok for r in records])
    return dict(n=len(records), strict=_pct([r["strict_correct"] for r in records]),
                rule_consistency=_pct([r["rule_pick"] is not None and r["rule_pick"] == r["answer"] for r in records]),
                right_reasoning_right_answer=cell(True, True), right_reasoning_wrong_answer=cell(True, False),
                wrong_reasoning_right_answer=cell(False, True), wrong_reasoning_wrong_answer=cell(False, False))


def benchmark_stats(records: list[dict]) -> dict:
    ok = [r for r in records if not r["skipped"]]
    regression = [r["reward"] for r in ok if r["problem_type"] == "regression"]
    other = [r["reward"] for r in ok if r["problem_type"] != "regression"]
    mean = lambda xs: round(100.0 * sum(xs) / len(xs), 2) if xs else None  # noqa: E731
    return dict(n=len(ok), skipped=len(records) - len(ok), score=mean(other + regression), accuracy=mean(other),
                mra=mean(regression), format=_pct([r["format"] for r in ok]),
                mean_length=round(sum(r["length"] for r in ok) / len(ok), 1) if ok else None)


def summarize(records: list[dict]) -> dict:
    """{"L1": stats, ..., "L3/Daily life": stats, ...} or {"vsibench": stats, ...} for the sets present."""
    records = sorted(records, key=lambda r: (r["level"], str(r["id"])))  # order-free sums
    out, present = {}, {r["level"] for r in records}
    for level in [x for x in (*LEVELS, *BENCHMARKS, lvb.NAME) if x in present]:
        rows = [r for r in records if r["level"] == level]
        if level == lvb.NAME:  # accuracy overall, per duration group and per question category
            out.update(lvb.summarize(rows))
            continue
        out[level] = benchmark_stats(rows) if level in BENCHMARKS else group_stats(rows)
        if level == "L3":
            for d in sorted({r["domain"] for r in rows if r["domain"]}):
                out[f"L3/{d}"] = group_stats([r for r in rows if r["domain"] == d])
    return out


def markdown(summary: dict, model: str) -> str:
    cols = list(summary)
    rows = [("score (%)", "score"), ("accuracy, all but regression (%)", "accuracy"),
            ("mean relative accuracy, regression (%)", "mra"), ("strict accuracy (%)", "strict"),
            ("lenient accuracy (%)", "lenient"), ("first-letter accuracy, SEED-Bench-R1 v1's (%)", "first_letter"),
            ("format (%)", "format"),
            ("consistency, answered (%)", "consistency"), ("consistency, correct (%)", "consistency_correct"),
            ("rule consistency, toy (%)", "rule_consistency"), ("judged responses", "n_judged"),
            ("unjudged (no valid verdict)", "n_unjudged"),
            ("mean length (tokens)", "mean_length"), ("samples", "n"), ("skipped", "skipped")]
    cell = lambda v: "–" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"**{model}**", "", "| | " + " | ".join(BENCHMARKS.get(c, c.replace("L3/", "")) for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    lines += [f"| {name} | " + " | ".join(cell(summary[c].get(key)) for c in cols) + " |"
              for name, key in rows if any(key in summary[c] for c in cols)]
    classes = [(c, name, st) for c in cols if "/" not in c for name, st in summary[c].get("flaw_classes", {}).items()]
    if classes:  # toy only: which rows are right for the wrong reason
        keys = ("n", "strict", "rule_consistency", "right_reasoning_right_answer", "right_reasoning_wrong_answer",
                "wrong_reasoning_right_answer", "wrong_reasoning_wrong_answer")
        lines += ["", "Toy teacher-flaw classes (% of the class's rows; reasoning right = it names the gold option):", "",
                  "| level | class | rows | strict | rule consistency | reasoning right, answer right | right, wrong "
                  "| wrong, right | wrong, wrong |", "|---|---|" + "---:|" * len(keys)]
        lines += [f"| {c} | {name} | " + " | ".join(cell(st[k]) for k in keys) + " |" for c, name, st in classes]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# models
def load_eval_processor(path: str):
    """The processor of a Qwen-VL checkpoint, else its tokenizer: cheap, read before the model."""
    return (AutoProcessor if "_vl" in AutoConfig.from_pretrained(path).model_type else AutoTokenizer).from_pretrained(path)


def load_eval_model(path: str, device):
    """(model.eval() on device, processor or tokenizer): Qwen-VL configs get the image-text class."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the checkpoints' own bf16 on GPU
    vl = "_vl" in AutoConfig.from_pretrained(path).model_type  # qwen2_vl, qwen2_5_vl
    model = (AutoModelForImageTextToText if vl else AutoModelForCausalLM).from_pretrained(path, dtype=dtype)
    return model.to(device).eval(), load_eval_processor(path)


def evaluate_batch(model, processor, collator, gen_config, examples, level, toy_world) -> list[dict]:
    """Generate for `examples` and score. Unreadable samples come back as skipped records."""
    if not examples:
        return []
    before = collator.skipped
    batch, kept = collator(examples)
    kept_ids = {id(e) for e in kept}
    skipped = [dict(id=e["id"], level=level, domain=e["domain"], prompt_id=prompt_id(e), skipped=True)
               for e in examples if id(e) not in kept_ids]
    assert collator.skipped - before == len(skipped), "Collator.skipped disagrees with the kept examples"
    if not kept:
        return skipped
    with torch.no_grad():
        seqs = model.generate(**batch.to(model.device), generation_config=gen_config)
    completion = seqs[:, batch["input_ids"].shape[1]:]  # (B, T_new)
    stop = set(gen_config.eos_token_id) | {gen_config.pad_token_id}
    lengths = [next((j for j, t in enumerate(row) if t in stop), len(row)) for row in completion.tolist()]
    texts = processor.batch_decode(completion, skip_special_tokens=True)
    if level == lvb.NAME:  # SEED-Bench-R1's first-letter scorer
        return [lvb.score(e, t, n, format_reward([t])[0] == 1.0, reasoning_of(t), prompt_id(e))
                for e, t, n in zip(kept, texts, lengths)] + skipped
    if level in BENCHMARKS:  # scored by problem type; the judge does not apply
        return [benchmark_score(e, level, t, n) for e, t, n in zip(kept, texts, lengths)] + skipped
    return [score(e, level, t, n, toy_world) for e, t, n in zip(kept, texts, lengths)] + skipped


# ---------------------------------------------------------------------------------------------
def read_predictions(path: Path) -> list[dict]:
    """Complete lines of predictions.jsonl; a line cut by an interruption is dropped."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


def id_order(example: dict) -> tuple:
    """Sort key of a sample id: integers in numeric order, then strings. A file may mix them: EgoPlan-Bench2,
    the source of L3, has ids like "ca6e9ec9-..._2", and sorting an int against a str raises TypeError."""
    i = example["id"]
    return (1, i) if isinstance(i, str) else (0, i)


def key(level: str, example_or_record: dict) -> tuple:
    r = example_or_record
    return level, str(r["id"]), r.get("prompt_id") or prompt_id(r)


def max_frames(flag: int | None, benchmark: list[str] | None) -> int:
    """--max_frames, else the reference's eval scripts': 32 on the general benchmarks
    (scripts/eval_general_video_bench.sh), 16 on SEED-Bench-R1 (eval_seed_bench_r1.sh, our training setting)
    and on LongVideoBench (SEED-Bench-R1's infer.py)."""
    return flag if flag is not None else 32 if benchmark and lvb.NAME not in benchmark else 16


def decoding(level: str, max_new_tokens: int, video_r1_mmvu: bool = False, v1_sampling: bool = False) -> dict:
    """GenerationConfig arguments for one level or benchmark: greedy, or with `video_r1_mmvu` MMVU sampled
    as eval_bench.py samples it for a model path containing "Video-R1" (top_k=0: vLLM has no top-k),
    up to its 768 new tokens or `max_new_tokens` if fewer; LongVideoBench, and with `v1_sampling` the
    SEED-Bench-R1 levels, as SEED-Bench-R1's infer.py samples (temperature 1, up to 256 new tokens)."""
    if level == lvb.NAME or (v1_sampling and level in LEVELS):
        return lvb.decoding(max_new_tokens)
    if video_r1_mmvu and level == "mmvu":
        return dict(do_sample=True, temperature=1.0, top_p=0.95, top_k=0, max_new_tokens=min(768, max_new_tokens))
    return dict(do_sample=False, max_new_tokens=max_new_tokens)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--model_path", required=True)
    p.add_argument("--data_root", required=True,
                   help="SEED-Bench-R1 root (annotations/, videos/, images/); with --benchmark the root of Evaluation/")
    sets = p.add_mutually_exclusive_group()
    sets.add_argument("--levels", nargs="+", default=list(LEVELS), choices=LEVELS, help="SEED-Bench-R1 levels")
    sets.add_argument("--benchmark", nargs="+", choices=[*BENCHMARKS, lvb.NAME],
                      help="general video benchmarks instead: DATA_ROOT/Evaluation/eval_<name>.json; or alone "
                           f"{lvb.NAME}: DATA_ROOT is its folder (lvb_val.json, videos/, subtitles/)")
    p.add_argument("--max_samples", type=int, default=None, help="first N samples (by id) per level or benchmark")
    p.add_argument("--output_dir", default=None,
                   help="default: MODEL_PATH/eval_seed_bench_r1 (or eval_general); required when MODEL_PATH is a hub id")
    p.add_argument("--judge_model", default=None, help="a checkpoint (default: the evaluated model judges itself); "
                                                       "with --judge_api_base the endpoint's model name")
    p.add_argument("--judge_api_base", default=None, help="OpenAI-compatible endpoint, e.g. https://api.openai.com/v1 "
                                                          "(key: OPENAI_API_KEY)")
    p.add_argument("--judge_protocol", default=None, choices=PROTOCOLS,
                   help="supports (default, the paper's): does the reasoning support the answer, yes/no; "
                        "picks: which option does it support, the answer hidden")
    p.add_argument("--judge_timeout", type=float, default=None, help="seconds per API request (default 60)")
    p.add_argument("--judge_retries", type=int, default=None,
                   help="API retries on timeouts and server errors (default 3)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=1024)
    p.add_argument("--fps", type=float, default=2.0)
    p.add_argument("--max_frames", type=int, default=None,
                   help="video frames at most; default the reference's: 16 on SEED-Bench-R1, 32 with --benchmark")
    p.add_argument("--video_r1_mmvu", action="store_true",
                   help="MMVU decoded as the reference decodes Video-R1-trained checkpoints: sampled at temperature 1, "
                        "top-p 0.95, up to 768 new tokens (fewer if --max_new_tokens is)")
    p.add_argument("--max_prompt_length", type=int, default=16384,
                   help="prompt tokens at most, media included (the reference's bound); a longer one is refused or skipped")
    p.add_argument("--lvb_file", default="lvb_val.json",
                   help="LongVideoBench questions in DATA_ROOT; lvb_test_wo_gt.json has no answers: predictions only")
    p.add_argument("--lvb_subtitles", action="store_true",
                   help="LongVideoBench with its subtitles between the frames (the official interleaving); "
                        "default: video and question only, as SEED-Bench-R1's evaluation")
    p.add_argument("--prompt_template", default="care", choices=PROMPT_TEMPLATES,
                   help="SEED-Bench-R1 levels: care (the reference's prompt) or v1 (SEED-Bench-R1's own study's)")
    p.add_argument("--v1_sampling", action="store_true",
                   help="SEED-Bench-R1 levels sampled as SEED-Bench-R1's infer.py: temperature 1, up to 256 new tokens")
    p.add_argument("--media_size", type=int, default=None,
                   help="resize every image and frame to SIZE x SIZE, rounded to 28 (SEED-Bench-R1 v1: 256)")
    p.add_argument("--toy", action="store_true", help="toy world: toy media sizes and rule consistency")
    a = p.parse_args(argv)
    for flag in ("max_prompt_length", "batch_size"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag} {getattr(a, flag)}: must be an integer >= 1")
    if a.output_dir is None and not os.path.isdir(a.model_path) and HUB_ID.fullmatch(a.model_path):
        # its MODEL_PATH/eval_* folder in the working directory would shadow the hub id from then on
        raise ConfigError(f"--model_path {a.model_path}: a hub id needs --output_dir")
    check_judge_flags(a)  # before any model is loaded
    is_lvb = a.benchmark is not None and lvb.NAME in a.benchmark
    if is_lvb and len(a.benchmark) > 1:
        raise ConfigError(f"--benchmark {' '.join(a.benchmark)}: {lvb.NAME} must be given alone (its --data_root "
                          "is the LongVideoBench folder)")
    if (a.lvb_subtitles or a.lvb_file != "lvb_val.json") and not is_lvb:
        raise ConfigError(f"--lvb_subtitles / --lvb_file: must be used with --benchmark {lvb.NAME}")
    if (a.prompt_template != "care" or a.v1_sampling) and a.benchmark:
        raise ConfigError("--prompt_template / --v1_sampling: for the SEED-Bench-R1 levels (LongVideoBench has the "
                          "v1 prompt and sampling already)")
    if a.media_size is not None and a.media_size < 28:
        raise ConfigError(f"--media_size {a.media_size}: must be an integer >= 28")

    # cpu=True: on a CPU machine Accelerator forms no process group under a multi-process launch otherwise
    acc = Accelerator(cpu=not torch.cuda.is_available())
    out = Path(a.output_dir or Path(a.model_path) / (f"eval_{lvb.NAME}" if is_lvb else "eval_general" if a.benchmark
                                                     else "eval_seed_bench_r1"))
    claim_output_dir(out)  # held till the process ends: a second evaluation into out/ stops here
    pred_path = out / "predictions.jsonl"
    vision = (VisionSpec(**toy.TOY_VISION, media_size=a.media_size) if a.toy else
              VisionSpec(video_fps=a.fps, **(lvb.VISION if is_lvb else {}), media_size=a.media_size,
                         video_max_frames=max_frames(a.max_frames, a.benchmark)))
    # before any model: every row of the annotation files checked, the prompts' length bounded
    root = Path(a.data_root)
    files = ({lvb.NAME: root / a.lvb_file} if is_lvb else
             {b: root / "Evaluation" / f"eval_{b}.json" for b in a.benchmark} if a.benchmark else
             {lv: root / "annotations" / f"validation_{lv}.jsonl" for lv in a.levels})
    selection = {name: sorted(lvb.load_examples(f, root, a.lvb_subtitles) if name == lvb.NAME else
                              load_examples(f, root, prompt_template=a.prompt_template), key=id_order)[:a.max_samples]
                 for name, f in files.items()}
    check_prompt_lengths([e for exs in selection.values() for e in exs], load_eval_processor(a.model_path),
                         a.max_prompt_length)
    model, processor = load_eval_model(a.model_path, acc.device)
    protocol = a.judge_protocol or "supports"
    judge = (None if a.benchmark else
             api_judge(a.judge_api_base, a.judge_model, protocol, out / "judge_cache.jsonl", a.judge_timeout or 60.0,
                       3 if a.judge_retries is None else a.judge_retries) if a.judge_api_base else
             local_judge(*(load_eval_model(a.judge_model, acc.device) if a.judge_model else (model, processor)),
                         protocol))
    collator = (lvb.SubtitleCollator if a.lvb_subtitles else Collator)(processor, vision, a.max_prompt_length)
    pad = model.generation_config.pad_token_id or processor.tokenizer.pad_token_id
    decodings = {name: decoding(name, a.max_new_tokens, a.video_r1_mmvu, a.v1_sampling) for name in files}
    gen_configs = {name: GenerationConfig(**d, repetition_penalty=1.0, eos_token_id=end_ids(processor),
                                          pad_token_id=pad) for name, d in decodings.items()}  # training's EOS rule
    torch.manual_seed(acc.process_index)  # sampled MMVU (--video_r1_mmvu): the same command samples the same

    done = {key(r["level"], r) for r in read_predictions(pred_path) if not r["skipped"]}  # bad media: retried
    acc.wait_for_everyone()  # everyone has read the file before rank 0 rewrites it
    if acc.is_main_process:  # drop a line cut by an interruption, so appends start on a fresh line
        out.mkdir(parents=True, exist_ok=True)
        pred_path.write_text("".join(json.dumps(r) + "\n" for r in read_predictions(pred_path)))
    for level, examples in selection.items():
        gen_config = gen_configs[level]
        todo = [e for e in examples if key(level, e) not in done]
        mine = todo[acc.process_index::acc.num_processes]  # i % world == rank
        # every rank runs the same number of steps: gather_object is collective
        steps = math.ceil(math.ceil(len(todo) / acc.num_processes) / a.batch_size)
        name = BENCHMARKS.get(level, "LongVideoBench" if is_lvb else f"SEED-Bench-R1 {level}")
        bar = tqdm(total=len(todo), desc=name, disable=not acc.is_main_process)
        for s in range(steps):
            chunk = mine[s * a.batch_size:(s + 1) * a.batch_size]
            records = gather_object(evaluate_batch(model, processor, collator, gen_config, chunk, level, a.toy))
            if acc.is_main_process:
                with open(pred_path, "a") as f:  # flushed per step: an interrupted run resumes here
                    f.writelines(json.dumps(r) + "\n" for r in records)
            bar.update(len(records))
        bar.close()
    acc.wait_for_everyone()
    wanted = {key(lv, e): e for lv, exs in selection.items() for e in exs}
    latest = {k: r for r in read_predictions(pred_path) if (k := key(r["level"], r)) in wanted}

    # --- judge: every answered sample of the selection, anew (an API judge's replies are cached) ---
    if judge is not None:
        mine = list(latest)[acc.process_index::acc.num_processes]  # every rank read the same file: the same order
        judge_records([latest[k] for k in mine], [wanted[k] for k in mine], judge, protocol)
        latest |= {key(r["level"], r): r for r in gather_object([latest[k] for k in mine])}
    if not acc.is_main_process:
        return None
    if judge is not None:  # the verdicts into predictions.jsonl, written whole and then renamed
        rows = [r for r in read_predictions(pred_path) if key(r["level"], r) not in latest] + list(latest.values())
        pred_path.with_suffix(".tmp").write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(pred_path.with_suffix(".tmp"), pred_path)
    summary = summarize(list(latest.values()))
    unjudged = dict(sorted(Counter(r["judge_error"] for r in latest.values() if r.get("judge_error")).items()))
    if unjudged:
        reasons = ", ".join(f"{k}: {v}" for k, v in unjudged.items())
        print(f"judge: {sum(unjudged.values())} sample(s) unjudged ({reasons}); not counted as consistent; "
              "run the same command again to ask again")
    judge_info = None if a.benchmark else dict(model=a.judge_model or "self", api_base=a.judge_api_base,
                                               protocol=protocol, prompt=PROMPTS[protocol], unjudged=unjudged)
    results = dict(model=a.model_path, judge=judge_info,
                   **{"benchmarks" if a.benchmark else "levels": summary},
                   skipped=sum(s["skipped"] for k, s in summary.items() if "/" not in k),
                   decoding=decodings,
                   prompt_template=a.prompt_template,
                   vision=asdict(vision))
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = (lvb.markdown if is_lvb else markdown)(summary, a.model_path)
    (out / "results.md").write_text(table)
    print(table)
    return results


if __name__ == "__main__":
    run_cli(main)  # a bad data file: one line, no traceback
