"""The Wan pipeline family: diffusers ``WanPipeline`` folders (Wan 2.1, Wan 2.2 A14B with two
experts, Wan 2.2 TI2V-5B with per-token timesteps and its 48-channel VAE).

Video frames are ``4k + 1``: latent frame 0 is one video frame, every later one four. The
clips split latent frames; scenes given on video frames start at the latent frame holding
their first frame. Text is UMT5 per scene; classifier-free guidance runs in the batch (the
stock pipeline runs two calls: the same numbers per sample). The causal VAE decodes each
rank's clip after a warm-up on the latent frames before it (``vinf_engine.wan_vae``), which
makes the split decode bitwise the whole decode.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from .base import (Conditioning, PipelineFamily, VideoPlan, component_dirs_problem,
                   load_component, load_scheduler, load_transformers, read_json)
from .wan_image import image_tokens, load_clip, mask_and_condition, takes_mask

__all__ = ["WanPipelines", "latent_frame_of"]

# WanPipeline.__call__'s max_sequence_length: UMT5 embeddings padded to 512 tokens.
TEXT_LEN = 512


def latent_frame_of(video_frame: int, temporal: int = 4) -> int:
    """The latent frame that decodes to ``video_frame``."""
    return 0 if video_frame == 0 else (video_frame - 1) // temporal + 1


class WanPipelines(PipelineFamily):
    name = "Wan"
    runs = ("WanPipeline folders (Wan 2.1, Wan 2.2 A14B, Wan 2.2 TI2V-5B) and "
            "WanImageToVideoPipeline folders (Wan 2.1 I2V / FLF2V, Wan 2.2 I2V-A14B)")
    # WanPipeline's own defaults (50 steps, guidance 5) and its examples' 16 fps export.
    defaults = dict(steps=50, guidance_scale=5.0, video_fps=16.0)
    # Flow-matching samplers that take Wan's scheduler config as it is.
    schedulers = {
        "unipc": ("UniPCMultistepScheduler", {}),
        "dpm++": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++")),
        "dpm++sde": ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++")),
    }
    components = ("transformer", "transformer_2", "vae", "text_encoder")
    cuda_dtype = torch.bfloat16
    size = (480, 832)              # WanPipeline's default (height, width)
    takes = ("transformer", "WanTransformer3DModel", "WanPipeline, WanImageToVideoPipeline, "
             "WanVideoToVideoPipeline, with Wan 2.2's transformer_2 too")

    # ---------------------------------------------------------------- folders
    def claims_dir(self, index: dict) -> bool:
        return str(index.get("_class_name", "")).startswith("Wan")

    def inspect(self, path: str, mi: dict) -> tuple:
        pipe_cls = mi.get("_class_name", "?")
        if pipe_cls not in ("WanPipeline", "WanImageToVideoPipeline"):
            return (f"{path!r} holds a {pipe_cls}; vinf_engine runs WanPipeline and "
                    "WanImageToVideoPipeline folders (Wan 2.1 T2V / I2V / FLF2V, Wan 2.2 "
                    "A14B T2V / I2V, Wan 2.2 TI2V-5B)"), {}
        need = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
        problem = component_dirs_problem(path, mi, need, pipe_cls, self.runs)
        if problem:
            return problem, {}
        clip = isinstance(mi.get("image_encoder"), list) and mi["image_encoder"][0] is not None
        if clip:
            problem = component_dirs_problem(path, mi, ("image_encoder", "image_processor"),
                                             pipe_cls, self.runs)
            if problem:
                return problem, {}
        two = isinstance(mi.get("transformer_2"), list) and mi["transformer_2"][0] is not None
        for name in ("transformer",) + (("transformer_2",) if two else ()):
            cfg_path = os.path.join(path, name, "config.json")
            try:
                cls = read_json(cfg_path).get("_class_name")
            except (OSError, ValueError) as e:
                return f"{cfg_path} is unreadable: {e}", {}
            if cls != "WanTransformer3DModel":
                return f"{path!r}: {name} is {cls}; expected WanTransformer3DModel", {}
        if mi["vae"][1] != "AutoencoderKLWan":
            return f"{path!r}: vae is {mi['vae'][1]}; expected AutoencoderKLWan", {}
        for c in ("text_encoder", "tokenizer"):
            if mi[c][0] != "transformers":
                return f"{path!r}: {c} comes from {mi[c][0]!r}; expected a transformers class", {}
        i2v = "-i2v" if pipe_cls == "WanImageToVideoPipeline" else ""
        kind = ("wan2.2-a14b" + i2v if two else "wan2.2-ti2v" if mi.get("expand_timesteps")
                else "wan2.1" + i2v)
        return None, dict(kind=kind, pipeline=pipe_cls, two_experts=two, clip=clip)

    def load(self, path: str, info: dict, dtype, device):
        from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
        mi = info["index"]
        kw = dict(dtype=dtype, output_loading_info=True, local_files_only=True)
        parts = {}
        for name in ("transformer", "transformer_2") if info["two_experts"] else ("transformer",):
            parts[name] = load_component(name, lambda n=name: WanTransformer3DModel.from_pretrained(
                path, subfolder=n, **kw), path)
        # The VAE stays fp32 whatever the transformer's dtype, as diffusers' Wan examples keep
        # it: decoding is a small share of the run and bf16 costs it visible quality.
        parts["vae"] = load_component("vae", lambda: AutoencoderKLWan.from_pretrained(
            path, subfolder="vae", **dict(kw, dtype=torch.float32)), path)
        parts.update(load_transformers(mi, path, dtype))
        parts["scheduler"] = load_scheduler(path)
        cls = WanPipeline
        if info["pipeline"] == "WanImageToVideoPipeline":
            from diffusers import WanImageToVideoPipeline as cls
            if info.get("clip"):
                parts.update(load_clip(mi, path, dtype))
        pipe = cls(**parts, boundary_ratio=mi.get("boundary_ratio"),
                   expand_timesteps=bool(mi.get("expand_timesteps", False)))
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    # ---------------------------------------------------------------- a loaded pipeline
    def claims(self, pipe) -> bool:
        from diffusers import WanTransformer3DModel
        return isinstance(getattr(pipe, "transformer", None), WanTransformer3DModel)

    def kind(self, pipe) -> str:
        i2v = "-i2v" if takes_mask(pipe) else ""
        if getattr(pipe, "transformer_2", None) is not None:
            return "wan2.2-a14b" + i2v
        return "wan2.2-ti2v" if pipe.config.expand_timesteps else "wan2.1" + i2v

    def text_limit(self, pipe) -> int:
        return TEXT_LEN

    def denoisers(self, pipe) -> list:
        return [m for m in (pipe.transformer, getattr(pipe, "transformer_2", None)) if m is not None]

    def adapter(self):
        """The model adapter of the family's transformers."""
        from ..models.wan import WanAdapter
        return WanAdapter

    def check(self, s, pipe) -> list[str]:
        from ..models.wan import window_problem
        tr, vae = pipe.transformer, pipe.vae
        p = []
        kt, ks = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
        n = s.video_frames
        if (n - 1) % kt and s.extend is not None:
            c = n - s.num_frames
            lo = (n - 1) // kt * kt + 1 - c
            p.append(f"with --extend, --frames counts the new frames, and the context's {c} "
                     f"plus them must be {kt}k+1 for Wan, got {c} + {s.num_frames} = {n} (try "
                     f"--frames {lo} or {lo + kt})")
        elif (n - 1) % kt:
            lo = (n - 1) // kt * kt + 1
            p.append(f"frames must be {kt}k+1 for Wan (its VAE makes {kt} video frames of each "
                     f"latent frame after the first), got {n} (try {lo} or {lo + kt})")
        step = ks * tr.config.patch_size[1]
        for name, v in (("height", s.height or self.size[0]), ("width", s.width or self.size[1])):
            if v % step:
                p.append(f"{name} {v} is not a multiple of {step}: the VAE downsamples by {ks} "
                         f"and the transformer patches by {tr.config.patch_size[1]} more (try "
                         f"{max(step, v // step * step)})")
        if s.fps is not None:
            p.append("--fps conditions VideoCrafter2 only; Wan has no fps input (use --video-fps "
                     "for the mp4's frame rate)")
        experts = self.denoisers(pipe)
        if s.guidance_scale_2 is not None and len(experts) == 1:
            p.append("guidance scale 2 is for Wan 2.2's second expert; this pipeline has one "
                     "transformer")
        ratio = pipe.config.get("boundary_ratio")
        if ratio is not None and len(experts) == 1:
            p.append(f"the pipeline names a boundary_ratio ({ratio}) but has "
                     "no transformer_2")
        if len(experts) == 2:
            for key in ("in_channels", "out_channels", "patch_size", "num_attention_heads",
                        "attention_head_dim", "text_dim", "rope_max_seq_len"):
                a, b = tr.config[key], experts[1].config[key]
                if a != b:
                    p.append(f"the two experts disagree on {key}: transformer {a}, "
                             f"transformer_2 {b}")
        z = vae.config.z_dim
        if tr.config.in_channels not in (z, 2 * z + pipe.vae_scale_factor_temporal):
            p.append(f"the VAE's {z} latent channels do not match the transformer's "
                     f"{tr.config.in_channels} input channels ({z}, or {2 * z + 4} with an "
                     "image-to-video model's mask and condition)")
        if tr.config.image_dim is not None and getattr(pipe, "image_encoder", None) is None:
            p.append("the transformer takes CLIP image tokens (image_dim set) but the pipeline "
                     "has no image_encoder")
        d_model = getattr(pipe.text_encoder.config, "d_model", None)
        if d_model is not None and d_model != tr.config.text_dim:
            p.append(f"the text encoder's width {d_model} does not match the transformer's "
                     f"text width {tr.config.text_dim}")
        if (n - 1) % kt == 0 and s.scenes:
            starts = [latent_frame_of(f, kt) for f, _ in s.scenes]
            if any(b <= a for a, b in zip(starts, starts[1:])):
                p.append(f"scenes starting at video frames {[f for f, _ in s.scenes]} share "
                         f"latent frames ({starts}): Wan's latent frames hold {kt} video frames "
                         "each; start scenes at least that far apart")
            try:
                w = window_problem(tr, s.resolved_config(self.default_config(pipe)),
                                   (n - 1) // kt + 1, self.adapter().trained_frames)
            except (TypeError, ValueError):
                w = None                     # a bad config is reported by the settings' check
            if w:
                p.append(w)
        return p

    def plan(self, s, pipe) -> VideoPlan:
        kt, ks = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
        H, W = s.height or self.size[0], s.width or self.size[1]
        n = s.video_frames
        L = (n - 1) // kt + 1
        shape = (1, pipe.vae.config.z_dim, L, H // ks, W // ks)
        return VideoPlan(frames=n, latent_frames=L, shape=shape, height=H, width=W,
                         scene_starts=tuple(latent_frame_of(f, kt) for f, _ in s.scenes),
                         temporal=kt)

    def check_visual(self, s, pipe, visual) -> list[str]:
        if takes_mask(pipe):           # mask and condition channels: an image at any frame
            return [] if visual else ["this image-to-video model needs an image (--image) or "
                                      "a video to extend (--extend)"]
        if not visual:
            return []
        kt = pipe.vae_scale_factor_temporal
        frames = visual.frames
        if frames != tuple(range(len(frames))) or (len(frames) - 1) % kt:
            what = (f"--extend's {len(frames)} context frames" if s.extend is not None
                    else f"images at frames {list(frames)}")
            return [f"this Wan model has no mask channels: an image is held by its clean "
                    f"latent frames, and the causal VAE makes latent frames that depend on "
                    f"images alone only from all of the video's first {kt}k+1 frames (an image "
                    f"at frame 0, or {kt}k+1 context frames); got {what}"]
        return []

    def prefix_frames(self, pipe, visual, plan):
        from ..video import frames_to_uint8
        return np.concatenate([frames_to_uint8(pipe.video_processor.preprocess(
            Image.fromarray(f), height=plan.height, width=plan.width)) for f in visual.prefix])

    def encode(self, pipe, s, plan, frames: range, device, visual=None):
        cond = _Conditioning(pipe, s, plan, frames, device, visual)
        if visual and takes_mask(pipe):
            cond.channels = mask_and_condition(pipe, plan, frames, visual, device)
        elif visual:
            cond.hold(_clean_start(pipe, plan, visual, device), frames)
        return cond

    def decode(self, pipe, latents, layout, rank: int, comm, chunk: int):
        """This rank's video frames, ``chunk`` latent frames at a time: (n, H, W, 3) uint8 on
        the CPU. The latent frames before the clip that the causal decoder needs (at most
        ``causal_history``) come from the ranks that hold them, in one exchange."""
        from ..video import frames_to_uint8
        from ..wan_vae import causal_history, decode_clip, history_range
        vae = pipe.vae
        K = causal_history(vae)
        wants = tuple(tuple(history_range(K, layout.start(r))) for r in range(layout.world_size))
        history = comm.gather_frames(latents.contiguous(), 2, layout, wants)

        def denormalize(z):
            # WanPipeline's own arithmetic, in the VAE's dtype: latents / (1/std) + mean.
            z = z.to(vae.dtype)
            mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1)
            std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1)
            return z / std.to(z.device, z.dtype) + mean.to(z.device, z.dtype)

        for piece in decode_clip(vae, denormalize(latents), start=layout.start(rank),
                                 history=denormalize(history), chunk=chunk):
            yield frames_to_uint8(piece[0].permute(1, 0, 2, 3))


class _Conditioning(Conditioning):
    """UMT5 text for one rank's clip and one guided evaluation of the right expert per step.

    Several scenes: the embeddings of every scene go in as one sequence (the text projection
    acts per token), and each cross-attention ``attn2`` gives each latent frame's tokens its
    own scene's part: cross-attention acts per token, so this is exact."""

    channels = None     # (1, kt + z_dim, F_rank, h, w): an I2V model's mask and condition

    def __init__(self, pipe, s, plan, frames: range, device, visual=None):
        from ..prompts import scene_of
        super().__init__()
        self.experts = [m for m in (pipe.transformer, getattr(pipe, "transformer_2", None))
                        if m is not None]
        self.cfg = s.guidance_scale > 1.0
        self.guidance = (s.guidance_scale, s.guidance_scale if s.guidance_scale_2 is None
                         else s.guidance_scale_2)
        ratio = pipe.config.get("boundary_ratio")
        self.boundary = (None if ratio is None or len(self.experts) == 1
                         else ratio * pipe.scheduler.config.num_train_timesteps)
        self.expand = bool(pipe.config.get("expand_timesteps", False))
        p = pipe.transformer.config.patch_size
        self.tokens = len(frames) * (plan.shape[3] // p[1]) * (plan.shape[4] // p[2])
        dtype = pipe.transformer.dtype
        conds, neg = [], None
        with torch.no_grad():
            for _, prompt in s.scenes:
                cond, uncond = pipe.encode_prompt(
                    prompt=prompt, negative_prompt=s.negative_prompt,
                    do_classifier_free_guidance=self.cfg, num_videos_per_prompt=1,
                    max_sequence_length=TEXT_LEN, device=device)
                conds.append(cond)
                neg = uncond
        n = len(s.scenes)
        cond = torch.cat(conds, dim=1)                               # (1, n*L, D)
        self.text = (torch.cat([torch.cat([neg] * n, dim=1), cond]) if self.cfg else cond).to(dtype)
        self.image = image_tokens(pipe, visual, device) if visual else None
        if self.image is not None and self.cfg:
            self.image = torch.cat([self.image] * 2)
        if n > 1:
            local = [scene_of(list(zip(plan.scene_starts, range(n))), f) for f in frames]
            for m in self.experts:
                for block in m.blocks:
                    self.swap_processor(block.attn2, _FrameTextProcessor(
                        block.attn2.processor, local, TEXT_LEN, n))

    def hold(self, clean: torch.Tensor, frames: range):
        """Hold the video's first latent frames at ``clean`` (1, C, n, h, w), the VAE's
        encoding of the images that open the video: their tokens are given the clean latent
        and timestep 0, the step's noisy ones the step's timestep (a timestep per token, as
        Wan 2.2 TI2V's pipeline holds its first frame; the transformer reads it per token),
        and the final latents take the clean ones."""
        n = max(0, min(clean.shape[2], frames.stop) - frames.start)
        self._clean = clean[:, :, frames.start:frames.start + n] if n else None

    def _held_in(self, x):
        if getattr(self, "_clean", None) is None:
            return x
        x = x.clone()
        x[:, :, :self._clean.shape[2]] = self._clean.to(x.dtype)
        return x

    def finish(self, latents):
        return self._held_in(latents)

    def predict(self, x, t):
        """The guided flow prediction for this rank's latents ``x`` at timestep ``t``."""
        if self.boundary is None or t >= self.boundary:
            model, g = self.experts[0], self.guidance[0]
        else:
            model, g = self.experts[1], self.guidance[1]
        x = self._held_in(x)
        xin = torch.cat([x] * 2) if self.cfg else x
        B = xin.shape[0]
        t = torch.as_tensor(t, device=x.device)
        held = getattr(self, "_clean", None)
        if self.expand or held is not None:
            ts = t.expand(B, self.tokens)
            if held is not None:       # timestep 0 on the held frames' tokens
                ts = ts.clone()
                ts[:, :held.shape[2] * (self.tokens // x.shape[2])] = 0
        else:
            ts = t.expand(B)
        if self.channels is not None:
            xin = torch.cat([xin, torch.cat([self.channels] * (B // x.shape[0]))], dim=1)
        out = model(hidden_states=xin.to(model.dtype), timestep=ts,
                    encoder_hidden_states=self.text, encoder_hidden_states_image=self.image,
                    return_dict=False)[0].float()
        return self.guided(out, g)


def _clean_start(pipe, plan, visual, device) -> torch.Tensor:
    """The clean latents of the video's first latent frames: the images that open it (``4k +
    1`` of them) encoded as a video's start by the pipeline's VAE (its distribution's mode,
    normalised as WanPipeline normalises), (1, C, k + 1, h, w) fp32. A few frames: every rank
    that holds any of them encodes them itself."""
    vae = pipe.vae
    video = torch.cat([pipe.video_processor.preprocess(im, height=plan.height, width=plan.width)
                       for _, im in visual.keyframes]).transpose(0, 1)[None]   # (1, 3, n, H, W)
    with torch.no_grad():
        z = vae.encode(video.to(device, vae.dtype)).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(z)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(z)
    return ((z - mean) * inv_std).float()


class _FrameTextProcessor:
    """``attn2`` with one text per scene: frames of one scene attend that scene's ``L`` text
    tokens of the ``(B, n_scenes*L, D)`` sequence. ``scene`` is each local frame's scene."""

    def __init__(self, inner, scene: list, L: int, n: int):
        self.inner, self.scene, self.L, self.n = inner, scene, L, n

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None, **kwargs):
        B, S, C = hidden_states.shape
        F = len(self.scene)
        T = S // F
        h = hidden_states.view(B, F, T, C)
        outs, a = [], 0
        while a < F:                           # runs of consecutive frames of one scene
            sc, b = self.scene[a], a
            while b < F and self.scene[b] == sc:
                b += 1
            first = encoder_hidden_states.shape[1] - self.n * self.L     # CLIP image tokens
            text = torch.cat([encoder_hidden_states[:, :first],
                              encoder_hidden_states[:, first + sc * self.L:
                                                    first + (sc + 1) * self.L]], dim=1)
            outs.append(self.inner(attn, h[:, a:b].reshape(B, (b - a) * T, C), text,
                                   attention_mask, rotary_emb, **kwargs))
            a = b
        return torch.cat(outs, dim=1)

