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
