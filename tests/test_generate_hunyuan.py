"""vinf.generate over a tiny random HunyuanVideoPipeline saved to disk and loaded back:
diffusers' HunyuanVideoPipeline as the oracle (latents and decoded frames), the same video
on 1 and 2 real gloo ranks, the distributed VAE decode equal to the stock decode, the
drop-in (parallelize_pipe) equal to the unpatched pipeline, the CLI, and what is refused."""
import numpy as np
import pytest
import torch

import vinf_engine as vinf
from helpers import rel_err, run_ranks
from hunyuan_helpers import (PIPE_HW, dropin_latents, fixed_latents, hunyuan_generation_rank,
                             save_tiny_hunyuan_pipeline, tiny_hunyuan_pipeline)
from vinf_engine.pipelines import load_pipeline
from vinf_engine.pipelines.hunyuan_video import HunyuanVideoPipelines
from vinf_engine.video import frames_to_uint8, read_video

EXACT = dict(window=100, num_global=0, phase_bias=0.0)
DUAL = dict(window=1, num_global=2, phase_t=500, phase_bias=2.0)
HW = dict(height=PIPE_HW[0], width=PIPE_HW[1])


@pytest.fixture(autouse=True)
def _one_thread(threads):
    """One intra-op thread: this box's two cores are shared."""
    yield


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_hunyuan_pipeline(str(tmp_path_factory.mktemp("hunyuan")))


def decoded(pipe, z):
    """The family's decode of the whole video's latents ``z`` on one rank."""
    return np.concatenate(list(HunyuanVideoPipelines().decode(
        pipe, z, vinf.ClipLayout(z.shape[2], 1), 0, vinf.ClipComm(), 4)))


def test_matches_the_hunyuan_video_pipeline(model, tmp_path):
    # Exact config on one rank is HunyuanVideoPipeline: the same latents from the same
    # initial noise, templated and masked Llama text, CLIP pooled text, embedded guidance.
    pipe = load_pipeline(model)
    kw = dict(num_frames=9, steps=3, guidance_scale=4.0, seed=2, **HW)
    rep = vinf.generate(pipe, "the cat", config=EXACT, out=str(tmp_path / "v.mp4"),
                        progress=False, **kw)
    assert rep["model_kind"] == "hunyuanvideo"
    assert rep["frames"] == 9 and rep["latent_frames"] == 3
    noise = vinf.initial_noise(2, (1, *rep["latents"].shape[1:]))
    call = dict(num_frames=9, num_inference_steps=3, guidance_scale=4.0, latents=noise, **HW)
    ref = pipe("the cat", output_type="latent", **call).frames
    assert rel_err(rep["latents"], ref) <= 1e-5
    assert rel_err(noise, ref) > 0.1                          # the steps did something
    other = pipe("the cat", output_type="latent", **dict(call, guidance_scale=1.0)).frames
    assert rel_err(other, ref) > 1e-4                         # the guidance embedding matters
    video, _ = read_video(str(tmp_path / "v.mp4"))
    assert video.shape == (9, *PIPE_HW, 3)
    # bitwise: the family's decode makes vae.decode's calls on the same shapes (3 latent
    # frames: one call), and frames_to_uint8 the stock post-processing's float32 arithmetic
    stock = (pipe("the cat", output_type="np", **call).frames[0] * 255).round().astype(np.uint8)
    assert np.array_equal(decoded(pipe, ref), stock)


def test_same_video_on_1_and_2_ranks(model, tmp_path):
    # 6 latent frames split (3, 3): a window and global frames across the clips; the decode
    # is the VAE's temporal tiles ([0,5) [3,6)), cut between the ranks.
    kw = dict(prompts="the cat", num_frames=21, steps=2, seed=5, guidance_scale=5.0,
              config=DUAL, crf=0, **HW)
    bad = [("not 4k+1", dict(prompts="the cat", num_frames=11, steps=1, **HW)),
           ("negative prompt", dict(prompts="the cat", negative_prompt="a dog", num_frames=9,
                                    steps=1, **HW)),
           ("two scenes", dict(prompts=[(0, "the cat"), (9, "a dog")], num_frames=21, steps=1,
                               **HW)),
           ("window past the trained range", dict(prompts="the cat", num_frames=21, steps=1,
                                                  config=dict(window=3, trained_frames=3),
                                                  **HW)),
           ("scheduler", dict(prompts="the cat", num_frames=9, steps=1, scheduler="ddim", **HW)),
           ("height", dict(prompts="the cat", num_frames=9, steps=1, height=40, width=48))]
    res = run_ranks(hunyuan_generation_rank, 2, model, str(tmp_path), kw, bad, timeout=300)
    one = vinf.generate(model, out=str(tmp_path / "r1.mp4"), progress=False, **kw)
    two = torch.cat([r["latents"] for r in res], dim=2)
    assert [r["latents"].shape[2] for r in res] == [3, 3]
    # other clip shapes than one process's: fp32 rounding (SPEC: 1e-5)
    assert rel_err(two, one["latents"]) <= 1e-5
    # stale: the halos and global frames of the step before (the text partials stay live)
    stale = torch.cat([r["stale"] for r in res], dim=2)
    assert 1e-7 < rel_err(stale, one["latents"]) < 0.5, rel_err(stale, one["latents"])
    pipe = load_pipeline(model)
    f1, f2 = decoded(pipe, one["latents"]), decoded(pipe, two)
    assert f1.shape == (21, *PIPE_HW, 3) and np.abs(f2.astype(int) - f1).max() <= 1
    v2, _ = read_video(str(tmp_path / "r2.mp4"))
    assert v2.shape == (21, *PIPE_HW, 3)

    # The distributed decode of fixed latents is vae.decode of the whole (bitwise: the same
    # tile calls on the same shapes and the same blends, after 1 / scaling_factor).
    z = fixed_latents()
    with torch.no_grad():
        stock = pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample
    whole = frames_to_uint8(stock[0].permute(1, 0, 2, 3))
    assert np.array_equal(decoded(pipe, z), whole)
    parts = np.concatenate([a for r in res for a in r["decoded"]])
    assert parts.shape == (1 + 4 * 7, *PIPE_HW, 3) and np.array_equal(parts, whole)
    assert res[1]["decode_bytes"] > 0                # rank 1's tiles read rank 0's frames

    # The drop-in: the stock HunyuanVideoPipeline call on 2 ranks is the unpatched pipeline
    # in exact config (other shapes: fp32 rounding).
    ref = dropin_latents(tiny_hunyuan_pipeline())
    for r in res:
        assert rel_err(r["dropin"], ref) <= 1e-5
    # Its vae.decode of a video: each rank decodes its half's tiles and gathers the frames,
    # bitwise the stock decode (the same tile calls on the same shapes).
    assert [r["dropin_clips"] for r in res] == [[range(0, 4)], [range(4, 8)]]
    for r in res:
        assert torch.equal(r["dropin_decode"], stock)

    expected = {"not 4k+1": "frames must be 4k+1 for HunyuanVideo",
                "negative prompt": "true classifier-free guidance with a negative prompt",
                "two scenes": "HunyuanVideo takes one prompt per video",
                "window past the trained range": "window 3 reaches past the trained range",
                "scheduler": "unknown scheduler 'ddim'",
                "height": "height 40 is not a multiple of 16"}
    for r in res:
        for name, needle in expected.items():
            assert r["bad", name] is not None and needle in r["bad", name], (name, r["bad", name])


def test_the_cli(model, tmp_path):
    from vinf_engine.cli import main
    out = str(tmp_path / "cli.mp4")
    code = main(["generate", "--model", model, "--prompt", "the cat", "--frames", "9",
                 "--height", str(PIPE_HW[0]), "--width", str(PIPE_HW[1]), "--steps", "1",
                 "--out", out, "--quiet"])
    assert code == 0
    video, _ = read_video(out)
    assert video.shape == (9, *PIPE_HW, 3)
    assert main(["generate", "--model", model, "--prompt", "the cat", "--frames", "10",
                 "--out", str(tmp_path / "bad.mp4"), "--quiet"]) == 2


def test_other_hunyuan_pipelines_are_refused(model, tmp_path):
    import json
    import os
    import shutil
    other = str(tmp_path / "i2v")
    shutil.copytree(model, other)
    index = os.path.join(other, "model_index.json")
    with open(index) as f:
        mi = json.load(f)
    mi["_class_name"] = "HunyuanVideoImageToVideoPipeline"
    with open(index, "w") as f:
        json.dump(mi, f)
    with pytest.raises(vinf.GenerationError, match="image-to-video is not run"):
        vinf.generate(other, "the cat", num_frames=9, steps=1, out=None, progress=False, **HW)
    pipe = tiny_hunyuan_pipeline()
    pipe.transformer.register_to_config(image_condition_type="latent_concat")
    with pytest.raises(ValueError, match="image-to-video"):
        vinf.parallelize_pipe(pipe)
