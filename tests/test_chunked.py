"""Memory-bounded execution: with a budget small enough to split every per-frame and
per-token layer into chunks, the parallelized model's output is the unchunked output (to the
rounding of smaller matrix products), on one process and on 2 ranks; the chunks really run."""
import pytest
import torch

import vinf_engine as vinf
from families import FAMILIES, SPLITS, split
from helpers import rel_err, run_ranks
from vinf_engine.layers.chunked import chunked

CFG = dict(window=2, num_global=2, phase_t=500, phase_bias=1.0)
TINY_BUDGET = 1e-3          # MiB: ~1 KiB per chunk, so every chunked layer splits


def _cast(value, dtype):
    """A tensor, or a tuple of them (LTX's text and its mask), in ``dtype``."""
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    return value.to(dtype)


def _outputs(name, rank, world, chunk_mib, dtype=torch.float32):
    spec = FAMILIES[name]
    model = spec.model().to(dtype)
    x, extra = (_cast(t, dtype) for t in spec.inputs(11))
    vinf.parallelize(model, vinf.DualScopeConfig(**CFG), chunk_mib=chunk_mib)
    calls = []
    for m in model.modules():
        if type(m).__name__.startswith("Chunked"):
            m.register_forward_pre_hook(lambda mod, a, k, c=calls: c.append(1), with_kwargs=True)
    with torch.no_grad():
        out = spec.call(model, split(x, SPLITS[world], rank), 900, extra)
    return out, len(calls), sum(type(m).__name__.startswith("Chunked") for m in model.modules())


def chunked_rank(rank, world, name):
    return _outputs(name, rank, world, TINY_BUDGET)[0]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_chunked_equals_unchunked(family):
    # fp64: the chunking itself is exact; fp32: smaller matrix products round differently
    # (measured 2.2e-6 on the tiny UNet3D, 0 on the tiny Wan).
    w64, _, _ = _outputs(family, 0, 1, 0, torch.float64)
    p64, _, _ = _outputs(family, 0, 1, TINY_BUDGET, torch.float64)
    assert rel_err(p64, w64) <= 1e-12, rel_err(p64, w64)
    whole, _, n_off = _outputs(family, 0, 1, 0)
    parts, calls, n_on = _outputs(family, 0, 1, TINY_BUDGET)
    assert n_off == 0 and n_on > 0 and calls > 0
    assert rel_err(parts, whole) <= 1e-5, rel_err(parts, whole)
    assert torch.equal(_outputs(family, 0, 1, None)[0], whole)   # both unchunked: same ops
    two = torch.cat(run_ranks(chunked_rank, 2, family), dim=2)
    assert rel_err(two, whole) <= 1e-5


def test_a_chunked_layer_splits_its_rows_and_keeps_its_outputs_shape():
    calls = []

    class Twice(torch.nn.Module):
        def forward(self, hidden_states, scale=2.0):
            calls.append(hidden_states.shape[1])
            return hidden_states * scale, hidden_states.sum(-1)
    m = Twice()
    m.__class__ = chunked(Twice)
    m._vinf_rows, m._vinf_dim, m._vinf_bytes, m._vinf_factor = ("hidden_states",), 1, 3 * 4 * 8, 1
    x = torch.randn(2, 7, 4)
    y, s = m(x, scale=3.0)                  # 8 float rows of 2x4... 3 rows per chunk
    assert calls == [3, 3, 1]
    # bitwise: elementwise ops and per-row sums, the same per row in any chunk
    assert torch.equal(y, x * 3.0) and torch.equal(s, x.sum(-1))


def test_scenes_survive_the_frame_chunks(tmp_path):
    # Per-frame text goes to each spatial transformer before its frame chunks are cut, so
    # every chunk gets its own frames' scenes.
    from gen_helpers import HW, save_tiny_pipeline
    model = save_tiny_pipeline(str(tmp_path))
    kw = dict(prompts=[(0, "the cat"), (3, "a dog on the rock")], num_frames=6, steps=1,
              height=HW[0], width=HW[1], out=None, progress=False)
    whole = vinf.generate(model, chunk_mib=0, **kw)["latents"]
    parts = vinf.generate(model, chunk_mib=TINY_BUDGET, **kw)["latents"]
    assert rel_err(parts, whole) <= 1e-5
    # ... and the scenes mattered: one prompt throughout gives other frames past frame 3.
    one_scene = vinf.generate(model, chunk_mib=0, **dict(kw, prompts="the cat"))
    assert rel_err(one_scene["latents"][:, :, 3:], whole[:, :, 3:]) > 1e-3


def test_the_cli_makes_2304_frames_on_one_process_in_bounded_memory(tmp_path):
    # One process, 2,304 frames of a tiny model: the layers run in chunks of 64 MiB; the
    # process's peak stays far below the unchunked run's (1.6 GiB measured, same command).
    import json
    import subprocess
    import sys
    from gen_helpers import HW, save_tiny_pipeline
    from vinf_engine.video import read_video
    model = save_tiny_pipeline(str(tmp_path))
    out, report = tmp_path / "long.mp4", tmp_path / "report.json"
    p = subprocess.run([sys.executable, "-m", "vinf_engine", "generate", "--quiet", "--model",
                        model, "--prompt", "the cat", "--frames", "2304", "--steps", "1",
                        "--height", str(HW[0]), "--width", str(HW[1]), "--out", str(out),
                        "--chunk-mib", "64", "--report", str(report)],
                       capture_output=True, text=True, timeout=300,
                       env=dict(__import__("os").environ, MALLOC_MMAP_THRESHOLD_="65536"))
    assert p.returncode == 0, p.stderr[-2000:]
    rep = json.loads(report.read_text())
    assert rep["frames"] == 2304 and rep["per_rank"][0]["peak_memory_mib"] < 1100, rep["per_rank"]
    assert read_video(str(out))[0].shape[0] == 2304


def _count_calls(monkeypatch, cls) -> list:
    """A list that gets an entry at each call of ``cls.forward`` itself (a chunked subclass's
    own forward does not count; its fall-back to the whole forward does)."""
    calls = []
    real = cls.forward
    monkeypatch.setattr(cls, "forward", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    return calls


def _fp64_parallelized(spec, cfg, budget, frames=11):
    """A fresh fp64 model of ``spec`` parallelized with ``cfg`` at ``budget`` MiB, and its
    inputs for ``frames`` frames."""
    model = spec.model().double()
    x, extra = (t.double() for t in spec.inputs(frames))
    vinf.parallelize(model, vinf.DualScopeConfig(**cfg), chunk_mib=budget)
    return model, x, extra


def test_one_process_runs_whole_temporal_transformers_over_position_chunks():
    # The module's norm statistics from the whole video first, then norm apply, proj_in,
    # blocks, proj_out and residual per chunk of positions: several chunks really run, and
    # the output is the stock module's (exactly so in fp64).
    from vinf_engine.models.unet3d import PositionChunkedTemporalTransformer
    spec = FAMILIES["unet3d"]
    outs = {}
    for budget in (0, TINY_BUDGET):
        model, x, extra = _fp64_parallelized(spec, CFG, budget)
        mods = [m for m in model.modules() if type(m) is PositionChunkedTemporalTransformer]
        calls = []
        for m in mods:
            m.transformer_blocks[0].register_forward_pre_hook(lambda *a, c=calls: c.append(1))
        with torch.no_grad():
            outs[budget] = spec.call(model, x, 900, extra)
        if budget:
            assert len(mods) == 5 and len(calls) > 2 * 5, (len(mods), len(calls))  # chunks
            vinf.unparallelize(model)
            assert not any(type(m) is PositionChunkedTemporalTransformer for m in model.modules())
        else:
            assert not mods
    assert rel_err(outs[TINY_BUDGET], outs[0]) <= 1e-12


@pytest.mark.parametrize("config", ["clamp", "true_positions", "dual_no_global", "exact",
                                    "window6", "window6_clamp"])
def test_one_process_wan_attention_in_query_frame_chunks(config, monkeypatch):
    # Wan's attn1 on one process: queries, attention and output projection per chunk of
    # query frames (the clamped global scope per chunk too), equal to one whole pass in fp64.
    # A chunk whose every query frame sees every key frame attends densely, unpadded (all
    # of them in "exact"; in "window6_clamp", of 11 frames, frames 4-6, the others by band).
    from vinf_engine.models import wan
    spec = FAMILIES["wan"]
    window6 = dict(spec.configs["dual"], window=6)
    configs = dict(spec.configs, window6=window6, window6_clamp=dict(window6, trained_frames=3))
    ran = []
    real = wan.clip_attention_in_chunks
    monkeypatch.setattr(wan, "clip_attention_in_chunks",
                        lambda *a, **k: ran.append(k["frames_per_chunk"]) or real(*a, **k))
    outs = {}
    for budget in (0, TINY_BUDGET):
        model, x, extra = _fp64_parallelized(spec, configs[config], budget)
        with torch.no_grad():
            outs[budget] = spec.call(model, x, 900, extra)
        assert bool(ran) == bool(budget)
    assert set(ran) == {1}                     # ~1 KiB: one query frame per chunk
    assert rel_err(outs[TINY_BUDGET], outs[0]) <= 1e-12


def test_position_chunks_under_autograd():
    # Outside no_grad (a fine-tuning loop), as the stock module: grads reach the weights.
    spec = FAMILIES["unet3d"]
    grads = {}
    for budget in (0, TINY_BUDGET):
        model, x, extra = _fp64_parallelized(spec, CFG, budget, frames=5)
        spec.call(model, x, 900, extra).square().mean().backward()
        grads[budget] = model.transformer_in.proj_in.weight.grad
    assert torch.isfinite(grads[0]).all()
    assert rel_err(grads[TINY_BUDGET], grads[0]) <= 1e-10


@pytest.mark.parametrize("per_token", [False, True])
def test_one_process_wan_blocks_over_token_chunks(per_token, monkeypatch):
    # Each Wan block's per-token parts over token chunks (norm1 and its modulation; then the
    # residuals, norm2, cross-attention, norm3 and FFN per chunk into the output), attn1's
    # keys and values per frame chunk: equal to the whole block in fp64; TI2V's per-token
    # timesteps (a modulation per token) too.
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock
    from vinf_engine.models.wan import TokenChunkedWanBlock
    spec = FAMILIES["wan"]
    whole_calls = _count_calls(monkeypatch, WanTransformerBlock)
    outs = {}
    for budget in (0, TINY_BUDGET):
        model, x, extra = _fp64_parallelized(spec, CFG, budget, frames=5)
        blocks = [type(b) for b in model.blocks]
        assert all(t is (TokenChunkedWanBlock if budget else WanTransformerBlock) for t in blocks)
        B, _, F, H, W = x.shape
        tokens = F * (H // 2) * (W // 2)
        t = (torch.linspace(100, 900, tokens).repeat(B, 1) if per_token
             else torch.full((B,), 900.0))
        whole_calls.clear()
        with torch.no_grad():
            outs[budget] = model(hidden_states=x, timestep=t, encoder_hidden_states=extra).sample
        # the chunked blocks never fall back to the whole forward
        assert len(whole_calls) == (0 if budget else len(blocks)), len(whole_calls)
        if budget:
            vinf.unparallelize(model)
            assert all(type(b) is WanTransformerBlock for b in model.blocks)
    assert rel_err(outs[TINY_BUDGET], outs[0]) <= 1e-12


def test_one_process_runs_temporal_conv_stacks_over_row_chunks(monkeypatch):
    # Each conv of the stack: its GroupNorm's statistics from the whole input, then norm,
    # SiLU and conv per chunk of spatial rows; the residual per chunk into the output's
    # layout. Equal to the stock layer in fp64; the chunked layers never run whole.
    from diffusers.models.resnet import TemporalConvLayer
    from vinf_engine.layers import ClipTemporalConvLayer
    spec = FAMILIES["unet3d"]
    whole = _count_calls(monkeypatch, TemporalConvLayer)
    outs = {}
    for budget in (0, TINY_BUDGET):
        model, x, extra = _fp64_parallelized(spec, CFG, budget)
        mods = [m for m in model.modules() if isinstance(m, TemporalConvLayer)]
        assert mods and all((type(m) is ClipTemporalConvLayer) == bool(budget)
                            for m in mods)
        whole.clear()
        with torch.no_grad():
            outs[budget] = spec.call(model, x, 900, extra)
        assert len(whole) == (0 if budget else len(mods)), len(whole)
        if budget:
            vinf.unparallelize(model)
            assert not any(type(m) is ClipTemporalConvLayer for m in model.modules())
    assert rel_err(outs[TINY_BUDGET], outs[0]) <= 1e-12


def unet_rows_rank(rank, world, budget, mode):
    # One fp64 UNet3D step on this rank's clip, counting the rows each temporal attention
    # and each temporal conv attends or convolves at once, and the exchanges posted.
    from vinf_engine import ops
    from vinf_engine.models import unet3d
    from vinf_engine.scheduler import CommScheduler
    spec = FAMILIES["unet3d"]
    model = spec.model().double()
    x, extra = (t.double() for t in spec.inputs(11))
    vinf.parallelize(model, vinf.DualScopeConfig(**CFG), comm_mode=mode, chunk_mib=budget)
    attn, conv, posted = [], [], []
    real_attn, real_conv, real_frames = unet3d.clip_attention, ops.temporal_conv, CommScheduler.frames
    unet3d.clip_attention = lambda *a, **k: attn.append(a[2].shape[0]) or real_attn(*a, **k)
    ops.temporal_conv = lambda y, *a, **k: conv.append(y.shape[3]) or real_conv(y, *a, **k)
    CommScheduler.frames = lambda *a, **k: posted.append(a[5]) or real_frames(*a, **k)
    t = torch.tensor([900.0, 100.0][:x.shape[0]])    # samples in both phases: two biases
    with torch.no_grad():
        out = spec.call(model, split(x, SPLITS[world], rank), t, extra)
    temporal = {type(m).__name__ for m in model.modules()
                if isinstance(m, unet3d.TransformerTemporalModel)}
    return out, attn, conv, posted, temporal


@pytest.mark.parametrize("mode", ["overlap", "stale"])
def test_several_ranks_attend_and_convolve_in_row_chunks(mode):
    # On 2 ranks each temporal attention runs its rows (spatial positions) in chunks, each
    # temporal conv stack its spatial rows and each temporal transformer the per-position
    # parts around its blocks, with the same exchanges as unchunked (one context per
    # attention, one halo per stack): equal in fp64.
    whole = run_ranks(unet_rows_rank, 2, 0, mode)
    parts = run_ranks(unet_rows_rank, 2, TINY_BUDGET, mode)
    for (o0, a0, c0, p0, t0), (o1, a1, c1, p1, t1) in zip(whole, parts):
        assert rel_err(o1, o0) <= 1e-12, rel_err(o1, o0)
        # the norm's apply, proj_in, proj_out and residual around the blocks by positions
        assert t1 == {"PositionChunkedTemporalTransformer"} and t0 == {"TransformerTemporalModel"}
        assert p1 == p0 and p0                         # the same exchanges, in order
        assert len(a1) > len(a0) and sum(a1) == sum(a0) and max(a1) < max(a0)
        assert len(c1) > len(c0) and max(c1) < max(c0)


def wan_chunks_rank(rank, world, budget, cfg):
    # One fp64 Wan step on this rank's clip, with the frames per query chunk of each attn1.
    from vinf_engine.models import wan
    spec = FAMILIES["wan"]
    model = spec.model().double()
    x, extra = (t.double() for t in spec.inputs(11))
    vinf.parallelize(model, vinf.DualScopeConfig(**cfg), chunk_mib=budget)
    ran, real = [], wan.clip_attention_in_chunks
    wan.clip_attention_in_chunks = lambda *a, **k: ran.append(k["frames_per_chunk"]) or real(*a, **k)
    with torch.no_grad():
        out = spec.call(model, split(x, SPLITS[world], rank), 900, extra)
    return out, ran, [type(b).__name__ for b in model.blocks]


@pytest.mark.parametrize("config", ["dual", "exact", "clamp"])
def test_several_ranks_run_wan_in_query_frame_and_token_chunks(config):
    # On 2 ranks (clips of 6 and 5 frames) each Wan block runs over token chunks and attn1
    # over query-frame chunks whose bands reach into the halo (and, in "exact", every chunk
    # sees every frame of the video: dense): equal to unchunked in fp64.
    cfg = FAMILIES["wan"].configs[config]
    whole = run_ranks(wan_chunks_rank, 2, 0, cfg)
    parts = run_ranks(wan_chunks_rank, 2, TINY_BUDGET, cfg)
    for (o0, r0, b0), (o1, r1, b1) in zip(whole, parts):
        assert rel_err(o1, o0) <= 1e-12, rel_err(o1, o0)
        assert not r0 and set(r1) == {1}
        assert set(b1) == {"TokenChunkedWanBlock"} and set(b0) == {"WanTransformerBlock"}


def test_the_up_path_lets_go_of_its_input_and_skips():
    # A memory-bounded engine runs the plain UNet3D's forward with an up path that owns what
    # it consumes: the last up block's input and first skip are freed once concatenated
    # (diffusers' forward keeps both until the block returns); the output is bitwise the
    # stock forward's over the same patched modules.
    import weakref
    spec = FAMILIES["unet3d"]
    model = spec.model()
    x, extra = spec.inputs(5)
    vinf.parallelize(model, vinf.DualScopeConfig(**CFG))
    assert "forward" in model.__dict__                 # the owning forward is set
    last = model.up_blocks[-1]
    seen = {}

    def before(mod, args, kwargs):
        assert isinstance(kwargs["hidden_states"], list)     # handed over, not a tensor
        seen["input"] = weakref.ref(kwargs["hidden_states"][0])
        seen["skip"] = weakref.ref(kwargs["res_hidden_states_tuple"][-1])

    def after_first_resnet(mod, args, out):
        seen["alive"] = (seen["input"]() is not None, seen["skip"]() is not None)
    h1 = last.register_forward_pre_hook(before, with_kwargs=True)
    h2 = last.resnets[0].register_forward_hook(after_first_resnet)
    with torch.no_grad():
        owned = spec.call(model, x, 900, extra)
        h1.remove()
        h2.remove()
        stock = type(model).forward(model, x, 900, encoder_hidden_states=extra).sample
    assert seen["alive"] == (False, False), seen
    assert torch.equal(owned, stock)       # the stock forward's operations, step for step
    vinf.unparallelize(model)
    assert "forward" not in model.__dict__ and type(last).__name__ == "CrossAttnUpBlock3D"
