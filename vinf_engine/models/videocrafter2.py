"""VideoCrafter2 in diffusers layout: a ``UNet3DConditionModel`` whose time embedding also
receives a frame-rate embedding.

VideoCrafter2 (AILab-CVC) is the ModelScope UNet3D architecture plus one extra input: the
frames-per-second the clip should look like, embedded the same way as the timestep and added
to the timestep embedding before it reaches the resnets. The public diffusers conversion
(``adamdad/videocrafterv2_diffusers``, made for the VICO project and used by the Video-Infinity
reference code) keeps every stock ``UNet3DConditionModel`` weight name and adds:

    config key     ``fps_cond``  (bool, true for VideoCrafter2)
    fps_proj       ``Timesteps(block_out_channels[0], flip_sin_to_cos=True, downscale_freq_shift=0)``
                   (no weights)
    fps_embedding  ``TimestepEmbedding(block_out_channels[0], 4 * block_out_channels[0], act_fn)``
                   weights ``fps_embedding.linear_1.{weight,bias}``, ``fps_embedding.linear_2.{weight,bias}``

so ``VideoCrafter2UNet3DConditionModel.from_pretrained(folder)`` loads those weights whatever
``_class_name`` the folder's ``config.json`` names. Everything that couples frames is the stock
diffusers module, so ``vinf_engine.parallelize`` patches it like any UNet3D.
"""
from __future__ import annotations

import json
import os

import torch
from diffusers import UNet3DConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps

__all__ = ["VideoCrafter2UNet3DConditionModel", "DEFAULT_FPS", "is_videocrafter2_unet_dir"]

DEFAULT_FPS = 24     # the frame rate the Video-Infinity paper conditioned VideoCrafter2 on

# ``_class_name`` values that public VideoCrafter2 conversions write into unet/config.json.
VC2_CLASS_NAMES = ("VideoCrafter2UNet3DConditionModel", "UNetVideoCrafter",
                   "UNet3DVideoCrafterConditionModel")


class VideoCrafter2UNet3DConditionModel(UNet3DConditionModel):
    """``UNet3DConditionModel`` + fps conditioning (VideoCrafter2).

    ``forward(sample, timestep, encoder_hidden_states, fps=24, ...)``: ``fps`` is a number or a
    ``(B,)`` tensor; its sinusoidal embedding goes through ``fps_embedding`` and is added to the
    timestep embedding. With ``fps_cond=False`` the model is a plain UNet3D.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int | None = None,
        in_channels: int = 4,
        out_channels: int = 4,
        down_block_types: tuple[str, ...] = ("CrossAttnDownBlock3D", "CrossAttnDownBlock3D",
                                             "CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types: tuple[str, ...] = ("UpBlock3D", "CrossAttnUpBlock3D",
                                           "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        act_fn: str = "silu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 1024,
        attention_head_dim: int | tuple[int] = 64,
        num_attention_heads: int | tuple[int] | None = None,
        time_cond_proj_dim: int | None = None,
        fps_cond: bool = True,
    ):
        super().__init__(
            sample_size=sample_size, in_channels=in_channels, out_channels=out_channels,
            down_block_types=down_block_types, up_block_types=up_block_types,
            block_out_channels=block_out_channels, layers_per_block=layers_per_block,
            downsample_padding=downsample_padding, mid_block_scale_factor=mid_block_scale_factor,
            act_fn=act_fn, norm_num_groups=norm_num_groups, norm_eps=norm_eps,
            cross_attention_dim=cross_attention_dim, attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads, time_cond_proj_dim=time_cond_proj_dim)
        self._fps_emb = None
        if fps_cond:
            c0 = block_out_channels[0]
            self.fps_proj = Timesteps(c0, True, 0)
            self.fps_embedding = TimestepEmbedding(c0, 4 * c0, act_fn=act_fn)
            # The stock forward computes ``emb = time_embedding(t_emb)`` and broadcasts it over
            # frames; adding the fps embedding to that output is exactly VideoCrafter2's
            # ``emb = emb + fps_emb``, without a copy of diffusers' forward to keep in sync.
            self.time_embedding.register_forward_hook(self._add_fps_embedding)

    def _add_fps_embedding(self, module, args, emb):
        if self._fps_emb is None:
            return emb
        return emb + self._fps_emb

    def _unet_forward(self, *args, **kwargs):
        """The UNet3D forward under the fps embedding: the stock one, or the engine's
        (``_vinf_unet_forward``, set by a memory-bounded engine: ``unet3d.owned_forward``)."""
        fn = self.__dict__.get("_vinf_unet_forward")
        return fn(*args, **kwargs) if fn is not None else super().forward(*args, **kwargs)

    def forward(self, sample, timestep, encoder_hidden_states, fps=None, *args, **kwargs):
        if not self.config.fps_cond:
            return self._unet_forward(sample, timestep, encoder_hidden_states, *args, **kwargs)
        batch = sample.shape[0]
        if fps is None:
            fps = DEFAULT_FPS
        if not torch.is_tensor(fps):
            fps = torch.tensor([float(fps)], dtype=torch.float64, device=sample.device)
        fps = fps.reshape(-1).to(sample.device).expand(batch)
        emb = self.fps_embedding(self.fps_proj(fps).to(dtype=self.dtype))
        self._fps_emb = emb
        try:
            return self._unet_forward(sample, timestep, encoder_hidden_states, *args, **kwargs)
        finally:
            self._fps_emb = None


def is_videocrafter2_unet_dir(unet_dir: str) -> bool:
    """Whether the diffusers UNet folder ``unet_dir`` holds a VideoCrafter2 (fps-conditioned)
    UNet: its config says so (``fps_cond`` or a known class name), or its weights carry
    ``fps_embedding.*``."""
    with open(os.path.join(unet_dir, "config.json")) as f:
        cfg = json.load(f)
    if "fps_cond" in cfg:
        return bool(cfg["fps_cond"])
    if cfg.get("_class_name") in VC2_CLASS_NAMES:
        return True
    return any(k.startswith("fps_embedding.") for k in _weight_names(unet_dir))


def _weight_names(folder: str) -> list[str]:
    names = []
    for fname in sorted(os.listdir(folder)):
        path = os.path.join(folder, fname)
        if fname.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(path, framework="pt") as f:
                names.extend(f.keys())
        elif fname.endswith(".safetensors.index.json") or fname.endswith(".bin.index.json"):
            with open(path) as f:
                names.extend(json.load(f).get("weight_map", {}))
    return names
