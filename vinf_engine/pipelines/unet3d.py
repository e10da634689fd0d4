"""The UNet3D pipeline family: diffusers ``TextToVideoSDPipeline`` folders (ModelScope,
Zeroscope) and VideoCrafter2 in diffusers layout (a UNet3D with frame-rate conditioning).

One latent frame per video frame; classifier-free guidance in the batch, as diffusers'
pipeline does it; the 2-D VAE decodes frame by frame, so each rank decodes its own frames."""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from .base import (Conditioning, PipelineFamily, VideoPlan, component_dirs_problem,
                   load_component, load_scheduler, load_transformers, read_json, rows)

__all__ = ["UNet3DPipelines"]

_NEED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class UNet3DPipelines(PipelineFamily):
    name = "UNet3D"
    runs = ("TextToVideoSDPipeline folders (ModelScope, Zeroscope) and VideoCrafter2 in "
            "diffusers layout")
    # The paper's settings (Video-Infinity with VideoCrafter2): 30 steps, guidance 12; the
    # reference exports its mp4 at 8 frames per second.
    defaults = dict(steps=30, guidance_scale=12.0, video_fps=8.0)
    schedulers = {
        # name: (diffusers class, overrides of the pipeline's scheduler config)
        "dpm++sde": ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++")),
        "dpm++": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++")),
        "ddim": ("DDIMScheduler", {}),
        "euler": ("EulerDiscreteScheduler", {}),
        "euler-a": ("EulerAncestralDiscreteScheduler", {}),
        "unipc": ("UniPCMultistepScheduler", {}),
    }
    components = ("unet", "vae", "text_encoder")
    takes = ("unet", "UNet3DConditionModel", "TextToVideoSDPipeline, VideoToVideoSDPipeline: "
             "ModelScope, Zeroscope; VideoCrafter2's UNet")

    # ---------------------------------------------------------------- folders
    catch_all = True

    def claims_dir(self, index: dict) -> bool:
        # Every folder the other families do not claim (asked last): a UNet2D pipeline is
        # then refused with what it holds, not as an unknown folder.
        return "unet" in index or not str(index.get("_class_name", "")).startswith("Wan")

    def inspect(self, path: str, mi: dict) -> tuple:
        from ..models.videocrafter2 import is_videocrafter2_unet_dir
        pipe_cls = mi.get("_class_name", "?")
        problem = component_dirs_problem(
            path, mi, _NEED, pipe_cls, "vinf_engine runs TextToVideoSDPipeline folders "
            "(ModelScope, Zeroscope), VideoCrafter2 in diffusers layout and WanPipeline folders")
        if problem:
            return problem, {}
        unet_dir = os.path.join(path, "unet")
        try:
            ucfg = read_json(os.path.join(unet_dir, "config.json"))
        except (OSError, ValueError) as e:
            return f"{unet_dir}/config.json is unreadable: {e}", {}
        try:
            vc2 = is_videocrafter2_unet_dir(unet_dir)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
            return f"cannot load unet from {path!r}: its weights are unreadable ({type(e).__name__}: {e})", {}
        ucls = ucfg.get("_class_name", mi["unet"][1])
        if not vc2 and ucls != "UNet3DConditionModel":
            return (f"{path!r} holds a {pipe_cls} whose unet is {ucls}; vinf_engine runs "
                    "UNet3DConditionModel pipelines (ModelScope, Zeroscope) and VideoCrafter2"), {}
        vae_cls = mi["vae"][1]
        if vae_cls != "AutoencoderKL":
            return f"{path!r}: vae is {vae_cls}; expected AutoencoderKL", {}
        for c in ("text_encoder", "tokenizer"):
            if mi[c][0] != "transformers":
                return f"{path!r}: {c} comes from {mi[c][0]!r}; expected a transformers class", {}
        return None, dict(kind="videocrafter2" if vc2 else "unet3d", pipeline=pipe_cls, unet=ucls)

    def load(self, path: str, info: dict, dtype, device):
        """A ``TextToVideoSDPipeline`` whose ``unet`` is a ``UNet3DConditionModel`` or, for
        VideoCrafter2 folders, a ``VideoCrafter2UNet3DConditionModel``."""
        from diffusers import AutoencoderKL, UNet3DConditionModel
        from ..models.videocrafter2 import VideoCrafter2UNet3DConditionModel
        unet_cls = (VideoCrafter2UNet3DConditionModel if info["kind"] == "videocrafter2"
                    else UNet3DConditionModel)
        kw = dict(dtype=dtype, low_cpu_mem_usage=False, output_loading_info=True,
                  local_files_only=True)
        loaded = dict(
            unet=load_component("unet", lambda: unet_cls.from_pretrained(
                path, subfolder="unet", **kw), path),
            vae=load_component("vae", lambda: AutoencoderKL.from_pretrained(
                path, subfolder="vae", **kw), path),
            **load_transformers(info["index"], path, dtype),
            scheduler=load_scheduler(path))
        return t2v_pipeline(**loaded).to(device)

    # ---------------------------------------------------------------- a loaded pipeline
    def claims(self, pipe) -> bool:
        from diffusers import UNet3DConditionModel
        return isinstance(getattr(pipe, "unet", None), UNet3DConditionModel)

    def kind(self, pipe) -> str:
        return "videocrafter2" if _is_vc2(pipe.unet) else "unet3d"

    def denoisers(self, pipe) -> list:
        return [pipe.unet]

    def check(self, s, pipe) -> list[str]:
        unet = pipe.unet
        p = []
        vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        unet_factor = 2 ** (len(unet.config.block_out_channels) - 1)
        step = vae_factor * unet_factor
        for name, v in (("height", s.height), ("width", s.width)):
            if v is None:
                if not isinstance(unet.config.sample_size, int):
                    p.append(f"the UNet's config has no sample_size to default the {name} from; "
                             f"give the {name}")
                    continue
                v = unet.config.sample_size * vae_factor
            if v % step:
                p.append(f"{name} {v} is not a multiple of {step}: the VAE downsamples by "
                         f"{vae_factor} and the UNet by {unet_factor} more (try "
                         f"{max(step, v // step * step)})")
            elif v % 2:
                p.append(f"{name} {v} must be even for H.264 video")
        if s.fps is not None and not _is_vc2(unet):
            p.append(f"--fps conditions VideoCrafter2 only; this {type(unet).__name__} has no fps "
                     "input (use --video-fps for the mp4's frame rate)")
        if s.guidance_scale_2 is not None:
            p.append("guidance scale 2 is for Wan 2.2's second expert; this pipeline has one UNet")
        if pipe.vae.config.latent_channels != unet.config.in_channels:
            p.append(f"the VAE's {pipe.vae.config.latent_channels} latent channels do not match "
                     f"the UNet's {unet.config.in_channels} input channels")
        te_dim = getattr(pipe.text_encoder.config, "hidden_size", None)
        if te_dim is not None and te_dim != unet.config.cross_attention_dim:
            p.append(f"the text encoder's width {te_dim} does not match the UNet's "
                     f"cross-attention width {unet.config.cross_attention_dim}")
        return p

    def plan(self, s, pipe) -> VideoPlan:
        unet, vae = pipe.unet, pipe.vae
        vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        H = s.height or unet.config.sample_size * vae_factor
        W = s.width or unet.config.sample_size * vae_factor
        n = s.video_frames
        shape = (1, unet.config.in_channels, n, H // vae_factor, W // vae_factor)
        return VideoPlan(frames=n, latent_frames=n, shape=shape, height=H, width=W,
                         scene_starts=tuple(f for f, _ in s.scenes))

    def fps_conditioning(self, s, pipe):
        from ..models.videocrafter2 import DEFAULT_FPS
        if not _is_vc2(pipe.unet):
            return None
        return s.fps if s.fps is not None else DEFAULT_FPS

    def check_visual(self, s, pipe, visual) -> list[str]:
        # Images and an extension's context are held fixed by replacing their latent frames
        # (the 2-D VAE encodes each frame alone: its latent is exact at any frame).
        if not visual:
            return []
        sched = self.make_scheduler(pipe, s.scheduler)
        if not hasattr(sched, "add_noise"):
            return [f"{type(sched).__name__} has no add_noise, which holding an image's frame "
                    "through the denoising needs; choose another --scheduler"]
        return []

    def prefix_frames(self, pipe, visual, plan):
        from ..video import frames_to_uint8
        proc = _image_processor(pipe)
        images = [Image.fromarray(f) for f in visual.prefix]
        return np.concatenate([frames_to_uint8(proc.preprocess(im, height=plan.height,
                                                               width=plan.width))
                               for im in images])

    def encode(self, pipe, s, plan, frames: range, device, visual=None):
        cond = _Conditioning(pipe, s, plan, frames, device, self.fps_conditioning(s, pipe))
        if visual:
            cond.hold(_held_latents(pipe, plan, frames, visual, device), s.seed, plan.shape)
        return cond

    def decode(self, pipe, latents, layout, rank: int, comm, chunk: int):
        """This rank's frames, ``chunk`` at a time: (n, H, W, 3) uint8 on the CPU."""
        from ..video import frames_to_uint8
        vae = pipe.vae
        n = latents.shape[2]
        for s in range(0, n, chunk):
            z = rows(latents[:, :, s:min(n, s + chunk)]) / vae.config.scaling_factor
            with torch.no_grad():
                images = vae.decode(z.to(vae.dtype)).sample
            yield frames_to_uint8(images)


class _Conditioning(Conditioning):
    """The text of one rank's clip and one guided UNet evaluation per step.

    One scene: ``(2, L, D)`` ([uncond, cond]). A schedule of scenes: the same stand-in, plus
    every cross-attention given one text row per (batch, frame) of this rank's clip in the
    UNet's order (batch-major), so that frame ``f`` is conditioned by the scene that covers
    global frame ``f`` whatever the split."""

    def __init__(self, pipe, s, plan, frames, device, fps):
        from ..prompts import scene_of
        super().__init__()
        self._frames = frames
        self.unet = pipe.unet
        self.guidance = s.guidance_scale
        self.cfg = s.guidance_scale > 1.0
        self.extra = dict(fps=fps) if fps is not None else {}
        with torch.no_grad():
            embs, neg = [], None
            for _, prompt in s.scenes:
                cond, uncond = pipe.encode_prompt(prompt, device, 1, self.cfg,
                                                  negative_prompt=s.negative_prompt)
                embs.append(cond)
                neg = uncond
        dtype = self.unet.dtype
        first = embs[scene_of(s.scenes, frames.start)]
        self.text = (torch.cat([neg, first]) if self.cfg else first).to(dtype)
        if len(s.scenes) > 1:
            per_frame = torch.cat([embs[scene_of(s.scenes, f)] for f in frames])
            rows_ = (torch.cat([neg.expand(len(frames), -1, -1), per_frame]) if self.cfg
                     else per_frame).to(dtype)
            self._install(rows_)

    def _install(self, text_rows):
        # Every spatial transformer gets the rows as its encoder_hidden_states before it
        # runs (before a memory-bounded run splits them into frame chunks with its input).
        from diffusers.models.transformers.transformer_2d import Transformer2DModel

        def give_rows(module, args, kwargs):
            if kwargs.get("encoder_hidden_states") is None:
                return None
            if text_rows.shape[0] != args[0].shape[0]:
                raise RuntimeError(f"per-frame text has {text_rows.shape[0]} rows for "
                                   f"{args[0].shape[0]} frames")
            return args, dict(kwargs, encoder_hidden_states=text_rows)
        for m in self.unet.modules():
            if isinstance(m, Transformer2DModel):
                self.pre_hook(m, give_rows)

    # ---------------------------------------------------------------- frames held fixed
    def hold(self, held: dict, seed: int, shape: tuple):
        """Hold the clip-local latent frames ``held`` ({local frame: clean latent (1, C, h,
        w)}) through the denoising: before each step they are the clean latent noised to
        the step's level with their own frame's initial noise (the scheduler's
        ``add_noise``, as SDEdit and RePaint do: the UNet takes one timestep per sample, so
        a frame cannot be marked clean), and after the last step they are the clean latent."""
        from ..noise import initial_noise
        self._held = {}
        for local, x0 in held.items():
            g = self._frames.start + local
            self._held[local] = (x0, initial_noise(seed, shape, range(g, g + 1),
                                                   device=x0.device)[:, :, 0])

    def _put(self, sched, latents, t):
        for local, (x0, eps) in getattr(self, "_held", {}).items():
            noisy = x0 if t is None else sched.add_noise(x0, eps, torch.as_tensor(t).reshape(1))
            latents[:, :, local] = noisy.to(latents.dtype)
        return latents

    def prepare(self, sched, latents):
        return self._put(sched, latents, sched.timesteps[0])

    def after_step(self, sched, latents, i):
        nxt = sched.timesteps[i + 1] if i + 1 < len(sched.timesteps) else None
        return latents if nxt is None else self._put(sched, latents, nxt)

    def finish(self, latents):
        return self._put(None, latents, None)

    def predict(self, x, t):
        """The guided noise prediction for this rank's latents ``x`` at timestep ``t``."""
        xin = torch.cat([x] * 2) if self.cfg else x
        eps = self.unet(xin.to(self.unet.dtype), t, encoder_hidden_states=self.text,
                        **self.extra).sample.float()
        return self.guided(eps, self.guidance)


def _image_processor(pipe):
    """The stock pipelines' image preprocessing with resizing on (``TextToVideoSDPipeline``'s
    own video processor leaves frames at their size): Lanczos to the run's size, [-1, 1]."""
    from diffusers.image_processor import VaeImageProcessor
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return VaeImageProcessor(vae_scale_factor=factor, do_resize=True)


def _held_latents(pipe, plan, frames: range, visual, device) -> dict:
    """{clip-local frame: clean latent (1, C, h, w)} of the images pinned in this rank's
    clip: each frame encoded alone by the 2-D VAE (its distribution's mode, scaled)."""
    proc, vae = _image_processor(pipe), pipe.vae
    out = {}
    with torch.no_grad():
        for frame, image in visual.keyframes:
            if frame not in frames:
                continue
            x = proc.preprocess(image, height=plan.height, width=plan.width)
            z = vae.encode(x.to(device, vae.dtype)).latent_dist.mode()
            out[frame - frames.start] = (z * vae.config.scaling_factor).float()
    return out


def t2v_pipeline(**components):
    import warnings
    from diffusers import TextToVideoSDPipeline
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = TextToVideoSDPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _is_vc2(unet) -> bool:
    from ..models.videocrafter2 import VideoCrafter2UNet3DConditionModel
    return isinstance(unet, VideoCrafter2UNet3DConditionModel) and bool(unet.config.fps_cond)

