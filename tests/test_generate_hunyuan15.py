"""vinf.generate over a tiny random HunyuanVideo15Pipeline saved to disk and loaded back:
diffusers' HunyuanVideo15Pipeline as the oracle (latents, guidance, decoded frames), the CLI
on 2 real gloo ranks making the one-process video (an uneven split), the prefix decode equal
to the stock decode, the drop-in (parallelize_pipe) equal to the unpatched pipeline, and what
is refused. One spawn for the module."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import vinf_engine as vinf
from helpers import assert_lossless_videos_agree, rel_err, run_ranks
from hunyuan15_helpers import (GUIDANCE, PIPE_HW, dropin_latents, fixed_latents,
                               hunyuan15_generation_rank, save_tiny_hunyuan15_pipeline,
                               tiny_hunyuan15_pipeline)
from vinf_engine.pipelines import load_pipeline
from vinf_engine.pipelines.hunyuan_video15 import HunyuanVideo15Pipelines
from vinf_engine.video import frames_to_uint8, read_video

EXACT = dict(window=100, num_global=0, phase_bias=0.0)
HW = dict(height=PIPE_HW[0], width=PIPE_HW[1])
PROMPT = 'a sign saying "hi"'          # quoted words: the ByT5 glyph stream is not empty


@pytest.fixture(autouse=True)
def _one_thread(threads):
    """One intra-op thread: this box's two cores are shared."""
    yield


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_hunyuan15_pipeline(str(tmp_path_factory.mktemp("hunyuan15")))


def decoded(pipe, z):
    """The family's decode of the whole video's latents ``z`` on one rank."""
    return np.concatenate(list(HunyuanVideo15Pipelines().decode(
        pipe, z, vinf.ClipLayout(z.shape[2], 1), 0, vinf.ClipComm(), 4)))


def test_matches_the_hunyuan_video15_pipeline(model, tmp_path):
    # Exact config on one rank is HunyuanVideo15Pipeline: the same latents from the same
    # initial noise, Qwen and ByT5 text with their masks, guidance against the "" prompt.
    pipe = load_pipeline(model)
    assert pipe.guider.guidance_scale == GUIDANCE
    kw = dict(num_frames=9, steps=3, seed=2, guidance_scale=GUIDANCE, **HW)
    rep = vinf.generate(pipe, PROMPT, config=EXACT, out=str(tmp_path / "v.mp4"),
                        progress=False, **kw)
    assert rep["model_kind"] == "hunyuanvideo15"
    assert rep["frames"] == 9 and rep["latent_frames"] == 3
    noise = vinf.initial_noise(2, (1, *rep["latents"].shape[1:]))
    call = dict(num_frames=9, num_inference_steps=3, latents=noise, **HW)
    ref = pipe(PROMPT, output_type="latent", **call).frames
    assert rel_err(rep["latents"], ref) <= 1e-5
    assert rel_err(noise, ref) > 0.1                          # the steps did something
    # a negative prompt and the guidance scale reach the video, as the stock guider has them
    neg = vinf.generate(pipe, PROMPT, config=EXACT, negative_prompt="a dog", out=None,
                        progress=False, **kw)["latents"]
    assert rel_err(neg, pipe(PROMPT, negative_prompt="a dog", output_type="latent",
                             **call).frames) <= 1e-5
    assert rel_err(neg, ref) > 1e-4
    one = vinf.generate(pipe, PROMPT, config=EXACT, out=None, progress=False,
                        **dict(kw, guidance_scale=1.0))["latents"]
    pipe.guider.guidance_scale = 1.0
    assert rel_err(one, pipe(PROMPT, output_type="latent", **call).frames) <= 1e-5
    assert rel_err(one, ref) > 1e-4
    pipe.guider.guidance_scale = GUIDANCE
    video, _ = read_video(str(tmp_path / "v.mp4"))
    assert video.shape == (9, *PIPE_HW, 3)
    # bitwise: one rank's prefix is the whole video, one vae.decode call on the same shape
    stock = (pipe(PROMPT, output_type="np", **call).frames[0] * 255).round().astype(np.uint8)
    assert np.array_equal(decoded(pipe, ref), stock)
    # the default size is the pipeline's bucket of its target_size closest to 16:9
    rep = vinf.generate(pipe, PROMPT, num_frames=1, steps=1, out=None, progress=False)
    assert (rep["height"], rep["width"]) == pipe.video_processor.calculate_default_height_width(
        9, 16, pipe.target_size)

def test_the_cli_on_2_ranks_makes_one_video(model, tmp_path):
    # 17 frames = 5 latent frames split (3, 2): a window and global frames across the clips.
    argv = ["--prompt", PROMPT, "--frames", "17", "--height", str(PIPE_HW[0]), "--width",
            str(PIPE_HW[1]), "--steps", "2", "--seed", "5", "--guidance", "5", "--window", "1",
            "--num-global", "2", "--phase-t", "500", "--phase-bias", "2", "--crf", "0",
            "--quiet"]
    bad = [("not 4k+1", dict(prompts="the cat", num_frames=11, steps=1, **HW)),
           ("two scenes", dict(prompts=[(0, "the cat"), (9, "a dog")], num_frames=21, steps=1,
                               **HW)),
           ("window past the trained range", dict(prompts="the cat", num_frames=21, steps=1,
                                                  config=dict(window=3, trained_frames=3),
                                                  **HW)),
           ("height only", dict(prompts="the cat", num_frames=9, steps=1, height=32)),
           ("height", dict(prompts="the cat", num_frames=9, steps=1, height=40, width=48))]
    res = run_ranks(hunyuan15_generation_rank, 2, model, str(tmp_path), argv, bad, timeout=300)
    assert [r["cli"] for r in res] == [0, 0]
    two = torch.load(str(tmp_path / "r2.pt"))["latents"]
    one = vinf.generate(model, PROMPT, num_frames=17, steps=2, seed=5, guidance_scale=5.0,
                        config=dict(window=1, num_global=2, phase_t=500, phase_bias=2.0),
                        out=str(tmp_path / "r1.mp4"), crf=0, progress=False, **HW)["latents"]
    # other clip shapes than one process's: fp32 rounding (SPEC: 1e-5)
    assert rel_err(two, one) <= 1e-5
    pipe = load_pipeline(model)
    (v1, _), (v2, _) = (read_video(str(tmp_path / f"r{n}.mp4")) for n in (1, 2))
    assert v2.shape == (17, *PIPE_HW, 3)
    assert_lossless_videos_agree(v2, v1, decoded(pipe, two), decoded(pipe, one))

    # The ranks' clip decodes of fixed latents are vae.decode of the whole (other shapes and
    # the attention's per-frame sums: to rounding, tests/test_hunyuan15_vae.py).
    z = fixed_latents()
    with torch.no_grad():
        stock = pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample
    whole = frames_to_uint8(stock[0].permute(1, 0, 2, 3))
    parts = np.concatenate([a for r in res for a in r["decoded"]])
    assert parts.shape == (1 + 4 * 4, *PIPE_HW, 3)
    assert np.abs(parts.astype(int) - whole).max() <= 1

    # The drop-in: the stock HunyuanVideo15Pipeline call on 2 ranks is the unpatched pipeline
    # in exact config (other shapes: fp32 rounding); its VAE decode runs stock on each rank.
    ref = dropin_latents(tiny_hunyuan15_pipeline())
    for r in res:
        assert rel_err(r["dropin"], ref) <= 1e-5
        assert torch.equal(r["dropin_decode"], stock)

    expected = {"not 4k+1": "frames must be 4k+1 for HunyuanVideo 1.5",
                "two scenes": "HunyuanVideo 1.5 takes one prompt per video",
                "window past the trained range": "window 3 reaches past the trained range",
                "height only": "give both height and width",
                "height": "height 40 is not a multiple of 16"}
    for r in res:
        for name, needle in expected.items():
            assert r["bad", name] is not None and needle in r["bad", name], (name, r["bad", name])


def test_what_the_family_refuses(model, tmp_path):
    # image-to-video: the folder, the loaded pipeline in the drop-in
    other = str(tmp_path / "i2v")
    shutil.copytree(model, other)
    index = os.path.join(other, "model_index.json")
    with open(index) as f:
        mi = json.load(f)
    mi["_class_name"] = "HunyuanVideo15ImageToVideoPipeline"
    with open(index, "w") as f:
        json.dump(mi, f)
    with pytest.raises(vinf.GenerationError, match="image-to-video .* is not run"):
        vinf.generate(other, "the cat", num_frames=9, steps=1, out=None, progress=False, **HW)
    from diffusers import HunyuanVideo15ImageToVideoPipeline
    pipe = tiny_hunyuan15_pipeline()
    i2v = HunyuanVideo15ImageToVideoPipeline.__new__(HunyuanVideo15ImageToVideoPipeline)
    i2v.__dict__.update(pipe.__dict__)
    with pytest.raises(ValueError, match="HunyuanVideo15ImageToVideoPipeline"):
        vinf.parallelize_pipe(i2v)
    # a guider the family's guidance does not reproduce
    pipe.guider.register_to_config(guidance_rescale=0.7)
    with pytest.raises(vinf.GenerationError, match="rescales"):
        vinf.generate(pipe, "the cat", num_frames=9, steps=1, out=None, progress=False, **HW)
