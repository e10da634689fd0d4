"""torch.compile over the parallelized model: fullgraph across a schedule's timesteps given
as Python numbers (UNet3D takes them), equal to eager, with a bounded number of compilations
(the first, the timestep made dynamic, the other bias phase), not one per timestep. A tensor
timestep (Wan's only form) makes the phase a data-dependent branch: fullgraph refuses it."""
import pytest
import torch

import vinf_engine as vinf
from families import FAMILIES
from helpers import rel_err


@pytest.mark.parametrize("family", ["unet3d"])
def test_fullgraph_compile_across_timesteps(family):
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    spec = FAMILIES[family]
    model = spec.model()
    x, extra = spec.inputs(5)
    vinf.parallelize(model, vinf.DualScopeConfig(window=2, num_global=2, phase_t=500,
                                                 phase_bias=2.0))
    steps = (999, 900, 700, 400, 300, 100, 50)          # both phases, 7 distinct timesteps
    with torch.no_grad():
        eager = [spec.call(model, x, t, extra) for t in steps]
        # backend="eager": Dynamo's tracing, guards and graph breaks without code generation
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        got = [spec.call(compiled, x, t, extra) for t in steps]
    for a, b in zip(got, eager):
        assert rel_err(a, b) <= 1e-5
    frames = counters["stats"]["unique_graphs"]
    assert frames <= 8, frames                          # not 7 timesteps x frames
