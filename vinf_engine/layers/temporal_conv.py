"""diffusers' ``TemporalConvLayer`` (a stack of GroupNorm, SiLU, [Dropout], k x 1 x 1 Conv3d)
on one clip."""
from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.models.resnet import TemporalConvLayer

from .. import ops
from ..ops.group_norm import group_norm_apply

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
    counting own frames only.

    Memory-bounded (``_vinf_bytes``, the working memory allowed per chunk; 0: whole), on any
    number of ranks: each conv's statistics come from its whole input first, then its norm
    with SiLU, dropout and conv run over chunks of spatial rows (the conv acts per position)
    into that conv's output, and the residual per chunk straight into the output's
    frame-major layout. The stack then holds its input, one conv's input and its output,
    never the norm's, activation's and conv's outputs side by side, nor the final copy. On
    one process, unchunked, it is the stock layer (nothing to exchange, the same zero
    padding at the video's ends)."""

    _vinf_bytes = 0
    _FACTOR = 5         # temporaries per input byte of a chunk: the norm's apply, the
    #                     dropout's, the conv's input copy and output, the residual

    def _rows_per_chunk(self, x) -> int:
        """Spatial rows of ``x`` (N, C, F, H, W) per chunk (H: whole)."""
        N, C, F, H, W = x.shape
        if not self._vinf_bytes:
            return H
        row = N * C * F * W * x.element_size() * self._FACTOR
        return max(1, int(self._vinf_bytes // max(1, row)))

    def forward(self, hidden_states, num_frames: int = 1):
        eng = self._vinf
        BF, C, H, W = hidden_states.shape
        x = _frames_first(hidden_states, num_frames)
        if eng.world_size == 1 and self._rows_per_chunk(x) >= H:
            return super().forward(hidden_states, num_frames)
        layout = eng._require_step()
        s, e = layout.start(eng.rank), layout.end(eng.rank)
        stack = conv_stack(self)
        halo = sum(seq[-1].kernel_size[0] // 2 for seq in stack)
        (h, lo, hi), stats = eng.start_halo_and_stats(x, halo, stack[0][0]).wait()
        step = self._rows_per_chunk(h)          # the clip and its halo
        rows = [(r0, min(H, r0 + step)) for r0 in range(0, H, step)]
        for i, seq in enumerate(stack):
            norm, conv = seq[0], seq[-1]
            if i:
                stats = eng.start_stats(h[:, :, s - lo:e - lo], norm).wait()
            out = None
            for r0, r1 in rows:
                y = group_norm_apply(h[..., r0:r1, :], *stats, norm.weight, norm.bias,
                                     activation="silu")
                for m in seq[2:-1]:   # dropout (identity in eval)
                    y = m(y)
                y, ylo, yhi = ops.temporal_conv(y, conv.weight, conv.bias, lo=lo, hi=hi,
                                                num_frames=layout.num_frames)
                out = _into_rows(out, y, r0, r1, H)
            h, lo, hi = out, ylo, yhi
        _check_covers(lo, hi, s, e)
        result = torch.empty_like(hidden_states)
        res = result.view(BF // num_frames, num_frames, C, H, W)
        for r0, r1 in rows:
            res[..., r0:r1, :].copy_((x[..., r0:r1, :] + h[:, :, s - lo:e - lo, r0:r1])
                                     .transpose(1, 2))
        return result


def _into_rows(out, y, r0: int, r1: int, H: int):
    """Rows ``[r0, r1)`` of a conv's output (N, C, F, H, W) written into ``out`` (made on the
    first chunk); a chunk of every row is the output itself, with no copy."""
    if r0 == 0 and r1 == H:
        return y
    if out is None:
        out = y.new_empty(y.shape[:3] + (H, y.shape[4]))
    out[..., r0:r1, :].copy_(y)          # autograd-safe
    return out


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


def _check_covers(lo, hi, s, e):
    if not (lo <= s and e <= hi):
        raise RuntimeError(f"temporal conv halo too small: got frames [{lo}, {hi}), "
                           f"clip is [{s}, {e})")


def _residual(x, h, lo, hi, s, e, shape):
    _check_covers(lo, hi, s, e)
    h = x + h[:, :, s - lo:e - lo]
    return h.permute(0, 2, 1, 3, 4).reshape(shape)
