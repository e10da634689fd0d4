"""Partial softmax attention over disjoint key sets, and their exact merge.

softmax over K1 u K2 of (q.k) applied to V equals the two partial results weighted by
exp(lse_i - lse), lse = logaddexp(lse_1, lse_2). This lets the engine attend the keys it has
while the rest are still in flight, then join them without recomputing.
"""
from __future__ import annotations

import torch

from ._checks import check_real, check_tensor, compute_dtype

__all__ = ["attention_with_lse", "merge_attention"]


def attention_with_lse(q, k, v, *, scale=None, bias=0.0):
    """Dense attention of every query to every key, with the rows' log-sum-exp.

    Parameters
    ----------
    q : (B, L, H, D) tensor
    k, v : (B, N, H, D) tensors, N >= 1 (meant for a few keys: the global scope)
    scale : float or None (``D ** -0.5``)
    bias : float added to every logit

    Returns
    -------
    out (B, L, H, D) in q's dtype, lse (B, H, L) fp32.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, 4)
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:] or k.shape[1] < 1:
        raise ValueError(f"k and v must be (B, N>=1, H, D) matching q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else check_real("scale", scale)
    cdt = compute_dtype(q.dtype)
    s = torch.einsum("blhd,bnhd->bhln", q.to(cdt), k.to(cdt)) * scale + check_real("bias", bias)
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum("bhln,bnhd->blhd", torch.softmax(s, dim=-1), v.to(cdt))
    return out.to(q.dtype), lse.float()


def merge_attention(o1, lse1, o2, lse2):
    """Merge two partial attention results over disjoint key sets.

    ``o_i`` (B, L, H, D), ``lse_i`` (B, H, L). Returns (B, L, H, D) in ``o1``'s dtype.
    """
    if o1.shape != o2.shape or lse1.shape != lse2.shape or lse1.shape != (o1.shape[0], o1.shape[2], o1.shape[1]):
        raise ValueError(f"cannot merge outputs {tuple(o1.shape)}, {tuple(o2.shape)} with "
                         f"lse {tuple(lse1.shape)}, {tuple(lse2.shape)}")
    cdt = compute_dtype(o1.dtype)
    w1 = torch.sigmoid((lse1 - lse2).to(cdt)).transpose(1, 2).unsqueeze(-1)   # (B, L, H, 1)
    return (w1 * o1.to(cdt) + (1 - w1) * o2.to(cdt)).to(o1.dtype)
