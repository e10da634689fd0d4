"""Backend selection: the reference on CPU, explicit overrides, clear errors."""
import pytest
import torch

import vinf_engine as vinf
from vinf_engine.ops import dispatch


def small():
    q = torch.randn(2, 3, 1, 4)
    k = torch.randn(2, 5, 1, 4)
    return q, k, k.clone()


def test_cpu_default_is_the_reference(monkeypatch):
    monkeypatch.delenv("VINF_BACKEND", raising=False)
    q, k, v = small()
    calls = []
    ref = dispatch._IMPLS["dual_scope_attention"]["reference"]
    monkeypatch.setitem(dispatch._IMPLS["dual_scope_attention"], "reference",
                        dispatch.Impl(lambda *a, **kw: calls.append(1) or ref.fn(*a, **kw), None))
    vinf.ops.dual_scope_attention(q, k, v, window=1, pad=1, valid_left=1, valid_right=1)
    assert calls == [1]


def test_bad_backend_name_is_a_value_error(monkeypatch):
    monkeypatch.setenv("VINF_BACKEND", "fastest")
    q, k, v = small()
    with pytest.raises(ValueError, match="VINF_BACKEND"):
        vinf.ops.dual_scope_attention(q, k, v, window=1, pad=1, valid_left=1, valid_right=1)


def test_forced_backend_that_cannot_run_is_a_value_error(monkeypatch):
    monkeypatch.setenv("VINF_BACKEND", "cuda")
    monkeypatch.setattr(dispatch, "_LOADED", True)        # nothing else gets registered
    monkeypatch.setitem(dispatch._IMPLS, "dual_scope_attention",
                        {"reference": dispatch._IMPLS["dual_scope_attention"]["reference"]})
    q, k, v = small()
    with pytest.raises(ValueError, match="no cuda implementation"):
        vinf.ops.dual_scope_attention(q, k, v, window=1, pad=1, valid_left=1, valid_right=1)
    monkeypatch.setitem(dispatch._IMPLS["dual_scope_attention"], "cuda",
                        dispatch.Impl(lambda *a, **k: None, lambda *a, **k: "head dim 4 < 64"))
    with pytest.raises(ValueError, match="head dim 4 < 64"):
        vinf.ops.dual_scope_attention(q, k, v, window=1, pad=1, valid_left=1, valid_right=1)


def test_register_rejects_unknown_backends():
    with pytest.raises(ValueError, match="backend"):
        dispatch.register("dual_scope_attention", "opencl", lambda: None)


def _fake_gpu(monkeypatch, backends):
    """An op whose backends are ``backends`` {name: (fn, supports)}, dispatched as if its
    tensors were on a GPU."""
    monkeypatch.setattr(dispatch, "_accelerated", lambda device: True)
    monkeypatch.setattr(dispatch, "_LOADED", True)
    monkeypatch.delenv("VINF_BACKEND", raising=False)
    impls = {"reference": dispatch.Impl(lambda x: ("reference", x), None)}
    impls.update({n: dispatch.Impl(fn, sup) for n, (fn, sup) in backends.items()})
    monkeypatch.setitem(dispatch._IMPLS, "fake", impls)
    monkeypatch.setattr(dispatch, "_FAILED", {})
    monkeypatch.setattr(dispatch, "_CHOSEN", {})


def test_the_choice_is_the_first_supported_backend_of_the_order(monkeypatch):
    # Deterministic: no timing; support is checked on every call, so the same key with
    # arguments one backend cannot take (here: x > 5) goes to the next one.
    _fake_gpu(monkeypatch, {
        "cuda": (lambda x: ("cuda", x), lambda x: "too large for shared memory" if x > 5 else None),
        "triton": (lambda x: ("triton", x), None)})
    assert [dispatch.call("fake", ("k",), x)[0] for x in (1, 9, 1)] == ["cuda", "triton", "cuda"]
    order = dispatch.choose("fake", ("k",), (9,), {})
    assert [n for n, _ in order] == ["triton", "reference"]
    assert "cuda: too large for shared memory" in order[0][1]
    assert dispatch.chosen() == {("fake", ("k",)): "cuda"}
    assert dispatch.failures() == []


def test_a_failing_backend_is_reported_and_not_used_again_for_that_shape(monkeypatch, caplog):
    calls = []

    def broken(x):
        calls.append(x)
        raise RuntimeError("launch failed: too many resources")
    _fake_gpu(monkeypatch, {"cuda": (broken, None), "triton": (lambda x: ("triton", x), None)})
    with caplog.at_level("WARNING", logger="vinf_engine.dispatch"):
        assert dispatch.call("fake", ("k",), 1) == ("triton", 1)
        assert dispatch.call("fake", ("k",), 2) == ("triton", 2)
    assert calls == [1]                                    # tried once for the key
    assert dispatch.call("fake", ("other",), 3) == ("triton", 3) and calls == [1, 3]
    got = dispatch.failures()
    assert len(got) == 2 and got[0]["op"] == "fake" and got[0]["backend"] == "cuda"
    assert "launch failed: too many resources" in got[0]["error"] and "'k'" in got[0]["key"]
    assert "the cuda backend of fake failed" in caplog.text
    assert dispatch.chosen()[("fake", ("k",))] == "triton"


def test_the_xformers_backend_builds_the_reference_mask(monkeypatch):
    # xformers is not installed here: a stand-in memory_efficient_attention (SDPA with the
    # given bias, xformers' (B, M, H, D) layout) checks the bias the backend builds.
    import sys
    import types
    from vinf_engine.ops import xformers_backend
    from vinf_engine.ops.attention import dual_scope_attention_reference
    from helpers import dual_scope_inputs

    def mea(q, k, v, attn_bias=None, scale=None):
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_bias,
            scale=scale)
        return o.transpose(1, 2)
    fake = types.ModuleType("xformers.ops")
    fake.memory_efficient_attention = mea
    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))
    monkeypatch.setitem(sys.modules, "xformers.ops", fake)
    (q, k, v, kg, vg), kw, _ = dual_scope_inputs((2, 5, 1, 2, 8, 2, 3, 1, 3, 3), torch.float32,
                                                 poison=float("nan"))
    got = xformers_backend.dual_scope_attention(q, k, v, kg, vg, local_bias=0.5,
                                                global_bias=-1.0, scale=0.3, **kw)
    ref = dual_scope_attention_reference(q, k, v, kg, vg, local_bias=0.5, global_bias=-1.0,
                                         scale=0.3, **kw)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert "tokens_per_frame 1 only" in xformers_backend.supports(q, k, v, tokens_per_frame=4)
    assert xformers_backend.STATUS.startswith("skipped: ") or torch.cuda.is_available()
