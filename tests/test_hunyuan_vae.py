"""Clip-by-clip decoding of the HunyuanVideo VAE (vinf_engine/hunyuan_vae.py) against
``vae.decode`` of the whole video: temporal tiles with a short one at the end, splits that
cut tiles (a 1-frame clip), tiles whose blends reach back several tiles, the one-call decode
(framewise decoding off), and latents that do not cover what a clip needs."""
import pytest
import torch

from hunyuan_helpers import split_decode, tiny_hunyuan_vae


@pytest.fixture(scope="module")
def vae():
    return tiny_hunyuan_vae()


def _z(frames, seed=3):
    return torch.randn(1, 4, frames, 2, 2, generator=torch.Generator().manual_seed(seed))


def test_clip_decode_is_the_stock_tiled_decode(vae):
    from vinf_engine.hunyuan_vae import temporal_tiles
    z = _z(11)
    # tiles [0,5) [3,8) [6,11) [9,11): the last one short
    tiles = [(t.start, t.stop) for t in temporal_tiles(vae, 11)]
    assert tiles == [(0, 5), (3, 8), (6, 11), (9, 11)]
    with torch.no_grad():
        ref = vae.decode(z).sample
    assert ref.shape[2] == 41
    for sizes in ((5, 6), (1, 6, 4)):        # (one rank: tests/test_generate_hunyuan.py)
        # bitwise: the same decoder calls on the same latent windows (same shapes), and the
        # stock blend's elementwise operations
        assert torch.equal(split_decode(vae, z, sizes), ref), sizes


def test_blends_that_reach_back_several_tiles():
    """Tiles of 4 latent frames at a stride of 1: each 12-frame tile blends 8 frames, so a
    tile's blended frames depend on every tile before it (the chain walks back to tile 0)."""
    from vinf_engine.hunyuan_vae import needed_range
    vae = tiny_hunyuan_vae()
    vae.enable_tiling(tile_sample_min_num_frames=12, tile_sample_stride_num_frames=4)
    z = _z(6)
    with torch.no_grad():
        ref = vae.decode(z).sample
    assert needed_range(vae, 4, 6, 6) == range(0, 6)
    # bitwise: identical decoder calls and blends, as above
    assert torch.equal(split_decode(vae, z, (4, 2)), ref)


def test_framewise_decoding_off_is_one_call_on_every_rank():
    from vinf_engine.hunyuan_vae import needed_range, whole_video
    vae = tiny_hunyuan_vae()
    vae.use_framewise_decoding = False
    z = _z(6)
    assert whole_video(vae, 6) and needed_range(vae, 4, 6, 6) == range(0, 6)
    with torch.no_grad():
        ref = vae.decode(z).sample
    # bitwise: every rank makes the stock call on the whole video and keeps its frames
    assert torch.equal(split_decode(vae, z, (4, 2)), ref)
    # ... which no window could replace: the decoder's norms and causal attention see every
    # frame, so decoding the clip's own latents alone gives other frames
    with torch.no_grad():
        alone = vae.decode(z[:, :, 4:]).sample
    assert (alone[:, :, 1:] - ref[:, :, -alone.shape[2] + 1:]).abs().max() > 1e-4


def test_latents_that_do_not_cover_the_tiles_are_refused(vae):
    from vinf_engine.hunyuan_vae import decode_clip
    z = _z(11)
    with pytest.raises(ValueError, match="needs latent frames 0..10; z holds 3..10"):
        decode_clip(vae, z[:, :, 3:], offset=3, frames=range(5, 11), num_frames=11)
    with pytest.raises(ValueError, match="not within the video's 11 latent frames"):
        decode_clip(vae, z, offset=0, frames=range(5, 12), num_frames=11)
