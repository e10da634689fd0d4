"""The Triton GroupNorm kernels against the reference, under the CPU interpreter or on a GPU:
contiguous and channels-last, groups whose size is not a multiple of the tile, a spatial size
of 1, a large mean over a small spread, and NaN-filled outputs so that unwritten ones show."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import vinf_engine as vinf
from vinf_engine.kernels import group_norm as gn
from vinf_engine.ops import dispatch
from vinf_engine.ops.group_norm import (group_norm_apply_reference, group_norm_finalize,
                                        group_norm_partials_reference)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
NAN = float("nan")

# (shape, groups): 5-D video, 3-D, 4-D, spatial size 1, 5 channels per group over 189 positions
SHAPES = [((2, 8, 5, 3, 4), 4), ((1, 6, 7), 3), ((3, 12, 3, 5), 12), ((2, 8, 1, 1, 1), 2),
          ((1, 40, 3, 7, 9), 8)]


def make(shape, dtype, layout, mean=1.0, std=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * std + mean).to(DEV, dtype)
    if layout == "channels_last":
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
        assert x.stride(1) == 1 or x.shape[1] == 1
    return x


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,groups", SHAPES)
def test_partials_match_reference(shape, groups, dtype, layout):
    x = make(shape, dtype, layout)
    out = torch.full((shape[0], groups, 2), NAN, dtype=torch.float64, device=DEV)
    got = gn.group_norm_partials(x, groups, out=out)
    want, n = group_norm_partials_reference(x, groups)
    assert got.data_ptr() == out.data_ptr() and torch.isfinite(got).all()
    # Sums of x carry fp32 rounding of the tile means; sums of squares likewise.
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-4 * n)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_partials_keep_the_variance_at_large_mean(layout):
    # |mean|/std = 600: one fp32 sum of squares would lose the variance entirely.
    x = make((2, 8, 6, 5, 7), torch.float32, layout, mean=300.0, std=0.5, seed=3)
    got = gn.group_norm_partials(x, 4)
    want, n = group_norm_partials_reference(x, 4)
    mean_g, rstd_g = group_norm_finalize(got, n, 1e-5)
    mean_w, rstd_w = group_norm_finalize(want, n, 1e-5)
    torch.testing.assert_close(mean_g, mean_w, rtol=0, atol=1e-5)
    torch.testing.assert_close(rstd_g, rstd_w, rtol=1e-4, atol=0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("affine,activation", [(True, "silu"), (False, None)])
@pytest.mark.parametrize("shape,groups", SHAPES[::2] + SHAPES[4:])
def test_apply_matches_reference(shape, groups, affine, activation, dtype, layout):
    x = make(shape, dtype, layout)
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(shape[0], groups, generator=g, dtype=torch.float64).to(DEV)
    rstd = torch.rand(shape[0], groups, generator=g, dtype=torch.float64).to(DEV) + 0.2
    w = torch.randn(shape[1], generator=g).to(DEV) if affine else None
    b = torch.randn(shape[1], generator=g).to(DEV) if affine else None
    out = torch.full_like(x, NAN)
    got = gn.group_norm_apply(x, mean, rstd, w, b, activation, out=out)
    want = group_norm_apply_reference(x, mean, rstd, w, b, activation)
    assert got.data_ptr() == out.data_ptr() and torch.isfinite(got).all()
    atol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-5, atol=atol)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_group_norm_on_the_kernels_equals_torch(monkeypatch, layout):
    monkeypatch.setenv("VINF_BACKEND", "triton")
    x = make((2, 12, 4, 5, 3), torch.float32, layout, mean=-2.0)
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(12, generator=g).to(DEV), torch.randn(12, generator=g).to(DEV)
    calls = []
    real = dispatch._IMPLS["group_norm_apply"]["triton"]
    monkeypatch.setitem(dispatch._IMPLS["group_norm_apply"], "triton", dispatch.Impl(
        lambda *a, **k: calls.append(1) or real.fn(*a, **k), real.supports))
    y = vinf.ops.group_norm(x, 3, w, b, activation="silu")
    assert calls == [1]
    want = F.silu(F.group_norm(x.double(), 3, w.double(), b.double()))
    torch.testing.assert_close(y.double(), want, rtol=0, atol=2e-5)
    assert y.stride() == x.stride(), "the result keeps x's memory format"


def test_strides_the_kernels_cannot_take(monkeypatch):
    x = torch.randn(2, 8, 4, 6, device=DEV)[..., :3]           # spatial dims: no single stride
    assert gn.flat_view(x) is None
    want = F.group_norm(x, 4)
    monkeypatch.delenv("VINF_BACKEND", raising=False)
    if DEV == "cpu":                                             # auto on CPU: the reference
        torch.testing.assert_close(vinf.ops.group_norm(x, 4), want)
    monkeypatch.setenv("VINF_BACKEND", "triton")
    with pytest.raises(ValueError, match="x has strides"):
        vinf.ops.group_norm(x, 4)
    monkeypatch.setenv("VINF_BACKEND", "triton")
    with pytest.raises(ValueError, match="x has dtype torch.float64"):
        vinf.ops.group_norm(x.double().contiguous(), 4)


# ------------------------------------------------------------------ GPU only
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gpu_bf16_spec_shape(layout):
    x = make((2, 320, 16, 40, 64), torch.bfloat16, layout)
    w = torch.randn(320, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(320, device="cuda", dtype=torch.bfloat16)
    partials = gn.group_norm_partials(x, 32)
    want, n = group_norm_partials_reference(x, 32)
    torch.testing.assert_close(partials, want, rtol=1e-6, atol=1e-4 * n)
    mean, rstd = group_norm_finalize(partials, n, 1e-5)
    y = gn.group_norm_apply(x, mean, rstd, w, b, "silu")
    exact = F.silu(F.group_norm(x.double(), 32, w.double(), b.double()))
    naive = F.silu(F.group_norm(x, 32, w, b))                   # torch in bf16
    err = (y.double() - exact).abs().max()
    assert err <= 2 * (naive.double() - exact).abs().max() + 1e-3
    assert y.stride() == x.stride()


@gpu
def test_gpu_torch_compile_fullgraph_and_cuda_graph(monkeypatch):
    monkeypatch.setenv("VINF_BACKEND", "triton")
    x = make((2, 64, 8, 16, 16), torch.bfloat16, "channels_last")
    w = torch.randn(64, device="cuda", dtype=torch.bfloat16)

    def f(x):
        return vinf.ops.group_norm(x, 8, w, None, activation="silu") + 1

    want = f(x)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), want)
    static = x.clone()
    f(static)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = f(static)
    x2 = make((2, 64, 8, 16, 16), torch.bfloat16, "channels_last", seed=7)
    static.copy_(x2)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, f(x2), rtol=0, atol=0)
