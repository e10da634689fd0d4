"""The HunyuanVideo (1.0) pipeline family: diffusers ``HunyuanVideoPipeline`` folders (Llama
text with the pipeline's prompt template and mask, CLIP pooled text,
``HunyuanVideoTransformer3DModel``, ``AutoencoderKLHunyuanVideo`` with 1:4 temporal and 8x
spatial compression, flow-matching Euler with the pipeline's ``linspace(1, 0)`` sigmas).

Video frames are ``4k + 1`` (latent frame 0 is one video frame, every later one four); the
clips split latent frames. The text joins every attention (``layers.joint_attention``), so a
video has one prompt. HunyuanVideo 1.0 is guidance-distilled: ``guidance_scale`` feeds the
transformer's guidance embedding (x1000, as the stock pipeline does) and there is one
evaluation per step; the stock pipeline's *true* classifier-free guidance (a negative
prompt with ``true_cfg_scale > 1``) is not run here and is refused. The VAE decodes each
rank's frames as ``vae.decode``'s own temporal tiles (``vinf_engine.hunyuan_vae``), bitwise
the stock decode.

Not run: image-to-video (``HunyuanVideoImageToVideoPipeline``, SkyReels) and Framepack.
HunyuanVideo 1.5 (``HunyuanVideo15Pipeline``) is its own family, on this one:
``hunyuan_video15.py``.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from ..errors import GenerationError
from .base import (Conditioning, PipelineFamily, VideoPlan, component_dirs_problem,
                   load_component, load_scheduler, load_transformers, read_json)

__all__ = ["HunyuanVideoPipelines", "TEXT_LEN", "DEFAULT_HW"]

TEXT_LEN = 256              # HunyuanVideoPipeline.__call__'s max_sequence_length
DEFAULT_HW = (720, 1280)    # HunyuanVideoPipeline.__call__'s height and width
_NOT_RUN = {
    "HunyuanVideoImageToVideoPipeline": "image-to-video is not run under clip parallelism",
    "HunyuanSkyreelsImageToVideoPipeline": "image-to-video is not run under clip parallelism",
    "HunyuanVideoFramepackPipeline": "Framepack's history tokens are not frames of the video",
}
_SCHEDULE_CLASSES: dict = {}


def _with_schedule(sched):
    """``sched`` (flow-matching Euler) whose ``set_timesteps(n, device)`` makes
    HunyuanVideoPipeline's schedule: sigmas ``linspace(1, 0, n + 1)[:-1]``, then the
    scheduler's own shift."""
    cls = type(sched)
    sub = _SCHEDULE_CLASSES.get(cls)
    if sub is None:
        def set_timesteps(self, num_inference_steps=None, device=None, **kw):
            sigmas = np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1]
            return cls.set_timesteps(self, sigmas=sigmas, device=device)
        # The pipeline's initial latents are the noise itself (sigma 1).
        sub = _SCHEDULE_CLASSES[cls] = type(f"Hunyuan{cls.__name__}", (cls,), {
            "set_timesteps": set_timesteps,
            "init_noise_sigma": getattr(cls, "init_noise_sigma", 1.0)})
    sched.__class__ = sub
    return sched


class HunyuanVideoPipelines(PipelineFamily):
    name = "HunyuanVideo"
    runs = "HunyuanVideoPipeline folders (HunyuanVideo 1.0 text-to-video)"
    # HunyuanVideoPipeline's own defaults (50 steps, embedded guidance 6); the model makes
    # 24 fps video (129 frames, about 5 s).
    defaults = dict(steps=50, guidance_scale=6.0, video_fps=24.0)
    schedulers = {}                      # the pipeline's own flow-matching Euler only
    components = ("transformer", "vae", "text_encoder", "text_encoder_2")
    takes = ("transformer", "HunyuanVideoTransformer3DModel", "HunyuanVideoPipeline")
    cuda_dtype = torch.bfloat16

    # ---------------------------------------------------------------- folders
    def claims_dir(self, index: dict) -> bool:
        name = str(index.get("_class_name", ""))
        return (name.startswith(("HunyuanVideo", "HunyuanSkyreels"))
                and not name.startswith("HunyuanVideo15"))

    # What a folder of the family holds (a variant names its own).
    pipeline_class = "HunyuanVideoPipeline"
    transformer_class = "HunyuanVideoTransformer3DModel"
    vae_class = "AutoencoderKLHunyuanVideo"
    diffusers_parts = ()                 # further diffusers components: (name, class name)
    not_run = _NOT_RUN

    def inspect(self, path: str, mi: dict) -> tuple:
        pipe_cls = mi.get("_class_name", "?")
        if pipe_cls != self.pipeline_class:
            why = self.not_run.get(pipe_cls, "not a pipeline vinf_engine knows")
            return (f"{path!r} holds a {pipe_cls} ({why}); vinf_engine runs {self.runs}"), {}
        need = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2",
                "tokenizer_2", "scheduler", *(n for n, _ in self.diffusers_parts))
        problem = component_dirs_problem(path, mi, need, pipe_cls, self.runs)
        if problem:
            return problem, {}
        cfg_path = os.path.join(path, "transformer", "config.json")
        try:
            cls = read_json(cfg_path).get("_class_name")
        except (OSError, ValueError) as e:
            return f"{cfg_path} is unreadable: {e}", {}
        if cls != self.transformer_class:
            return (f"{path!r}: transformer is {cls}; {self.name} needs "
                    f"{self.transformer_class}"), {}
        for name, want in (("vae", self.vae_class), *self.diffusers_parts):
            if mi[name][1] != want:
                return f"{path!r}: {name} is {mi[name][1]}; expected {want}", {}
        for c in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
            if mi[c][0] != "transformers":
                return f"{path!r}: {c} comes from {mi[c][0]!r}; expected a transformers class", {}
        return None, dict(kind=self.kind(None), pipeline=pipe_cls)

    def load(self, path: str, info: dict, dtype, device):
        import diffusers
        kw = dict(dtype=dtype, output_loading_info=True, local_files_only=True)
        tr_cls, vae_cls = (getattr(diffusers, c) for c in (self.transformer_class,
                                                           self.vae_class))
        parts = dict(transformer=load_component("transformer", lambda: (
            tr_cls.from_pretrained(path, subfolder="transformer", **kw)), path))
        # The VAE stays fp32 whatever the transformer's dtype: decoding is a small share of
        # the run and low precision costs it quality.
        parts["vae"] = load_component("vae", lambda: vae_cls.from_pretrained(
            path, subfolder="vae", **dict(kw, dtype=torch.float32)), path)
        parts.update(load_transformers(info["index"], path, dtype))
        parts.update(load_transformers(info["index"], path, dtype,
                                       ("text_encoder_2", "tokenizer_2")))
        parts["scheduler"] = load_scheduler(path)
        for name, cls in self.diffusers_parts:
            try:
                parts[name] = getattr(diffusers, cls).from_pretrained(
                    path, subfolder=name, local_files_only=True)
            except (OSError, ValueError) as e:
                raise GenerationError(f"cannot load {name} from {path!r}: {e}") from None
        pipe = getattr(diffusers, self.pipeline_class)(**parts)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    # ---------------------------------------------------------------- a loaded pipeline
    def claims(self, pipe) -> bool:
        from diffusers import HunyuanVideoTransformer3DModel
        return isinstance(getattr(pipe, "transformer", None), HunyuanVideoTransformer3DModel)

    def kind(self, pipe) -> str:
        return "hunyuanvideo"

    def text_limit(self, pipe) -> int:
        return TEXT_LEN

    def scheduler_problem(self, name: str | None) -> str | None:
        if name is not None:
            return (f"unknown scheduler {name!r}: HunyuanVideo runs its pipeline's own "
                    "flow-matching Euler scheduler (its shifted sigmas); leave --scheduler unset")
        return None

    def make_scheduler(self, pipe, name: str | None, plan=None):
        return _with_schedule(super().make_scheduler(pipe, name))

    def check(self, s, pipe) -> list[str]:
        p = self.model_problems(pipe) + self.guidance_problems(s)
        kt, ks = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
        n = s.video_frames
        if (n - 1) % kt:
            lo = (n - 1) // kt * kt + 1
            p.append(f"frames must be {kt}k+1 for {self.name} (its VAE makes {kt} video frames "
                     f"of each latent frame after the first), got {n} (try {lo} or {lo + kt})")
        step = ks * pipe.transformer.config.patch_size
        for name, v in (("height", s.height), ("width", s.width)):
            if v is not None and v % step:
                p.append(f"{name} {v} is not a multiple of {step}: the VAE downsamples by {ks} "
                         f"and the transformer patches by {pipe.transformer.config.patch_size} "
                         f"more (try {max(step, v // step * step)})")
        if s.fps is not None:
            p.append(f"--fps conditions VideoCrafter2 and LTX-Video only; {self.name} has no fps "
                     "input (use --video-fps for the mp4's frame rate)")
        if s.guidance_scale_2 is not None:
            p.append(f"guidance scale 2 is for Wan 2.2's second expert; {self.name} has one "
                     "transformer")
        if len(s.scenes) > 1:
            p.append(f"{self.name} takes one prompt per video: its text tokens share every "
                     "frame's attention, so they cannot change from scene to scene")
        if not p:
            from ..models.base import window_past_trained_range
            adapter = self.adapter()
            try:
                config = s.resolved_config(self.default_config(pipe))
                w = window_past_trained_range(config.window, (n - 1) // kt + 1,
                                              adapter.trained_frames(pipe.transformer, config))
            except (TypeError, ValueError):
                w = None                     # a bad config is reported by the settings' check
            if w:
                p.append(w)
        return p

    def adapter(self):
        from ..models.hunyuan_video import HunyuanVideoAdapter
        return HunyuanVideoAdapter

    def model_problems(self, pipe) -> list[str]:
        return _model_problems(pipe)

    def guidance_problems(self, s) -> list[str]:
        if s.negative_prompt is not None:
            return ["HunyuanVideo 1.0 is guidance-distilled: guidance_scale feeds its guidance "
                    "embedding; true classifier-free guidance with a negative prompt "
                    "(HunyuanVideoPipeline's true_cfg_scale) is not supported"]
        return []

    def size(self, s, pipe) -> tuple[int, int]:
        """The video's (height, width): the run's, else the pipeline's default."""
        return s.height or DEFAULT_HW[0], s.width or DEFAULT_HW[1]

    def latent_channels(self, pipe) -> int:
        return pipe.transformer.config.in_channels

    def plan(self, s, pipe) -> VideoPlan:
        kt, ks = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
        H, W = self.size(s, pipe)
        n = s.video_frames
        L = (n - 1) // kt + 1
        shape = (1, self.latent_channels(pipe), L, H // ks, W // ks)
        return VideoPlan(frames=n, latent_frames=L, shape=shape, height=H, width=W,
                         scene_starts=(0,), temporal=kt)

    def encode(self, pipe, s, plan, frames: range, device, visual=None):
        return _Conditioning(pipe, s, device)

    def decode(self, pipe, latents, layout, rank: int, comm, chunk: int):
        """This rank's video frames, one piece per VAE temporal tile: (n, H, W, 3) uint8 on
        the CPU. The latent frames of the tiles the clip's frames fall in (and of those their
        blends read) come from the ranks that hold them, in one exchange. ``chunk`` is not
        used: the tiles are the VAE's own (``tile_sample_min_num_frames``)."""
        from ..hunyuan_vae import decode_clip, needed_range
        from ..video import frames_to_uint8
        vae, F = pipe.vae, layout.num_frames
        needs = [needed_range(vae, layout.start(r), layout.end(r), F)
                 for r in range(layout.world_size)]
        wants = tuple(tuple(f for f in needs[r] if f not in layout.frames(r))
                      for r in range(layout.world_size))
        got = comm.gather_frames(latents.contiguous(), 2, layout, wants)
        left = sum(1 for f in wants[rank] if f < layout.start(rank))
        z = torch.cat([got[:, :, :left], latents, got[:, :, left:]], dim=2)
        # HunyuanVideoPipeline: latents.to(vae.dtype) / scaling_factor, then vae.decode.
        z = z.to(vae.dtype) / vae.config.scaling_factor
        for piece in decode_clip(vae, z, offset=needs[rank].start, frames=layout.frames(rank),
                                 num_frames=F):
            yield frames_to_uint8(piece[0].permute(1, 0, 2, 3))


def _model_problems(pipe) -> list[str]:
    """What of the loaded pipeline the family cannot run, whatever the settings."""
    tr, p = pipe.transformer, []
    if type(pipe).__name__ != "HunyuanVideoPipeline":
        why = _NOT_RUN.get(type(pipe).__name__, "not a pipeline vinf_engine knows")
        p.append(f"{type(pipe).__name__}: {why}; vinf_engine runs HunyuanVideoPipeline")
    from ..models.hunyuan_video import HunyuanVideoAdapter
    why = HunyuanVideoAdapter.check(tr)
    if why:
        p.append(f"the transformer cannot be parallelized: {why}")
    if tr.config.in_channels != pipe.vae.config.latent_channels:
        p.append(f"the VAE's {pipe.vae.config.latent_channels} latent channels do not match the "
                 f"transformer's {tr.config.in_channels} input channels")
    width = getattr(pipe.text_encoder.config, "hidden_size", None)
    if width is not None and width != tr.config.text_embed_dim:
        p.append(f"the Llama text encoder's width {width} does not match the transformer's "
                 f"text width {tr.config.text_embed_dim}")
    pooled = getattr(pipe.text_encoder_2.config, "hidden_size", None)
    if pooled is not None and pooled != tr.config.pooled_projection_dim:
        p.append(f"the CLIP text encoder's width {pooled} does not match the transformer's "
                 f"pooled width {tr.config.pooled_projection_dim}")
    return p


class _Conditioning(Conditioning):
    """Llama text (templated, masked) and CLIP pooled text for the video, and one transformer
    evaluation per step on this rank's clip with the embedded guidance."""

    def __init__(self, pipe, s, device):
        super().__init__()
        self.model = pipe.transformer
        dtype = self.model.dtype
        with torch.no_grad():
            text, pooled, mask = pipe.encode_prompt(
                prompt=s.scenes[0][1], prompt_2=None, num_videos_per_prompt=1, device=device,
                max_sequence_length=TEXT_LEN)
        # HunyuanVideoPipeline.__call__ casts all three to the transformer's dtype.
        self.text, self.pooled, self.mask = text.to(dtype), pooled.to(dtype), mask.to(dtype)
        self.guidance = torch.tensor([s.guidance_scale], dtype=dtype, device=device) * 1000.0

    def predict(self, x, t):
        """The flow prediction for this rank's latents ``x`` (1, C, F, h, w) at ``t``."""
        ts = torch.as_tensor(t, device=x.device).expand(x.shape[0]).to(x.dtype)
        out = self.model(hidden_states=x.to(self.model.dtype), timestep=ts,
                         encoder_hidden_states=self.text, encoder_attention_mask=self.mask,
                         pooled_projections=self.pooled, guidance=self.guidance,
                         return_dict=False)[0]
        return out.float()
