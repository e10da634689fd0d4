"""The SkyReels-V2 pipeline family: diffusers ``SkyReelsV2Pipeline`` (text-to-video, 1.3B and
14B, 540P and 720P) and ``SkyReelsV2ImageToVideoPipeline`` folders.

``SkyReelsV2Pipeline`` is ``WanPipeline``'s loop (UMT5 text, flow-matching UniPC, the Wan
VAE and its latent normalisation, one timestep per sample) over a SkyReels-V2 transformer,
and ``SkyReelsV2ImageToVideoPipeline`` is Wan 2.1's ``WanImageToVideoPipeline`` loop (mask
and condition channels beside the latents, the CLIP encoder's penultimate hidden states as
image tokens), so Wan's family runs both: only the folder's classes (its CLIP encoder and
processor named by the folder's index), the defaults and the refusals differ.

Refused, each with its reason:

* the diffusion-forcing pipelines (``SkyReelsV2DiffusionForcing*Pipeline``): they denoise
  the video chunk by chunk with a noise level per latent frame, while the engine runs one
  schedule over the whole video split into clips;
* images or a video to extend on the text-to-video model: Wan's T2V path holds them with a
  timestep per token, which SkyReels-V2's transformer does not take.
"""
from __future__ import annotations

import os

from .base import component_dirs_problem, load_component, load_scheduler, load_transformers, read_json
from .wan import WanPipelines
from .wan_image import load_clip, takes_mask

__all__ = ["SkyReelsV2Pipelines"]

_FORCING = ("SkyReelsV2DiffusionForcingPipeline", "SkyReelsV2DiffusionForcingImageToVideoPipeline",
            "SkyReelsV2DiffusionForcingVideoToVideoPipeline")


def refusal(pipe_cls: str) -> str | None:
    """Why a SkyReels-V2 pipeline class is not run, or None for ``SkyReelsV2Pipeline``."""
    if pipe_cls in ("SkyReelsV2Pipeline", "SkyReelsV2ImageToVideoPipeline"):
        return None
    if pipe_cls in _FORCING:
        return (f"{pipe_cls} is diffusion forcing: it denoises the video chunk by chunk with a "
                "noise level per latent frame, while vinf_engine runs one schedule over the "
                "whole video split into clips; use a SkyReelsV2Pipeline (text-to-video) folder")
    return (f"{pipe_cls} is not a SkyReels-V2 pipeline vinf_engine runs (SkyReelsV2Pipeline, "
            "SkyReelsV2ImageToVideoPipeline)")


class SkyReelsV2Pipelines(WanPipelines):
    name = "SkyReels-V2"
    runs = ("SkyReelsV2Pipeline folders (SkyReels-V2 T2V 1.3B / 14B, 540P / 720P) and "
            "SkyReelsV2ImageToVideoPipeline folders (SkyReels-V2 I2V)")
    # SkyReelsV2Pipeline's own defaults (50 steps, guidance 6, 544x960) and its example's
    # 24 fps export.
    defaults = dict(steps=50, guidance_scale=6.0, video_fps=24.0)
    size = (544, 960)
    components = ("transformer", "vae", "text_encoder")
    takes = ("transformer", "SkyReelsV2Transformer3DModel",
             "SkyReelsV2Pipeline, SkyReelsV2ImageToVideoPipeline")

    def claims_dir(self, index: dict) -> bool:
        return str(index.get("_class_name", "")).startswith("SkyReelsV2")

    def inspect(self, path: str, mi: dict) -> tuple:
        pipe_cls = mi.get("_class_name", "?")
        why = refusal(pipe_cls)
        if why:
            return f"{path!r}: {why}", {}
        clip = pipe_cls == "SkyReelsV2ImageToVideoPipeline"
        need = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler") + (
            ("image_encoder", "image_processor") if clip else ())
        problem = component_dirs_problem(path, mi, need, pipe_cls, self.runs)
        if problem:
            return problem, {}
        cfg_path = os.path.join(path, "transformer", "config.json")
        try:
            cls = read_json(cfg_path).get("_class_name")
        except (OSError, ValueError) as e:
            return f"{cfg_path} is unreadable: {e}", {}
        if cls != "SkyReelsV2Transformer3DModel":
            return f"{path!r}: transformer is {cls}; expected SkyReelsV2Transformer3DModel", {}
        if mi["vae"][1] != "AutoencoderKLWan":
            return f"{path!r}: vae is {mi['vae'][1]}; expected AutoencoderKLWan", {}
        for c in ("text_encoder", "tokenizer") + need[5:]:
            if mi[c][0] != "transformers":
                return f"{path!r}: {c} comes from {mi[c][0]!r}; expected a transformers class", {}
        return None, dict(kind="skyreels-v2-i2v" if clip else "skyreels-v2", pipeline=pipe_cls,
                          two_experts=False, clip=clip)

    def load(self, path: str, info: dict, dtype, device):
        import torch
        from diffusers import AutoencoderKLWan, SkyReelsV2Pipeline, SkyReelsV2Transformer3DModel
        kw = dict(dtype=dtype, output_loading_info=True, local_files_only=True)
        parts = dict(transformer=load_component("transformer", lambda: (
            SkyReelsV2Transformer3DModel.from_pretrained(path, subfolder="transformer", **kw)),
            path))
        # The VAE in fp32, as Wan's family keeps it.
        parts["vae"] = load_component("vae", lambda: AutoencoderKLWan.from_pretrained(
            path, subfolder="vae", **dict(kw, dtype=torch.float32)), path)
        parts.update(load_transformers(info["index"], path, dtype))
        parts["scheduler"] = load_scheduler(path)
        cls = SkyReelsV2Pipeline
        if info["clip"]:
            from diffusers import SkyReelsV2ImageToVideoPipeline as cls
            parts.update(load_clip(info["index"], path, dtype))
        pipe = cls(**parts)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    def claims(self, pipe) -> bool:
        from diffusers import SkyReelsV2Transformer3DModel
        return isinstance(getattr(pipe, "transformer", None), SkyReelsV2Transformer3DModel)

    def kind(self, pipe) -> str:
        return "skyreels-v2-i2v" if takes_mask(pipe) else "skyreels-v2"

    def adapter(self):
        from ..models.skyreels_v2 import SkyReelsV2Adapter
        return SkyReelsV2Adapter

    def check(self, s, pipe) -> list[str]:
        why = refusal(type(pipe).__name__)
        return ([why] if why else []) + super().check(s, pipe)

    def check_visual(self, s, pipe, visual) -> list[str]:
        if takes_mask(pipe):              # I2V: images held by the mask, as Wan 2.1 I2V's
            return super().check_visual(s, pipe, visual)
        if not visual:
            return []
        return ["SkyReels-V2 text-to-video takes no image or video to extend: holding clean "
                "frames needs a timestep per token, which its transformer does not take "
                "(only per latent frame, for diffusion forcing)"]
