"""The CogVideoX pipeline family: diffusers ``CogVideoXPipeline`` folders (CogVideoX 2b with
its sin-cos position embedding, 5b with 3-D RoPE, 1.5 with RoPE and temporal patches).

Video frames are ``8k + 1``: ``4k + 1`` as the VAE makes them (latent frame 0 is one video
frame, every later one four), and an odd number of latent frames, because the VAE decodes
them in pairs after the first three (an even number makes diffusers' decode return ``4L``
frames). The clips split the transformer's token frames: latent frames for 2b and 5b; for
1.5 (``patch_size_t = 2``) pairs of latent frames, after one noise frame in front that makes
the odd count whole pairs and that the decode drops, as ``CogVideoXPipeline`` pads and trims
(its ``additional_frames``). The whole video's latents are then ``(1, 2C, pairs, h, w)``, a
pair's two latent frames stacked on the channels (as ``models.cogvideox.engine_view``), so
every rank holds whole pairs. The text shares ``attn1`` with every frame
(``layers.joint_attention``), so a video has one prompt. Classifier-free guidance runs in the
batch, as ``CogVideoXPipeline`` runs it. The VAE decodes each rank's clip after a warm-up on
the chunks before it (``vinf_engine.cogvideox_vae``), bitwise the whole decode.

Not yet run: ``CogVideoXDPMScheduler`` (5b's and 1.5's default, which steps with its
previous prediction: use ``scheduler="ddim"``), image-to-video.
"""
from __future__ import annotations

import os

import torch

from .base import (Conditioning, PipelineFamily, VideoPlan, component_dirs_problem,
                   load_component, load_scheduler, load_transformers, read_json)

__all__ = ["CogVideoXPipelines"]

# CogVideoXPipeline.__call__'s max_sequence_length: T5 embeddings padded to 226 tokens.
TEXT_LEN = 226


class CogVideoXPipelines(PipelineFamily):
    name = "CogVideoX"
    runs = "CogVideoXPipeline folders (CogVideoX 2b, 5b, 1.5)"
    # CogVideoXPipeline's own defaults (50 steps, guidance 6) and its examples' 8 fps export.
    defaults = dict(steps=50, guidance_scale=6.0, video_fps=8.0)
    schedulers = {"ddim": ("CogVideoXDDIMScheduler", {})}
    components = ("transformer", "vae", "text_encoder")
    takes = ("transformer", "CogVideoXTransformer3DModel", "CogVideoXPipeline")

    # ---------------------------------------------------------------- folders
    def claims_dir(self, index: dict) -> bool:
        return str(index.get("_class_name", "")).startswith("CogVideoX")

    def inspect(self, path: str, mi: dict) -> tuple:
        pipe_cls = mi.get("_class_name", "?")
        if pipe_cls != "CogVideoXPipeline":
            return (f"{path!r} holds a {pipe_cls}; vinf_engine runs CogVideoXPipeline folders "
                    "(CogVideoX 2b, 5b, 1.5)"), {}
        need = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
        problem = component_dirs_problem(path, mi, need, pipe_cls, self.runs)
        if problem:
            return problem, {}
        cfg_path = os.path.join(path, "transformer", "config.json")
        try:
            cfg = read_json(cfg_path)
        except (OSError, ValueError) as e:
            return f"{cfg_path} is unreadable: {e}", {}
        if cfg.get("_class_name") != "CogVideoXTransformer3DModel":
            return (f"{path!r}: transformer is {cfg.get('_class_name')}; expected "
                    "CogVideoXTransformer3DModel"), {}
        if mi["vae"][1] != "AutoencoderKLCogVideoX":
            return f"{path!r}: vae is {mi['vae'][1]}; expected AutoencoderKLCogVideoX", {}
        for c in ("text_encoder", "tokenizer"):
            if mi[c][0] != "transformers":
                return f"{path!r}: {c} comes from {mi[c][0]!r}; expected a transformers class", {}
        return None, dict(kind=_kind(cfg), pipeline=pipe_cls)

    def load(self, path: str, info: dict, dtype, device):
        from diffusers import (AutoencoderKLCogVideoX, CogVideoXPipeline,
                               CogVideoXTransformer3DModel)
        kw = dict(dtype=dtype, output_loading_info=True, local_files_only=True)
        parts = dict(transformer=load_component("transformer", lambda: (
            CogVideoXTransformer3DModel.from_pretrained(path, subfolder="transformer", **kw)), path))
        # The VAE stays fp32 whatever the transformer's dtype, as for Wan: decoding is a small
        # share of the run.
        parts["vae"] = load_component("vae", lambda: AutoencoderKLCogVideoX.from_pretrained(
            path, subfolder="vae", **dict(kw, dtype=torch.float32)), path)
        parts.update(load_transformers(info["index"], path, dtype))
        parts["scheduler"] = load_scheduler(path)
        pipe = CogVideoXPipeline(**parts)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    # ---------------------------------------------------------------- a loaded pipeline
    def claims(self, pipe) -> bool:
        from diffusers import CogVideoXTransformer3DModel
        return isinstance(getattr(pipe, "transformer", None), CogVideoXTransformer3DModel)

    def kind(self, pipe) -> str:
        return _kind(pipe.transformer.config)

    def text_limit(self, pipe) -> int:
        return TEXT_LEN

    def check(self, s, pipe) -> list[str]:
        tr = pipe.transformer
        p = _model_problems(pipe)
        kt, ks = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
        n = s.video_frames
        if (n - 1) % (2 * kt):
            lo = (n - 1) // (2 * kt) * 2 * kt + 1
            pairs = " (1.5 pads them in front to whole pairs)" if _unit(tr) > 1 else ""
            p.append(f"frames must be {2 * kt}k+1 for CogVideoX ({kt}k+1 frames of an odd number "
                     f"of latent frames: its VAE decodes them in pairs after the first{pairs}), "
                     f"got {n} (try {lo} or {lo + 2 * kt})")
        step = ks * tr.config.patch_size
        for name, v in (("height", s.height), ("width", s.width)):
            if v is not None and v % step:
                p.append(f"{name} {v} is not a multiple of {step}: the VAE downsamples by {ks} "
                         f"and the transformer patches by {tr.config.patch_size} more (try "
                         f"{max(step, v // step * step)})")
        if s.fps is not None:
            p.append("--fps conditions VideoCrafter2 only; CogVideoX has no fps input (use "
                     "--video-fps for the mp4's frame rate)")
        if s.guidance_scale_2 is not None:
            p.append("guidance scale 2 is for Wan 2.2's second expert; CogVideoX has one "
                     "transformer")
        if len(s.scenes) > 1:
            p.append("CogVideoX takes one prompt per video: its text tokens share every "
                     "frame's self-attention, so they cannot change from scene to scene")
        if s.scheduler is None and type(pipe.scheduler).__name__ == "CogVideoXDPMScheduler":
            p.append("the pipeline's CogVideoXDPMScheduler steps with its previous prediction, "
                     "which the engine's sampler does not carry yet: use scheduler 'ddim'")
        if not p:
            from ..models.cogvideox import window_problem
            try:
                w = window_problem(tr, s.resolved_config(self.default_config(pipe)),
                                   _token_frames(pipe, n))
            except (TypeError, ValueError):
                w = None                     # a bad config is reported by the settings' check
            if w:
                p.append(w)
        return p

    def plan(self, s, pipe) -> VideoPlan:
        kt, ks = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
        c = pipe.transformer.config
        H, W = s.height or c.sample_height * ks, s.width or c.sample_width * ks
        n, u = s.video_frames, _unit(pipe.transformer)
        N = _token_frames(pipe, n)
        shape = (1, u * pipe.vae.config.latent_channels, N, H // ks, W // ks)
        # 1.5: token frame 0 is the pad and video frame 0's latent frame, every later one
        # 2 * kt video frames: VideoPlan's rule with temporal = u * kt.
        return VideoPlan(frames=n, latent_frames=N, shape=shape, height=H, width=W,
                         scene_starts=(0,), temporal=u * kt, unit=u)

    def encode(self, pipe, s, plan, frames: range, device, visual=None):
        return _Conditioning(pipe, s, plan, frames, device)

    def decode(self, pipe, latents, layout, rank: int, comm, chunk: int):
        """This rank's video frames, ``chunk`` latent frames at a time: (n, H, W, 3) uint8 on
        the CPU. ``latents``: this rank's token frames (1, u*C, F, h, w) of ``layout``. The
        latent frames the decode reads (the warm-up's chunks before the clip and the rest of
        the clip's last pair) come from the ranks that hold them, in one exchange; 1.5's pad
        in front is dropped, as CogVideoXPipeline drops it before its decode."""
        from ..cogvideox_vae import causal_history, decode_clip, needed_range
        from ..video import frames_to_uint8
        vae, u = pipe.vae, _unit(pipe.transformer)
        pad = _padding(u)
        L = u * layout.num_frames - pad                  # the video's latent frames

        def clip(r):                                     # rank r's latent frames in the video
            return max(0, u * layout.start(r) - pad), u * layout.end(r) - pad
        K = causal_history(vae)
        reads = [needed_range(K, *clip(r), L) for r in range(layout.world_size)]
        wants = tuple(tuple(range((w.start + pad) // u, (w.stop - 1 + pad) // u + 1))
                      for w in reads)
        z = comm.gather_frames(latents.contiguous(), 2, layout, wants)
        # (1, C, latent frames, h, w) from reads[rank].start (rank 0 of 1.5: past the pad)
        skip = reads[rank].start + pad - u * wants[rank][0]
        z = _latent_frames(z, u).transpose(1, 2)[:, :, skip:]
        # CogVideoXPipeline.decode_latents: 1 / scaling_factor * latents, in the VAE's dtype.
        z = 1 / vae.config.scaling_factor * z.to(vae.dtype)
        for piece in decode_clip(vae, z, first=reads[rank].start, start=clip(rank)[0],
                                 stop=clip(rank)[1], num_frames=L, chunk=chunk):
            yield frames_to_uint8(piece[0].permute(1, 0, 2, 3))


def _kind(cfg) -> str:
    get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
    if get("patch_size_t"):
        return "cogvideox-1.5"
    return "cogvideox-5b" if get("use_rotary_positional_embeddings") else "cogvideox-2b"


def _unit(transformer) -> int:
    """Latent frames per token frame: ``patch_size_t`` (1.5: 2), else 1."""
    return transformer.config.patch_size_t or 1


def _padding(unit: int) -> int:
    """Noise latent frames in front of the video that make its odd number of latent frames
    (the frames rule) whole token frames of ``unit`` (1 or 2): CogVideoXPipeline's
    ``additional_frames``, one for 1.5, which its decode drops."""
    return unit - 1


def _token_frames(pipe, n: int) -> int:
    """The token frames the clips split, of a video of ``n`` (8k+1) frames: its latent
    frames, 1.5's with the pad as pairs."""
    u = _unit(pipe.transformer)
    return ((n - 1) // pipe.vae_scale_factor_temporal + 1 + _padding(u)) // u


def _latent_frames(x, unit: int):
    """Token frames (B, unit*C, F, h, w) -> the transformer's layout (B, F*unit, C, h, w),
    each token frame's ``unit`` latent frames in order (a view for unit 1)."""
    return x.unflatten(1, (unit, -1)).permute(0, 3, 1, 2, 4, 5).flatten(1, 2)


def _tokens(y, unit: int):
    """The inverse of ``_latent_frames``, as the adapter's ``engine_view`` splits the clip."""
    return y.unflatten(1, (-1, unit)).flatten(2, 3).transpose(1, 2)


def _model_problems(pipe) -> list[str]:
    """What of the loaded pipeline the family cannot run, whatever the settings."""
    tr, p = pipe.transformer, []
    if _unit(tr) > 2:
        p.append(f"patch_size_t {tr.config.patch_size_t}: CogVideoXPipeline pads an odd "
                 "number of latent frames to whole temporal patches of at most 2 (CogVideoX "
                 "1.5's)")
    if tr.config.in_channels != pipe.vae.config.latent_channels:
        p.append(f"the VAE's {pipe.vae.config.latent_channels} latent channels do not match the "
                 f"transformer's {tr.config.in_channels} input channels (an image-to-video "
                 "model's extra channels are not run)")
    if tr.config.max_text_seq_length != TEXT_LEN:
        p.append(f"the transformer takes {tr.config.max_text_seq_length} text tokens; "
                 f"CogVideoXPipeline gives {TEXT_LEN}")
    d_model = getattr(pipe.text_encoder.config, "d_model", None)
    if d_model is not None and d_model != tr.config.text_embed_dim:
        p.append(f"the text encoder's width {d_model} does not match the transformer's "
                 f"text width {tr.config.text_embed_dim}")
    return p


class _Conditioning(Conditioning):
    """T5 text for the video and one guided evaluation of the transformer on this rank's clip,
    in the transformer's layout ``(B, F, C, h, w)`` (1.5: F latent frames, the clip's pairs);
    RoPE tables for the clip's own frames (the adapter rotates them at their global
    positions)."""

    def __init__(self, pipe, s, plan, frames: range, device):
        super().__init__()
        self.model = pipe.transformer
        self.unit = _unit(self.model)
        self.cfg = s.guidance_scale > 1.0
        self.scale = s.guidance_scale
        with torch.no_grad():
            cond, uncond = pipe.encode_prompt(
                prompt=s.scenes[0][1], negative_prompt=s.negative_prompt,
                do_classifier_free_guidance=self.cfg, num_videos_per_prompt=1,
                max_sequence_length=TEXT_LEN, device=device)
        dtype = self.model.dtype
        self.text = (torch.cat([uncond, cond]) if self.cfg else cond).to(dtype)
        self.rope = None
        if self.model.config.use_rotary_positional_embeddings:
            self.rope = pipe._prepare_rotary_positional_embeddings(
                plan.height, plan.width, self.unit * len(frames), torch.device(device))

    def predict(self, x, t):
        """The guided prediction for this rank's latents ``x`` (1, u*C, F, h, w) at ``t``."""
        xin = _latent_frames(x, self.unit)
        xin = torch.cat([xin] * 2) if self.cfg else xin
        ts = torch.as_tensor(t, device=x.device).expand(xin.shape[0])
        out = self.model(hidden_states=xin.to(self.model.dtype), encoder_hidden_states=self.text,
                         timestep=ts, image_rotary_emb=self.rope, return_dict=False)[0].float()
        return self.guided(_tokens(out, self.unit), self.scale)
