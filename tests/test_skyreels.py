"""SkyReels-V2 on Wan's family: the transformer in exact mode equals the stock model, the same
output on 1, 2 and 3 real gloo ranks (uneven clips), ``vinf.generate`` from a saved
SkyReelsV2Pipeline or SkyReelsV2ImageToVideoPipeline folder equals the stock pipeline and is
the same on 1 and 2 ranks, and what the engine cannot run (the causal block mask, diffusion
forcing, images on text-to-video) is refused with its reason."""
import os

import pytest
import torch

import vinf_engine as vinf
from helpers import rel_err, run_ranks
from wan_helpers import wan_image
from skyreels_helpers import (SKY_HW, drop_in_latents, save_tiny_skyreels_pipeline,
                              skyreels_inputs, skyreels_model_rank, skyreels_ranks_job,
                              tiny_skyreels_pipeline, tiny_skyreels_transformer)
from vinf_engine.pipelines import load_pipeline

FRAMES = 11
EXACT = dict(window=1000, num_global=0, phase_bias=0.0)
DUAL = dict(window=2, num_global=2, phase_t=500, phase_bias=2.0)
HW = dict(height=SKY_HW[0], width=SKY_HW[1])
GEN = dict(prompts="the cat", negative_prompt="a dog", num_frames=17, steps=2, seed=3,
           guidance_scale=4.0, config=DUAL, **HW)
GEN_I2V = dict(GEN, images=[(0, wan_image(5, SKY_HW)), (12, wan_image(6, SKY_HW))])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_skyreels_pipeline(str(tmp_path_factory.mktemp("sky")))


@pytest.fixture(scope="module")
def i2v_folder(tmp_path_factory):
    from skyreels_helpers import tiny_skyreels_i2v_pipeline
    path = str(tmp_path_factory.mktemp("sky_i2v") / "model")
    tiny_skyreels_i2v_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def one_rank():
    return skyreels_model_rank(0, 1, (FRAMES,), FRAMES, 900.0, EXACT, DUAL)


def _stock(model, x, text, t, **kw):
    with torch.no_grad():
        return model(x, torch.full((x.shape[0],), t), text, return_dict=False, **kw)[0]


@pytest.mark.parametrize("fps", [False, True])
def test_exact_mode_equals_the_stock_model(fps):
    # inject_sample_info: the fps embedding acts per sample, so it parallelizes as it is.
    over = dict(inject_sample_info=True) if fps else {}
    kw = dict(fps=[0, 1]) if fps else {}
    x, text = skyreels_inputs(FRAMES)
    model = tiny_skyreels_transformer(**over)
    ref = _stock(model, x, text, 900.0, **kw)
    vinf.parallelize(model, vinf.DualScopeConfig(**EXACT))
    assert type(model.blocks[0].attn1.processor).__name__ == "WanDualScopeProcessor"
    assert rel_err(_stock(model, x, text, 900.0, **kw), ref) <= 1e-5
    vinf.unparallelize(model)
    vinf.parallelize(model, vinf.DualScopeConfig(**DUAL))
    assert rel_err(_stock(model, x, text, 900.0, **kw), ref) > 1e-3     # dual scope is not it
    vinf.unparallelize(model)
    # unpatched: the stock model again, the same operations on the same shapes (bitwise)
    assert torch.equal(_stock(model, x, text, 900.0, **kw), ref)


@pytest.fixture(scope="module")
def spawned(folder, i2v_folder):
    return run_ranks(skyreels_ranks_job, 3, FRAMES, 900.0, EXACT, DUAL, folder, GEN,
                     (i2v_folder, GEN_I2V), timeout=300)


def test_same_output_on_1_2_and_3_ranks(one_rank, folder, i2v_folder, spawned):
    res = spawned
    for world in (2, 3):
        for name in ("exact", "dual"):
            out = torch.cat([r[world][name] for r in res[:world]], dim=2)
            assert rel_err(out, one_rank[name]) <= 1e-5, (name, world, rel_err(out, one_rank[name]))
    # vinf.generate: one rank's latents against two ranks' (5 latent frames split 3, 2).
    gen_one = vinf.generate(folder, out=None, save_latents=None, progress=False, **GEN)
    gen_two = torch.cat([r["gen"] for r in res[:2]], dim=2)
    assert [r["gen"].shape[2] for r in res[:2]] == [3, 2]
    assert rel_err(gen_two, gen_one["latents"]) <= 1e-5
    assert rel_err(gen_one["latents"], vinf.initial_noise(3, gen_one["latents"].shape)) > 0.1
    # Image-to-video, an image at frame 0 and one at frame 12 (latent frame 3: rank 1's first).
    i2v_one = vinf.generate(i2v_folder, out=None, save_latents=None, progress=False, **GEN_I2V)
    i2v_two = torch.cat([r["i2v"] for r in res[:2]], dim=2)
    assert rel_err(i2v_two, i2v_one["latents"]) <= 1e-5


def test_the_drop_in_on_1_and_2_ranks(folder, spawned):
    # parallelize_pipe: in exact config the unpatched pipeline; in a dual-scope config every
    # rank of two returns the whole video, the same as one process.
    stock = drop_in_latents(folder, None)
    assert rel_err(drop_in_latents(folder, EXACT), stock) <= 1e-5
    one = drop_in_latents(folder, DUAL)
    assert rel_err(one, stock) > 1e-3                                 # dual scope is not it
    for r in spawned[:2]:
        assert r["pipe"].shape == one.shape and rel_err(r["pipe"], one) <= 1e-5


def test_generate_matches_the_skyreels_pipeline(folder):
    # Exact mode on one rank is SkyReelsV2Pipeline: the same latents from the same initial
    # noise, guidance and negative prompt (the engine batches the guided pair, the pipeline
    # runs two calls: a tolerance).
    pipe = load_pipeline(folder)
    assert type(pipe).__name__ == "SkyReelsV2Pipeline"
    rep = vinf.generate(pipe, "the cat", negative_prompt="a dog", num_frames=9, steps=3,
                        guidance_scale=4.0, seed=2, config=EXACT, out=None, save_latents=None,
                        progress=False, **HW)
    assert rep["model_kind"] == "skyreels-v2" and rep["latent_frames"] == 3
    noise = vinf.initial_noise(2, (1, *rep["latents"].shape[1:]))
    ref = pipe("the cat", negative_prompt="a dog", num_frames=9, num_inference_steps=3,
               guidance_scale=4.0, latents=noise, output_type="latent", **HW).frames
    assert rel_err(rep["latents"], ref) <= 1e-5
    assert rel_err(noise, ref) > 0.1                                  # the steps did something


def test_the_cli_generates_from_a_folder(folder, tmp_path):
    from vinf_engine.cli import main
    out = str(tmp_path / "v.mp4")
    rc = main(["generate", "--model", folder, "--prompt", "the cat", "--frames", "9",
               "--steps", "1", "--height", str(SKY_HW[0]), "--width", str(SKY_HW[1]),
               "--out", out, "--quiet"])
    assert rc == 0 and os.path.getsize(out) > 0


def test_the_causal_block_mask_is_refused():
    model = tiny_skyreels_transformer(num_frame_per_block=2)
    with pytest.raises(ValueError, match="causal block mask.*num_frame_per_block"):
        vinf.parallelize(model)
    # Set after parallelize (what the diffusion-forcing pipelines do): refused at the call.
    model = tiny_skyreels_transformer()
    vinf.parallelize(model, vinf.DualScopeConfig(**EXACT))
    model._set_ar_attention(2)
    x, text = skyreels_inputs(4)
    with pytest.raises(ValueError, match="causal block mask"):
        _stock(model, x, text, 900.0)


def test_diffusion_forcing_timesteps_are_refused():
    model = tiny_skyreels_transformer()
    vinf.parallelize(model, vinf.DualScopeConfig(**EXACT))
    x, text = skyreels_inputs(4)
    with pytest.raises(ValueError, match="diffusion forcing .*a timestep per latent frame"):
        with torch.no_grad():
            model(x, torch.full((2, 4), 900.0), text, enable_diffusion_forcing=True)


def test_the_diffusion_forcing_pipeline_is_refused(tmp_path):
    from diffusers import SkyReelsV2DiffusionForcingPipeline
    stock = tiny_skyreels_pipeline()
    df = SkyReelsV2DiffusionForcingPipeline(**stock.components)
    df.save_pretrained(str(tmp_path / "df"))
    with pytest.raises(vinf.GenerationError, match="diffusion forcing: it denoises the video "
                                                   "chunk by chunk"):
        vinf.generate(str(tmp_path / "df"), "the cat", num_frames=9, steps=1, out=None, **HW)
    # Loaded in memory and given to generate: the family refuses it before any step.
    with pytest.raises(vinf.GenerationError, match="SkyReelsV2DiffusionForcingPipeline is "
                                                   "diffusion forcing"):
        vinf.generate(df, "the cat", num_frames=9, steps=1, out=None, progress=False, **HW)
    # Under the drop-in, its transformer refuses the per-frame timesteps at the first call.
    vinf.parallelize_pipe(df, vinf.DualScopeConfig(**EXACT))
    with pytest.raises(ValueError, match="called with diffusion forcing"):
        df("the cat", num_frames=9, num_inference_steps=1, output_type="latent", **HW)


def test_an_image_is_refused_on_text_to_video(folder):
    with pytest.raises(vinf.GenerationError, match="SkyReels-V2 text-to-video takes no image"):
        vinf.generate(folder, "the cat", images=wan_image(), num_frames=9, steps=1, out=None,
                      progress=False, **HW)


def test_image_to_video_equals_the_skyreels_pipeline(i2v_folder):
    # Exact config on one rank, from a saved folder: SkyReelsV2ImageToVideoPipeline from the
    # same initial noise (mask and condition channels, CLIP tokens of the image).
    from PIL import Image
    from wan_helpers import wan_image
    pipe = load_pipeline(i2v_folder)
    assert type(pipe).__name__ == "SkyReelsV2ImageToVideoPipeline"
    img = wan_image(5, SKY_HW)
    kw = dict(num_frames=9, guidance_scale=4.0, negative_prompt="a dog", **HW)
    rep = vinf.generate(pipe, "the cat", config=EXACT, images=img, out=None, steps=2, seed=2,
                        progress=False, **kw)
    assert rep["model_kind"] == "skyreels-v2-i2v"
    noise = vinf.initial_noise(2, (1, *rep["latents"].shape[1:]))
    ref = pipe(image=img, prompt="the cat", num_inference_steps=2, latents=noise,
               output_type="latent", **kw).frames
    assert rel_err(rep["latents"], ref) <= 1e-5
    other = vinf.generate(pipe, "the cat", config=EXACT, out=None, steps=2, seed=2,
                          progress=False, images=img.transpose(Image.FLIP_LEFT_RIGHT), **kw)
    assert rel_err(other["latents"], ref) > 1e-3                    # the image conditions it
    with pytest.raises(vinf.GenerationError, match="needs an image"):
        vinf.generate(pipe, "the cat", out=None, steps=1, progress=False, **kw)
