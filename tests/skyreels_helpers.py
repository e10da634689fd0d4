"""Tiny random SkyReels-V2 models and pipelines for tests, built offline: the released classes
(``SkyReelsV2Transformer3DModel``, and Wan's UMT5 text encoder, T5 tokenizer, ``AutoencoderKLWan``
and UniPC flow scheduler from ``wan_helpers``) shrunk to a few thousand random weights."""
from __future__ import annotations

import os

import torch

from wan_helpers import _seeded, _text_encoder, _tokenizer, _vae, _TEXT_DIM

SKY_HW = (32, 64)      # (height, width) of the video: latents 4 x 8


def tiny_skyreels_transformer(seed: int = 0, **overrides):
    """A tiny random ``SkyReelsV2Transformer3DModel`` (the same on every rank), zero params
    filled so that every module counts."""
    from diffusers import SkyReelsV2Transformer3DModel
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24,
               in_channels=16, out_channels=16, text_dim=_TEXT_DIM, freq_dim=16, ffn_dim=32,
               num_layers=2, qk_norm="rms_norm_across_heads", cross_attn_norm=True,
               rope_max_seq_len=1024)
    return _seeded(lambda: SkyReelsV2Transformer3DModel(**{**cfg, **overrides}), seed)


def skyreels_inputs(frames: int, seed: int = 1, batch: int = 2, hw=(4, 4)):
    """Latents (B, 16, frames, h, w) and text embeddings (B, 5, text_dim)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, frames, *hw, generator=g),
            torch.randn(batch, 5, _TEXT_DIM, generator=g))


def tiny_skyreels_pipeline(seed: int = 0):
    """A ``SkyReelsV2Pipeline`` of tiny random modules (not saved)."""
    from diffusers import SkyReelsV2Pipeline, UniPCMultistepScheduler
    tok = _tokenizer()
    return SkyReelsV2Pipeline(
        tokenizer=tok,
        text_encoder=_seeded(lambda: _text_encoder(len(tok)), seed + 100),
        transformer=tiny_skyreels_transformer(seed + 200),
        vae=_seeded(lambda: _vae(False), seed + 400),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                          flow_shift=3.0, num_train_timesteps=1000))


def save_tiny_skyreels_pipeline(folder: str, seed: int = 0) -> str:
    """Saves ``tiny_skyreels_pipeline(seed)`` under ``folder/model``; returns that path."""
    path = os.path.join(folder, "model")
    tiny_skyreels_pipeline(seed).save_pretrained(path)
    return path


def skyreels_model_rank(rank, world, sizes, frames, t, exact, dual, group=None):
    """This rank's clip of the tiny transformer's output, in the exact and a dual-scope
    config (``sizes``: the clip lengths, uneven; ``group``: the ranks, default all)."""
    import vinf_engine as vinf
    x, text = skyreels_inputs(frames)
    start = sum(sizes[:rank])
    clip = x[:, :, start:start + sizes[rank]]
    out = {}
    for name, cfg in (("exact", exact), ("dual", dual)):
        model = tiny_skyreels_transformer()
        vinf.parallelize(model, vinf.DualScopeConfig(**cfg), process_group=group)
        with torch.no_grad():
            out[name] = model(clip, torch.full((2,), t), text, return_dict=False)[0]
    return out


def skyreels_ranks_job(rank, world, frames, t, exact, dual, model_dir, gen, i2v):
    """On 3 ranks: the transformer's output split (1, 6, 4); then on ranks {0, 1} alone (a
    subgroup, as ``gen_helpers.invariance_rank`` makes one): split (6, 5), and the latents of
    this rank's clip from ``vinf.generate`` (text-to-video; ``i2v``: (folder, arguments) of
    image-to-video) and from the drop-in."""
    import datetime
    import torch.distributed as dist
    import vinf_engine as vinf
    res = {3: skyreels_model_rank(rank, world, (1, 6, 4), frames, t, exact, dual)}
    if rank < 2:
        pair = dist.new_group([0, 1], backend="gloo", use_local_synchronization=True,
                              timeout=datetime.timedelta(seconds=60))
        res[2] = skyreels_model_rank(rank, 2, (6, 5), frames, t, exact, dual, group=pair)
        res["gen"] = vinf.generate(model_dir, out=None, save_latents=None, process_group=pair,
                                   progress=False, **gen)["latents"]
        res["pipe"] = drop_in_latents(model_dir, dual, group=pair)
        res["i2v"] = vinf.generate(i2v[0], out=None, save_latents=None, process_group=pair,
                                   progress=False, **i2v[1])["latents"]
    dist.barrier()
    return res


def drop_in_latents(model_dir, config, group=None):
    """The unchanged ``SkyReelsV2Pipeline`` call's latents (17 frames: 5 latent frames, from
    fixed noise), the pipeline under ``vinf.parallelize_pipe`` with ``config`` (None: the
    pipeline unpatched)."""
    import vinf_engine as vinf
    from vinf_engine.pipelines import load_pipeline
    pipe = load_pipeline(model_dir)
    if config is not None:
        vinf.parallelize_pipe(pipe, vinf.DualScopeConfig(**config), process_group=group)
    noise = vinf.initial_noise(4, (1, 16, 5, SKY_HW[0] // 8, SKY_HW[1] // 8))
    return pipe("the cat", negative_prompt="a dog", num_frames=17, num_inference_steps=1,
                guidance_scale=4.0, height=SKY_HW[0], width=SKY_HW[1], latents=noise,
                output_type="latent").frames


def tiny_skyreels_i2v_pipeline(seed: int = 0):
    """A ``SkyReelsV2ImageToVideoPipeline`` of tiny random modules (not saved): a transformer
    taking the latents, four mask channels and the condition latents (``2 * 16 + 4``
    channels) and CLIP image tokens (``CLIPVisionModelWithProjection``, whose penultimate
    hidden states the pipeline reads)."""
    from diffusers import SkyReelsV2ImageToVideoPipeline, UniPCMultistepScheduler
    from transformers import (CLIPImageProcessor, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)
    cfg = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=16,
                           projection_dim=16)
    tok = _tokenizer()
    return SkyReelsV2ImageToVideoPipeline(
        tokenizer=tok, text_encoder=_seeded(lambda: _text_encoder(len(tok)), seed + 100),
        image_encoder=_seeded(lambda: CLIPVisionModelWithProjection(cfg), seed + 500),
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                           crop_size={"height": 32, "width": 32}),
        transformer=tiny_skyreels_transformer(seed + 200, in_channels=36, image_dim=16,
                                              added_kv_proj_dim=48),
        vae=_seeded(lambda: _vae(False), seed + 400),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                          flow_shift=3.0, num_train_timesteps=1000))
