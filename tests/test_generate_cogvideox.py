"""vinf.generate over tiny random CogVideoX pipelines (2b's sin-cos positions, 5b's RoPE,
1.5's RoPE and pairs of latent frames) saved to disk and loaded back: diffusers'
CogVideoXPipeline as the oracle, the same video on 1, 2 and 3 real gloo ranks (one spawn),
the distributed VAE decode equal to the whole decode, the drop-in (parallelize_pipe) on 3
ranks, and bad input refused on every rank."""
import numpy as np
import pytest
import torch

import vinf_engine as vinf
from cogvideox_helpers import (DROPIN_FRAMES_15, PIPE_HW, cogvideox_generation_rank,
                               dropin_latents, fixed_latents, from_model,
                               save_tiny_cogvideox_pipeline, tiny_cogvideox_pipeline, to_model)
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
    return {v: save_tiny_cogvideox_pipeline(str(root / v), v) for v in ("2b", "5b", "1.5")}


def decoded(pipe, z):
    """The family's decode of the whole video's latents ``z`` on one rank."""
    return np.concatenate(list(CogVideoXPipelines().decode(
        pipe, z, vinf.ClipLayout(z.shape[2], 1), 0, vinf.ClipComm(), 4)))


@pytest.mark.parametrize("variant", ["2b", "5b", "1.5"])
def test_matches_the_cogvideox_pipeline(models, variant, tmp_path):
    # Exact mode on one rank is CogVideoXPipeline: the same latents from the same initial
    # noise (in its (B, F, C, h, w) layout), guidance and negative prompt. 1.5: 17 frames
    # are 5 latent frames, which the pipeline pads in front to 3 pairs (the engine's token
    # frames, (1, 2C, 3, h, w)) and trims before its decode.
    unit, n = (2, 17) if variant == "1.5" else (1, 9)
    pipe = load_pipeline(models[variant])
    kw = dict(negative_prompt="a dog", num_frames=n, steps=3, guidance_scale=4.0, seed=2, **HW)
    rep = vinf.generate(pipe, "the cat", config=EXACT, out=str(tmp_path / "v.mp4"),
                        progress=False, **kw)
    assert rep["model_kind"] == f"cogvideox-{variant}"
    assert rep["frames"] == n and rep["latent_frames"] == 3
    noise = vinf.initial_noise(2, (1, *rep["latents"].shape[1:]))
    call = dict(negative_prompt="a dog", num_frames=n, num_inference_steps=3, guidance_scale=4.0,
                latents=to_model(noise, unit), **HW)
    ref = from_model(pipe("the cat", output_type="latent", **call).frames, unit)
    assert rel_err(rep["latents"], ref) <= 1e-5
    assert rel_err(noise, ref) > 0.1                          # the steps did something
    video, meta = read_video(str(tmp_path / "v.mp4"))
    assert video.shape == (n, *PIPE_HW, 3)
    # bitwise: the family's decode makes CogVideoXPipeline.decode_latents' VAE calls on the
    # same shapes, and frames_to_uint8 its post-processing's float32 arithmetic
    stock = (pipe("the cat", output_type="np", **call).frames[0] * 255).round().astype(np.uint8)
    assert np.array_equal(decoded(pipe, ref), stock)


def invariant(pipe, one, res, key, folder):
    """The 3-rank and 2-rank runs ``res[i][key]`` of ``gen_helpers.invariance_rank`` give
    ``one``'s latents, (2, 2, 1) and (3, 2) token frames, and its video (videos in
    ``folder``); the stale comm mode is close but not equal."""
    runs = [r if key is None else r[key] for r in res]
    l3 = torch.cat([r[3] for r in runs], dim=2)
    l2 = torch.cat([r[2] for r in runs[:2]], dim=2)
    assert [r[3].shape[2] for r in runs] == [2, 2, 1]
    assert rel_err(l3, one["latents"]) <= 1e-5 and rel_err(l2, one["latents"]) <= 1e-5
    stale = torch.cat([r["stale"] for r in runs[:2]], dim=2)
    assert 1e-7 < rel_err(stale, one["latents"]) < 0.5, rel_err(stale, one["latents"])
    f1 = decoded(pipe, one["latents"])
    v1, _ = read_video(str(folder / "r1.mp4"))
    assert v1.shape == (one["frames"], *PIPE_HW, 3)
    for name, z in (("r2.mp4", l2), ("r3.mp4", l3)):
        fz = decoded(pipe, z)
        assert np.abs(fz.astype(int) - f1).max() <= 1, name
        assert_lossless_videos_agree(read_video(str(folder / name))[0], v1, fz, f1, name)


def test_same_video_on_1_2_and_3_ranks(models, tmp_path):
    # 5b (RoPE): a window and global frames across clips, 5 latent frames split (2, 2, 1) and
    # (3, 2), and the stale comm mode close but not equal. 1.5 in the same spawn: 33 frames
    # are 9 latent frames, padded in front to 5 pairs, split the same way.
    kw = dict(prompts="the cat", negative_prompt="a dog", num_frames=17, steps=2, seed=5,
              guidance_scale=4.0, config=DUAL, crf=0, **HW)
    kw15 = dict(kw, num_frames=33)
    (tmp_path / "v15").mkdir()
    bad = [("not 8k+1", dict(prompts="the cat", num_frames=13, steps=1, **HW)),
           ("two scenes", dict(prompts=[(0, "the cat"), (9, "a dog")], num_frames=17, steps=1,
                               **HW)),
           ("window past the trained range", dict(prompts="the cat", num_frames=17, steps=1,
                                                  config=dict(window=3), **HW)),
           ("fps", dict(prompts="the cat", num_frames=17, steps=1, fps=8, **HW)),
           ("height", dict(prompts="the cat", num_frames=17, steps=1, height=20, width=24)),
           ("1.5 not 8k+1", dict(model=models["1.5"], prompts="the cat", num_frames=21,
                                 steps=1, **HW)),
           ("1.5 fewer pairs than ranks", dict(model=models["1.5"], prompts="the cat",
                                               num_frames=9, steps=1, **HW))]
    res = run_ranks(cogvideox_generation_rank, 3, models["5b"], str(tmp_path), kw, bad,
                    (models["1.5"], str(tmp_path / "v15"), kw15), timeout=300)
    one = vinf.generate(models["5b"], out=str(tmp_path / "r1.mp4"), progress=False, **kw)
    pipe = load_pipeline(models["5b"])
    invariant(pipe, one, res, None, tmp_path)
    one15 = vinf.generate(models["1.5"], out=str(tmp_path / "v15" / "r1.mp4"), progress=False,
                          **kw15)
    assert one15["latents"].shape[1:3] == (8, 5)
    invariant(load_pipeline(models["1.5"]), one15, res, "1.5", tmp_path / "v15")

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
    stock15 = dropin_latents(tiny_cogvideox_pipeline("1.5"), DROPIN_FRAMES_15)
    assert stock15.shape[1] == 8                       # 7 latent frames and the pipeline's pad
    for r in res:
        assert rel_err(r["dropin"], stock) <= 1e-5
        assert rel_err(r["dropin", "1.5"], stock15) <= 1e-5

    expected = {"not 8k+1": "frames must be 8k+1 for CogVideoX",
                "two scenes": "CogVideoX takes one prompt per video",
                "window past the trained range": "window 3 reaches past the trained range",
                "fps": "--fps conditions VideoCrafter2 only",
                "height": "height 20 is not a multiple of 8",
                "1.5 not 8k+1": "frames must be 8k+1 for CogVideoX (4k+1 frames of an odd "
                                "number of latent frames: its VAE decodes them in pairs after "
                                "the first (1.5 pads them in front to whole pairs)), got 21 "
                                "(try 17 or 25)",
                "1.5 fewer pairs than ranks": "9 frames make 2 token frames (2 latent frames "
                                              "each), fewer than ranks (3)"}
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
