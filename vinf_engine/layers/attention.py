"""Dual-scope attention over one rank's clip, for any model family and any tokens per frame.

A family's processor projects its own frames and hands this module the queries, keys and
values, the context exchange already in flight, and how to project the frames that arrive:

    q, k, v      (B, Fc*T, H, D)    this clip's own tokens, frame-major (T tokens per frame)
    pending      Pending -> AttentionContext: the attention input of the halo and global
                 frames (frames along dim 1), with their global frame indices
    project_kv   (x (B, n, ...), frames) -> (k, v), each (B, n*T, H, D): the family's own
                 projection of n frames' attention input, at the frames' global positions
                 where position matters (RoPE)

``clip_attention`` attends the query frames whose window needs no halo (``w <= i < Fc - w``)
to the clip's own keys while the context is in flight; when it arrives, the edge frames attend
locally and globally in one softmax, and the interior frames' global scope joins their local
result by a log-sum-exp merge: the same joint softmax as the op's, in parts.
"""
from __future__ import annotations

import torch

from .. import ops
from ..comm import Pending
from ..layout import halo_wants

__all__ = ["clip_attention", "clip_attention_in_chunks", "blocking_clip_attention", "by_phase",
           "global_attention", "context_rows", "ContextSlot"]


def clip_attention(engine, pending: Pending, q, k, v, project_kv, *, scale: float,
                   tokens_per_frame: int = 1, global_scope=None) -> torch.Tensor:
    """This clip's dual-scope attention output, (B, Fc*T, H, D).

    ``global_scope(ctx)``, when given, scores the global scope itself and returns ``(out,
    lse)`` for every query token ((B, Fc*T, H, D), (B, H, Fc*T)): for families whose global
    logits need per-query positions (``models/wan.py``, clamped RoPE offsets). The op then
    sees local keys only and the global part joins by log-sum-exp. Otherwise the global
    frames are projected with ``project_kv`` and attended in the same softmax.
    """
    T = tokens_per_frame
    Fc = q.shape[1] // T
    w = engine.attention_plan().window
    interior = engine.world_size > 1 and Fc > 2 * w
    if interior:                        # while the context is in flight: no halo needed
        o_mid, lse_mid = by_phase(
            engine, ops.window_attention, q[:, w * T:(Fc - w) * T], k, v, window=w, left=w,
            right=w, tokens_per_frame=T, scale=scale, return_lse=True)
    ctx = pending.wait()
    _check_mapped(ctx)
    nl, nr = ctx.valid_left, ctx.valid_right
    kl, vl = project_kv(ctx.left, ctx.left_frames) if nl else (k[:, :0], v[:, :0])
    kr, vr = project_kv(ctx.right, ctx.right_frames) if nr else (k[:, :0], v[:, :0])
    separate = global_scope is not None and ctx.glob is not None
    kg = vg = None
    if ctx.glob is not None and not separate:
        kg, vg = project_kv(ctx.glob, ctx.glob_frames)
    keys = (torch.cat([kl, k, kr], dim=1), torch.cat([vl, v, vr], dim=1)) if nl or nr else (k, v)

    def attend(a, b):                   # query frames [a, b) against their keys (+ globals)
        lo, hi = max(-nl, a - w), min(Fc + nr, b + w)
        return by_phase(engine, ops.window_attention, q[:, a * T:b * T],
                        keys[0][:, (lo + nl) * T:(hi + nl) * T],
                        keys[1][:, (lo + nl) * T:(hi + nl) * T], kg, vg, window=w,
                        left=a - lo, right=hi - b, tokens_per_frame=T, scale=scale,
                        return_lse=separate)

    if not interior:
        out = attend(0, Fc)
        return ops.merge_attention(*out, *global_scope(ctx)) if separate else out
    first, last = attend(0, w), attend(Fc - w, Fc)
    if separate:
        o = torch.cat([first[0], o_mid, last[0]], dim=1)
        lse = torch.cat([first[1], lse_mid, last[1]], dim=2)
        return ops.merge_attention(o, lse, *global_scope(ctx))
    if kg is not None:
        o_glob, lse_glob = global_attention(engine, q[:, w * T:(Fc - w) * T], kg, vg, scale)
        o_mid = ops.merge_attention(o_mid, lse_mid, o_glob, lse_glob)
    return torch.cat([first, o_mid, last], dim=1)


def clip_attention_in_chunks(engine, pending: Pending, q_of, k, v, project_kv, emit, *,
                             scale: float, tokens_per_frame: int, frames_per_chunk: int,
                             global_scope_of=None):
    """``clip_attention`` with its queries in chunks of ``frames_per_chunk`` frames, so that
    no query-sized tensor is ever held for the whole clip: ``q_of(a, b)`` projects the
    queries of frames ``[a, b)`` ((B, (b-a)*T, H, D)), ``emit(a, b, out)`` takes their
    output; ``global_scope_of(q, a, b)`` gives what ``clip_attention``'s ``global_scope``
    would for those queries, or None. The keys and values are the whole clip's (every
    chunk's window reads some of them) and the halo's, projected once; each chunk takes its
    own key frames (a view where they lie in one tensor, one copy where they span the halo;
    the copy of every key frame, for a full window, made once). On several ranks every chunk
    waits for the context: it is in flight while the caller projects the clip's keys and
    values, not during the interior's attention."""
    T = tokens_per_frame
    Fc = k.shape[1] // T
    w = engine.attention_plan().window
    ctx = pending.wait()
    _check_mapped(ctx)
    nl, nr = ctx.valid_left, ctx.valid_right
    kl, vl = project_kv(ctx.left, ctx.left_frames) if nl else (k[:, :0], v[:, :0])
    kr, vr = project_kv(ctx.right, ctx.right_frames) if nr else (k[:, :0], v[:, :0])
    copies = {}

    def frames(lo, hi):
        # K and V of key frames [lo, hi) of [-nl, Fc + nr) (clip-local)
        parts = [(kl, vl, lo + nl, min(hi, 0) + nl), (k, v, max(lo, 0), min(hi, Fc)),
                 (kr, vr, max(lo, Fc) - Fc, hi - Fc)]
        got = [(kk[:, i * T:j * T], vv[:, i * T:j * T]) for kk, vv, i, j in parts if j > i]
        if len(got) == 1:
            return got[0]
        if (lo, hi) not in copies:
            copies.clear()
            copies[lo, hi] = (torch.cat([g[0] for g in got], dim=1),
                              torch.cat([g[1] for g in got], dim=1))
        return copies[lo, hi]
    kg = vg = None
    for a in range(0, Fc, frames_per_chunk):
        b = min(Fc, a + frames_per_chunk)
        q = q_of(a, b)
        scope = global_scope_of(q, a, b) if global_scope_of is not None else None
        separate = scope is not None and ctx.glob is not None
        if ctx.glob is not None and not separate and kg is None:
            kg, vg = project_kv(ctx.glob, ctx.glob_frames)
        lo, hi = max(-nl, a - w), min(Fc + nr, b + w)       # the key frames that exist
        out = by_phase(engine, ops.window_attention, q, *frames(lo, hi),
                       None if separate else kg, None if separate else vg, window=w,
                       left=a - lo, right=hi - b, tokens_per_frame=T, scale=scale,
                       return_lse=separate)
        emit(a, b, ops.merge_attention(*out, *scope(ctx)) if separate else out)


def _check_mapped(ctx):
    if ctx.row_map is not None:
        raise RuntimeError("an attention context with a per-row map was attended unmapped: "
                           "take it through context_rows")


def context_rows(pending: Pending, r0: int, r1: int) -> Pending:
    """``pending``'s context for attention rows ``[r0, r1)`` only (``AttentionContext.rows``):
    waits for the whole exchange, maps and hands over just those rows. An attention run in
    chunks of independent rows (a UNet's spatial positions) takes one exchange for all."""
    return Pending.ready_with(lambda: pending.wait().rows(r0, r1))


def blocking_clip_attention(engine, q, k, v, *, scale: float,
                            tokens_per_frame: int = 1) -> torch.Tensor:
    """The published prototype's data movement, kept as the baseline (``comm_mode="blocking"``):
    K and V projected locally, then each fetched from every neighbour separately (one blocking
    transfer per tensor and peer, a device sync after each), and the global frames' K and V
    all-gathered. Positions must not matter to the keys' projection (no per-query RoPE)."""
    layout = engine.layout
    T = tokens_per_frame
    Fc = q.shape[1] // T
    w = engine.attention_plan().window
    wants = halo_wants(layout, w)
    start = layout.start(engine.rank)
    nl = start - max(0, start - w)
    by_frame = lambda t: t.unflatten(1, (Fc, T))           # noqa: E731
    if engine.world_size > 1 and any(wants):
        kh = engine.comm.blocking_frames(by_frame(k), 1, layout, wants, "halo exchange (K)")
        vh = engine.comm.blocking_frames(by_frame(v), 1, layout, wants, "halo exchange (V)")
        kh, vh = kh.flatten(1, 2), vh.flatten(1, 2)
    else:
        kh, vh = k[:, :0], v[:, :0]
    nr = kh.shape[1] // T - nl
    kg = engine.blocking_global_frames(by_frame(k))
    vg = engine.blocking_global_frames(by_frame(v))
    if kg is not None:
        kg, vg = kg.flatten(1, 2), vg.flatten(1, 2)
    k_all = torch.cat([kh[:, :nl * T], k, kh[:, nl * T:]], dim=1)
    v_all = torch.cat([vh[:, :nl * T], v, vh[:, nl * T:]], dim=1)
    return by_phase(engine, ops.window_attention, q, k_all, v_all, kg, vg, window=w, left=nl,
                    right=nr, tokens_per_frame=T, scale=scale)


def by_phase(engine, op, q, *tensors, global_bias=0.0, **kw):
    """``op(q, *tensors, local_bias=..., global_bias=..., **kw)`` with the step's biases: one
    call when every sample is in the same phase (always, with one timestep per call), else
    one per run of samples sharing a phase, rows split along dim 0 (batch-major) and joined.
    ``global_bias=None``: the op takes no global bias (no global keys)."""
    outs = []
    for a, b, lb, gb in engine.bias_runs(q.shape[0]):
        part = [None if t is None else t[a:b] for t in tensors]
        biases = dict(local_bias=lb) if global_bias is None else dict(local_bias=lb, global_bias=gb)
        outs.append(op(q[a:b], *part, **biases, **kw))
    if len(outs) == 1:
        return outs[0]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(x, dim=0) for x in zip(*outs))
    return torch.cat(outs, dim=0)


def global_attention(engine, q, k, v, scale):
    """``ops.attention_with_lse`` of the global scope with the step's global bias: (out, lse)."""
    return by_phase(engine, lambda q_, k_, v_, local_bias, global_bias:
                    ops.attention_with_lse(q_, k_, v_, scale=scale, bias=global_bias), q, k, v)


class ContextSlot:
    """An attention context started early by one patched module and taken by another: the
    state those two share, held by both (never an attribute on a library's module).

    ``transform`` is what the starting module passes along with it: the per-frame map from
    what it sent to the attention's input (applied by the receiver to the frames that
    arrive)."""

    def __init__(self, *transform):
        self.transform = transform
        self._pending: Pending | None = None

    def put(self, pending: Pending):
        self._pending = pending

    def take(self) -> Pending | None:
        pending, self._pending = self._pending, None
        return pending
