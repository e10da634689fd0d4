"""What a run is conditioned on besides text, in global video frames: images pinned at frames
(``--image FRAME:PATH``, ``--last-image``), or the last frames of a video to extend
(``--extend IN.mp4``).

Like the noise, these are facts about the whole video: every rank reads the same inputs and
builds only its own clip's slice of what the model family makes of them (mask and condition
channels, or clean latents held through the denoising). This module reads and checks the
inputs (``problems`` names everything wrong before any work); the families turn them into
tensors (``pipelines/``).

    Visual.keyframes   ((video frame, PIL image), ...)   sorted, at most one per frame
    Visual.prefix      the extended video's frames, written before the new ones
    Visual.context     how many of the new video's first frames are the input's last frames
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from .errors import GenerationError

__all__ = ["Visual", "image_specs", "load_image", "read_extension", "read_visual",
           "visual_problems", "input_digest"]


@dataclass(frozen=True)
class Visual:
    """The images of a run at their global video frames, and, when extending, the input's
    frames and how many of them open the new video."""

    keyframes: tuple = ()          # ((frame, PIL.Image RGB), ...), frame-sorted
    prefix: np.ndarray | None = None   # (P, H0, W0, 3) uint8: the video being extended
    context: int = 0               # the new video's first ``context`` frames = prefix[-context:]

    @property
    def frames(self) -> tuple:
        return tuple(f for f, _ in self.keyframes)

    def __bool__(self):
        return bool(self.keyframes)


def image_specs(images, last_image, num_frames: int | None) -> list:
    """``images`` (a path, a PIL image, or ``(frame, image)`` pairs; CLI strings ``PATH`` or
    ``FRAME:PATH``) and ``last_image`` as ``[(frame, image)]``, frame-sorted; raises
    ``GenerationError`` naming what is wrong (a frame outside the video, two at one frame)."""
    specs = []
    for item in _as_list(images):
        if isinstance(item, (tuple, list)) and len(item) == 2:
            frame, image = item
        elif isinstance(item, str):
            head, sep, tail = item.partition(":")
            frame, image = (int(head), tail) if sep and head.isdigit() else (0, item)
        else:
            frame, image = 0, item
        if isinstance(frame, bool) or not isinstance(frame, int):
            raise GenerationError(f"image frame must be an int, got {frame!r}")
        specs.append((frame, image))
    if last_image is not None:
        if not isinstance(num_frames, int) or num_frames < 1:
            raise GenerationError("--last-image needs the video's frame count")
        specs.append((num_frames - 1, last_image))
    for frame, _ in specs:
        if frame < 0 or (isinstance(num_frames, int) and frame >= num_frames):
            raise GenerationError(f"an image is pinned at frame {frame}, outside the video's "
                                  f"{num_frames} frames (0 .. {num_frames - 1})")
    frames = [f for f, _ in specs]
    twice = sorted({f for f in frames if frames.count(f) > 1})
    if twice:
        raise GenerationError(f"two images are pinned at frame(s) {twice}; give one per frame")
    return sorted(specs, key=lambda s: s[0])


def _as_list(images) -> list:
    if images is None:
        return []
    if isinstance(images, (list, tuple)) and not (
            len(images) == 2 and isinstance(images[0], int) and not isinstance(images[0], bool)):
        return list(images)
    return [images]


def load_image(image):
    """A PIL image (RGB) from a path or a PIL image; ``GenerationError`` if unreadable."""
    from PIL import Image, UnidentifiedImageError
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if not isinstance(image, (str, os.PathLike)):
        raise GenerationError(f"an image must be a path or a PIL image, got {type(image).__name__}")
    path = os.fspath(image)
    if not os.path.exists(path):
        raise GenerationError(f"image {path!r} does not exist")
    if os.path.isdir(path):
        raise GenerationError(f"image {path!r} is a directory")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise GenerationError(f"image {path!r} is not a readable image ({e})") from None


def read_extension(path, context: int):
    """``(frames (P, H, W, 3) uint8, fps)`` of the mp4 to extend, checked: readable, at least
    ``context`` frames. Read only (never opened for writing)."""
    from .video import read_video
    path = os.fspath(path)
    if not os.path.exists(path):
        raise GenerationError(f"--extend: {path!r} does not exist")
    if os.path.isdir(path):
        raise GenerationError(f"--extend: {path!r} is a directory")
    try:
        frames, meta = read_video(path)
    except Exception as e:  # noqa: BLE001 - ffmpeg says what it could not read
        raise GenerationError(f"--extend: {path!r} is not a readable video "
                              f"({type(e).__name__}: {str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''})") from None
    if len(frames) == 0:
        raise GenerationError(f"--extend: {path!r} holds no frames")
    if len(frames) < context:
        raise GenerationError(f"--extend: {path!r} holds {len(frames)} frames, fewer than the "
                              f"{context} context frames (--context-frames)")
    return frames, float(meta.get("fps") or 0.0)


def read_visual(s) -> Visual:
    """The run's images at their frames (the new video's first ``context`` frames, when
    extending: the input's last ones), read; ``GenerationError`` if any is unreadable."""
    from PIL import Image
    if s.extend is not None:
        frames, _ = read_extension(s.extend, s.context_frames)
        ctx = frames[len(frames) - s.context_frames:]
        return Visual(keyframes=tuple((i, Image.fromarray(f)) for i, f in enumerate(ctx)),
                      prefix=frames, context=s.context_frames)
    specs = image_specs(s.images, s.last_image, s.num_frames)
    return Visual(keyframes=tuple((f, load_image(im)) for f, im in specs))


def visual_problems(s) -> list:
    """What is wrong with the run's images or video to extend (``GenerateSettings`` ``s``),
    found without a model; the family checks what its model can take."""
    p = []
    if s.extend is not None and (s.images is not None or s.last_image is not None):
        p.append("give --extend or images (--image, --last-image), not both")
        return p
    try:
        for _, image in image_specs(s.images, s.last_image, s.num_frames):
            load_image(image)
    except GenerationError as e:
        p.append(str(e))
    if s.extend is not None:
        if s.out is not None and os.path.abspath(s.extend) == os.path.abspath(s.out):
            p.append(f"--extend {s.extend!r} is also the --out path: the input is never "
                     "overwritten; write the extended video elsewhere")
        elif s.out is not None and os.path.exists(s.out) and os.path.exists(s.extend) and \
                os.path.samefile(s.extend, s.out):
            p.append(f"--out {s.out!r} is the --extend video itself (another name for it)")
        try:
            read_extension(s.extend, s.context_frames if isinstance(s.context_frames, int) else 1)
        except GenerationError as e:
            p.append(str(e))
    return p


def input_digest(s) -> dict:
    """What every rank must have read alike: a checksum of each image's pixels and of the
    video to extend, so that ranks given different files refuse together."""
    out = {}
    try:
        specs = image_specs(s.images, s.last_image, s.num_frames)
    except GenerationError:
        return out
    for frame, image in specs:
        try:
            pixels = np.asarray(load_image(image))
        except GenerationError:
            continue
        out[f"image@{frame}"] = hashlib.sha256(pixels.tobytes()).hexdigest()[:16] + \
            f"/{pixels.shape[1]}x{pixels.shape[0]}"
    if s.extend is not None and os.path.isfile(s.extend):
        h = hashlib.sha256()
        with open(s.extend, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out["extend"] = h.hexdigest()[:16]
    return out
