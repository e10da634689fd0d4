"""Clip-by-clip Wan VAE decoding and encoding (vinf_engine.wan_vae) against the whole video.

Tiny random ``AutoencoderKLWan`` models with the released temporal layout (4x time, three up
stages, temporal upsampling after the first two), built offline. Every split decode is compared
bitwise with ``decode_clip`` of the whole video: both run every module on the same shapes in
the same order, so that holds on any CPU and thread count (the tests run at 1 and 2 threads).
The whole decode is compared with diffusers' ``vae.decode(z).sample``, which runs one
convolution over the whole latent at once, within a tolerance from the dtype: no farther from
an fp64 decode than diffusers' own fp32 decode is, twice over. Encoding likewise: every split
``encode_clip`` bitwise its whole-video ``encode_clip``, that within the same dtype bound of
diffusers' ``vae._encode`` (``quant_conv`` per latent frame against once over the whole).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from helpers import rel_err
from vinf_engine import wan_vae
from vinf_engine.wan_vae import (_decode_window, _decoder_stages, _encode_window, _stage_depths,
                                 causal_history, decode_clip, encode_clip, encode_history_range,
                                 encoder_history, history_range, temporal_factor,
                                 video_frames_of, warmup_cost)

warnings.filterwarnings("ignore", message=".*should be kept in float32.*")
diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLWan  # noqa: E402

TIME = dict(temperal_downsample=[False, True, True])
TI2V = dict(z_dim=48, is_residual=True, in_channels=12, out_channels=12, patch_size=2,
            scale_factor_temporal=4, scale_factor_spatial=16)   # diffusers' Wan2.2 VAE keys


def _build(seed: int, **kw) -> AutoencoderKLWan:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(**kw).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in vae.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return vae


# base3: the brief's config. Its Wan 2.1 upsamplers halve 3 channels to 1, and RMS norm of one
# channel is sign(x) * gamma, which blocks the far edge of the receptive field; base4 keeps two
# channels there, so its receptive field is exactly causal_history (used for tightness).
CONFIGS = {
    "base3": dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, **TIME),
    "base4": dict(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, **TIME),
    "deep": dict(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=2, **TIME),
    "ti2v": dict(base_dim=4, decoder_base_dim=6, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                 **TIME, **TI2V),
}
_VAES: dict = {}


def cases(*names):
    """Each config in fp64 and in fp32, one at 1 intra-op thread and the other at 2, the pairing
    alternating from config to config: every dtype meets every thread count across the configs
    (a kernel picked by shape and thread count shows up), at half the cost of every product."""
    rows = []
    for i, name in enumerate(names):
        rows += [(name, torch.float64, 1 + i % 2), (name, torch.float32, 2 - i % 2)]
    ids = [f"{n}-{'fp64' if d == torch.float64 else 'fp32'}-{t}" for n, d, t in rows]
    return pytest.mark.parametrize("name,dtype,threads", rows, ids=ids, indirect=["threads"])


def vae_of(name: str, dtype=torch.float64) -> AutoencoderKLWan:
    key = (name, dtype)
    if key not in _VAES:
        if (name, torch.float64) not in _VAES:
            _VAES[name, torch.float64] = _build(len(_VAES) + 7, **CONFIGS[name]).double()
        _VAES[key] = copy.deepcopy(_VAES[name, torch.float64]).to(dtype)
    return _VAES[key]


def latents(vae, n: int, h: int = 2, w: int = 2, b: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, vae.config.z_dim, n, h, w, generator=g, dtype=torch.float64)
    return z.to(next(vae.parameters()).dtype)


def whole(vae, z):
    """diffusers' own decode of the whole video."""
    with torch.no_grad():
        return vae.decode(z).sample


def ours(vae, z, chunk=3):
    """``decode_clip`` of the whole video: what every split must give, bit for bit."""
    return torch.cat(list(decode_clip(vae, z, start=0, chunk=chunk)), dim=2)


def split_decode(vae, z, bounds, chunk=1):
    """Decode z clip by clip (clip q = latent frames bounds[q]:bounds[q+1]) and concatenate."""
    H = causal_history(vae)
    pieces = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        r = history_range(H, s)
        hist = z[:, :, r.start:r.stop] if s else None
        pieces += list(decode_clip(vae, z[:, :, s:e], start=s, history=hist, chunk=chunk))
    return torch.cat(pieces, dim=2)


# -- causal_history ------------------------------------------------------------------------------

def test_causal_history_per_config_and_released():
    assert causal_history(vae_of("base3")) == 30
    assert causal_history(vae_of("base4")) == 30
    assert causal_history(vae_of("ti2v")) == 30
    assert causal_history(vae_of("deep")) == 38          # scales with depth: +8 per res block
    with torch.device("meta"):                            # full size, no memory, no download
        wan21 = AutoencoderKLWan()
        wan22 = AutoencoderKLWan(base_dim=160, decoder_base_dim=256, **TI2V)
    assert causal_history(wan21) == 38
    assert causal_history(wan22) == 38
    assert temporal_factor(wan21) == temporal_factor(wan22) == 4


@pytest.mark.parametrize("name", ["base4", "ti2v"])
def test_receptive_field_is_exactly_causal_history(name):
    """The first video frame of latent i depends on latent i - H and on nothing before it."""
    vae = vae_of(name)
    H = causal_history(vae)
    i = H + 2
    z = latents(vae, i + 1).requires_grad_(True)
    out = vae.decode(z).sample
    out[:, :, 1 + 4 * (i - 1)].sum().backward()
    dep = z.grad.abs().amax(dim=(0, 1, 3, 4))
    assert dep[i - H] > 0
    assert (dep[:i - H] == 0).all()


# -- exactness -----------------------------------------------------------------------------------

@cases("base3", "deep", "ti2v")
def test_split_decode_is_bitwise(name, dtype, threads):
    vae = vae_of(name, dtype)
    H = causal_history(vae)
    n = 2 * H + 3
    z = latents(vae, n)
    ref = ours(vae, z)
    splits = [[0, 1, H + 1, n],          # one-frame clip at 0, split at 1, a warm-up from frame 1
              [0, H + 5, n]]             # two uneven clips, warm-up from frame 5
    if dtype == torch.float64:
        splits.append([0, H + 2, H + 3, n])   # a one-frame clip in the middle
    for k, bounds in enumerate(splits):
        out = split_decode(vae, z, bounds, chunk=1 + k)
        assert out.shape == ref.shape
        # bitwise: the same modules on the same shapes in the same order, whatever the split
        assert torch.equal(out, ref), (bounds, (out - ref).abs().max().item())


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("name", ["base3", "ti2v"])
def test_whole_decode_is_diffusers_decode(name, threads):
    """Against ``vae.decode``, which runs ``post_quant_conv`` over the whole latent where
    ``decode_clip`` runs it per frame: in fp64 to 1e-12; in fp32 no farther from the fp64 decode
    than twice what diffusers' own fp32 decode is from it (plus fp32's unit of rounding)."""
    z64 = latents(vae_of(name), 9)
    ref64 = whole(vae_of(name), z64)
    assert rel_err(ours(vae_of(name), z64), ref64) <= 1e-12
    vae32 = vae_of(name, torch.float32)
    z32 = z64.float()
    stock_err = (whole(vae32, z32).double() - ref64).abs().max().item()
    our_err = (ours(vae32, z32).double() - ref64).abs().max().item()
    assert our_err <= 2 * stock_err + 2 ** -23, (our_err, stock_err)


@cases("base4", "deep")
def test_less_warm_up_is_not_exact(name, dtype, threads):
    vae = vae_of(name, dtype)
    H = causal_history(vae)
    s = H + 2
    z = latents(vae, s + 3, seed=1)
    ref = ours(vae, z)[:, :, video_frames_of(0, s, 4).stop:]
    for k in (H, H - 1, H - 2):
        got = torch.cat(list(_decode_window(vae, z[:, :, s - k:], warm=k, window_start=s - k,
                                            chunk=2)), dim=2)
        err = (got - ref).abs().max().item()
        assert (err == 0) == (k == H), (k, err)


@pytest.mark.parametrize("name", ["base4", "deep", "ti2v"])
def test_each_decoder_stage_warms_up_exactly_as_far_as_it_must(name, monkeypatch):
    """A warm-up frame runs only the stages whose receptive field reaches it: stage k over the
    last ``_stage_depths[k]`` frames before the clip (counted), exactly (bitwise); any one
    stage started one latent frame later is not exact."""
    with torch.device("meta"):                            # released: 38 frames cost about 8
        wan21 = AutoencoderKLWan()
    assert _stage_depths(wan21) == [38, 28, 14, 7, 4, 1]
    assert 7.5 < warmup_cost(wan21)(38) == warmup_cost(wan21)(1000) < 8.5
    assert warmup_cost(wan21)(0) == 0 and warmup_cost(wan21)(1) == 1
    vae = vae_of(name)
    depths = _stage_depths(vae)
    H = depths[0]
    assert depths == sorted(depths, reverse=True) and depths[-1] == 1
    s = H + 2
    z = latents(vae, s + 2, seed=1)
    ref = ours(vae, z)[:, :, video_frames_of(0, s, 4).stop:]

    def decode():
        return torch.cat(list(_decode_window(vae, z[:, :, s - H:], warm=H, window_start=s - H,
                                             chunk=2)), dim=2)
    calls = [0] * len(depths)
    hooks = [st.entry.register_forward_hook(lambda *a, k=k: calls.__setitem__(k, calls[k] + 1))
             for k, st in enumerate(_decoder_stages(vae))]     # each stage's first module ran
    try:
        assert torch.equal(decode(), ref)
    finally:
        for h in hooks:
            h.remove()
    assert calls == [d + 2 for d in depths]               # its warm-up, then the 2 clip frames
    for k in range(1, len(depths)):
        monkeypatch.setattr(wan_vae, "_stage_depths",
                            lambda v, k=k: [d - (i == k) for i, d in enumerate(depths)])
        assert not torch.equal(decode(), ref), k


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
def test_slicing_and_batch(threads):
    vae = copy.deepcopy(vae_of("base3", torch.float32))
    H = causal_history(vae)
    z = latents(vae, H + 4, b=2, seed=2)
    for slicing in (False, True):
        vae.use_slicing = slicing
        # bitwise: the same shapes (per sample with slicing) on both sides
        assert torch.equal(split_decode(vae, z, [0, H + 2, H + 4], chunk=2), ours(vae, z))


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("name", ["base3", "ti2v"])
def test_tiled_decode_is_bitwise(name, threads):
    vae = copy.deepcopy(vae_of(name, torch.float32))
    s = vae.config.scale_factor_spatial
    vae.enable_tiling(tile_sample_min_height=2 * s, tile_sample_min_width=2 * s,
                      tile_sample_stride_height=s, tile_sample_stride_width=s)
    H = causal_history(vae)
    w = 2 if name == "base3" else 1                       # 3x2 (3x1) tiles of 2x2 latents
    z = latents(vae, H + 4, h=3, w=w, seed=3)
    ref = whole(vae, z)
    # bitwise against diffusers itself: tiled_decode runs post_quant_conv per frame and tile,
    # as decode_clip does, so both sides run the same shapes in the same order
    assert torch.equal(split_decode(vae, z, [0, H + 2, H + 4], chunk=2), ref)
    if name == "base3":                                   # tiling did change the result
        vae.use_tiling = False
        assert not torch.allclose(whole(vae, z), ref, atol=1e-3)


# -- the generator -------------------------------------------------------------------------------

def test_pieces_are_chunk_sized():
    vae = vae_of("ti2v", torch.float32)
    H = causal_history(vae)
    z = latents(vae, H + 9)
    sizes0 = [p.shape for p in decode_clip(vae, z[:, :, :7], start=0, chunk=3)]
    assert [s[2] for s in sizes0] == [9, 12, 4]           # latent 0 -> 1 video frame, others 4
    assert all(s[:2] == (1, 3) and s[3:] == (32, 32) for s in sizes0)
    s = H + 2
    pieces = decode_clip(vae, z[:, :, s:], start=s, history=z[:, :, :s], chunk=2)
    assert [p.shape[2] for p in pieces] == [8, 8, 8, 4]   # 7 latent frames; longer history ok
    assert list(decode_clip(vae, z[:, :, :0], start=5, history=z[:, :, :5])) == []


def test_vae_cache_untouched_and_reentrant():
    vae = copy.deepcopy(vae_of("base3", torch.float32))
    H = causal_history(vae)
    z = latents(vae, H + 4, seed=4)
    ref = ours(vae, z)
    other = latents(vae, 3, seed=5)
    sentinel = object()
    vae._feat_map = sentinel
    gen = decode_clip(vae, z[:, :, H:], start=H, history=z[:, :, :H], chunk=1)
    pieces = [next(gen)]
    vae._feat_map = sentinel
    whole(vae, other)                                     # another decode between pieces
    vae._feat_map = sentinel
    pieces += list(gen)
    assert vae._feat_map is sentinel
    assert torch.equal(torch.cat(pieces, dim=2), ref[:, :, 1 + 4 * (H - 1):])

    calls = [0]
    real = vae.decoder.forward

    def failing(*a, **k):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("boom")
        return real(*a, **k)

    vae.decoder.forward = failing
    with pytest.raises(RuntimeError, match="boom"):
        list(decode_clip(vae, z[:, :, :4], start=0))
    assert vae._feat_map is sentinel


def test_bad_input():
    vae = vae_of("base3", torch.float32)
    H = causal_history(vae)
    z = latents(vae, H + 4)
    with pytest.raises(ValueError, match=rf"needs {H} history frames.*got {H - 2}"):
        decode_clip(vae, z[:, :, H + 2:], start=H + 2, history=z[:, :, 4:H + 2])
    with pytest.raises(ValueError, match=r"needs 3 history frames.*got 1"):
        decode_clip(vae, z[:, :, 3:], start=3, history=z[:, :, 2:3])
    with pytest.raises(ValueError, match=r"needs 2 history frames.*got 0"):
        decode_clip(vae, z[:, :, 2:], start=2, history=None)
    with pytest.raises(ValueError, match="5-D"):
        decode_clip(vae, z[0], start=0)
    with pytest.raises(ValueError, match="only 0 frames before"):
        decode_clip(vae, z[:, :, 1:], start=0, history=z[:, :, :1])
    with pytest.raises(ValueError, match="channels"):
        decode_clip(vae, z[:, :4], start=0)
    with pytest.raises(ValueError, match="does not match"):
        decode_clip(vae, z[:, :, 1:], start=1, history=z[:, :, :1, :1])
    with pytest.raises(ValueError, match="chunk"):
        decode_clip(vae, z, start=0, chunk=0)


def test_frame_ranges():
    assert video_frames_of(0, 1, 4) == range(0, 1)
    assert video_frames_of(1, 2, 4) == range(1, 5)
    assert video_frames_of(0, 3, 4) == range(0, 9)
    assert video_frames_of(5, 8, 4) == range(17, 29)
    assert len(video_frames_of(3, 3, 4)) == 0
    n, bounds = 21, [0, 1, 9, 21]
    assert sum(len(video_frames_of(a, b, 4)) for a, b in zip(bounds, bounds[1:])) == 1 + 4 * (n - 1)
    assert history_range(38, 10) == range(0, 10)
    assert history_range(38, 50) == range(12, 50)
    with pytest.raises(ValueError):
        video_frames_of(3, 2, 4)


# -- encoding ------------------------------------------------------------------------------------

def warmup_of(vae) -> int:
    """Latent frames of warm-up: ``encoder_history`` is ``1 + 4(K-1)`` video frames."""
    return (encoder_history(vae) + 3) // 4


def video(vae, n_latent: int, b: int = 1, seed: int = 0, size: int | None = None) -> torch.Tensor:
    """A random video of ``n_latent`` latent frames: (b, 3, 1 + 4(n_latent - 1), size, size),
    by default 2x2 latents."""
    size = size or 2 * vae.config.scale_factor_spatial
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, 1 + 4 * (n_latent - 1), size, size, generator=g, dtype=torch.float64)
    return x.to(next(vae.parameters()).dtype)


def first_frame(i: int) -> int:
    return video_frames_of(i, i, 4).start


def ours_enc(vae, x):
    """``encode_clip`` of the whole video: what every split must give, bit for bit."""
    return encode_clip(vae, x, start=0)


def split_encode(vae, x, bounds):
    """Encode x clip by clip (clip q = latent frames bounds[q]:bounds[q+1]) and concatenate."""
    H = encoder_history(vae)
    pieces = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        r = encode_history_range(H, s)
        hist = x[:, :, r.start:r.stop] if s else None
        pieces.append(encode_clip(vae, x[:, :, first_frame(s):first_frame(e)], start=s,
                                  history=hist))
    return torch.cat(pieces, dim=2)


def test_encoder_history_per_config_and_released():
    assert [encoder_history(vae_of(n)) for n in ("base3", "base4", "ti2v")] == [77, 77, 77]
    assert encoder_history(vae_of("deep")) == 109       # K = 20 -> 28: +8 per res block
    with torch.device("meta"):
        wan21 = AutoencoderKLWan()
        wan22 = AutoencoderKLWan(base_dim=160, decoder_base_dim=256, **TI2V)
    assert encoder_history(wan21) == encoder_history(wan22) == 109    # K = 28 latent frames
    assert encode_history_range(109, 0) == range(0)
    assert encode_history_range(109, 1) == range(0, 1)
    assert encode_history_range(109, 28) == range(0, 109)       # from video frame 109
    assert encode_history_range(109, 29) == range(4, 113)
    assert encode_history_range(109, 40) == range(48, 157)


@pytest.mark.parametrize("name", ["base3", "deep", "ti2v"])
def test_encoder_receptive_field_is_exactly_encoder_history(name):
    """Latent i reads video frame 4(i - K), the window's first frame, and nothing before it:
    no history shorter than ``encoder_history`` can be exact."""
    vae = vae_of(name)
    K = warmup_of(vae)
    i = K + 2
    x = video(vae, i + 1).requires_grad_(True)
    vae._encode(x)[:, :, i].sum().backward()
    dep = x.grad.abs().amax(dim=(0, 1, 3, 4))
    assert first_frame(i) - 4 * (i - K) == encoder_history(vae)
    assert dep[4 * (i - K)] > 0
    assert (dep[:4 * (i - K)] == 0).all()


@cases("base3", "deep", "ti2v")
def test_split_encode_is_bitwise(name, dtype, threads):
    vae = vae_of(name, dtype)
    K = warmup_of(vae)
    n = K + 5
    x = video(vae, n)
    ref = ours_enc(vae, x)
    assert ref.shape == (1, 2 * vae.config.z_dim, n, 2, 2)      # 2x2 latents
    splits = [[0, 1, K + 1, n],          # one-latent clip at 0, split at 1, a window from frame 4
              [0, K + 4, n]]             # two uneven clips, the window from video frame 16
    if dtype == torch.float64:
        splits.append([0, K + 2, K + 3, n])   # a one-latent clip in the middle
    for bounds in splits:
        out = split_encode(vae, x, bounds)
        assert out.shape == ref.shape
        # bitwise: the same modules on the same shapes in the same order, whatever the split
        assert torch.equal(out, ref), (bounds, (out - ref).abs().max().item())


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("name", ["base3", "ti2v"])
def test_whole_encode_is_diffusers_encode(name, threads):
    """Against ``vae._encode``, which runs ``quant_conv`` over the whole latent where
    ``encode_clip`` runs it per frame: in fp64 to 1e-12; in fp32 no farther from the fp64
    encode than twice what diffusers' own fp32 encode is from it (plus fp32's unit)."""
    x64 = video(vae_of(name), 9)
    with torch.no_grad():
        ref64 = vae_of(name)._encode(x64)
        stock32 = vae_of(name, torch.float32)._encode(x64.float())
    assert rel_err(ours_enc(vae_of(name), x64), ref64) <= 1e-12
    our32 = ours_enc(vae_of(name, torch.float32), x64.float())
    stock_err = (stock32.double() - ref64).abs().max().item()
    our_err = (our32.double() - ref64).abs().max().item()
    assert our_err <= 2 * stock_err + 2 ** -23 * ref64.abs().max().item(), (our_err, stock_err)


@cases("base4", "deep")
def test_less_encode_history_is_not_exact(name, dtype, threads):
    vae = vae_of(name, dtype)
    K = warmup_of(vae)
    s = K + 2
    x = video(vae, s + 3, seed=1)
    ref = ours_enc(vae, x)[:, :, s:]
    for k in (K, K - 1, K - 2):          # windows from video frame 4(s - k): 1 + 4(k-1) frames
        got = _encode_window(vae, x[:, :, 4 * (s - k):], warm=k)
        err = (got - ref).abs().max().item()
        assert (err == 0) == (k == K), (k, err)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
def test_encode_slicing_and_batch(threads):
    vae = copy.deepcopy(vae_of("ti2v", torch.float32))
    K = warmup_of(vae)
    x = video(vae, K + 3, b=2, seed=2)
    for slicing in (False, True):
        vae.use_slicing = slicing
        # bitwise: the same shapes (per sample with slicing) on both sides
        assert torch.equal(split_encode(vae, x, [0, K + 2, K + 3]), ours_enc(vae, x))
        with torch.no_grad():
            stock = vae.encode(x).latent_dist.parameters
        assert rel_err(ours_enc(vae, x), stock) <= 1e-5


def test_encode_cache_untouched():
    vae = copy.deepcopy(vae_of("base3", torch.float32))
    sentinel = object()
    vae._enc_feat_map = sentinel
    x = video(vae, 3)
    assert encode_clip(vae, x[:, :, 5:], start=2, history=x[:, :, :5]).shape[2] == 1
    assert vae._enc_feat_map is sentinel


def test_encode_bad_input():
    vae = copy.deepcopy(vae_of("base3", torch.float32))
    H = encoder_history(vae)
    K = warmup_of(vae)
    x = video(vae, K + 4)
    s = K + 2
    clip = x[:, :, first_frame(s):]
    with pytest.raises(ValueError, match=rf"needs {H} history frames.*got {H - 1}"):
        encode_clip(vae, clip, start=s, history=x[:, :, first_frame(s) - H + 1:first_frame(s)])
    with pytest.raises(ValueError, match=r"needs 5 history frames.*got 4"):
        encode_clip(vae, x[:, :, 5:9], start=2, history=x[:, :, 1:5])
    with pytest.raises(ValueError, match=r"needs 1 history frames.*got 0"):
        encode_clip(vae, x[:, :, 1:5], start=1)
    with pytest.raises(ValueError, match="1 \\+ 4k video frames, got 4"):
        encode_clip(vae, x[:, :, :4], start=0)
    with pytest.raises(ValueError, match="4k video frames, got 5"):
        encode_clip(vae, x[:, :, 1:6], start=1, history=x[:, :, :1])
    with pytest.raises(ValueError, match="only 1 frames before"):
        encode_clip(vae, x[:, :, 1:5], start=1, history=x[:, :, :2])
    with pytest.raises(ValueError, match="5-D"):
        encode_clip(vae, x[0], start=0)
    with pytest.raises(ValueError, match="channels"):
        encode_clip(vae, x[:, :2], start=0)
    with pytest.raises(ValueError, match="does not match"):
        encode_clip(vae, x[:, :, 1:5], start=1, history=x[:, :, :1, :8])
    assert encode_clip(vae, x[:, :, :0], start=3, history=x[:, :, :9]).shape == (1, 32, 0, 2, 2)
    vae.enable_tiling(tile_sample_min_height=8, tile_sample_min_width=8,
                      tile_sample_stride_height=8, tile_sample_stride_width=8)
    with pytest.raises(ValueError, match="does not mirror tiled_encode.*disable_tiling"):
        encode_clip(vae, x[:, :, :5], start=0)
    small = video(vae, 2, size=8)                     # within one tile: _encode does not tile
    assert torch.equal(encode_clip(vae, small, start=0), ours_enc(vae_of("base3", torch.float32),
                                                                   small))
