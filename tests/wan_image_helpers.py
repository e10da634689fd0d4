"""Tiny random Wan image-to-video pipelines (``WanImageToVideoPipeline``) for tests, built
offline: Wan 2.1 I2V (CLIP image tokens), a first-last-frame model (two images' tokens,
``pos_embed_seq_len``), the Wan 2.2 I2V-A14B layout (two experts, no CLIP): their transformer
takes the latents, four mask channels and the condition latents, ``2 * 16 + 4`` input
channels; and Wan 2.2 TI2V-5B's image-to-video (``expand_timesteps``: the image's latent
replaces latent frame 0; the 48-channel VAE)."""
from __future__ import annotations

import os

from wan_helpers import _seeded, _text_encoder, _tokenizer, _transformer, _vae

CLIP_DIM = 16


def _clip():
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
    cfg = CLIPVisionConfig(hidden_size=CLIP_DIM, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=16)
    processor = CLIPImageProcessor(size={"shortest_edge": 32},
                                   crop_size={"height": 32, "width": 32})
    return _seeded(lambda: CLIPVisionModel(cfg), 500), processor


def tiny_wan_i2v_pipeline(variant: str = "2.1", seed: int = 0):
    """``variant``: "2.1" (CLIP tokens of one image), "flf2v" (of the first and the last
    image), "2.2" (two experts switched at boundary_ratio 0.875, no CLIP), "ti2v"."""
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline
    if variant not in ("2.1", "flf2v", "2.2", "ti2v"):
        raise ValueError(f"unknown Wan image-to-video variant {variant!r}")
    tok = _tokenizer()
    clip = variant in ("2.1", "flf2v")
    ti2v = variant == "ti2v"
    z_dim = 48 if ti2v else 16
    extra = {}
    kw = {} if ti2v else dict(in_channels=2 * z_dim + 4, out_channels=z_dim)
    if clip:
        tokens = 2 * 5 if variant == "flf2v" else None      # 5 tokens an image (32 / 16)^2 + 1
        kw.update(image_dim=CLIP_DIM, added_kv_proj_dim=48, pos_embed_seq_len=tokens)
        extra["image_encoder"], extra["image_processor"] = _clip()
    if variant == "2.2":
        extra.update(transformer_2=_seeded(lambda: _transformer(16, **kw), seed + 300),
                     boundary_ratio=0.875)
    return WanImageToVideoPipeline(
        tokenizer=tok, text_encoder=_seeded(lambda: _text_encoder(len(tok)), seed + 100),
        transformer=_seeded(lambda: _transformer(z_dim, **kw), seed + 200),
        vae=_seeded(lambda: _vae(ti2v), seed + 400),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                          flow_shift=3.0, num_train_timesteps=1000),
        expand_timesteps=ti2v, **extra)


def save_tiny_wan_i2v_pipeline(folder: str, variant: str = "2.1", seed: int = 0) -> str:
    path = os.path.join(folder, "model")
    tiny_wan_i2v_pipeline(variant, seed).save_pretrained(path)
    return path
