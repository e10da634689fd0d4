"""Dual-scope attention for ``tokens_per_frame == 1``: UNet temporal attention.

The batch is huge (batch x spatial positions x heads: 12,800 sequences and more) and each
sequence is short (16-64 query frames, a band of ~100 local keys, 8-16 global keys). One
program loops over ``SEQ`` whole sequences (consecutive heads of one position, adjacent in
memory) for one block of ``BLOCK_F`` query frames; the band of local keys that block can see
and all the global keys each fit one tile, so each softmax is computed in one pass, without
the running max and rescaling of flash attention. Plain 2-D tiles per sequence, not a 3-D
batched tl.dot: the batched form has open compiler issues on GPUs that this task could not
test. Sequences sit on grid axis 0 (no 65,535 limit) and every
base offset is 64-bit. q, k, v are read in their given strides: the engine passes
``(B, F, H, D)`` views of the projection outputs, never transposed copies, and the local and
global keys are never concatenated.

Masks: a query in frame ``f`` sees padded key frame ``j`` iff ``|j - (f + pad)| <= window`` and
``lo <= j < hi`` (the halo frames that exist); keys outside ``[lo, hi)`` are never loaded, so
whatever the caller left there (zeros, NaN) cannot leak.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._runtime import next_pow2, num_sms

LOG2E = 1.4426950408889634


@triton.jit
def _temporal_attn_fwd(
    Q, K, V, KG, VG, O, LSE,
    stride_qb, stride_qf, stride_qh, stride_qd,      # q  (B, F, H, D)
    stride_kb, stride_kf, stride_kh, stride_kd,      # k  (B, F + 2*pad, H, D)
    stride_vb, stride_vf, stride_vh, stride_vd,      # v  (B, F + 2*pad, H, D)
    stride_gb, stride_gn, stride_gh, stride_gd,      # k_global (B, Ng, H, D)
    stride_wb, stride_wn, stride_wh, stride_wd,      # v_global (B, Ng, H, D)
    stride_ob, stride_of, stride_oh, stride_od,      # out (B, F, H, D)
    num_seqs, H, F, Ng, pad, window, lo, hi,
    qk_scale, local_bias, global_bias,               # scale and biases times log2(e)
    HEAD_DIM: tl.constexpr, SEQ: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, HAS_GLOBAL: tl.constexpr,
    RETURN_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tl.static_assert(BLOCK_F >= 16 and BLOCK_K >= 16 and BLOCK_G >= 16 and BLOCK_D >= 16,
                     "tl.dot needs every tile dimension >= 16")
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    # Everything but the sequence's base address is the same for the SEQ sequences of this
    # program: offsets, the band mask and the halo mask are computed once.
    f0 = tl.program_id(1) * BLOCK_F
    f = f0 + tl.arange(0, BLOCK_F)                                   # query frames
    f_ok = f < F
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    j = f0 + pad - window + tl.arange(0, BLOCK_K)                    # the block's band of keys
    j_ok = (j >= lo) & (j < hi)
    dist = j[None, :] - (f[:, None] + pad)
    band = (dist <= window) & (dist >= -window) & j_ok[None, :]
    q_ok = f_ok[:, None] & d_ok[None, :]
    kv_ok = j_ok[:, None] & d_ok[None, :]
    # Offsets inside one sequence fit 32 bits (the launcher checks); only the sequence's base
    # offset needs 64. 32-bit tiles halve the registers these loop invariants hold.
    q_off = f[:, None] * stride_qf + d[None, :] * stride_qd
    o_off = f[:, None] * stride_of + d[None, :] * stride_od
    k_off = j[:, None] * stride_kf + d[None, :] * stride_kd
    v_off = j[:, None] * stride_vf + d[None, :] * stride_vd
    if HAS_GLOBAL:
        g = tl.arange(0, BLOCK_G)
        g_ok = g < Ng
        kg_off = g[:, None] * stride_gn + d[None, :] * stride_gd
        vg_off = g[:, None] * stride_wn + d[None, :] * stride_wd
        g_kv_ok = g_ok[:, None] & d_ok[None, :]

    seq0 = tl.program_id(0).to(tl.int64) * SEQ                      # seq = b*H + h
    for i in range(0, tl.minimum(SEQ, num_seqs - seq0)):
        seq = seq0 + i
        b = seq // H
        h = seq % H
        q = tl.load(Q + b * stride_qb + h * stride_qh + q_off, mask=q_ok, other=0.0)
        k = tl.load(K + b * stride_kb + h * stride_kh + k_off, mask=kv_ok, other=0.0)
        v = tl.load(V + b * stride_vb + h * stride_vh + v_off, mask=kv_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale + local_bias
        s = tl.where(band, s, float("-inf"))
        m = tl.max(s, axis=1)
        if HAS_GLOBAL:
            kg = tl.load(KG + b * stride_gb + h * stride_gh + kg_off, mask=g_kv_ok, other=0.0)
            vg = tl.load(VG + b * stride_wb + h * stride_wh + vg_off, mask=g_kv_ok, other=0.0)
            sg = tl.dot(q, tl.trans(kg), input_precision=DOT_PRECISION) * qk_scale + global_bias
            sg = tl.where(g_ok[None, :], sg, float("-inf"))
            m = tl.maximum(m, tl.max(sg, axis=1))
        # Rows past the clip (tile padding, never stored) may see no key: keep them finite.
        m = tl.maximum(m, -1e30)
        p = tl.math.exp2(s - m[:, None])
        l = tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        if HAS_GLOBAL:
            pg = tl.math.exp2(sg - m[:, None])
            l += tl.sum(pg, axis=1)
            acc = tl.dot(pg.to(vg.dtype), vg, acc, input_precision=DOT_PRECISION)
        l = tl.where(l > 0.0, l, 1.0)
        out = acc / l[:, None]
        tl.store(O + b * stride_ob + h * stride_oh + o_off, out.to(O.dtype.element_ty),
                 mask=q_ok)
        if RETURN_LSE:
            # lse (B, H, F) contiguous: row seq = b*H + h, column f. Natural log.
            lse = (m + tl.math.log2(l)) * 0.6931471805599453
            tl.store(LSE + seq * F + f, lse, mask=f_ok)


def pick_blocks(num_seqs: int, F: int, window: int, Ng: int, D: int, sms: int,
                dtype: torch.dtype = torch.bfloat16) -> dict:
    """Tile sizes for ``_temporal_attn_fwd``; each choice and its reason.

    - BLOCK_F: the query block whose key tile (its band, ``BLOCK_F + 2*window`` frames, rounded
      up to a power of two) wastes the fewest padded logits per sequence; ties go to the larger
      block (fewer programs). At least 16, the smallest tl.dot tile; exactly 16 in fp32, whose
      larger tiles spill at head dim 128.
    - SEQ: sequences per program, so that ~8 waves of programs remain: the offsets and masks
      are computed once per program, and the loop over sequences lets the compiler prefetch
      the next sequence's rows while this one computes. At most 16 (a tail of idle SMs).
    - 16-bit inputs: 4 warps, 3 stages (ptxas for sm_90: ~90 registers at the SPEC shapes,
      no spills, see bench/RESULTS.md). fp32: IEEE fp32 dots have no tensor-core path and
      hold more registers per thread; 8 warps and 1 stage keep them from spilling.
    """
    BLOCK_D = max(16, next_pow2(D))
    BLOCK_G = max(16, next_pow2(Ng)) if Ng else 16
    fp32 = dtype == torch.float32
    best = None
    for bf in (16,) if fp32 else (16, 32, 64):
        rows = min(bf, F)
        bk = max(16, next_pow2(rows + 2 * window))
        cost = math.ceil(F / bf) * bf * (bk + (BLOCK_G if Ng else 0))
        if best is None or cost <= best[0]:
            best = (cost, bf, bk)
        if bf >= F:
            break
    _, BLOCK_F, BLOCK_K = best
    programs_per_seq = math.ceil(F / BLOCK_F)
    SEQ = 1
    while SEQ < 16 and num_seqs * programs_per_seq >= 2 * SEQ * 8 * sms:
        SEQ *= 2
    return dict(SEQ=SEQ, BLOCK_F=BLOCK_F, BLOCK_K=BLOCK_K, BLOCK_G=BLOCK_G, BLOCK_D=BLOCK_D,
                num_warps=8 if fp32 else 4, num_stages=1 if fp32 else 3)


def _span(t: torch.Tensor) -> int:
    """Largest element offset inside one (b, h) sequence of a (B, L, H, D) tensor."""
    return (t.shape[1] - 1) * abs(t.stride(1)) + (t.shape[3] - 1) * abs(t.stride(3))


def fits(q, k, v, k_global, v_global, window: int) -> str | None:
    """Why this kernel's one-pass tiles cannot take the problem, or None; the flash kernel
    takes any size, so the caller hands it what this one cannot."""
    D = q.shape[3]
    Ng = 0 if k_global is None else k_global.shape[1]
    if D > 256:
        return f"head dim {D} > 256"
    if 16 + 2 * window > 256:
        return f"window {window}: the band of a 16-frame query block exceeds 256 keys"
    if Ng > 128:
        return f"{Ng} global keys exceed one 128-key tile"
    for name, t in (("q", q), ("k", k), ("v", v), ("k_global", k_global),
                    ("v_global", v_global)):
        if t is not None and _span(t) >= 2 ** 31:
            return f"{name}: offsets inside one sequence pass 2**31 (32-bit in this kernel)"
    return None


def temporal_attention(q, k, v, k_global, v_global, *, window: int, pad: int, valid_left: int,
                       valid_right: int, local_bias: float, global_bias: float, scale: float,
                       return_lse: bool, blocks: dict | None = None, out=None, lse=None):
    """Launch ``_temporal_attn_fwd``. Arguments as ``vinf.ops.dual_scope_attention`` with
    ``tokens_per_frame == 1`` and checked by it: q (B, F, H, D); k, v (B, F + 2*pad, H, D);
    k_global, v_global (B, Ng, H, D) or None. Returns (out (B, F, H, D) contiguous,
    lse (B, H, F) fp32 or None). ``blocks`` overrides ``pick_blocks`` (tests); ``out`` and
    ``lse`` are optional preallocated outputs (``lse`` contiguous)."""
    B, F, H, D = q.shape
    Ng = 0 if k_global is None else k_global.shape[1]
    cfg = dict(pick_blocks(B * H, F, window, Ng, D, num_sms(q.device), q.dtype),
               **(blocks or {}))
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    if cfg["BLOCK_K"] < min(cfg["BLOCK_F"], F) + 2 * window:
        raise ValueError(f"BLOCK_K {cfg['BLOCK_K']} cannot hold the band of a query block")
    if out is None:
        out = torch.empty((B, F, H, D), dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty((B, H, F), dtype=torch.float32, device=q.device) if return_lse else out
    kg, vg = (k_global, v_global) if Ng else (k, v)   # stand-ins when Ng == 0, never read
    grid = (triton.cdiv(B * H, cfg["SEQ"]), triton.cdiv(F, cfg["BLOCK_F"]))
    _temporal_attn_fwd[grid](
        q, k, v, kg, vg, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *kg.stride(), *vg.stride(), *out.stride(),
        B * H, H, F, Ng, pad, window, pad - valid_left, pad + F + valid_right,
        scale * LOG2E, local_bias * LOG2E, global_bias * LOG2E,
        HEAD_DIM=D, HAS_GLOBAL=Ng > 0, RETURN_LSE=return_lse,
        # fp32 stays fp32 (tf32 would cost ~1e-3); 16-bit inputs ignore the setting.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages, **cfg)
    return out, (lse if return_lse else None)
