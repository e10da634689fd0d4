"""Functions each spawned rank runs (importable by name in the child processes)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

import vinf_engine as vinf
from helpers import tiny_unet, unet_inputs


def split(x: torch.Tensor, sizes, rank, dim=2):
    s = sum(sizes[:rank])
    return x.narrow(dim, s, sizes[rank])


def gn_video(frames: int):
    g = torch.Generator().manual_seed(7)
    x = 100.0 + 0.5 * torch.randn(2, 8, frames, 3, 5, generator=g)
    w = torch.randn(8, generator=g)
    b = torch.randn(8, generator=g)
    return x, w, b


def group_norm_rank(rank, world, sizes):
    x, w, b = gn_video(sum(sizes))
    out = vinf.ops.group_norm(split(x, sizes, rank), 4, w, b, eps=1e-5, activation="silu",
                              process_group=dist.group.WORLD)
    # Ranks that disagree on the spatial size: the same clear error on every rank.
    bad = split(x, sizes, rank)[..., : 5 - (rank == world - 1)]
    try:
        vinf.ops.group_norm(bad, 4, process_group=dist.group.WORLD)
        err = None
    except ValueError as e:
        err = str(e)
    return out, err


def gather_rank(rank, world, sizes, staged=False):
    layout = vinf.ClipLayout.from_sizes(sizes)
    Ft = layout.num_frames
    video = torch.arange(Ft, dtype=torch.float32)[None, :, None].expand(2, Ft, 3) * 10
    video = video + torch.arange(3.0)
    wants = []
    for r in range(world):
        g = torch.Generator().manual_seed(100 + r)
        n = int(torch.randint(0, Ft + 1, (1,), generator=g))
        wants.append(tuple(sorted(torch.randperm(Ft, generator=g)[:n].tolist())))
    comm = vinf.ClipComm(stage_all=staged)      # staged: the host-buffer path of GPU tensors on gloo
    clip = split(video, sizes, rank, dim=1).contiguous()
    got = comm.gather_frames(clip, 1, layout, wants)
    counters = comm.counters.snapshot()
    # The same exchange with a small fp64 sum riding along, in bf16 frames (the packing must
    # keep both dtypes intact); the received buffers are poisoned by torch.empty.
    sums = torch.tensor([[1e-300, 3.0], [2.0 ** 60, 1.0]], dtype=torch.float64) * (rank + 1)
    fused = comm.post_frames(clip.to(torch.bfloat16), 1, layout, tuple(wants), sums=sums).wait()
    return got, wants[rank], counters, fused, comm.counters.snapshot()


def batch_rank(rank, world, sizes, staged=False):
    """Three exchanges set aside, then posted as one batch: fp32 frames with sums, bf16 frames
    (odd byte counts: alignment), sums alone. Own positions are the caller's to fill."""
    layout = vinf.ClipLayout.from_sizes(sizes)
    Ft = layout.num_frames
    video = (torch.arange(Ft, dtype=torch.float32)[None, :, None] * 10 + torch.arange(3.0))
    video = video.expand(2, Ft, 3).contiguous()
    wants_a = tuple(tuple(range(Ft)) for _ in range(world))
    wants_b = tuple(tuple(f for f in range(Ft) if (f + r) % 2 == 0) for r in range(world))
    comm = vinf.ClipComm(stage_all=staged)
    clip = split(video, sizes, rank, dim=1).contiguous()
    sums = torch.full((2, 3), float(rank + 1), dtype=torch.float64)
    items = [comm.prepare(clip, 1, layout, wants_a, sums),
             comm.prepare(clip[:, :, :1].to(torch.bfloat16), 1, layout, wants_b),
             comm.prepare(None, 0, None, None, sums * 10)]
    clip.fill_(float("nan"))                  # prepared sends are copies: this must not show
    got = comm.post_batch(items).wait()
    plans = [vinf.comm.frame_plan(layout, rank, w) for w in (wants_a, wants_b)]
    (fa, sa), (fb, sb), (fc, sc) = got
    remote = [tuple(i for i in range(p.n_out) if i not in p.local_pos) for p in plans]
    return (fa[:, list(remote[0])], sa, fb[:, list(remote[1])], sb, fc, sc,
            [wants_a[rank][i] for i in remote[0]], [wants_b[rank][i] for i in remote[1]],
            comm.counters.snapshot())


CASE_CONFIGS = {
    "local_gn": dict(window=4, num_global=3, phase_t=500, phase_bias=2.0, sync_groupnorm=False),
}
TIMESTEPS = (900, 100)


def run_engine(model, sizes, rank, frames, configs, timesteps=TIMESTEPS, modes=("overlap",)):
    """Outputs of the parallelized model on this rank's clip, per (config, timestep), and per
    communication mode when several are asked for (keys then end with the mode)."""
    x, ctx = unet_inputs(frames)
    clip = split(x, sizes, rank)
    out = {}
    for mode in modes:
        for name, cfg in configs.items():
            vinf.parallelize(model, vinf.DualScopeConfig(**cfg), comm_mode=mode)
            with torch.no_grad():
                for t in timesteps:
                    key = (name, t) if len(modes) == 1 else (name, t, mode)
                    out[key] = model(clip, t, encoder_hidden_states=ctx).sample
            vinf.unparallelize(model)
    return out


def unet_rank(rank, world, sizes, configs, modes=("overlap",)):
    return run_engine(tiny_unet(), sizes, rank, sum(sizes), configs, modes=modes)


def counting_rank(rank, world, sizes, runs):
    """Per ``(mode, sync_groupnorm)`` in ``runs``: one step's data-plane counters; and the
    number of patched layers."""
    from diffusers.models.resnet import TemporalConvLayer
    from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel
    model = tiny_unet()
    n_conv = sum(isinstance(m, TemporalConvLayer) for m in model.modules())
    n_ttm = sum(isinstance(m, TransformerTemporalModel) for m in model.modules())
    x, ctx = unet_inputs(sum(sizes))
    counters = {}
    for mode, sync_groupnorm in runs:
        vinf.parallelize(model, vinf.DualScopeConfig(window=2, num_global=2,
                                                     sync_groupnorm=sync_groupnorm), comm_mode=mode)
        model.vinf_engine.comm.counters.reset()
        with torch.no_grad():
            model(split(x, sizes, rank), 900, encoder_hidden_states=ctx)
        counters[mode, sync_groupnorm] = model.vinf_engine.comm.counters.snapshot()
        vinf.unparallelize(model)
    return counters, n_conv, n_ttm


def stale_counting_rank(rank, world, sizes):
    """Counters of a second stale call (the first is synchronous), and the number of model
    blocks that hold a temporal layer: one batch each."""
    from diffusers.models.resnet import TemporalConvLayer
    from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel
    model = tiny_unet()
    blocks = [model.transformer_in, *model.down_blocks, model.mid_block, *model.up_blocks]
    temporal = (TemporalConvLayer, TransformerTemporalModel)
    n_blocks = sum(any(isinstance(m, temporal) for m in b.modules()) for b in blocks)
    x, ctx = unet_inputs(sum(sizes))
    counters = {}
    for mode in ("overlap", "stale"):
        vinf.parallelize(model, vinf.DualScopeConfig(window=2, num_global=2), comm_mode=mode)
        with torch.no_grad():
            model(split(x, sizes, rank), 900, encoder_hidden_states=ctx)
            model.vinf_engine.comm.counters.reset()
            model(split(x, sizes, rank), 800, encoder_hidden_states=ctx)
            counters[mode] = model.vinf_engine.comm.counters.snapshot()
            # A new layout (rank 0 one frame shorter): stale starts over, synchronously.
            short = split(x, sizes, rank)[:, :, : sizes[rank] - (rank == 0)]
            counters[mode, "new layout"] = model(short, 700, encoder_hidden_states=ctx).sample
        vinf.unparallelize(model)
    return counters, n_blocks


def stale_rank(rank, world, sizes):
    """Three calls in stale and in overlap mode: the same input twice, then a changed one."""
    model = tiny_unet()
    x, ctx = unet_inputs(sum(sizes))
    drift = unet_inputs(sum(sizes), seed=5)[0]
    clip, dclip = split(x, sizes, rank), split(drift, sizes, rank)
    out = {}
    for mode in ("overlap", "stale"):
        vinf.parallelize(model, vinf.DualScopeConfig(window=2, num_global=2), comm_mode=mode)
        with torch.no_grad():
            for step, amount in enumerate((0.0, 0.0, 0.05)):
                out[mode, step] = model(clip + amount * dclip, 900,
                                        encoder_hidden_states=ctx).sample
        vinf.unparallelize(model)
    return out


def stalled_rank(rank, world, stall_s):
    """Rank 1 stalls inside a step; rank 0 must fail within the engine timeout."""
    import time
    model = tiny_unet()
    x, ctx = unet_inputs(6)
    vinf.parallelize(model, vinf.DualScopeConfig(window=2, num_global=2), timeout=2.0)
    clip = split(x, (3, 3), rank)
    if rank == 1:
        # Join the step's agreement, then stall before the first exchange.
        model.vinf_engine.comm.agree((None, (3, 2, 4, 8, 8, 0, (10.0, 10.0), False), 0.0))
        time.sleep(stall_s)
        return "stalled"
    t0 = time.time()
    try:
        with torch.no_grad():
            model(clip, 10, encoder_hidden_states=ctx)
    except RuntimeError as e:
        return str(e), time.time() - t0
    return None, time.time() - t0


def subgroup_rank(rank, world):
    """Ranks 0 and 1 of 3 run the engine on a subgroup the user made with a plain new_group
    (every rank calls new_group; only members call parallelize)."""
    sub = dist.new_group([0, 1])
    if rank == 2:
        return None
    model = tiny_unet()
    x, ctx = unet_inputs(6)
    vinf.parallelize(model, vinf.DualScopeConfig(window=2, num_global=2), process_group=sub)
    with torch.no_grad():
        return model(split(x, (3, 3), rank), 900, encoder_hidden_states=ctx).sample
