"""Tiny random HunyuanVideo (1.0) models and pipelines for tests, built offline.

The transformer has one dual-stream and one single-stream block, a 3-D RoPE split (4, 6, 6)
over 16-channel heads, and patch 2 (4 x 6 latents -> 2 x 3 tokens a frame). Its text inputs
carry a prompt mask whose second row pads, so the masked keys matter. Parameters diffusers
initialises to zero are filled with small noise.
"""
from __future__ import annotations

import torch

TEXT_DIM = 8
TEXT_LEN = 5
POOLED_DIM = 8


def tiny_hunyuan_transformer(seed: int = 0, **overrides):
    """A tiny random ``HunyuanVideoTransformer3DModel`` (the same on every rank)."""
    from diffusers import HunyuanVideoTransformer3DModel
    from helpers import fill_zeros
    cfg = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
               num_layers=1, num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0,
               patch_size=2, patch_size_t=1, text_embed_dim=TEXT_DIM,
               pooled_projection_dim=POOLED_DIM, rope_axes_dim=(4, 6, 6), guidance_embeds=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = HunyuanVideoTransformer3DModel(**{**cfg, **overrides}).eval()
    return fill_zeros(m, seed + 1)


class HunyuanText(tuple):
    """(text, mask, pooled): the conditioning of one call (a tuple, so the suite's helpers
    may pass it around as one value)."""


def hunyuan_inputs(frames: int, seed: int = 1, batch: int = 2, hw=(4, 6), valid=(TEXT_LEN, 3)):
    """Latents (B, 4, frames, h, w) and the text conditioning: embeddings (B, TEXT_LEN,
    TEXT_DIM), a prompt mask keeping ``valid[b]`` leading tokens of row b, pooled (B,
    POOLED_DIM)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, frames, *hw, generator=g)
    text = torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g)
    mask = torch.zeros(batch, TEXT_LEN, dtype=torch.long)
    for b in range(batch):
        mask[b, :valid[b % len(valid)]] = 1
    pooled = torch.randn(batch, POOLED_DIM, generator=g)
    return x, HunyuanText((text, mask, pooled))


def hunyuan_call(model, clip, t, cond):
    """The stock signature on a clip (B, C, F, h, w); the output (B, C, F, h, w)."""
    text, mask, pooled = cond
    B = clip.shape[0]
    return model(hidden_states=clip, timestep=torch.full((B,), float(t)),
                 encoder_hidden_states=text, encoder_attention_mask=mask,
                 pooled_projections=pooled, guidance=torch.full((B,), 6000.0)).sample


FRAMES = 7
DUAL = dict(window=2, num_global=2, phase_t=500, phase_bias=2.0)
# The exact config (every frame in every window), the dual scope, and the two global-position
# policies with a trained range of 3 frames, which a 7-frame video passes.
CONFIGS = {
    "exact": dict(window=1000, num_global=0, phase_bias=0.0),
    "dual": DUAL,
    "clamp": dict(DUAL, window=1, trained_frames=3),
    "true_positions": dict(DUAL, window=1, trained_frames=3, global_positions="true"),
}


def text_streams(model):
    """Hooks that record every block's text output (the dual- and single-stream blocks return
    ``(video, text)``); returns the list they fill and a function that removes them."""
    seen, handles = [], []
    for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
        handles.append(block.register_forward_hook(lambda m, a, o: seen.append(o[1].clone())))
    return seen, lambda: [h.remove() for h in handles]


def hunyuan_rank(rank, world, sizes, timesteps=(900, 100)):
    """This rank's outputs and text streams per (config, timestep) on the 7-frame video."""
    import vinf_engine as vinf
    model = tiny_hunyuan_transformer()
    x, cond = hunyuan_inputs(FRAMES)
    start = sum(sizes[:rank])
    clip = x[:, :, start:start + sizes[rank]]
    out = {}
    for name, cfg in CONFIGS.items():
        vinf.parallelize(model, vinf.DualScopeConfig(**cfg))
        for t in timesteps:
            seen, remove = text_streams(model)
            with torch.no_grad():
                out[name, t] = hunyuan_call(model, clip, t, cond)
            remove()
            out["text", name, t] = seen
        vinf.unparallelize(model)
    return out


def stock_hunyuan(timesteps=(900, 100)):
    """The unpatched model on the whole video: outputs and text streams per timestep."""
    model = tiny_hunyuan_transformer()
    x, cond = hunyuan_inputs(FRAMES)
    out = {}
    for t in timesteps:
        seen, remove = text_streams(model)
        with torch.no_grad():
            out[t] = hunyuan_call(model, x, t, cond)
        remove()
        out["text", t] = seen
    return out


# -- the VAE ---------------------------------------------------------------------------------

VAE = dict(latent_channels=4, block_out_channels=(4, 4, 4, 4), layers_per_block=1,
           norm_num_groups=2)


def tiny_hunyuan_vae(seed: int = 0):
    """A tiny random ``AutoencoderKLHunyuanVideo``: 8x spatial, 4x temporal compression,
    the released layout (four causal up blocks, a mid block with frame-causal attention)."""
    from diffusers import AutoencoderKLHunyuanVideo
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKLHunyuanVideo(**VAE).eval()


def split_decode(vae, z, sizes):
    """Every rank's ``hunyuan_vae.decode_clip`` of ``z``'s frames, each from only the latent
    frames ``needed_range`` names, concatenated in rank order."""
    from vinf_engine.hunyuan_vae import decode_clip, needed_range
    F, out, start = z.shape[2], [], 0
    for n in sizes:
        need = needed_range(vae, start, start + n, F)
        out += list(decode_clip(vae, z[:, :, need.start:need.stop], offset=need.start,
                                frames=range(start, start + n), num_frames=F))
        start += n
    return torch.cat(out, dim=2)


# -- a whole HunyuanVideoPipeline, for vinf.generate -----------------------------------------

PIPE_HW = (32, 48)      # pixels: the tiny VAE's 8x -> latents 4 x 6 -> 2 x 3 tokens a frame
LLAMA_DIM = 8
# HunyuanVideo's scheduler_config.json: flow-matching Euler with shift 7
SCHEDULER = dict(num_train_timesteps=1000, shift=7.0)


def _llama_tokenizer(unmerged: int | None = None):
    """A Llama BPE tokenizer made in code: single characters, plus a merge chain for the
    space-separated pieces of the pipeline's prompt template (all but its first ``unmerged``)
    and a few prompt words. By default as many pieces stay spelled out as make the template's
    part before the prompt at least the 95 tokens the pipeline crops (``crop_start``), so the
    prompt survives the crop as it does with the released tokenizer. Right padding: the valid
    text tokens lead, as the transformer's mask assumes."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from transformers import LlamaTokenizerFast
    template = DEFAULT_PROMPT_TEMPLATE["template"]
    if unmerged is None:
        prefix = template[:template.index("{}")]
        unmerged = next(i for i in range(len(template.split(" ")) + 1)
                        if len(_llama_tokenizer(i)(prefix).input_ids) >= 95)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "\u2581": 4}
    for c in sorted(set(template.replace(" ", "") + "abcdefghijklmnopqrstuvwxyz")):
        vocab.setdefault(c, len(vocab))
    merges = []
    pieces = template.split(" ")[unmerged:] + "the cat dog a red blue running".split()
    for piece in pieces:
        s = "\u2581"
        for c in piece:
            if (s, c) not in merges:
                merges.append((s, c))
            s += c
            vocab.setdefault(s, len(vocab))
    tok = LlamaTokenizerFast(vocab=vocab, merges=merges, padding_side="right")
    tok.pad_token = "<pad>"
    return tok


def _clip_tokenizer():
    import tempfile
    from gen_helpers import _tokenizer
    with tempfile.TemporaryDirectory() as d:
        tok = _tokenizer(d)
        tok.model_max_length = 77
        return tok


def tiny_hunyuan_pipeline(seed: int = 0):
    """A ``HunyuanVideoPipeline`` of tiny random modules (not saved): a 2-layer Llama and its
    tokenizer, a 1-layer CLIP and its tokenizer, the tiny transformer and VAE above."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel
    from helpers import fill_zeros
    tok, tok2 = _llama_tokenizer(), _clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 100)
        llama = LlamaModel(LlamaConfig(vocab_size=len(tok), hidden_size=LLAMA_DIM,
                                       intermediate_size=16, num_hidden_layers=3,
                                       num_attention_heads=2, num_key_value_heads=2,
                                       max_position_embeddings=512, pad_token_id=3)).eval()
        torch.manual_seed(seed + 200)
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok2), hidden_size=POOLED_DIM, intermediate_size=16,
            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
            bos_token_id=len(tok2) - 2, eos_token_id=len(tok2) - 1,
            pad_token_id=len(tok2) - 1)).eval()
    tr = tiny_hunyuan_transformer(seed, text_embed_dim=LLAMA_DIM)
    return HunyuanVideoPipeline(text_encoder=fill_zeros(llama, seed + 101), tokenizer=tok,
                                transformer=tr, vae=tiny_hunyuan_vae(seed + 300),
                                scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
                                text_encoder_2=fill_zeros(clip, seed + 201), tokenizer_2=tok2)


def save_tiny_hunyuan_pipeline(folder: str, seed: int = 0) -> str:
    """Saves ``tiny_hunyuan_pipeline(seed)`` under ``folder/model``; its path."""
    import os
    path = os.path.join(folder, "model")
    tiny_hunyuan_pipeline(seed).save_pretrained(path)
    return path


def fixed_latents():
    """(1, 4, 8, 4, 6): temporal tiles [0,5) [3,8) [6,8); on 2 ranks (4, 4) rank 1's first
    frames lie in tile 1, whose blend reads tile 0, all latent frames of rank 0."""
    return torch.randn(1, 4, 8, 4, 6, generator=torch.Generator().manual_seed(9))


def dropin_latents(pipe, seed: int = 0):
    """The stock ``pipe(...)`` call of the drop-in check: 9 frames (3 latent), 2 steps."""
    return pipe("the cat", num_frames=9, num_inference_steps=2, height=PIPE_HW[0],
                width=PIPE_HW[1], output_type="latent",
                generator=torch.Generator().manual_seed(seed)).frames


def hunyuan_generation_rank(rank, world, model_dir, out_dir, kwargs, bad_cases):
    """On ``world`` ranks: ``vinf.generate`` of ``kwargs`` (this rank's latents; again in the
    stale comm mode), this rank's
    share of the family's decode of fixed latents, the drop-in's latents in exact config,
    and each bad-input case's error."""
    import os
    import vinf_engine as vinf
    from vinf_engine.pipelines import load_pipeline
    from vinf_engine.pipelines.hunyuan_video import HunyuanVideoPipelines
    res = {}
    rep = vinf.generate(model_dir, out=os.path.join(out_dir, f"r{world}.mp4"), progress=False,
                        **kwargs)
    res["latents"] = rep["latents"]
    res["stale"] = vinf.generate(model_dir, out=None, progress=False, comm_mode="stale",
                                 **{k: v for k, v in kwargs.items() if k != "crf"})["latents"]
    pipe = load_pipeline(model_dir)
    z = fixed_latents()
    layout = vinf.ClipLayout(z.shape[2], world)
    comm = vinf.ClipComm()
    mine = z[:, :, layout.start(rank):layout.end(rank)]
    res["decoded"] = list(HunyuanVideoPipelines().decode(pipe, mine, layout, rank, comm, 2))
    res["decode_bytes"] = comm.counters.bytes_received
    dropin = vinf.parallelize_pipe(tiny_hunyuan_pipeline(), vinf.DualScopeConfig(
        window=100, num_global=0, phase_bias=0.0))
    res["dropin"] = dropin_latents(dropin)
    # the drop-in's vae.decode: this rank's tiles only, the frames gathered
    import vinf_engine.hunyuan_vae as hv
    real, clips = hv.decode_clip, []
    hv.decode_clip = lambda *a, **k: (clips.append(k["frames"]), real(*a, **k))[1]
    try:
        with torch.no_grad():
            res["dropin_decode"] = dropin.vae.decode(z / dropin.vae.config.scaling_factor).sample
    finally:
        hv.decode_clip = real
    res["dropin_clips"] = clips
    for name, kw in bad_cases:
        try:
            vinf.generate(model_dir, progress=False, out=None, **kw)
            res["bad", name] = None
        except vinf.GenerationError as e:
            res["bad", name] = str(e)
    return res
