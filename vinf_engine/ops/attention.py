"""Dual-scope attention: a banded local scope plus a shared global scope in one softmax.

Layout (``T = tokens_per_frame``; ``T = 1`` for UNet temporal attention, where ``B`` is
batch x spatial positions; ``T = h*w`` for DiT 3-D attention):

    q        (B, F*T, H, D)             the clip's queries
    k, v     (B, (F + 2*pad)*T, H, D)   the clip's keys with ``pad`` halo frames on each side;
                                        query frame ``i`` is aligned with key frame ``i + pad``
    k_global (B, Ng, H, D)              keys/values every query sees (optional)

A query token in frame ``i`` sees a key token in padded frame ``j`` iff
``|j - (i + pad)| <= window`` and ``pad - valid_left <= j < pad + F + valid_right``, plus all
``Ng`` global tokens. Logits are ``scale * q.k``, plus ``local_bias`` on local keys and
``global_bias`` on global keys. Keys outside the valid halo are never read: they are frames
beyond the video's ends and must not act as zero keys.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F_

from . import dispatch
from ._checks import check_bias, check_int, check_real, check_tensor, compute_dtype
from .merge import attention_with_lse, merge_attention
from .softmax import softmax_attention

__all__ = ["dual_scope_attention", "dual_scope_attention_reference", "check_dual_scope_args"]

# Elements of one chunk of fp32 logits in the reference: bounds its memory to ~256 MiB.
_REF_CHUNK_ELEMS = 1 << 26


def check_dual_scope_args(q, k, v, k_global, v_global, window, pad, valid_left, valid_right,
                          tokens_per_frame, local_bias, global_bias, scale):
    """Validate the contract; returns ``(F, T, scale)``. Every failure names the argument."""
    check_tensor("q", q, 4)
    check_tensor("k", k, 4)
    check_tensor("v", v, 4)
    T = check_int("tokens_per_frame", tokens_per_frame, 1)
    check_int("window", window, 0)
    check_int("pad", pad, 0)
    check_int("valid_left", valid_left, 0)
    check_int("valid_right", valid_right, 0)
    if window > pad:
        raise ValueError(f"window ({window}) must be <= pad ({pad})")
    if valid_left > pad:
        raise ValueError(f"valid_left ({valid_left}) must be <= pad ({pad})")
    if valid_right > pad:
        raise ValueError(f"valid_right ({valid_right}) must be <= pad ({pad})")
    check_bias("local_bias", local_bias, q.shape[0], q.device)
    check_bias("global_bias", global_bias, q.shape[0], q.device)
    B, FT, H, D = q.shape
    if FT == 0 or FT % T:
        raise ValueError(
            f"q's sequence length ({FT}) must be a positive multiple of tokens_per_frame ({T})")
    F = FT // T
    want = (B, (F + 2 * pad) * T, H, D)
    if tuple(k.shape) != want:
        raise ValueError(f"k must have shape (B, (F + 2*pad)*T, H, D) = {want}, got {tuple(k.shape)}")
    if tuple(v.shape) != want:
        raise ValueError(f"v must have shape {want} like k, got {tuple(v.shape)}")
    if (k_global is None) != (v_global is None):
        raise ValueError("k_global and v_global must be given together")
    tensors = [("q", q), ("k", k), ("v", v)]
    if k_global is not None:
        check_tensor("k_global", k_global, 4)
        check_tensor("v_global", v_global, 4)
        Bg, Ng, Hg, Dg = k_global.shape
        if (Bg, Hg, Dg) != (B, H, D):
            raise ValueError(f"k_global must have shape (B, Ng, H, D) = ({B}, Ng, {H}, {D}), "
                             f"got {tuple(k_global.shape)}")
        if v_global.shape != k_global.shape:
            raise ValueError(f"v_global must have the shape of k_global {tuple(k_global.shape)}, "
                             f"got {tuple(v_global.shape)}")
        tensors += [("k_global", k_global), ("v_global", v_global)]
    for name, t in tensors[1:]:
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype}, q has {q.dtype}: they must match")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q is on {q.device}: they must match")
    if scale is None:
        scale = D ** -0.5
    else:
        scale = check_real("scale", scale)
    return F, T, scale


def dual_scope_attention_reference(q, k, v, k_global=None, v_global=None, *, window, pad,
                                   valid_left, valid_right, tokens_per_frame=1, local_bias=0.0,
                                   global_bias=0.0, scale=None, return_lse=False):
    """Plain-PyTorch dual-scope attention: the CPU path and every kernel's oracle.

    Processes query frames in chunks and slices each chunk's keys to its band intersected
    with the valid halo, so invalid keys are never read and memory stays bounded for DiT
    sizes. Math in fp32 (fp64 for fp64 inputs); returns q's dtype, shape ``(B, F*T, H, D)``,
    and with ``return_lse`` also the log-sum-exp of each row's logits, ``(B, H, F*T)`` fp32.
    Biases are numbers here (``dual_scope_attention`` takes tensors).
    """
    for name, b in (("local_bias", local_bias), ("global_bias", global_bias)):
        if isinstance(b, torch.Tensor):
            raise ValueError(f"{name}: the reference takes a number; tensor biases go through "
                             "vinf_engine.ops.dual_scope_attention")
    F, T, scale = check_dual_scope_args(q, k, v, k_global, v_global, window, pad, valid_left,
                                        valid_right, tokens_per_frame, local_bias, global_bias,
                                        scale)
    B, _, H, D = q.shape
    cdt = compute_dtype(q.dtype)
    lo, hi = pad - valid_left, pad + F + valid_right          # valid padded key frames [lo, hi)
    Ng = 0 if k_global is None else k_global.shape[1]
    if (window >= F - 1 + max(valid_left, valid_right) and local_bias == global_bias
            and not return_lse):
        # Every query sees every valid key with one bias (which softmax ignores): plain
        # attention over them, no mask, the fast path a full-window one-process run takes.
        keys, vals = k[:, lo * T:hi * T], v[:, lo * T:hi * T]
        if Ng:
            keys, vals = torch.cat([keys, k_global], 1), torch.cat([vals, v_global], 1)
        o = F_.scaled_dot_product_attention(q.to(cdt).transpose(1, 2), keys.to(cdt).transpose(1, 2),
                                            vals.to(cdt).transpose(1, 2), scale=scale)
        return o.transpose(1, 2).to(q.dtype)
    if Ng:
        kg = k_global.to(cdt).transpose(1, 2)                 # (B, H, Ng, D)
        vg = v_global.to(cdt).transpose(1, 2)
    chunk = F
    while chunk > 1 and B * H * chunk * T * ((chunk + 2 * window) * T + Ng) > _REF_CHUNK_ELEMS:
        chunk = (chunk + 1) // 2
    out = torch.empty_like(q)
    lse = torch.empty(B, H, F * T, dtype=torch.float32, device=q.device) if return_lse else None
    dev = q.device
    for f0 in range(0, F, chunk):
        f1 = min(F, f0 + chunk)
        j0, j1 = max(lo, f0 + pad - window), min(hi, f1 + pad + window)
        qc = q[:, f0 * T:f1 * T].to(cdt).transpose(1, 2)      # (B, H, nq, D)
        kc = k[:, j0 * T:j1 * T].to(cdt).transpose(1, 2)      # (B, H, nk, D): valid keys only
        vc = v[:, j0 * T:j1 * T].to(cdt).transpose(1, 2)
        # The band at frame granularity, expanded over tokens in one copy: the token-level
        # mask of a DiT chunk has tens of millions of entries.
        fq = torch.arange(f0, f1, device=dev) + pad
        fk = torch.arange(j0, j1, device=dev)
        band = (fk[None, :] - fq[:, None]).abs() <= window
        bias_f = torch.full(band.shape, float("-inf"), dtype=cdt, device=dev)
        bias_f.masked_fill_(band, local_bias)
        nq, nk = (f1 - f0) * T, (j1 - j0) * T
        bias = torch.empty((nq, nk + Ng), dtype=cdt, device=dev)
        bias[:, :nk].view(f1 - f0, T, j1 - j0, T).copy_(bias_f[:, None, :, None].expand(-1, T, -1, T))
        if Ng:
            bias[:, nk:] = global_bias
            kc = torch.cat([kc, kg], dim=2)
            vc = torch.cat([vc, vg], dim=2)
        # Every row holds its own frame (distance 0, always valid): no all -inf rows.
        o, row_lse = softmax_attention(qc, kc, vc, bias, scale, return_lse)
        if return_lse:
            lse[:, :, f0 * T:f1 * T] = row_lse.float()
        out[:, f0 * T:f1 * T] = o.transpose(1, 2).to(q.dtype)
    return (out, lse) if return_lse else out


def _reference_op(q, k, v, k_global, v_global, window, pad, valid_left, valid_right,
                  tokens_per_frame, local_bias, global_bias, scale, return_lse):
    """The reference with the custom op's positional signature and its two outputs."""
    res = dual_scope_attention_reference(
        q, k, v, k_global, v_global, window=window, pad=pad, valid_left=valid_left,
        valid_right=valid_right, tokens_per_frame=tokens_per_frame, local_bias=local_bias,
        global_bias=global_bias, scale=scale, return_lse=return_lse)
    return res if return_lse else (res, q.new_empty((0,), dtype=torch.float32))


@torch.library.custom_op("vinf::dual_scope_attention", mutates_args=())
def _dual_scope_attention_op(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_global: Optional[torch.Tensor],
        v_global: Optional[torch.Tensor], window: int, pad: int, valid_left: int,
        valid_right: int, tokens_per_frame: int, local_bias: float, global_bias: float,
        scale: float, return_lse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The op as torch.compile and CUDA graphs see it: (out (B, F*T, H, D) contiguous,
    lse (B, H, F*T) fp32, or an empty (0,) tensor without ``return_lse``). Arguments are
    checked by the public function; the backend is chosen by ``dispatch``."""
    FT = q.shape[1]
    key = (q.dtype, q.shape[0], FT // tokens_per_frame, tokens_per_frame, q.shape[2],
           q.shape[3], pad, window, 0 if k_global is None else k_global.shape[1], return_lse)
    res = dispatch.call(
        "dual_scope_attention", key, q, k, v, k_global, v_global, window=window, pad=pad,
        valid_left=valid_left, valid_right=valid_right, tokens_per_frame=tokens_per_frame,
        local_bias=local_bias, global_bias=global_bias, scale=scale, return_lse=return_lse)
    out, lse = res if return_lse else (res, q.new_empty((0,), dtype=torch.float32))
    return out.contiguous(), lse


@_dual_scope_attention_op.register_fake
def _(q, k, v, k_global, v_global, window, pad, valid_left, valid_right, tokens_per_frame,
      local_bias, global_bias, scale, return_lse):
    B, FT, H, D = q.shape
    lse_shape = (B, H, FT) if return_lse else (0,)
    return q.new_empty((B, FT, H, D)), q.new_empty(lse_shape, dtype=torch.float32)


dispatch.reference_autograd(_dual_scope_attention_op, _reference_op)


def dual_scope_attention(q, k, v, k_global=None, v_global=None, *, window, pad, valid_left,
                         valid_right, tokens_per_frame=1, local_bias=0.0, global_bias=0.0,
                         scale=None, return_lse=False):
    """Dual-scope attention (see the module docstring for the layout and the mask).

    Runs as the torch.library op ``torch.ops.vinf.dual_scope_attention`` (traceable by
    ``torch.compile(fullgraph=True)``, capturable in CUDA graphs) on the backend that
    ``dispatch`` picks: the reference on CPU, the Triton or CUDA kernels on GPUs.

    Parameters
    ----------
    q : (B, F*T, H, D) tensor
    k, v : (B, (F + 2*pad)*T, H, D) tensors, same dtype and device as ``q``
    k_global, v_global : (B, Ng, H, D) tensors or None
    window : int, ``0 <= window <= pad``
    pad : int, halo frames on each side of ``k``/``v``
    valid_left, valid_right : int in ``[0, pad]``, how many halo frames on each side exist
    tokens_per_frame : int >= 1
    local_bias, global_bias : float, added to local / global logits; or tensors, one value
        or one per row of ``q`` ``(B,)``: data of the graph, never read on the host (what
        torch.compile and CUDA graphs need where the biases follow a tensor timestep). The
        op then scores the two scopes apart, biases their lse and merges them: the same
        softmax, one more pass over the output
    scale : float or None (``D ** -0.5``)
    return_lse : bool, also return the log-sum-exp of each query's logits, so that partial
        results over disjoint key sets can be merged exactly

    Returns
    -------
    (B, F*T, H, D) tensor of q's dtype; with ``return_lse``, also (B, H, F*T) fp32.
    """
    F, T, scale = check_dual_scope_args(q, k, v, k_global, v_global, window, pad, valid_left,
                                        valid_right, tokens_per_frame, local_bias, global_bias,
                                        scale)
    lb = check_bias("local_bias", local_bias, q.shape[0], q.device)
    gb = check_bias("global_bias", global_bias, q.shape[0], q.device)
    if isinstance(lb, torch.Tensor) or isinstance(gb, torch.Tensor):
        out, lse = _tensor_bias_attention(q, k, v, k_global, v_global, window, pad, valid_left,
                                          valid_right, T, lb, gb, scale)
    else:
        out, lse = _dual_scope_attention_op(q, k, v, k_global, v_global, window, pad,
                                            valid_left, valid_right, T, lb, gb, scale,
                                            bool(return_lse))
    return (out, lse) if return_lse else out


def _tensor_bias_attention(q, k, v, k_global, v_global, window, pad, valid_left, valid_right,
                           T, lb, gb, scale):
    """Dual-scope attention with biases that are tensors: each scope unbiased, its lse shifted
    by its bias, the two merged; equal to the one softmax with the biases on its logits."""
    out, lse = _dual_scope_attention_op(q, k, v, None, None, window, pad, valid_left,
                                        valid_right, T, 0.0, 0.0, scale, True)
    lse = lse + lb
    if k_global is None:
        return out, lse
    o_g, lse_g = attention_with_lse(q, k_global, v_global, scale=scale)
    lse_g = lse_g + gb
    return merge_attention(out, lse, o_g, lse_g), torch.logaddexp(lse, lse_g)


def window_attention(q, k, v, k_global=None, v_global=None, *, window, left, right,
                     tokens_per_frame=1, local_bias=0.0, global_bias=0.0, scale=None,
                     return_lse=False):
    """Dual-scope attention over the keys as they are, the window past their padding.

    ``k``, ``v`` are (B, (left + F + right)*T, H, D): the query frames' own keys with the
    ``left`` and ``right`` halo frames that exist before and after them, nothing padded (the
    video may end there, or a neighbour's clip hold fewer). Query frame ``i`` sees key frame
    ``j`` iff ``|j - left - i| <= window``, plus every global key: ``dual_scope_attention``'s
    mask with ``pad = window``, ``valid_left = left``, ``valid_right = right``. Where the
    window covers every key frame for every query frame (a full window), the band would mask
    nothing: the keys are attended densely, no band padded to three windows (with global
    keys in the same softmax only where the keys are the query frames' own: as one frame of
    ``F*T`` tokens; elsewhere the band stays, so that no fp32 lse merge costs an fp64 run its
    precision). On CUDA with ``T = 1`` the band stays: the CUDA temporal kernel takes it, and
    the dense path there is not yet timed against it.

    Other arguments and the result as ``dual_scope_attention``'s; ``0 <= left, right <=
    window``.
    """
    T = check_int("tokens_per_frame", tokens_per_frame, 1)
    for name, n in (("left", left), ("right", right)):
        check_int(name, n, 0)
        if n > window:
            raise ValueError(f"{name}={n} halo frames is more than the window {window} reads")
    F, extra = divmod(q.shape[1], T)
    if extra or k.shape[1] != (left + F + right) * T:
        raise ValueError(f"k holds {k.shape[1]} tokens; with {F} query frames of {T} tokens, "
                         f"left={left} and right={right} it must hold {(left + F + right) * T}")
    full = window >= F - 1 + max(left, right) and (T > 1 or not q.is_cuda)
    kw = dict(local_bias=local_bias, global_bias=global_bias, scale=scale,
              return_lse=return_lse)
    if full and k_global is None:
        out, lse = attention_with_lse(q, k, v, scale=scale, bias=local_bias)
        return (out, lse) if return_lse else out
    if full and left == right == 0:
        return dual_scope_attention(q, k, v, k_global, v_global, window=0, pad=0,
                                    valid_left=0, valid_right=0, tokens_per_frame=F * T, **kw)
    # Frames past the halos are masked by the op, never read: zeros are filler.
    fill = (0, 0, 0, 0, (window - left) * T, (window - right) * T)
    return dual_scope_attention(q, F_.pad(k, fill), F_.pad(v, fill), k_global, v_global,
                                window=window, pad=window, valid_left=left, valid_right=right,
                                tokens_per_frame=T, **kw)


dispatch.register("dual_scope_attention", "reference", dual_scope_attention_reference)
