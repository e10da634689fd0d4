"""Writing the video: an mp4 encoded as frames arrive, visible under its name only when complete.

The encoder is ffmpeg through ``imageio-ffmpeg`` (which ships its own ffmpeg binary). Frames go to
a hidden temporary file beside the target; ``commit()`` renames it over the target in one step,
``abort()`` deletes it. A run that fails, or is killed, never leaves a half-written video under
the requested name and never replaces an existing one.
"""
from __future__ import annotations

import os

import numpy as np

from .files import temp_file

__all__ = ["VideoWriter", "read_video", "check_output_path", "frames_to_uint8"]


def check_output_path(path: str, *, overwrite: bool, suffixes=(".mp4",)) -> str | None:
    """Why ``path`` cannot receive the output, or None. Touches nothing."""
    if not path:
        return "no output path given"
    if not path.lower().endswith(suffixes):
        return f"output path {path!r} must end in {' or '.join(suffixes)}"
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"output path {path!r} is a directory"
    if not os.path.isdir(parent):
        return f"output directory {parent!r} does not exist"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"output directory {parent!r} is not writable"
    if os.path.exists(path) and not overwrite:
        return f"output {path!r} already exists (pass --overwrite to replace it)"
    return None


def frames_to_uint8(images) -> np.ndarray:
    """VAE output ``(N, 3, H, W)`` in [-1, 1] -> ``(N, H, W, 3)`` uint8, as diffusers' image
    post-processing does it (denormalize, clamp, scale, round)."""
    import torch
    x = (images.float() / 2 + 0.5).clamp(0, 1)
    x = (x * 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


class VideoWriter:
    """Stream ``(N, H, W, 3)`` uint8 frames into ``path`` (mp4, H.264, yuv420p).

    Parameters
    ----------
    path : final file name; written only by ``commit()``
    width, height : frame size in pixels (even: yuv420p halves the chroma planes)
    fps : frames per second of the file
    crf : x264 constant rate factor (0 = lossless luma, 18 ~ visually lossless, 23 = x264 default)
    """

    def __init__(self, path: str, width: int, height: int, fps: float = 8.0, crf: int = 18):
        import imageio_ffmpeg
        if width % 2 or height % 2:
            raise ValueError(f"video size {width}x{height} must be even in both dimensions "
                             "(H.264 yuv420p)")
        self.path = os.path.abspath(path)
        self.size = (width, height)
        self.frames = 0
        directory, name = os.path.split(self.path)
        fd, self.tmp = temp_file(directory, prefix=f".{name}.", suffix=".partial.mp4")
        os.close(fd)
        self._gen = imageio_ffmpeg.write_frames(
            self.tmp, (width, height), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
            quality=None, macro_block_size=2, ffmpeg_log_level="error",
            output_params=["-crf", str(int(crf))])
        try:
            self._gen.send(None)                 # starts ffmpeg
        except BaseException:
            self.abort()
            raise

    def write(self, frames: np.ndarray):
        """Append ``frames`` (N, H, W, 3) uint8."""
        if self._gen is None:
            raise RuntimeError("video writer is closed")
        w, h = self.size
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (h, w, 3):
            raise ValueError(f"frames must be (N, {h}, {w}, 3) uint8, got {frames.shape} {frames.dtype}")
        for f in frames:
            self._gen.send(np.ascontiguousarray(f))
        self.frames += len(frames)

    def commit(self):
        """Finish encoding and move the file to its name."""
        gen, self._gen = self._gen, None
        try:
            gen.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self._remove_tmp()
            raise

    def abort(self):
        """Stop encoding and delete the temporary file; the target is untouched."""
        gen, self._gen = self._gen, None
        if gen is not None:
            try:
                gen.close()
            except Exception:      # noqa: BLE001 - ffmpeg may already be gone; cleanup goes on
                pass
        self._remove_tmp()

    def _remove_tmp(self):
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


def read_video(path: str) -> tuple[np.ndarray, dict]:
    """Decode ``path`` to ``(N, H, W, 3)`` uint8 frames and ffmpeg's metadata (size, fps, ...)."""
    import imageio_ffmpeg
    reader = imageio_ffmpeg.read_frames(path)
    meta = next(reader)
    w, h = meta["size"]
    frames = [np.frombuffer(b, np.uint8).reshape(h, w, 3) for b in reader]
    return (np.stack(frames) if frames else np.zeros((0, h, w, 3), np.uint8)), meta
