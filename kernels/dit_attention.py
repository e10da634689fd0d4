"""Dual-scope attention for ``tokens_per_frame > 1``: DiT 3-D attention over a frame window.

Flash attention (tiles of BLOCK_M queries, online softmax over tiles of BLOCK_N keys) that
visits only the key tiles it needs: for a query tile spanning frames ``[fa, fb]`` the local
keys are the token range of padded frames ``[fa + pad - window, fb + pad + window]`` clipped
to the halo frames that exist, then the ``Ng`` global tokens. Everything else (64-86% of the
dense score matrix at the SPEC shapes) is skipped, not masked. Inside the local range, the
tiles that every query of the tile sees entirely (all within ``window`` of every query frame)
run without a mask; only the edge tiles compute the band mask.

Also correct for ``tokens_per_frame == 1``: the temporal kernel hands it windows and global
sets too large for its one-pass tiles.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import interpreting, next_pow2

LOG2E = 1.4426950408889634

# Which mask a run of key tiles needs (constexpr globals: Triton only reads those).
MASK_NONE = tl.constexpr(0)   # tiles every query of the tile sees entirely
MASK_BAND = tl.constexpr(1)   # edge tiles of the local window
MASK_END = tl.constexpr(2)    # the last, partial tile of the global tokens


@triton.jit
def _attend_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                  start, stop, end, q_frame, T, window, qk_scale, bias,
                  offs_d, d_ok, MASK: tl.constexpr, BLOCK_N: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """Online softmax over key tiles ``[start, stop)`` in steps of BLOCK_N; keys at or past
    ``end`` are not loaded. MASK_BAND also applies ``|key frame - query frame| <= window``."""
    for n0 in range(start, stop, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        if MASK == MASK_NONE:
            kv_ok = d_ok[None, :]
        else:
            kv_ok = (n < end)[:, None] & d_ok[None, :]
        n64 = n.to(tl.int64)
        k = tl.load(k_base + n64[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=kv_ok, other=0.0)
        v = tl.load(v_base + n64[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=kv_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale + bias
        if MASK == MASK_BAND:
            dist = (n // T)[None, :] - q_frame[:, None]
            s = tl.where((dist <= window) & (dist >= -window) & (n < end)[None, :], s,
                         float("-inf"))
        elif MASK == MASK_END:
            s = tl.where((n < end)[None, :], s, float("-inf"))
        # m_i starts finite (-1e30), so a tile a row cannot see leaves it unchanged and adds 0.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _dit_attn_fwd(
    Q, K, V, KG, VG, O, LSE,
    stride_qb, stride_qn, stride_qh, stride_qd,      # q  (B, F*T, H, D)
    stride_kb, stride_kn, stride_kh, stride_kd,      # k  (B, (F + 2*pad)*T, H, D)
    stride_vb, stride_vn, stride_vh, stride_vd,      # v  (B, (F + 2*pad)*T, H, D)
    stride_gb, stride_gn, stride_gh, stride_gd,      # k_global (B, Ng, H, D)
    stride_wb, stride_wn, stride_wh, stride_wd,      # v_global (B, Ng, H, D)
    stride_ob, stride_on, stride_oh, stride_od,      # out (B, F*T, H, D)
    H, F, T, Ng, pad, window, lo, hi, num_m_tiles,
    qk_scale, local_bias, global_bias,               # scale and biases times log2(e)
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_GLOBAL: tl.constexpr, RETURN_LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HAS_LOCAL: tl.constexpr,
):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16,
                     "tl.dot needs every tile dimension >= 16")
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    # One flat grid axis, query tiles of one (b, h) adjacent: they share K/V in L2, and a
    # batch x heads past 65,535 cannot overflow a grid dimension.
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // num_m_tiles
    m0 = (pid % num_m_tiles).to(tl.int32) * BLOCK_M
    b = bh // H
    h = bh % H
    FT = F * T
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < FT
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m.to(tl.int64)[:, None] * stride_qn
                + offs_d[None, :] * stride_qd, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    q_frame = offs_m // T + pad                                 # padded frame of each query

    # Local key tokens of the frames this tile can see, clipped to the frames that exist.
    fa = m0 // T
    fb = (tl.minimum(m0 + BLOCK_M, FT) - 1) // T
    lo_tok = tl.maximum(lo, fa + pad - window) * T
    hi_tok = tl.minimum(hi, fb + pad + window + 1) * T
    # Keys every query of the tile sees: frames [fb + pad - window, fa + pad + window].
    full_lo = tl.maximum(lo, fb + pad - window) * T
    full_hi = tl.minimum(hi, fa + pad + window + 1) * T
    mid_lo = tl.minimum(lo_tok + tl.cdiv(tl.maximum(full_lo - lo_tok, 0), BLOCK_N) * BLOCK_N,
                        hi_tok)
    mid_hi = mid_lo + tl.maximum(full_hi - mid_lo, 0) // BLOCK_N * BLOCK_N

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), -1e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    # HAS_LOCAL=False: the global tokens alone (a scope merged with the local one by LSE).
    if HAS_LOCAL:
        acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd,
                                      stride_vn, stride_vd, lo_tok, mid_lo, hi_tok, q_frame, T,
                                      window, qk_scale, local_bias, offs_d, d_ok, MASK_BAND,
                                      BLOCK_N, DOT_PRECISION)
        acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd,
                                      stride_vn, stride_vd, mid_lo, mid_hi, hi_tok, q_frame, T,
                                      window, qk_scale, local_bias, offs_d, d_ok, MASK_NONE,
                                      BLOCK_N, DOT_PRECISION)
        acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd,
                                      stride_vn, stride_vd, mid_hi, hi_tok, hi_tok, q_frame, T,
                                      window, qk_scale, local_bias, offs_d, d_ok, MASK_BAND,
                                      BLOCK_N, DOT_PRECISION)
    if HAS_GLOBAL:
        kg_base = KG + b * stride_gb + h * stride_gh
        vg_base = VG + b * stride_wb + h * stride_wh
        g_full = Ng // BLOCK_N * BLOCK_N
        acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, q, kg_base, vg_base, stride_gn, stride_gd,
                                      stride_wn, stride_wd, 0, g_full, Ng, q_frame, T, window,
                                      qk_scale, global_bias, offs_d, d_ok, MASK_NONE, BLOCK_N,
                                      DOT_PRECISION)
        acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, q, kg_base, vg_base, stride_gn, stride_gd,
                                      stride_wn, stride_wd, g_full, Ng, Ng, q_frame, T, window,
                                      qk_scale, global_bias, offs_d, d_ok, MASK_END, BLOCK_N,
                                      DOT_PRECISION)
    l_i = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_i[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m.to(tl.int64)[:, None] * stride_on
             + offs_d[None, :] * stride_od, out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    if RETURN_LSE:
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453    # (B, H, F*T), natural log
        tl.store(LSE + bh * FT + offs_m, lse, mask=m_ok)


def pick_blocks(FT: int, D: int, dtype: torch.dtype) -> dict:
    """Tile sizes for ``_dit_attn_fwd``; each choice and its reason (register counts are what
    ptxas reports for sm_90, see bench/RESULTS.md).

    - Interpreter: 16 x 16 tiles. numpy runs every tile op, so small tiles keep the CPU
      tests fast, and tiny test shapes then span several query and key tiles.
    - 16-bit, D <= 64: 128 x 64, 4 warps, as FlashAttention-2 for short heads: the q tile and
      the accumulator are small, so a tall query tile amortizes each K/V load over more rows.
    - 16-bit, D <= 128: 128 x 64, 8 warps: the 128 x 128 fp32 accumulator needs 8 warps'
      registers (223 per thread, no spills).
    - 16-bit, D > 128: 64 x 32, 4 warps: twice the head, half the tile.
    - fp32: IEEE fp32 has no tensor-core path; its dot tiles hold far more registers per
      thread, and anything larger than 32 x 32 at 8 warps (D <= 64) or 16 x 16 at 4 warps
      (D <= 128) spills. fp32 is the accuracy path, not the fast one.
    - FT < 128 queries: at most a 64-row query tile, so short clips do not compute padding.
    """
    BLOCK_D = max(16, next_pow2(D))
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=BLOCK_D, num_warps=1, num_stages=1)
    if dtype == torch.float32:
        cfg = dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=1) if BLOCK_D <= 64 else \
            dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    elif BLOCK_D <= 64:
        cfg = dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    elif BLOCK_D <= 128:
        cfg = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    else:
        cfg = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    if FT < 128:
        cfg["BLOCK_M"] = min(cfg["BLOCK_M"], 64)
    return dict(cfg, BLOCK_D=BLOCK_D)


def fits(D: int) -> str | None:
    if D > 256:
        return f"head dim {D} > 256"
    return None


def global_attention(q, k, v, *, scale: float, bias: float, blocks: dict | None = None):
    """``vinf.ops.attention_with_lse`` on ``_dit_attn_fwd`` with its local scope switched off:
    q (B, L, H, D) against the N keys k, v (B, N, H, D), N >= 1. Returns (out (B, L, H, D),
    lse (B, H, L) fp32)."""
    B, L, H, D = q.shape
    cfg = dict(pick_blocks(L, D, q.dtype), **(blocks or {}))
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    out = torch.empty((B, L, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    num_m_tiles = triton.cdiv(L, cfg["BLOCK_M"])
    # One token per "frame", no halo: the local arguments are inert; k, v stand in for K, V.
    _dit_attn_fwd[(B * H * num_m_tiles,)](
        q, k, v, k, v, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, L, 1, k.shape[1], 0, 0, 0, L, num_m_tiles,
        scale * LOG2E, 0.0, bias * LOG2E,
        HEAD_DIM=D, HAS_GLOBAL=True, RETURN_LSE=True,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", HAS_LOCAL=False,
        num_warps=num_warps, num_stages=num_stages, **cfg)
    return out, lse


def dit_attention(q, k, v, k_global, v_global, *, window: int, pad: int, valid_left: int,
                  valid_right: int, tokens_per_frame: int, local_bias: float,
                  global_bias: float, scale: float, return_lse: bool,
                  blocks: dict | None = None, out=None, lse=None):
    """Launch ``_dit_attn_fwd``. Arguments as ``vinf.ops.dual_scope_attention``, checked by
    it: q (B, F*T, H, D); k, v (B, (F + 2*pad)*T, H, D); k_global, v_global (B, Ng, H, D) or
    None. Returns (out (B, F*T, H, D) contiguous, lse (B, H, F*T) fp32 or None).
    ``blocks`` overrides ``pick_blocks`` (tests); ``out`` and ``lse`` are optional
    preallocated outputs (``lse`` contiguous)."""
    B, FT, H, D = q.shape
    T = tokens_per_frame
    F = FT // T
    Ng = 0 if k_global is None else k_global.shape[1]
    cfg = dict(pick_blocks(FT, D, q.dtype), **(blocks or {}))
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    if out is None:
        out = torch.empty((B, FT, H, D), dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty((B, H, FT), dtype=torch.float32, device=q.device) if return_lse else out
    kg, vg = (k_global, v_global) if Ng else (k, v)   # stand-ins when Ng == 0, never read
    num_m_tiles = triton.cdiv(FT, cfg["BLOCK_M"])
    _dit_attn_fwd[(B * H * num_m_tiles,)](
        q, k, v, kg, vg, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *kg.stride(), *vg.stride(), *out.stride(),
        H, F, T, Ng, pad, window, pad - valid_left, pad + F + valid_right, num_m_tiles,
        scale * LOG2E, local_bias * LOG2E, global_bias * LOG2E,
        HEAD_DIM=D, HAS_GLOBAL=Ng > 0, RETURN_LSE=return_lse,
        # fp32 stays fp32 (tf32 would cost ~1e-3); 16-bit inputs ignore the setting.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", HAS_LOCAL=True,
        num_warps=num_warps, num_stages=num_stages, **cfg)
    return out, (lse if return_lse else None)
