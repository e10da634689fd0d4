"""Pipeline families for ``vinf_engine.generate``: one file each, found from a folder's
``model_index.json`` or from a loaded pipeline.

    unet3d.py  TextToVideoSDPipeline (ModelScope, Zeroscope) and VideoCrafter2
    wan.py     WanPipeline (Wan 2.1, Wan 2.2 A14B with two experts, Wan 2.2 TI2V-5B) and
               WanImageToVideoPipeline (image conditioning: wan_image.py)
    cogvideox.py  CogVideoXPipeline (CogVideoX 2b, 5b)
    ltx.py     LTXPipeline and LTXImageToVideoPipeline (LTX-Video 0.9.x)
    hunyuan_video.py  HunyuanVideoPipeline (HunyuanVideo 1.0 text-to-video)
    hunyuan_video15.py  HunyuanVideo15Pipeline (HunyuanVideo 1.5 text-to-video, on 1.0's family)
    skyreels_v2.py  SkyReelsV2Pipeline and SkyReelsV2ImageToVideoPipeline (on Wan's family)
"""
from __future__ import annotations

import os

from ..errors import GenerationError
from .base import PipelineFamily, VideoPlan, read_json

__all__ = ["PipelineFamily", "VideoPlan", "families", "family_of", "accepted_pipelines",
           "inspect_model_dir", "load_pipeline"]

_FAMILIES: list = []


def families() -> list:
    if not _FAMILIES:
        from .cogvideox import CogVideoXPipelines
        from .hunyuan_video import HunyuanVideoPipelines
        from .hunyuan_video15 import HunyuanVideo15Pipelines
        from .unet3d import UNet3DPipelines
        from .ltx import LTXPipelines
        from .skyreels_v2 import SkyReelsV2Pipelines
        from .wan import WanPipelines
        _FAMILIES.extend([UNet3DPipelines(), WanPipelines(), CogVideoXPipelines(),
                          LTXPipelines(), HunyuanVideoPipelines(), HunyuanVideo15Pipelines(),
                          SkyReelsV2Pipelines()])
    return _FAMILIES


def _runs() -> str:
    return "; ".join(f.runs for f in families())


def accepted_pipelines(pipe=None) -> str:
    """What the drop-in accepts, by component class, and what ``pipe`` holds instead."""
    ways = " or ".join(f"whose `{attr}` is a {cls} ({examples})"
                       for attr, cls, examples in (f.takes for f in families()))
    text = f"a pipeline {ways}"
    if pipe is not None:
        held = [f"{a} is a {type(getattr(pipe, a)).__name__}" for a in
                dict.fromkeys(f.takes[0] for f in families()) if getattr(pipe, a, None) is not None]
        text += f"; got a {type(pipe).__name__}" + (f" whose {', '.join(held)}" if held else "")
    return text


def family_of(pipe) -> PipelineFamily | None:
    """The family of a loaded pipeline, or None."""
    return next((f for f in families() if f.claims(pipe)), None)


def inspect_model_dir(path: str) -> tuple:
    """Check that ``path`` is a local diffusers text-to-video pipeline folder that vinf_engine
    runs, without loading weights. Returns ``(problem, info)``; ``info["family"]`` is the
    ``PipelineFamily`` and ``info["kind"]`` says which model it holds."""
    if not path:
        return "no model folder given (a local diffusers pipeline folder; nothing is downloaded)", {}
    if not os.path.exists(path):
        return f"model folder {path!r} does not exist (models are never downloaded: give a local folder)", {}
    if not os.path.isdir(path):
        return f"model path {path!r} is not a folder", {}
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        return (f"{path!r} is not a diffusers pipeline folder (no model_index.json); "
                "save one with pipeline.save_pretrained(folder)"), {}
    try:
        mi = read_json(index)
    except (OSError, ValueError) as e:
        return f"{index} is unreadable: {e}", {}
    if not isinstance(mi, dict):
        return f"{index} is not a JSON object", {}
    for fam in sorted(families(), key=lambda f: f.catch_all):   # specific claims first
        if fam.claims_dir(mi):
            problem, info = fam.inspect(path, mi)
            return problem, (dict(info, family=fam, index=mi) if problem is None else {})
    return (f"{path!r} holds a {mi.get('_class_name', '?')}, not a supported text-to-video "
            f"pipeline (vinf_engine runs {_runs()})"), {}


def load_pipeline(path: str, *, dtype=None, device="cpu"):
    """Load a local pipeline folder of any supported family, component by component, never
    downloading. Raises ``GenerationError`` for folders vinf_engine does not run and for
    weights that do not match their config."""
    import torch
    problem, info = inspect_model_dir(path)
    if problem:
        raise GenerationError(problem)
    return info["family"].load(path, info, dtype or torch.float32, device)
