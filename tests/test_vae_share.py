"""The drop-in shares the VAE out (vinf_engine.vae_share): after ``parallelize_pipe`` the
pipeline's own ``vae.encode`` / ``vae.decode`` of a video run each rank's share and gather the
whole, on 3 real gloo ranks. Every rank returns what the unpatched pipeline returns (exact
config), within the VAE's rounding; each rank's encoder and decoder see only its clip and
warm-up (counted by hooks). Calls the split does not understand run stock on every rank;
ranks that disagree are refused on every rank."""
from __future__ import annotations

import itertools
import warnings

import pytest
import torch

import vinf_engine as vinf
from helpers import rel_err, run_ranks
from vae_helpers import FrameCount, build, pipelines_rank, run_pipeline, wan_vae_calls_rank
from vinf_engine.vae_share import clip_sizes
from vinf_engine.wan_vae import (_stage_depths, encode_history_range, encoder_history,
                                 history_range, video_frames_of, warmup_cost)
from wan_helpers import WAN_HW

warnings.filterwarnings("ignore", message=".*should be kept in float32.*")

WAN = dict(prompt="the cat", negative_prompt="a dog", num_frames=17, num_inference_steps=2,
           guidance_scale=4.0, height=WAN_HW[0], width=WAN_HW[1], max_sequence_length=16,
           output_type="pt", image=1)
T2V = dict(prompt="the cat", num_frames=7, num_inference_steps=2, guidance_scale=4.0,
           height=32, width=32, output_type="pt")
SPECS = {
    "wan2.1 i2v": dict(pipe=("wan_i2v", "2.1"), call=WAN, seed=1),
    "wan2.2 i2v first+last": dict(pipe=("wan_i2v", "2.2"), call=dict(WAN, last_image=2), seed=2),
    "wan2.2 ti2v": dict(pipe=("wan_i2v", "ti2v"), call=WAN, seed=3),
    "wan2.1 t2v": dict(pipe=("wan_t2v", "2.1"),
                       call={k: v for k, v in WAN.items() if k != "image"}, seed=6),
    "t2v": dict(pipe=("t2v",), call=T2V, seed=4),
    "v2v": dict(pipe=("v2v",), call=dict(prompt="the cat", video=(6, 32, 32), strength=0.7,
                                         num_inference_steps=3, output_type="pt"), seed=5),
}
# Against the unpatched pipeline, fp32 pt frames: the engine's own exact-config rounding and
# the VAE's (quant convs per latent frame; 2-D convs on fewer rows) carried through the steps.
# The v2v call moves by 1.45e-5 on 3 ranks with the VAE left stock on every rank (measured:
# the denoiser's split alone), by 1.43e-5 with it shared.
TOL = dict(v2v=2e-5)


def counts(encoded=0, decoded=0, decoded_full=None):
    """A ``FrameCount`` result; ``decoded_full`` defaults to ``decoded`` (no warm-up)."""
    return dict(encoded=encoded, decoded=decoded,
                decoded_full=decoded if decoded_full is None else decoded_full)


def _decode_share(vae, n, R, rank):
    """Rank ``rank``'s decoder frames for a video of ``n`` latent frames: ``(into the decoder,
    through all of it)``, its clip plus its warm-up (whole only over the head's depth)."""
    sizes = clip_sizes(n, R, warmup_cost(vae))
    s = sum(sizes[:rank])
    return sizes[rank] + len(history_range(vae, s)), sizes[rank] + min(s, _stage_depths(vae)[-1])


def _work(sizes, warmup):
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    return [n + min(s, warmup) for n, s in zip(sizes, starts)]


def test_clip_sizes_minimize_the_largest_work():
    for n, ranks, warmup in itertools.product(range(1, 13), range(1, 5), range(0, 7)):
        if ranks > n:
            continue
        sizes = clip_sizes(n, ranks, warmup)
        assert sum(sizes) == n and len(sizes) == ranks and min(sizes) >= 1
        best = min(max(_work([b - a for a, b in zip((0, *cuts), (*cuts, n))], warmup))
                   for cuts in itertools.combinations(range(1, n), ranks - 1))
        assert max(_work(sizes, warmup)) == best, (n, ranks, warmup, sizes)
    assert clip_sizes(161, 8, 38) == (49, 16, 16, 16, 16, 16, 16, 16)    # 54 each, not 21 + 38
    with pytest.raises(ValueError):
        clip_sizes(2, 3, 0)


@pytest.fixture(scope="module")
def stock():
    """The unpatched pipelines, at the ranks' one thread: the stock v2v call alone moves by
    1.1e-5 between 1 and 2 threads (the CPU's kernels by thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {name: run_pipeline(spec, parallel=False) for name, spec in SPECS.items()}
    finally:
        torch.set_num_threads(before)


def _expected_counts(name, spec, whole):
    """Each rank's encoder and decoder frames: its clip plus its warm-up (Wan), its rows (2-D)."""
    pipe = build(spec)
    vae, R = pipe.vae, 3
    out = [counts() for _ in range(R)]
    if name.startswith("wan"):
        n = 1 + (spec["call"]["num_frames"] - 1) // 4
        for r in range(R):
            out[r]["decoded"], out[r]["decoded_full"] = _decode_share(vae, n, R, r)
        if name.endswith("ti2v") or name.endswith("t2v"):   # one frame, or none: not shared
            for r in range(R):
                out[r]["encoded"] = whole["encoded"]
        else:
            enc = clip_sizes(n, R, (encoder_history(vae) + 3) // 4)
            for r in range(R):
                s = sum(enc[:r])
                frames = video_frames_of(s, s + enc[r])
                out[r]["encoded"] = len(frames) + len(encode_history_range(vae, s))
    else:
        for key in ("encoded", "decoded", "decoded_full"):
            if whole[key]:
                for r, n in enumerate(clip_sizes(whole[key], R, 0)):
                    out[r][key] = n
    return out


def test_the_pipelines_vae_is_shared_on_three_ranks(stock):
    res = run_ranks(pipelines_rank, 3, SPECS, timeout=600)
    for name, spec in SPECS.items():
        ref = stock[name]
        for rank, r in enumerate(res):                   # every rank returns the whole video
            got = r[name]["frames"]
            assert got.shape == ref["frames"].shape, (name, rank)
            err = rel_err(got, ref["frames"])
            assert err <= TOL.get(name, 1e-5), (name, rank, err)
            # the gathered VAE output is the same bits on every rank, and so is what follows
            assert torch.equal(got, res[0][name]["frames"]), (name, rank)
        expect = _expected_counts(name, spec, ref["counts"])
        assert [r[name]["counts"] for r in res] == expect, name
        for key in ("encoded", "decoded", "decoded_full"):
            if ref["counts"][key] and not (name.endswith("ti2v") and key == "encoded"):
                # each rank does less than the whole, in all less than every rank the whole
                assert sum(e[key] for e in expect) < 3 * ref["counts"][key], (name, key)


def test_direct_vae_calls_on_three_ranks():
    n = 40                                                # latent frames: 157 video frames
    res = run_ranks(wan_vae_calls_rank, 3, n, timeout=600)
    vae = build(dict(pipe=("wan_i2v", "2.2"))).vae
    K = (encoder_history(vae) + 3) // 4
    enc = clip_sizes(n, 3, K)
    whole_frames = 1 + 4 * (n - 1)
    for rank, r in enumerate(res):
        s_enc = sum(enc[:rank])
        mine_dec, mine_full = _decode_share(vae, n, 3, rank)
        mine_enc = len(video_frames_of(s_enc, s_enc + enc[rank])) + len(encode_history_range(vae, s_enc))
        assert mine_full < n / 2 and mine_enc < whole_frames   # every rank: less than the whole
        dec = counts(decoded=mine_dec, decoded_full=mine_full)
        # within the dtype's bound: no farther from the fp64 VAE than twice diffusers' fp32
        for what in ("decode", "encode"):
            ours, _ = r[what]
            ref64, ref32 = r[f"stock64_{what}"], r[f"stock32_{what}"]
            stock_err = (ref32.double() - ref64).abs().max().item()
            our_err = (ours.double() - ref64).abs().max().item()
            assert our_err <= 2 * stock_err + 2 ** -23 * ref64.abs().max().item(), (what, our_err)
        assert r["decode"][1] == dec
        assert r["encode"][1] == counts(encoded=mine_enc)
        assert r["decode_bytes"] > 0                      # the gather, on the engine's counters
        mean = res[0]["encode"][0][:, :16]
        assert torch.equal(r["encode_tuple"][0], mean)    # return_dict=False, the same bits
        assert torch.equal(r["decode_tuple"][0], res[0]["decode"][0])
        assert torch.equal(r["decode"][0], res[0]["decode"][0])     # the same bits everywhere
        # not shared, stock on every rank: one frame, an image batch, encode tiling
        assert r["one_frame"][1] == counts(encoded=1)
        assert r["image"][1] == counts() and "parallelize_pipe" not in r["image"][0]
        assert r["image"][0] == res[0]["image"][0]        # the stock error, the same everywhere
        tiles = (WAN_HW[0] // 16) * (WAN_HW[1] // 16)     # tiled_encode: the video per tile
        assert r["tiled_encode"][1] == counts(encoded=whole_frames * tiles)
        # tiled decode is shared (decode_clip mirrors tiled_decode): diffusers' bits
        assert r["tiled_decode"][1] == counts(decoded=mine_dec * tiles,
                                              decoded_full=mine_full * tiles)
        assert torch.equal(r["tiled_decode"][0], r["stock_tiled_decode"])
        assert r["sliced"][1] == counts(decoded=2 * mine_dec, decoded_full=2 * mine_full)
        assert rel_err(r["sliced"][0], r["stock_sliced"]) <= 1e-5
        # ranks that disagree: refused on every rank, before any frame is decoded
        for bad in ("other_data", "other_length"):
            msg = r[bad][0] if bad == "other_data" else r[bad]
            assert "ValueError" in msg and "unparallelize_pipe" in msg, msg
        assert r["other_data"][1] == counts()
        assert r["grad"] == (True, counts(decoded=4))
        assert r["offload"][1] == dec
        assert torch.equal(r["offload"][0], res[0]["decode"][0])
        # after unparallelize_pipe under a later wrapper: a pass-through to the stock decode
        assert r["after_undo"][1] == counts(decoded=n) and r["after_undo_wrapper_ran"]
        assert rel_err(r["after_undo"][0], r["stock32_decode"]) <= 1e-5
        assert r["encode_restored"]


def test_one_process_passes_through_and_unparallelize_restores():
    pipe = build(dict(pipe=("wan_i2v", "2.2")))
    vae = pipe.vae
    count = FrameCount(vae)
    vinf.parallelize_pipe(pipe, vinf.DualScopeConfig(window=1000, num_global=0, phase_bias=0.0))
    assert "encode" in vae.__dict__ and "decode" in vae.__dict__
    z = torch.randn(1, 16, 3, 4, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = vae.decode(z).sample
    vinf.unparallelize_pipe(pipe)
    assert "encode" not in vae.__dict__ and "decode" not in vae.__dict__
    with torch.no_grad():
        assert torch.equal(ours, vae.decode(z).sample)    # one rank: the stock call itself
    assert count.take() == counts(decoded=6)


def test_bench_runs(tmp_path):
    """bench/vae_share.py at tiny sizes, 2 ranks: counts before and after, the timed decode."""
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "vae_share.json"
    p = subprocess.run([sys.executable, os.path.join(root, "bench", "vae_share.py"), "--ranks", "2",
                        "--wan-frames", "9", "--t2v-frames", "4", "--decode-latents", "4",
                        "--latent", "4x4", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    report = json.loads(out.read_text())
    for name, ranks in report["counts"].items():
        assert len(ranks) == 2 and all(r["rel_diff"] <= 1e-5 for r in ranks), name
        assert sum(r["after"]["decoded"] for r in ranks) < 2 * ranks[0]["before"]["decoded"]
    row = report["decode"][0]
    assert row["rel_diff"] <= 1e-5 and sum(row["clip_sizes"]) == 4
    assert [r["decoded"] for r in row["ranks"]] == [row["clip_sizes"][0], 4]
