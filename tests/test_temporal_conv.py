"""vinf.ops.temporal_conv: a stack of convs over a haloed frame range equals the whole-video
stack (zero padding at the video ends only) on the clip's own frames."""
import pytest
import torch
import torch.nn.functional as F

import vinf_engine as vinf


def whole_video_stack(x, weights):
    for w, b in weights:
        x = F.conv3d(x, w, b, padding=(w.shape[2] // 2, 0, 0))
    return x


def make(frames=11, kernels=(3, 3, 5, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, frames, 3, 2, generator=g, dtype=torch.float64)
    weights = [(torch.randn(4, 4, k, 1, 1, generator=g, dtype=torch.float64),
                torch.randn(4, generator=g, dtype=torch.float64)) for k in kernels]
    return x, weights


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("sizes", [(11,), (6, 5), (1, 6, 4), (3, 3, 3, 2), (2,) * 5 + (1,)])
def test_haloed_stack_equals_whole_video(sizes, threads):
    x, weights = make()
    ref = whole_video_stack(x, weights)
    halo = sum(w.shape[2] // 2 for w, _ in weights)
    layout = vinf.ClipLayout.from_sizes(sizes)
    for r in range(layout.world_size):
        s, e = layout.start(r), layout.end(r)
        lo, hi = max(0, s - halo), min(layout.num_frames, e + halo)
        h = x[:, :, lo:hi]
        for w, b in weights:
            h, lo, hi = vinf.ops.temporal_conv(h, w, b, lo=lo, hi=hi, num_frames=layout.num_frames)
        assert lo <= s and e <= hi
        torch.testing.assert_close(h[:, :, s - lo:e - lo], ref[:, :, s:e], rtol=1e-12, atol=1e-12)


def test_one_frame_short_halo_leaves_the_clip_edge_uncovered():
    # The returned range is the truth: with a halo one frame short, the clip's first frame
    # has no exact output, and the range says so instead of handing back a wrong frame.
    x, weights = make()
    s, e, lo, hi = 5, 7, 1, 11          # full halo would be 5 frames; 4 given on the left
    h = x[:, :, lo:hi]
    for w, b in weights:
        h, lo, hi = vinf.ops.temporal_conv(h, w, b, lo=lo, hi=hi, num_frames=11)
    assert lo == s + 1 and hi == 11


@pytest.mark.parametrize("needle,kw", [
    ("k odd", dict(weight=torch.randn(4, 4, 2, 1, 1))),
    ("k odd", dict(weight=torch.randn(4, 4, 3, 2, 1))),
    ("input channels", dict(weight=torch.randn(4, 3, 3, 1, 1))),
    ("holds 5 frames", dict(lo=0, hi=6)),
    ("non-empty range", dict(lo=5, hi=5)),
    ("non-empty range", dict(lo=8, hi=13)),
    ("too short", dict(lo=2, hi=6, x=torch.randn(1, 4, 4, 1, 1), weight=torch.randn(4, 4, 5, 1, 1))),
    ("x must be 5-D", dict(x=torch.randn(4, 5, 1, 1))),
])
def test_bad_arguments(needle, kw):
    args = dict(x=torch.randn(1, 4, 5, 1, 1), weight=torch.randn(4, 4, 3, 1, 1), bias=None,
                lo=2, hi=7, num_frames=10)
    args.update(kw)
    x, w, b = args.pop("x"), args.pop("weight"), args.pop("bias")
    with pytest.raises(ValueError, match=needle):
        vinf.ops.temporal_conv(x, w, b, **args)
