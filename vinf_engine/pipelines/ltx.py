"""The LTX-Video pipeline family: diffusers ``LTXPipeline`` and ``LTXImageToVideoPipeline``
folders (LTX-Video 0.9.x: T5 text, ``LTXVideoTransformer3DModel``, ``AutoencoderKLLTXVideo``
with 1:8 temporal and 32x spatial compression, flow-matching Euler with a shift that grows
with the video's tokens).

Video frames are ``8k + 1``: latent frame 0 is one video frame, every later one eight. The
clips split latent frames; the engine keeps the latents 5-D and packs each rank's clip into
the transformer's tokens per call (``num_frames`` = the clip's latent frames). Text is T5,
128 tokens, with its mask; classifier-free guidance runs in the batch (the stock pipeline
does the same). The frame rate conditions the model through RoPE (``--fps``, default 25).
Images (an image at frame 0, or an extension's ``8k + 1`` context frames) are held by their
clean latent frames with timestep 0 on their tokens, as ``LTXImageToVideoPipeline`` holds
its first frame. The non-causal VAE decodes each rank's clip exactly from a window of
latent frames on both sides (``vinf_engine.ltx_vae``).
"""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from .base import (Conditioning, PipelineFamily, VideoPlan, component_dirs_problem,
                   load_component, load_scheduler, load_transformers, read_json)
from .wan import latent_frame_of

__all__ = ["LTXPipelines", "TEXT_LEN", "DEFAULT_FPS", "schedule_shift"]

TEXT_LEN = 128          # LTXPipeline.__call__'s max_sequence_length
DEFAULT_FPS = 25.0      # LTXPipeline.__call__'s frame_rate
_PIPELINES = ("LTXPipeline", "LTXImageToVideoPipeline")


def schedule_shift(pipe, plan, trained: int) -> float:
    """The flow-matching shift ``mu`` LTXPipeline computes from the video's token count
    (linear in it, unbounded), taken at ``min(latent frames, trained)`` latent frames: for a
    video within the trained length it is the stock value; past it, each query attends about
    the trained length's frames (dual scope), and diffusers' long-video pipeline
    (``LTXI2VLongMultiPromptPipeline``) likewise shifts by one temporal tile's tokens."""
    from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift
    cfg = pipe.scheduler.config
    tokens = min(plan.latent_frames, trained) * plan.shape[3] * plan.shape[4]
    return calculate_shift(tokens, cfg.get("base_image_seq_len", 256),
                           cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                           cfg.get("max_shift", 1.15))


_SCHEDULE_CLASSES: dict = {}


def _with_schedule(sched, mu: float):
    """``sched`` (flow-matching) whose ``set_timesteps(n, device)`` makes LTXPipeline's
    schedule: sigmas ``linspace(1, 1/n, n)`` shifted by ``mu``."""
    cls = type(sched)
    sub = _SCHEDULE_CLASSES.get(cls)
    if sub is None:
        def set_timesteps(self, num_inference_steps=None, device=None, **kw):
            n = num_inference_steps
            sigmas = np.linspace(1.0, 1 / n, n)
            return cls.set_timesteps(self, sigmas=sigmas, device=device, mu=self.vinf_mu)
        # init_noise_sigma: the loop scales the initial noise by it; flow matching starts
        # at sigma 1 (LTXPipeline's latents are the noise itself).
        sub = _SCHEDULE_CLASSES[cls] = type(f"LTX{cls.__name__}", (cls,), {
            "set_timesteps": set_timesteps, "init_noise_sigma": getattr(cls, "init_noise_sigma", 1.0)})
    sched.__class__ = sub
    sched.vinf_mu = float(mu)
    return sched


class LTXPipelines(PipelineFamily):
    name = "LTX-Video"
    runs = "LTXPipeline and LTXImageToVideoPipeline folders (LTX-Video 0.9.x)"
    # LTXPipeline's own defaults: 50 steps, guidance 3, 25 fps (its frame_rate).
    defaults = dict(steps=50, guidance_scale=3.0, video_fps=DEFAULT_FPS)
    schedulers = {}                      # the pipeline's own flow-matching Euler only
    components = ("transformer", "vae", "text_encoder")
    takes = ("transformer", "LTXVideoTransformer3DModel",
             "LTXPipeline, LTXImageToVideoPipeline")
    cuda_dtype = torch.bfloat16

    # ---------------------------------------------------------------- folders
    def claims_dir(self, index: dict) -> bool:
        name = str(index.get("_class_name", ""))
        return name.startswith("LTX") and not name.startswith("LTX2")

    def inspect(self, path: str, mi: dict) -> tuple:
        pipe_cls = mi.get("_class_name", "?")
        if pipe_cls not in _PIPELINES:
            return (f"{path!r} holds a {pipe_cls}; vinf_engine runs LTXPipeline and "
                    "LTXImageToVideoPipeline folders (LTXConditionPipeline's sequence "
                    "conditioning appends tokens that are no frame of the video)"), {}
        need = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
        problem = component_dirs_problem(path, mi, need, pipe_cls, self.runs)
        if problem:
            return problem, {}
        cfg_path = os.path.join(path, "transformer", "config.json")
        try:
            cls = read_json(cfg_path).get("_class_name")
        except (OSError, ValueError) as e:
            return f"{cfg_path} is unreadable: {e}", {}
        if cls != "LTXVideoTransformer3DModel":
            return f"{path!r}: transformer is {cls}; expected LTXVideoTransformer3DModel", {}
        if mi["vae"][1] != "AutoencoderKLLTXVideo":
            return f"{path!r}: vae is {mi['vae'][1]}; expected AutoencoderKLLTXVideo", {}
        for c in ("text_encoder", "tokenizer"):
            if mi[c][0] != "transformers":
                return f"{path!r}: {c} comes from {mi[c][0]!r}; expected a transformers class", {}
        kind = "ltx-video-i2v" if pipe_cls == "LTXImageToVideoPipeline" else "ltx-video"
        return None, dict(kind=kind, pipeline=pipe_cls)

    def load(self, path: str, info: dict, dtype, device):
        import diffusers
        from diffusers import AutoencoderKLLTXVideo, LTXVideoTransformer3DModel
        kw = dict(dtype=dtype, output_loading_info=True, local_files_only=True)
        parts = dict(transformer=load_component("transformer", lambda: (
            LTXVideoTransformer3DModel.from_pretrained(path, subfolder="transformer", **kw)), path))
        # The VAE stays fp32 whatever the transformer's dtype: decoding is a small share of
        # the run and low precision costs it quality.
        parts["vae"] = load_component("vae", lambda: AutoencoderKLLTXVideo.from_pretrained(
            path, subfolder="vae", **dict(kw, dtype=torch.float32)), path)
        parts.update(load_transformers(info["index"], path, dtype))
        parts["scheduler"] = load_scheduler(path)
        pipe = getattr(diffusers, info["pipeline"])(**parts)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    # ---------------------------------------------------------------- a loaded pipeline
    def claims(self, pipe) -> bool:
        from diffusers import LTXVideoTransformer3DModel
        return (isinstance(getattr(pipe, "transformer", None), LTXVideoTransformer3DModel)
                and type(pipe).__name__ in _PIPELINES)

    def kind(self, pipe) -> str:
        return "ltx-video-i2v" if type(pipe).__name__ == "LTXImageToVideoPipeline" else "ltx-video"

    def text_limit(self, pipe) -> int:
        return TEXT_LEN

    def scheduler_problem(self, name: str | None) -> str | None:
        if name is not None:
            return (f"unknown scheduler {name!r}: LTX-Video runs its pipeline's own "
                    "flow-matching Euler scheduler (its shifted sigmas); leave --scheduler unset")
        return None

    def fps_conditioning(self, s, pipe) -> float:
        return float(s.fps) if s.fps is not None else DEFAULT_FPS

    def make_scheduler(self, pipe, name: str | None, plan=None):
        from ..models.ltx import TRAINED_FRAMES
        sched = super().make_scheduler(pipe, name)
        if plan is None:                 # checking the steps only: the trained length's shift
            h, w = 512 // 32, 704 // 32
            plan = VideoPlan(frames=161, latent_frames=TRAINED_FRAMES, shape=(1, 1, 1, h, w),
                             height=512, width=704, scene_starts=(0,))
        return _with_schedule(sched, schedule_shift(pipe, plan, TRAINED_FRAMES))

    def check(self, s, pipe) -> list[str]:
        tr = pipe.transformer
        kt, ks = pipe.vae_temporal_compression_ratio, pipe.vae_spatial_compression_ratio
        p = _frame_problems(s, kt)
        for name, v in (("height", s.height or 512), ("width", s.width or 704)):
            if v % ks:
                p.append(f"{name} {v} is not a multiple of {ks}: the VAE downsamples by {ks} "
                         f"(try {max(ks, v // ks * ks)})")
        if s.steps == 1 and pipe.scheduler.config.get("shift_terminal"):
            p.append("LTX-Video's schedule needs at least 2 steps: its sigmas are stretched to "
                     "end at shift_terminal, which one step (sigma 1) makes 0/0")
        if s.guidance_scale_2 is not None:
            p.append("guidance scale 2 is for Wan 2.2's second expert; LTX-Video has one "
                     "transformer")
        if len(s.scenes) > 1:
            p.append(f"LTX-Video takes one prompt per video here; got {len(s.scenes)} scenes "
                     "(per-frame text is not built for this family yet)")
        z = pipe.vae.config.latent_channels
        if tr.config.in_channels != z:
            p.append(f"the VAE's {z} latent channels do not match the transformer's "
                     f"{tr.config.in_channels} input channels")
        d_model = getattr(pipe.text_encoder.config, "d_model", None)
        if d_model is not None and d_model != tr.config.caption_channels:
            p.append(f"the text encoder's width {d_model} does not match the transformer's "
                     f"caption width {tr.config.caption_channels}")
        if not p:
            from ..models.ltx import window_problem
            try:
                w = window_problem(tr, s.resolved_config(self.default_config(pipe)),
                                   (s.video_frames - 1) // kt + 1)
            except (TypeError, ValueError):
                w = None                     # a bad config is reported by the settings' check
            if w:
                p.append(w)
        return p

    def plan(self, s, pipe) -> VideoPlan:
        kt, ks = pipe.vae_temporal_compression_ratio, pipe.vae_spatial_compression_ratio
        H, W = s.height or 512, s.width or 704
        n = s.video_frames
        L = (n - 1) // kt + 1
        shape = (1, pipe.transformer.config.in_channels, L, H // ks, W // ks)
        return VideoPlan(frames=n, latent_frames=L, shape=shape, height=H, width=W,
                         scene_starts=tuple(latent_frame_of(f, kt) for f, _ in s.scenes),
                         temporal=kt)

    def check_visual(self, s, pipe, visual) -> list[str]:
        if not visual:
            return []
        kt = pipe.vae_temporal_compression_ratio
        frames = visual.frames
        if frames != tuple(range(len(frames))) or (len(frames) - 1) % kt:
            what = (f"--extend's {len(frames)} context frames" if s.extend is not None
                    else f"images at frames {list(frames)}")
            return [f"LTX-Video holds an image by its clean latent frames (as "
                    f"LTXImageToVideoPipeline holds its first frame), and the causal encoder "
                    f"makes latent frames that depend on images alone only from all of the "
                    f"video's first {kt}k+1 frames (an image at frame 0, or {kt}k+1 context "
                    f"frames); got {what}"]
        return []

    def prefix_frames(self, pipe, visual, plan):
        from ..video import frames_to_uint8
        return np.concatenate([frames_to_uint8(pipe.video_processor.preprocess(
            Image.fromarray(f), height=plan.height, width=plan.width)) for f in visual.prefix])

    def encode(self, pipe, s, plan, frames: range, device, visual=None):
        cond = _Conditioning(pipe, s, plan, device, self.fps_conditioning(s, pipe))
        if visual:
            cond.hold(_clean_start(pipe, plan, visual, device), frames)
        return cond

    def decode(self, pipe, latents, layout, rank: int, comm, chunk: int):
        """This rank's video frames, pieces of the global grid of ``chunk`` latent frames:
        (n, H, W, 3) uint8 on the CPU. The latent frames on both sides of the clip that the
        non-causal decoder reads come from the ranks that hold them, in one exchange."""
        from ..ltx_vae import decode_clip, needed_range
        from ..video import frames_to_uint8
        vae, F = pipe.vae, layout.num_frames
        needs = [needed_range(vae, layout.start(r), layout.end(r), F, chunk)
                 for r in range(layout.world_size)]
        wants = tuple(tuple(f for f in needs[r] if f not in layout.frames(r))
                      for r in range(layout.world_size))
        got = comm.gather_frames(latents.contiguous(), 2, layout, wants)
        left = sum(1 for f in wants[rank] if f < layout.start(rank))
        z = torch.cat([got[:, :, :left], latents, got[:, :, left:]], dim=2)
        z = pipe._denormalize_latents(z.float(), pipe.vae.latents_mean, pipe.vae.latents_std,
                                      vae.config.scaling_factor).to(vae.dtype)
        # LTXPipeline's default decode_timestep 0: no decode noise, the decoder's timestep 0.
        temb = (torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)
                if vae.config.timestep_conditioning else None)
        for piece in decode_clip(vae, z, offset=needs[rank].start, frames=layout.frames(rank),
                                 num_frames=F, chunk=chunk, temb=temb):
            yield frames_to_uint8(piece[0].permute(1, 0, 2, 3))


def _frame_problems(s, kt: int) -> list[str]:
    n = s.video_frames
    if not (n - 1) % kt:
        return []
    if s.extend is not None:
        c = n - s.num_frames
        lo = (n - 1) // kt * kt + 1 - c
        return [f"with --extend, --frames counts the new frames, and the context's {c} plus "
                f"them must be {kt}k+1 for LTX-Video, got {c} + {s.num_frames} = {n} (try "
                f"--frames {lo} or {lo + kt})"]
    lo = (n - 1) // kt * kt + 1
    return [f"frames must be {kt}k+1 for LTX-Video (its VAE makes {kt} video frames of each "
            f"latent frame after the first), got {n} (try {lo} or {lo + kt})"]


class _Conditioning(Conditioning):
    """T5 text for one rank's clip and one guided transformer evaluation per step: the clip's
    latents packed into tokens, its latent frame count, the frame rate's RoPE scale."""

    def __init__(self, pipe, s, plan, device, fps: float):
        super().__init__()
        self.model = pipe.transformer
        self.cfg = s.guidance_scale > 1.0
        self.guidance = s.guidance_scale
        kt, ks = pipe.vae_temporal_compression_ratio, pipe.vae_spatial_compression_ratio
        self.scale = (kt / fps, ks, ks)         # LTXPipeline's rope_interpolation_scale
        self._clean = None
        with torch.no_grad():
            cond, mask, neg, neg_mask = pipe.encode_prompt(
                prompt=s.scenes[0][1], negative_prompt=s.negative_prompt,
                do_classifier_free_guidance=self.cfg, num_videos_per_prompt=1,
                max_sequence_length=TEXT_LEN, device=device)
        self.text = (torch.cat([neg, cond]) if self.cfg else cond).to(self.model.dtype)
        self.mask = torch.cat([neg_mask, mask]) if self.cfg else mask

    def hold(self, clean: torch.Tensor, frames: range):
        """Hold the video's first latent frames at ``clean`` (1, C, n, h, w): their tokens get
        the clean latent and timestep 0, and the final latents take them (the stock pipeline
        never steps them; the Euler step is elementwise, so the other frames are the same)."""
        n = max(0, min(clean.shape[2], frames.stop) - frames.start)
        self._clean = clean[:, :, frames.start:frames.start + n] if n else None

    def _held_in(self, x):
        if self._clean is None:
            return x
        x = x.clone()
        x[:, :, :self._clean.shape[2]] = self._clean.to(x.dtype)
        return x

    def finish(self, latents):
        return self._held_in(latents)

    def predict(self, x, t):
        """The guided flow prediction for this rank's latents ``x`` (1, C, F, h, w) at ``t``."""
        x = self._held_in(x)
        xin = torch.cat([x] * 2) if self.cfg else x
        B, C, F, h, w = xin.shape
        t = torch.as_tensor(t, device=x.device)
        if self._clean is not None:            # timestep 0 on the held frames' tokens
            ts = t.expand(B, F * h * w).clone()
            ts[:, :self._clean.shape[2] * h * w] = 0
        else:
            ts = t.expand(B)
        tokens = xin.permute(0, 2, 3, 4, 1).flatten(1, 3)          # LTXPipeline._pack_latents
        out = self.model(hidden_states=tokens.to(self.model.dtype), encoder_hidden_states=self.text,
                         timestep=ts, encoder_attention_mask=self.mask, num_frames=F, height=h,
                         width=w, rope_interpolation_scale=self.scale, return_dict=False)[0]
        out = out.float().unflatten(1, (F, h, w)).permute(0, 4, 1, 2, 3)
        return self.guided(out, self.guidance)


def _clean_start(pipe, plan, visual, device) -> torch.Tensor:
    """The clean latents of the video's first latent frames: the images that open it (``8k +
    1`` of them) encoded as a video's start by the causal encoder (its distribution's mode),
    normalised as LTXPipeline normalises, (1, C, k + 1, h, w) fp32."""
    vae = pipe.vae
    video = torch.cat([pipe.video_processor.preprocess(im, height=plan.height, width=plan.width)
                       for _, im in visual.keyframes]).transpose(0, 1)[None]   # (1, 3, n, H, W)
    with torch.no_grad():
        z = vae.encode(video.to(device, vae.dtype)).latent_dist.mode()
    return pipe._normalize_latents(z.float(), vae.latents_mean, vae.latents_std,
                                   vae.config.scaling_factor)
