"""diffusers ``SkyReelsV2Transformer3DModel`` (SkyReels-V2 T2V / I2V, 1.3B and 14B) made
clip-parallel: Wan's architecture in classes of its own, so Wan's pieces serve it.

What is the same as ``WanTransformer3DModel`` (read from diffusers 0.42): temporal patch 1 and
frame-major tokens; the rope (the same ``freqs_cos``/``freqs_sin`` tables, theta 10000); the
self-attention module's projections, norms and rotation (``SkyReelsV2AttnProcessor`` is
``WanAttnProcessor`` operation for operation, plus an ``attention_mask`` argument); norms, FFN
and cross-attention per token; the optional fps embedding per sample. So the rope is swapped
for ``ClipWanRotaryPosEmbed``'s code at global positions and every ``attn1`` gets
``WanDualScopeProcessor``, exactly as Wan's.

What is refused, and why:

* the causal block mask (``num_frame_per_block > 1``, set by ``_set_ar_attention`` /
  the diffusion-forcing pipelines' ``causal_block_size``): each frame block attends only to
  itself and earlier blocks, a mask over the whole video that the dual-scope attention (a
  symmetric local window plus global frames) does not compute;
* diffusion forcing (``enable_diffusion_forcing=True``, a timestep per latent frame): the
  engine agrees one timestep per sample across ranks and runs one schedule over the whole
  video, while diffusion forcing gives each frame its own noise level and denoises chunk by
  chunk.
"""
from __future__ import annotations

from diffusers import SkyReelsV2Transformer3DModel
from diffusers.models.transformers.transformer_skyreels_v2 import (SkyReelsV2Attention,
                                                                   SkyReelsV2AttnProcessor,
                                                                   SkyReelsV2RotaryPosEmbed)

from ..config import DualScopeConfig
from . import register
from .base import step_arguments
from .wan import ClipWanRotaryPosEmbed, WanAdapter

__all__ = ["SkyReelsV2Adapter", "ClipSkyReelsV2RotaryPosEmbed", "trained_frames"]

# SkyReels-V2's text-to-video pipeline makes 97 video frames by default (its 540P models'
# training length): 25 latent frames.
TRAINED_LATENT_FRAMES = 25

# The forward's parameters up to ``enable_diffusion_forcing``, in signature order.
_FORWARD = ("hidden_states", "timestep", "encoder_hidden_states",
            "encoder_hidden_states_image", "enable_diffusion_forcing")


def trained_frames(model, config: DualScopeConfig | None = None) -> int:
    """Latent frames the model was trained on: the config's, else SkyReels-V2's 25 (97 video
    frames)."""
    if config is not None and config.trained_frames is not None:
        return config.trained_frames
    return TRAINED_LATENT_FRAMES


class ClipSkyReelsV2RotaryPosEmbed(SkyReelsV2RotaryPosEmbed):
    """``SkyReelsV2RotaryPosEmbed`` at this clip's global frame positions: Wan's code, since
    the two classes hold the same tables under the same names."""

    forward = ClipWanRotaryPosEmbed.forward
    rotations = ClipWanRotaryPosEmbed.rotations


def causal_problem(model) -> str | None:
    """Why the model's causal block mask cannot run clip-parallel, or None."""
    n = model.config.get("num_frame_per_block", 1)
    if n is not None and n > 1:
        return (f"{type(model).__name__} has num_frame_per_block={n} (diffusion forcing's "
                "causal block mask, set by causal_block_size / _set_ar_attention): each block "
                "of frames attends only to itself and earlier blocks, which the engine's "
                "dual-scope attention (a symmetric window plus global frames) does not "
                "compute; set num_frame_per_block to 1 (full attention) to parallelize")
    return None


@register
class SkyReelsV2Adapter(WanAdapter):
    """Patches a diffusers ``SkyReelsV2Transformer3DModel`` as Wan's adapter patches Wan."""

    name = "SkyReels-V2 (T2V, I2V transformers; no diffusion forcing)"
    rope_class, clip_rope_class = SkyReelsV2RotaryPosEmbed, ClipSkyReelsV2RotaryPosEmbed
    attention_class, processor_class = SkyReelsV2Attention, SkyReelsV2AttnProcessor
    trained_frames = staticmethod(trained_frames)

    @classmethod
    def model_classes(cls) -> tuple:
        return (SkyReelsV2Transformer3DModel,)

    @classmethod
    def check(cls, model) -> str | None:
        return causal_problem(model) or super().check(model)

    @staticmethod
    def step_problem(model, args, kwargs) -> str | None:
        # The config again: _set_ar_attention may set the mask after parallelize.
        problem = causal_problem(model)
        if problem:
            return problem
        _, timestep, _, _, forcing = step_arguments(args, kwargs, _FORWARD)
        if forcing or (timestep is not None and getattr(timestep, "ndim", 0) > 1):
            return (f"{type(model).__name__} called with diffusion forcing (a timestep per "
                    "latent frame): the engine runs one schedule over the whole video and "
                    "agrees one timestep per sample across ranks, while diffusion forcing "
                    "gives each frame its own noise level and denoises chunk by chunk; use "
                    "SkyReelsV2Pipeline (one timestep per step) for clip-parallel generation")
        return None
