"""The drop-in's shared VAE (vinf_engine.vae_share): tiny pipelines run stock and after
``parallelize_pipe``, counting what each rank's VAE encodes and decodes. Importable by name
in spawned ranks, and by ``bench/vae_share.py``."""
from __future__ import annotations

import copy
import os
import tempfile

import torch

EXACT = dict(window=1000, num_global=0, phase_bias=0.0)


class FrameCount:
    """Frames through ``vae.encoder`` and ``vae.decoder``, counted by pre-hooks on every call:
    for Wan's causal VAE the video frames in and the latent frames in (dim 2); for a 2-D VAE
    the images in (its rows, dim 0). ``decoded_full``: those that reached the decoder's last
    conv (a Wan warm-up frame may stop at an earlier stage: ``wan_vae._Stream``)."""

    KEYS = ("encoded", "decoded", "decoded_full")

    def __init__(self, vae):
        self.counts = dict.fromkeys(self.KEYS, 0)
        wan = type(vae).__name__ == "AutoencoderKLWan"

        def counter(key, dim):
            def hook(module, args, kwargs):
                x = args[0] if args else next(iter(kwargs.values()))
                self.counts[key] += 1 if dim is None else x.shape[dim]
            return hook
        self.handles = [
            m.register_forward_pre_hook(counter(key, dim), with_kwargs=True)
            for m, key, dim in ((vae.encoder, "encoded", 2 if wan else 0),
                                (vae.decoder, "decoded", 2 if wan else 0),
                                # Wan: one latent frame per call; 2-D: its rows
                                (vae.decoder.conv_out, "decoded_full", None if wan else 0))]

    def take(self) -> dict:
        """The counts since the last ``take``."""
        out = dict(self.counts)
        self.counts.update(dict.fromkeys(self.KEYS, 0))
        return out

    def remove(self):
        for h in self.handles:
            h.remove()


def _t2v(cls: str):
    import diffusers
    from gen_helpers import tiny_pipeline
    with tempfile.TemporaryDirectory() as tmp:
        t2v = tiny_pipeline(tmp)
    return getattr(diffusers, cls)(**t2v.components)


def build(spec: dict):
    """A tiny pipeline from ``spec["pipe"]``: ``("wan_i2v", variant)``, ``("wan_t2v", variant)``,
    ``("t2v",)`` or ``("v2v",)`` (the same tiny UNet3D modules as a ``VideoToVideoSDPipeline``)."""
    kind, *arg = spec["pipe"]
    if kind == "wan_i2v":
        from wan_image_helpers import tiny_wan_i2v_pipeline
        pipe = tiny_wan_i2v_pipeline(*arg)
    elif kind == "wan_t2v":
        from wan_helpers import tiny_wan_pipeline
        pipe = tiny_wan_pipeline(*arg)
    elif kind == "t2v":
        pipe = _t2v("TextToVideoSDPipeline")
    elif kind == "v2v":
        pipe = _t2v("VideoToVideoSDPipeline")
    else:
        raise ValueError(kind)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_kwargs(spec: dict) -> dict:
    kw = dict(spec["call"])
    for key in ("image", "last_image"):
        if key in kw:
            from wan_helpers import wan_image
            kw[key] = wan_image(kw[key])
    if "video" in kw:                      # (frames, height, width): a random video in [0, 1]
        g = torch.Generator().manual_seed(5)
        kw["video"] = torch.rand(1, kw["video"][0], 3, *kw["video"][1:], generator=g)
    return kw


def run_pipeline(spec: dict, parallel: bool) -> dict:
    """``spec``'s pipeline call, stock or after ``parallelize_pipe`` (exact config); returns
    its frames and this process's VAE frame counts."""
    import vinf_engine as vinf
    pipe = build(spec)
    count = FrameCount(pipe.vae)
    if parallel:
        vinf.parallelize_pipe(pipe, vinf.DualScopeConfig(**EXACT))
    frames = pipe(generator=torch.Generator().manual_seed(spec.get("seed", 0)),
                  **call_kwargs(spec)).frames
    if parallel:
        vinf.unparallelize_pipe(pipe)
    return dict(frames=torch.as_tensor(frames), counts=count.take())


def pipelines_rank(rank, world, specs: dict) -> dict:
    return {name: run_pipeline(spec, parallel=True) for name, spec in specs.items()}


def _outcome(fn):
    try:
        return fn()
    except Exception as e:               # noqa: BLE001 - the test compares what each rank saw
        return f"{type(e).__name__}: {e}"


def wan_vae_calls_rank(rank, world, n_latent: int) -> dict:
    """The parallelized Wan I2V pipeline's own ``vae.encode`` / ``vae.decode`` called directly:
    videos the split shares, calls it runs stock, ranks that disagree, accelerate's offload,
    a wrapper added after the drop-in; each with this rank's frame counts."""
    import functools

    import vinf_engine as vinf
    from wan_helpers import WAN_HW
    pipe = build(dict(pipe=("wan_i2v", "2.2")))
    vae = pipe.vae
    stock64 = copy.deepcopy(vae).double()        # a VAE of its own: never patched
    count = FrameCount(vae)
    vinf.parallelize_pipe(pipe, vinf.DualScopeConfig(**EXACT))
    comm = pipe.transformer.vinf_engine.comm
    g = torch.Generator().manual_seed(3)
    z = torch.randn(1, 16, n_latent, WAN_HW[0] // 8, WAN_HW[1] // 8, generator=g)
    x = torch.rand(1, 3, 1 + 4 * (n_latent - 1), *WAN_HW, generator=g) * 2 - 1
    res = {}
    with torch.no_grad():
        before = comm.counters.bytes_received
        res["decode"] = vae.decode(z).sample, count.take()
        res["decode_bytes"] = comm.counters.bytes_received - before
        res["encode"] = vae.encode(x).latent_dist.parameters, count.take()
        res["encode_tuple"] = vae.encode(x, return_dict=False)[0].mode(), count.take()
        res["decode_tuple"] = vae.decode(z, return_dict=False)[0], count.take()
        res["stock64_decode"] = stock64.decode(z.double()).sample
        res["stock64_encode"] = stock64.encode(x.double()).latent_dist.parameters
        res["stock32_decode"] = copy.deepcopy(stock64).float().decode(z).sample
        res["stock32_encode"] = copy.deepcopy(stock64).float().encode(x).latent_dist.parameters
        # not shared: one frame (TI2V's image), an image batch, encode tiling
        res["one_frame"] = vae.encode(x[:, :, :1]).latent_dist.parameters, count.take()
        res["image"] = _outcome(lambda: vae.encode(x[:, :, 0])), count.take()
        vae.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=16,
                          tile_sample_stride_height=16, tile_sample_stride_width=16)
        res["tiled_encode"] = vae.encode(x).latent_dist.parameters, count.take()
        res["tiled_decode"] = vae.decode(z).sample, count.take()      # decode_clip tiles
        stock64.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=16,
                              tile_sample_stride_height=16, tile_sample_stride_width=16)
        res["stock_tiled_decode"] = copy.deepcopy(stock64).float().decode(z).sample
        vae.disable_tiling()
        stock64.disable_tiling()
        # slicing, batch 2
        vae.enable_slicing()
        z2 = torch.cat([z, z.flip(2)])
        res["sliced"] = vae.decode(z2).sample, count.take()
        res["stock_sliced"] = copy.deepcopy(stock64).float().decode(z2).sample
        vae.disable_slicing()
        # ranks that disagree: other latents, another length
        res["other_data"] = _outcome(lambda: vae.decode(z + rank)), count.take()
        res["other_length"] = _outcome(lambda: vae.decode(z[:, :, :n_latent - (rank == 1)]))
        count.take()
        # under autograd: stock (the gather passes no gradient back)
        with torch.enable_grad():
            res["grad"] = vae.decode(z[:, :, :4]).sample.requires_grad, count.take()
        # accelerate's model offload around the shared methods
        pipe.enable_model_cpu_offload(device="cpu")
        res["offload"] = vae.decode(z).sample, count.take()
    # a wrapper added after the drop-in (a user's, or torch.compile's) stays in the chain
    seen = []
    wrapped = vae.decode

    @functools.wraps(wrapped)
    def wrapper(*a, **k):
        seen.append(1)
        return wrapped(*a, **k)
    vae.decode = wrapper
    vinf.unparallelize_pipe(pipe)
    with torch.no_grad():
        res["after_undo"] = vae.decode(z).sample, count.take()
    res["after_undo_wrapper_ran"] = bool(seen)
    res["encode_restored"] = "encode" not in vae.__dict__
    return res
