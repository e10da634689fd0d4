"""The HunyuanVideo 1.5 pipeline family: diffusers ``HunyuanVideo15Pipeline`` folders
(Qwen2.5-VL text with the pipeline's chat template and mask, ByT5 glyph text for quoted
words, ``HunyuanVideo15Transformer3DModel``, ``AutoencoderKLHunyuanVideo15`` with 1:4 temporal
and 16x spatial compression, flow-matching Euler with the pipeline's ``linspace(1, 0)``
sigmas, classifier-free guidance by the pipeline's ``ClassifierFreeGuidance`` guider).

On HunyuanVideo 1.0's family: the same frames rule (``4k + 1``; latent frame 0 is one video
frame, every later one four), sigma schedule, one prompt per video (the text joins every
attention) and size checks. What differs:

* guidance is true classifier-free guidance with a negative prompt (``""`` by default, as the
  stock pipeline has it): one batch of [negative, prompt] per step, ``uncond + scale * (cond
  - uncond)``, the guider's formula. ``guidance_scale`` replaces the guider's; a guider that
  rescales, uses the original formulation or a step range is refused;
* the transformer's input is the latents beside zero condition latents and a zero mask
  (text-to-video), and zero image slots;
* the VAE is causal end to end (causal convolutions, per-position RMS norms, a mid-block
  attention over each frame and the frames before it, frame 0 upsampled on its own), and
  ``vae.decode`` is one decoder call over the whole video, with no temporal tiles to cut at.
  ``hunyuan15_vae`` divides it exactly (to rounding): each rank runs the mid block's keys
  over the latent prefix up to its clip's end (latent size, cheap) and everything after the
  attention over its clip plus the warm-up its causal convolutions read.

Not run: image-to-video (``HunyuanVideo15ImageToVideoPipeline``: SigLIP image tokens and the
first frame's latents as a condition) and the super-resolution (meanflow) pipelines.
"""
from __future__ import annotations

import math

import torch

from .base import Conditioning
from .hunyuan_video import HunyuanVideoPipelines

__all__ = ["HunyuanVideo15Pipelines"]

_NOT_RUN = {
    "HunyuanVideo15ImageToVideoPipeline": "image-to-video (SigLIP image tokens and the first "
                                          "frame's latents) is not run under clip parallelism",
}


class HunyuanVideo15Pipelines(HunyuanVideoPipelines):
    name = "HunyuanVideo 1.5"
    runs = "HunyuanVideo15Pipeline folders (HunyuanVideo 1.5 text-to-video, 480p and 720p)"
    # HunyuanVideo15Pipeline's own defaults (50 steps), its released guiders' scale 6, and
    # its example's 24 fps export (121 frames, about 5 s).
    defaults = dict(steps=50, guidance_scale=6.0, video_fps=24.0)
    takes = ("transformer", "HunyuanVideo15Transformer3DModel", "HunyuanVideo15Pipeline")

    # ---------------------------------------------------------------- folders
    pipeline_class = "HunyuanVideo15Pipeline"
    transformer_class = "HunyuanVideo15Transformer3DModel"
    vae_class = "AutoencoderKLHunyuanVideo15"
    diffusers_parts = (("guider", "ClassifierFreeGuidance"),)
    not_run = _NOT_RUN

    def claims_dir(self, index: dict) -> bool:
        return str(index.get("_class_name", "")).startswith("HunyuanVideo15")

    # ---------------------------------------------------------------- a loaded pipeline
    def claims(self, pipe) -> bool:
        # The text-to-video pipeline only: the image-to-video one holds the same transformer.
        from diffusers import HunyuanVideo15Pipeline
        return isinstance(pipe, HunyuanVideo15Pipeline)

    def kind(self, pipe) -> str:
        return "hunyuanvideo15"

    def text_limit(self, pipe) -> int:
        return int(pipe.tokenizer_max_length)

    def adapter(self):
        from ..models.hunyuan_video15 import HunyuanVideo15Adapter
        return HunyuanVideo15Adapter

    def model_problems(self, pipe) -> list[str]:
        tr, p = pipe.transformer, []
        why = self.adapter().check(tr)
        if why:
            p.append(f"the transformer cannot be parallelized: {why}")
        C = pipe.vae.config.latent_channels
        if tr.config.in_channels != 2 * C + 1:
            p.append(f"the transformer's {tr.config.in_channels} input channels are not the "
                     f"VAE's {C} latent channels twice plus a mask ({2 * C + 1})")
        for name, enc, attr, want in (
                ("Qwen text encoder", pipe.text_encoder, "hidden_size", "text_embed_dim"),
                ("ByT5 text encoder", pipe.text_encoder_2, "d_model", "text_embed_2_dim")):
            width = getattr(enc.config, attr, None)
            if width is not None and width != tr.config[want]:
                p.append(f"the {name}'s width {width} does not match the transformer's "
                         f"{want} {tr.config[want]}")
        p += _guider_problems(pipe.guider)
        return p

    def guidance_problems(self, s) -> list[str]:
        return []                           # true classifier-free guidance, negative prompt too

    def check(self, s, pipe) -> list[str]:
        p = super().check(s, pipe)
        if (s.height is None) != (s.width is None):
            p.append("give both height and width, or neither (HunyuanVideo15Pipeline's "
                     "default size for its target_size)")
        return p

    def size(self, s, pipe) -> tuple[int, int]:
        if s.height is None:
            # HunyuanVideo15Pipeline.__call__'s default: the bucket of its target size
            # closest to 16:9
            return pipe.video_processor.calculate_default_height_width(
                pipe.default_aspect_ratio[1], pipe.default_aspect_ratio[0], pipe.target_size)
        return s.height, s.width

    def latent_channels(self, pipe) -> int:
        # the transformer's input also holds the condition channels the family fills with zeros
        return pipe.vae.config.latent_channels

    def encode(self, pipe, s, plan, frames: range, device, visual=None):
        return _Conditioning(pipe, s, device)

    def decode(self, pipe, latents, layout, rank: int, comm, chunk: int):
        """This rank's video frames, (n, H, W, 3) uint8 on the CPU, in one piece: the latent
        frames before the clip that the decode reads (all of them, for the mid block's
        attention) come from the ranks that hold them (one exchange), and
        ``hunyuan15_vae.decode_clip`` decodes the clip (see the module's notes). ``chunk`` is
        not used."""
        from ..hunyuan15_vae import decode_clip, needed_range
        from ..video import frames_to_uint8
        vae = pipe.vae
        needs = [needed_range(vae, layout.start(r), layout.end(r))
                 for r in range(layout.world_size)]
        wants = tuple(tuple(range(n.start, layout.start(r))) for r, n in enumerate(needs))
        got = comm.gather_frames(latents.contiguous(), 2, layout, wants)
        # HunyuanVideo15Pipeline: latents.to(vae.dtype) / scaling_factor, then vae.decode.
        z = torch.cat([got, latents], dim=2).to(vae.dtype) / vae.config.scaling_factor
        video = decode_clip(vae, z, offset=needs[rank].start, frames=layout.frames(rank),
                            num_frames=layout.num_frames)
        yield frames_to_uint8(video[0].permute(1, 0, 2, 3))


def _guider_problems(guider) -> list[str]:
    """What of the pipeline's guider the family's guidance (``uncond + scale * (cond -
    uncond)`` at every step) does not reproduce."""
    from diffusers import ClassifierFreeGuidance
    if type(guider) is not ClassifierFreeGuidance:
        return [f"the guider is {type(guider).__name__}; vinf_engine runs "
                "ClassifierFreeGuidance"]
    c, p = guider.config, []
    if c.guidance_rescale:
        p.append(f"the guider rescales (guidance_rescale {c.guidance_rescale}), which is not run")
    if c.use_original_formulation:
        p.append("the guider uses the original formulation (cond + scale * (cond - uncond)), "
                 "which is not run")
    if (c.start, c.stop) != (0.0, 1.0) or not c.enabled:
        p.append(f"the guider guides only part of the steps (start {c.start}, stop {c.stop}, "
                 f"enabled {c.enabled}), which is not run")
    return p


class _Conditioning(Conditioning):
    """Qwen and ByT5 text for the video (and the negative prompt's, for guidance), and one
    transformer evaluation per step of [negative, prompt] on this rank's clip."""

    def __init__(self, pipe, s, device):
        super().__init__()
        self.model = pipe.transformer
        dtype = self.model.dtype
        self.scale = s.guidance_scale
        # the guider's test: guidance at a scale of 1 is the prompt's prediction
        self.cfg = not math.isclose(s.guidance_scale, 1.0)
        with torch.no_grad():
            parts = pipe.encode_prompt(prompt=s.scenes[0][1], device=device, dtype=dtype)
            if self.cfg:
                # None: HunyuanVideo15Pipeline encodes "" as the negative prompt
                neg = pipe.encode_prompt(prompt=s.negative_prompt, device=device, dtype=dtype)
                parts = [torch.cat([n, c]) for n, c in zip(neg, parts)]
        self.text, self.mask, self.text_2, self.mask_2 = parts
        # text-to-video: zero image slots (the transformer then masks them)
        self.image = torch.zeros(self.text.shape[0], pipe.vision_num_semantic_tokens,
                                 pipe.vision_states_dim, dtype=dtype, device=device)

    def predict(self, x, t):
        """The guided flow prediction for this rank's latents ``x`` (1, C, F, h, w) at ``t``."""
        x = x.to(self.model.dtype)
        # HunyuanVideo15Pipeline's input: the latents, zero condition latents and a zero mask
        x = torch.cat([x, x.new_zeros(x.shape[0], x.shape[1] + 1, *x.shape[2:])], dim=1)
        x = torch.cat([x] * self.text.shape[0])
        ts = torch.as_tensor(t, device=x.device).expand(x.shape[0]).to(x.dtype)
        out = self.model(hidden_states=x, timestep=ts, encoder_hidden_states=self.text,
                         encoder_attention_mask=self.mask, encoder_hidden_states_2=self.text_2,
                         encoder_attention_mask_2=self.mask_2, image_embeds=self.image,
                         return_dict=False)[0]
        return self.guided(out.float(), self.scale)
