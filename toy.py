"""The toy world: a tiny but real Qwen2.5-VL and a data set in the exact SEED-Bench-R1 layout, built offline.

    python toy.py --out DIR [--seed 0] [--n_train 240] [--n_val 200] [--force] [--qwen_vocab]

`DIR/model` (toy_qwen.py): a `Qwen2_5_VLForConditionalGeneration` with a tiny config (real patch 14, merge 2,
temporal patch 2; `--arch qwen2_vl`: a Qwen2-VL), a tokenizer trained here with Qwen's special tokens and chat template
(`--qwen_vocab`: the 7B's own tokenizer and vocabulary, saved as the 7B is published). `DIR/data`: the
next action is decidable from the pixels (the observation shows one coloured object; the options differ only in
the colour); L1 = training distribution, L2 = new environment, L3 = Ego4D, new tasks, four domains.
`training_with_cot_6k.jsonl` is the SFT warm start's teacher, flawed on purpose (`cot_flaw`): it misreads orange
as red and answers red (COT_MISREAD), or reasons to red's action yet answers orange (COT_LUCKY: right for the
wrong reason, the paper's GRPO failure), and in "wash the dishes" rows its answer slips to the next letter
(COT_INCONSISTENT). Outcome-only GRPO can fix the orange answers by growing either the clean or the lucky
samples; only a reward that reads the reasoning prefers the clean ones. The 7B run is the same code with
`--model_path Qwen/Qwen2.5-VL-7B-Instruct --data_root <SEED-Bench-R1>`. Toy-only departures: DEPARTURES.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data import BENCHMARKS  # the eval files are data.py's
from toy_qwen import build_model_dir

# Four colours: every row shows all four options, and with the toy's alphabetical option order
# (--shuffle_options false) each colour has its own letter, blue A ... red D. A 64-wide, 2-layer model
# did not learn to find a shuffled option in 3,000 steps; with this order sft.py's 240 steps learn the
# cue -> action -> letter chain on the teacher's clean rows (100 % of clean toy-L1 rows, greedy).
COLOURS = {"blue": (40, 80, 220), "green": (40, 170, 60), "orange": (245, 140, 30), "red": (220, 40, 40)}
# (verb, object) per task goal. Training and L1/L2 use the kitchen tasks; L3 brings new ones.
KITCHEN_TASKS = {
    "make a fruit salad": [("pick up", "bowl"), ("cut", "fruit"), ("wash", "knife")],
    "wash the dishes": [("rinse", "plate"), ("dry", "cup"), ("put away", "pan")],
    "cook some pasta": [("fill", "pot"), ("stir", "sauce"), ("open", "jar")],
}
L3_TASKS = {  # domain -> task goal -> steps
    "Daily life": {"tidy the bedroom": [("fold", "towel"), ("hang", "shirt")]},
    "Hobbies": {"paint a picture": [("dip", "brush"), ("squeeze", "tube")]},
    "Recreation": {"play in the park": [("throw", "ball"), ("catch", "frisbee")]},
    "Work": {"sort the paperwork": [("file", "folder"), ("staple", "sheet")]},
}
# Environment = background colour and where the object sits: L2 and L3 change it.
ENVIRONMENTS = {
    "kitchen": dict(bg=[(110, 110, 110), (125, 125, 120)], box=(14, 14, 42, 42)),
    "new_kitchen": dict(bg=[(70, 45, 25), (60, 60, 90)], box=(4, 20, 32, 48)),
    "outdoors": dict(bg=[(30, 90, 40), (150, 150, 170)], box=(24, 8, 52, 36)),
}
QUESTION = ("Considering the progress shown in the video and my current observation in the last "
            "frame, what action should I take next in order to {goal}?")
# Flaws of the chain-of-thought rows (the SFT warm start's teacher). They are systematic, as a real
# teacher's blind spots are, and they hold for a majority, not all, of the rows they touch: the
# warm-started model's greedy answer inherits the flaw while its samples still hold the right
# behaviour some of the time, which is exactly what group-relative RL can find and reinforce.
COT_CONFUSION = ("orange", "red")  # the teacher reads an orange object as red...
COT_MISREAD = 0.45  # ...in this fraction of the orange rows: names red and its action, answers it (consistent, wrong)
COT_LUCKY = 0.35  # ...and in this fraction: names red and its action, answers orange (right for the wrong reason)
COT_SLIP_GOAL = "wash the dishes"  # in rows of this goal the teacher's answer slips to the next letter...
COT_INCONSISTENT = 0.8  # ...in this fraction of them, after reasoning that names the right action (inconsistent)
FRAME = 56  # pixels; 56 = 2 merged patches of 28, so an image is 2x2 = 4 vision tokens
# data.VisionSpec fields for the toy: keep frames at 56x56 (4 tokens per image, 8 per 4-frame video).
TOY_VISION = dict(video_max_pixels=FRAME * FRAME, video_min_pixels=FRAME * FRAME, image_max_pixels=FRAME * FRAME,
                  image_min_pixels=FRAME * FRAME, video_max_frames=4)
# The toy run's sizes, applied with --toy (the default without --model_path) to every field not given on the
# command line, with TOY_VISION (config.parse_run_config). sft.py's warm start: 16 epochs of the 240 rows.
SFT_DEFAULTS = dict(shuffle_options=False, learning_rate=3e-3, prompts_per_device=16, num_epochs=16,
                    warmup_ratio=0.05, output_dir="outputs/toy_sft")
# grpo_care.py (./train.sh: from the warm start): 60 steps of 4 prompts x 8 samples, one epoch, ~1 min on 2
# CPU cores (at 40, GRPO had not yet drifted far enough for CARE's gain to show in every seed). The fast EMA
# (every 2 steps, decay 0.9) moves within so short a run; the paper's 0.995 every 10 is for ~1,000 steps
# (a slower 0.975 gave the same bonus decisions, step for step).
RL_DEFAULTS = dict(shuffle_options=False, max_new_tokens=48, prompts_per_device=4, learning_rate=1e-4,
                   warmup_ratio=0.0, max_steps=60, save_steps=30, ref_ema_every=2, ref_ema_decay=0.9,
                   output_dir="outputs/toy")


# ---------------------------------------------------------------------------------------------
# pixels
def _frame(colour: str | None, env: str, rng: random.Random) -> np.ndarray:
    e = ENVIRONMENTS[env]
    img = np.empty((FRAME, FRAME, 3), np.uint8)
    img[:] = rng.choice(e["bg"])
    if colour is not None:
        x0, y0, x1, y1 = e["box"]
        img[y0:y1, x0:x1] = COLOURS[colour]
    return img


def _write_video(path: Path, frames: list[np.ndarray], fps: int = 2) -> None:
    import av  # lazy: only the toy builder writes videos

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)  # mpeg4 part 2: in every ffmpeg build
        stream.width, stream.height, stream.pix_fmt = FRAME, FRAME, "yuv420p"
        stream.options = {"qscale": "2"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_png(path: Path, frame: np.ndarray) -> None:
    Image.fromarray(frame).save(path)


# ---------------------------------------------------------------------------------------------
# annotations
def cot_text(colour: str, action: str) -> str:
    """The toy chain of thought: it names the visual cue and the action the cue implies."""
    return (f"Let me think. In my current observation I see the {colour} object, "
            f"so the next step is to {action}.")


def cot_row(row: dict, flaw: str | None) -> dict:
    """A training row with its chain of thought: `cot` (the reasoning) and `cot_answer` (the option
    text its final answer picks), and `cot_flaw` (a toy-only label).

    flaw None: reads the cue and answers what it implies. "misread": names COT_CONFUSION's second
    colour and its action and answers that (consistent but wrong). "lucky": the same reasoning, but
    answers the right option (right for the wrong reason). "inconsistent": names the right colour
    and action, then answers the option after it in alphabetical order (the next letter)."""
    if flaw not in (None, "misread", "lucky", "inconsistent"):
        raise ValueError(f"unknown CoT flaw {flaw!r}")
    options = sorted([row["answer"], *row["negative_answers"]])  # all four: their letters are fixed
    seen = row["answer"]
    if flaw in ("misread", "lucky"):
        seen = row["answer"].replace(f" {COT_CONFUSION[0]} ", f" {COT_CONFUSION[1]} ")
    picked = {"inconsistent": options[(options.index(seen) + 1) % 4], "lucky": row["answer"]}.get(flaw, seen)
    colour = seen.split(" the ", 1)[1].split()[0]
    return dict(row, cot=cot_text(colour, seen), cot_answer=picked, cot_flaw=flaw)


def flaw_class(question: str, answer: str) -> str:
    """The teacher-flaw class of a row (training or validation) from its question and right answer:
    "orange" (the rows the teacher misreads, or gets right for the wrong reason), "slip" (the
    COT_SLIP_GOAL rows whose answer it slips), or "clean" (the teacher is right there)."""
    if f" {COT_CONFUSION[0]} " in f" {answer} ":
        return "orange"
    return "slip" if COT_SLIP_GOAL in question else "clean"


def _make_row(rng, idx, source, env, goal, steps, data: Path, domain=None, validation=False):
    verb, obj = rng.choice(steps)
    colours = list(COLOURS)
    rng.shuffle(colours)
    target, done = colours[0], colours[1:1 + rng.randint(0, 3)]  # 0 done steps: image-only row
    answer = f"{verb} the {target} {obj}"
    negatives = [f"{verb} the {c} {obj}" for c in colours[1:]]
    vid = f"{source.lower()}_{idx:05d}"
    row = dict(sample_id=idx, video_source=source, video_id=vid, task_goal=goal,
               question=QUESTION.format(goal=goal), answer=answer, negative_answers=negatives,
               task_progress_metadata=[
                   dict(narration_text=f"{verb} the {c} {obj}", start_frame=4 * i, stop_frame=4 * i + 3)
                   for i, c in enumerate(done)],
               video_basename=f"{vid}.mp4", current_observation_basename=f"{vid}.png")
    image = _frame(target, env, rng)
    _write_png(data / "images" / source / row["current_observation_basename"], image)
    if done:  # as in the real data, rows with no progress yet have no video
        frames = [_frame(c, env, rng) for c in done for _ in range(2)] + [image, image]
        _write_video(data / "videos" / source / row["video_basename"], frames)
    if validation:
        options = sorted([answer] + rng.sample(negatives, 3))  # alphabetical, as --shuffle_options false trains
        row.update({f"choice_{k}": o for k, o in zip("abcd", options)})
        row["golden_choice_idx"] = "ABCD"[options.index(answer)]
    if domain is not None:
        row["domain"] = domain
    return row


def build_data(data: Path, seed: int = 0, n_train: int = 240, n_val: int = 200, misread: float = COT_MISREAD,
               inconsistent: float = COT_INCONSISTENT, lucky: float = COT_LUCKY) -> None:
    rng = random.Random(seed)
    for sub in ("annotations", "videos/EpicKitchens", "videos/Ego4D", "images/EpicKitchens", "images/Ego4D"):
        (data / sub).mkdir(parents=True, exist_ok=True)
    kitchen = [(g, s) for g, s in KITCHEN_TASKS.items()]
    idx = 0
    train = []
    for _ in range(n_train):
        goal, steps = rng.choice(kitchen)
        source = "EpicKitchens" if rng.random() < 0.8 else "Ego4D"
        train.append(_make_row(rng, idx, source, "kitchen", goal, steps, data))
        idx += 1
    # Exactly round(fraction * eligible) rows of each flaw, drawn by their own generator so that the
    # rest of the world does not depend on the flaw settings. An orange row of the slip goal gets an orange flaw only.
    cot_rng = random.Random(f"{seed}/cot")
    orange = [i for i, r in enumerate(train) if flaw_class(r["question"], r["answer"]) == "orange"]
    slip = [i for i, r in enumerate(train) if flaw_class(r["question"], r["answer"]) == "slip"]
    if misread + lucky > 1:
        raise ValueError(f"cot_misread {misread} + cot_lucky {lucky} > 1: both flaws draw from the orange rows")
    n_misread = round(misread * len(orange))
    drawn = cot_rng.sample(orange, n_misread + min(round(lucky * len(orange)), len(orange) - n_misread))
    flaws = {i: "misread" if k < n_misread else "lucky" for k, i in enumerate(drawn)}
    flaws |= {i: "inconsistent" for i in cot_rng.sample(slip, round(inconsistent * len(slip)))}
    cot = [cot_row(r, flaws.get(i)) for i, r in enumerate(train)]
    levels = {}
    for level, env in (("L1", "kitchen"), ("L2", "new_kitchen")):
        levels[level] = []
        for _ in range(n_val):
            goal, steps = rng.choice(kitchen)
            levels[level].append(_make_row(rng, idx, "EpicKitchens", env, goal, steps, data, validation=True))
            idx += 1
    levels["L3"] = []
    for i in range(n_val):
        domain = list(L3_TASKS)[i % 4]
        goal, steps = next(iter(L3_TASKS[domain].items()))
        levels["L3"].append(_make_row(rng, idx, "Ego4D", "outdoors", goal, steps, data, domain, True))
        idx += 1
    _write_jsonl(data / "annotations" / "training_6k.jsonl", train)
    _write_jsonl(data / "annotations" / "training_with_cot_6k.jsonl", cot)
    for level, rows in levels.items():
        _write_jsonl(data / "annotations" / f"validation_{level}.jsonl", rows)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def build(out: str | os.PathLike, seed: int = 0, n_train: int = 240, n_val: int = 200, force: bool = False,
          cot_misread: float = COT_MISREAD, cot_inconsistent: float = COT_INCONSISTENT,
          cot_lucky: float = COT_LUCKY, qwen: bool = False, arch: str = "qwen2_5_vl") -> Path:
    """Build (or reuse) the toy world in `out`; returns the path. `out/model` and `out/data`."""
    out = Path(out)
    stamp = out / "toy.json"
    spec = dict(seed=seed, n_train=n_train, n_val=n_val, cot_misread=cot_misread,
                cot_inconsistent=cot_inconsistent, cot_lucky=cot_lucky, version=6) | ({"vocab": "qwen"} if qwen else {}) \
        | ({"arch": arch} if arch != "qwen2_5_vl" else {})
    if not force and stamp.exists() and json.loads(stamp.read_text()) == spec:
        if not (out / "data/LongVideoBench/lvb_val.json").exists():  # a world built before it existed
            build_longvideobench(out / "data", seed)
        return out
    if out.exists():
        shutil.rmtree(out)
    build_data(out / "data", seed, n_train, n_val, cot_misread, cot_inconsistent, cot_lucky)
    build_video_r1(out / "data", seed)
    build_longvideobench(out / "data", seed)
    build_model_dir(out / "model", out / "data", seed, qwen, arch)
    stamp.write_text(json.dumps(spec))  # written last: a half-built world is rebuilt next time
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for model/ and data/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n_train", type=int, default=240)
    p.add_argument("--n_val", type=int, default=200, help="rows per validation level")
    p.add_argument("--force", action="store_true", help="rebuild even if a matching build exists")
    p.add_argument("--qwen_vocab", action="store_true",
                   help="the model with Qwen2.5-VL-7B-Instruct's tokenizer and vocabulary, saved as the 7B is published")
    p.add_argument("--arch", default="qwen2_5_vl", choices=("qwen2_5_vl", "qwen2_vl"),
                   help="qwen2_vl: a tiny Qwen2-VL, the policy of SEED-Bench-R1's own study")
    p.add_argument("--cot_misread", type=float, default=COT_MISREAD, help="fraction of orange rows whose CoT reads red")
    p.add_argument("--cot_lucky", type=float, default=COT_LUCKY,
                   help="fraction of orange rows whose CoT reads red, yet answers orange (right for the wrong reason)")
    p.add_argument("--cot_inconsistent", type=float, default=COT_INCONSISTENT,
                   help=f"fraction of '{COT_SLIP_GOAL}' rows whose CoT answers the next letter")
    a = p.parse_args()
    out = build(a.out, a.seed, a.n_train, a.n_val, a.force, a.cot_misread, a.cot_inconsistent, a.cot_lucky, a.qwen_vocab,
                a.arch)
    print(f"toy world in {out}: model/ and data/")


def build_video_r1(data: Path, seed: int = 0, per_kind: int = 3) -> None:
    """The general domain in miniature, in the Video-R1 format (see data.py), beside the SEED-Bench-R1 toy:

    * `data/Video-R1-toy.json`: the training mix, `per_kind` rows of each of six kinds: multiple choice
      on an image and on a video, numerical (video), OCR and free-form (image), regression (video); each
      with a `process` chain of thought. Train on it with `--train_file Video-R1-toy.json`.
    * `data/Evaluation/eval_<name>.json` for data.BENCHMARKS: a video and an image multiple-choice
      row each; VSI-Bench a video multiple-choice, a regression and a numerical row.
    Media paths are "./"-relative to `data`, as in the real files. Every answer is decidable from the
    pixels: the object's colour, the colours a video shows (first, how many, for how long), the words
    written in the image. Its own generator: the SEED-Bench-R1 toy is the same with or without it."""
    rng = random.Random(f"{seed}/video_r1")

    def save(rel: str, frames: list) -> str:
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        _write_png(data / rel, frames[0]) if rel.endswith(".png") else _write_video(data / rel, frames)
        return "./" + rel

    def make(kind: str, pid: int, folder: str) -> dict:
        c = rng.sample(list(COLOURS), 4)
        n = rng.randint(2, 4)  # colours a video shows, 2 frames each
        shows = [_frame(x, "kitchen", rng) for x in c[:n] for _ in range(2)]
        options = rng.sample(c, 4)
        letter = "ABCD"[options.index(c[0])]
        ptype, data_type, problem, answer, frames = {
            "mc_image": ("multiple choice", "image", "What colour is the object?", letter, [_frame(c[0], "kitchen", rng)]),
            "mc_video": ("multiple choice", "video", "Which colour does the video show first?", letter, shows),
            "numerical": ("numerical", "video", "How many different colours does the video show?", str(n), shows),
            "OCR": ("OCR", "image", "What is written in the image?", f"{c[0]} cup", None),
            "free-form": ("free-form", "image", "Describe the image.", f"a {c[0]} square on a grey background",
                          [_frame(c[0], "kitchen", rng)]),
            "regression": ("regression", "video", f"For how many seconds does the video show the {c[0]} object?",
                           f"{n / 2:g}", [_frame(c[0], "kitchen", rng)] * n + [_frame(c[1], "kitchen", rng)] * (6 - n)),
        }[kind]
        if kind == "OCR":
            img = Image.fromarray(_frame(None, "kitchen", rng))
            ImageDraw.Draw(img).text((4, 22), answer, fill=(255, 255, 255))
            frames = [np.asarray(img)]
        path = save(f"{folder}/{kind}_{pid}.{'png' if data_type == 'image' else 'mp4'}", frames)
        return dict(problem_id=pid, problem=problem, data_type=data_type, problem_type=ptype,
                    options=[f"{x}. {o}" for x, o in zip("ABCD", options)] if ptype == "multiple choice" else [],
                    process=f"<think>Let me think. I see the {c[0]} object, so the answer is {answer}.</think>",
                    solution=f"<answer>{answer}</answer>", path=path, data_source=f"toy/{kind}")

    kinds = ("mc_image", "mc_video", "numerical", "OCR", "free-form", "regression")
    train = [make(kind, i * len(kinds) + k, "video_r1_toy") for i in range(per_kind) for k, kind in enumerate(kinds)]
    (data / "Video-R1-toy.json").write_text(json.dumps(train, indent=1))
    for name, title in BENCHMARKS.items():
        rows = ("mc_video", "regression", "numerical") if name == "vsibench" else ("mc_video", "mc_image")
        (data / "Evaluation").mkdir(parents=True, exist_ok=True)
        (data / "Evaluation" / f"eval_{name}.json").write_text(
            json.dumps([make(kind, i + 1, f"Evaluation/{title}") for i, kind in enumerate(rows)], indent=1))


def build_longvideobench(data: Path, seed: int = 0, n_val: int = 8, n_test: int = 2) -> None:
    """LongVideoBench in miniature (longvideobench.py's format) in `data/LongVideoBench`: lvb_val.json and
    lvb_test_wo_gt.json (no correct_choice). Each 2 fps clip shows 2-3 of five colours in turn, 2 s each (duration
    group 15) or 3 for 6 s each (group 60); the question asks for the first or the last colour (the category),
    among all five. Subtitles name each colour while it shows, in the source video's clock (the clip starts at
    starting_timestamp_for_subtitles), {start, end, line} in even rows, {timestamp, text} in odd ones (the last end
    null), plus a line before the clip that no frame covers. Its own generator: the rest of the toy is unchanged."""
    rng, root = random.Random(f"{seed}/longvideobench"), data / "LongVideoBench"
    for sub in ("videos", "subtitles"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    colours, (x0, y0, x1, y1) = {**COLOURS, "purple": (150, 60, 200)}, ENVIRONMENTS["kitchen"]["box"]
    clock = lambda t: f"{int(t // 3600)}:{int(t % 3600 // 60):02d}:{t % 60:06.3f}"  # noqa: E731
    rows = []
    for i in range(n_val + n_test):
        options, (group, seconds) = rng.sample(list(colours), 5), rng.choice([(15, 2), (60, 6)])
        shown, category = options[:rng.randint(2, 3) if group == 15 else 3], rng.choice(["first colour", "last colour"])
        rng.shuffle(options)
        frames = []
        for c in shown:
            frame = _frame(None, "kitchen", rng)
            frame[y0:y1, x0:x1] = colours[c]
            frames += [frame] * (2 * seconds)
        vid, offset = f"toylvb{i:03d}", rng.choice([5.0, 12.5, 3600.25])
        _write_video(root / "videos" / f"{vid}.mp4", frames)
        lines = [(offset - 4, offset - 2, "Welcome back.")] + [
            (offset + k * seconds, offset + (k + 1) * seconds, f"Here is the {c} object.") for k, c in enumerate(shown)]
        subs = ([dict(start=clock(s), end=clock(e), line=t) for s, e, t in lines] if i % 2 == 0 else
                [dict(timestamp=[s, None if k == len(lines) - 1 else e], text=t) for k, (s, e, t) in enumerate(lines)])
        (root / "subtitles" / f"{vid}_en.json").write_text(json.dumps(subs, indent=1))
        answer = shown[0] if category == "first colour" else shown[-1]
        question = f"Which colour does the video show {category.split()[0]}?"
        rows.append(dict(id=f"{vid}_0", video_id=vid, question=question,
                         candidates=options, correct_choice=options.index(answer), video_path=f"{vid}.mp4",
                         subtitle_path=f"{vid}_en.json", starting_timestamp_for_subtitles=offset,
                         duration=float(len(frames) / 2), duration_group=group, question_category=category))
    test = [{k: v for k, v in r.items() if k != "correct_choice"} for r in rows[n_val:]]
    (root / "lvb_test_wo_gt.json").write_text(json.dumps(test, indent=1))
    (root / "lvb_val.json").write_text(json.dumps(rows[:n_val], indent=1))  # last: it marks a finished build


if __name__ == "__main__":
    main()
