"""Partial softmax attention over disjoint key sets, and their exact merge.

softmax over K1 u K2 of (q.k) applied to V equals the two partial results weighted by
exp(lse_i - lse), lse = logaddexp(lse_1, lse_2). This lets the engine attend the keys it has
while the rest are still in flight, then join them without recomputing.
"""
from __future__ import annotations

import torch

from . import dispatch
from ._checks import check_bias, check_real, check_tensor, compute_dtype
from .softmax import softmax_attention

__all__ = ["attention_with_lse", "attention_with_lse_reference", "merge_attention"]


# Elements of one chunk of fp32 logits in the reference: bounds its memory to ~256 MiB (the
# global scope of a DiT has tens of thousands of queries and keys).
_REF_CHUNK_ELEMS = 1 << 26


def attention_with_lse_reference(q, k, v, scale, bias):
    """Plain-PyTorch dense attention with the rows' log-sum-exp, in query chunks of bounded
    memory: the CPU path and the kernels' oracle. Arguments as ``attention_with_lse``."""
    B, L, H, D = q.shape
    N = k.shape[1]
    cdt = compute_dtype(q.dtype)
    kc, vc = k.to(cdt), v.to(cdt)
    out = torch.empty_like(q)
    lse = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
    chunk = max(1, min(L, _REF_CHUNK_ELEMS // max(1, B * H * N)))
    kt, vt = kc.transpose(1, 2), vc.transpose(1, 2)                   # (B, H, N, D)
    for a in range(0, L, chunk):
        b = min(L, a + chunk)
        # A bias on every logit leaves the softmax as it is and shifts the lse by itself.
        o, row_lse = softmax_attention(q[:, a:b].to(cdt).transpose(1, 2), kt, vt, None, scale, True)
        lse[:, :, a:b] = (row_lse + bias).float()
        out[:, a:b] = o.transpose(1, 2).to(q.dtype)
    return out, lse


@torch.library.custom_op("vinf::attention_with_lse", mutates_args=())
def _attention_with_lse_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                           bias: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The op as torch.compile and CUDA graphs see it; arguments checked by the public
    function, backend chosen by ``dispatch``."""
    key = (q.dtype, q.shape[0], q.shape[1], q.shape[2], q.shape[3], k.shape[1])
    out, lse = dispatch.call("attention_with_lse", key, q, k, v, scale, bias)
    return out.contiguous(), lse


@_attention_with_lse_op.register_fake
def _(q, k, v, scale, bias):
    B, L, H, D = q.shape
    return q.new_empty((B, L, H, D)), q.new_empty((B, H, L), dtype=torch.float32)


dispatch.reference_autograd(_attention_with_lse_op, attention_with_lse_reference)
dispatch.register("attention_with_lse", "reference", attention_with_lse_reference)


def attention_with_lse(q, k, v, *, scale=None, bias=0.0):
    """Dense attention of every query to every key, with the rows' log-sum-exp.

    Runs as ``torch.ops.vinf.attention_with_lse`` on the backend ``dispatch`` picks: the
    chunked reference on CPU, the DiT Triton kernel with its local scope switched off on GPUs.

    Parameters
    ----------
    q : (B, L, H, D) tensor
    k, v : (B, N, H, D) tensors, N >= 1 (the global scope: N may be tens of thousands of
        DiT tokens)
    scale : float or None (``D ** -0.5``)
    bias : float added to every logit, or a tensor: one value, or one per batch row ``(B,)``
        (graph data, for torch.compile / CUDA graphs; shifts the lse only)

    Returns
    -------
    out (B, L, H, D) in q's dtype, lse (B, H, L) fp32.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, 4)
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:] or k.shape[1] < 1:
        raise ValueError(f"k and v must be (B, N>=1, H, D) matching q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device}, q is {q.dtype} on {q.device}: "
                             "they must match")
    scale = q.shape[-1] ** -0.5 if scale is None else check_real("scale", scale)
    bias = check_bias("bias", bias, q.shape[0], q.device)
    if isinstance(bias, torch.Tensor):
        # One bias on every logit of a row leaves its softmax as it is: it shifts the lse.
        out, lse = _attention_with_lse_op(q, k, v, scale, 0.0)
        return out, lse + bias
    return _attention_with_lse_op(q, k, v, scale, bias)


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
