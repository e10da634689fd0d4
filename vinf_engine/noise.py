"""Initial latent noise drawn per global frame, so a rank can draw exactly its own frames."""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["initial_noise", "step_noise", "step_generators"]

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
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 64:
        # Seeds are mixed as 64-bit words: 2**64 would draw what 0 draws.
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
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


# A different stream family from initial_noise: salt the seed with the step before mixing in the
# frame, so that step 0's noise for frame f is unrelated to frame f's initial latents.
_STEP_SALT = 0xD1B54A32D192ED03


def step_noise(seed: int, step: int, shape: Sequence[int], frames: range | None = None, *,
               dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
    """Standard normal noise for denoising step ``step`` (0-based), drawn frame by frame.

    What a stochastic scheduler (DPM-Solver++ SDE, DDIM with eta > 0) adds at each step,
    passed to it as ``variance_noise``: like ``initial_noise``, each global frame has its own
    stream, keyed by ``(seed, step, frame)``, so a rank draws exactly its own frames and the
    video does not depend on the number of ranks, and a run resumed at step ``k`` draws what
    the uninterrupted run drew.

    Parameters
    ----------
    seed : int
    step : int, >= 0
    shape : (B, C, F_total, H, W) of the whole video's latents
    frames : range of global frames to draw (default: all)

    Returns
    -------
    (B, C, len(frames), H, W) tensor.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    step_seed = _frame_seed(seed ^ _STEP_SALT, step)
    return initial_noise(step_seed, shape, frames, dtype=dtype, device=device)


def step_generators(seed: int, step: int, frames: range) -> list:
    """One CPU ``torch.Generator`` per global frame of ``frames`` for denoising step ``step``,
    seeded like ``step_noise``: for schedulers that take ``generator=`` but not
    ``variance_noise=`` (Euler ancestral, DDPM). diffusers draws batch row ``i`` from
    generator ``i``, and the latents reach the scheduler as one row per frame."""
    step_seed = _frame_seed(seed ^ _STEP_SALT, step)
    return [torch.Generator().manual_seed(_frame_seed(step_seed, f)) for f in frames]
