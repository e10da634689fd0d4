"""The two small text-to-video pipelines of the quality bench, built in code (nothing downloaded).

- ``unet3d``: a diffusers ``TextToVideoSDPipeline``: ``UNet3DConditionModel`` (channels 32/64,
  1.3M parameters) over the latents of a 2-level ``AutoencoderKL`` (16x16 pixels -> 4x8x8), a
  random frozen 2-layer CLIP text encoder and a CLIP BPE tokenizer whose every word is one token;
  DDIM sampling (scaled-linear betas, as ModelScope's).
- ``wan``: a diffusers ``WanPipeline``: ``WanTransformer3DModel`` (width 96, 4 blocks, patch
  1x2x2: 16 tokens per frame) over the latents of an ``AutoencoderKLWan`` with *no temporal
  compression* (one latent frame per video frame, ``scale_factor_temporal=1``; its causal 3-D
  convolutions and frame-0 special case stay), a random frozen 2-layer UMT5 and a T5 Unigram
  tokenizer of whole words; UniPC flow-matching sampling (flow shift 3, as Wan 2.1 at 480p).

``build(kind)`` makes a pipeline with untrained weights (the VAE and denoiser are trained by
``bench/quality_train.py``); ``MODEL_DIRS`` is where the trained ones live.
"""
from __future__ import annotations

import os

import torch

from quality_lib import COLOURS, SHAPES, SIZE

__all__ = ["MODEL_DIRS", "KINDS", "build", "clip_tokenizer", "wan_tokenizer", "LATENT_CH",
           "make_vae", "make_denoiser", "text_embeddings"]

HERE = os.path.dirname(os.path.abspath(__file__))
KINDS = ("unet3d", "wan")
MODEL_DIRS = {k: os.path.join(HERE, "quality_models", k) for k in KINDS}
LATENT_CH = 4                 # latent channels of both VAEs (16x16x3 pixels -> 8x8x4)
TEXT_DIM = 32
CLIP_LEN = 16                 # tokens of the CLIP encoder's input (labels need at most 9)
WORDS = tuple(COLOURS) + SHAPES + ("and", "a", "the")


def _clip_merges(words) -> list:
    """BPE merges that make each of ``words`` (plus the end-of-word mark) one token.

    Each word's merges are appended after all earlier ones: BPE always applies the
    lowest-ranked merge present, so a merge appended later never changes how an earlier word
    is merged (each of its states already had a lower-ranked merge to apply)."""
    ranks: dict = {}

    def bpe(word):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            known = [(ranks[p], p) for p in zip(parts, parts[1:]) if p in ranks]
            if not known:
                return parts
            _, (a, b) = min(known)
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == (a, b):
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    for w in words:
        parts = bpe(w)
        while len(parts) > 1:
            ranks[(parts[0], parts[1])] = len(ranks)
            parts = bpe(w)
    return sorted(ranks, key=ranks.get)


def clip_tokenizer():
    """A CLIP BPE tokenizer of the data's words (each one token), 16 tokens long."""
    from transformers import CLIPTokenizer
    merges = _clip_merges(WORDS)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for tok in list(letters) + [c + "</w>" for c in letters] + [",</w>", ","]:
        vocab.setdefault(tok, len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_LEN)
    for w in WORDS:                        # the construction above, checked by the real thing
        ids = tok(w, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"word {w!r} tokenizes to {ids}")
    return tok


def wan_tokenizer():
    """A T5 Unigram tokenizer in which each of the data's words is one piece."""
    from transformers import T5Tokenizer
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0), (",", -2.0)]
    vocab += [(c, -4.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab += [("\u2581" + w, -1.0) for w in WORDS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def make_vae(kind: str):
    """The family's VAE, untrained: 16x16x3 pixels <-> 8x8x4 latents per frame."""
    if kind == "unet3d":
        from diffusers import AutoencoderKL
        return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT_CH,
                             down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2,
                             block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8,
                             sample_size=SIZE, scaling_factor=1.0)
    from diffusers import AutoencoderKLWan
    return AutoencoderKLWan(base_dim=16, z_dim=LATENT_CH, dim_mult=[1, 2], num_res_blocks=1,
                            temperal_downsample=[False], scale_factor_temporal=1,
                            scale_factor_spatial=2, latents_mean=[0.0] * LATENT_CH,
                            latents_std=[1.0] * LATENT_CH)


def make_denoiser(kind: str):
    """The family's denoiser, untrained (diffusers' own initialisation)."""
    if kind == "unet3d":
        from diffusers import UNet3DConditionModel
        return UNet3DConditionModel(
            sample_size=SIZE // 2, in_channels=LATENT_CH, out_channels=LATENT_CH,
            down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
            up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), block_out_channels=(32, 64),
            layers_per_block=1, cross_attention_dim=TEXT_DIM, attention_head_dim=8,
            norm_num_groups=8)
    from diffusers import WanTransformer3DModel
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=24,
        in_channels=LATENT_CH, out_channels=LATENT_CH, text_dim=TEXT_DIM, freq_dim=32,
        ffn_dim=192, num_layers=4, qk_norm="rms_norm_across_heads", cross_attn_norm=True,
        rope_max_seq_len=1024)


def _text_encoder(kind: str, vocab_size: int):
    if kind == "unet3d":
        from transformers import CLIPTextConfig, CLIPTextModel
        return CLIPTextModel(CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CLIP_LEN,
            bos_token_id=0, eos_token_id=1, pad_token_id=1))
    from transformers import UMT5Config, UMT5EncoderModel
    return UMT5EncoderModel(UMT5Config(
        vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0))


def build(kind: str, seed: int = 0):
    """A pipeline of ``kind`` ("unet3d" or "wan") with freshly initialised modules, seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "unet3d":
            from diffusers import DDIMScheduler
            from vinf_engine.pipelines.unet3d import t2v_pipeline
            tok = clip_tokenizer()
            return t2v_pipeline(
                vae=make_vae(kind).eval(), text_encoder=_text_encoder(kind, len(tok)).eval(),
                tokenizer=tok, unet=make_denoiser(kind).eval(),
                scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                        beta_end=0.012, clip_sample=False,
                                        set_alpha_to_one=False, steps_offset=1))
        from diffusers import UniPCMultistepScheduler, WanPipeline
        tok = wan_tokenizer()
        pipe = WanPipeline(
            tokenizer=tok, text_encoder=_text_encoder(kind, len(tok)).eval(),
            transformer=make_denoiser(kind).eval(), vae=make_vae(kind).eval(),
            scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction",
                                              use_flow_sigmas=True, flow_shift=3.0,
                                              num_train_timesteps=1000))
        pipe.set_progress_bar_config(disable=True)
        return pipe


@torch.no_grad()
def text_embeddings(pipe, texts) -> dict:
    """{text: (1, L, TEXT_DIM)} as the pipeline's own ``encode_prompt`` makes them (what the
    engine's generation path conditions on), for training on exactly those."""
    out = {}
    for t in texts:
        if hasattr(pipe, "transformer"):
            e = pipe.encode_prompt(prompt=t, do_classifier_free_guidance=False,
                                   max_sequence_length=512, device="cpu")[0]
        else:
            e = pipe.encode_prompt(t, "cpu", 1, False)[0]
        out[t] = e.float()
    return out
