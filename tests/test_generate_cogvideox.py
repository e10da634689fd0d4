"""vinf.generate over tiny random CogVideoX pipelines (2b's sin-cos positions, 5b's RoPE)
saved to disk and loaded back: diffusers' CogVideoXPipeline as the oracle, the same video on
1, 2 and 3 real gloo ranks (one spawn), the distributed VAE decode equal to the whole
decode, the drop-in (parallelize_pipe) on 3 ranks, and bad input refused on every rank."""
import numpy as np
import pytest
import torch

import vinf_engine as vinf
from cogvideox_helpers import (PIPE_HW, cogvideox_generation_rank, dropin_latents,
                               fixed_latents, save_tiny_cogvideox_pipeline,
                               tiny_cogvideox_pipeline)
from helpers import assert_lossless_videos_agree, rel_err, run_ranks
from vinf_engine.pipelines import load_pipeline
from vinf_engine.pipelines.cogvideox import CogVideoXPipelines
from vinf_engine.video import frames_to_uint8, read_video

EXACT = dict(window=100, num_global=0, phase_bias=0.0)
DUAL = dict(window=1, num_global=2, phase_t=500, phase_bias=2.0)
HW = dict(height=PIPE_HW[0], width=PIPE_HW[1])


@pytest.fixture(autouse=True)
def _one_thread(threads):
    """One intra-op thread: this box's two cores are shared."""
    yield


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cogvideox")
    return {v: save_tiny_cogvideox_pipeline(str(root / v), v) for v in ("2b", "5b")}


def decoded(pipe, z):
    """The family's decode of the whole video's latents ``z`` on one rank."""
    return np.concatenate(list(CogVideoXPipelines().decode(
        pipe, z, vinf.ClipLayout(z.shape[2], 1), 0, vinf.ClipComm(), 4)))


@pytest.mark.parametrize("variant", ["2b", "5b"])
def test_matches_the_cogvideox_pipeline(models, variant, tmp_path):
    # Exact mode on one rank is CogVideoXPipeline: the same latents from the same initial
    # noise (in its (B, F, C, h, w) layout), guidance and negative prompt.
    pipe = load_pipeline(models[variant])
    kw = dict(negative_prompt="a dog", num_frames=9, steps=3, guidance_scale=4.0, seed=2, **HW)
    rep = vinf.generate(pipe, "the cat", config=EXACT, out=str(tmp_path / "v.mp4"),
                        progress=False, **kw)
    assert rep["model_kind"] == f"cogvideox-{variant}"
    assert rep["frames"] == 9 and rep["latent_frames"] == 3
    noise = vinf.initial_noise(2, (1, *rep["latents"].shape[1:]))
    call = dict(negative_prompt="a dog", num_frames=9, num_inference_steps=3, guidance_scale=4.0,
                latents=noise.transpose(1, 2), **HW)
    ref = pipe("the cat", output_type="latent", **call).frames.transpose(1, 2)
    assert rel_err(rep["latents"], ref) <= 1e-5
    assert rel_err(noise, ref) > 0.1                          # the steps did something
    video, meta = read_video(str(tmp_path / "v.mp4"))
    assert video.shape == (9, *PIPE_HW, 3)
    # bitwise: the family's decode makes CogVideoXPipeline.decode_latents' VAE calls on the
    # same shapes, and frames_to_uint8 its post-processing's float32 arithmetic
    stock = (pipe("the cat", output_type="np", **call).frames[0] * 255).round().astype(np.uint8)
    assert np.array_equal(decoded(pipe, ref), stock)


def test_same_video_on_1_2_and_3_ranks(models, tmp_path):
    # 5b (RoPE): a window and global frames across clips, 5 latent frames split (2, 2, 1) and
    # (3, 2), and the stale comm mode close but not equal.
    kw = dict(prompts="the cat", negative_prompt="a dog", num_frames=17, steps=2, seed=5,
              guidance_scale=4.0, config=DUAL, crf=0, **HW)
    bad = [("not 8k+1", dict(prompts="the cat", num_frames=13, steps=1, **HW)),
           ("two scenes", dict(prompts=[(0, "the cat"), (9, "a dog")], num_frames=17, steps=1,
                               **HW)),
           ("window past the trained range", dict(prompts="the cat", num_frames=17, steps=1,
                                                  config=dict(window=3), **HW)),
           ("fps", dict(prompts="the cat", num_frames=17, steps=1, fps=8, **HW)),
           ("height", dict(prompts="the cat", num_frames=17, steps=1, height=20, width=24))]
    res = run_ranks(cogvideox_generation_rank, 3, models["5b"], str(tmp_path), kw, bad,
                    timeout=300)
    one = vinf.generate(models["5b"], out=str(tmp_path / "r1.mp4"), progress=False, **kw)
    l3 = torch.cat([r[3] for r in res], dim=2)
    l2 = torch.cat([r[2] for r in res[:2]], dim=2)
    assert [r[3].shape[2] for r in res] == [2, 2, 1]
    assert rel_err(l3, one["latents"]) <= 1e-5 and rel_err(l2, one["latents"]) <= 1e-5
    stale = torch.cat([r["stale"] for r in res[:2]], dim=2)
    assert 1e-7 < rel_err(stale, one["latents"]) < 0.5, rel_err(stale, one["latents"])
    pipe = load_pipeline(models["5b"])
    f1 = decoded(pipe, one["latents"])
    v1, _ = read_video(str(tmp_path / "r1.mp4"))
    assert v1.shape == (17, *PIPE_HW, 3)
    for name, z in (("r2.mp4", l2), ("r3.mp4", l3)):
        fz = decoded(pipe, z)
        assert np.abs(fz.astype(int) - f1).max() <= 1, name
        assert_lossless_videos_agree(read_video(str(tmp_path / name))[0], v1, fz, f1, name)

    # The distributed decode of fixed latents is the whole decode, bit for bit (every rank's
    # decoder runs diffusers' chunks on the same shapes with the same caches), and that is
    # diffusers' own decode (the same calls, after decode_latents' 1 / scaling_factor * z).
    z = fixed_latents()
    whole = decoded(pipe, z)
    with torch.no_grad():
        stock = pipe.vae.decode(1 / pipe.vae.config.scaling_factor * z).sample
    assert np.array_equal(whole, frames_to_uint8(stock[0].permute(1, 0, 2, 3)))
    parts = np.concatenate([a for r in res for a in r["decoded"]])
    assert parts.shape == (1 + 4 * 10, *PIPE_HW, 3) and np.array_equal(parts, whole)
    assert res[2]["decode_bytes"] > 0

    # The drop-in: the stock CogVideoXPipeline call on 3 ranks (one latent frame each, the
    # transformer's (B, F, C, h, w) split on dim 1) is the unpatched pipeline, in exact config.
    stock = dropin_latents(tiny_cogvideox_pipeline("5b"))
    for r in res:
        assert rel_err(r["dropin"], stock) <= 1e-5

    expected = {"not 8k+1": "frames must be 8k+1 for CogVideoX",
                "two scenes": "CogVideoX takes one prompt per video",
                "window past the trained range": "window 3 reaches past the trained range",
                "fps": "--fps conditions VideoCrafter2 only",
                "height": "height 20 is not a multiple of 8"}
    for r in res:
        for name, needle in expected.items():
            assert r["bad", name] is not None and needle in r["bad", name], (name, r["bad", name])


def test_unsupported_pipelines_are_refused(models):
    from diffusers import CogVideoXDPMScheduler
    pipe = load_pipeline(models["2b"])
    pipe.scheduler = CogVideoXDPMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(vinf.GenerationError, match="CogVideoXDPMScheduler.*use scheduler 'ddim'"):
        vinf.generate(pipe, "the cat", num_frames=9, steps=1, out=None, progress=False, **HW)
    rep = vinf.generate(pipe, "the cat", num_frames=9, steps=1, out=None, progress=False,
                        scheduler="ddim", **HW)
    assert rep["latent_frames"] == 3
