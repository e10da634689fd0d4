"""xformers' ``memory_efficient_attention`` as an optional ``dual_scope_attention`` backend.

Registered only where xformers imports and its CUDA operator actually runs: probed once with
a tiny call (xformers 0.0.35 from the package index had no working CUDA operator against the
H200 image's torch 2.11 / CUDA 13). Otherwise ``STATUS`` says, in one line, why it is not.
It takes temporal attention (one token per frame) without the log-sum-exp: the band and the
valid halo become an additive bias over the clip's keys plus the global ones, the reference's
mask exactly. Never a dependency: a peer, and a backend after the engine's own kernels.
"""
from __future__ import annotations

import torch

from . import dispatch

__all__ = ["STATUS", "dual_scope_attention"]

STATUS = "not probed"


def _probe() -> str | None:
    """Why xformers cannot serve here, or None."""
    try:
        import xformers.ops as xops
    except Exception as e:  # noqa: BLE001 - any import failure means: not here
        return f"xformers does not import ({type(e).__name__}: {str(e)[:120]})"
    if not torch.cuda.is_available():
        return "no CUDA device for xformers' operators"
    try:
        q = torch.randn(1, 4, 1, 64, device="cuda", dtype=torch.float16)
        bias = torch.zeros(1, 1, 4, 4, device="cuda", dtype=torch.float16)
        xops.memory_efficient_attention(q, q, q, attn_bias=bias)
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001
        return f"xformers' memory_efficient_attention does not run here ({type(e).__name__}: {str(e)[:160]})"
    return None


def supports(q, k, v, k_global=None, v_global=None, *, tokens_per_frame=1, return_lse=False,
             **kw) -> str | None:
    if tokens_per_frame != 1:
        return "xformers backend: tokens_per_frame 1 only (a DiT's dense bias would not fit)"
    if return_lse:
        return "xformers backend: no log-sum-exp output"
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        return "xformers backend: fp16/bf16 CUDA tensors only"
    return None


def dual_scope_attention(q, k, v, k_global=None, v_global=None, *, window, pad, valid_left,
                         valid_right, tokens_per_frame=1, local_bias=0.0, global_bias=0.0,
                         scale=None, return_lse=False):
    """q (B, F, H, D); k, v (B, F + 2*pad, H, D); k_global, v_global (B, Ng, H, D)."""
    import xformers.ops as xops
    B, F, H, D = q.shape
    lo, hi = pad - valid_left, pad + F + valid_right
    keys, vals = k[:, lo:hi], v[:, lo:hi]
    qf = torch.arange(F, device=q.device)[:, None] + pad
    kf = torch.arange(lo, hi, device=q.device)[None, :]
    bias = torch.full((F, hi - lo), float("-inf"), device=q.device, dtype=q.dtype)
    bias.masked_fill_((kf - qf).abs() <= window, local_bias)
    if k_global is not None:
        keys, vals = torch.cat([keys, k_global], 1), torch.cat([vals, v_global], 1)
        bias = torch.cat([bias, bias.new_full((F, k_global.shape[1]), global_bias)], 1)
    # xformers wants the bias's last dim 8-aligned in memory: pad, then slice the view.
    n = keys.shape[1]
    full = bias.new_full((B, H, F, -(-n // 8) * 8), float("-inf"))
    full[..., :n] = bias
    return xops.memory_efficient_attention(q, keys, vals, attn_bias=full[..., :n], scale=scale)


_why = _probe()
if _why is None:
    STATUS = "registered"
    dispatch.register("dual_scope_attention", "xformers", dual_scope_attention, supports)
else:
    STATUS = f"skipped: {_why}"
