"""Clip-by-clip CogVideoX VAE decoding (vinf_engine.cogvideox_vae) against diffusers' decode.

A tiny random ``AutoencoderKLCogVideoX`` with the released temporal layout (4x in time by two
temporal upsamplers), three up blocks of 4 channels, built offline. ``decode_clip`` runs
``_decode``'s own calls (``post_quant_conv`` and the decoder per pair of latent frames, with
the same caches from the chunk before) on the same shapes, so the whole decode is diffusers'
bit for bit; a split decode is too, because the warm-up's first chunk (whose caches are the
replicated first frame, not the frames before) is ``causal_history`` chunks back and its
error cannot reach the clip by the decoder's structure. Every test runs at one intra-op
thread: on this two-core shared box two threads cost 10-50x (the bitwise claims do not depend
on the thread count, as both sides of each run at the same count).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from vinf_engine.cogvideox_vae import (_decode_chunks, causal_history, chunks, decode_clip,
                                       needed_range, temporal_factor)

warnings.filterwarnings("ignore", message=".*should be kept in float32.*")
diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLCogVideoX  # noqa: E402

TINY = dict(down_block_types=("CogVideoXDownBlock3D",) * 3,
            up_block_types=("CogVideoXUpBlock3D",) * 3, block_out_channels=(4, 4, 4),
            latent_channels=2, layers_per_block=1, norm_num_groups=2,
            temporal_compression_ratio=4)
_VAES: dict = {}


@pytest.fixture(autouse=True)
def _one_thread(threads):
    """Every test at one intra-op thread (the ``threads`` fixture's default)."""
    yield


def vae_of(dtype=torch.float64) -> AutoencoderKLCogVideoX:
    if dtype not in _VAES:
        if torch.float64 not in _VAES:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(11)
                _VAES[torch.float64] = AutoencoderKLCogVideoX(**TINY).eval().double()
        _VAES[dtype] = copy.deepcopy(_VAES[torch.float64]).to(dtype)
    return _VAES[dtype]


def latents(n: int, dtype=torch.float64, b: int = 1, hw=(1, 1), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 2, n, *hw, generator=g, dtype=torch.float64).to(dtype)


def whole(vae, z):
    """diffusers' own decode of the whole video."""
    with torch.no_grad():
        return vae.decode(z).sample


def split_decode(vae, z, bounds, chunk=1):
    """Decode z clip by clip (clip q = latent frames bounds[q]:bounds[q+1]), each from only
    the latent frames ``needed_range`` names, and concatenate."""
    L, pieces = z.shape[2], []
    for s, e in zip(bounds[:-1], bounds[1:]):
        r = needed_range(vae, s, e, L)
        pieces += list(decode_clip(vae, z[:, :, r.start:r.stop], first=r.start, start=s, stop=e,
                                   num_frames=L, chunk=chunk))
    return torch.cat(pieces, dim=2)


def test_chunks_history_and_ranges():
    assert chunks(1) == [(0, 1)]
    assert chunks(3) == [(0, 3)]
    assert chunks(7) == [(0, 3), (3, 5), (5, 7)]
    K = causal_history(vae_of())
    assert K == 18              # conv_in, then 17 chunk-wide norms each before a k=3 conv
    with torch.device("meta"):  # the released layout, full size, no memory, no download
        released = AutoencoderKLCogVideoX()
    assert causal_history(released) == 38 and temporal_factor(released) == 4
    assert needed_range(K, 0, 1, 41) == range(0, 3)
    assert needed_range(K, 4, 5, 41) == range(0, 5)
    assert needed_range(K, 39, 41, 41) == range(2 * (19 - K) + 1, 41)


def test_receptive_field_is_exactly_causal_history():
    """Chunk c's first video frame depends on chunk c - K's latents, and on nothing before:
    the bound is tight (by gradient: the dependence is real though it is tiny, ~1e-16, which
    is why a shorter warm-up often rounds to the same bits and cannot show it)."""
    vae = vae_of()
    K = causal_history(vae)
    c = K + 1
    L = 2 * c + 3
    z = latents(L).requires_grad_(True)
    a = chunks(L)[c][0]
    vae.decode(z).sample[:, :, 1 + 4 * (a - 1)].sum().backward()
    dep = z.grad.abs().amax(dim=(0, 1, 3, 4))
    lo, hi = chunks(L)[c - K]
    assert (dep[lo:hi] > 0).all()
    assert (dep[:lo] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_split_decode_is_diffusers_decode_bitwise(dtype):
    vae = vae_of(dtype)
    K = causal_history(vae)
    L = 2 * K + 9
    z = latents(L, dtype)
    ref = whole(vae, z)
    # bitwise: decode_clip of the whole video makes _decode's calls on _decode's shapes
    assert torch.equal(torch.cat(list(decode_clip(vae, z, first=0, start=0, stop=L,
                                                  num_frames=L, chunk=3)), dim=2), ref)
    splits = [[0, 1, 4, L],              # one-frame clip at 0; a boundary inside chunk 1
              [0, 2 * K + 6, L]]         # a warm-up that starts after chunk 0
    if dtype == torch.float64:
        splits.append([0, 2 * K + 5, 2 * K + 6, L])    # a one-frame clip in the middle
    for k, bounds in enumerate(splits):
        out = split_decode(vae, z, bounds, chunk=1 + k)
        assert out.shape == ref.shape == (1, 3, 1 + 4 * (L - 1), 4, 4)
        # bitwise: chunk by chunk the same modules on the same shapes, and every value a
        # clip's chunks read is computed from the same bits (the warm-up's wrong caches are
        # causal_history chunks back: test_receptive_field... shows nothing reaches further)
        assert torch.equal(out, ref), (bounds, (out - ref).abs().max().item())


def test_less_warm_up_breaks_the_bound_not_the_bits():
    """K - 1 chunks of warm-up are outside the proof; in fp64 the error they leave is below
    rounding here, and with a few chunks it shows: the warm-up does carry history."""
    vae = vae_of()
    K = causal_history(vae)
    c = K + 1
    L = 2 * c + 3
    z = latents(L, seed=1)
    sp = chunks(L)
    a = sp[c][0]
    ref = whole(vae, z)[:, :, 1 + 4 * (a - 1):]
    for k, exact in ((K, True), (2, False)):
        got = torch.cat(list(_decode_chunks(vae, z, 0, sp[c - k:], a, L, 2)), dim=2)
        assert torch.equal(got, ref) == exact, k


def test_slicing_and_batch():
    vae = copy.deepcopy(vae_of(torch.float32))
    K = causal_history(vae)
    L = 2 * K + 5
    z = latents(L, torch.float32, b=2, hw=(2, 1), seed=2)
    for slicing in (False, True):
        vae.use_slicing = slicing
        # bitwise: the same shapes (per sample with slicing) on both sides
        assert torch.equal(split_decode(vae, z, [0, 2 * K + 2, L], chunk=2), whole(vae, z))


def test_pieces_and_bad_input():
    vae = vae_of(torch.float32)
    z = latents(7, torch.float32)
    sizes = [p.shape[2] for p in decode_clip(vae, z, first=0, start=0, stop=7, num_frames=7,
                                             chunk=2)]
    assert sizes == [9, 8, 8]            # chunk 0 (3 latent frames) holds 1 + 4 + 4 frames
    assert [p.shape[2] for p in decode_clip(vae, z, first=0, start=4, stop=6,
                                            num_frames=7, chunk=1)] == [4, 4]
    with pytest.raises(ValueError, match=r"latent frames 0\.\.4 are needed.*got 1\.\.6"):
        decode_clip(vae, z[:, :, 1:], first=1, start=4, stop=5, num_frames=7)
    with pytest.raises(ValueError, match="odd number"):
        decode_clip(vae, z[:, :, :6], first=0, start=0, stop=6, num_frames=6)
    with pytest.raises(ValueError, match="5-D"):
        decode_clip(vae, z[0], first=0, start=0, stop=7, num_frames=7)
    with pytest.raises(ValueError, match="channels"):
        decode_clip(vae, z[:, :1], first=0, start=0, stop=7, num_frames=7)
    with pytest.raises(ValueError, match="start < stop"):
        decode_clip(vae, z, first=0, start=3, stop=3, num_frames=7)
    with pytest.raises(ValueError, match="chunk"):
        decode_clip(vae, z, first=0, start=0, stop=7, num_frames=7, chunk=0)
    tiled = copy.deepcopy(vae)
    tiled.enable_tiling(tile_sample_min_height=4, tile_sample_min_width=4)
    with pytest.raises(ValueError, match="tiled"):
        decode_clip(tiled, latents(7, torch.float32, hw=(2, 2)), first=0, start=0, stop=7,
                    num_frames=7)
