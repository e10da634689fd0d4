"""GroupNorm in three kernels, for (N, C, *spatial) tensors contiguous or channels-last.

    _gn_stats_fwd   many programs, each a tile of channels x a chunk of spatial positions:
                    per-channel (count, mean, M2) in fp32, tiles merged Chan-style
    _gn_merge_fwd   one program per (n, group): merges its entries in fp64 into the
                    ``[sum x, sum x^2]`` partials that ``vinf.ops`` all-reduce across ranks
    _gn_apply_fwd   y = act((x - mean) * rstd * weight + bias), one read and one write

Both kernels address x as (N, C, S) through three strides, so one kernel serves NCDHW (the
spatial stride is 1) and channels-last (the channel stride is 1); the launcher orients the
tile along the unit stride so that loads coalesce. A group's statistics are therefore spread
over ``channels x spatial chunks`` programs, never one program per group: the SPEC shapes
have 64 groups against 132 SMs.

Why mean/M2 and not sums in the tiles: at |mean|/std in the hundreds, an fp32 sum of squares
loses every digit of the variance; a tile's two-pass (mean, M2) keeps them, and the merge
into fp64 sums (sum x^2 = M2 + n*mean^2) matches the reference format exactly.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import interpreting, next_pow2, num_sms


@triton.jit
def _gn_stats_fwd(
    X, P,                                   # x (N, C, S) strided; P (N, G, C/G * n_chunks, 3) fp32
    stride_xn, stride_xc, stride_xs,
    C, S, G, chunk, n_chunks, n_cblocks,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    chunk_id = pid % n_chunks
    cb = (pid // n_chunks) % n_cblocks
    n = pid // (n_chunks * n_cblocks)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    base = X + n * stride_xn + c.to(tl.int64)[:, None] * stride_xc
    s_begin = chunk_id * chunk
    s_end = tl.minimum(s_begin + chunk, S)
    cnt = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for s0 in range(s_begin, s_end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s < s_end
        ok = c_ok[:, None] & s_ok[None, :]
        x = tl.load(base + s[None, :] * stride_xs, mask=ok, other=0.0).to(tl.float32)
        t_cnt = tl.sum(s_ok.to(tl.float32), axis=0)
        t_mean = tl.sum(x, axis=1) / t_cnt
        dev = tl.where(ok, x - t_mean[:, None], 0.0)
        t_m2 = tl.sum(dev * dev, axis=1)
        # Chan et al.: merge (cnt, mean, m2) with the tile's (t_cnt, t_mean, t_m2).
        new_cnt = cnt + t_cnt
        delta = t_mean - mean
        mean += delta * (t_cnt / new_cnt)
        m2 += t_m2 + delta * delta * (cnt * t_cnt / new_cnt)
        cnt = new_cnt
    # Entry of channel c in its group: (c % (C/G)) * n_chunks + chunk_id.
    cpg = C // G
    g = c // cpg
    entry = ((n * G + g) * cpg + c % cpg) * n_chunks + chunk_id
    tl.store(P + entry * 3, cnt, mask=c_ok)
    tl.store(P + entry * 3 + 1, mean, mask=c_ok)
    tl.store(P + entry * 3 + 2, m2, mask=c_ok)


@triton.jit
def _gn_merge_fwd(
    P, OUT,                                 # P (N*G, E, 3) fp32; OUT (N*G, 2) fp64 [sum, sum x^2]
    E, BLOCK_E: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = P + row * E * 3
    tot = tl.zeros((BLOCK_E,), dtype=tl.float64)
    wsum = tl.zeros((BLOCK_E,), dtype=tl.float64)
    for e0 in range(0, E, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        ok = e < E
        cnt = tl.load(base + e * 3, mask=ok, other=0.0).to(tl.float64)
        mu = tl.load(base + e * 3 + 1, mask=ok, other=0.0).to(tl.float64)
        tot += cnt
        wsum += cnt * mu
    n = tl.sum(tot, axis=0)
    mean = tl.sum(wsum, axis=0) / tl.maximum(n, 1.0)
    m2 = tl.zeros((BLOCK_E,), dtype=tl.float64)
    for e0 in range(0, E, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        ok = e < E
        cnt = tl.load(base + e * 3, mask=ok, other=0.0).to(tl.float64)
        mu = tl.load(base + e * 3 + 1, mask=ok, other=0.0).to(tl.float64)
        em2 = tl.load(base + e * 3 + 2, mask=ok, other=0.0).to(tl.float64)
        m2 += em2 + cnt * (mu - mean) * (mu - mean)
    total_m2 = tl.sum(m2, axis=0)
    tl.store(OUT + row * 2, n * mean)
    tl.store(OUT + row * 2 + 1, total_m2 + n * mean * mean)


@triton.jit
def _gn_apply_fwd(
    X, Y, MEAN, RSTD, W, B,                 # x, y (N, C, S) strided; mean, rstd (N, G) fp64
    stride_xn, stride_xc, stride_xs,
    stride_yn, stride_yc, stride_ys,
    C, S, G, n_sblocks, n_cblocks,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    sb = pid % n_sblocks
    cb = (pid // n_sblocks) % n_cblocks
    n = pid // (n_sblocks * n_cblocks)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    ok = c_ok[:, None] & (s < S)[None, :]
    g = n * G + c // (C // G)
    mean = tl.load(MEAN + g, mask=c_ok, other=0.0).to(tl.float32)
    scale = tl.load(RSTD + g, mask=c_ok, other=0.0).to(tl.float32)
    if HAS_WEIGHT:
        scale *= tl.load(W + c, mask=c_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        shift = tl.load(B + c, mask=c_ok, other=0.0).to(tl.float32)
    else:
        shift = tl.zeros((BLOCK_C,), dtype=tl.float32)
    c64 = c.to(tl.int64)[:, None]
    s64 = s.to(tl.int64)[None, :]
    x = tl.load(X + n * stride_xn + c64 * stride_xc + s64 * stride_xs, mask=ok,
                other=0.0).to(tl.float32)
    # (x - mean) first: x * (rstd*w) - mean * (rstd*w) would cancel at large |mean|/std.
    y = (x - mean[:, None]) * scale[:, None] + shift[:, None]
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    tl.store(Y + n * stride_yn + c64 * stride_yc + s64 * stride_ys, y.to(Y.dtype.element_ty),
             mask=ok)


def flat_view(x: torch.Tensor):
    """x (N, C, *spatial) as (N, C, S), or None when its spatial dims do not share one
    stride (neither contiguous nor channels-last)."""
    N, C = x.shape[:2]
    S = x[0, 0].numel() if N and C else 0
    try:
        return x.view(N, C, S)
    except RuntimeError:
        return None


# Elements per tile and warps per program, as ptxas reports for sm_90 (bench/RESULTS.md):
# 2048 elements over 8 warps is 8 per thread (one 16-byte load for 16-bit types), ~40-80
# registers, so a full SM of warps stays resident to keep loads in flight.
_TILE = 2048
_WARPS = 8


def pick_tile(C: int, S: int, stride_c: int, stride_s: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_S) oriented along the unit stride, so that a warp reads whole lines.

    - Interpreter: 4 x 32 tiles, so that small test tensors span several tiles and chunks.
    - spatial stride 1 (NCDHW): 1 channel x 2048 positions; channels are whole rows apart.
    - channel stride 1 (channels-last): 64 channels (128 contiguous bytes in 16-bit types)
      x 32 positions; fewer channels when C is smaller.
    """
    if interpreting():
        return 4, 32
    if stride_s == 1 or stride_c != 1:
        return 1, min(_TILE, max(16, next_pow2(S)))
    bc = min(64, max(16, next_pow2(C)))
    return bc, _TILE // bc


def group_norm_partials(x: torch.Tensor, num_groups: int, out=None) -> torch.Tensor:
    """Per-group ``[sum x, sum x^2]`` of x (N, C, *spatial): (N, G, 2) fp64, the format of
    ``vinf.ops.group_norm_partials`` (sum x^2 formed as M2 + n*mean^2)."""
    xv = flat_view(x)
    N, C, S = xv.shape
    G = num_groups
    BLOCK_C, BLOCK_S = pick_tile(C, S, xv.stride(1), xv.stride(2))
    n_cblocks = triton.cdiv(C, BLOCK_C)
    # Spatial chunks: enough programs for ~8 waves of tiles over the SMs, whole tiles each.
    want = max(1, triton.cdiv(8 * num_sms(x.device), N * n_cblocks))
    chunk = triton.cdiv(triton.cdiv(max(S, 1), min(want, triton.cdiv(max(S, 1), BLOCK_S))),
                        BLOCK_S) * BLOCK_S
    n_chunks = triton.cdiv(max(S, 1), chunk)
    E = (C // G) * n_chunks
    stats = torch.empty((N * G, E, 3), dtype=torch.float32, device=x.device)
    if out is None:
        out = torch.empty((N, G, 2), dtype=torch.float64, device=x.device)
    if N == 0:
        return out
    _gn_stats_fwd[(N * n_cblocks * n_chunks,)](
        xv, stats, *xv.stride(), C, S, G, chunk, n_chunks, n_cblocks,
        BLOCK_C=BLOCK_C, BLOCK_S=BLOCK_S, num_warps=_WARPS)
    _gn_merge_fwd[(N * G,)](stats, out, E, BLOCK_E=min(1024, max(16, next_pow2(E))),
                            num_warps=4)
    return out


def group_norm_apply(x, mean, rstd, weight=None, bias=None, activation=None,
                     out=None) -> torch.Tensor:
    """``act((x - mean) * rstd * weight + bias)`` for x (N, C, *spatial), mean and rstd
    (N, G), weight and bias (C,) or None, activation None or "silu". Returns a tensor like x
    (same memory format when x is dense), math in fp32. ``out``: optional preallocated
    result, any strides whose spatial dims share one stride."""
    xv = flat_view(x)
    N, C, S = xv.shape
    G = mean.shape[1]
    y = torch.empty_like(x) if out is None else out
    yv = flat_view(y)
    if y.numel() == 0:
        return y
    BLOCK_C, BLOCK_S = pick_tile(C, S, xv.stride(1), xv.stride(2))
    n_cblocks, n_sblocks = triton.cdiv(C, BLOCK_C), triton.cdiv(S, BLOCK_S)
    mean, rstd = mean.contiguous(), rstd.contiguous()
    _gn_apply_fwd[(N * n_cblocks * n_sblocks,)](
        xv, yv, mean, rstd, weight.contiguous() if weight is not None else mean,
        bias.contiguous() if bias is not None else mean,
        *xv.stride(), *yv.stride(), C, S, G, n_sblocks, n_cblocks,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SILU=activation == "silu",
        BLOCK_C=BLOCK_C, BLOCK_S=BLOCK_S, num_warps=_WARPS)
    return y
