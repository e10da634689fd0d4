"""Tiny random CogVideoX models and pipelines for tests, built offline.

Three transformer layouts: ``"5b"`` (CogVideoX 1.0 with 3-D RoPE), ``"2b"`` (CogVideoX 1.0
with the 3-D sin-cos position embedding) and ``"1.5"`` (RoPE and temporal patches of 2
latent frames). Parameters diffusers initialises to zero are filled with small noise.
"""
from __future__ import annotations

import torch

TEXT_DIM = 8
TEXT_LEN = 5


def _transformer(variant: str, **overrides):
    from diffusers import CogVideoXTransformer3DModel
    cfg = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
               time_embed_dim=16, text_embed_dim=TEXT_DIM, num_layers=2, sample_width=8,
               sample_height=8, sample_frames=9, patch_size=2, max_text_seq_length=TEXT_LEN,
               use_rotary_positional_embeddings=variant != "2b")
    if variant == "1.5":
        cfg.update(patch_size_t=2, sample_frames=13, patch_bias=False)
    return CogVideoXTransformer3DModel(**{**cfg, **overrides})


def tiny_cogvideox_transformer(variant: str = "5b", seed: int = 0, **overrides):
    """A tiny random ``CogVideoXTransformer3DModel`` (the same on every rank). Trained length
    (``sample_frames``): 9 video frames = 3 latent frames (1.5: 13 = 4 latent, 2 pairs)."""
    from helpers import fill_zeros
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = _transformer(variant, **overrides).eval()
    return fill_zeros(m, seed + 1)


def rope_table(model, latent_frames: int, h: int, w: int):
    """``image_rotary_emb`` as ``CogVideoXPipeline._prepare_rotary_positional_embeddings``
    makes it for ``latent_frames`` latent frames of ``h x w`` latents, or None (2b)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
    c = model.config
    if not c.use_rotary_positional_embeddings:
        return None
    p, p_t = c.patch_size, c.patch_size_t
    gh, gw = h // p, w // p
    if p_t is None:
        crops = get_resize_crop_region_for_grid((gh, gw), c.sample_width // p, c.sample_height // p)
        return get_3d_rotary_pos_embed(embed_dim=c.attention_head_dim, crops_coords=crops,
                                       grid_size=(gh, gw), temporal_size=latent_frames)
    return get_3d_rotary_pos_embed(embed_dim=c.attention_head_dim, crops_coords=None,
                                   grid_size=(gh, gw), temporal_size=(latent_frames + p_t - 1) // p_t,
                                   grid_type="slice", max_size=(c.sample_height // p, c.sample_width // p))


def cog_inputs(frames: int, unit: int = 1, seed: int = 1, batch: int = 2, hw=(4, 6)):
    """Latents in the engine's layout (B, 4*unit, frames, h, w) (``frames`` token frames,
    ``unit`` latent frames each) and text embeddings (B, TEXT_LEN, TEXT_DIM)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4 * unit, frames, *hw, generator=g)
    text = torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g)
    return x, text


def to_model(x, unit: int):
    """Engine layout (B, C*unit, F, h, w) -> the model's (B, F*unit, C, h, w)."""
    B, Cu, F, h, w = x.shape
    return x.transpose(1, 2).unflatten(2, (unit, Cu // unit)).flatten(1, 2)


def from_model(y, unit: int):
    """The model's (B, F*unit, C, h, w) -> engine layout (B, C*unit, F, h, w)."""
    B, Fu, C, h, w = y.shape
    return y.unflatten(1, (Fu // unit, unit)).flatten(2, 3).transpose(1, 2)


def cog_call(model, clip, t, text):
    """The stock signature on a clip in the engine's layout; the output in that layout."""
    unit = model.config.patch_size_t or 1
    x = to_model(clip, unit)
    # (a table of one frame for an empty clip, which the engine then refuses on every rank)
    rot = rope_table(model, max(x.shape[1], unit), x.shape[3], x.shape[4])
    out = model(hidden_states=x, encoder_hidden_states=text,
                timestep=torch.full((clip.shape[0],), float(t)), image_rotary_emb=rot).sample
    return from_model(out, unit)
