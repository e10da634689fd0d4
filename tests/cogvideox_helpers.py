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


# -- a whole CogVideoXPipeline, for vinf.generate ------------------------------------------------

PIPE_HW = (16, 24)      # pixels: the tiny VAE's 4x -> latents 4 x 6 -> 2 x 3 tokens a frame
VAE = dict(down_block_types=("CogVideoXDownBlock3D",) * 3,
           up_block_types=("CogVideoXUpBlock3D",) * 3, block_out_channels=(4, 4, 4),
           latent_channels=4, layers_per_block=1, norm_num_groups=2,
           temporal_compression_ratio=4)
# CogVideoX-2b's scheduler_config.json
SCHEDULER = dict(beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085,
                 clip_sample=False, num_train_timesteps=1000, prediction_type="v_prediction",
                 rescale_betas_zero_snr=True, set_alpha_to_one=True, snr_shift_scale=3.0,
                 steps_offset=0, timestep_spacing="trailing")


def tiny_cogvideox_pipeline(variant: str = "5b", seed: int = 0):
    """A ``CogVideoXPipeline`` of tiny random modules (not saved): T5 text encoder and
    tokenizer (226 tokens, as the pipeline pads), the transformer of ``variant`` ("2b" or
    "5b": trained on 9 video frames, 3 latent frames; "1.5": on 25, 7 latent frames, 4 pairs
    after the pipeline's pad; at 16 x 24), a 3-level VAE."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline
    from transformers import T5Config, T5EncoderModel
    from helpers import fill_zeros
    from wan_helpers import _tokenizer
    tok = _tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 100)
        te = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=TEXT_DIM, d_kv=4, d_ff=16,
                                     num_layers=1, num_heads=2, dropout_rate=0.0,
                                     relative_attention_num_buckets=8)).eval()
        torch.manual_seed(seed + 200)
        vae = AutoencoderKLCogVideoX(**VAE).eval()
    tr = tiny_cogvideox_transformer(variant, seed, max_text_seq_length=226, sample_height=4,
                                    sample_width=6, **(dict(sample_frames=25) if variant == "1.5"
                                                       else {}))
    return CogVideoXPipeline(tokenizer=tok, text_encoder=fill_zeros(te, seed + 101), vae=vae,
                             transformer=tr, scheduler=CogVideoXDDIMScheduler(**SCHEDULER))


def save_tiny_cogvideox_pipeline(folder: str, variant: str = "5b", seed: int = 0) -> str:
    """Saves ``tiny_cogvideox_pipeline(variant, seed)`` under ``folder/model``; its path."""
    import os
    path = os.path.join(folder, "model")
    tiny_cogvideox_pipeline(variant, seed).save_pretrained(path)
    return path


def cogvideox_generation_rank(rank, world, model_dir, out_dir, kwargs, bad_cases, v15):
    """On ``world`` ranks: the invariance runs of ``gen_helpers.invariance_rank`` (under
    ``"1.5"`` too, of ``v15``: ``(model_dir, out_dir, kwargs)``), this rank's share of a
    distributed VAE decode of fixed latents, the drop-in of 5b and 1.5, and each bad-input
    case's error (a case's ``model`` overrides ``model_dir``)."""
    from gen_helpers import invariance_rank
    import vinf_engine as vinf
    from vinf_engine.pipelines import load_pipeline
    from vinf_engine.pipelines.cogvideox import CogVideoXPipelines
    res = invariance_rank(rank, world, model_dir, out_dir, kwargs)
    res["1.5"] = invariance_rank(rank, world, *v15)
    pipe = load_pipeline(model_dir)
    z = fixed_latents()
    layout = vinf.ClipLayout(z.shape[2], world)
    comm = vinf.ClipComm()
    mine = z[:, :, layout.start(rank):layout.end(rank)]
    res["decoded"] = list(CogVideoXPipelines().decode(pipe, mine, layout, rank, comm, chunk=2))
    res["decode_bytes"] = comm.counters.bytes_received
    exact = vinf.DualScopeConfig(window=100, num_global=0, phase_bias=0.0)
    res["dropin"] = dropin_latents(vinf.parallelize_pipe(tiny_cogvideox_pipeline("5b"), exact))
    res["dropin", "1.5"] = dropin_latents(vinf.parallelize_pipe(
        tiny_cogvideox_pipeline("1.5"), exact), num_frames=DROPIN_FRAMES_15)
    for name, kw in bad_cases:
        try:
            vinf.generate(**{"model": model_dir, **kw}, progress=False)
            res["bad", name] = None
        except vinf.GenerationError as e:
            res["bad", name] = str(e)
    return res


def fixed_latents():
    """(1, 4, 11, 4, 6): on 3 ranks (4, 4, 3 latent frames) rank 1's clip ends inside a
    chunk (its last pair reads rank 2's first frame) and rank 2's warm-up comes from ranks 0
    and 1. (Warm-ups that start past the video's first chunk: tests/test_cogvideox_vae.py.)"""
    return torch.randn(1, 4, 11, 4, 6, generator=torch.Generator().manual_seed(9))


# 1.5's drop-in: 7 latent frames, padded in front to 4 pairs by the pipeline: (2, 1, 1) pairs
# on 3 ranks.
DROPIN_FRAMES_15 = 25


def dropin_latents(pipe, num_frames: int = 9):
    """The stock ``pipe(...)`` call of the drop-in check: 9 frames (3 latent frames), 2
    steps."""
    return pipe("the cat", num_frames=num_frames, num_inference_steps=2, height=PIPE_HW[0],
                width=PIPE_HW[1], output_type="latent",
                generator=torch.Generator().manual_seed(0)).frames
