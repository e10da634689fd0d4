"""The ``triton`` backend of each op, registered with ``vinf_engine.ops.dispatch``.

    dual_scope_attention   temporal_attention.py (tokens_per_frame == 1, one-pass tiles of
                           whole sequences) or dit_attention.py (flash tiles over the frame
                           window and the global tokens; any tokens_per_frame)
    attention_with_lse     dit_attention.py with the local scope off: the global scope alone
    group_norm_partials    group_norm.py: per-channel tile statistics, fp64 merge per group
    group_norm_apply       group_norm.py: normalize + affine + optional SiLU in one pass

Each ``supports`` function returns why the kernel cannot take the arguments (naming the
argument), or None; the dispatcher then uses another backend or, when ``VINF_BACKEND=triton``
forces this one, raises that reason as a ValueError.
"""
from __future__ import annotations

import torch

from vinf_engine.ops import dispatch

from . import dit_attention as _dit
from . import group_norm as _gn
from . import temporal_attention as _temporal
from ._runtime import why_not_tensor

__all__ = ["dual_scope_attention", "attention_with_lse", "group_norm_partials", "group_norm_apply"]


def _attention_why_not(q, k, v, k_global=None, v_global=None, **kwargs) -> str | None:
    for name, t in (("q", q), ("k", k), ("v", v), ("k_global", k_global),
                    ("v_global", v_global)):
        if t is not None:
            why = why_not_tensor(name, t)
            if why is not None:
                return why
    why = _dit.fits(q.shape[-1])
    return None if why is None else f"q: {why}"


def dual_scope_attention(q, k, v, k_global=None, v_global=None, *, window, pad, valid_left,
                         valid_right, tokens_per_frame=1, local_bias=0.0, global_bias=0.0,
                         scale=None, return_lse=False):
    """``vinf.ops.dual_scope_attention`` on the Triton kernels (arguments already checked):
    q (B, F*T, H, D); k, v (B, (F + 2*pad)*T, H, D); k_global, v_global (B, Ng, H, D)."""
    B, FT, H, D = q.shape
    T = tokens_per_frame
    scale = D ** -0.5 if scale is None else float(scale)
    if q.numel() == 0:
        out = torch.empty((B, FT, H, D), dtype=q.dtype, device=q.device)
        lse = torch.empty((B, H, FT), dtype=torch.float32, device=q.device)
        return (out, lse) if return_lse else out
    kw = dict(window=window, pad=pad, valid_left=valid_left, valid_right=valid_right,
              local_bias=float(local_bias), global_bias=float(global_bias), scale=scale,
              return_lse=return_lse)
    if T == 1 and _temporal.fits(q, k, v, k_global, v_global, window) is None:
        out, lse = _temporal.temporal_attention(q, k, v, k_global, v_global, **kw)
    else:
        out, lse = _dit.dit_attention(q, k, v, k_global, v_global, tokens_per_frame=T, **kw)
    return (out, lse) if return_lse else out


def _global_why_not(q, k, v, scale, bias) -> str | None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        why = why_not_tensor(name, t)
        if why is not None:
            return why
    why = _dit.fits(q.shape[-1])
    return None if why is None else f"q: {why}"


def attention_with_lse(q, k, v, scale, bias):
    """``vinf.ops.attention_with_lse`` on the DiT kernel, local scope off: q (B, L, H, D);
    k, v (B, N, H, D). Returns (out, lse (B, H, L) fp32)."""
    if q.numel() == 0:
        B, L, H, D = q.shape
        return q.new_empty((B, L, H, D)), q.new_empty((B, H, L), dtype=torch.float32)
    return _dit.global_attention(q, k, v, scale=float(scale), bias=float(bias))


def _partials_why_not(x, num_groups) -> str | None:
    why = why_not_tensor("x", x)
    if why is None and _gn.flat_view(x) is None:
        why = (f"x has strides {tuple(x.stride())}: its spatial dims must share one stride "
               "(contiguous or channels-last)")
    return why


def group_norm_partials(x, num_groups):
    """``vinf.ops.group_norm_partials`` on the Triton kernels: ((N, G, 2) fp64, count)."""
    N, G = x.shape[0], num_groups
    return _gn.group_norm_partials(x, G), x.numel() // max(1, N * G)


def _apply_why_not(x, mean, rstd, weight=None, bias=None, activation=None) -> str | None:
    why = _partials_why_not(x, mean.shape[1])
    for name, t in (("weight", weight), ("bias", bias)):
        if why is None and t is not None:
            why = why_not_tensor(name, t)
    for name, t in (("mean", mean), ("rstd", rstd)):
        if why is None and (t.device != x.device or t.shape != (x.shape[0], mean.shape[1])):
            why = (f"{name} must be ({x.shape[0]}, G) on {x.device}, got "
                   f"{tuple(t.shape)} on {t.device}")
    return why


group_norm_apply = _gn.group_norm_apply

dispatch.register("dual_scope_attention", "triton", dual_scope_attention, _attention_why_not)
dispatch.register("attention_with_lse", "triton", attention_with_lse, _global_why_not)
dispatch.register("group_norm_partials", "triton", group_norm_partials, _partials_why_not)
dispatch.register("group_norm_apply", "triton", group_norm_apply, _apply_why_not)
