"""vinf.generate over tiny random Wan pipelines saved to disk and loaded back: diffusers'
WanPipeline as the oracle (Wan 2.1, the two-expert Wan 2.2 A14B layout, TI2V-5B's per-token
timesteps and 48-channel VAE), the same video on 1, 2 and 3 real gloo ranks, the distributed
causal VAE decode equal to the whole decode, resume, the CLI, and bad input refused."""
import os

import numpy as np
import pytest
import torch

import vinf_engine as vinf
from helpers import assert_lossless_videos_agree, rel_err, run_ranks
from vinf_engine.pipelines import load_pipeline
from vinf_engine.video import frames_to_uint8, read_video
from wan_helpers import WAN_HW, save_tiny_wan_pipeline, wan_generation_rank

EXACT = dict(window=100, num_global=0, phase_bias=0.0)


def assert_decoded_like_diffusers(ours, stock):
    """The engine's decode (post_quant_conv per latent frame) against diffusers' (over the
    whole latent at once), in uint8: their floats differ by that convolution's fp32 rounding
    carried through the decoder (~1e-6), which moves a value by a level only where it falls
    within that of a rounding boundary."""
    d = np.abs(ours.astype(int) - stock.astype(int))
    assert ours.shape == stock.shape and d.max() <= 1 and (d > 0).mean() <= 1e-3, (
        d.max(), (d > 0).mean())
DUAL = dict(window=2, num_global=2, phase_t=500, phase_bias=2.0)
HW = dict(height=WAN_HW[0], width=WAN_HW[1])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    return {v: save_tiny_wan_pipeline(str(root / v), v) for v in ("2.1", "2.2", "ti2v")}


@pytest.mark.parametrize("variant", ["2.1", "2.2", "ti2v"])
def test_matches_the_wan_pipeline(models, variant, tmp_path):
    # Exact mode on one rank is WanPipeline: the same latents from the same initial noise,
    # guidance and negative prompt; the mp4 holds the pipeline's decoded frames, in order.
    pipe = load_pipeline(models[variant])
    kw = dict(negative_prompt="a dog", num_frames=9, steps=3, guidance_scale=4.0, seed=2, **HW)
    rep = vinf.generate(pipe, "the cat", config=EXACT, out=str(tmp_path / "v.mp4"),
                        progress=False, **kw)
    assert rep["model_kind"] == {"2.1": "wan2.1", "2.2": "wan2.2-a14b", "ti2v": "wan2.2-ti2v"}[variant]
    assert rep["frames"] == 9 and rep["latent_frames"] == 3
    noise = vinf.initial_noise(2, (1, *rep["latents"].shape[1:]))
    call = dict(negative_prompt="a dog", num_frames=9, num_inference_steps=3, guidance_scale=4.0,
                latents=noise, **HW)
    ref = pipe("the cat", output_type="latent", **call).frames
    assert rel_err(rep["latents"], ref) <= 1e-5
    assert rel_err(noise, ref) > 0.1                          # the steps did something
    video, meta = read_video(str(tmp_path / "v.mp4"))
    assert video.shape == (9, *WAN_HW, 3) and meta["size"] == (WAN_HW[1], WAN_HW[0])
    # The family's decode of the pipeline's latents is the pipeline's own decoded video.
    from vinf_engine.pipelines.wan import WanPipelines
    expected = (pipe("the cat", output_type="np", **call).frames[0] * 255).round().astype(np.uint8)
    ours = np.concatenate(list(WanPipelines().decode(pipe, ref, vinf.ClipLayout(3, 1), 0,
                                                     vinf.ClipComm(), 2)))
    assert_decoded_like_diffusers(ours, expected)
    # The mp4 holds them, in order (H.264 with 4:2:0 chroma is far from lossless on these
    # random-weight frames: 6-20 levels on average).
    err = lambda a: np.abs(video.astype(int) - a).mean()          # noqa: E731
    assert err(expected) < 0.8 * err(expected[::-1])


def test_the_experts_switch_on_the_global_timestep(models):
    # Wan 2.2 A14B: transformer above boundary_ratio * 1000, transformer_2 below it; both are
    # parallelized, and both run in a 3-step schedule (999, 857, 600 at flow shift 3).
    pipe = load_pipeline(models["2.2"])
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m_, a, k, i=i: seen.append(
        (i, getattr(m_, "vinf_engine", None) is not None)), with_kwargs=True)
        for i, m in enumerate((pipe.transformer, pipe.transformer_2))]
    vinf.generate(pipe, "the cat", num_frames=5, steps=3, out=None, save_latents=None,
                  progress=False, **HW)
    for h in hooks:
        h.remove()
    assert {i for i, _ in seen} == {0, 1} and all(p for _, p in seen)
    assert seen[0][0] == 0 and seen[-1][0] == 1


def test_same_video_on_1_2_and_3_ranks(models, tmp_path, threads):
    # Wan 2.2's two experts, DPM-Solver++ (SDE): noise at every step, two scenes (latent
    # frames 0 and 3), a window and global frames across clips, 5 latent frames split (2, 2, 1)
    # and (3, 2). This process runs at the ranks' one thread (``threads``): on this tiny VAE
    # the CPU's kernels at 1 and at 2 threads decode the same latents up to 6 levels apart,
    # so frames compared here are decoded at the thread count of the run that wrote them.
    kw = dict(prompts=[(0, "the cat"), (9, "a dog on the rock")], num_frames=17, steps=3, seed=5,
              guidance_scale=4.0, config=DUAL, scheduler="dpm++sde", crf=0, **HW)
    bad = [("not 4k+1", dict(prompts="the cat", num_frames=10, steps=1, **HW)),
           ("fewer latent frames than ranks", dict(prompts="the cat", num_frames=5, steps=1, **HW)),
           ("window past the trained range", dict(prompts="the cat", num_frames=17, steps=1,
                                                  config=dict(window=4, trained_frames=3), **HW)),
           ("blocking", dict(prompts="the cat", num_frames=17, steps=1, comm_mode="blocking", **HW)),
           ("scenes in one latent frame", dict(prompts=[(0, "the cat"), (5, "a dog"), (6, "a cat")],
                                               num_frames=17, steps=1, **HW)),
           ("fps", dict(prompts="the cat", num_frames=17, steps=1, fps=8, **HW))]
    res = run_ranks(wan_generation_rank, 3, models["2.2"], str(tmp_path), kw, bad, timeout=300)
    one = vinf.generate(models["2.2"], out=str(tmp_path / "r1.mp4"), progress=False, **kw)
    l3 = torch.cat([r[3] for r in res], dim=2)
    l2 = torch.cat([r[2] for r in res[:2]], dim=2)
    assert [r[3].shape[2] for r in res] == [2, 2, 1]
    assert rel_err(l3, one["latents"]) <= 1e-5 and rel_err(l2, one["latents"]) <= 1e-5
    stale = torch.cat([r["stale"] for r in res[:2]], dim=2)
    assert 1e-7 < rel_err(stale, one["latents"]) < 0.2, rel_err(stale, one["latents"])
    assert torch.equal(torch.load(tmp_path / "r3.pt")["latents"], l3)   # the same tensors, saved
    # The mp4s (lossless) differ only as far as the decoded frames do, which the latents' 1e-5
    # makes a level at most in a few values.
    from vinf_engine.pipelines.wan import WanPipelines
    pipe = load_pipeline(models["2.2"])

    def frames(z):
        return np.concatenate(list(WanPipelines().decode(pipe, z, vinf.ClipLayout(5, 1), 0,
                                                         vinf.ClipComm(), 5)))
    f1 = frames(one["latents"])
    v1, _ = read_video(str(tmp_path / "r1.mp4"))
    assert v1.shape == (17, *WAN_HW, 3)
    for name, z in (("r2.mp4", l2), ("r3.mp4", l3)):
        fz = frames(z)
        assert np.abs(fz.astype(int) - f1).max() <= 1, name
        assert_lossless_videos_agree(read_video(str(tmp_path / name))[0], v1, fz, f1, name)
    # The scenes matter: one prompt gives another video.
    single = vinf.generate(models["2.2"], out=None, progress=False, **dict(kw, prompts="the cat"))
    assert rel_err(single["latents"][:, :, 3:], one["latents"][:, :, 3:]) > 1e-3
    report = res[0]["report", 3]
    assert report["latent_frames"] == 5 and report["frames"] == 17
    assert report["comm_total"]["bytes_sent"] > 0

    # The distributed causal decode of fixed latents (12 latent frames on 3 ranks: rank 2's
    # warm-up comes from ranks 0 and 1) is the whole decode, bit for bit.
    z = torch.randn(1, 16, 12, 4, 8, generator=torch.Generator().manual_seed(9))
    whole = list(WanPipelines().decode(pipe, z, vinf.ClipLayout(12, 1), 0, vinf.ClipComm(), 12))
    whole = np.concatenate(whole)
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        stock = vae.decode(z / (1.0 / std) + mean).sample
    assert_decoded_like_diffusers(whole, frames_to_uint8(stock[0].permute(1, 0, 2, 3)))
    parts = np.concatenate([a for r in res for a in r["decoded"]])
    # bitwise: every rank's decoder runs the same shapes in the same order as the whole's
    assert parts.shape == (45, *WAN_HW, 3) and np.array_equal(parts, whole)
    assert res[2]["decode_bytes"] > 0

    expected = {"not 4k+1": "frames must be 4k+1 for Wan",
                "fewer latent frames than ranks": "5 frames make 2 latent frames, fewer than ranks (3)",
                "window past the trained range": "window 4 reaches past the trained range: the model "
                                                 "was trained on 3 latent frames",
                "blocking": "comm mode 'blocking' is not available for Wan",
                "scenes in one latent frame": "share latent frames",
                "fps": "--fps conditions VideoCrafter2 only"}
    for r in res:
        for name, needle in expected.items():
            assert r["bad", name] is not None and needle in r["bad", name], (name, r["bad", name])


def test_resume_gives_the_uninterrupted_video(models, tmp_path):
    from vinf_engine.pipeline import GenerationFailed
    pipe = load_pipeline(models["ti2v"])
    kw = dict(num_frames=9, steps=4, seed=3, guidance_scale=4.0, config=DUAL, progress=False, **HW)
    full = vinf.generate(pipe, "the cat", out=None, save_latents=str(tmp_path / "full.pt"), **kw)
    ck = tmp_path / "ck"

    def crash(step, t, latents):
        if step == 2:
            raise RuntimeError("simulated crash")

    with pytest.raises(GenerationFailed, match="simulated crash"):
        vinf.generate(pipe, "the cat", out=None, save_latents=str(tmp_path / "r.pt"),
                      checkpoint_dir=str(ck), checkpoint_every=1, callback=crash, **kw)
    rep = vinf.generate(pipe, "the cat", out=None, save_latents=str(tmp_path / "r.pt"),
                        checkpoint_dir=str(ck), checkpoint_every=1, resume=True, **kw)
    # bitwise: a resumed run repeats the uninterrupted one's operations on the same shapes
    assert rep["resumed_from_step"] == 3 and torch.equal(rep["latents"], full["latents"])


def test_the_cli_runs_wan(models, tmp_path, capsys):
    import json
    from vinf_engine.cli import main
    out = tmp_path / "w.mp4"
    argv = ["generate", "--quiet", "--model", models["2.1"], "--prompt", "a red panda",
            "--frames", "9", "--height", str(WAN_HW[0]), "--width", str(WAN_HW[1]),
            "--steps", "2", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model_kind"] == "wan2.1" and report["config"]["window"] == 8
    assert report["config"]["num_global"] == 8 and report["steps"] == 2
    assert report["guidance_scale"] == 5.0                   # WanPipeline's default
    assert read_video(str(out))[0].shape == (9, *WAN_HW, 3)
    assert main(argv[:-1] + [str(tmp_path / "x.mp4"), "--frames", "8"]) == 2
    assert "frames must be 4k+1 for Wan" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.mp4")


def test_a_pipeline_whose_parts_disagree_is_refused(models):
    from transformers import UMT5Config, UMT5EncoderModel
    pipe = load_pipeline(models["2.1"])
    pipe.text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=200, d_model=24, d_kv=8, d_ff=16,
                                                    num_layers=1, num_heads=2))
    with pytest.raises(vinf.GenerationError, match="text encoder's width 24 does not match the "
                                                   "transformer's text width 16"):
        vinf.generate(pipe, "the cat", num_frames=9, steps=1, out=None, progress=False, **HW)
