"""The LTX-Video pipeline family: diffusers ``LTXPipeline``, ``LTXImageToVideoPipeline`` and
``LTXConditionPipeline`` folders (LTX-Video 0.9.x: T5 text, ``LTXVideoTransformer3DModel``,
``AutoencoderKLLTXVideo`` with 1:8 temporal and 32x spatial compression, flow-matching Euler
with a shift that grows with the video's tokens).

Video frames are ``8k + 1``: latent frame 0 is one video frame, every later one eight. The
clips split latent frames; the engine keeps the latents 5-D and packs each rank's clip into
the transformer's tokens per call (``num_frames`` = the clip's latent frames). Text is T5,
128 tokens, with its mask; classifier-free guidance runs in the batch (the stock pipeline
does the same). The frame rate conditions the model through RoPE (``--fps``, default 25).
Images (an image at frame 0, or an extension's ``8k + 1`` context frames) are held by their
clean latent frames with timestep 0 on their tokens, as ``LTXImageToVideoPipeline`` holds
its first frame. The non-causal VAE decodes each rank's clip exactly from a window of
latent frames on both sides (``vinf_engine.ltx_vae``).

``LTXConditionPipeline`` (0.9.5 on) samples otherwise, and its folders run as it does: its
linear-quadratic timesteps stepped per token, RoPE at causal time coordinates (a latent frame
at its first video frame: ``video_coords``), 256 text tokens, and held frames (its
conditions at ``frame_index`` 0) re-noised at each step by ``0.15 t^2`` (its
``image_cond_noise_scale``), with the noise drawn per global frame. Its conditions at
``frame_index > 0`` append their latent tokens to the sequence at their own positions:
tokens that are no frame of the video, refused (``patch_pipe``).
"""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from .base import (Conditioning, PipelineFamily, VideoPlan, component_dirs_problem,
                   load_component, load_scheduler, load_transformers, read_json)
from .wan import latent_frame_of
from ..noise import step_noise

__all__ = ["LTXPipelines", "TEXT_LEN", "DEFAULT_FPS", "schedule_shift"]

TEXT_LEN = 128          # LTXPipeline.__call__'s max_sequence_length
CONDITION_TEXT_LEN = 256    # LTXConditionPipeline.__call__'s
CONDITION_NOISE = 0.15  # LTXConditionPipeline.__call__'s image_cond_noise_scale
DEFAULT_FPS = 25.0      # LTXPipeline.__call__'s frame_rate
_KINDS = {"LTXPipeline": "ltx-video", "LTXImageToVideoPipeline": "ltx-video-i2v",
          "LTXConditionPipeline": "ltx-video-condition"}
_PIPELINES = tuple(_KINDS)


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


def _with_condition_schedule(sched):
    """``sched`` (flow-matching) stepping as ``LTXConditionPipeline`` does: timesteps
    ``1000 x linear_quadratic_schedule(n)`` (the scheduler's own terminal stretch on its
    sigmas, not on them), and each step per token, from ``t / 1000`` to the largest sigma
    below it, on the negated prediction (the pipeline's ``per_token_timesteps`` step)."""
    cls = type(sched)
    sub = _SCHEDULE_CLASSES.get((cls, "condition"))
    if sub is None:
        def set_timesteps(self, num_inference_steps=None, device=None, **kw):
            from diffusers.pipelines.ltx.pipeline_ltx_condition import linear_quadratic_schedule
            ts = linear_quadratic_schedule(num_inference_steps) * 1000
            return cls.set_timesteps(self, timesteps=ts, device=device)

        def step(self, model_output, timestep, sample, **kw):
            t = torch.as_tensor(timestep, device=sample.device).float().reshape(1, 1)
            return cls.step(self, -model_output, timestep, sample, per_token_timesteps=t)
        sub = _SCHEDULE_CLASSES[cls, "condition"] = type(f"LTXCondition{cls.__name__}", (cls,), {
            "set_timesteps": set_timesteps, "step": step,
            "init_noise_sigma": getattr(cls, "init_noise_sigma", 1.0)})
    sched.__class__ = sub
    return sched


class LTXPipelines(PipelineFamily):
    name = "LTX-Video"
    runs = ("LTXPipeline, LTXImageToVideoPipeline and LTXConditionPipeline folders "
            "(LTX-Video 0.9.x; the last with images or videos at frame 0)")
    # LTXPipeline's own defaults: 50 steps, guidance 3, 25 fps (its frame_rate).
    defaults = dict(steps=50, guidance_scale=3.0, video_fps=DEFAULT_FPS)
    schedulers = {}                      # the pipeline's own flow-matching Euler only
    components = ("transformer", "vae", "text_encoder")
    takes = ("transformer", "LTXVideoTransformer3DModel",
             "LTXPipeline, LTXImageToVideoPipeline, LTXConditionPipeline")
    cuda_dtype = torch.bfloat16

    # ---------------------------------------------------------------- folders
    def claims_dir(self, index: dict) -> bool:
        name = str(index.get("_class_name", ""))
        return name.startswith("LTX") and not name.startswith("LTX2")

    def inspect(self, path: str, mi: dict) -> tuple:
        pipe_cls = mi.get("_class_name", "?")
        if pipe_cls not in _PIPELINES:
            return (f"{path!r} holds a {pipe_cls}; vinf_engine runs "
                    f"{', '.join(_PIPELINES)} folders of LTX-Video"), {}
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
        return None, dict(kind=_KINDS[pipe_cls], pipeline=pipe_cls)

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
        return _KINDS[type(pipe).__name__]

    def text_limit(self, pipe) -> int:
        return CONDITION_TEXT_LEN if _condition(pipe) else TEXT_LEN

    def patch_pipe(self, pipe, patcher) -> None:
        """``LTXConditionPipeline``: its ``prepare_latents`` refuses conditions at
        ``frame_index > 0`` first thing (the same call on every rank, before the VAE encodes
        any condition and before the denoiser's first collective)."""
        if not _condition(pipe):
            return

        def make(inner):
            def prepare_latents(conditions=None, condition_strength=None,
                                condition_frame_index=None, *args, **kwargs):
                late = [(i, f) for i, f in enumerate(condition_frame_index or ()) if f != 0]
                if late:
                    i, f = late[0]
                    raise ValueError(
                        f"LTXConditionPipeline condition {i} is at frame_index {f}: a condition "
                        "after frame 0 appends its latent tokens to the sequence at their own "
                        "positions, tokens that are no frame of the video, which clip "
                        "parallelism cannot split across ranks. Under vinf_engine, condition "
                        "at frame_index 0 (an image, or a video of 8k+1 frames), or extend a "
                        "video (vinf.generate(..., extend=...)); for images later in the "
                        "video, a family with mid-video keyframes (Wan image-to-video: "
                        "vinf.generate(..., images=[(frame, image)]))")
                return inner(conditions, condition_strength, condition_frame_index, *args,
                             **kwargs)
            return prepare_latents
        patcher.replace_method(pipe, "prepare_latents", make)

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
        if _condition(pipe):
            return _with_condition_schedule(sched)
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
        if _condition(pipe) and pipe.scheduler.config.get("use_dynamic_shifting"):
            p.append("LTXConditionPipeline sets its timesteps without a shift (mu), and this "
                     "folder's scheduler has use_dynamic_shifting, with which the stock "
                     "pipeline fails too: set it false in scheduler/scheduler_config.json")
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
        if _condition(pipe):
            cond = _ConditionPipelineConditioning(pipe, s, plan, frames, device,
                                                  self.fps_conditioning(s, pipe))
            if visual:
                # LTXConditionPipeline normalises a condition's latents without the scaling
                cond.hold(_clean_start(pipe, plan, visual, device, scaling=1.0), frames)
            return cond
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


def _condition(pipe) -> bool:
    return type(pipe).__name__ == "LTXConditionPipeline"


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

    text_len = TEXT_LEN

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
                max_sequence_length=self.text_len, device=device)
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
                         timestep=ts, encoder_attention_mask=self.mask, return_dict=False,
                         **self._positions(F, h, w))[0]
        out = out.float().unflatten(1, (F, h, w)).permute(0, 4, 1, 2, 3)
        return self.guided(out, self.guidance)

    def _positions(self, F: int, h: int, w: int) -> dict:
        return dict(num_frames=F, height=h, width=w, rope_interpolation_scale=self.scale)


class _ConditionPipelineConditioning(_Conditioning):
    """``LTXConditionPipeline``'s sampling over one rank's clip: RoPE at the whole video's
    causal ``video_coords``; held frames (its conditions at frame 0, strength 1) at their
    clean latents plus ``0.15 * noise * (t / 1000)^2``, the noise of step ``i`` drawn per
    global frame (``step_noise``), never stepped, timestep 0 on their tokens. The stock
    pipeline re-noises them before each step and never after the last: the final latents
    hold the last step's."""

    text_len = CONDITION_TEXT_LEN

    def __init__(self, pipe, s, plan, frames: range, device, fps: float):
        super().__init__(pipe, s, plan, device, fps)
        self.seed, self.shape, self.frames, self.device = s.seed, plan.shape, frames, device
        _, _, L, h, w = plan.shape
        # The pipeline's own coordinates: latent frame f at video frame max(0, 8f - 7).
        ids = pipe._prepare_video_ids(1, L, h, w, patch_size=pipe.transformer_spatial_patch_size,
                                      patch_size_t=pipe.transformer_temporal_patch_size,
                                      device=device)
        ids = pipe._scale_video_ids(ids, scale_factor=pipe.vae_spatial_compression_ratio,
                                    scale_factor_t=pipe.vae_temporal_compression_ratio,
                                    frame_index=0, device=device).float()
        ids[:, 0] = ids[:, 0] * (1.0 / fps)
        self.coords = ids

    def _positions(self, F: int, h: int, w: int) -> dict:
        return dict(video_coords=self.coords)

    def _held_in(self, x):
        return x                            # held in the latents themselves (``_noised``)

    def _noised(self, sched, latents, i: int):
        if self._clean is None:
            return latents
        n = self._clean.shape[2]
        t = sched.timesteps[i]
        noise = step_noise(self.seed, i, self.shape, range(self.frames.start, self.frames.start + n),
                           device=latents.device)
        latents = latents.clone()
        latents[:, :, :n] = (self._clean.to(latents.dtype) + CONDITION_NOISE * noise
                             * ((t.to(latents.device) / 1000.0) ** 2))
        return latents

    def prepare(self, sched, latents):
        return self._noised(sched, latents, 0)

    def after_step(self, sched, latents, i: int):
        return self._noised(sched, latents, min(i + 1, len(sched.timesteps) - 1))


def _clean_start(pipe, plan, visual, device, scaling: float | None = None) -> torch.Tensor:
    """The clean latents of the video's first latent frames: the images that open it (``8k +
    1`` of them) encoded as a video's start by the causal encoder (its distribution's mode),
    normalised as LTXPipeline normalises, (1, C, k + 1, h, w) fp32."""
    vae = pipe.vae
    video = torch.cat([pipe.video_processor.preprocess(im, height=plan.height, width=plan.width)
                       for _, im in visual.keyframes]).transpose(0, 1)[None]   # (1, 3, n, H, W)
    with torch.no_grad():
        z = vae.encode(video.to(device, vae.dtype)).latent_dist.mode()
    return pipe._normalize_latents(z.float(), vae.latents_mean, vae.latents_std,
                                   vae.config.scaling_factor if scaling is None else scaling)
