"""The ops as torch.library custom ops: schemas and fake implementations that torch.compile
accepts (torch.library.opcheck), whole-graph tracing, and gradients through the reference."""
import pytest
import torch

import vinf_engine as vinf
from test_triton_attention import CASES, make
from vinf_engine.ops.attention import dual_scope_attention_reference


def attention_args(name="tokens_odd", dtype=torch.float32):
    (q, k, v, kg, vg), kw = make(CASES[name], dtype)
    k, v = torch.nan_to_num(k), torch.nan_to_num(v)      # opcheck differentiates every input
    return (q, k, v, kg, vg, kw["window"], kw["pad"], kw["valid_left"], kw["valid_right"],
            kw["tokens_per_frame"], 0.7, -0.4, q.shape[-1] ** -0.5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("return_lse", [False, True])
def test_opcheck_attention(monkeypatch, backend, return_lse):
    monkeypatch.setenv("VINF_BACKEND", backend)
    args = attention_args() + (return_lse,)
    torch.library.opcheck(torch.ops.vinf.dual_scope_attention.default, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck_group_norm(monkeypatch, backend, layout):
    monkeypatch.setenv("VINF_BACKEND", backend)
    x = torch.randn(2, 8, 3, 4, 5)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last_3d)
    mean, rstd = torch.randn(2, 4, dtype=torch.float64), torch.rand(2, 4, dtype=torch.float64)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(torch.ops.vinf.group_norm_partials.default, (x, 4), test_utils=utils)
    torch.library.opcheck(torch.ops.vinf.group_norm_apply.default,
                          (x, mean, rstd, torch.randn(8), None, "silu"), test_utils=utils)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compile_fullgraph(monkeypatch, backend):
    # aot_eager: the whole graph is traced with the fake implementations, without a compiler.
    monkeypatch.setenv("VINF_BACKEND", backend)
    (q, k, v, kg, vg), kw = make(CASES["interior"], torch.float32)
    x = torch.randn(2, 8, 3, 4, 5).to(memory_format=torch.channels_last_3d)

    def f(q, k, v, kg, vg, x):
        a, lse = vinf.ops.dual_scope_attention(q, k, v, kg, vg, return_lse=True, **kw)
        return a * 2, lse + 1, vinf.ops.group_norm(x, 4, activation="silu") - 1

    want = f(q, k, v, kg, vg, x)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, kg, vg, x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
        assert g.stride() == w.stride()


def test_gradients_recompute_the_reference():
    (q, k, v, kg, vg), kw = make(CASES["tokens_odd"], torch.float64)
    k, v = torch.nan_to_num(k), torch.nan_to_num(v)
    ins = [t.clone().requires_grad_() for t in (q, k, v, kg, vg)]
    ref = [t.clone().requires_grad_() for t in (q, k, v, kg, vg)]
    out, lse = vinf.ops.dual_scope_attention(*ins, return_lse=True, **kw)
    r_out, r_lse = dual_scope_attention_reference(*ref, return_lse=True, **kw)
    g = torch.randn_like(out)
    ((out * g).sum() + lse.sum()).backward()
    ((r_out * g).sum() + r_lse.sum()).backward()
    for a, b in zip(ins, ref):
        torch.testing.assert_close(a.grad, b.grad)
    # Keys past the video's ends get no gradient: they are never read.
    kf = torch.arange(k.shape[1]) // kw["tokens_per_frame"]
    hidden = (kf < kw["pad"] - kw["valid_left"])
    assert hidden.any() and not ins[1].grad[:, hidden].any()

    x = torch.randn(2, 6, 5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    y = vinf.ops.group_norm(x, 3, w, None, activation="silu")
    gx, gw = torch.autograd.grad(y.square().sum(), (x, w))
    ref_y = torch.nn.functional.silu(torch.nn.functional.group_norm(x, 3, w))
    rx, rw = torch.autograd.grad(ref_y.square().sum(), (x, w))
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)


def test_a_top_level_kernels_import_registers_nothing(monkeypatch):
    # transformers imports any importable package named `kernels` to read its version; from
    # the repository root that is this directory. It must not replace the registered backend.
    import importlib
    import os
    import sys
    from vinf_engine.ops import dispatch
    import vinf_engine.kernels  # noqa: F401 - the real registration
    before = {op: dispatch._IMPLS[op]["triton"] for op in
              ("dual_scope_attention", "group_norm_partials", "group_norm_apply")}
    monkeypatch.syspath_prepend(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for name in [m for m in sys.modules if m == "kernels" or m.startswith("kernels.")]:
        monkeypatch.delitem(sys.modules, name)
    top = importlib.import_module("kernels")
    assert top.__file__.endswith(os.path.join("kernels", "__init__.py"))
    for op, impl in before.items():
        assert dispatch._IMPLS[op]["triton"] is impl, op
