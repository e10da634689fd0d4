"""Tiny random HunyuanVideo 1.5 models and pipelines for tests, built offline.

The transformer has two dual-stream blocks, a 3-D RoPE split (4, 6, 6) over 16-channel heads
and patch 1; its input is the latents (4 channels) beside the pipeline's zero condition
latents and mask (4 + 1), 9 channels. Its text is three streams (Qwen, ByT5 glyph text, image
slots), each with a mask; the model reorders every row's valid tokens first. The VAE keeps the
released layout (16x spatial, 4x temporal, five causal up levels, a mid block with
frame-causal attention) at 8 channels. Parameters diffusers initialises to zero are filled
with small noise.
"""
from __future__ import annotations

import torch

TEXT_DIM = 8          # the Qwen encoder's width
TEXT_2_DIM = 8        # the ByT5 encoder's width
IMAGE_DIM = 8         # the image slots' width
LATENT = 4


def tiny_hunyuan15_transformer(seed: int = 0, **overrides):
    """A tiny random ``HunyuanVideo15Transformer3DModel`` (the same on every rank)."""
    from diffusers import HunyuanVideo15Transformer3DModel
    from helpers import fill_zeros
    cfg = dict(in_channels=2 * LATENT + 1, out_channels=LATENT, num_attention_heads=2,
               attention_head_dim=16, num_layers=2, num_refiner_layers=1, mlp_ratio=2.0,
               patch_size=1, patch_size_t=1, text_embed_dim=TEXT_DIM,
               text_embed_2_dim=TEXT_2_DIM, image_embed_dim=IMAGE_DIM, rope_axes_dim=(4, 6, 6),
               target_size=64, task_type="t2v")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = HunyuanVideo15Transformer3DModel(**{**cfg, **overrides}).eval()
    return fill_zeros(m, seed + 1)


class Hunyuan15Text(tuple):
    """(text, mask, text_2, mask_2, image_embeds): the conditioning of one call."""


def hunyuan15_inputs(frames: int, seed: int = 1, batch: int = 2, hw=(2, 3), valid=(5, 3),
                     valid_2=(2, 0)):
    """Latents (B, 9, frames, h, w) (the last 5 channels zero, as the T2V pipeline's condition
    and mask) and the text conditioning: Qwen embeddings (B, 5, TEXT_DIM) keeping
    ``valid[b]`` tokens of row b, ByT5 embeddings (B, 3, TEXT_2_DIM) keeping ``valid_2[b]``,
    and zero image embeddings (B, 2, IMAGE_DIM): text-to-video, the image slots masked."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(batch, 2 * LATENT + 1, frames, *hw)
    x[:, :LATENT] = torch.randn(batch, LATENT, frames, *hw, generator=g)
    text = torch.randn(batch, 5, TEXT_DIM, generator=g)
    text_2 = torch.randn(batch, 3, TEXT_2_DIM, generator=g)
    mask = torch.zeros(batch, 5, dtype=torch.long)
    mask_2 = torch.zeros(batch, 3, dtype=torch.long)
    for b in range(batch):
        mask[b, :valid[b % len(valid)]] = 1
        mask_2[b, :valid_2[b % len(valid_2)]] = 1
    image = torch.zeros(batch, 2, IMAGE_DIM)
    return x, Hunyuan15Text((text, mask, text_2, mask_2, image))


def hunyuan15_call(model, clip, t, cond):
    """The stock signature on a clip (B, 9, F, h, w); the output (B, 4, F, h, w). The
    timestep in the clip's dtype, as the pipeline passes it (the time embedding casts to it)."""
    text, mask, text_2, mask_2, image = cond
    B = clip.shape[0]
    return model(hidden_states=clip, timestep=torch.full((B,), float(t), dtype=clip.dtype),
                 encoder_hidden_states=text, encoder_attention_mask=mask,
                 encoder_hidden_states_2=text_2, encoder_attention_mask_2=mask_2,
                 image_embeds=image).sample


# -- the VAE ---------------------------------------------------------------------------------

VAE = dict(latent_channels=LATENT, block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1)


def tiny_hunyuan15_vae(seed: int = 0, dtype=torch.float32):
    """A tiny random ``AutoencoderKLHunyuanVideo15``: 16x spatial, 4x temporal compression."""
    from diffusers import AutoencoderKLHunyuanVideo15
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKLHunyuanVideo15(**VAE).eval().to(dtype)


# The released layout's operators (causal convs, resnets, a frame-causal mid-block attention,
# temporal then spatial-only upsamplers) with a short temporal reach: one resnet per up block,
# three levels (4x spatial, 4x temporal), so that small videos put clips past every warm-up.
SHORT_VAE = dict(latent_channels=LATENT, block_out_channels=(8, 8, 8), layers_per_block=0,
                 spatial_compression_ratio=4, temporal_compression_ratio=4)


def short_hunyuan15_vae(seed: int = 0, dtype=torch.float32):
    """A tiny ``AutoencoderKLHunyuanVideo15`` of ``SHORT_VAE``."""
    from diffusers import AutoencoderKLHunyuanVideo15
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKLHunyuanVideo15(**SHORT_VAE).eval().to(dtype)


def split_decode15(vae, z, sizes):
    """Every rank's ``hunyuan15_vae.decode_clip`` of ``z``'s frames (B, C, L, h, w), each from
    only the latent frames ``needed_range`` names, concatenated in rank order."""
    from vinf_engine.hunyuan15_vae import decode_clip, needed_range
    L, out, start = z.shape[2], [], 0
    for n in sizes:
        need = needed_range(vae, start, start + n)
        out.append(decode_clip(vae, z[:, :, need.start:start + n], offset=need.start,
                               frames=range(start, start + n), num_frames=L))
        start += n
    return torch.cat(out, dim=2)


# -- a whole HunyuanVideo15Pipeline ----------------------------------------------------------

PIPE_HW = (32, 48)      # pixels: the VAE's 16x -> latents 2 x 3, patch 1 -> 6 tokens a frame
# HunyuanVideo 1.5 480p's scheduler_config.json: flow-matching Euler with shift 5
SCHEDULER = dict(num_train_timesteps=1000, shift=5.0)
GUIDANCE = 6.0
# The pipeline's Qwen chat template, reduced to what HunyuanVideo15Pipeline sends.
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")


def _qwen_tokenizer():
    """A byte-level Qwen2 tokenizer made in code: the 256 byte symbols, no merges, the chat
    specials. Right padding, as the released tokenizer pads."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[s] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], padding_side="right")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_hunyuan15_pipeline(seed: int = 0):
    """A ``HunyuanVideo15Pipeline`` of tiny random modules (not saved): a 3-layer Qwen2.5-VL
    text model and its tokenizer, a 1-layer T5 encoder and the ByT5 tokenizer, the tiny
    transformer and VAE above, classifier-free guidance 6."""
    from diffusers import (ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler,
                           HunyuanVideo15Pipeline)
    from transformers import (ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config,
                              T5EncoderModel)
    from helpers import fill_zeros
    tok, tok2 = _qwen_tokenizer(), ByT5Tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 100)
        qwen = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
            vocab_size=len(tok), hidden_size=TEXT_DIM, intermediate_size=16,
            num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
            max_position_embeddings=2048, bos_token_id=len(tok) - 2, eos_token_id=len(tok) - 1,
            pad_token_id=len(tok) - 3, rope_scaling=dict(type="mrope", mrope_section=[1, 1, 0]))).eval()
        torch.manual_seed(seed + 200)
        t5 = T5EncoderModel(T5Config(vocab_size=len(tok2), d_model=TEXT_2_DIM, d_kv=4, d_ff=16,
                                     num_layers=1, num_heads=2)).eval()
    return HunyuanVideo15Pipeline(
        text_encoder=fill_zeros(qwen, seed + 101), tokenizer=tok,
        transformer=tiny_hunyuan15_transformer(seed), vae=tiny_hunyuan15_vae(seed + 300),
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        text_encoder_2=fill_zeros(t5, seed + 201), tokenizer_2=tok2,
        guider=ClassifierFreeGuidance(guidance_scale=GUIDANCE))


def save_tiny_hunyuan15_pipeline(folder: str, seed: int = 0) -> str:
    """Saves ``tiny_hunyuan15_pipeline(seed)`` under ``folder/model``; its path."""
    import os
    path = os.path.join(folder, "model")
    tiny_hunyuan15_pipeline(seed).save_pretrained(path)
    return path


def fixed_latents():
    """(1, 4, 5, 2, 3): a whole video's latents for the decode checks."""
    return torch.randn(1, LATENT, 5, 2, 3, generator=torch.Generator().manual_seed(9))


def dropin_latents(pipe, seed: int = 0):
    """The stock ``pipe(...)`` call of the drop-in check: 17 frames (5 latent), 2 steps."""
    return pipe('a sign saying "hi"', num_frames=17, num_inference_steps=2, height=PIPE_HW[0],
                width=PIPE_HW[1], output_type="latent",
                generator=torch.Generator().manual_seed(seed)).frames


def hunyuan15_generation_rank(rank, world, model_dir, out_dir, argv, bad_cases):
    """On ``world`` ranks: the CLI's ``generate`` of ``argv`` (exit code; it saves the
    latents), this rank's share of the family's decode of fixed latents, the drop-in's
    latents in exact config and its VAE decode, and each bad-input case's error."""
    import os
    import vinf_engine as vinf
    from vinf_engine.cli import main
    from vinf_engine.pipelines import load_pipeline
    from vinf_engine.pipelines.hunyuan_video15 import HunyuanVideo15Pipelines
    res = {"cli": main(["generate", "--model", model_dir, *argv,
                        "--out", os.path.join(out_dir, f"r{world}.mp4"),
                        "--save-latents", os.path.join(out_dir, f"r{world}.pt")])}
    pipe = load_pipeline(model_dir)
    z = fixed_latents()
    layout = vinf.ClipLayout(z.shape[2], world)
    comm = vinf.ClipComm()
    mine = z[:, :, layout.start(rank):layout.end(rank)]
    res["decoded"] = list(HunyuanVideo15Pipelines().decode(pipe, mine, layout, rank, comm, 2))
    dropin = vinf.parallelize_pipe(tiny_hunyuan15_pipeline(), vinf.DualScopeConfig(
        window=100, num_global=0, phase_bias=0.0))
    res["dropin"] = dropin_latents(dropin)
    with torch.no_grad():
        res["dropin_decode"] = dropin.vae.decode(z / dropin.vae.config.scaling_factor).sample
    for name, kw in bad_cases:
        try:
            vinf.generate(model_dir, progress=False, out=None, **kw)
            res["bad", name] = None
        except vinf.GenerationError as e:
            res["bad", name] = str(e)
    return res
