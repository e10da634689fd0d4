"""Tiny random Wan text-to-video pipelines for tests, built offline.

Each builder returns a real ``diffusers.WanPipeline`` whose modules are the released
classes (UMT5 text encoder, ``WanTransformer3DModel``, ``AutoencoderKLWan``, UniPC
flow scheduler, a T5 Unigram tokenizer) shrunk to under 100k random weights each, so a
whole save -> ``WanPipeline.from_pretrained`` -> generate round trip runs in seconds on
CPU with no download.  Three layouts are covered (``tiny_wan_i2v_pipeline``: the same three
as ``WanImageToVideoPipeline``s):

* ``"2.1"``  - one transformer, 16-channel VAE (4x temporal, 8x spatial).
* ``"2.2"``  - Wan 2.2 A14B: two experts ``transformer`` / ``transformer_2`` with
  different weights, switched at ``boundary_ratio=0.875``.
* ``"ti2v"`` - Wan 2.2 TI2V-5B: ``expand_timesteps=True`` and the 48-channel residual
  VAE (pixel patchify 2, 4x16x16 compression), as in diffusers' conversion script.

Parameters that diffusers initialises to zero are filled with small noise, so that the
output depends on every module.
"""
from __future__ import annotations

import os

import torch

WAN_HW = (32, 64)   # (height, width): a multiple of 16 (ti2v VAE) * 2 (patch); 2.1 latents 4x8

_WORDS = ("the a an on in of and with is cat dog red blue green panda rock tree sky water "
          "river city man woman car bird fish running sitting flying big small video").split()
_TEXT_DIM = 16


def _tokenizer():
    from transformers import T5Tokenizer
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    chars = "abcdefghijklmnopqrstuvwxyz" + "abcdefghijklmnopqrstuvwxyz".upper() + "0123456789,.!?'-"
    vocab += [(c, -4.0) for c in chars]
    vocab += [("\u2581" + w, -2.0) for w in _WORDS]   # whole words beat spelling them out
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def _text_encoder(vocab_size: int):
    from transformers import UMT5Config, UMT5EncoderModel
    cfg = UMT5Config(vocab_size=vocab_size, d_model=_TEXT_DIM, d_kv=8, d_ff=32, num_layers=2,
                     num_heads=2, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                     dropout_rate=0.0)
    return UMT5EncoderModel(cfg)


def _transformer(z_dim: int, **overrides):
    from diffusers import WanTransformer3DModel
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24,
               in_channels=z_dim, out_channels=z_dim, text_dim=_TEXT_DIM, freq_dim=16,
               ffn_dim=32, num_layers=2, qk_norm="rms_norm_across_heads", cross_attn_norm=True,
               rope_max_seq_len=1024)
    return WanTransformer3DModel(**{**cfg, **overrides})


def _vae(ti2v: bool):
    from diffusers import AutoencoderKLWan
    small = dict(dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    if not ti2v:
        return AutoencoderKLWan(base_dim=3, z_dim=16, **small)
    g = torch.Generator().manual_seed(48)   # 48-long latent mean/std lists, like the released ones
    return AutoencoderKLWan(   # keys of diffusers' vae22_diffusers_config (Wan2.2_VAE.pth)
        base_dim=4, decoder_base_dim=6, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
        patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16,
        latents_mean=(0.2 * torch.randn(48, generator=g)).tolist(),
        latents_std=(0.5 + torch.rand(48, generator=g)).tolist(), **small)


def _seeded(make, seed: int):
    """``make()`` under ``torch.manual_seed(seed)`` (global RNG restored), zero params filled."""
    from helpers import fill_zeros
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = make().eval()
    return fill_zeros(m, seed + 1)


def tiny_wan_pipeline(variant: str = "2.1", seed: int = 0):
    """A ``WanPipeline`` of tiny random modules (not saved); variant "2.1", "2.2" or "ti2v"."""
    from diffusers import UniPCMultistepScheduler, WanPipeline
    if variant not in ("2.1", "2.2", "ti2v"):
        raise ValueError(f"unknown Wan variant {variant!r}")
    ti2v = variant == "ti2v"
    z_dim = 48 if ti2v else 16
    tok = _tokenizer()
    extra = {}
    if variant == "2.2":
        extra = dict(transformer_2=_seeded(lambda: _transformer(z_dim), seed + 300),
                     boundary_ratio=0.875)   # 2 steps, flow_shift 3: t=999 -> expert 1, 750 -> 2
    return WanPipeline(
        tokenizer=tok,
        text_encoder=_seeded(lambda: _text_encoder(len(tok)), seed + 100),
        transformer=_seeded(lambda: _transformer(z_dim), seed + 200),
        vae=_seeded(lambda: _vae(ti2v), seed + 400),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                          flow_shift=3.0, num_train_timesteps=1000),
        expand_timesteps=ti2v, **extra)


def wan_image(seed: int = 0, hw=WAN_HW):
    """A random RGB ``PIL.Image`` of ``hw`` (height, width)."""
    import numpy as np
    from PIL import Image
    g = np.random.default_rng(seed)
    return Image.fromarray(g.integers(0, 256, (*hw, 3), dtype=np.uint8))


def save_tiny_wan_pipeline(folder: str, variant: str = "2.1", seed: int = 0) -> str:
    """Saves ``tiny_wan_pipeline(variant, seed)`` under ``folder/model``; returns that path."""
    path = os.path.join(folder, "model")
    tiny_wan_pipeline(variant, seed).save_pretrained(path)
    return path


def tiny_wan_transformer(seed: int = 0, z_dim: int = 16, **overrides):
    """A tiny random ``WanTransformer3DModel`` (the same on every rank), zero params filled."""
    return _seeded(lambda: _transformer(z_dim, **overrides), seed)


def wan_inputs(frames: int, seed: int = 1, batch: int = 2, hw=(4, 4), z_dim: int = 16):
    """Latents (B, z_dim, frames, h, w) and text embeddings (B, 5, text_dim)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, z_dim, frames, *hw, generator=g)
    text = torch.randn(batch, 5, _TEXT_DIM, generator=g)
    return x, text


def wan_generation_rank(rank, world, model_dir, out_dir, kwargs, bad_cases):
    """On ``world`` ranks: the invariance runs of ``gen_helpers.invariance_rank``, this rank's
    share of a distributed VAE decode of fixed latents, and each bad-input case's error."""
    from gen_helpers import invariance_rank
    import vinf_engine as vinf
    from vinf_engine.pipelines import load_pipeline
    from vinf_engine.pipelines.wan import WanPipelines
    res = invariance_rank(rank, world, model_dir, out_dir, kwargs)
    pipe = load_pipeline(model_dir)
    frames = 12
    z = torch.randn(1, 16, frames, 4, 8, generator=torch.Generator().manual_seed(9))
    layout = vinf.ClipLayout(frames, world)
    comm = vinf.ClipComm()
    mine = z[:, :, layout.start(rank):layout.end(rank)]
    res["decoded"] = list(WanPipelines().decode(pipe, mine, layout, rank, comm, chunk=2))
    res["decode_bytes"] = comm.counters.bytes_received
    for name, kw in bad_cases:
        try:
            vinf.generate(model_dir, progress=False, **kw)
            res["bad", name] = None
        except vinf.GenerationError as e:
            res["bad", name] = str(e)
    return res
