"""Initial latent noise drawn per global frame, so a rank can draw exactly its own frames."""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["initial_noise"]

_MASK64 = (1 << 64) - 1


def _frame_seed(seed: int, frame: int) -> int:
    # splitmix64 of (seed, frame): neighbouring frames and seeds get unrelated streams.
    z = (seed * 0x9E3779B97F4A7C15 + (frame + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def initial_noise(seed: int, shape: Sequence[int], frames: range | None = None, *,
                  dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
    """Standard normal latents of a whole video, drawn frame by frame from ``seed``.

    Parameters
    ----------
    seed : int
    shape : (B, C, F_total, H, W) of the whole video's latents
    frames : range of global frames to draw (default: all)
    dtype, device : of the result; draws are made on the CPU in fp32, so the values do not
        depend on the device or on how the frames are split across ranks.

    Returns
    -------
    (B, C, len(frames), H, W) tensor.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if len(shape) != 5 or any((not isinstance(s, int)) or s < 1 for s in shape):
        raise ValueError(f"shape must be (B, C, F_total, H, W) of positive ints, got {tuple(shape)}")
    B, C, F, H, W = shape
    frames = range(F) if frames is None else frames
    if not isinstance(frames, range) or frames.step != 1 or not (0 <= frames.start <= frames.stop <= F):
        raise ValueError(f"frames must be a contiguous range inside [0, {F}), got {frames!r}")
    gen = torch.Generator()
    out = torch.empty((B, C, len(frames), H, W), dtype=torch.float32)
    for i, f in enumerate(frames):
        gen.manual_seed(_frame_seed(seed, f))
        out[:, :, i] = torch.randn((B, C, H, W), generator=gen)
    return out.to(device=device, dtype=dtype)
