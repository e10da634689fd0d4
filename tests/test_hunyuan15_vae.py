"""Divided clip-by-clip decoding of the HunyuanVideo 1.5 VAE (vinf_engine/hunyuan15_vae.py)
against ``vae.decode`` of the whole video: first, middle and last clips, uneven splits and
1-frame clips, clips past every warm-up (the short VAE) and clips whose warm-up reaches frame
0, the released layout, spatial tiles, a mid block without attention, the work accounting, and
latents that do not cover a clip.

Tolerances. A clip runs the stock modules on the same values, but on windows of other lengths,
and its attention sums over the keys a query frame may see where the stock one sums over all
keys with the mask's zeros: the same terms, possibly in another order. fp64: reductions of at
most a few hundred terms (a conv's C_in * 27 taps, at most T * h * w keys) through ~20
operators, so rounding is well under 1e-12 of the output's scale. fp32 (FlashAttention's
rule): the split decode's error against the fp64 stock decode is at most twice the stock fp32
decode's own, plus a few ulps of the output's scale.
"""
import pytest
import torch

from hunyuan15_helpers import short_hunyuan15_vae, split_decode15, tiny_hunyuan15_vae

EPS32 = torch.finfo(torch.float32).eps


def _z(frames, hw, seed=3):
    return torch.randn(1, 4, frames, *hw, generator=torch.Generator().manual_seed(seed))


def _stock(vae, z):
    with torch.no_grad():
        return vae.decode(z).sample


def _check(make, z, splits):
    """Each split in fp64 to 1e-12 of the scale; in fp32 by the rule above."""
    v64, v32 = make(dtype=torch.float64), make()
    ref = _stock(v64, z.double())
    stock32 = (_stock(v32, z).double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    for sizes in splits:
        got = split_decode15(v64, z.double(), sizes)
        assert got.shape == ref.shape, sizes
        assert (got - ref).abs().max().item() <= 1e-12 * scale, sizes
        err32 = (split_decode15(v32, z, sizes).double() - ref).abs().max().item()
        assert err32 <= 2 * stock32 + 4 * EPS32 * scale, (sizes, err32, stock32)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
def test_split_decode_is_the_whole_decode(threads):
    from vinf_engine.hunyuan15_vae import decode_plan
    # 16 latent frames = 61 video frames; clips from 13 on have every operator after the
    # attention windowed (the second mid resnet too), earlier ones a warm-up reaching frame 0
    vae = short_hunyuan15_vae()
    assert decode_plan(vae, 14, 16)[3].op.name == "mid.resnets.1"
    assert decode_plan(vae, 14, 16)[3].keep > 0
    splits = [(6, 5, 5), (1, 14, 1), (15, 1)] if threads == 1 else [(6, 5, 5)]
    _check(short_hunyuan15_vae, _z(16, (3, 4)), splits)


def test_the_released_layout():
    # five up levels, 16x spatial: at 9 latent frames every warm-up reaches back to frame 0
    # up to the third up block, the operators after it are windowed
    from vinf_engine.hunyuan15_vae import decode_plan
    assert [s.op.name for s in decode_plan(tiny_hunyuan15_vae(), 7, 9)
            if s.start > 0][0] == "up_blocks.2.upsampler"
    _check(tiny_hunyuan15_vae, _z(9, (2, 3)), [(3, 4, 2)])


def test_a_whole_clip_is_the_stock_call():
    vae = short_hunyuan15_vae()
    z = _z(5, (3, 4))
    # bitwise: one rank's clip is the whole video, the stock call on the same tensor
    assert torch.equal(split_decode15(vae, z, (5,)), _stock(vae, z))


def test_spatial_tiles():
    # latent 3 x 5 in tiles of 4 x 4 latents at a stride of 2: 2 x 3 tiles, blended per frame
    def make(dtype=torch.float32):
        vae = short_hunyuan15_vae(dtype=dtype)
        vae.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=16,
                          tile_latent_min_height=4, tile_latent_min_width=4,
                          tile_overlap_factor=0.5)
        return vae
    _check(make, _z(9, (3, 5)), [(4, 5)])


def test_a_mid_block_without_attention_needs_a_bounded_past():
    from vinf_engine.hunyuan15_vae import needed_range

    def make(dtype=torch.float32):
        vae = short_hunyuan15_vae(dtype=dtype)
        vae.decoder.mid_block.attentions[0] = None
        return vae
    vae = make()
    assert needed_range(short_hunyuan15_vae(), 24, 26) == range(0, 26)
    need = needed_range(vae, 24, 26)
    assert 0 < need.start < 24
    z = _z(26, (2, 2))
    _check(make, z, [(24, 2)])
    # the receptive field is tight: conv_in at the window's start replicates a frame that is
    # not the video's, and one latent frame less changes the clip's first frames
    from vinf_engine.hunyuan15_vae import decode_clip
    with torch.no_grad():
        ok = decode_clip(vae, z[:, :, need.start:], offset=need.start, frames=range(24, 26),
                         num_frames=26)
        z2 = z.clone()
        z2[:, :, need.start] = 0.0
        off = decode_clip(vae, z2[:, :, need.start:], offset=need.start, frames=range(24, 26),
                          num_frames=26)
    assert (ok[:, :, 0] - off[:, :, 0]).abs().max() > 1e-6


def test_work_accounting_counts_what_runs():
    """``decode_work``'s frames per operator are the frames the stock modules receive."""
    from vinf_engine.hunyuan15_vae import decode_work, video_frames_of
    vae = short_hunyuan15_vae()
    d = vae.decoder
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: seen.__setitem__(n, a[0].shape[2]))
             for n, m in (("conv_in", d.conv_in), ("mid.resnets.1", d.mid_block.resnets[1]),
                          ("up_blocks.1.upsampler", d.up_blocks[1].upsamplers[0]),
                          ("head", d.conv_out))]
    z = _z(16, (3, 4))
    split_decode15(vae, z, (13, 3))
    for h in hooks:
        h.remove()
    w = decode_work(vae, 13, 16, 3, 4)
    assert {n: w["frames"][n] for n in seen} == seen
    assert seen["conv_in"] == 16                        # the prefix: from frame 0
    assert seen["head"] - len(video_frames_of(range(13, 16))) == 2    # conv_out's 3-frame kernel
    whole = decode_work(vae, 0, 16, 3, 4)
    assert 0 < w["prefix"] < whole["prefix"] + 1 and w["window"] < whole["window"]


def test_latents_that_do_not_cover_the_clip_are_refused():
    from vinf_engine.hunyuan15_vae import decode_clip
    vae = short_hunyuan15_vae()
    z = _z(6, (3, 4))
    with pytest.raises(ValueError, match="needs latent frames 0..5; z holds 2..5"):
        decode_clip(vae, z[:, :, 2:], offset=2, frames=range(4, 6), num_frames=6)
    with pytest.raises(ValueError, match="not a non-empty part of the video's 6 latent frames"):
        decode_clip(vae, z, offset=0, frames=range(4, 7), num_frames=6)
