"""Softmax attention over whole tensors: the arithmetic the references share."""
from __future__ import annotations

import torch
import torch.nn.functional as F_

__all__ = ["softmax_attention"]


def softmax_attention(q, k, v, bias, scale: float, return_lse: bool):
    """``softmax(scale * q.k + bias) v`` over (B, H, n, D) tensors, and the rows' log-sum-exp
    when asked (else None). On the CPU without autograd, torch's fused flash kernel (it returns
    the log-sum-exp too): the explicit softmax materialises the logits several times over and
    was most of a Wan forward's time past its trained length."""
    fused = q.device.type == "cpu" and not (torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad))
    if fused:
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=bias, scale=scale)
        return o, lse
    if not return_lse:
        return F_.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale), None
    s = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias
    return torch.softmax(s, dim=-1) @ v, torch.logsumexp(s, dim=-1)
