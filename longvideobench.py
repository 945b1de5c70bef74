"""LongVideoBench (arXiv 2407.15754) as SEED-Bench-R1's study evaluates it (its `infer.py`): the video and the
question, sampled at temperature 1, 256 new tokens, scored by the first letter of the answer tag.

    python evaluate.py --model_path P --data_root LongVideoBench --benchmark longvideobench [--lvb_subtitles]
    python evaluate.py ... --benchmark longvideobench --lvb_file lvb_test_wo_gt.json    # predictions only
    accelerate launch --num_processes 8 evaluate.py ...

DATA_ROOT holds the distributed files: `lvb_val.json` (a JSON list of {id, question, candidates (2-5 options,
lettered A-E), correct_choice (an index; absent from lvb_test_wo_gt.json), video_path, subtitle_path,
starting_timestamp_for_subtitles, duration, duration_group, question_category}), `videos/<video_path>` and
`subtitles/<subtitle_path>`: a JSON list of {start, end, line} ("H:MM:SS.fff") or {timestamp: [start, end], text}
(seconds), both read by the official loader, in the source video's clock: minus starting_timestamp_for_subtitles
is the clip's. With --lvb_subtitles the official interleaving (`interleave`): each sampled frame goes before the
first subtitle whose midpoint precedes it, a subtitle is kept when a frame falls inside it; consecutive frames stay
one video clip. Accuracy overall, per duration_group and per question_category. Departures: DEPARTURES.md.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from data import OPTION_LETTERS, Collator, DataError, inside_root, prompt_text, read_located_rows
from media import load_media
from rewards import first_letter_pick

NAME = "longvideobench"
# infer.py's frames: qwen-vl-utils at 2 fps, 4-16 frames (evaluate.max_frames), each resized to 256x256 -> 252x252
VISION = dict(video_max_pixels=252 * 252, video_min_pixels=252 * 252)
_CLOCK = re.compile(r"(\d+):(\d{1,2}):(\d{1,2}(?:\.\d*)?)")


def decoding(max_new_tokens: int) -> dict:
    """infer.py's generate(do_sample=True, temperature=1, max_new_tokens=256), every other knob set (top-k and
    top-p off); `max_new_tokens` caps the 256."""
    return dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=min(256, max_new_tokens))


# ---------------------------------------------------------------------------------------------
# reading
def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_row(row: dict, where: str, answered: bool, subtitles: bool) -> None:
    """Raises DataError "<file>:<line>[#i]: <field>: <problem> (id=...)" for a malformed LongVideoBench row."""
    fail = lambda field, problem: DataError(f"{where}: {field}: {problem} (id={row.get('id', '?')})")  # noqa: E731
    needed = ["id", "question", "candidates", "video_path"] + (["correct_choice", "duration_group",
                                                                "question_category"] if answered else [])
    needed += ["subtitle_path", "starting_timestamp_for_subtitles", "duration"] if subtitles else []
    for field in needed:
        if field not in row:
            raise fail(field, "missing field" + (" (the file's first row has correct_choice)"
                                                 if field == "correct_choice" else ""))
    for field in ("question", "video_path") + (("subtitle_path",) if subtitles else ()):
        if not isinstance(row[field], str) or not row[field]:
            raise fail(field, f"expected a non-empty string, got {row[field]!r}")
    for field, folder in (("video_path", "videos"),) + ((("subtitle_path", "subtitles"),) if subtitles else ()):
        if not inside_root(row[field], f"{folder}/{row[field]}"):
            raise fail(field, f"{row[field]!r} leads outside --data_root (an absolute path, or '..' above it)")
    cands = row["candidates"]
    if not isinstance(cands, list) or not 2 <= len(cands) <= 5 or not all(isinstance(c, str) for c in cands):
        raise fail("candidates", f"expected a list of 2 to 5 strings, got {cands!r}")
    if answered and (not isinstance(row["correct_choice"], int) or not 0 <= row["correct_choice"] < len(cands)):
        raise fail("correct_choice", f"{row['correct_choice']!r} is not an index into the {len(cands)} candidates")
    if subtitles:
        for field in ("starting_timestamp_for_subtitles", "duration"):
            if not _number(row[field]) or row[field] < 0:
                raise fail(field, f"expected a number >= 0 seconds, got {row[field]!r}")


def _seconds(clock) -> float | None:
    m = _CLOCK.fullmatch(clock) if isinstance(clock, str) else None
    return int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3]) if m else None


def read_subtitles(path: str | os.PathLike) -> list[tuple[float, float | None, str]]:
    """(start, end, text) per subtitle, in seconds of the source video's clock; end None: to the clip's end."""
    out = []
    for where, s in read_located_rows(path):
        if "timestamp" in s:  # Whisper-style: seconds, the last end may be null
            ts, text = s["timestamp"], s.get("text")
            if not (isinstance(ts, list) and len(ts) == 2 and _number(ts[0]) and (ts[1] is None or _number(ts[1]))):
                raise DataError(f"{where}: timestamp: expected [start, end] in seconds (end may be null), got {ts!r}")
            start, end, field = float(ts[0]), None if ts[1] is None else float(ts[1]), "text"
        elif "start" in s or "end" in s:
            start, end, text, field = _seconds(s.get("start")), _seconds(s.get("end")), s.get("line"), "line"
            bad = "start" if start is None else "end" if end is None else None
            if bad:
                raise DataError(f"{where}: {bad}: expected a time H:MM:SS.fff, got {s.get(bad)!r}")
        else:
            raise DataError(f"{where}: expected {{start, end, line}} or {{timestamp, text}}, got keys {sorted(s)}")
        if not isinstance(text, str):
            raise DataError(f"{where}: {field}: expected a string, got {text!r}")
        out.append((start, end, text))
    return out


def load_examples(path: str | os.PathLike, data_root: str | os.PathLike, subtitles: bool = False) -> list[dict]:
    """Examples of a LongVideoBench file (evaluate.py's fields plus the groups), every row checked, and with
    `subtitles` every subtitle file read: the first malformed one raises DataError naming file:line and field.
    The first row tells whether the file has answers (lvb_val.json) or not (lvb_test_wo_gt.json)."""
    rows, root, cache = read_located_rows(path), Path(data_root), {}
    answered = bool(rows) and "correct_choice" in rows[0][1]
    examples = []
    for where, r in rows:
        check_row(r, where, answered, subtitles)
        ex = dict(id=r["id"], where=where, options=r["candidates"], question=r["question"],
                  solution=OPTION_LETTERS[r["correct_choice"]] if answered else None,
                  prompt=prompt_text(r["question"], r["candidates"], "v1"), video=str(root / "videos" / r["video_path"]),
                  image=None, cot=None, problem_type="multiple choice", domain=r.get("question_category"),
                  duration_group=r.get("duration_group"), question_category=r.get("question_category"))
        if subtitles:
            sub = root / "subtitles" / r["subtitle_path"]
            if sub not in cache:
                if not sub.is_file():
                    raise DataError(f"{where}: subtitle_path: {sub}: file not found (id={r['id']})")
                cache[sub] = read_subtitles(sub)
            ex.update(subtitles=cache[sub], subtitle_offset=r["starting_timestamp_for_subtitles"],
                      duration=r["duration"], context="subtitles")  # context: a new prompt_id, not a resumed one
        examples.append(ex)
    return examples


# ---------------------------------------------------------------------------------------------
# subtitles between frames
def interleave(frame_times: list[float], subtitles: list[tuple], offset: float, duration: float) -> list:
    """The official interleaving (LongVideoBench's insert_subtitles_into_frames): frame indices and subtitle
    texts in input order. Times: frames in the clip's clock, subtitles in the source's (minus `offset`).
    Frames whose time is <= a subtitle's midpoint go before it; a subtitle is kept when some frame lies strictly
    inside it, a subtitle shorter than 1 s counting as the second around its midpoint."""
    out, nxt = [], 0
    for start, end, text in subtitles:
        start, end = start - offset, (duration if end is None else end - offset)
        mid = (start + end) / 2
        while nxt < len(frame_times) and frame_times[nxt] <= mid:
            out.append(nxt)
            nxt += 1
        if end - start < 1:
            start, end = mid - 0.5, mid + 0.5
        if any(start < t < end for t in frame_times):
            out.append(text)
    return out + list(range(nxt, len(frame_times)))


class SubtitleCollator(Collator):
    """The example's video, sampled as without subtitles, cut into clips of consecutive frames with the kept
    subtitles between them (each a line of text), then the prompt."""

    def inputs(self, ex: dict):
        _, (video,), (meta,) = load_media(ex, self.vision)  # (T, C, H, W) frames, decord's metadata
        idx = meta["frames_indices"]
        parts = interleave([i / meta["fps"] for i in idx], ex["subtitles"], ex["subtitle_offset"], ex["duration"])
        content, clips, metas, run = [], [], [], []
        for p in parts + [None]:  # None flushes the last run of frames
            if isinstance(p, int):
                run.append(p)
                continue
            if run:  # a clip keeps the video's frame rate: its share of the frames over its share of the length
                a, b = run[0], run[-1] + 1
                content.append(dict(type="video"))
                clips.append(video[a:b])
                metas.append(dict(meta, frames_indices=idx[a:b],
                                  total_num_frames=meta["total_num_frames"] * (b - a) / len(idx)))
                run = []
            if p is not None:
                content.append(dict(type="text", text=p + "\n"))
        content.append(dict(type="text", text=ex["prompt"]))
        return [dict(role="user", content=content)], [], clips, metas


# ---------------------------------------------------------------------------------------------
# scores
def score(example: dict, output: str, length: int, format_ok: bool, reasoning: str | None, prompt_id: str) -> dict:
    """One predictions.jsonl line; `correct` None where the file has no answers."""
    pick, gold = first_letter_pick(output), example["solution"]
    return dict(id=example["id"], level=NAME, domain=example["domain"], prompt_id=prompt_id, output=output,
                length=length, answer=pick, gold=gold, correct=None if gold is None else pick == gold,
                duration_group=example["duration_group"], question_category=example["question_category"],
                format=format_ok, reasoning=reasoning, judge_pick=None, skipped=False)


def _pct(flags: list) -> float | None:
    return round(100.0 * sum(map(bool, flags)) / len(flags), 2) if flags else None


def group_stats(records: list[dict]) -> dict:
    ok = [r for r in records if not r["skipped"]]
    return dict(n=len(ok), skipped=len(records) - len(ok),
                accuracy=_pct([r["correct"] for r in ok if r["correct"] is not None]),
                format=_pct([r["format"] for r in ok]),
                mean_length=round(sum(r["length"] for r in ok) / len(ok), 1) if ok else None)


def summarize(records: list[dict]) -> dict:
    """{"longvideobench": stats, "longvideobench/duration_group=15": ..., "longvideobench/question_category=S2E":
    ...}; a skipped sample (unreadable video) counts in the overall `skipped` only."""
    out = {NAME: group_stats(records)}
    ok = [r for r in records if not r["skipped"]]
    for field in ("duration_group", "question_category"):
        for g in sorted({r[field] for r in ok if r[field] is not None}, key=lambda g: (isinstance(g, str), g)):
            out[f"{NAME}/{field}={g}"] = group_stats([r for r in ok if r[field] == g])
    return out


def markdown(summary: dict, model: str) -> str:
    cell = lambda v: "–" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"**{model}** on LongVideoBench", "", "| | samples | accuracy (%) | format (%) | mean length (tokens) |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {'all' if k == NAME else k.split('/', 1)[1]} | " + " | ".join(
        cell(s[f]) for f in ("n", "accuracy", "format", "mean_length")) + " |" for k, s in summary.items()]
    skipped = summary[NAME]["skipped"]
    return "\n".join(lines + ([f"\n{skipped} samples skipped (unreadable video)"] if skipped else [])) + "\n"
