"""vinf.ops.dual_scope_attention against a reference written independently here (dense mask,
fp64), with poisoned halos, clip edges, 1-frame clips, tokens per frame > 1, no globals."""
import math

import pytest
import torch

import vinf_engine as vinf
from helpers import dual_scope_inputs
from vinf_engine.ops import attention as attention_mod


def naive_dual_scope(q, k, v, kg, vg, *, window, pad, valid_left, valid_right, T, local_bias,
                     global_bias, scale, dtype=torch.float64):
    """Dense-mask dual-scope attention in ``dtype``; invalid keys are zeroed before use."""
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    B, FT, H, D = q.shape
    F = FT // T
    L = k.shape[1]
    qf = torch.arange(FT) // T + pad
    kf = torch.arange(L) // T
    valid = (kf >= pad - valid_left) & (kf < pad + F + valid_right)
    allowed = ((kf[None, :] - qf[:, None]).abs() <= window) & valid[None, :]
    k = torch.where(valid[None, :, None, None], k, torch.zeros((), dtype=dtype))
    v = torch.where(valid[None, :, None, None], v, torch.zeros((), dtype=dtype))
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale + local_bias
    logits = logits.masked_fill(~allowed[None, None], -math.inf)
    vals = v
    if kg is not None:
        lg = torch.einsum("bqhd,bkhd->bhqk", q, kg.to(dtype)) * scale + global_bias
        logits = torch.cat([logits, lg], dim=-1)
        vals = torch.cat([v, vg.to(dtype)], dim=1)
    p = torch.softmax(logits, dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, vals)


# (B, F, T, H, D, window, pad, valid_left, valid_right, Ng)
CASES = {
    "interior": (3, 5, 1, 2, 8, 2, 3, 3, 3, 4),
    "video_start": (2, 4, 1, 2, 8, 3, 3, 0, 3, 2),
    "video_end": (2, 4, 1, 2, 8, 3, 3, 3, 0, 2),
    "whole_video": (2, 6, 1, 2, 8, 5, 5, 0, 0, 0),
    "one_frame_clip": (2, 1, 1, 2, 8, 2, 2, 1, 2, 3),
    "one_frame_video": (1, 1, 1, 1, 4, 0, 0, 0, 0, 0),
    "tokens_per_frame": (1, 3, 4, 2, 8, 1, 2, 2, 1, 5),
    "tokens_odd": (2, 5, 3, 1, 8, 2, 2, 1, 2, 3),
    "no_globals": (2, 5, 1, 3, 16, 2, 2, 2, 2, 0),
    "window_zero": (2, 5, 1, 1, 8, 0, 2, 1, 2, 3),
    "pad_zero": (2, 6, 3, 2, 8, 0, 0, 0, 0, 2),
    "half_halo": (2, 7, 2, 2, 8, 3, 4, 1, 4, 3),
}


def make(case, dtype, poison=float("nan"), seed=0):
    return dual_scope_inputs(case, dtype, poison=poison, seed=seed)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("poison", [float("nan"), 1e30])
def test_matches_independent_reference(name, poison):
    (q, k, v, kg, vg), kw, T = make(CASES[name], torch.float32, poison)
    out = vinf.ops.dual_scope_attention(q, k, v, kg, vg, tokens_per_frame=T, local_bias=0.7,
                                        global_bias=-0.4, **kw)
    ref = naive_dual_scope(q, k, v, kg, vg, T=T, local_bias=0.7, global_bias=-0.4,
                           scale=q.shape[-1] ** -0.5, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_fp64_is_exact_and_scale_is_used():
    (q, k, v, kg, vg), kw, T = make(CASES["tokens_odd"], torch.float64)
    out = vinf.ops.dual_scope_attention(q, k, v, kg, vg, tokens_per_frame=T, scale=0.3,
                                        local_bias=1.5, **kw)
    ref = naive_dual_scope(q, k, v, kg, vg, T=T, local_bias=1.5, global_bias=0.0, scale=0.3, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    default = vinf.ops.dual_scope_attention(q, k, v, kg, vg, tokens_per_frame=T, local_bias=1.5, **kw)
    assert not torch.allclose(out, default), "an explicit scale must change the result"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_naive_error(dtype):
    # FlashAttention's rule: error vs fp64 at most 2x that of a naive same-precision version.
    (q, k, v, kg, vg), kw, T = make(CASES["half_halo"], dtype)
    out = vinf.ops.dual_scope_attention(q, k, v, kg, vg, tokens_per_frame=T, **kw)
    args = dict(T=T, local_bias=0.0, global_bias=0.0, scale=q.shape[-1] ** -0.5, **kw)
    exact = naive_dual_scope(q, k, v, kg, vg, **args)
    naive = naive_dual_scope(q, k, v, kg, vg, dtype=dtype, **args)
    assert out.dtype == dtype
    err = (out.double() - exact).abs().max()
    naive_err = (naive.double() - exact).abs().max()
    assert err <= 2 * naive_err + 1e-3


def test_chunked_reference_matches(monkeypatch):
    # A tiny chunk budget forces many query-frame chunks with their own key slices.
    (q, k, v, kg, vg), kw, T = make(CASES["tokens_per_frame"], torch.float64)
    whole = vinf.ops.dual_scope_attention(q, k, v, kg, vg, tokens_per_frame=T, **kw)
    monkeypatch.setattr(attention_mod, "_REF_CHUNK_ELEMS", 64)
    chunked = vinf.ops.dual_scope_attention(q, k, v, kg, vg, tokens_per_frame=T, **kw)
    torch.testing.assert_close(chunked, whole, rtol=1e-13, atol=1e-13)


def test_global_bias_and_local_bias_shift_weight():
    (q, k, v, kg, vg), kw, T = make(CASES["interior"], torch.float64)
    base = vinf.ops.dual_scope_attention(q, k, v, kg, vg, **kw)
    to_global = vinf.ops.dual_scope_attention(q, k, v, kg, vg, global_bias=30.0, **kw)
    to_local = vinf.ops.dual_scope_attention(q, k, v, kg, vg, local_bias=30.0, **kw)
    # A huge global bias leaves (almost) only the global scope: the output becomes the
    # softmax over global keys alone.
    s = torch.einsum("bqhd,bkhd->bhqk", q, kg) * 8 ** -0.5
    want = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), vg)
    torch.testing.assert_close(to_global, want, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(to_local, base)
    assert not torch.allclose(to_local, to_global)


def good_args():
    (q, k, v, kg, vg), kw, T = make(CASES["interior"], torch.float32, seed=3)
    return dict(q=q, k=k, v=v, k_global=kg, v_global=vg, **kw)


BAD = [
    ("window", dict(window=4)),                      # > pad
    ("window", dict(window=-1)),
    ("window", dict(window=2.0)),
    ("valid_left", dict(valid_left=4)),
    ("valid_right", dict(valid_right=-1)),
    ("pad", dict(pad=-1)),
    ("tokens_per_frame", dict(tokens_per_frame=0)),
    ("tokens_per_frame", dict(tokens_per_frame=2)),  # 5 query tokens are not whole frames
    ("k must", dict(k="short")),
    ("v must", dict(v="wide")),
    ("k_global and v_global", dict(v_global=None)),
    ("k_global must", dict(k_global="heads")),
    ("v_global must", dict(v_global="len")),
    ("k has dtype", dict(k="f64")),
    ("q must be 4-D", dict(q="3d")),
    ("q must be a floating", dict(q="int")),
    ("scale", dict(scale=float("nan"))),
    ("local_bias", dict(local_bias=float("inf"))),
    ("global_bias", dict(global_bias="x")),
]


@pytest.mark.parametrize("needle,change", BAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD)])
def test_bad_arguments_raise_value_error_naming_them(needle, change):
    a = good_args()
    for key, val in change.items():
        if val == "short":
            a[key] = a[key][:, 1:]
        elif val == "wide":
            a[key] = torch.cat([a[key], a[key][..., :1]], dim=-1)
        elif val == "heads":
            a[key] = a[key][:, :, :1]
        elif val == "len":
            a[key] = a[key][:, 1:]
        elif val == "f64":
            a[key] = a[key].double()
        elif val == "3d":
            a[key] = a[key][0]
        elif val == "int":
            a[key] = a[key].long()
        else:
            a[key] = val
    q, k, v, kg, vg = (a.pop(n) for n in ("q", "k", "v", "k_global", "v_global"))
    with pytest.raises(ValueError, match=needle):
        vinf.ops.dual_scope_attention(q, k, v, kg, vg, **a)


@pytest.mark.parametrize("name", ["interior", "tokens_odd", "video_end"])
def test_lse_merges_disjoint_scopes_exactly(name):
    # Local-only and global-only partial results merged by their log-sum-exp equal the joint
    # softmax: what lets the engine attend locally while global frames are still in flight.
    (q, k, v, kg, vg), kw, T = make(CASES[name], torch.float64, poison=0.0)
    joint = vinf.ops.dual_scope_attention(q, k, v, kg, vg, tokens_per_frame=T, local_bias=0.3,
                                          global_bias=1.1, **kw)
    local, lse_l = vinf.ops.dual_scope_attention(q, k, v, tokens_per_frame=T, local_bias=0.3,
                                                 return_lse=True, **kw)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kg) * q.shape[-1] ** -0.5 + 1.1
    lse_g = torch.logsumexp(s, dim=-1)
    glob = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), vg)
    w_l = torch.sigmoid(lse_l.double() - lse_g).transpose(1, 2)[..., None]
    merged = w_l * local + (1 - w_l) * glob
    assert lse_l.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse_l.dtype == torch.float32
    torch.testing.assert_close(merged, joint, rtol=1e-6, atol=1e-6)


def test_attention_with_lse_reference_is_chunked_and_exact(monkeypatch):
    # The global scope of a DiT has tens of thousands of queries and keys: the reference
    # attends in query chunks of bounded logits; chunked equals one dense pass.
    from vinf_engine.ops import merge
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, n, 3, 8, generator=g, dtype=torch.float64) for n in (29, 11, 11))
    dense = merge.attention_with_lse_reference(q, k, v, 0.5, 1.0)
    monkeypatch.setattr(merge, "_REF_CHUNK_ELEMS", 2 * 3 * 11 * 4)       # 4 queries a chunk
    chunked = merge.attention_with_lse_reference(q, k, v, 0.5, 1.0)
    torch.testing.assert_close(chunked, dense, rtol=1e-12, atol=1e-12)
    s = torch.einsum("blhd,bnhd->bhln", q, k) * 0.5 + 1.0
    torch.testing.assert_close(chunked[0], torch.einsum("bhln,bnhd->blhd", s.softmax(-1), v))
    torch.testing.assert_close(chunked[1].double(), torch.logsumexp(s, -1), rtol=1e-6, atol=1e-6)
    out, lse = vinf.ops.attention_with_lse(q, k, v, scale=0.5, bias=1.0)
    torch.testing.assert_close((out, lse), dense, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="k is torch.float32"):
        vinf.ops.attention_with_lse(q, k.float(), v, scale=0.5)


@pytest.mark.parametrize("name", ["interior", "tokens_odd", "no_globals", "one_frame_clip"])
@pytest.mark.parametrize("return_lse", [False, True])
def test_tensor_biases_one_per_row_match_reference(name, return_lse):
    # Biases as graph data (torch.compile, CUDA graphs): one (local, global) pair per row of
    # q, each row's output equal to the independent reference at that row's biases; the lse
    # equal to the float path's at those biases.
    (q, k, v, kg, vg), kw, T = make(CASES[name], torch.float32)
    B = q.shape[0]
    lb = torch.linspace(-1.0, 2.0, B)
    gb = torch.linspace(1.5, -0.5, B)
    got = vinf.ops.dual_scope_attention(q, k, v, kg, vg, tokens_per_frame=T, local_bias=lb,
                                        global_bias=gb, return_lse=return_lse, **kw)
    out, lse = got if return_lse else (got, None)
    assert out.shape == q.shape and out.dtype == q.dtype
    for b in range(B):
        part = [t[b:b + 1] if t is not None else None for t in (q, k, v, kg, vg)]
        ref = naive_dual_scope(*part, T=T, local_bias=float(lb[b]), global_bias=float(gb[b]),
                               scale=q.shape[-1] ** -0.5, **kw)
        torch.testing.assert_close(out[b:b + 1].double(), ref, rtol=1e-5, atol=1e-5)
        if return_lse:
            _, want = vinf.ops.dual_scope_attention(
                *part, tokens_per_frame=T, local_bias=float(lb[b]), global_bias=float(gb[b]),
                return_lse=True, **kw)
            torch.testing.assert_close(lse[b:b + 1], want, rtol=1e-5, atol=1e-5)


def test_tensor_bias_of_one_value_and_attention_with_lse():
    (q, k, v, kg, vg), kw, T = make(CASES["interior"], torch.float64)
    flt = vinf.ops.dual_scope_attention(q, k, v, kg, vg, local_bias=0.7, global_bias=-0.4, **kw)
    ten = vinf.ops.dual_scope_attention(q, k, v, kg, vg, local_bias=torch.tensor(0.7),
                                        global_bias=torch.tensor([-0.4]), **kw)
    # the scopes merge by their lse, which is fp32 whatever the inputs (fp64 here)
    torch.testing.assert_close(ten, flt, rtol=1e-6, atol=1e-6)
    o1, l1 = vinf.ops.attention_with_lse(q, kg, vg, bias=1.25)
    o2, l2 = vinf.ops.attention_with_lse(q, kg, vg, bias=torch.full((q.shape[0],), 1.25))
    torch.testing.assert_close(o2, o1, rtol=0, atol=0)
    torch.testing.assert_close(l2, l1, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bias,needle", [
    (torch.zeros(2), r"one per row \(3,\)"),           # 3 rows of q
    (torch.zeros(3, 1), "got shape"),
    (torch.zeros(3, dtype=torch.bool), "real tensor"),
    (torch.zeros(3, device="meta"), "is on meta"),
])
def test_bad_tensor_biases_raise_naming_them(bias, needle):
    a = good_args()
    q, k, v, kg, vg = (a.pop(n) for n in ("q", "k", "v", "k_global", "v_global"))
    for name in ("local_bias", "global_bias"):
        with pytest.raises(ValueError, match=name + ".*" + needle):
            vinf.ops.dual_scope_attention(q, k, v, kg, vg, **a, **{name: bias})
    with pytest.raises(ValueError, match="bias.*" + needle):
        vinf.ops.attention_with_lse(q, kg, vg, bias=bias)


# (B, F, T, H, D, window, left, right, Ng): bands, full windows dense (with and without a
# halo, with and without globals), a window wider than the video
WINDOW_CASES = {
    "band": (2, 6, 1, 2, 8, 2, 1, 2, 3),
    "band_tokens": (1, 5, 3, 2, 8, 1, 1, 0, 2),
    "full_with_halo": (2, 3, 1, 2, 8, 4, 2, 1, 0),
    "full_with_halo_globals": (2, 3, 2, 2, 8, 4, 2, 1, 3),
    "full_own_keys_globals": (2, 4, 2, 2, 8, 9, 0, 0, 3),
    "full_own_keys": (2, 4, 3, 1, 8, 3, 0, 0, 0),
    "one_frame": (2, 1, 2, 2, 8, 0, 0, 0, 2),
}


@pytest.mark.parametrize("name", list(WINDOW_CASES))
@pytest.mark.parametrize("return_lse", [False, True])
def test_window_attention_takes_its_window_past_the_padding(name, return_lse):
    """``window_attention`` over unpadded keys equals the independent dense-mask reference of
    the same keys padded to the window (nothing of the padding read: its frames hold NaN)."""
    B, F, T, H, D, w, left, right, Ng = WINDOW_CASES[name]
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, F * T, H, D, generator=g)
    k = torch.randn(B, (left + F + right) * T, H, D, generator=g)
    v = torch.randn(B, (left + F + right) * T, H, D, generator=g)
    kg = torch.randn(B, Ng, H, D, generator=g) if Ng else None
    vg = torch.randn(B, Ng, H, D, generator=g) if Ng else None
    got = vinf.ops.window_attention(q, k, v, kg, vg, window=w, left=left, right=right,
                                    tokens_per_frame=T, local_bias=0.3, global_bias=-0.2,
                                    return_lse=return_lse)
    nan = lambda n: torch.full((B, n * T, H, D), float("nan"))    # noqa: E731
    kp = torch.cat([nan(w - left), k, nan(w - right)], dim=1)
    vp = torch.cat([nan(w - left), v, nan(w - right)], dim=1)
    ref = naive_dual_scope(q, kp, vp, kg, vg, window=w, pad=w, valid_left=left,
                           valid_right=right, T=T, local_bias=0.3, global_bias=-0.2,
                           scale=D ** -0.5)
    out = got[0] if return_lse else got
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    if return_lse:
        band = vinf.ops.dual_scope_attention(q, kp.nan_to_num(0.0), vp.nan_to_num(0.0), kg, vg,
                                             window=w, pad=w, valid_left=left, valid_right=right,
                                             tokens_per_frame=T, local_bias=0.3,
                                             global_bias=-0.2, return_lse=True)
        torch.testing.assert_close(got[1], band[1], rtol=1e-5, atol=1e-5)


def test_window_attention_bad_arguments():
    q = torch.randn(1, 3, 1, 4)
    k = torch.randn(1, 5, 1, 4)
    with pytest.raises(ValueError, match="left=3 halo frames is more than the window 2"):
        vinf.ops.window_attention(q, k, k, window=2, left=3, right=0)
    with pytest.raises(ValueError, match="must hold 4"):
        vinf.ops.window_attention(q, k, k, window=2, left=1, right=0)
