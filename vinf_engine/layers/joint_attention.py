"""Joint text attention over one rank's clip: text and video tokens in ONE self-attention, for
any DiT family that joins them (CogVideoX, HunyuanVideo).

The family's processor projects its tokens and hands this module:

    q, k, v      (B, Fc*T, H, D)   this clip's video tokens, frame-major (T tokens per frame),
                                   rotated at their global positions where position matters
    pending      Pending -> AttentionContext: the attention input of the halo and global
                 frames (``ClipParallel.start_attention_context``)
    project_kv   (x (B, n, ...), frames) -> (k, v), each (B, n*T, H, D), as in
                 ``layers.attention``
    text         JointText: the text tokens' q, k, v (B, Lt, H, D), the same on every rank,
                 and how many of each row's text tokens are keys (the rest is padding)

``joint_attention`` gives both streams' outputs:

- a video query attends its local window and the global frames (the dual scope of
  ``layers.attention``, merged in parts by log-sum-exp exactly as ``clip_attention`` does)
  and every text key, the text part joined by log-sum-exp;
- a text query attends every video token of the whole video and every text key: each rank
  attends its own clip's video keys (each video key counted once over the ranks), the
  partial outputs and their log-sum-exps go to every rank in ONE exchange of a text-sized
  tensor per attention, and every rank merges them with the text-to-text part in rank order.
  The text stream is therefore bitwise the same on every rank, and equal to one process up
  to the merge's rounding; its bytes per step do not depend on the video's length.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..comm import Pending
from ..layout import ClipLayout
from .attention import _check_mapped, by_phase, global_attention

__all__ = ["JointText", "joint_attention", "ClampedGlobalScope", "merged"]


@dataclass(frozen=True)
class JointText:
    """The text tokens of one joint attention (the same on every rank).

    Parameters
    ----------
    q, k, v : (B, Lt, H, D) tensors
    valid : tuple of B ints, or None
        Per batch row, how many leading text tokens are keys (the rest is padding that no
        query may see: HunyuanVideo's prompt mask); None: every text token is a key.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    valid: tuple | None = None


def joint_attention(engine, pending: Pending, q, k, v, project_kv, text: JointText, *,
                    scale: float, tokens_per_frame: int, global_scope=None) -> tuple:
    """Both streams' outputs of a joint attention over this rank's clip.

    Parameters
    ----------
    engine : ClipParallel, in a step
    pending, q, k, v, project_kv : as ``layers.attention.clip_attention``
    text : JointText
    scale : float
        The logits' scale.
    tokens_per_frame : int
    global_scope : callable or None
        ``global_scope(ctx) -> (out, lse)`` for every video query ((B, Fc*T, H, D), (B, H,
        Fc*T)), for global keys whose positions depend on the query (clamped RoPE offsets:
        ``ClampedGlobalScope``); None: the global frames are projected with ``project_kv``.

    Returns
    -------
    video (B, Fc*T, H, D) in q's dtype, text (B, Lt, H, D) in text.q's dtype.
    """
    parts = _start_text_partials(engine, text.q, k, v, scale)
    video = _video_scopes(engine, pending, q, k, v, project_kv, scale, tokens_per_frame,
                          global_scope)
    video = merged(video, _to_text(engine, q, text, scale, biased=True))
    return video[0].to(q.dtype), _text_out(engine, text, parts.wait(), scale).to(text.q.dtype)


def merged(a: tuple, b: tuple) -> tuple:
    """Two partial attentions over disjoint keys, ``(out, lse)`` each, joined: ``(out, lse)``."""
    return ops.merge_attention(a[0], a[1], b[0], b[1]), torch.logaddexp(a[1], b[1])


def _video_scopes(engine, pending, q, k, v, project_kv, scale, T, global_scope) -> tuple:
    """The dual scope of the video queries, with its log-sum-exp: ``clip_attention``'s parts
    (the interior attended while the context is in flight), each keeping its lse."""
    Fc = q.shape[1] // T
    w = engine.attention_plan().window
    interior = engine.world_size > 1 and Fc > 2 * w
    if interior:
        mid = by_phase(engine, ops.window_attention, q[:, w * T:(Fc - w) * T], k, v, window=w,
                       left=w, right=w, tokens_per_frame=T, scale=scale, return_lse=True)
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
                        return_lse=True)

    if interior:
        if kg is not None:
            mid = merged(mid, global_attention(engine, q[:, w * T:(Fc - w) * T], kg, vg, scale))
        first, last = attend(0, w), attend(Fc - w, Fc)
        out = (torch.cat([first[0], mid[0], last[0]], dim=1),
               torch.cat([first[1], mid[1], last[1]], dim=2))
    else:
        out = attend(0, Fc)
    return merged(out, global_scope(ctx)) if separate else out


def _runs(valid, r0: int, r1: int, n: int) -> list:
    """``[(a, b, keys)]``: rows ``[r0, r1)`` in runs sharing their number of text keys."""
    if valid is None:
        return [(r0, r1, n)]
    runs = []
    for r in range(r0, r1):
        if runs and runs[-1][2] == valid[r]:
            runs[-1] = (runs[-1][0], r + 1, valid[r])
        else:
            runs.append((r, r + 1, valid[r]))
    return runs


def _to_text(engine, q, text: JointText, scale: float, biased: bool) -> tuple:
    """``(out, lse)`` of queries ``q`` (B, L, H, D) over the text keys. ``biased``: with the
    step's phase bias of the favoured scope (video queries), else none (text queries)."""
    B, L, H, D = q.shape
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = q.new_zeros(B, L, H, D, dtype=cdt)
    lse = q.new_full((B, H, L), float("-inf"), dtype=torch.float32)
    runs = engine.bias_runs(B) if biased else [(0, B, 0.0, 0.0)]
    for r0, r1, lb, gb in runs:
        # The phase bias lifts the favoured scope (local or global) over the other; text keys
        # go with the favoured one, so that the bias suppresses the other scope and leaves
        # the text's weight beside the favoured scope as the model trained it.
        bias = (torch.maximum(lb, gb) if isinstance(lb, torch.Tensor) else max(lb, gb))
        for a, b, n in _runs(text.valid, r0, r1, text.k.shape[1]):
            if n == 0:                  # no text keys in these rows: an empty part
                continue
            rb = bias[a - r0:b - r0] if isinstance(bias, torch.Tensor) else bias
            o, l_ = ops.attention_with_lse(q[a:b], text.k[a:b, :n], text.v[a:b, :n],
                                           scale=scale, bias=rb)
            out[a:b], lse[a:b] = o.to(cdt), l_
    return out, lse


def _start_text_partials(engine, q_t, k, v, scale: float) -> Pending:
    """Start the exchange of this rank's text partial (text queries over this clip's video
    keys): ``wait()`` gives every rank's, (R, B, Lt, H, D + 1) in fp32 (fp64 for fp64 input),
    output then lse in the last dim, in rank order, the same bits on every rank."""
    o, lse = ops.attention_with_lse(q_t, k, v, scale=scale)
    cdt = torch.float64 if o.dtype == torch.float64 else torch.float32
    packed = torch.cat([o.to(cdt), lse.transpose(1, 2).unsqueeze(-1).to(cdt)], dim=-1)[None]
    R = engine.world_size
    if R == 1:
        return Pending.ready(packed)
    layout = ClipLayout.from_sizes([1] * R)
    wants = tuple(tuple(range(R)) for _ in range(R))
    what = "joint attention text partials"
    if engine.mode == "stale":
        # Always live: a stale partial from another rank next to this rank's fresh one would
        # give every rank a different text stream.
        return engine.comm.post_frames(packed.contiguous(), 0, layout, wants, what)
    return engine.scheduler.frames(packed.contiguous(), 0, layout, wants, what)


def _text_out(engine, text: JointText, parts: torch.Tensor, scale: float) -> torch.Tensor:
    """The text queries' output: the text-to-text part merged with every rank's video part
    in rank order (every rank the same operations on the same bits)."""
    D = text.q.shape[-1]
    acc = _to_text(engine, text.q, text, scale, biased=False)
    for r in range(parts.shape[0]):
        acc = merged(acc, (parts[r, ..., :D], parts[r, ..., D].transpose(1, 2).float()))
    return acc[0]


class ClampedGlobalScope:
    """The global scope with clamped relative temporal offsets, for RoPE families: query
    frame ``a`` sees global frame ``g``'s keys rotated at ``a - clamp(a - g, -M, M)``, i.e. at
    distance ``min(|a - g|, M)``. Rotation is relative, so the queries keep their own rotation
    and the keys are rotated once per query frame (Ng*T keys per query frame, T times fewer
    operations than its logits). Called as ``global_scope(ctx) -> (out, lse)``.

    Parameters
    ----------
    engine : ClipParallel
    q : (B, m*T, H, D) the queries of global frames ``frames``, rotated
    frames : range of the queries' global frames
    T : tokens per frame
    M : the largest offset a global logit may see
    keys : ``keys(x) -> (k, v)``: un-rotated keys and values, (B, n*T, H, D) each, of
        attention input ``x`` (B, n, T, C)
    rotate : ``rotate(k, positions) -> k``: ``k`` (B, n*T, H, D) rotated with its frame ``i``
        at temporal position ``positions[i]`` (a tuple of n floats)
    scale : the logits' scale
    """

    # Logits in one chunk of query frames: bounds its rotated keys to ~256 MiB (fp32).
    _CHUNK_ELEMS = 1 << 26

    def __init__(self, engine, q, frames: range, T: int, M: int, keys, rotate, scale: float):
        self.engine, self.q, self.frames, self.T, self.M = engine, q, frames, T, M
        self.keys, self.rotate, self.scale = keys, rotate, scale

    def __call__(self, ctx) -> tuple:
        q, T, M = self.q, self.T, self.M
        k, v = self.keys(ctx.glob)                       # (B, Ng*T, H, D), un-rotated
        B, NgT, H, D = k.shape
        n = max(1, min(len(self.frames), self._CHUNK_ELEMS // max(1, B * NgT * H * D)))
        outs, lses = [], []
        for i in range(0, len(self.frames), n):
            chunk = self.frames[i:i + n]
            m = len(chunk)
            pos = tuple(float(a - max(-M, min(M, a - g))) for a in chunk for g in ctx.glob_frames)
            kr = self.rotate(k.repeat(1, m, 1, 1), pos)  # (B, m*Ng*T, H, D)
            vr = v.unsqueeze(1).expand(B, m, NgT, H, D).reshape(B * m, NgT, H, D)
            qc = q[:, i * T:(i + m) * T].reshape(B * m, T, H, D)
            o, lse = global_attention(self.engine, qc, kr.reshape(B * m, NgT, H, D), vr,
                                      self.scale)
            outs.append(o.reshape(B, m * T, H, D))
            lses.append(lse.reshape(B, m, H, T).permute(0, 2, 1, 3).reshape(B, H, m * T))
        return torch.cat(outs, dim=1), torch.cat(lses, dim=2)
