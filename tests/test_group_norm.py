"""vinf.ops.group_norm: equal to F.group_norm on the whole video, across real gloo ranks."""
import pytest
import torch
import torch.nn.functional as F

import vinf_engine as vinf
from helpers import run_ranks
from workers import gn_video, group_norm_rank


@pytest.mark.parametrize("shape,groups", [((2, 8, 5, 3, 4), 4), ((1, 6, 7), 3), ((3, 4, 1, 1, 1), 2),
                                          ((2, 12, 3, 5), 12)])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_local_matches_torch(shape, groups, activation):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 3 + 1
    w = torch.randn(shape[1], generator=g)
    b = torch.randn(shape[1], generator=g)
    out = vinf.ops.group_norm(x, groups, w, b, eps=1e-6, activation=activation)
    ref = F.group_norm(x.double(), groups, w.double(), b.double(), eps=1e-6)
    if activation == "silu":
        ref = F.silu(ref)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_large_mean_small_std_is_accurate():
    x, w, b = gn_video(9)
    out = vinf.ops.group_norm(x, 4, w, b)
    ref = F.group_norm(x.double(), 4, w.double(), b.double())
    # Inputs near 100 carry ~4e-6 of fp32 rounding; over std 0.5 that is ~1e-5 normalised.
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=5e-5)


def test_bf16_input_keeps_dtype():
    x = torch.randn(2, 8, 3, 4, 4).bfloat16()
    out = vinf.ops.group_norm(x, 4, activation="silu")
    assert out.dtype == torch.bfloat16
    ref = F.silu(F.group_norm(x.float(), 4))
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("sizes", [(5, 4), (1, 4, 2), (2, 2, 2, 1)])
def test_distributed_equals_whole_video(sizes):
    results = run_ranks(group_norm_rank, len(sizes), sizes)
    x, w, b = gn_video(sum(sizes))
    ref = F.silu(F.group_norm(x.double(), 4, w.double(), b.double(), eps=1e-5))
    out = torch.cat([r[0] for r in results], dim=2)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=5e-5)
    # Per-clip statistics would be visibly wrong: the test can tell.
    clipwise = torch.cat([vinf.ops.group_norm(c, 4, w, b, activation="silu")
                          for c in x.split(list(sizes), dim=2)], dim=2)
    assert (clipwise.double() - ref).abs().max() > 1e-2
    errs = [r[1] for r in results]
    assert all(e is not None and "disagree" in e for e in errs), errs


BAD = [
    ("num_groups", dict(num_groups=3)),
    ("num_groups", dict(num_groups=0)),
    ("weight", dict(weight=torch.ones(5))),
    ("bias", dict(bias=torch.ones(8, 1))),
    ("activation", dict(activation="relu")),
    ("eps", dict(eps=0.0)),
    ("x must be", dict(x=torch.ones(8))),
    ("x must be a floating", dict(x=torch.ones(2, 8, 3, dtype=torch.long))),
]


@pytest.mark.parametrize("needle,change", BAD)
def test_bad_arguments(needle, change):
    args = dict(x=torch.randn(2, 8, 3), num_groups=4, weight=None, bias=None, eps=1e-5,
                activation=None)
    args.update(change)
    x = args.pop("x")
    act = args.pop("activation")
    with pytest.raises(ValueError, match=needle):
        vinf.ops.group_norm(x, **args, activation=act)


def test_reference_partials_of_a_large_input_in_chunks(monkeypatch):
    # Past the chunk size the reference sums along dim 2 in slices (its fp64 copies
    # bounded): the same partials to fp64 rounding, on a permuted (non-contiguous) input.
    import importlib
    gn = importlib.import_module("vinf_engine.ops.group_norm")
    x = torch.randn(2, 64, 40, 12, 14, generator=torch.Generator().manual_seed(3))
    x = x.permute(0, 1, 2, 4, 3)
    whole, n = gn.group_norm_partials_reference(x, 8)
    monkeypatch.setattr(gn, "_PARTIALS_CHUNK_ELEMS", 5000)
    parts, m = gn.group_norm_partials_reference(x, 8)
    assert m == n == 8 * 40 * 12 * 14
    want = torch.stack([x.reshape(2, 8, -1).double().sum(-1),
                        x.reshape(2, 8, -1).double().square().sum(-1)], dim=-1)
    assert float(((parts - want).abs() / want.abs()).max()) < 1e-13
    assert float(((parts - whole).abs() / whole.abs()).max()) < 1e-13
