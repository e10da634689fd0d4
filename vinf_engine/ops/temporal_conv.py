"""Temporal convolution over a frame range that carries its own halo.

A clip that holds global frames ``[lo, hi)`` of a ``num_frames``-frame video (its own frames
plus halo frames received from neighbours) runs a stack of temporal convolutions without any
further exchange: each ``(k, 1, 1)`` conv zero-pads only where the range touches a true video
end and elsewhere gives up ``k // 2`` frames whose receptive field left the range. A halo of
``depth * (k // 2)`` frames therefore lets ``depth`` stacked convs produce exact outputs for
the clip's own frames with one exchange instead of ``depth``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_int, check_tensor

__all__ = ["temporal_conv"]


def temporal_conv(x, weight, bias=None, *, lo, hi, num_frames):
    """``(k, 1, 1)`` convolution over frames of the range ``[lo, hi)`` of a video.

    Parameters
    ----------
    x : (N, C_in, hi - lo, H, W) tensor holding global frames ``[lo, hi)``
    weight : (C_out, C_in, k, 1, 1) tensor, ``k`` odd
    bias : (C_out,) tensor or None
    lo, hi : int, the global frame range held by ``x``
    num_frames : int, frames in the whole video

    Returns
    -------
    (y, lo', hi'): y is (N, C_out, hi' - lo', H, W), equal to the conv of the whole video
    (zero padding at its ends) on global frames ``[lo', hi')``.
    """
    check_tensor("x", x, 5)
    check_tensor("weight", weight, 5)
    k = weight.shape[2]
    if k % 2 == 0 or tuple(weight.shape[3:]) != (1, 1):
        raise ValueError(f"weight must be (C_out, C_in, k, 1, 1) with k odd, got {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight expects {weight.shape[1]} input channels, x has {x.shape[1]}")
    check_int("num_frames", num_frames, 1)
    check_int("lo", lo, 0)
    check_int("hi", hi, 0)
    if not lo < hi <= num_frames:
        raise ValueError(f"[lo, hi) = [{lo}, {hi}) must be a non-empty range inside [0, {num_frames})")
    if x.shape[2] != hi - lo:
        raise ValueError(f"x holds {x.shape[2]} frames but [lo, hi) spans {hi - lo}")
    r = k // 2
    y = F.conv3d(x, weight, bias, padding=(r, 0, 0))
    a = 0 if lo == 0 else r
    b = 0 if hi == num_frames else r
    if a + b >= y.shape[2]:
        raise ValueError(f"frame range [{lo}, {hi}) is too short for a kernel of {k} frames: "
                         "no output frame has its full receptive field")
    return y[:, :, a:y.shape[2] - b], lo + a, hi - b
