"""One denoising step on one GPU: no host sync inside it, and capturable as a CUDA graph that
replays correctly across a schedule, both bias phases included (the timestep is graph data:
its phase becomes tensor biases, ``ClipParallel._start_traced``). The GPU tests need a CUDA
GPU. On the CPU, the same step runs on the meta device, where every read of a tensor's value
on the host (``.item()``, ``bool()``, ``.tolist()``, a copy to the CPU) raises: the engine's
control flow is checked free of host syncs on any machine; tests/test_compile.py covers the
traced biases' values."""
import pytest
import torch

import vinf_engine as vinf
from families import FAMILIES
from helpers import rel_err

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CONFIG = dict(window=2, num_global=2, phase_t=500, phase_bias=2.0)
STEPS = (999, 700, 400, 1)            # both phases


def _setup(family):
    torch.backends.cudnn.allow_tf32 = False       # the comparisons below at fp32's own noise
    torch.backends.cuda.matmul.allow_tf32 = False
    spec = FAMILIES[family]
    model = spec.model().cuda()
    x, extra = (t.cuda() for t in spec.inputs(5))
    vinf.parallelize(model, vinf.DualScopeConfig(**CONFIG))

    def call(t):
        t = torch.full((x.shape[0],), float(t), device="cuda") if not isinstance(t, torch.Tensor) else t
        if family == "unet3d":
            return model(x, t, encoder_hidden_states=extra).sample
        return model(hidden_states=x, timestep=t, encoder_hidden_states=extra).sample
    return spec, model, x, extra, call


def _meta_call(family, model, x, t, extra):
    if family == "unet3d":
        return model(x, t, encoder_hidden_states=extra).sample
    return model(hidden_states=x, timestep=t, encoder_hidden_states=extra).sample


def test_the_meta_device_refuses_host_reads():
    # What the test below relies on: on meta, a value read on the host is an error.
    t = torch.ones(2, device="meta")
    for read in (lambda: t[0].item(), lambda: bool(t[0]), lambda: t.tolist(), lambda: t.cpu()):
        with pytest.raises((RuntimeError, NotImplementedError)):
            read()


@pytest.mark.parametrize("chunk_mib", [None, 0.05])
@pytest.mark.parametrize("family", ["unet3d", "wan"])
def test_one_accelerator_step_reads_nothing_on_the_host(family, chunk_mib):
    """A step with its timestep on the sample's (non-CPU) device, both phases, whole and
    in memory-bounded chunks, on meta: it runs only if nothing is read back."""
    spec = FAMILIES[family]
    model = spec.model()
    x, extra = spec.inputs(5)
    vinf.parallelize(model, vinf.DualScopeConfig(**CONFIG), chunk_mib=chunk_mib)
    model, x, extra = model.to("meta"), x.to("meta"), extra.to("meta")
    with torch.no_grad():
        for t in (999.0, 300.0):
            out = _meta_call(family, model, x, torch.full((x.shape[0],), t, device="meta"), extra)
            assert out.shape == x.shape and out.device.type == "meta"
    assert model.vinf_engine._bias_tensors is not None          # the traced path ran, not the host one


@needs_gpu
@pytest.mark.parametrize("family", ["unet3d", "wan"])
def test_one_gpu_step_has_no_host_sync(family):
    spec, model, x, extra, call = _setup(family)
    with torch.no_grad():
        call(999)                               # first call: dispatch chooses its backends
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = call(torch.full((x.shape[0],), 300.0, device="cuda"))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all()


@needs_gpu
@pytest.mark.parametrize("family", ["unet3d", "wan"])
def test_one_gpu_step_replays_as_a_cuda_graph(family):
    spec, model, x, extra, call = _setup(family)
    static_t = torch.full((x.shape[0],), float(STEPS[0]), device="cuda")
    # The independent path each replay is compared with: the same model on the CPU, where
    # the engine reads the phase on the host.
    ref = spec.model()
    vinf.parallelize(ref, vinf.DualScopeConfig(**CONFIG))
    with torch.no_grad():
        want = [spec.call(ref, x.cpu(), t, extra.cpu()) for t in STEPS]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):           # warm-up off the capture stream, as required
            for _ in range(2):
                call(static_t)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = call(static_t)
        got = []
        for t in STEPS:
            static_t.fill_(float(t))
            graph.replay()
            got.append(static_out.clone())
    torch.cuda.synchronize()
    for t, a, b in zip(STEPS, got, want):
        assert rel_err(a.cpu(), b) <= 1e-4, (t, rel_err(a.cpu(), b))
    assert rel_err(got[0], got[-1]) > 1e-3     # the replays did follow the timestep
