"""The stock diffusers pipeline call, unchanged, on any number of ranks.

    pipe = vinf.parallelize_pipe(pipe)            # every rank, collective
    video = pipe(prompt, num_frames=256, ...).frames   # every rank, the same arguments

Every rank runs the whole pipeline with the whole video's latents (they are small next to the
denoiser's activations): prompt encoding, the scheduler, the generator's noise, callbacks and
guidance are the pipeline's own, identical on every rank. The denoiser is shared out: on entry
it keeps this rank's clip of the frames (and of per-token timesteps), the clip-parallel model
runs it, and on exit every rank receives every rank's output frames, so the pipeline sees the
whole video's prediction. So are the VAE's ``encode`` and ``decode`` of a video
(``vae_share``): each rank encodes or decodes its clip, warmed up on frames it holds, and
gathers the rest. The result equals one process with the same config; in exact config it
equals the unpatched pipeline (the VAE's calls up to their rounding: ``vae_share``).
"""
from __future__ import annotations

import inspect

import torch

from .config import DualScopeConfig
from .parallel import DEFAULT_CHUNK_MIB

__all__ = ["parallelize_pipe", "unparallelize_pipe"]


class _Split:
    """The pre- and post-hook of one denoiser: split its input by frames, gather its output.

    Frames lie along dim 2 of a 5-D input (UNet3D, Wan; along dim 1 for CogVideoX, whose
    engine frames are pairs of latent frames in 1.5), or, for a family whose adapter names
    a ``frames_argument`` (LTX), along dim 1 of packed frame-major tokens ``(B, F*T, C)``
    whose frame count that argument holds: each rank takes its frames' tokens and passes its
    own count. Without that count, an adapter's ``coords_argument`` (LTX's ``video_coords``,
    as ``LTXConditionPipeline`` calls it) places the tokens, and every rank passes it whole."""

    def __init__(self, model, names: tuple, frames_argument: str | None = None):
        self.model, self.names, self.frames_argument = model, names, frames_argument
        self.coords_argument = getattr(model.vinf_engine.adapter, "coords_argument", None)
        params = list(inspect.signature(type(model).forward).parameters)[1:]
        self.positions = {n: i for i, n in enumerate(params)}

    @property
    def engine(self):
        return self.model.vinf_engine

    def before(self, module, args, kwargs):
        eng = self.engine
        args = list(args)
        wanted = self.names + tuple(a for a in (self.frames_argument, self.coords_argument) if a)
        values = {}
        for name in wanted:
            i = self.positions.get(name, len(args))
            if name in kwargs:
                values[name] = kwargs[name]
            elif len(args) > i:
                values[name] = args[i]
        sample, timestep = values.get(self.names[0]), values.get(self.names[1])
        count = values.get(self.frames_argument)
        if count is None and values.get(self.coords_argument) is not None:
            count = self.engine.adapter.coords_frames(values[self.coords_argument])
        where = self._frames(sample, count)
        if where is None:
            return None                     # the engine's agreement refuses it on every rank
        F, dim, T = where
        base, extra = divmod(F, eng.world_size)
        sizes = [base + (r < extra) for r in range(eng.world_size)]
        s = sum(sizes[:eng.rank])
        e = s + sizes[eng.rank]             # an empty clip, for F < ranks: refused collectively
        new = {self.names[0]: sample.narrow(dim, s * T, (e - s) * T)}
        if self.frames_argument and values.get(self.frames_argument) is not None:
            new[self.frames_argument] = e - s
        if (isinstance(timestep, torch.Tensor) and timestep.dim() == 2 and F
                and timestep.shape[1] % F == 0):
            # per-token timesteps (TI2V, LTX I2V and Condition): this clip's; (B, 1) for F > 1
            # (LTXConditionPipeline's without a condition) is one per sample, kept
            Tt = timestep.shape[1] // F
            new[self.names[1]] = timestep[:, s * Tt:e * Tt]
        for name, value in new.items():
            if name in kwargs or self.positions.get(name, len(args)) >= len(args):
                kwargs[name] = value
            else:
                args[self.positions[name]] = value
        return tuple(args), kwargs

    def _unit(self) -> tuple:
        """``(dim, unit)`` of a 5-D input: the model's frame dimension (2, or CogVideoX's 1)
        and latent frames per engine frame (CogVideoX 1.5: pairs)."""
        adapter = self.engine.adapter
        unit = getattr(adapter, "frame_unit", None)
        return getattr(adapter, "frame_dim", 2), (unit(self.model) if unit else 1)

    def _frames(self, sample, count) -> tuple | None:
        """``(F, dim, slices per frame)`` of the denoiser's input, or None if it has none:
        a 5-D input's engine frames along ``_unit``'s dim, or packed tokens' frames."""
        if not isinstance(sample, torch.Tensor):
            return None
        if self.frames_argument is None:
            dim, u = self._unit()
            # whole engine frames (an odd rest: refused by the engine's agreement)
            return (sample.shape[dim] // u, dim, u) if sample.dim() == 5 else None
        if (sample.dim() != 3 or isinstance(count, bool) or not isinstance(count, int)
                or count < 1 or sample.shape[1] % count):
            return None
        return count, 1, sample.shape[1] // count

    def after(self, module, args, kwargs, output):
        eng = self.engine
        layout = eng.layout
        clip = output[0] if isinstance(output, tuple) else output.sample
        everything = tuple(tuple(range(layout.num_frames)) for _ in range(layout.world_size))
        if self.frames_argument:            # (B, Fc*T, C) tokens: frames along dim 1
            framed = clip.unflatten(1, (layout.sizes[eng.rank], -1)).contiguous()
            whole = eng.comm.post_frames(framed, 1, layout, everything,
                                         "denoiser output gather").wait().flatten(1, 2)
        else:
            dim, u = self._unit()
            if u > 1:                       # whole engine frames along dim, gathered as one
                clip = clip.unflatten(dim, (-1, u)).flatten(dim + 1, dim + 2)
            whole = eng.comm.post_frames(clip.contiguous(), dim, layout, everything,
                                         "denoiser output gather").wait()
            if u > 1:
                whole = whole.unflatten(dim + 1, (u, -1)).flatten(dim, dim + 1)
        if isinstance(output, tuple):
            return (whole, *output[1:])
        return type(output)(sample=whole)


class _Recorder:
    """What ``Patcher`` records its undos on: here, the pipeline's own undo list."""

    def __init__(self, undo: list):
        self.on_undo = undo.append


def parallelize_pipe(pipe, config: DualScopeConfig | None = None, process_group=None, *,
                     comm_mode: str = "overlap", timeout=None, chunk_mib=DEFAULT_CHUNK_MIB):
    """Make the unchanged ``pipe(...)`` call, made on every rank with the same arguments,
    generate one video across the ranks; returns ``pipe``.

    ``pipe`` is any diffusers pipeline whose ``unet`` is a ``UNet3DConditionModel``
    (``TextToVideoSDPipeline``, ``VideoToVideoSDPipeline``: ModelScope, Zeroscope;
    VideoCrafter2's UNet) or whose ``transformer`` is a ``WanTransformer3DModel``
    (``WanPipeline``, ``WanImageToVideoPipeline``, ``WanVideoToVideoPipeline``; both Wan 2.2
    experts are parallelized). Collective, like
    ``vinf_engine.parallelize``, whose arguments the rest are; ``config`` defaults to the
    model family's. Every rank returns the whole video, equal to one process with the same
    config (in exact config: the unpatched pipeline). The pipeline's ``vae.encode`` and
    ``vae.decode`` of a video (Wan's ``AutoencoderKLWan``, UNet3D's ``AutoencoderKL`` rows) run
    each rank's share and gather the whole (``vinf_engine.vae_share``); any other call to them
    runs stock. ``unparallelize_pipe`` restores the pipeline.
    """
    from .models.base import Patcher
    from .parallel import parallelize, unparallelize
    from .pipelines import accepted_pipelines, family_of
    from .vae_share import share_vae
    if getattr(pipe, "_vinf_pipe", None) is not None:
        raise ValueError("pipeline is already parallelized (call unparallelize_pipe first)")
    family = family_of(pipe)
    if family is None:                      # every rank holds the same pipeline: all refuse
        raise ValueError(f"parallelize_pipe takes {accepted_pipelines(pipe)}")
    undo = []
    try:
        for model in family.denoisers(pipe):
            parallelize(model, config, process_group, comm_mode=comm_mode, timeout=timeout,
                        chunk_mib=chunk_mib)
            undo.append(lambda m=model: unparallelize(m))
            adapter = model.vinf_engine.adapter
            split = _Split(model, adapter.inputs, getattr(adapter, "frames_argument", None))
            # Before the forward, where the engine agrees on the step: it must see the clip.
            pre = model.register_forward_pre_hook(split.before, with_kwargs=True, prepend=True)
            post = model.register_forward_hook(split.after, with_kwargs=True)
            undo += [pre.remove, post.remove]
        comm_of = (lambda m=family.denoisers(pipe)[0]: m.vinf_engine.comm)
        share_vae(pipe, comm_of, Patcher(_Recorder(undo)))
        family.patch_pipe(pipe, Patcher(_Recorder(undo)))
    except BaseException:
        for fn in reversed(undo):
            fn()
        raise
    pipe._vinf_pipe = undo
    return pipe


def unparallelize_pipe(pipe):
    """Restore a pipeline made by ``parallelize_pipe``. Returns it."""
    undo = getattr(pipe, "_vinf_pipe", None)
    if undo is None:
        raise ValueError("pipeline is not parallelized")
    for fn in reversed(undo):
        fn()
    del pipe._vinf_pipe
    return pipe
