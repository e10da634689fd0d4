"""diffusers' ``TemporalConvLayer`` (a stack of GroupNorm, SiLU, [Dropout], k x 1 x 1 Conv3d)
on one clip."""
from __future__ import annotations

import torch.nn as nn
from diffusers.models.resnet import TemporalConvLayer

from .. import ops

__all__ = ["ClipTemporalConvLayer", "BlockingTemporalConvLayer", "conv_stack"]


def conv_stack(layer) -> list:
    """The ``convN`` sequentials of a TemporalConvLayer, in order."""
    out, i = [], 1
    while isinstance(getattr(layer, f"conv{i}", None), nn.Sequential):
        out.append(getattr(layer, f"conv{i}"))
        i += 1
    return out


class ClipTemporalConvLayer(TemporalConvLayer):
    """A single halo exchange of exactly the stack's receptive field, carrying the first
    GroupNorm's statistics in the same launch; then every conv runs on the extended range
    (``ops.temporal_conv``), zero padding only at the true video ends, GroupNorm statistics
    counting own frames only."""

    def forward(self, hidden_states, num_frames: int = 1):
        x = _frames_first(hidden_states, num_frames)
        eng = self._vinf
        s, e = eng.layout.start(eng.rank), eng.layout.end(eng.rank)
        stack = conv_stack(self)
        halo = sum(seq[-1].kernel_size[0] // 2 for seq in stack)
        (h, lo, hi), stats = eng.start_halo_and_stats(x, halo, stack[0][0]).wait()
        for i, seq in enumerate(stack):
            h = eng.group_norm(h, seq[0], own=slice(s - lo, e - lo), activation="silu",
                               stats=stats if i == 0 else None)
            for m in seq[2:-1]:   # dropout (identity in eval)
                h = m(h)
            conv = seq[-1]
            h, lo, hi = ops.temporal_conv(h, conv.weight, conv.bias, lo=lo, hi=hi,
                                          num_frames=eng.layout.num_frames)
        return _residual(x, h, lo, hi, s, e, hidden_states.shape)


class BlockingTemporalConvLayer(TemporalConvLayer):
    """The published pattern (``comm_mode="blocking"``): a one-frame halo exchange before each
    conv, each a blocking transfer."""

    def forward(self, hidden_states, num_frames: int = 1):
        x = _frames_first(hidden_states, num_frames)
        eng = self._vinf
        s, e = eng.layout.start(eng.rank), eng.layout.end(eng.rank)
        h, lo, hi = x, s, e
        for seq in conv_stack(self):
            h = eng.group_norm(h, seq[0], activation="silu")
            for m in seq[2:-1]:
                h = m(h)
            conv = seq[-1]
            h, lo, hi = eng.frame_halo(h, 2, conv.kernel_size[0] // 2)
            h, lo, hi = ops.temporal_conv(h, conv.weight, conv.bias, lo=lo, hi=hi,
                                          num_frames=eng.layout.num_frames)
            # A halo that reaches a true video end keeps its frame (zero padding there):
            # the next conv's input must be this clip's frames again.
            h, lo, hi = h[:, :, s - lo:e - lo], s, e
        return _residual(x, h, lo, hi, s, e, hidden_states.shape)


def _frames_first(hidden_states, num_frames):
    BF, C, H, W = hidden_states.shape        # (B*F, C, H, W) -> (B, C, F, H, W)
    return hidden_states.reshape(BF // num_frames, num_frames, C, H, W).permute(0, 2, 1, 3, 4)


def _residual(x, h, lo, hi, s, e, shape):
    if not (lo <= s and e <= hi):
        raise RuntimeError(f"temporal conv halo too small: got frames [{lo}, {hi}), "
                           f"clip is [{s}, {e})")
    h = x + h[:, :, s - lo:e - lo]
    return h.permute(0, 2, 1, 3, 4).reshape(shape)
