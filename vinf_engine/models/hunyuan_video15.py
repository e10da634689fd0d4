"""diffusers ``HunyuanVideo15Transformer3DModel`` (HunyuanVideo 1.5) made clip-parallel:
HunyuanVideo 1.0's joint text attention in classes of its own, so 1.0's pieces serve it.

What is the same as 1.0's ``HunyuanVideoTransformer3DModel`` (read from diffusers 0.42):
temporal patch 1 and frame-major tokens; the 3-D RoPE (``get_1d_rotary_pos_embed`` per axis
with ``use_real``, the same ``rope_dim`` / ``theta`` names, the same (t, h, w) order); the
dual-stream block's ``attn`` (q/k norms across heads, the rotation of the video stream, the
text's ``add_*_proj`` and ``norm_added_*``, text after video, ``to_out`` / ``to_add_out``);
AdaLN modulation, feed-forwards and the output head per token. So the rope is swapped for
1.0's code at global positions and every block's ``attn`` gets 1.0's joint processor.

What differs, and how it is handled:

* the text is three streams: the Qwen2.5-VL prompt (refined per token), ByT5 glyph text and
  image slots (SigLIP tokens; zero and masked for text-to-video). The forward reorders every
  row's valid tokens of all three first and passes that combined mask to every block's
  ``attn``, which lets only those tokens be keys (and queries, which changes only the
  padding's own outputs, never read again). The processor reads the lengths from that
  mask, once per forward (the same tensor reaches every block);
* only dual-stream blocks (no single-stream ones);
* the input is the latents beside condition latents and a mask (per frame: they split with
  the frames).

HunyuanVideo 1.5 was trained on 121 video frames: (121 - 1) / 4 + 1 = 31 latent frames; the
temporal RoPE is the formula at any position, so the global scope's keys may sit at clamped
relative offsets (``DualScopeConfig.global_positions``, the default) or at their true ones.
"""
from __future__ import annotations

from diffusers import HunyuanVideo15Transformer3DModel
from diffusers.models.transformers.transformer_hunyuan_video15 import (
    HunyuanVideo15AttnProcessor2_0, HunyuanVideo15RotaryPosEmbed, HunyuanVideo15TransformerBlock)

from ..config import DualScopeConfig
from . import register
from .hunyuan_video import ClipHunyuanRotaryPosEmbed, HunyuanJointProcessor, HunyuanVideoAdapter

__all__ = ["HunyuanVideo15Adapter", "Hunyuan15JointProcessor", "ClipHunyuan15RotaryPosEmbed",
           "trained_frames", "TRAINED_LATENT_FRAMES"]

# HunyuanVideo 1.5 makes 121 video frames (its pipeline's default, 5 s at 24 fps): 31 latent.
TRAINED_LATENT_FRAMES = 31


def trained_frames(model, config: DualScopeConfig | None = None) -> int:
    """Latent frames the model was trained on: the config's, else HunyuanVideo 1.5's 31."""
    if config is not None and config.trained_frames is not None:
        return config.trained_frames
    return TRAINED_LATENT_FRAMES


class ClipHunyuan15RotaryPosEmbed(HunyuanVideo15RotaryPosEmbed):
    """``HunyuanVideo15RotaryPosEmbed`` at this clip's global frame positions: 1.0's code,
    since the two classes compute the same rows from the same attributes."""

    forward = ClipHunyuanRotaryPosEmbed.forward


class Hunyuan15JointProcessor(HunyuanJointProcessor):
    """1.0's joint processor, the text lengths read from the block's ``attention_mask``
    (B, Lt): the forward's reordered mask of the three text streams, valid tokens first."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        self.rope.read_valid(attention_mask)
        return super().__call__(attn, hidden_states, encoder_hidden_states, None,
                                image_rotary_emb)


@register
class HunyuanVideo15Adapter(HunyuanVideoAdapter):
    """Patches a diffusers ``HunyuanVideo15Transformer3DModel`` as 1.0's adapter patches 1.0."""

    name = "HunyuanVideo 1.5"
    rope_class, clip_rope_class = HunyuanVideo15RotaryPosEmbed, ClipHunyuan15RotaryPosEmbed
    processor_class = HunyuanVideo15AttnProcessor2_0
    joint_processor_class = Hunyuan15JointProcessor
    block_kinds = (("transformer_blocks", HunyuanVideo15TransformerBlock),)
    mask_argument = None        # the processors read the combined mask
    trained_frames = staticmethod(trained_frames)

    @classmethod
    def model_classes(cls) -> tuple:
        return (HunyuanVideo15Transformer3DModel,)

    @classmethod
    def check(cls, model) -> str | None:
        if type(model) is not HunyuanVideo15Transformer3DModel:
            return (f"{type(model).__name__} is not diffusers' HunyuanVideo15Transformer3DModel; "
                    "its extra inputs are not supported")
        return cls.check_layout(model)

