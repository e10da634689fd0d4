"""The CUDA kernels against the references, on a GPU (skipped without one).

Tolerance rule (FlashAttention's): the kernel's max error against an fp64 reference is at most
twice the error of a naive implementation in the kernel's own precision, plus a small epsilon.
Outputs are pre-filled with NaN (an unwritten element shows), and key/value frames outside the
valid halo are NaN (a leaking mask shows).
"""
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F_

import vinf_engine as vinf
from vinf_engine.ops import cuda_backend as cb
from vinf_engine.ops import dispatch
from vinf_engine.ops.attention import dual_scope_attention_reference
from vinf_engine.ops.group_norm import (group_norm_apply_reference, group_norm_finalize,
                                        group_norm_partials_reference)

_C = pytest.importorskip("vinf_engine._C")
pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and _C.with_cuda),
                                reason="needs a CUDA GPU and vinf_engine._C built with CUDA")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
EPS = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}
NAN = float("nan")


def _free_gib():
    return torch.cuda.mem_get_info()[0] / 2 ** 30 if torch.cuda.is_available() else 0.0


# ---- dual-scope attention ---------------------------------------------------------------------

#              (B,  H,  F, pad, window, valid_left, valid_right, Ng)
ATTN_CASES = {
    "spec16":             (64, 8, 16, 4, 4, 4, 4, 8),      # SPEC: 16 frames, 24 local + 8 global
    "spec64":             (8, 8, 64, 8, 8, 8, 8, 16),      # SPEC: 64 frames, 80 local + 16 global
    "one_frame":          (5, 3, 1, 0, 0, 0, 0, 0),
    "one_frame_halo":     (5, 3, 1, 2, 2, 1, 2, 3),
    "empty_halos":        (7, 2, 20, 3, 2, 0, 0, 4),       # a clip alone in the video
    "no_globals_window0": (6, 4, 17, 2, 0, 2, 1, 0),
    "odd_sizes":          (3, 5, 33, 5, 5, 1, 5, 17),      # nothing a multiple of 16
    "left_video_end":     (4, 2, 7, 4, 3, 0, 4, 1),
    "128_keys":           (2, 4, 64, 24, 24, 24, 24, 16),  # 112 local + 16 global keys
}


def attn_inputs(case, dtype, D, seed=0):
    B, H, F, pad, _, _, _, ng = case
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device="cuda").to(dtype)

    q, k, v = rnd(B, F, H, D), rnd(B, F + 2 * pad, H, D), rnd(B, F + 2 * pad, H, D)
    kg, vg = (rnd(B, ng, H, D), rnd(B, ng, H, D)) if ng else (None, None)
    return q, k, v, kg, vg


def attn_kwargs(case):
    _, _, _, pad, w, vl, vr, ng = case
    return dict(window=w, pad=pad, valid_left=vl, valid_right=vr, local_bias=0.5,
                global_bias=1.5 if ng else 0.0, scale=None)


def poison_halo(t, F, pad, vl, vr):
    """NaN in the key/value frames beyond the video's ends, which must never be read."""
    t = t.clone()
    t[:, :pad - vl] = NAN
    t[:, pad + F + vr:] = NAN
    return t


def naive_attention(q, k, v, kg, vg, *, window, pad, valid_left, valid_right, local_bias,
                    global_bias, scale):
    """Concatenated K/V and a dense mask, every step in q's dtype (the tolerance yardstick)."""
    B, F, H, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    i = torch.arange(F, device=q.device)[:, None] + pad
    j = torch.arange(k.shape[1], device=q.device)[None, :]
    ok = ((j - i).abs() <= window) & (j >= pad - valid_left) & (j < pad + F + valid_right)
    bias = torch.full(ok.shape, local_bias, dtype=q.dtype, device=q.device)
    if kg is not None:
        ng = kg.shape[1]
        kt, vt = torch.cat([kt, kg.transpose(1, 2)], 2), torch.cat([vt, vg.transpose(1, 2)], 2)
        ok = torch.cat([ok, ok.new_ones(F, ng)], 1)
        bias = torch.cat([bias, bias.new_full((F, ng), global_bias)], 1)
    s = ((qt @ kt.transpose(-1, -2)) * scale + bias).masked_fill(~ok, float("-inf"))
    return (torch.softmax(s, -1) @ vt).transpose(1, 2)


def _double(*ts):
    return [None if t is None else t.double() for t in ts]


def check_attention(q, k, v, kg, vg, kw, out, lse=None):
    """FlashAttention's rule for out, and lse to fp32 accuracy; k/v here are the clean ones."""
    ref, ref_lse = dual_scope_attention_reference(*_double(q, k, v, kg, vg), return_lse=True, **kw)
    naive = naive_attention(q, k, v, kg, vg, **kw)
    assert torch.isfinite(out).all(), "unwritten (NaN) or non-finite outputs"
    err = (out.double() - ref).abs().max().item()
    err_naive = (naive.double() - ref).abs().max().item()
    assert err <= 2 * err_naive + EPS[q.dtype], (err, err_naive)
    if lse is not None:
        assert torch.isfinite(lse).all()
        lse_err = (lse.double() - ref_lse.double()).abs().max().item()
        assert lse_err <= 1e-4 * (1 + ref_lse.abs().max().item()), lse_err


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_attention_matches_reference(case, D, dtype):
    c = ATTN_CASES[case]
    B, H, F, pad, _, vl, vr, _ = c
    q, k, v, kg, vg = attn_inputs(c, dtype, D)
    kw = attn_kwargs(c)
    kp, vp = poison_halo(k, F, pad, vl, vr), poison_halo(v, F, pad, vl, vr)
    why = cb.dual_scope_attention_supports(q, kp, vp, kg, vg, **kw)
    if why is not None and "shared memory" in why:       # e.g. fp32 x 128 keys on an A100
        pytest.skip(why)
    assert why is None
    out = torch.full((B, F, H, D), NAN, dtype=dtype, device="cuda")
    lse = torch.full((B, H, F), NAN, dtype=torch.float32, device="cuda")
    cb._dual_scope_attention_into(out, lse, q, kp, vp, kg, vg, **kw)
    check_attention(q, k, v, kg, vg, kw, out, lse)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attention_reads_fused_qkv_views(dtype):
    """q/k/v as strided views of one projection output (B, L, 3, H, D): no copies needed."""
    B, H, F, pad, D = 32, 4, 16, 4, 64
    qkv = torch.randn(B, F + 2 * pad, 3, H, D, device="cuda").to(dtype)
    q, k, v = qkv[:, pad:pad + F, 0], qkv[:, :, 1], qkv[:, :, 2]
    kw = dict(window=3, pad=pad, valid_left=pad, valid_right=2, local_bias=0.0, global_bias=0.0,
              scale=0.1)
    assert cb.dual_scope_attention_supports(q, k, v, **kw) is None
    out = cb.dual_scope_attention(q, k, v, **kw)
    assert torch.equal(out, cb.dual_scope_attention(q.contiguous(), k.contiguous(),
                                                    v.contiguous(), **kw))
    check_attention(q, k, v, None, None, kw, out)


def test_attention_grid_past_65535_ctas():
    # 280,000 sequences at 4 per CTA: 70,000 CTAs on grid axis x
    c = (280_000, 1, 2, 1, 1, 1, 1, 0)
    q, k, v, kg, vg = attn_inputs(c, torch.bfloat16, 64)
    kw = attn_kwargs(c)
    out = cb.dual_scope_attention(q, k, v, kg, vg, **kw)
    check_attention(q, k, v, kg, vg, kw, out)


@pytest.mark.heavy
@pytest.mark.skipif(_free_gib() < 40, reason="needs ~20 GiB of free GPU memory")
def test_attention_offsets_past_2_pow_31_elements():
    B, F, H, D, pad = (1 << 31) // (16 * 64) + 64, 16, 1, 64, 1
    q = torch.empty(B, F, H, D, device="cuda", dtype=torch.bfloat16)
    k = torch.empty(B, F + 2 * pad, H, D, device="cuda", dtype=torch.bfloat16)
    v = torch.empty_like(k)
    for t in (q, k, v):                 # only the checked tail needs data
        t[-64:].normal_()
    kw = dict(window=1, pad=pad, valid_left=1, valid_right=1, local_bias=0.0, global_bias=0.0,
              scale=None)
    out = cb.dual_scope_attention(q, k, v, **kw)
    check_attention(q[-64:], k[-64:], v[-64:], None, None, kw, out[-64:])
    del q, k, v, out
    torch.cuda.empty_cache()


def test_attention_supports_says_why_not():
    q, k, v, _, _ = attn_inputs((2, 2, 4, 1, 1, 1, 1, 0), torch.bfloat16, 64)
    kw = dict(window=1, pad=1, valid_left=1, valid_right=1)
    assert "tokens_per_frame" in cb.dual_scope_attention_supports(q, k, v, tokens_per_frame=2, **kw)
    q80 = torch.randn(2, 4, 2, 80, device="cuda", dtype=torch.bfloat16)
    k80 = torch.randn(2, 6, 2, 80, device="cuda", dtype=torch.bfloat16)
    assert "head dim" in cb.dual_scope_attention_supports(q80, k80, k80, **kw)
    odd = torch.randn(2, 4, 2, 65, device="cuda", dtype=torch.bfloat16)[..., 1:]
    assert "16-byte" in cb.dual_scope_attention_supports(odd, k, v, **kw)
    assert "dtype" in cb.dual_scope_attention_supports(q.double(), k.double(), v.double(), **kw)
    assert "CUDA" in cb.dual_scope_attention_supports(q.cpu(), k.cpu(), v.cpu(), **kw)


def test_attention_bad_arguments_are_value_errors():
    q, k, v, _, _ = attn_inputs((2, 2, 4, 1, 1, 1, 1, 0), torch.bfloat16, 64)
    odd = torch.randn(2, 4, 2, 65, device="cuda", dtype=torch.bfloat16)[..., 1:]
    with pytest.raises(ValueError, match="16-byte"):
        cb.dual_scope_attention(odd, k, v, window=1, pad=1, valid_left=1, valid_right=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attention_through_the_public_op(monkeypatch, dtype):
    c = ATTN_CASES["spec16"]
    q, k, v, kg, vg = attn_inputs(c, dtype, 64, seed=3)
    kw = attn_kwargs(c)
    direct, direct_lse = cb.dual_scope_attention(q, k, v, kg, vg, return_lse=True, **kw)
    monkeypatch.setenv("VINF_BACKEND", "cuda")
    out, lse = vinf.ops.dual_scope_attention(q, k, v, kg, vg, return_lse=True, **kw)
    assert torch.equal(out, direct) and torch.equal(lse, direct_lse)
    monkeypatch.setenv("VINF_BACKEND", "auto")        # the first backend of dispatch.ORDER that supports it
    check_attention(q, k, v, kg, vg, kw, vinf.ops.dual_scope_attention(q, k, v, kg, vg, **kw))
    assert any(op == "dual_scope_attention" for op, _ in dispatch.chosen())


def test_attention_launch_failure_is_an_exception_naming_the_op():
    # 2,000 frames do not fit one CTA's shared memory: the kernel's opt-in to more shared
    # memory fails, and that CUDA error surfaces as RuntimeError naming the op.
    q = torch.randn(1, 2000, 1, 128, device="cuda", dtype=torch.bfloat16)
    kw = dict(window=0, pad=0, valid_left=0, valid_right=0)
    assert "shared memory" in cb.dual_scope_attention_supports(q, q, q, **kw)
    with pytest.raises(RuntimeError, match=r"vinf_engine\._C\.dual_scope_attention: .* failed: cuda"):
        cb.dual_scope_attention(q, q, q, **kw)
    # the error was cleared: the next launch is healthy
    c = ATTN_CASES["one_frame_halo"]
    q, k, v, kg, vg = attn_inputs(c, torch.bfloat16, 64)
    check_attention(q, k, v, kg, vg, attn_kwargs(c), cb.dual_scope_attention(q, k, v, kg, vg, **attn_kwargs(c)))


def test_a_device_fault_surfaces_as_the_next_launchs_exception():
    """A kernel that faults leaves the context broken; the next launch's status check must
    raise (naming the op) rather than let the caller continue. Run apart: the fault is fatal to
    the process's CUDA context."""
    code = textwrap.dedent("""
        import time, torch
        from vinf_engine.ops import cuda_backend as cb
        x = torch.randn(2, 64, 4, 8, 8, device="cuda", dtype=torch.bfloat16)
        y = torch.empty_like(x)
        mean = torch.zeros(2, 32, device="cuda", dtype=torch.float64)
        rstd = torch.ones_like(mean)
        idx = x.device.index
        sm = cb._device_props(idx)[0]
        stream = torch.cuda.current_stream().cuda_stream
        # x at address 256: unmapped, the kernel faults asynchronously
        cb._C.group_norm_apply(256, 256, 2, 2, 64, 256, 32, False, (mean.data_ptr(), 32, 1, 0),
                               (rstd.data_ptr(), 32, 1, 0), 3, (0, 0, 0), (0, 0, 0), False, sm,
                               stream, idx)
        time.sleep(2)
        try:
            cb._group_norm_apply_into(y, x, mean, rstd)
            print("NO ERROR")
        except RuntimeError as e:
            print("RAISED:", e)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "RAISED: vinf_engine._C.group_norm_apply:" in res.stdout, res.stdout + res.stderr


# ---- GroupNorm --------------------------------------------------------------------------------

GN_SHAPES = [
    ((2, 64, 5, 7, 9), 32),        # S = 315: no 16-byte vectors in the contiguous layout
    ((1, 320, 3, 40, 64), 32),     # the UNet's first width, C / G = 10 (vectors span groups)
    ((2, 40, 1, 1, 1), 4),         # S = 1
    ((3, 24, 2, 3, 3), 6),
    ((2, 30, 2, 5, 5), 3),         # C = 30: scalar channels-last path
    ((2, 1280, 4, 5, 8), 32),      # the widest UNet level
]
LAYOUTS = ["contiguous", "channels_last"]


def make_x(shape, dtype, layout, scale=2.0, offset=3.0, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(shape, generator=g, device="cuda") * scale + offset).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last_3d)
    assert cb.gn_layout(x) in (layout, "contiguous")     # size-1 dims make both true
    return x


def stats(partials, n):
    s1, s2 = partials[..., 0], partials[..., 1]
    mean = s1 / n
    return mean, s2 / n - mean.square()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape_g", GN_SHAPES, ids=lambda s: "x".join(map(str, s[0])))
def test_group_norm_partials_match_fp64(shape_g, layout, dtype):
    shape, G = shape_g
    x = make_x(shape, dtype, layout)
    assert cb.group_norm_partials_supports(x, G) is None
    out = torch.full((shape[0], G, 2), NAN, dtype=torch.float64, device="cuda")
    cb._group_norm_partials_into(out, x, G)
    ref, n = group_norm_partials_reference(x.double(), G)
    assert cb.group_norm_partials(x, G)[1] == n
    assert torch.isfinite(out).all()
    m, var = stats(out, n)
    m_ref, var_ref = stats(ref, n)
    assert ((m - m_ref).abs() <= 1e-6 * (m_ref.abs() + var_ref.sqrt())).all()
    assert ((var - var_ref).abs() <= 1e-5 * var_ref + 1e-12).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_group_norm_partials_robust_to_a_large_mean(layout):
    # |mean| / std = 1e3 in fp32: a pivot-shifted accumulation keeps the variance
    x = make_x((2, 320, 4, 16, 16), torch.float32, layout, scale=1.0, offset=1000.0)
    part, n = cb.group_norm_partials(x, 32)
    m, var = stats(part, n)
    m_ref, var_ref = stats(group_norm_partials_reference(x.double(), 32)[0], n)
    assert ((var - var_ref).abs() <= 1e-4 * var_ref).all()
    assert ((m - m_ref).abs() <= 1e-6 * var_ref.sqrt()).all()


def naive_apply(x, mean, rstd, w, b, activation):
    """Every step in x's dtype (the tolerance yardstick)."""
    dt, (N, C), G = x.dtype, x.shape[:2], mean.shape[1]
    y = (x.reshape(N, G, -1) - mean.to(dt)[..., None]) * rstd.to(dt)[..., None]
    y = y.reshape(N, C, -1)
    if w is not None:
        y = y * w.to(dt)[:, None]
    if b is not None:
        y = y + b.to(dt)[:, None]
    if activation == "silu":
        y = F_.silu(y)
    return y.reshape(x.shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape_g", GN_SHAPES, ids=lambda s: "x".join(map(str, s[0])))
@pytest.mark.parametrize("affine", ["none", "fp32", "same"])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_group_norm_apply_matches_reference(activation, affine, shape_g, layout, dtype):
    shape, G = shape_g
    C = shape[1]
    x = make_x(shape, dtype, layout)
    mean, rstd = group_norm_finalize(*group_norm_partials_reference(x.double(), G), 1e-5)
    w = b = None
    if affine != "none":
        wdt = torch.float32 if affine == "fp32" else dtype
        w = (torch.randn(C, device="cuda") + 1).to(wdt)
        b = torch.randn(C, device="cuda").to(wdt)
    assert cb.group_norm_apply_supports(x, mean, rstd, w, b, activation) is None
    y = torch.full_like(x, NAN)
    cb._group_norm_apply_into(y, x, mean, rstd, w, b, activation)
    assert y.stride() == x.stride() and torch.isfinite(y).all()
    ref = group_norm_apply_reference(x.double(), mean, rstd, *_double(w, b), activation)
    err = (y.double() - ref).abs().max().item()
    err_naive = (naive_apply(x, mean, rstd, w, b, activation).double() - ref).abs().max().item()
    assert err <= 2 * err_naive + EPS[dtype], (err, err_naive)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_group_norm_op_through_the_dispatcher(monkeypatch, layout, dtype):
    x = make_x((2, 320, 4, 40, 64), dtype, layout)
    w = torch.randn(320, device="cuda") + 1
    b = torch.randn(320, device="cuda")
    ref = F_.silu(F_.group_norm(x.double(), 32, w.double(), b.double(), 1e-5))
    naive = F_.silu(F_.group_norm(x, 32, w.to(dtype), b.to(dtype), 1e-5))
    err_naive = (naive.double() - ref).abs().max().item()
    for backend in ("cuda", "auto"):
        monkeypatch.setenv("VINF_BACKEND", backend)
        y = vinf.ops.group_norm(x, 32, w, b, eps=1e-5, activation="silu")
        assert y.stride() == x.stride()
        assert (y.double() - ref).abs().max().item() <= 2 * err_naive + EPS[dtype]


def test_group_norm_supports_says_why_not():
    x = make_x((2, 64, 3, 4, 5), torch.bfloat16, "contiguous")
    assert "contiguous or channels-last" in cb.group_norm_partials_supports(x.transpose(3, 4), 32)
    assert "dtype" in cb.group_norm_partials_supports(x.double(), 32)
    mean = torch.zeros(2, 32, device="cuda", dtype=torch.float64)
    assert "activation" in cb.group_norm_apply_supports(x, mean, mean, activation="gelu")
    assert "mean" in cb.group_norm_apply_supports(x, mean.half(), mean.half())
    wide = torch.randn(1, 8200, 2, 2, device="cuda", dtype=torch.bfloat16)
    wide = wide.to(memory_format=torch.channels_last)
    assert "channels-last C" in cb.group_norm_partials_supports(wide, 8200 // 8)


@pytest.mark.heavy
@pytest.mark.skipif(_free_gib() < 60, reason="needs ~45 GiB of free GPU memory")
def test_group_norm_offsets_past_2_pow_31_elements():
    x = torch.randn(2, 64, (1 << 24) + 8, device="cuda", dtype=torch.bfloat16)  # 2.1e9 elements
    part, n = cb.group_norm_partials(x, 32)
    m, var = stats(part, n)
    m_ref, var_ref = stats(group_norm_partials_reference(x, 32)[0], n)
    assert ((var - var_ref).abs() <= 1e-5 * var_ref).all()
    assert ((m - m_ref).abs() <= 1e-5 * var_ref.sqrt()).all()
    mean, rstd = group_norm_finalize(part, n, 1e-5)
    y = cb.group_norm_apply(x, mean, rstd, activation="silu")
    tail = (slice(None), slice(None), slice(-4096, None))
    ref = group_norm_apply_reference(x[tail].double(), mean, rstd, activation="silu")
    assert ((y[tail].double() - ref).abs() <= 2 ** -8 * (1 + ref.abs())).all()   # bf16 rounding
