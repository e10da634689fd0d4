"""Adapter conformance, for every registered model family: exact mode equals the stock model,
partition invariance on 1-4 real gloo ranks (uneven splits, a 1-frame clip, a window wider
than a neighbour's clip, both bias phases), unparallelize restores the model, and bad input
is refused the same way on every rank."""
import copy

import pytest
import torch

import vinf_engine as vinf
from families import (FAMILIES, FRAMES, SPLITS, TIMESTEPS, conformance_rank, modes_at,
                      stock_outputs)
from helpers import rel_err, run_ranks

_RUNS: dict = {}


def _outputs(world):
    """Every family's concatenated outputs on ``world`` ranks, one spawn per world size."""
    if world not in _RUNS:
        names = tuple(FAMILIES)
        if world == 1:
            results = [conformance_rank(0, 1, SPLITS[1], names, False)]
        else:
            results = run_ranks(conformance_rank, world, SPLITS[world], names, world == 2,
                                timeout=300)
        cat = {}
        for key in results[0]:
            if key[1] == "refusals":
                cat[key] = [r[key] for r in results]
            else:
                cat[key] = torch.cat([r[key] for r in results], dim=2)
        _RUNS[world] = cat
    return _RUNS[world]


@pytest.fixture(scope="module")
def stock():
    return {name: stock_outputs(name) for name in FAMILIES}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_partition_invariance(family, world, stock):
    spec = FAMILIES[family]
    one, many = _outputs(1), _outputs(world)
    for cname in spec.configs:
        for t in TIMESTEPS:
            ref = one[family, cname, t, "overlap"]
            for mode in modes_at(spec, world):
                out = many[family, cname, t, mode]
                assert out.shape == ref.shape
                assert rel_err(out, ref) <= 1e-5, (cname, t, mode, rel_err(out, ref))
    # The comparisons are not between identical things: dual scope differs from full
    # attention, the global scope and the bias phase matter.
    d = lambda a, b: rel_err(one[family, a[0], a[1], "overlap"], one[family, b[0], b[1], "overlap"])
    assert rel_err(one[family, "dual", 900, "overlap"], stock[family][900]) > 1e-3
    assert d(("dual", 900), ("dual_no_global", 900)) > 1e-3
    assert d(("dual", 900), ("dual", 100)) > 1e-3


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("world", [1, 3])
def test_exact_mode_equals_the_stock_model(family, world, stock):
    for t in TIMESTEPS:
        out = _outputs(world)[family, "exact", t, "overlap"]
        assert rel_err(out, stock[family][t]) <= 1e-5, (t, rel_err(out, stock[family][t]))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_unparallelize_restores_the_model(family, stock):
    spec = FAMILIES[family]
    model = spec.model()
    before_sd = copy.deepcopy(model.state_dict())
    classes = {n: type(m) for n, m in model.named_modules()}
    procs = {n: type(m.processor) for n, m in model.named_modules() if hasattr(m, "processor")}
    hooks = {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()}
    vinf.parallelize(model, vinf.DualScopeConfig(window=2))
    assert set(model.state_dict()) == set(before_sd)
    assert {n: type(m) for n, m in model.named_modules()} != classes or procs != {
        n: type(m.processor) for n, m in model.named_modules() if hasattr(m, "processor")}
    vinf.unparallelize(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert {n: type(m.processor) for n, m in model.named_modules() if hasattr(m, "processor")} == procs
    assert {n: (len(m._forward_pre_hooks), len(m._forward_hooks))
            for n, m in model.named_modules()} == hooks
    assert all(not k.startswith("_vinf") for m in model.modules() for k in vars(m))
    sd = model.state_dict()
    assert all(torch.equal(sd[k], before_sd[k]) for k in before_sd)
    x, extra = spec.inputs(FRAMES)
    with torch.no_grad():
        # bitwise: unpatched, it is the stock model again, running the same operations
        assert torch.equal(spec.call(model, x, 900, extra), stock[family][900])
    with pytest.raises(ValueError, match="not parallelized"):
        vinf.unparallelize(model)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bad_input_fails_on_every_rank(family):
    results = _outputs(2)[family, "refusals"]
    expected = {
        "not_a_family": "rank 1: vinf_engine.parallelize has no model family for Linear; "
                        "registered families: ",
        "config": "different config",
        "config_type": "rank 1: config must be a vinf_engine.DualScopeConfig",
        "resolution": "disagree on the clip's (batch, channels, height, width)",
        "no_frames": "hold no frames",
        "timestep": "disagree on the clip's timestep",
        "twice": "already parallelized",
    }
    for rank, res in enumerate(results):
        for key, needle in expected.items():
            assert res[key] is not None and needle in res[key], (rank, key, res[key])
        assert res["unpatched"]
    # After the refusals the engine still works, and agrees with one process.
    spec = FAMILIES[family]
    single = spec.model()
    vinf.parallelize(single, vinf.DualScopeConfig(window=2, num_global=2))
    x, extra = spec.inputs(FRAMES)
    with torch.no_grad():
        ref = spec.call(single, x, 10, extra)
    out = torch.cat([r["after"] for r in results], dim=2)
    assert rel_err(out, ref) <= 1e-5


def test_the_registry_resolves_along_the_mro_and_lists_families():
    from diffusers import UNet3DConditionModel
    from vinf_engine.models import adapter_for, families
    from vinf_engine.models.unet3d import UNet3DAdapter
    from vinf_engine.models.videocrafter2 import VideoCrafter2UNet3DConditionModel
    from vinf_engine.models.ltx import LTXAdapter
    from vinf_engine.models.wan import WanAdapter
    names = families()
    assert any("UNet3DConditionModel" in c for c in names.values())
    assert any("WanTransformer3DModel" in c for c in names.values())
    assert any("CogVideoXTransformer3DModel" in c for c in names.values())
    assert issubclass(VideoCrafter2UNet3DConditionModel, UNet3DConditionModel)
    vc2 = VideoCrafter2UNet3DConditionModel(**{**__import__("helpers").TINY_UNET})
    assert isinstance(adapter_for(vc2), UNet3DAdapter)
    assert isinstance(adapter_for(FAMILIES["wan"].model()), WanAdapter)
    from vinf_engine.models.cogvideox import CogVideoXAdapter
    assert isinstance(adapter_for(FAMILIES["cogvideox"].model()), CogVideoXAdapter)
    assert isinstance(adapter_for(FAMILIES["ltx"].model()), LTXAdapter)
    assert any("LTXVideoTransformer3DModel" in c for c in names.values())
    msg = adapter_for(torch.nn.Conv2d(2, 2, 1))
    assert isinstance(msg, str) and "Conv2d" in msg and "Wan" in msg and "UNet3D" in msg


def test_a_family_refuses_comm_modes_it_does_not_run():
    with pytest.raises(ValueError, match="comm_mode 'blocking' is not available for the Wan"):
        vinf.parallelize(FAMILIES["wan"].model(), comm_mode="blocking")

