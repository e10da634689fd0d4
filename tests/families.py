"""The model families the conformance suite runs, and the function each spawned rank runs.

A spec says how to build a tiny random model of the family (the same on every rank), its
inputs for a video of F frames (frames along dim 2 of the first input), how to call it with
the stock signature, which comm modes it runs and which dual-scope configs exercise it.
"""
from __future__ import annotations

import torch

import vinf_engine as vinf
from cogvideox_helpers import cog_call, cog_inputs, tiny_cogvideox_transformer
from helpers import tiny_unet, unet_inputs
from hunyuan15_helpers import hunyuan15_call, hunyuan15_inputs, tiny_hunyuan15_transformer
from hunyuan_helpers import hunyuan_call, hunyuan_inputs, tiny_hunyuan_transformer
from ltx_helpers import ltx_call, ltx_inputs, tiny_ltx_transformer
from skyreels_helpers import skyreels_inputs, tiny_skyreels_transformer
from wan_helpers import tiny_wan_transformer, wan_inputs

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
    def shallow_model():
        """One plain down and up block around the cross-attention mid block (temporal convs,
        GroupNorms, spatial, cross and temporal attention: every kind of layer the engine
        changes, once): what the compile tests trace, at a quarter of the tracing time."""
        return tiny_unet(down_block_types=("DownBlock3D",), up_block_types=("UpBlock3D",),
                         block_out_channels=(16,))

    @staticmethod
    def inputs(frames):
        x, ctx = unet_inputs(frames)
        return x, ctx

    @staticmethod
    def call(model, clip, t, ctx):
        return model(clip, t, encoder_hidden_states=ctx).sample


class Wan:
    modes = ("overlap",)
    # trained_frames=3: relative distances past 2 are clamped for the global scope, which the
    # 11-frame video reaches; "true" keeps the global keys at their real positions.
    configs = dict(CONFIGS, clamp=dict(DUAL, window=2, trained_frames=3),
                   true_positions=dict(DUAL, window=2, trained_frames=3, global_positions="true"))
    resolution_cut = 2

    @staticmethod
    def model():
        return tiny_wan_transformer()

    shallow_model = model

    @staticmethod
    def inputs(frames):
        return wan_inputs(frames)

    @staticmethod
    def call(model, clip, t, text):
        t = torch.full((clip.shape[0],), float(t))
        return model(hidden_states=clip, timestep=t, encoder_hidden_states=text).sample


class SkyReelsV2(Wan):
    """SkyReels-V2's transformer: Wan's architecture in its own classes, Wan's configs."""

    @staticmethod
    def model():
        return tiny_skyreels_transformer()

    shallow_model = model

    @staticmethod
    def inputs(frames):
        return skyreels_inputs(frames)


class CogVideoX:
    """CogVideoX 5b-style (3-D RoPE): frames along dim 1 of the model's input, text first
    in one attention. The suite's clips are in the engine's layout (B, C, F, H, W); ``call``
    gives the model its own."""
    modes = ("overlap",)
    variant = "5b"
    # trained_frames=3: the global scope's offsets past 2 are clamped (the video has 11)
    configs = dict(CONFIGS, clamp=dict(DUAL, window=2, trained_frames=3),
                   true_positions=dict(DUAL, window=2, trained_frames=3, global_positions="true"))
    resolution_cut = 2

    @classmethod
    def model(cls):
        return tiny_cogvideox_transformer(cls.variant)

    @classmethod
    def shallow_model(cls):
        return cls.model()

    @classmethod
    def inputs(cls, frames):
        return cog_inputs(frames, 2 if cls.variant == "1.5" else 1)

    @staticmethod
    def call(model, clip, t, text):
        return cog_call(model, clip, t, text)


class CogVideoX2b(CogVideoX):
    """CogVideoX 2b: the 3-D sin-cos position embedding at the clip's global frames."""
    variant = "2b"
    configs = CONFIGS


class CogVideoX15(CogVideoX):
    """CogVideoX 1.5: temporal patches of 2 latent frames, the engine's frames are pairs."""
    variant = "1.5"
    configs = dict(CONFIGS, clamp=dict(DUAL, window=2, trained_frames=3))



class LTX:
    """Packed tokens (B, F*h*w, C) with num_frames, height, width: the spec's inputs are the
    5-D latents, packed for the call and the output unpacked, so clips split along dim 2."""
    modes = ("overlap",)
    configs = Wan.configs
    resolution_cut = 2

    @staticmethod
    def model():
        return tiny_ltx_transformer()

    shallow_model = model

    @staticmethod
    def inputs(frames):
        return ltx_inputs(frames)

    @staticmethod
    def call(model, clip, t, extra):
        return ltx_call(model, clip, t, extra)



class HunyuanVideo:
    """HunyuanVideo 1.0: (B, C, F, H, W) like Wan, text joined to every attention (one dual-
    and one single-stream block) with a prompt mask that pads the second row."""
    modes = ("overlap",)
    configs = Wan.configs
    resolution_cut = 2

    @staticmethod
    def model():
        return tiny_hunyuan_transformer()

    shallow_model = model

    @staticmethod
    def inputs(frames):
        return hunyuan_inputs(frames)

    @staticmethod
    def call(model, clip, t, cond):
        return hunyuan_call(model, clip, t, cond)


class HunyuanVideo15(HunyuanVideo):
    """HunyuanVideo 1.5: two dual-stream blocks, three text streams (Qwen, ByT5, image slots)
    whose masks pad differently per row, the condition channels beside the latents."""

    @staticmethod
    def model():
        return tiny_hunyuan15_transformer()

    shallow_model = model

    @staticmethod
    def inputs(frames):
        return hunyuan15_inputs(frames)

    @staticmethod
    def call(model, clip, t, cond):
        return hunyuan15_call(model, clip, t, cond)


FAMILIES = {"unet3d": UNet3D, "wan": Wan, "cogvideox": CogVideoX, "cogvideox_2b": CogVideoX2b,
            "cogvideox15": CogVideoX15, "ltx": LTX, "hunyuan": HunyuanVideo,
            "hunyuan15": HunyuanVideo15, "skyreels": SkyReelsV2}


def modes_at(spec, world):
    """The comm modes run on ``world`` ranks: the baseline pattern (blocking) on 2 and 3 only,
    to keep the 4-rank run within the suite's time."""
    return tuple(m for m in spec.modes if m == "overlap" or world in (2, 3))


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
        for mode in modes_at(spec, world):
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


def wan_rank(rank, world):
    """Wan on 2 ranks: a video past the RoPE table, per-rank traffic as the video grows, and
    TI2V-style per-token timesteps (one per token of this rank's clip)."""
    out = {}
    short_table = tiny_wan_transformer(rope_max_seq_len=8)
    x, text = wan_inputs(12)
    cfg = vinf.DualScopeConfig(**DUAL)
    vinf.parallelize(short_table, cfg)
    with torch.no_grad():
        out["past_table"] = Wan.call(short_table, split(x, (6, 6), rank), 900, text)
    vinf.unparallelize(short_table)
    model = tiny_wan_transformer()
    vinf.parallelize(model, cfg)
    comm = model.vinf_engine.comm
    for frames in (8, 16, 32):
        x, text = wan_inputs(frames)
        comm.counters.reset()
        with torch.no_grad():
            Wan.call(model, split(x, (frames // 2, frames // 2), rank), 900, text)
        out["bytes", frames] = comm.counters.bytes_received
    x, text = wan_inputs(FRAMES)
    sizes = SPLITS[2]
    clip = split(x, sizes, rank)
    tokens = clip.shape[2] * (clip.shape[3] // 2) * (clip.shape[4] // 2)
    with torch.no_grad():
        out["per_token"] = model(hidden_states=clip, timestep=torch.full((2, tokens), 900.0),
                                 encoder_hidden_states=text).sample
    vinf.unparallelize(model)
    return out


def compile_rank(rank, world, family, sizes):
    """torch.compile (no fullgraph) of the parallelized model on ``world`` ranks: this rank's
    compiled and eager outputs over a schedule in both phases, the graph breaks Dynamo
    recorded (reason -> count) and the number of graphs it made."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    spec = FAMILIES[family]
    model = spec.shallow_model()
    x, extra = spec.inputs(sum(sizes))
    clip = split(x, sizes, rank)
    vinf.parallelize(model, vinf.DualScopeConfig(**dict(DUAL, window=1)))
    steps = (999, 300, 100)
    compiled = torch.compile(model, backend="eager")
    got, graphs = [], []
    with torch.no_grad():
        for t in steps:
            got.append(spec.call(compiled, clip, t, extra))
            graphs.append(counters["stats"]["unique_graphs"])
        want = [spec.call(model, clip, t, extra) for t in steps]
    breaks = {}
    for kind in ("graph_break", "unimplemented"):     # where torch versions count them
        for reason, n in counters[kind].items():
            breaks[str(reason)] = breaks.get(str(reason), 0) + n
    return dict(got=got, want=want, breaks=breaks, graphs=graphs)
