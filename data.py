"""Training and evaluation records (SEED-Bench-R1 and Video-R1), the reference prompt, and the Collator that turns
examples into model inputs (their media: media.py). One code path reads the real data and the toy world; the format is told by the file's rows
(rows with `problem_id`/`problem_type` are Video-R1, anything else SEED-Bench-R1).

    examples = load_examples(root / "annotations/training_6k.jsonl", root, seed=0, epoch=0)
    examples = load_examples(root / "Video-R1-260k.json", root)
    batch, kept = Collator(processor, VisionSpec())(examples)      # left-padded model inputs

SEED-Bench-R1: `annotations/*.jsonl`, `videos/<video_source>/<video_basename>`, `images/<video_source>/
<current_observation_basename>`; training rows get 3 distractors from `negative_answers` plus `answer`, shuffled by
a generator seeded with (seed, epoch, sample_id); validation rows (files named `validation*`) keep `choice_a`..
`choice_d` in order. Video-R1: a JSON list or JSON lines of {problem_id, problem, data_type, problem_type, options,
solution, path, process?, data_source?}. Every row is checked when read: a malformed row raises DataError
"<file>:<line>: <field>: <problem>". Unreadable media are skipped and counted (Collator.failures), never replaced.
Departures from the reference: DEPARTURES.md.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import posixpath
import random
import re
from pathlib import Path

from media import MediaError, VisionSpec, load_media, messages
from rewards import parse_answer

THINK_INSTRUCTION = (
    "Please think about this question as if you were a human pondering deeply. "
    "Engage in an internal dialogue using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', "
    "'let's break it down', etc, or other natural language thought expressions "
    "It's encouraged to include self-reflection or verification in the reasoning process. "
    "Provide your detailed reasoning between the <think> </think> tags, and then give your final answer "
    "between the <answer> </answer> tags."
)
MC_INSTRUCTION = " Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer> </answer> tags."
_NUMBER = " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags."
TYPE_INSTRUCTIONS = {  # the reference's per-type answer instruction, appended after the think instruction
    "multiple choice": MC_INSTRUCTION,
    "numerical": _NUMBER,
    "OCR": " Please transcribe text from the image/video clearly and provide your text answer within the <answer> </answer> tags.",
    "free-form": " Please provide your text answer within the <answer> </answer> tags.",
    "regression": _NUMBER,
}
# SEED-Bench-R1's own study (its v1 GRPO, `--prompt_template v1`): the question, its lettered options, this
V1_INSTRUCTION = ("Output the thinking process in <think> </think> and final answer in <answer> </answer> tags, "
                  "i.e., <think> reasoning process here </think><answer> answer here </answer>. ")
PROMPT_TEMPLATES = ("care", "v1")
LETTERS = "ABCD"
OPTION_LETTERS = "ABCDE"  # up to five options: LongVideoBench's
# the general video benchmarks, as the reference's Video-R1-format files DATA_ROOT/Evaluation/eval_<stem>.json
BENCHMARKS = {"vsibench": "VSI-Bench", "videommmu": "VideoMMMU", "mmvu": "MMVU", "mvbench": "MVBench",
              "tempcompass": "TempCompass", "videomme": "VideoMME"}  # file stem -> name, the paper's order
TRAIN_FIELDS = ("sample_id", "video_source", "question", "answer", "negative_answers",
                "task_progress_metadata", "video_basename", "current_observation_basename")
VALIDATION_FIELDS = ("sample_id", "video_source", "question", "answer", "task_progress_metadata", "video_basename",
                     "current_observation_basename", "choice_a", "choice_b", "choice_c", "choice_d", "golden_choice_idx")
VIDEO_R1_FIELDS = ("problem_id", "problem", "data_type", "problem_type", "solution", "path")
_THINK = re.compile(r"\s*<think>(.*)</think>\s*", re.DOTALL)


class DataError(ValueError):
    """A data file is malformed: the message names the file and line, or the field and sample."""


# ---------------------------------------------------------------------------------------------
# records
def read_jsonl(path: str | os.PathLike) -> list[dict]:
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    return rows


def read_located_rows(path: str | os.PathLike) -> list[tuple[str, dict]]:
    """(where, row) pairs: `where` is "file:line" for JSON lines, "file:line[#i]" for a JSON list."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: annotation file not found")
    text = Path(path).read_text()
    if not text.lstrip().startswith("["):
        rows, lineno = [], 0
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        for where, row in rows:
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        return rows
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{path}: expected a JSON list of objects")
    # a JSON list has no line per row; the line where each object opens is found by a scan of the text
    starts = _object_lines(text)
    return [(f"{path}:{starts[i] if i < len(starts) else '?'}[#{i}]", r) for i, r in enumerate(rows)]


def _object_lines(text: str) -> list[int]:
    """Line numbers where the objects of a (valid) top-level JSON list open."""
    decoder, gap = json.JSONDecoder(), re.compile(r"[\s,]*")
    lines, line, last, pos = [], 1, 0, gap.match(text, text.index("[") + 1).end()
    while pos < len(text) and text[pos] != "]":
        line, last = line + text.count("\n", last, pos), pos
        lines.append(line)
        pos = gap.match(text, decoder.raw_decode(text, pos)[1]).end()
    return lines


def split_of(path: str | os.PathLike) -> str:
    """'validation' for SEED-Bench-R1's validation_L*.jsonl (any file named validation*), else 'train'.
    The file, not a field, tells: a validation row missing golden_choice_idx is an error, not a training row."""
    return "validation" if Path(path).name.startswith("validation") else "train"


def question_prompt(problem: str, problem_type: str, options: list[str]) -> str:
    """The reference prompt. Multiple choice: no newline between the problem and 'Options:', each
    (already lettered) option on its own line; other types: the bare problem."""
    if problem_type == "multiple choice":
        problem = problem + "Options:\n" + "".join(o + "\n" for o in options)
    return f"{problem}\n{THINK_INSTRUCTION}{TYPE_INSTRUCTIONS[problem_type]}"


def prompt_text(question: str, options: list[str], template: str = "care") -> str:
    """The SEED-Bench-R1 prompt: option texts lettered A-D; template "v1": SEED-Bench-R1's own study's."""
    lettered = [f"{OPTION_LETTERS[i]}. {o}" for i, o in enumerate(options)]
    if template == "v1":
        return f"{question}\n" + "\n".join(lettered) + f"\n {V1_INSTRUCTION}"
    return question_prompt(question, "multiple choice", lettered)


def check_seed_row(row: dict, where: str, validation: bool) -> None:
    """Raises DataError "<file>:<line>: <field>: <problem> (sample_id=...)" for a malformed SEED-Bench-R1 row."""
    sid = f" (sample_id={row.get('sample_id', '?')})"
    fail = lambda field, problem: DataError(f"{where}: {field}: {problem}{sid}")  # noqa: E731
    for field in VALIDATION_FIELDS if validation else TRAIN_FIELDS:
        if field not in row:
            raise fail(field, "missing field" + (" (a validation file's row)" if validation else ""))
    if not isinstance(row["task_progress_metadata"], list):
        raise fail("task_progress_metadata", f"expected a list, got {type(row['task_progress_metadata']).__name__}")
    # the fields the prompt and the media paths are built from (video_basename only where there is a video)
    for field in ("question", "answer", "video_source", "current_observation_basename") + (
            ("video_basename",) if row["task_progress_metadata"] else ()):
        if not isinstance(row[field], str) or not row[field]:
            raise fail(field, f"expected a non-empty string, got {row[field]!r}")
    if validation:
        if row["golden_choice_idx"] not in tuple(LETTERS):
            raise fail("golden_choice_idx", f"{row['golden_choice_idx']!r} is not one of {', '.join(LETTERS)}")
        for k in "abcd":
            if not isinstance(row[f"choice_{k}"], str):
                raise fail(f"choice_{k}", f"expected a string, got {row[f'choice_{k}']!r}")
    else:
        neg = row["negative_answers"]
        if not isinstance(neg, list) or len(neg) < 3 or not all(isinstance(n, str) for n in neg):
            raise fail("negative_answers", f"expected a list of at least 3 strings, got {neg!r}")
        for i, n in enumerate(neg):
            if not n.strip():  # shown as a bare "B. " option
                raise fail("negative_answers", f"item {i} is empty")
            if n.strip() == row["answer"].strip():  # two identical options, one of them scored wrong
                raise fail("negative_answers", f"item {i} {n!r} is the answer")
    media = [("video_source", "videos/" + row["video_source"])]
    if row["task_progress_metadata"]:
        media.append(("video_basename", f"videos/{row['video_source']}/{row['video_basename']}"))
    media.append(("current_observation_basename", f"images/{row['video_source']}/{row['current_observation_basename']}"))
    for field, path in media:
        if not inside_root(row[field], path):
            raise fail(field, f"{row[field]!r} leads outside --data_root (an absolute path, or '..' above it)")


def inside_root(value: str, path: str) -> bool:
    """Whether the media path `path` (relative to --data_root, built with `value`) stays inside it, read from
    the text alone: a symlinked videos/ or images/ folder (common on clusters) is followed, not judged."""
    return not os.path.isabs(value) and posixpath.normpath(path).split("/")[0] != ".."


def make_example(row: dict, data_root: str | os.PathLike, seed: int = 0, epoch: int = 0, source: str = "?",
                 shuffle_options: bool = True, validation: bool = False, prompt_template: str = "care") -> dict:
    """One annotation row -> {id, options, solution, prompt, video, image, level info}.

    `source` names the file and line for error messages; `validation` says the row is from a
    validation file (options choice_a..d, gold golden_choice_idx). `shuffle_options=False` lists a
    training row's 4 options in alphabetical order instead of shuffling them (the toy's setting)."""
    check_seed_row(row, source, validation)
    if validation:
        options = [row[f"choice_{k}"] for k in "abcd"]
        solution = row["golden_choice_idx"]
    else:
        rng = random.Random(f"{seed}/{epoch}/{row['sample_id']}")
        options = rng.sample(row["negative_answers"], 3) + [row["answer"]]
        if shuffle_options:
            rng.shuffle(options)
        else:
            options.sort()
        solution = LETTERS[options.index(row["answer"])]
    root = Path(data_root)
    has_video = len(row["task_progress_metadata"]) > 0  # rows at the first step are image-only
    return dict(
        id=row["sample_id"], options=options, solution=solution, answer=row["answer"],
        prompt=prompt_text(row["question"], options, prompt_template), question=row["question"], domain=row.get("domain"),
        video=str(root / "videos" / row["video_source"] / row["video_basename"]) if has_video else None,
        image=str(root / "images" / row["video_source"] / row["current_observation_basename"]),
        cot=row.get("cot"), problem_type="multiple choice", where=source,
    )


def make_video_r1_example(row: dict, data_root: str | os.PathLike, source: str = "?") -> dict:
    """One Video-R1 row -> the same example dict as `make_example`, with its own problem type."""
    pid = f" (problem_id={row.get('problem_id', '?')})"
    fail = lambda field, problem: DataError(f"{source}: {field}: {problem}{pid}")  # noqa: E731
    for field in VIDEO_R1_FIELDS:
        if field not in row:
            raise fail(field, "missing field")
    kind, problem_type = row["data_type"], row["problem_type"]
    if kind not in ("image", "video"):
        raise fail("data_type", f"{kind!r} is neither 'image' nor 'video'")
    if problem_type not in TYPE_INSTRUCTIONS:
        raise fail("problem_type", f"{problem_type!r} is not one of {list(TYPE_INSTRUCTIONS)}")
    for field in ("problem", "solution", "path"):
        if not isinstance(row[field], str):
            raise fail(field, f"expected a string, got {row[field]!r}")
    options = [] if row.get("options") is None else row["options"]
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        # a string would become one option line per character
        raise fail("options", f"expected a list of strings ('A. ...'), got {type(options).__name__} {options!r:.80}")
    if problem_type == "multiple choice" and not options:
        raise fail("options", "a multiple-choice row needs options")
    if not inside_root(row["path"], row["path"]):
        raise fail("path", f"{row['path']!r} leads outside --data_root (an absolute path, or '..' above it)")
    solution = parse_answer(row["solution"])
    solution = row["solution"].strip() if solution is None else solution
    media = str(Path(data_root) / row["path"].removeprefix("./"))  # the reference's path[2:]
    cot = row.get("process")
    if cot is not None:
        m = _THINK.fullmatch(cot)
        cot = (m.group(1) if m else cot).strip()
    return dict(
        id=row["problem_id"], options=options, solution=solution, answer=solution,
        prompt=question_prompt(row["problem"], problem_type, options), question=row["problem"],
        domain=row.get("data_source"), video=media if kind == "video" else None,
        image=media if kind == "image" else None, cot=cot, problem_type=problem_type, where=source,
    )


def load_examples(path: str | os.PathLike, data_root: str | os.PathLike, seed: int = 0, epoch: int = 0,
                  shuffle_options: bool = True, prompt_template: str = "care") -> list[dict]:
    """Examples of a SEED-Bench-R1 or a Video-R1 file; the first row's keys tell which, the file's
    name whether SEED-Bench-R1 rows are validation rows (`split_of`). Every row is checked: the first
    malformed one raises DataError naming file:line and field. `prompt_template` v1: SEED-Bench-R1 rows only."""
    rows = read_located_rows(path)
    if rows and {"problem_id", "problem_type"} & rows[0][1].keys():
        if prompt_template != "care":
            raise DataError(f"{path}: Video-R1 rows have the reference's prompt only, not --prompt_template "
                            f"{prompt_template} (SEED-Bench-R1's)")
        return [make_video_r1_example(r, data_root, source=where) for where, r in rows]
    validation = split_of(path) == "validation"
    examples = [make_example(r, data_root, seed, epoch, where, shuffle_options, validation, prompt_template)
                for where, r in rows]
    first = {}  # str: the id keys seeds, completions.jsonl and evaluation records as text, so 7 and "7" collide
    for where, r in rows:
        at = first.setdefault(str(r["sample_id"]), where)
        if at != where:
            raise DataError(f"{where}: sample_id: {r['sample_id']!r} is also the id of the row at {at}")
    return examples


def check_prompt_lengths(examples: list[dict], tokenizer, max_prompt_length: int) -> None:
    """Raises DataError "<file>:<line>: <field>: ..." for the first example whose prompt text alone is longer
    than `max_prompt_length` tokens, before any model is loaded (the media's tokens come on top: Collator checks
    the whole prompt). A byte-level BPE token covers at least one byte, so only texts of `max_prompt_length`
    bytes or more are tokenised, and a long one is judged by its head first (a 5 MB question: in a second)."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's own
    count = lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    for ex in examples:
        text, bound = ex["prompt"], max_prompt_length
        if len(text.encode()) < bound:
            continue
        fail = lambda problem: DataError(  # noqa: E731 - names the longer of the question and the options
            f"{ex['where']}: {max(('question', 'options'), key=lambda k: len(str(ex[k])))}: {problem}, more than "
            f"--max_prompt_length {bound} (sample {ex['id']})")
        cut = text.rfind(" ", 0, 16 * bound)  # a head cut before a space: no token spans it, nor exceeds the text's
        if len(text) > 16 * bound and cut > 0 and (n := count(text[:cut])) > bound + 1:  # + 1: the cut's own space
            raise fail(f"the prompt is over {n - 1} tokens (its first {cut} characters alone are {n})")
        if (n := count(text)) > bound:
            raise fail(f"the prompt is {n} tokens")


def check_media_dirs(examples: list[dict], source: str | os.PathLike) -> None:
    """Raises DataError when a folder that media of `examples` live in is missing (a wrong --data_root,
    no videos/): each sample would be skipped one by one, so the run is stopped before it starts."""
    needed = {}
    for ex in examples:
        for path in (ex["video"], ex["image"]):
            if path is not None:
                needed.setdefault(os.path.dirname(path), 0)
                needed[os.path.dirname(path)] += 1
    for folder, n in needed.items():
        if not os.path.isdir(folder):
            raise DataError(f"{source}: {folder}: no such directory ({n} media files of this file are there; "
                            "check --data_root)")


def step_examples(load_epoch, seed: int, per_step: int, steps_per_epoch: int, rank: int, world: int):
    """`step -> this process's examples` for a training loop. Epoch e is `load_epoch(e)` in an order
    seeded by (seed, e), the same whatever the process count; step s takes its examples
    [s*per_step, (s+1)*per_step), this rank every world-th."""

    @functools.lru_cache(maxsize=1)
    def epoch_order(epoch: int) -> list[dict]:
        examples = load_epoch(epoch)
        random.Random(f"{seed}/order/{epoch}").shuffle(examples)
        return examples

    def examples_for(step: int) -> list[dict]:
        epoch, s = divmod(step, steps_per_epoch)
        return epoch_order(epoch)[s * per_step:(s + 1) * per_step][rank::world]

    return examples_for


# ---------------------------------------------------------------------------------------------
# model inputs
class Collator:
    """Examples -> left-padded processor inputs. Unreadable samples, and prompts longer than
    `max_prompt_length` tokens with their media (None: no bound), are skipped and counted;
    `failures` keeps (sample id, file, reason) of each, in order."""

    def __init__(self, processor, vision: VisionSpec | None = None, max_prompt_length: int | None = None):
        self.processor, self.vision, self.skipped = processor, vision or VisionSpec(), 0
        self.max_prompt_length = max_prompt_length
        self.failures: list[tuple] = []
        self.processor.tokenizer.padding_side = "left"  # generation appends on the right

    def _skip(self, ex: dict, path: str, reason: str) -> None:
        self.skipped += 1
        self.failures.append((ex["id"], path, reason))
        logging.getLogger("grpo_care").warning("skipping sample %s: %s: %s", ex["id"], path, reason)

    def inputs(self, ex: dict):
        """(chat messages, images, videos, video metadata) of one example; raises on unreadable media."""
        return (messages(ex, self.vision), *load_media(ex, self.vision))

    def __call__(self, examples: list[dict]):
        loaded = []  # (example, chat, images, videos, metadata)
        for ex in examples:
            try:
                loaded.append((ex, *self.inputs(ex)))
            except Exception as e:  # noqa: BLE001 - any unreadable media is a skipped sample
                path, reason = (e.path, e.reason) if isinstance(e, MediaError) else (ex["video"] or ex["image"], repr(e))
                self._skip(ex, path, reason)
        while loaded:
            batch = self._process(loaded)
            lengths = batch["attention_mask"].sum(-1).tolist()  # (B,) tokens per prompt: padding is 0
            fits = [self.max_prompt_length is None or n <= self.max_prompt_length for n in lengths]
            if all(fits):
                return batch, [ex for ex, *_ in loaded]
            for (ex, *_), n, ok in zip(loaded, lengths, fits):
                if not ok:
                    self._skip(ex, ex.get("where") or f"sample {ex['id']}", f"prompt too long ({n} tokens with its "
                               f"media, more than --max_prompt_length {self.max_prompt_length})")
            loaded = [item for item, ok in zip(loaded, fits) if ok]  # rare: the others are processed again
        return None, []

    def _process(self, loaded: list[tuple]):
        texts = [self.processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
                 for _, chat, *_ in loaded]
        images, videos, metadata = ([x for item in loaded for x in item[k]] for k in (2, 3, 4))
        # qwen-vl-utils already resized and sampled frames: the processor must not do it again
        return self.processor(text=texts, images=images or None, videos=videos or None,
                              video_metadata=metadata or None, do_resize=False, do_sample_frames=False,
                              cap_pixels_per_frame=True, padding=True, return_tensors="pt")
