"""Images at any global frame and videos extended, through vinf.generate and the CLI: held
frames come out as the clean latents of their images, the video is the same on 1, 2 and 3
ranks with a keyframe inside a clip and on a clip boundary, Wan 2.2 TI2V with an image equals
diffusers' own pipeline, an extension writes the input's frames then the new ones, and bad
input is refused before any work."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import vinf_engine as vinf
from gen_helpers import HW, generate_rank, save_tiny_pipeline
from helpers import rel_err, run_ranks
from vinf_engine.pipelines import load_pipeline
from vinf_engine.video import VideoWriter, read_video
from wan_helpers import WAN_HW, save_tiny_wan_pipeline

DUAL = dict(window=2, num_global=2, phase_t=500, phase_bias=2.0)
EXACT = dict(window=1000, num_global=0, phase_bias=0.0)


def _image(path, hw, seed):
    g = np.random.default_rng(seed)
    Image.fromarray(g.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(path)
    return str(path)


def _video(path, n, hw, seed):
    g = np.random.default_rng(seed)
    frames = g.integers(0, 256, (n, *hw, 3), dtype=np.uint8)
    w = VideoWriter(str(path), hw[1], hw[0], fps=8, crf=0)
    w.write(frames)
    w.commit()
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_video")
    return dict(
        t2v=save_tiny_pipeline(str(root / "t2v")),
        wan=save_tiny_wan_pipeline(str(root / "wan"), "2.1"),
        ti2v=save_tiny_wan_pipeline(str(root / "ti2v"), "ti2v"),
        img=[_image(root / f"u{i}.png", HW, i) for i in range(3)],
        wimg=_image(root / "w.png", WAN_HW, 5),
        clip=_video(root / "in.mp4", 12, HW, 7),
        wclip=_video(root / "win.mp4", 9, WAN_HW, 8),
        root=root)


def _unet_clean(pipe, path):
    from vinf_engine.pipelines.unet3d import _image_processor
    x = _image_processor(pipe).preprocess(Image.open(path).convert("RGB"), height=HW[0],
                                          width=HW[1])
    with torch.no_grad():
        return pipe.vae.encode(x).latent_dist.mode() * pipe.vae.config.scaling_factor


def test_unet3d_keyframes_are_held_and_the_same_on_any_ranks(files, tmp_path):
    # 7 frames; keyframes at 0, 3 (rank 1's first frame on 2 ranks... (4, 3): inside rank 0;
    # (3, 2, 2): rank 1's first frame, a clip boundary) and 5 (inside the last clip)
    kw = dict(prompts="the cat", num_frames=7, steps=3, seed=3, guidance_scale=4.0,
              config=DUAL, height=HW[0], width=HW[1], scheduler="dpm++sde",
              images=[(0, files["img"][0]), (3, files["img"][1]), (5, files["img"][2])])
    one = vinf.generate(files["t2v"], out=None, progress=False, **kw)
    pipe = load_pipeline(files["t2v"])
    for frame, path in kw["images"]:                       # held: the clean latent itself
        assert rel_err(one["latents"][:, :, frame], _unet_clean(pipe, path)[0][None]) <= 1e-6
    free = vinf.generate(files["t2v"], out=None, progress=False,
                         **{k: v for k, v in kw.items() if k != "images"})
    assert rel_err(free["latents"][:, :, 1], one["latents"][:, :, 1]) > 1e-3   # they condition
    for world in (2, 3):
        got = torch.cat(run_ranks(generate_rank, world, files["t2v"], kw, timeout=300), dim=2)
        assert rel_err(got, one["latents"]) <= 1e-5, world
    assert one["images"] == [0, 3, 5]


def test_wan_held_first_frame_and_ti2v_equals_diffusers(files):
    # Wan 2.1 T2V: an image at frame 0 holds latent frame 0 at its encoding (per-token
    # timestep 0), the same on 1 and 3 ranks.
    kw = dict(prompts="the cat", num_frames=17, steps=2, seed=4, guidance_scale=4.0,
              config=DUAL, height=WAN_HW[0], width=WAN_HW[1], images=files["wimg"])
    one = vinf.generate(files["wan"], out=None, progress=False, **kw)
    three = torch.cat(run_ranks(generate_rank, 3, files["wan"], kw, timeout=300), dim=2)
    assert rel_err(three, one["latents"]) <= 1e-5
    # Wan 2.2 TI2V with an image: exact config on one rank is diffusers' image-to-video
    # pipeline on the same components (expand_timesteps: frame 0 clean, timestep 0).
    from diffusers import WanImageToVideoPipeline
    pipe = load_pipeline(files["ti2v"])
    img = Image.open(files["wimg"]).convert("RGB")
    rep = vinf.generate(pipe, "the cat", num_frames=9, steps=3, seed=2, guidance_scale=4.0,
                        negative_prompt="a dog", config=EXACT, images=img, out=None,
                        progress=False, height=WAN_HW[0], width=WAN_HW[1])
    i2v = WanImageToVideoPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder,
                                  vae=pipe.vae, scheduler=pipe.scheduler,
                                  transformer=pipe.transformer, expand_timesteps=True)
    i2v.set_progress_bar_config(disable=True)
    noise = vinf.initial_noise(2, (1, *rep["latents"].shape[1:]))
    ref = i2v(image=img, prompt="the cat", negative_prompt="a dog", num_frames=9,
              num_inference_steps=3, guidance_scale=4.0, latents=noise, height=WAN_HW[0],
              width=WAN_HW[1], max_sequence_length=512, output_type="latent").frames
    assert rel_err(rep["latents"], ref) <= 1e-5


@pytest.mark.parametrize("family", ["unet3d", "wan"])
def test_extend_writes_the_input_then_the_new_frames(files, tmp_path, family):
    src = files["clip"] if family == "unet3d" else files["wclip"]
    model = files["t2v"] if family == "unet3d" else files["wan"]
    hw = HW if family == "unet3d" else WAN_HW
    before = (os.stat(src).st_mtime_ns, open(src, "rb").read())
    out = str(tmp_path / "long.mp4")
    n_new, ctx = (5, 4) if family == "unet3d" else (8, 5)
    rep = vinf.generate(model, "the cat", num_frames=n_new, steps=2, seed=1, config=DUAL,
                        extend=src, context_frames=ctx, out=out, crf=0,
                        save_latents=str(tmp_path / "long.pt"), progress=False,
                        height=hw[0], width=hw[1])
    assert (os.stat(src).st_mtime_ns, open(src, "rb").read()) == before   # only read
    inp, _ = read_video(src)
    video, _ = read_video(out)
    assert rep["extended"]["output_frames"] == len(inp) + n_new == len(video)
    # the input's frames first (resized to their own size: unchanged), encoded as the same
    # frames encode alone (bitwise: the same frames into the same lossless encoder)
    again = tmp_path / "again.mp4"
    w = VideoWriter(str(again), hw[1], hw[0], fps=8, crf=0)
    w.write(inp)
    w.commit()
    assert np.array_equal(video[:len(inp)], read_video(str(again))[0])
    # the context latent frames are the VAE's encoding of the input's last frames
    z = torch.load(tmp_path / "long.pt")["latents"]
    pipe = load_pipeline(model)
    if family == "unet3d":
        held = [rel_err(z[:, :, i], _unet_clean(pipe, _frame_png(inp[len(inp) - ctx + i],
                                                                  tmp_path, i))[0][None])
                for i in range(ctx)]
        assert max(held) <= 1e-6, held
    else:
        from vinf_engine.conditioning import Visual
        from vinf_engine.pipelines.wan import _clean_start
        visual = Visual(keyframes=tuple((i, Image.fromarray(f))
                                        for i, f in enumerate(inp[len(inp) - ctx:])))
        plan = type("P", (), dict(height=hw[0], width=hw[1]))
        clean = _clean_start(pipe, plan, visual, torch.device("cpu"))
        assert rel_err(z[:, :, :clean.shape[2]], clean) <= 1e-6


def _frame_png(frame, tmp_path, i):
    path = tmp_path / f"ctx{i}.png"
    Image.fromarray(frame).save(path)
    return str(path)


def test_bad_image_and_extension_input_is_refused_before_any_work(files, tmp_path):
    base = dict(prompts="the cat", num_frames=9, steps=1, height=WAN_HW[0], width=WAN_HW[1],
                progress=False, out=str(tmp_path / "o.mp4"))
    (tmp_path / "bad.png").write_text("not an image")
    (tmp_path / "bad.mp4").write_text("not a video")
    empty = tmp_path / "empty.mp4"
    w = VideoWriter(str(empty), WAN_HW[1], WAN_HW[0])
    w.commit()
    cases = [
        (dict(images=str(tmp_path / "missing.png")), "does not exist"),
        (dict(images=str(tmp_path / "bad.png")), "not a readable image"),
        (dict(images=[(9, files["wimg"])]), "outside the video's 9 frames"),
        (dict(images=[(-1, files["wimg"])]), "outside the video"),
        (dict(images=[(0, files["wimg"]), (0, files["wimg"])]), "two images are pinned at frame(s) [0]"),
        (dict(images=[(4, files["wimg"])]), "has no mask channels"),
        (dict(extend=str(tmp_path / "bad.mp4")), "not a readable video"),
        # a writer closed before any frame leaves a file without a video stream
        (dict(extend=str(empty)), ("holds no frames", "not a readable video")),
        (dict(extend=files["wclip"], context_frames=13), "fewer than the 13 context frames"),
        (dict(extend=files["wclip"], out=files["wclip"], overwrite=True), "also the --out path"),
        (dict(extend=files["wclip"], images=files["wimg"]), "not both"),
        (dict(extend=files["wclip"], num_frames=9), "try --frames 8 or 12"),
        (dict(context_frames=3), "--context-frames is for --extend"),
    ]
    for change, needle in cases:
        with pytest.raises(vinf.GenerationError, match=None) as e:
            vinf.generate(files["wan"], **dict(base, **change))
        needles = (needle,) if isinstance(needle, str) else needle
        assert any(n in str(e.value) for n in needles), (change, str(e.value))
        assert sorted(os.listdir(tmp_path)) == ["bad.mp4", "bad.png", "empty.mp4"], change


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    from wan_image_helpers import save_tiny_wan_i2v_pipeline
    root = tmp_path_factory.mktemp("i2v")
    return {v: save_tiny_wan_i2v_pipeline(str(root / v), v) for v in ("2.1", "flf2v", "2.2")}


@pytest.mark.parametrize("variant", ["2.1", "flf2v", "2.2"])
def test_wan_image_to_video_equals_diffusers(i2v, files, variant):
    """Exact config on one rank: the stock WanImageToVideoPipeline from the same initial
    noise (Wan 2.1 I2V with CLIP tokens, first-last-frame, Wan 2.2 I2V-A14B's experts)."""
    pipe = load_pipeline(i2v[variant])
    img = Image.open(files["wimg"]).convert("RGB")
    last = img.transpose(Image.FLIP_LEFT_RIGHT)
    images = [(0, img), (8, last)] if variant == "flf2v" else img
    kw = dict(num_frames=9, guidance_scale=4.0, negative_prompt="a dog", height=WAN_HW[0],
              width=WAN_HW[1])
    rep = vinf.generate(pipe, "the cat", config=EXACT, images=images, out=None, steps=3,
                        seed=2, progress=False, **kw)
    assert rep["model_kind"] == {"2.1": "wan2.1-i2v", "flf2v": "wan2.1-i2v",
                                 "2.2": "wan2.2-a14b-i2v"}[variant]
    noise = vinf.initial_noise(2, (1, *rep["latents"].shape[1:]))
    extra = dict(last_image=last) if variant == "flf2v" else {}
    ref = pipe(image=img, prompt="the cat", num_inference_steps=3, latents=noise,
               output_type="latent", **extra, **kw).frames
    assert rel_err(rep["latents"], ref) <= 1e-5
    assert rel_err(noise, ref) > 0.1


def test_wan_keyframes_anywhere_the_same_on_any_ranks(i2v, files, tmp_path):
    """Keyframes at video frames 0, 5 (the first frame of rank 1's clip on 3 ranks: latent
    frames split (2, 2, 1)) and 10 (inside it), on 1, 2 and 3 ranks; and an mp4 extended by
    the image-to-video model, its context held by the mask."""
    kw = dict(prompts="the cat", num_frames=17, steps=2, seed=6, guidance_scale=4.0,
              config=DUAL, height=WAN_HW[0], width=WAN_HW[1],
              images=[(0, files["wimg"]), (5, files["wimg"]), (10, files["wimg"])])
    one = vinf.generate(i2v["2.1"], out=None, progress=False, **kw)
    for world in (2, 3):
        got = torch.cat(run_ranks(generate_rank, world, i2v["2.1"], kw, timeout=300), dim=2)
        assert rel_err(got, one["latents"]) <= 1e-5, world
    moved = vinf.generate(i2v["2.1"], out=None, progress=False,
                          **dict(kw, images=[(0, files["wimg"]), (6, files["wimg"])]))
    assert rel_err(moved["latents"], one["latents"]) > 1e-3        # where they sit matters
    out = str(tmp_path / "more.mp4")
    rep = vinf.generate(i2v["2.1"], "the cat", num_frames=4, steps=2, config=DUAL,
                        extend=files["wclip"], context_frames=5, out=out, progress=False,
                        height=WAN_HW[0], width=WAN_HW[1])
    assert len(read_video(out)[0]) == rep["extended"]["output_frames"] == 9 + 4


def test_the_cli_takes_images_and_extends(files, tmp_path, capsys):
    import json
    from vinf_engine.cli import main
    base = ["generate", "--quiet", "--model", files["t2v"], "--prompt", "the cat", "--steps",
            "1", "--height", str(HW[0]), "--width", str(HW[1])]
    out = str(tmp_path / "i.mp4")
    assert main(base + ["--frames", "5", "--image", files["img"][0], "--image",
                        "3:" + files["img"][1], "--out", out]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == [0, 3]
    more = str(tmp_path / "e.mp4")
    assert main(base + ["--frames", "3", "--extend", out, "--context-frames", "2",
                        "--out", more]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["extended"]["output_frames"] == 8 == len(read_video(more)[0])
    assert main(base + ["--frames", "5", "--image", "7:" + files["img"][0], "--out",
                        str(tmp_path / "x.mp4")]) == 2
    assert "outside the video's 5 frames" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.mp4")
