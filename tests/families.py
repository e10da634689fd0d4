"""The model families the conformance suite runs, and the function each spawned rank runs.

A spec says how to build a tiny random model of the family (the same on every rank), its
inputs for a video of F frames (frames along dim 2 of the first input), how to call it with
the stock signature, which comm modes it runs and which dual-scope configs exercise it.
"""
from __future__ import annotations

import torch

import vinf_engine as vinf
from helpers import tiny_unet, unet_inputs

FRAMES = 11
TIMESTEPS = (900, 100)       # both sides of phase_t=500: each bias phase
# Uneven splits; R=3 has a 1-frame clip; the window (4) is wider than a neighbour's clip
# (1-3 frames), so halos span several ranks; at window 1 ("narrow") clips of 3+ frames have a
# halo-free interior, which the overlapped path attends before the context arrives.
SPLITS = {1: (FRAMES,), 2: (6, 5), 3: (1, 6, 4), 4: (3, 3, 3, 2)}

DUAL = dict(window=4, num_global=3, phase_t=500, phase_bias=2.0)
CONFIGS = {
    "dual": DUAL,
    "narrow": dict(DUAL, window=1),
    "dual_no_global": dict(DUAL, window=2, num_global=0),
    "exact": dict(window=1000, num_global=0, phase_bias=0.0),
}


class UNet3D:
    modes = ("overlap", "blocking")
    configs = CONFIGS
    resolution_cut = 4            # a smaller latent that the family still accepts

    @staticmethod
    def model():
        return tiny_unet()

    @staticmethod
    def inputs(frames):
        x, ctx = unet_inputs(frames)
        return x, ctx

    @staticmethod
    def call(model, clip, t, ctx):
        return model(clip, t, encoder_hidden_states=ctx).sample


FAMILIES = {"unet3d": UNet3D}


def split(x, sizes, rank, dim=2):
    return x.narrow(dim, sum(sizes[:rank]), sizes[rank])


def stock_outputs(name):
    """The unmodified model on the whole video, per timestep."""
    spec = FAMILIES[name]
    model = spec.model()
    x, extra = spec.inputs(FRAMES)
    with torch.no_grad():
        return {t: spec.call(model, x, t, extra) for t in TIMESTEPS}


def conformance_rank(rank, world, sizes, names, refusals):
    """Every family's outputs on this rank's clip per (config, timestep, mode); with
    ``refusals``, the bad-input cases too (each must fail the same way on every rank)."""
    out = {}
    for name in names:
        spec = FAMILIES[name]
        model = spec.model()
        x, extra = spec.inputs(FRAMES)
        clip = split(x, sizes, rank)
        for mode in spec.modes:
            for cname, cfg in spec.configs.items():
                vinf.parallelize(model, vinf.DualScopeConfig(**cfg), comm_mode=mode)
                with torch.no_grad():
                    for t in TIMESTEPS:
                        out[name, cname, t, mode] = spec.call(model, clip, t, extra)
                vinf.unparallelize(model)
        if refusals:
            out[name, "refusals"] = refusal_cases(spec, model, clip, extra, rank)
    return out


def _error(fn):
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


def refusal_cases(spec, model, clip, extra, rank):
    """Bad input on one rank: every rank must see the same clear error, and the model must
    stay unpatched (or, inside a step, usable)."""
    res = {}
    cfg = vinf.DualScopeConfig(window=2, num_global=2)
    res["not_a_family"] = _error(lambda: vinf.parallelize(
        model if rank == 0 else torch.nn.Linear(2, 2), cfg))
    res["config"] = _error(lambda: vinf.parallelize(model, vinf.DualScopeConfig(window=4 + rank)))
    res["config_type"] = _error(lambda: vinf.parallelize(
        model, {"window": 4} if rank == 1 else cfg))
    res["unpatched"] = getattr(model, "vinf_engine", None) is None
    vinf.parallelize(model, cfg)
    cut = spec.resolution_cut
    with torch.no_grad():
        res["resolution"] = _error(lambda: spec.call(
            model, clip if rank == 0 else clip[..., :cut, :cut], 10, extra))
        res["no_frames"] = _error(lambda: spec.call(
            model, clip if rank == 0 else clip[:, :, :0], 10, extra))
        res["timestep"] = _error(lambda: spec.call(model, clip, 10 + rank, extra))
        res["after"] = spec.call(model, clip, 10, extra)
    res["twice"] = _error(lambda: vinf.parallelize(model, cfg))
    vinf.unparallelize(model)
    return res
