"""GroupNorm over ``(B, C, F, H, W)`` whose statistics span every rank's frames."""
from __future__ import annotations

import torch.nn as nn

from ..ops.group_norm import group_norm_apply

__all__ = ["ClipGroupNorm"]


class ClipGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` with whole-video statistics (``_vinf``: the engine).

    As a temporal transformer's input norm it may also start the transformer's first attention
    context (``_vinf_slot``, a ``ContextSlot`` holding ``(proj_in, norm1)``; set at patch time
    only where it pays: several ranks and an overlapping comm mode): the halo and global frames
    of the *pre-norm* input go out as soon as it exists, right after the statistics'
    all-reduce, and the receiver maps them to the attention's input itself (GroupNorm with the
    same statistics, ``proj_in``, the block's ``norm1``: all per frame). The context is then in
    flight during the statistics' round, the whole norm, ``proj_in``, ``norm1`` and the
    attention's own projections, instead of from the attention's start; and where the input
    is narrower than the attention (``transformer_in``: 320 channels, 512 in attention) it
    moves fewer bytes.
    """

    def start(self, x):
        """The whole-video statistics of ``x`` (N, C, F, H, W), ``(mean, rstd)``, with the
        slot's context (if any) started on the way: for a caller that applies the norm
        itself, in chunks."""
        eng, slot = self._vinf, self._vinf_slot
        if slot is None:
            return eng.start_stats(x, self).wait()
        proj_in, norm1 = slot.transform
        stats_pending = eng.start_stats(x, self)   # first: on NCCL it runs before the context
        stats = []

        def to_rows(g):                            # (B, C, n, H, W) -> (B*H*W, n, C)
            y = group_norm_apply(g, *stats[0], self.weight, self.bias)
            B, C, n, H, W = y.shape
            return y.permute(0, 3, 4, 2, 1).reshape(B * H * W, n, C)

        def to_attention_input(rows):              # per row chunk: (r, n, C) -> (r, n, inner)
            return norm1(proj_in(rows))
        slot.put(eng.start_attention_context(x, dim=2, transform=to_rows,
                                             row_map=to_attention_input))
        stats.append(stats_pending.wait())
        return stats[0]

    def forward(self, x):
        return group_norm_apply(x, *self.start(x), self.weight, self.bias)
