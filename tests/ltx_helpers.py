"""Tiny random LTX-Video models and pipelines for tests, built offline.

``tiny_ltx_transformer`` is a real ``LTXVideoTransformer3DModel`` shrunk to a few thousand
random weights (inner dimension 16: ``16 % 6 = 4`` leading channels unrotated, as the
released model's ``2048 % 6 = 2``); ``tiny_ltx_pipeline`` a real ``LTXPipeline`` (or
``LTXImageToVideoPipeline``) with a T5 encoder, a T5 Unigram tokenizer, an
``AutoencoderKLLTXVideo`` with the released 1:8 temporal / 32x spatial compression (its
decoder non-causal, as released, or causal) and the flow-matching scheduler of the releases.
Parameters that diffusers initialises to zero are filled with small noise, so that the
output depends on every module.
"""
from __future__ import annotations

import os

import torch

LTX_HW = (64, 96)            # pixels (height, width): latents 2 x 3 at 32x spatial compression
RIS = (8 / 25, 32, 32)       # LTXPipeline's rope_interpolation_scale at its default 25 fps
_TEXT_DIM = 16
_WORDS = ("the a an on in of and with is cat dog red blue green panda rock tree sky water "
          "river city man woman car bird fish running sitting flying big small video").split()


def _seeded(make, seed: int):
    from helpers import fill_zeros
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = make().eval()
    return fill_zeros(m, seed + 1)


def _transformer(**overrides):
    from diffusers import LTXVideoTransformer3DModel
    cfg = dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
               attention_head_dim=8, cross_attention_dim=16, num_layers=2,
               caption_channels=_TEXT_DIM)
    return LTXVideoTransformer3DModel(**{**cfg, **overrides})


def tiny_ltx_transformer(seed: int = 0, **overrides):
    """A tiny random ``LTXVideoTransformer3DModel`` (the same on every rank)."""
    return _seeded(lambda: _transformer(**overrides), seed)


def tiny_ltx_vae(seed: int = 0, causal: bool = False, timestep_conditioning: bool = False,
                 layers=(1, 1, 1, 1, 1)):
    """An ``AutoencoderKLLTXVideo`` with 8 latent channels and the released compression
    (patch 4, three spatio-temporal up/down stages: 1:8 in time, 32x in space)."""
    from diffusers import AutoencoderKLLTXVideo
    g = torch.Generator().manual_seed(seed + 7)

    def make():
        vae = AutoencoderKLLTXVideo(
            latent_channels=8, block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=layers, spatio_temporal_scaling=(True, True, True, False),
            decoder_spatio_temporal_scaling=(True, True, True, False),
            decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4,
            upsample_factor=(1,) * 4, timestep_conditioning=timestep_conditioning,
            patch_size=4, patch_size_t=1, encoder_causal=True, decoder_causal=causal)
        with torch.no_grad():      # latent statistics of a trained VAE, not the identity
            vae.latents_mean.copy_(0.1 * torch.randn(8, generator=g))
            vae.latents_std.copy_(0.5 + torch.rand(8, generator=g))
        return vae
    return _seeded(make, seed)


def _tokenizer():
    from transformers import T5Tokenizer
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    chars = "abcdefghijklmnopqrstuvwxyz" + "abcdefghijklmnopqrstuvwxyz".upper() + "0123456789,.!?'-"
    vocab += [(c, -4.0) for c in chars]
    vocab += [("\u2581" + w, -2.0) for w in _WORDS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=128)


def _text_encoder(vocab_size: int):
    from transformers import T5Config, T5EncoderModel
    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=_TEXT_DIM, d_kv=8, d_ff=32,
                                   num_layers=2, num_heads=2, relative_attention_num_buckets=8,
                                   feed_forward_proj="gated-gelu", dropout_rate=0.0))


def _scheduler(dynamic: bool = True):
    from diffusers import FlowMatchEulerDiscreteScheduler
    # LTX-Video's released scheduler config (diffusers' conversion script); LTXConditionPipeline
    # passes its timesteps without a shift (mu), so its folders' scheduler has no dynamic one.
    return FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=1024, base_shift=0.95, max_image_seq_len=4096, max_shift=2.05,
        num_train_timesteps=1000, shift=1.0, shift_terminal=0.1, use_dynamic_shifting=dynamic)


def tiny_ltx_pipeline(seed: int = 0, image: bool = False, causal: bool = False,
                      timestep_conditioning: bool = False, condition: bool = False):
    """An ``LTXPipeline`` (``image``: ``LTXImageToVideoPipeline``; ``condition``:
    ``LTXConditionPipeline``) of tiny random modules."""
    from diffusers import LTXConditionPipeline, LTXImageToVideoPipeline, LTXPipeline
    tok = _tokenizer()
    cls = (LTXConditionPipeline if condition else
           LTXImageToVideoPipeline if image else LTXPipeline)
    return cls(tokenizer=tok, text_encoder=_seeded(lambda: _text_encoder(len(tok)), seed + 100),
               transformer=tiny_ltx_transformer(seed + 200),
               vae=tiny_ltx_vae(seed + 400, causal, timestep_conditioning),
               scheduler=_scheduler(dynamic=not condition))


def save_tiny_ltx_pipeline(folder: str, seed: int = 0, **kw) -> str:
    """Saves ``tiny_ltx_pipeline(seed, **kw)`` under ``folder/model``; returns that path."""
    path = os.path.join(folder, "model")
    tiny_ltx_pipeline(seed, **kw).save_pretrained(path)
    return path


def ltx_inputs(frames: int, seed: int = 1, batch: int = 2, hw=(4, 4), channels: int = 8):
    """Latents (B, C, frames, h, w), text embeddings (B, 6, text_dim) and their mask (B, 6)
    with the last token padding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, frames, *hw, generator=g)
    text = torch.randn(batch, 6, _TEXT_DIM, generator=g)
    mask = torch.ones(batch, 6)
    mask[:, -1] = 0
    return x, (text, mask)


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, F, h, w) latents -> (B, F*h*w, C) tokens, as ``LTXPipeline._pack_latents``."""
    return x.permute(0, 2, 3, 4, 1).flatten(1, 3)


def unpack(tokens: torch.Tensor, F: int, h: int, w: int) -> torch.Tensor:
    """(B, F*h*w, C) tokens -> (B, C, F, h, w)."""
    return tokens.unflatten(1, (F, h, w)).permute(0, 4, 1, 2, 3)


def ltx_call(model, clip, t, extra, ris=RIS):
    """The stock signature on a clip (B, C, F, h, w) of latents: packed tokens in, the
    output unpacked to (B, C, F, h, w)."""
    text, mask = extra
    B, _, F, h, w = clip.shape
    t = t if isinstance(t, torch.Tensor) else torch.full((B,), float(t))
    out = model(hidden_states=pack(clip), encoder_hidden_states=text, timestep=t,
                encoder_attention_mask=mask, num_frames=F, height=h, width=w,
                rope_interpolation_scale=ris).sample
    return unpack(out, F, h, w)


def ltx_rank(rank, world):
    """LTX on 2 ranks: per-rank traffic as the video grows, per-token timesteps (the image-to-
    video pipeline's, one per token of this rank's clip), a video far past the trained length,
    and a rank's bad call refused on every rank."""
    import vinf_engine as vinf
    from families import DUAL, FRAMES, SPLITS, split
    out = {}
    model = tiny_ltx_transformer()
    vinf.parallelize(model, vinf.DualScopeConfig(**DUAL))
    comm = model.vinf_engine.comm
    for frames in (8, 16, 32):
        x, extra = ltx_inputs(frames)
        comm.counters.reset()
        with torch.no_grad():
            ltx_call(model, split(x, (frames // 2, frames // 2), rank), 900, extra)
        out["bytes", frames] = comm.counters.bytes_received
    x, extra = ltx_inputs(FRAMES)
    clip = split(x, SPLITS[2], rank)
    tokens = clip.shape[2] * 16
    per_token = torch.full((2, tokens), 900.0)
    if rank == 0:
        per_token[:, :16] = 0.0                 # frame 0 held, as LTXImageToVideoPipeline does
    with torch.no_grad():
        out["per_token"] = ltx_call(model, clip, per_token, extra)
    x, extra = ltx_inputs(64, hw=(2, 2))
    with torch.no_grad():
        out["long"] = ltx_call(model, split(x, (32, 32), rank), 900, extra)
    text, mask = extra
    for name, kw in (("video_coords", dict(video_coords=torch.zeros(2, 3, 32 * 4))),
                     ("num_frames", dict(num_frames=31))):
        call = dict(hidden_states=pack(split(x, (32, 32), rank)), encoder_hidden_states=text,
                    timestep=torch.full((2,), 900.0), encoder_attention_mask=mask,
                    num_frames=32, height=2, width=2, rope_interpolation_scale=RIS)
        if rank == 1:
            call.update(kw)
        try:
            with torch.no_grad():
                model(**call)
            out["bad", name] = None
        except ValueError as e:
            out["bad", name] = str(e)
    vinf.unparallelize(model)
    return out


def ltx_generation_rank(rank, world, model_dir, out_dir, kwargs, bad_cases, lengths, dropin,
                        image_runs, refused):
    """On ``world`` ranks, the module's one spawn: the invariance runs of
    ``gen_helpers.invariance_rank``, this rank's share of a distributed VAE decode of fixed
    latents, the denoiser's bytes received per rank at each of ``lengths`` (video frames),
    each bad-input case's error, the drop-in's runs ``dropin`` (``stock_pipe_rank``'s), this
    rank's latents of each of ``image_runs`` = ``{name: (model folder, generate's kwargs)}``,
    and the error of the drop-in's call ``refused`` = ``(pipeline class, folder, call)``."""
    from gen_helpers import generate_rank, invariance_rank, stock_pipe_rank
    import vinf_engine as vinf
    from vinf_engine.pipelines import load_pipeline
    from vinf_engine.pipelines.ltx import LTXPipelines
    res = invariance_rank(rank, world, model_dir, out_dir, kwargs)
    pipe = load_pipeline(model_dir)
    frames = 12
    z = torch.randn(1, 8, frames, 2, 3, generator=torch.Generator().manual_seed(9))
    layout = vinf.ClipLayout(frames, world)
    mine = z[:, :, layout.start(rank):layout.end(rank)]
    res["decoded"] = list(LTXPipelines().decode(pipe, mine, layout, rank, vinf.ClipComm(), chunk=2))
    for n in lengths:
        rep = vinf.generate(pipe, "the cat", num_frames=n, steps=2, out=None, progress=False,
                            config=dict(window=2, num_global=2), height=LTX_HW[0],
                            width=LTX_HW[1])
        res["bytes", n] = [r["comm"]["bytes_received"] for r in rep["per_rank"]]
    for name, kw in bad_cases:
        try:
            vinf.generate(model_dir, progress=False, **kw)
            res["bad", name] = None
        except vinf.GenerationError as e:
            res["bad", name] = str(e)
    res["dropin"] = stock_pipe_rank(rank, world, dropin)
    for name, run in image_runs.items():
        res[name] = generate_rank(rank, world, *run)
    import diffusers
    cls, folder, call = refused
    pipe = getattr(diffusers, cls).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    vinf.parallelize_pipe(pipe)
    try:
        pipe(**call)
        res["refused"] = None
    except ValueError as e:
        res["refused"] = str(e)
    finally:
        vinf.unparallelize_pipe(pipe)
    return res
