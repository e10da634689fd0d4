"""ClipLayout, global-frame selection, DualScopeConfig validation, partition-invariant noise."""
import math

import pytest
import torch

import vinf_engine as vinf


@pytest.mark.parametrize("F,R,sizes", [(10, 3, (4, 3, 3)), (8, 4, (2, 2, 2, 2)), (5, 5, (1,) * 5),
                                       (7, 1, (7,)), (11, 4, (3, 3, 3, 2))])
def test_balanced_layout(F, R, sizes):
    lay = vinf.ClipLayout(F, R)
    assert lay.sizes == sizes and lay.num_frames == F and lay.world_size == R
    frames = [f for r in range(R) for f in lay.frames(r)]
    assert frames == list(range(F))
    for r in range(R):
        assert lay.end(r) - lay.start(r) == sizes[r]
        for f in lay.frames(r):
            assert lay.owner(f) == r


def test_layout_from_sizes_and_errors():
    lay = vinf.ClipLayout.from_sizes([1, 6, 4])
    assert lay.start(2) == 7 and lay.owner(6) == 1 and lay.owner(0) == 0
    with pytest.raises(ValueError, match="smaller than world_size"):
        vinf.ClipLayout(3, 4)
    with pytest.raises(ValueError, match="world_size"):
        vinf.ClipLayout(3, 0)
    with pytest.raises(ValueError, match="num_frames"):
        vinf.ClipLayout(2.5, 1)
    with pytest.raises(ValueError, match="rank 1 holds 0"):
        vinf.ClipLayout.from_sizes([3, 0])
    with pytest.raises(ValueError, match="outside the video"):
        lay.owner(11)
    with pytest.raises(ValueError, match="rank 3"):
        lay.frames(3)


@pytest.mark.parametrize("F,G", [(48, 16), (100, 7), (16, 16), (5, 9), (1000, 16), (17, 1)])
def test_global_frames_follow_the_formula(F, G):
    got = vinf.global_frames(F, G)
    if G >= F:
        assert got == tuple(range(F))
    else:
        assert got == tuple(math.floor((j + 0.5) * F / G) for j in range(G))
        assert len(set(got)) == G and all(0 <= f < F for f in got)
    assert vinf.global_frames(F, 0) == ()


def test_config_defaults_and_biases():
    c = vinf.DualScopeConfig()
    assert (c.window, c.num_global, c.phase_t, c.phase_bias, c.sync_groupnorm) == (8, 16, 800, 10.0, True)
    assert c.biases(800) == (0.0, 10.0) and c.biases(999) == (0.0, 10.0)
    assert c.biases(799.5) == (10.0, 0.0)


@pytest.mark.parametrize("field,value", [
    ("window", -1), ("window", 2.5), ("window", True), ("num_global", -3), ("num_global", "4"),
    ("phase_t", float("nan")), ("phase_t", -1), ("phase_bias", float("inf")), ("phase_bias", None),
    ("sync_groupnorm", 1),
])
def test_config_rejects_each_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        vinf.DualScopeConfig(**{field: value})


def test_noise_is_partition_invariant_and_per_frame():
    shape = (2, 4, 13, 5, 6)
    full = vinf.initial_noise(1234, shape)
    assert full.shape == shape and full.dtype == torch.float32
    for sizes in [(13,), (7, 6), (1, 5, 7), (4, 3, 3, 3)]:
        lay = vinf.ClipLayout.from_sizes(sizes)
        parts = [vinf.initial_noise(1234, shape, lay.frames(r)) for r in range(len(sizes))]
        assert torch.equal(torch.cat(parts, dim=2), full)     # per frame, the same draws
    other = vinf.initial_noise(1235, shape)
    assert not torch.allclose(other, full)
    # Frames are independent draws, not one draw repeated.
    assert not torch.allclose(full[:, :, 0], full[:, :, 1])
    big = vinf.initial_noise(0, (1, 4, 64, 32, 32))
    assert abs(big.mean().item()) < 0.02 and abs(big.std().item() - 1) < 0.02
    half = vinf.initial_noise(1234, shape, range(2, 5), dtype=torch.float16)
    assert half.dtype == torch.float16 and torch.equal(half, full[:, :, 2:5].half())  # same cast


@pytest.mark.parametrize("kw,needle", [
    (dict(seed=-1), "seed"), (dict(seed=1.5), "seed"), (dict(shape=(1, 4, 8, 8)), "shape"),
    (dict(frames=range(3, 20)), "frames"), (dict(frames=range(0, 8, 2)), "frames"),
])
def test_noise_bad_arguments(kw, needle):
    args = dict(seed=0, shape=(1, 4, 8, 4, 4), frames=None)
    args.update(kw)
    with pytest.raises(ValueError, match=needle):
        vinf.initial_noise(args["seed"], args["shape"], args["frames"])
