"""The engine's own calls reach the kernels: GroupNorm of the permuted (B, C, F, H, W) views
the UNet's temporal layers make (frame-major memory), and a whole parallelized UNet3D forward
with every op forced onto the Triton kernels (their CPU interpreter here)."""
import pytest
import torch

import vinf_engine as vinf
from helpers import rel_err, tiny_unet, unet_inputs
from vinf_engine.ops import dispatch
from vinf_engine.ops.group_norm import (frame_major, group_norm_apply, group_norm_finalize,
                                        group_norm_apply_reference, group_norm_partials,
                                        group_norm_partials_reference)

pytest.importorskip("triton")

DEV = "cuda" if torch.cuda.is_available() else "cpu"     # CPU: the Triton interpreter


def _counting(monkeypatch, ops):
    calls = []
    for op in ops:
        impl = dispatch.implementations(op)["triton"]
        monkeypatch.setitem(dispatch._IMPLS[op], "triton", dispatch.Impl(
            lambda *a, _f=impl.fn, _op=op, **k: calls.append(_op) or _f(*a, **k), impl.supports))
    return calls


@pytest.mark.parametrize("channels_last", [False, True])
def test_frame_major_group_norm_runs_the_kernels(monkeypatch, channels_last):
    g = torch.Generator().manual_seed(0)
    frames = (torch.randn(2 * 3, 8, 5, 6, generator=g) * 3 + 1.5).to(DEV)     # (B*F, C, H, W)
    if channels_last:
        frames = frames.to(memory_format=torch.channels_last)
    x = frames.reshape(2, 3, 8, 5, 6).permute(0, 2, 1, 3, 4)        # (B, C, F, H, W) view
    # Channels-last frames permuted are channels-last 3-D already (one spatial stride):
    # the kernels read them as they are; contiguous frames permuted need the fold.
    assert (frame_major(x) is None) == channels_last and frame_major(x.contiguous()) is None
    ref_p, n = group_norm_partials_reference(x.contiguous(), 4)
    calls = _counting(monkeypatch, ("group_norm_partials", "group_norm_apply"))
    monkeypatch.setenv("VINF_BACKEND", "triton")
    p, count = group_norm_partials(x, 4)
    assert count == n and torch.allclose(p, ref_p, rtol=1e-6, atol=1e-6)   # fp32 tile sums
    mean, rstd = group_norm_finalize(p, count, 1e-5)
    w, b = torch.randn(8, generator=g).to(DEV), torch.randn(8, generator=g).to(DEV)
    y = group_norm_apply(x, mean, rstd, w, b, "silu")
    ref = group_norm_apply_reference(x.contiguous(), mean, rstd, w, b, "silu")
    assert y.stride() == x.stride()                        # the input's layout, no copy
    torch.testing.assert_close(y, ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(y, torch.nn.functional.silu(torch.nn.functional.group_norm(
        x.contiguous(), 4, w, b, 1e-5)), rtol=0, atol=2e-5)
    assert calls == ["group_norm_partials", "group_norm_apply"]


def triton_forward_rank(rank, world, backend):
    """This rank's clip of a parallelized tiny UNet3D forward with VINF_BACKEND=backend,
    and which kernels ran."""
    import os
    os.environ["VINF_BACKEND"] = backend
    calls, saved = [], {}
    if backend == "triton":
        for op in ("dual_scope_attention", "group_norm_partials", "group_norm_apply"):
            impl = saved[op] = dispatch.implementations(op)["triton"]
            dispatch._IMPLS[op]["triton"] = dispatch.Impl(
                lambda *a, _f=impl.fn, _op=op, **k: calls.append(_op) or _f(*a, **k), impl.supports)
    try:
        model = tiny_unet().to(DEV)
        x, ctx = (t.to(DEV) for t in unet_inputs(4, batch=1, hw=4))
        vinf.parallelize(model, vinf.DualScopeConfig(window=2, num_global=2))
        with torch.no_grad():
            out = model(x[:, :, 2 * rank:2 * rank + 2], 900, encoder_hidden_states=ctx).sample
    finally:                        # the rank outlives the call (a pool): leave no wrappers
        for op, impl in saved.items():
            dispatch._IMPLS[op]["triton"] = impl
    return out.cpu(), sorted(set(calls))


def test_a_whole_unet_forward_on_the_triton_kernels():
    # Two ranks (on one process the stock GroupNorm runs): the engine's own GroupNorms of the
    # permuted views and its attention all on the Triton kernels, equal to the reference path.
    from helpers import run_ranks
    ref = run_ranks(triton_forward_rank, 2, "reference")
    got = run_ranks(triton_forward_rank, 2, "triton")
    for r in got:
        assert r[1] == ["dual_scope_attention", "group_norm_apply", "group_norm_partials"]
    out = torch.cat([r[0] for r in got], dim=2)
    assert rel_err(out, torch.cat([r[0] for r in ref], dim=2)) <= 1e-5
