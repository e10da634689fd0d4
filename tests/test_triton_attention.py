"""The Triton dual-scope attention kernels against the reference, under the CPU interpreter
(TRITON_INTERPRET=1, set in conftest) or on a GPU: clip edges, empty halos, 1-frame clips, no
globals, window 0, sizes that are not multiples of the tiles, NaN in every key the mask hides,
and NaN in the output buffers so that an unwritten output shows."""

import pytest
import torch

pytest.importorskip("triton")

import vinf_engine as vinf
from helpers import dual_scope_inputs
from test_attention_op import naive_dual_scope
from vinf_engine import kernels
from vinf_engine.kernels import dit_attention as dit
from vinf_engine.kernels import temporal_attention as temporal
from vinf_engine.ops.attention import dual_scope_attention_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"
NAN = float("nan")

# (B, F, T, H, D, window, pad, valid_left, valid_right, Ng)
CASES = {
    "interior": (3, 5, 1, 2, 8, 2, 3, 3, 3, 4),
    "video_start": (2, 4, 1, 2, 8, 3, 3, 0, 3, 2),
    "video_end": (2, 4, 1, 2, 8, 3, 3, 3, 0, 2),
    "empty_halos": (2, 6, 1, 2, 8, 2, 2, 0, 0, 3),
    "one_frame_clip": (2, 1, 1, 2, 8, 2, 2, 1, 2, 3),
    "one_frame_video": (1, 1, 1, 1, 4, 0, 0, 0, 0, 0),
    "no_globals": (2, 5, 1, 3, 16, 2, 2, 2, 2, 0),
    "window_zero": (2, 5, 1, 1, 8, 0, 2, 1, 2, 3),
    "odd_sizes": (1, 37, 1, 2, 24, 4, 5, 5, 2, 19),      # 3 query blocks, D 24, 19 globals
    "many_heads": (5, 3, 1, 7, 8, 1, 1, 1, 1, 2),        # 35 sequences: a partial pack
    "tokens": (1, 3, 4, 2, 8, 1, 2, 2, 1, 5),
    "tokens_odd": (2, 5, 3, 1, 8, 2, 2, 1, 2, 3),
    "tokens_long": (1, 4, 40, 1, 16, 1, 1, 1, 0, 0),     # frames longer than a key tile
    "tokens_globals": (1, 2, 9, 1, 8, 1, 1, 1, 1, 37),
    "tokens_window_zero": (1, 3, 7, 2, 8, 0, 1, 0, 1, 4),
    # A full window on one process: the clip as one frame of F*T tokens (clip_attention)
    "one_frame_of_tokens": (2, 1, 45, 2, 8, 0, 0, 0, 0, 3),
}
T1 = [n for n, c in CASES.items() if c[2] == 1]


def make(case, dtype, seed=0):
    """Inputs of ``case`` with NaN in every key/value frame that does not exist."""
    tensors, kw, T = dual_scope_inputs(case, dtype, poison=NAN, seed=seed, device=DEV)
    return tensors, dict(kw, tokens_per_frame=T, local_bias=0.7, global_bias=-0.4)


def tol(dtype):
    return dict(rtol=0, atol=2e-5) if dtype == torch.float32 else dict(rtol=0, atol=3e-3)


def poisoned_outputs(q):
    B, FT, H, D = q.shape
    out = torch.full((B, FT, H, D), NAN, dtype=q.dtype, device=q.device)
    lse = torch.full((B, H, FT), NAN, dtype=torch.float32, device=q.device)
    return out, lse


def check_against_reference(run, name, dtype):
    (q, k, v, kg, vg), kw = make(CASES[name], dtype)
    out, lse = poisoned_outputs(q)
    got, got_lse = run(q, k, v, kg, vg, kw, out, lse)
    assert got.data_ptr() == out.data_ptr() and got_lse.data_ptr() == lse.data_ptr()
    want, want_lse = dual_scope_attention_reference(q, k, v, kg, vg, return_lse=True, **kw)
    assert torch.isfinite(got).all(), "an output was left unwritten or a masked key leaked"
    assert torch.isfinite(got_lse).all()
    torch.testing.assert_close(got.float(), want.float(), **tol(dtype))
    torch.testing.assert_close(got_lse, want_lse, rtol=0, atol=1e-4)


def run_temporal(blocks=None):
    def run(q, k, v, kg, vg, kw, out, lse):
        kw = dict(kw, scale=q.shape[-1] ** -0.5, return_lse=True)
        kw.pop("tokens_per_frame")
        return temporal.temporal_attention(q, k, v, kg, vg, blocks=blocks, out=out, lse=lse, **kw)
    return run


def run_dit(q, k, v, kg, vg, kw, out, lse):
    return dit.dit_attention(q, k, v, kg, vg, scale=q.shape[-1] ** -0.5, return_lse=True,
                             out=out, lse=lse, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", T1)
def test_temporal_kernel(name, dtype):
    check_against_reference(run_temporal(), name, dtype)


@pytest.mark.parametrize("name", ["interior", "video_end", "odd_sizes", "many_heads"])
def test_temporal_kernel_packs_sequences_and_query_blocks(name):
    # 4 sequences per program and 16-frame query blocks: partial packs and partial blocks.
    B, F, T, H, D, w, *_ = CASES[name]
    blocks = dict(SEQ=4, BLOCK_F=16, BLOCK_K=max(16, 1 << (min(16, F) + 2 * w - 1).bit_length()))
    check_against_reference(run_temporal(blocks), name, torch.float32)


# fp16 on the cases whose tiles differ most; fp32 on all.
FP16_DIT = ["interior", "empty_halos", "odd_sizes", "tokens_odd", "tokens_long", "tokens_globals"]


@pytest.mark.parametrize("name,dtype", [(n, torch.float32) for n in CASES]
                         + [(n, torch.float16) for n in FP16_DIT])
def test_dit_kernel(name, dtype):
    check_against_reference(run_dit, name, dtype)


def test_temporal_blocks_cover_the_band():
    # The one-pass kernel's key tile must hold a query block's whole band.
    for F in (1, 5, 16, 17, 40, 64, 100):
        for w in (0, 1, 4, 8, 20):
            for Ng in (0, 3, 16, 40):
                b = temporal.pick_blocks(5 * 2560, F, w, Ng, 64, 132)
                assert b["BLOCK_K"] >= min(b["BLOCK_F"], F) + 2 * w
                assert b["BLOCK_G"] >= Ng and b["SEQ"] >= 1
    (q, k, v, kg, vg), kw = make(CASES["odd_sizes"], torch.float32)   # band of 16 + 2*4
    with pytest.raises(ValueError, match="BLOCK_K"):
        run_temporal(dict(BLOCK_F=16, BLOCK_K=16))(q, k, v, kg, vg, kw, *poisoned_outputs(q))


def test_wide_window_goes_to_the_flash_kernel(monkeypatch):
    # A band wider than the one-pass tile: the router must hand T == 1 to the flash kernel.
    case = (1, 2, 1, 1, 8, 121, 121, 121, 3, 2)
    (q, k, v, kg, vg), kw = make(case, torch.float32)
    assert "window 121" in temporal.fits(q, k, v, kg, vg, 121)
    calls = []
    real = dit.dit_attention
    monkeypatch.setattr(dit, "dit_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = kernels.dual_scope_attention(q, k, v, kg, vg, **kw)
    assert calls == [1]
    want = dual_scope_attention_reference(q, k, v, kg, vg, **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


def test_reads_projection_views_without_copies():
    # The engine's layout: (B, F, H, D) views of one fused (B, F, 3*H*D) projection output,
    # plus a (B, H, F, D) tensor seen as (B, F, H, D): neither is contiguous.
    B, F, H, D, w, pad, Ng = 3, 6, 2, 16, 2, 2, 4
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(B, F + 2 * pad, 3 * H * D, generator=g).to(DEV)
    q = qkv[:, pad:pad + F, :H * D].unflatten(-1, (H, D))
    k = qkv[:, :, H * D:2 * H * D].unflatten(-1, (H, D))
    v = torch.randn(B, H, F + 2 * pad, D, generator=g).to(DEV).transpose(1, 2)
    kg = torch.randn(B, Ng, H, D, generator=g).to(DEV)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    kw = dict(window=w, pad=pad, valid_left=1, valid_right=2)
    got = kernels.dual_scope_attention(q, k, v, kg, kg, **kw)
    want = dual_scope_attention_reference(q, k, v, kg, kg, **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    got, _ = dit.dit_attention(q, k, v, kg, kg, tokens_per_frame=1, local_bias=0.0,
                               global_bias=0.0, scale=D ** -0.5, return_lse=False, **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


def test_dispatch_runs_the_kernel_when_forced(monkeypatch):
    monkeypatch.setenv("VINF_BACKEND", "triton")
    (q, k, v, kg, vg), kw = make(CASES["tokens_odd"], torch.float32)
    calls = []
    real = dit.dit_attention
    monkeypatch.setattr(dit, "dit_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    got, lse = vinf.ops.dual_scope_attention(q, k, v, kg, vg, return_lse=True, **kw)
    want, want_lse = dual_scope_attention_reference(q, k, v, kg, vg, return_lse=True, **kw)
    assert calls == [1]
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype,needle", [(torch.float64, "q has dtype torch.float64"),
                                          (torch.bfloat16, "q is bfloat16")])
def test_forced_kernel_refuses_what_it_cannot_compute(monkeypatch, dtype, needle):
    if dtype == torch.bfloat16 and DEV == "cuda":
        pytest.skip("bf16 runs on a GPU")
    monkeypatch.setenv("VINF_BACKEND", "triton")
    (q, k, v, kg, vg), kw = make(CASES["interior"], dtype)
    with pytest.raises(ValueError, match=needle):
        vinf.ops.dual_scope_attention(q, k, v, kg, vg, **kw)


def test_lse_merges_local_and_global_exactly():
    # Local-only and global-only kernel results merged by their lse equal the joint softmax.
    (q, k, v, kg, vg), kw = make(CASES["odd_sizes"], torch.float32)
    joint = kernels.dual_scope_attention(q, k, v, kg, vg, **kw)
    local, lse_l = kernels.dual_scope_attention(q, k, v, return_lse=True, **kw)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), kg.double()) * q.shape[-1] ** -0.5 - 0.4
    glob = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), vg.double())
    w_l = torch.sigmoid(lse_l.double() - torch.logsumexp(s, -1)).transpose(1, 2)[..., None]
    torch.testing.assert_close((w_l * local.double() + (1 - w_l) * glob).float(), joint,
                               rtol=0, atol=2e-5)


@pytest.mark.parametrize("shape", [(2, 37, 3, 24, 19), (1, 5, 1, 8, 1), (3, 70, 2, 16, 45)])
def test_global_attention_kernel(shape):
    # The DiT kernel with its local scope off: every query against N keys, with lse; NaN in
    # the output buffers would show an unwritten row (out and lse come from torch.empty).
    from vinf_engine.ops.merge import attention_with_lse_reference
    B, L, H, D, N = shape
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(B, n, H, D, generator=g).to(DEV) for n in (L, N, N))
    out, lse = kernels.attention_with_lse(q, k, v, 0.3, -0.6)
    ref, ref_lse = attention_with_lse_reference(q.double(), k.double(), v.double(), 0.3, -0.6)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=0, atol=2e-5)
    s = torch.einsum("blhd,bnhd->bhln", q.double(), k.double()) * 0.3 - 0.6   # naive, dense
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=0, atol=2e-5)


# ------------------------------------------------------------------ GPU only
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@pytest.mark.parametrize("name", ["interior", "odd_sizes", "empty_halos", "tokens_odd",
                                  "tokens_long", "tokens_globals"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_low_precision_within_twice_naive_error(name, dtype):
    # FlashAttention's rule: error vs fp64 at most 2x a naive same-precision version + eps.
    (q, k, v, kg, vg), kw = make(CASES[name], dtype, seed=5)
    T = kw.pop("tokens_per_frame")
    args = dict(T=T, scale=q.shape[-1] ** -0.5, **kw)
    k0, v0 = torch.nan_to_num(k), torch.nan_to_num(v)    # the naive version reads every key
    cpu = [None if t is None else t.cpu() for t in (q, k0, v0, kg, vg)]
    exact = naive_dual_scope(*cpu, **args)                     # fp64; masks built on CPU
    naive = naive_dual_scope(*cpu, dtype=dtype, **args)
    got = kernels.dual_scope_attention(q, k, v, kg, vg, tokens_per_frame=T, **kw)
    err = (got.double().cpu() - exact).abs().max()
    naive_err = (naive.double().cpu() - exact).abs().max()
    assert err <= 2 * naive_err + 1e-3, (err, naive_err)


@gpu
@pytest.mark.heavy
def test_gpu_large_batch_uses_64bit_offsets():
    # 4.4M sequences (grid axis 0 far past 65,535) and k with 2.25e9 elements: the last
    # sequences sit past 2**31 elements, which 32-bit offsets would wrap.
    B, F, H, D, pad = 2_200_000, 2, 2, 128, 1
    q = torch.randn(B, F, H, D, device="cuda", dtype=torch.float16)
    k = torch.randn(B, F + 2 * pad, H, D, device="cuda", dtype=torch.float16)
    kw = dict(window=1, pad=pad, valid_left=1, valid_right=1)
    got = kernels.dual_scope_attention(q, k, k, **kw)
    want = dual_scope_attention_reference(q[-64:], k[-64:], k[-64:], **kw)
    torch.testing.assert_close(got[-64:], want, rtol=0, atol=3e-3)


@gpu
def test_gpu_torch_compile_fullgraph_and_cuda_graph(monkeypatch):
    monkeypatch.setenv("VINF_BACKEND", "triton")
    (q, k, v, kg, vg), kw = make(CASES["odd_sizes"], torch.bfloat16)

    def f(q, k, v, kg, vg):
        return vinf.ops.dual_scope_attention(q, k, v, kg, vg, **kw) * 2

    want = f(q, k, v, kg, vg)
    got = torch.compile(f, fullgraph=True)(q, k, v, kg, vg)
    torch.testing.assert_close(got, want)
    static = [t.clone() for t in (q, k, v, kg, vg)]
    f(*static)                                  # compile the kernels before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = f(*static)
    (q2, k2, v2, kg2, vg2), _ = make(CASES["odd_sizes"], torch.bfloat16, seed=9)
    for dst, src in zip(static, (q2, k2, v2, kg2, vg2)):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, f(q2, k2, v2, kg2, vg2), rtol=0, atol=0)
