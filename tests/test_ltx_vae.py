"""Clip-by-clip LTX-Video VAE decoding (vinf_engine.ltx_vae) against the whole-video decode.

Tiny random ``AutoencoderKLLTXVideo`` models with the released compression (three
spatio-temporal upsamplers: 8x time, 32x space), non-causal (as released) and causal, with
and without the decoder's timestep conditioning. Every split decode is compared bitwise with
``decode_clip`` of the whole video: both decode the same global grid of pieces from the same
windows, so the same kernels see the same shapes whatever the split (and whatever the thread
count, both sides running at the same one). The whole decode is compared with diffusers' ``vae.decode(z).sample`` within a
tolerance from the dtype: no farther from an fp64 decode than diffusers' own fp32 decode is,
twice over, plus an fp32 epsilon.
"""
from __future__ import annotations

import pytest
import torch

from ltx_helpers import tiny_ltx_vae
from vinf_engine.ltx_vae import (decode_clip, needed_range, receptive_field, temporal_factor,
                                 video_frames_of, window_of)

F = 16                       # latent frames: 121 video frames at 64 x 96
SPLITS = ((0, 5), (5, 6), (6, 11), (11, 16))    # a 1-frame clip; clips off the piece grid
_VAES: dict = {}


def vae_of(causal: bool, tc: bool, dtype=torch.float32):
    key = (causal, tc, dtype)
    if key not in _VAES:
        _VAES[key] = tiny_ltx_vae(causal=causal, timestep_conditioning=tc).to(dtype)
    return _VAES[key]


def _z(frames=F, dtype=torch.float32):
    return torch.randn(1, 8, frames, 2, 3, generator=torch.Generator().manual_seed(0),
                       dtype=dtype)


def _decode(vae, z, frames, chunk, temb=None):
    need = needed_range(vae, frames.start, frames.stop, z.shape[2], chunk)
    pieces = decode_clip(vae, z[:, :, need.start:need.stop], offset=need.start, frames=frames,
                         num_frames=z.shape[2], chunk=chunk, temb=temb)
    return torch.cat(list(pieces), dim=2)


def test_the_released_decoders_reach():
    # LTX-Video 0.9.0's decoder (diffusers' defaults: 128-512 channels, (4, 3, 3, 3, 4)
    # layers), built on the meta device: 24 latent frames each side non-causal (as
    # released), 48 before it causal.
    from diffusers import AutoencoderKLLTXVideo
    with torch.device("meta"):
        released = AutoencoderKLLTXVideo()
        causal = AutoencoderKLLTXVideo(decoder_causal=True)
    assert temporal_factor(released) == 8
    assert receptive_field(released) == (24, 24)
    assert receptive_field(causal) == (48, 0)
    assert receptive_field(vae_of(False, False)) == (9, 9)


@pytest.mark.parametrize("causal,tc", [(False, False), (True, True)])
def test_split_decodes_are_the_whole_decode_bit_for_bit(causal, tc):
    vae, z = vae_of(causal, tc), _z()
    temb = torch.tensor([0.05]) if tc else None
    whole = _decode(vae, z, range(F), 4, temb)
    assert whole.shape == (1, 3, 8 * (F - 1) + 1, 64, 96)
    # bitwise: the same pieces from the same windows, whatever the clips
    split = torch.cat([_decode(vae, z, range(s, e), 4, temb) for s, e in SPLITS], dim=2)
    assert torch.equal(split, whole)
    # diffusers' decode of the whole latent at once, within fp32's reach of fp64
    with torch.no_grad():
        stock = vae.decode(z, temb).sample
        exact = vae_of(causal, tc, torch.float64).decode(
            z.double(), None if temb is None else temb.double()).sample
    own = (whole.double() - exact).abs().max()
    assert own <= 2 * (stock.double() - exact).abs().max() + 1e-6, own


@pytest.mark.parametrize("causal", [False, True])
def test_the_window_is_tight(causal):
    # The piece [20, 22) of a 32-frame video from its window is the whole decode's frames;
    # one latent frame less on either side of the window is not.
    vae, z = vae_of(causal, False), _z(32)
    R = 8
    video = video_frames_of(range(20, 22), R)
    w = window_of(vae, 20, 22, 32)
    assert (w.start, w.stop) == ((20 - 18, 22) if causal else (20 - 9, 22 + 9))

    def decoded(lo, hi):
        with torch.no_grad():
            out = vae.decoder(z[:, :, lo:hi])
        first = video.start - R * lo
        return out[:, :, first:first + len(video)]
    with torch.no_grad():
        ref = vae.decoder(z)[:, :, video.start:video.stop]
    # (up to the rounding of convolutions over another length: ~1e-6)
    assert (decoded(w.start, w.stop) - ref).abs().max() <= 1e-5
    assert (decoded(w.start + 1, w.stop) - ref).abs().max() > 1e-4
    if not causal:
        assert (decoded(w.start, w.stop - 1) - ref).abs().max() > 1e-4


def test_too_few_latent_frames_are_refused_with_both_ranges():
    vae, z = vae_of(False, False), _z()
    with pytest.raises(ValueError, match=r"latent frames 8..11 needs latent frames 0..15; "
                                         r"z holds 5..15"):
        decode_clip(vae, z[:, :, 5:], offset=5, frames=range(8, 12), num_frames=F, chunk=4)
    with pytest.raises(ValueError, match="chunk must be an int >= 1"):
        decode_clip(vae, z, offset=0, frames=range(4), num_frames=F, chunk=0)
