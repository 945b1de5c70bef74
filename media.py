"""Media into model inputs: how each example's video and image become pixels (VisionSpec, the chat messages
qwen-vl-utils reads) and their loading, where a file that cannot be read is a MediaError naming it. data.Collator
turns a batch of examples into the processor's inputs with these.

    images, videos, metadata = load_media(example, VisionSpec())   # one example's decoded media
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass

from PIL import Image


class MediaError(OSError):
    """One sample's video or image cannot be read: `path` is the file at fault, `reason` why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


@dataclass(frozen=True)
class VisionSpec:
    """How media become pixels (qwen-vl-utils keys). Defaults are the reference's."""
    video_fps: float = 2.0
    video_min_frames: int = 4
    video_max_frames: int = 16
    video_max_pixels: int = 128 * 28 * 28  # per frame
    video_min_pixels: int = 128 * 28 * 28  # qwen-vl-utils' own floor for video frames
    image_max_pixels: int = 256 * 28 * 28
    image_min_pixels: int = 4 * 28 * 28
    media_size: int | None = None  # every image and frame resized to this square (rounded to 28), not by pixels


def messages(example: dict, vision: VisionSpec) -> list[dict]:
    """Reference content order: [video if any, image if any, text]. SEED-Bench-R1 always has the
    current-observation image and a video when there is progress; Video-R1 has one or the other."""
    content = []
    size = dict(resized_height=vision.media_size, resized_width=vision.media_size) if vision.media_size else {}
    if example["video"] is not None:
        content.append(dict(type="video", video=example["video"], fps=vision.video_fps,
                            min_frames=vision.video_min_frames, max_frames=vision.video_max_frames,
                            max_pixels=vision.video_max_pixels, min_pixels=vision.video_min_pixels, **size))
    if example["image"] is not None:
        content.append(dict(type="image", image=example["image"], max_pixels=vision.image_max_pixels,
                            min_pixels=vision.image_min_pixels, **size))
    content.append(dict(type="text", text=example["prompt"]))
    return [dict(role="user", content=content)]


def load_media(example: dict, vision: VisionSpec):
    """(images, videos, video_metadata) for one example. Raises MediaError naming the file at fault.

    qwen-vl-utils catches any decord error and retries with another reader, which either fails
    on an unrelated error (torchvision >= 0.25 has no read_video) or hands back what it managed
    to read. A corrupt file must be a skipped sample with decord's own reason, so we record
    qwen-vl-utils' warning and refuse any video that decord did not read."""
    from qwen_vl_utils import process_vision_info

    for path in (example["video"], example["image"]):
        if path is not None and not os.path.isfile(path):
            raise MediaError(path, "file not found")
        if path is not None and os.path.getsize(path) == 0:
            raise MediaError(path, "empty file (0 bytes)")
    log, caught = logging.getLogger("qwen_vl_utils.vision_process"), _Caught()
    log.addHandler(caught)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            images, videos = process_vision_info(messages(example, vision), return_video_metadata=True)
    except Exception as e:  # noqa: BLE001 - PIL, decord and torchvision each raise their own types
        culprit = example["image"] if example["video"] is None or not _image_readable(example["image"]) else example["video"]
        raise MediaError(culprit, f"cannot decode ({caught.reason or e})") from None
    finally:
        log.removeHandler(caught)
    videos = videos or []  # (frames, metadata) pairs: transformers 5 derives the frame rate from metadata
    if any(m.get("video_backend") != "decord" for _, m in videos):
        raise MediaError(example["video"], f"cannot decode video with decord ({caught.reason})")
    return images or [], [v for v, _ in videos], [m for _, m in videos]


def _image_readable(path: str | None) -> bool:
    """Whether PIL can decode the image at `path` (None: no image, nothing to blame)."""
    if path is None:
        return True
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 - PIL raises several types for a bad file
        return False


class _Caught(logging.Handler):
    """Keeps the first line of the last warning (decord's error, as qwen-vl-utils relays it)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.reason = None

    def emit(self, record):
        self.reason = record.getMessage().strip().splitlines()[0][:300]
