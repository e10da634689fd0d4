"""The joint text attention layer (layers/joint_attention.py) on its own, on 1-3 real gloo
ranks, against a dense oracle written from the definition: video queries see their window,
the global frames and the valid text tokens (padding poisoned with NaN, never read); text
queries see every video token once and the valid text tokens. The text stream is the same
bits on every rank, and its bytes per step do not grow with the video."""
import pytest
import torch

from helpers import rel_err, run_ranks
from joint_helpers import B, D, H, LT, clip_rank, flat_bytes_rank, oracle

F = 9
SPLITS = {1: (9,), 2: (5, 4), 3: (1, 5, 3)}
DUAL = dict(window=2, num_global=3, phase_t=500, phase_bias=1.5)
CASES = {
    "dual": (DUAL, None),
    "narrow": (dict(DUAL, window=1), None),        # clips of 3+ frames: an interior in flight
    "no_global": (dict(DUAL, num_global=0), None),
    "clamped": (dict(DUAL, window=1), 2),          # global keys at clamped offsets
    "exact": (dict(window=100, num_global=0, phase_bias=0.0), None),
}


def _rank(rank, world, sizes):
    out = {}
    for name, (cfg, clamp) in CASES.items():
        for t in (900, 100):
            out[name, t] = clip_rank(rank, world, sizes, cfg, t, clamp)
    return out


_RUNS = {}


def _runs(world):
    if world not in _RUNS:
        _RUNS[world] = ([_rank(0, 1, SPLITS[1])] if world == 1 else
                        run_ranks(_rank, world, SPLITS[world], timeout=240))
    return _RUNS[world]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_joint_attention_against_the_dense_oracle(world):
    res = _runs(world)
    for name, (cfg, clamp) in CASES.items():
        for t in (900, 100):
            lb, gb = res[0][name, t]["biases"]
            ref_video, ref_text = oracle(F, cfg, lb, gb, clamp)
            video = torch.cat([r[name, t]["video"] for r in res], dim=1)
            # fp64 inputs; the parts' log-sum-exps are fp32 (as the ops return them), so the
            # lse merges round at ~1e-8
            assert torch.isfinite(video).all(), name
            assert rel_err(video, ref_video) <= 1e-6, (name, t, rel_err(video, ref_video))
            for r in res:
                # bitwise: every rank merges the same gathered partials in rank order
                assert torch.equal(r[name, t]["text"], res[0][name, t]["text"]), (name, r)
            assert rel_err(res[0][name, t]["text"], ref_text) <= 1e-6, name
    # Not comparing identical things: the phase bias, the global scope and the clamp matter.
    lb, gb = res[0]["dual", 900]["biases"]
    assert gb == 1.5 and lb == 0.0
    narrow = torch.cat([r["narrow", 900]["video"] for r in res], dim=1)
    assert rel_err(torch.cat([r["clamped", 900]["video"] for r in res], dim=1), narrow) > 1e-3
    assert all(torch.isfinite(r[k]["text"]).all() for r in res for k in r)
    a = torch.cat([r["dual", 900]["video"] for r in res], dim=1)
    for other in (("dual", 100), ("no_global", 900)):
        assert rel_err(torch.cat([r[other]["video"] for r in res], dim=1), a) > 1e-3


def test_text_bytes_are_one_text_sized_tensor_per_peer_and_flat_in_video_length():
    res = run_ranks(flat_bytes_rank, 2, timeout=240)
    text_bytes = (2 - 1) * B * LT * H * (D + 1) * 4      # fp32 output + lse, from the one peer
    for r in res:
        assert r[6] == r[12] == r[24], r                  # no exchange grows with the video
        assert r[6]["joint attention text partials"] == text_bytes
