"""vinf.generate, the CLI and the drop-in over tiny random LTX-Video pipelines saved to disk
and loaded back: diffusers' LTXPipeline, LTXImageToVideoPipeline and LTXConditionPipeline
(conditions at frame 0; later ones refused) as the oracles, the same
video on 1, 2 and 3 real gloo ranks, the distributed VAE decode equal to the whole decode,
per-rank traffic flat in the video's length, and bad input refused on every rank."""
import numpy as np
import pytest
import torch
from PIL import Image

import vinf_engine as vinf
from gen_helpers import stock_pipe_rank
from helpers import assert_lossless_videos_agree, rel_err, run_ranks
from ltx_helpers import LTX_HW, ltx_generation_rank, save_tiny_ltx_pipeline
from vinf_engine.pipelines import load_pipeline
from vinf_engine.pipelines.ltx import LTXPipelines
from vinf_engine.video import read_video

EXACT = dict(window=100, num_global=0, phase_bias=0.0)
DUAL = dict(window=2, num_global=2, phase_t=500, phase_bias=2.0)
HW = dict(height=LTX_HW[0], width=LTX_HW[1])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ltx")
    # t2v: the released non-causal decoder; i2v: a causal one with timestep conditioning
    return dict(t2v=save_tiny_ltx_pipeline(str(root / "t2v")),
                i2v=save_tiny_ltx_pipeline(str(root / "i2v"), image=True, causal=True,
                                           timestep_conditioning=True),
                cond=save_tiny_ltx_pipeline(str(root / "cond"), condition=True, causal=True,
                                            timestep_conditioning=True))


def _tokens(z):
    return z.permute(0, 2, 3, 4, 1).flatten(1, 3)


def _latents(tokens, F):
    return tokens.unflatten(1, (F, 2, 3)).permute(0, 4, 1, 2, 3)


def _frames(pipe, z):
    F = z.shape[2]
    return np.concatenate(list(LTXPipelines().decode(pipe, z, vinf.ClipLayout(F, 1), 0,
                                                     vinf.ClipComm(), 4)))


def test_matches_the_ltx_pipeline(models, tmp_path):
    # Exact mode on one rank is LTXPipeline: the same latents from the same initial noise,
    # guidance and negative prompt; the mp4 holds the pipeline's decoded frames, in order.
    pipe = load_pipeline(models["t2v"])
    rep = vinf.generate(pipe, "the cat", config=EXACT, out=str(tmp_path / "v.mp4"),
                        negative_prompt="a dog", num_frames=17, steps=3, guidance_scale=4.0,
                        seed=2, progress=False, **HW)
    assert rep["model_kind"] == "ltx-video" and rep["frames"] == 17
    assert rep["latent_frames"] == 3 and rep["fps_conditioning"] == 25.0
    noise = vinf.initial_noise(2, (1, *rep["latents"].shape[1:]))
    call = dict(negative_prompt="a dog", num_frames=17, num_inference_steps=3,
                guidance_scale=4.0, latents=_tokens(noise), **HW)
    last = {}                                  # the pipeline's final latents, then its video

    def keep(p, i, t, kw):
        last.update(kw)
        return {}
    video_np = pipe("the cat", output_type="np", callback_on_step_end=keep, **call).frames[0]
    ref = _latents(last["latents"], 3)
    # exact config, other kernels (dual-scope attention merged by lse): fp32 rounding
    assert rel_err(rep["latents"], ref) <= 1e-5
    assert rel_err(noise, ref) > 0.1                          # the steps did something
    # The family's decode of the pipeline's latents is the pipeline's own decoded video
    # (piecewise decode vs one decode of the whole: convolutions over other lengths, fp32
    # rounding; a level in uint8 at most, rarely).
    expected = (video_np * 255).round().astype(np.uint8)
    ours = _frames(pipe, ref)
    d = np.abs(ours.astype(int) - expected.astype(int))
    assert ours.shape == expected.shape == (17, *LTX_HW, 3) and d.max() <= 1 and (d > 0).mean() < 1e-3
    video, _ = read_video(str(tmp_path / "v.mp4"))
    assert video.shape == (17, *LTX_HW, 3)
    err = lambda a: np.abs(video.astype(int) - a).mean()          # noqa: E731
    assert err(expected) < 0.8 * err(expected[::-1])


def test_an_image_at_frame_0_matches_the_image_to_video_pipeline(models):
    # LTXImageToVideoPipeline holds latent frame 0 at the image's latent with timestep 0 on
    # its tokens; given the same latents (the image's, then the same noise) it makes ours.
    pipe = load_pipeline(models["i2v"])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (*LTX_HW, 3), np.uint8))
    rep = vinf.generate(pipe, "the cat", images=image, config=EXACT, num_frames=17, steps=3,
                        guidance_scale=4.0, seed=3, out=None, progress=False, **HW)
    assert rep["model_kind"] == "ltx-video-i2v" and rep["images"] == [0]
    noise = vinf.initial_noise(3, (1, *rep["latents"].shape[1:]))
    start = torch.cat([rep["latents"][:, :, :1], noise[:, :, 1:]], dim=2)
    ref = pipe(image, "the cat", num_frames=17, num_inference_steps=3, guidance_scale=4.0,
               latents=_tokens(start), output_type="latent", **HW).frames
    assert rel_err(rep["latents"], _latents(ref, 3)) <= 1e-5
    # the held frame is the image's own latent (the VAE's mode, normalised)
    from vinf_engine.conditioning import Visual
    from vinf_engine.pipelines.ltx import _clean_start
    plan = LTXPipelines().plan(vinf.GenerateSettings(num_frames=17, **HW), pipe)
    clean = _clean_start(pipe, plan, Visual(keyframes=((0, image),)), "cpu")
    assert torch.equal(rep["latents"][:, :, :1], clean)


def test_the_condition_pipeline_is_matched_on_one_rank(models, monkeypatch):
    # LTXConditionPipeline with an image at frame 0: its linear-quadratic
    # timesteps stepped per token, causal video_coords, the held frame re-noised by
    # 0.15 t^2 before each step. Given the engine's noise draws (the initial noise, then each
    # step's) and the VAE's mode for the condition (the stock pipeline samples it), the
    # stock pipeline makes our latents.
    import diffusers
    import diffusers.pipelines.ltx.pipeline_ltx_condition as stock_module
    from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (*LTX_HW, 3), np.uint8))
    rep = vinf.generate(models["cond"], "the cat", images=image,
                        config=EXACT, num_frames=17, steps=3, guidance_scale=4.0, seed=3,
                        out=None, progress=False, **HW)
    assert rep["model_kind"] == "ltx-video-condition"
    shape = (1, *rep["latents"].shape[1:])
    draws = [vinf.initial_noise(3, shape)] + [_tokens(vinf.step_noise(3, i, shape))
                                              for i in range(3)]

    def engine_noise(shape, generator=None, device=None, dtype=None, layout=None):
        x = draws.pop(0)
        assert tuple(x.shape) == tuple(shape)
        return x.to(device=device, dtype=dtype)
    monkeypatch.setattr(stock_module, "randn_tensor", engine_noise)
    monkeypatch.setattr(stock_module, "retrieve_latents",
                        lambda enc, generator=None, sample_mode="sample": enc.latent_dist.mode())
    stock = diffusers.LTXConditionPipeline.from_pretrained(models["cond"])
    stock.set_progress_bar_config(disable=True)
    ref = stock(prompt="the cat", conditions=[LTXVideoCondition(image=image, frame_index=0)],
                num_frames=17, num_inference_steps=3, guidance_scale=4.0, output_type="latent",
                **HW).frames
    # exact config, other kernels (dual-scope attention merged by lse): fp32 rounding
    assert rel_err(rep["latents"], ref) <= 1e-5
    assert not draws and rel_err(rep["latents"], vinf.initial_noise(3, shape)) > 0.1
    # an image after frame 0: refused, naming what runs
    with pytest.raises(vinf.GenerationError, match="an image at frame 0"):
        vinf.generate(models["cond"], "the cat", images=[(8, image)], num_frames=17, steps=2,
                      out=None, progress=False, **HW)


def test_extend_holds_the_context_by_its_clean_latents(models, tmp_path):
    # 9 context frames (8k+1: the causal encoder's first 2 latent frames depend on them
    # alone) and 16 new ones: 25 frames, 4 latent frames, the first 2 held at the context's
    # latents; the mp4 is the input, then the new frames.
    from vinf_engine.video import VideoWriter
    src = str(tmp_path / "in.mp4")
    w = VideoWriter(src, LTX_HW[1], LTX_HW[0], fps=8, crf=0)
    w.write(np.random.default_rng(4).integers(0, 256, (12, *LTX_HW, 3), dtype=np.uint8))
    w.commit()
    out = str(tmp_path / "long.mp4")
    pipe = load_pipeline(models["t2v"])
    rep = vinf.generate(pipe, "the cat", num_frames=16, steps=2, extend=src, context_frames=9,
                        config=DUAL, out=out, progress=False, **HW)
    assert rep["latent_frames"] == 4 and rep["extended"]["output_frames"] == 12 + 16
    assert len(read_video(out)[0]) == 28
    from vinf_engine.conditioning import Visual
    from vinf_engine.pipelines.ltx import _clean_start
    inp, _ = read_video(src)
    plan = LTXPipelines().plan(vinf.GenerateSettings(num_frames=25, **HW), pipe)
    ctx = tuple((i, Image.fromarray(f)) for i, f in enumerate(inp[-9:]))
    clean = _clean_start(pipe, plan, Visual(keyframes=ctx), "cpu")
    # the same encoder on the same frames in one process: bitwise
    assert torch.equal(rep["latents"][:, :, :2], clean)
    with pytest.raises(vinf.GenerationError, match="try --frames 8 or 16"):
        vinf.generate(pipe, "the cat", num_frames=12, steps=2, extend=src, context_frames=9,
                      out=None, progress=False, **HW)


BAD = [("not 8k+1", dict(prompts="the cat", num_frames=10, steps=2, **HW)),
       ("fewer latent frames than ranks", dict(prompts="the cat", num_frames=9, steps=2, **HW)),
       ("window past the trained range", dict(prompts="the cat", num_frames=41, steps=2,
                                              config=dict(window=4, trained_frames=3), **HW)),
       ("scenes", dict(prompts=[(0, "the cat"), (17, "a dog")], num_frames=41, steps=2, **HW)),
       ("scheduler", dict(prompts="the cat", num_frames=41, steps=2, scheduler="unipc", **HW)),
       ("blocking", dict(prompts="the cat", num_frames=41, steps=2, comm_mode="blocking", **HW)),
       ("an image at frame 8", dict(prompts="the cat", num_frames=41, steps=2,
                                   images=[(8, Image.new("RGB", (96, 64)))], **HW)),
       ("one step", dict(prompts="the cat", num_frames=41, steps=1, **HW))]
# 41 video frames = 6 latent frames, split (2, 2, 2) and (3, 3); a window and global frames
# across clips, both bias phases.
INVARIANCE = dict(prompts="the cat", num_frames=41, steps=3, seed=5, guidance_scale=4.0,
                  config=DUAL, crf=0, **HW)
DROPIN_CALL = dict(prompt="the cat", negative_prompt="a dog", num_frames=33,
                   num_inference_steps=2, guidance_scale=4.0, output_type="latent",
                   max_sequence_length=16, **HW)


def _image_runs(models):
    # 33 frames = 5 latent frames on 3 ranks (2, 2, 1): the held frame 0 (timestep 0 on its
    # tokens) on rank 0 only, the other ranks' timesteps one per sample. The condition
    # pipeline's folder the same way (its sampling, its video_coords).
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (*LTX_HW, 3), np.uint8))
    kw = dict(prompts="the cat", images=image, num_frames=33, steps=2, seed=3,
              guidance_scale=4.0, config=DUAL, **HW)
    return {"image": (models["i2v"], kw), "cond_image": (models["cond"], kw)}


def _conditions(frame_index=0):
    from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition
    rng = np.random.default_rng(5)
    image = Image.fromarray(rng.integers(0, 255, (*LTX_HW, 3), np.uint8))
    video = [Image.fromarray(f) for f in rng.integers(0, 255, (9, *LTX_HW, 3), np.uint8)]
    return dict(image=[LTXVideoCondition(image=image, frame_index=frame_index)],
                video=[LTXVideoCondition(video=video, frame_index=frame_index, strength=0.7)])


def _dropin_runs(models):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (*LTX_HW, 3), np.uint8))
    cond = _conditions()
    # LTXConditionPipeline in exact config: an image at frame 0, and a video of 9 frames (2
    # latent frames, all of rank 0's clip) at frame 0 with strength 0.7 (per-token
    # timesteps min(t, 300) there, stepped once t falls below 300)
    return {"t2v": ("LTXPipeline", models["t2v"], DUAL, DROPIN_CALL, 1),
            "i2v": ("LTXImageToVideoPipeline", models["i2v"], DUAL,
                    dict(DROPIN_CALL, image=image), 2),
            "exact": ("LTXPipeline", models["t2v"], EXACT, DROPIN_CALL, 3),
            "cond_image": ("LTXConditionPipeline", models["cond"], EXACT,
                           dict(DROPIN_CALL, conditions=cond["image"]), 4),
            "cond_video": ("LTXConditionPipeline", models["cond"], EXACT,
                           dict(DROPIN_CALL, conditions=cond["video"]), 5)}


def _refused(models):
    # an image at frame 8: appended tokens, refused on every rank before any collective
    return ("LTXConditionPipeline", models["cond"],
            dict(DROPIN_CALL, conditions=_conditions(8)["image"]))


@pytest.fixture(scope="module")
def ranks(models, tmp_path_factory):
    """The module's one spawn of 3 gloo ranks (see ``ltx_generation_rank``)."""
    out = tmp_path_factory.mktemp("ranks")
    res = run_ranks(ltx_generation_rank, 3, models["t2v"], str(out), INVARIANCE, BAD,
                    (73, 153), _dropin_runs(models), _image_runs(models), _refused(models),
                    timeout=600)
    return out, res


def test_same_video_on_1_2_and_3_ranks(models, ranks):
    out, res = ranks
    one = vinf.generate(models["t2v"], out=str(out / "r1.mp4"), progress=False, **INVARIANCE)
    l3 = torch.cat([r[3] for r in res], dim=2)
    l2 = torch.cat([r[2] for r in res[:2]], dim=2)
    assert [r[3].shape[2] for r in res] == [2, 2, 2]
    # Other clip shapes, other matmul sums: fp32 rounding, not bitwise (SPEC: 1e-5).
    assert rel_err(l3, one["latents"]) <= 1e-5 and rel_err(l2, one["latents"]) <= 1e-5
    stale = torch.cat([r["stale"] for r in res[:2]], dim=2)
    assert 1e-7 < rel_err(stale, one["latents"]) < 0.2, rel_err(stale, one["latents"])
    assert torch.equal(torch.load(out / "r3.pt")["latents"], l3)   # the same tensors, saved
    pipe = load_pipeline(models["t2v"])
    f1 = _frames(pipe, one["latents"])
    v1, _ = read_video(str(out / "r1.mp4"))
    assert v1.shape == (41, *LTX_HW, 3)
    for name, z in (("r2.mp4", l2), ("r3.mp4", l3)):
        fz = _frames(pipe, z)
        # latents 1e-5 apart: a level at most where a value sits at a rounding boundary
        assert np.abs(fz.astype(int) - f1).max() <= 1, name
        assert_lossless_videos_agree(read_video(str(out / name))[0], v1, fz, f1, name)


@pytest.mark.parametrize("name", ["image", "cond_image"])
def test_an_image_at_frame_0_gives_the_same_video_on_3_ranks(models, ranks, name):
    folder, kw = _image_runs(models)[name]
    one = vinf.generate(folder, out=None, progress=False, **kw)["latents"]
    parts = [r[name] for r in ranks[1]]
    assert [p.shape[2] for p in parts] == [2, 2, 1]
    # other clip shapes than one process's: fp32 rounding (SPEC: 1e-5)
    assert rel_err(torch.cat(parts, dim=2), one) <= 1e-5


def test_the_condition_pipeline_after_frame_0_is_refused_on_every_rank(ranks):
    for r in ranks[1]:
        assert r["refused"] is not None
        assert "condition 0 is at frame_index 8" in r["refused"], r["refused"]
        assert "no frame of the video" in r["refused"]


def test_the_distributed_decode_is_the_whole_decode(models, ranks):
    # Fixed latents, 12 latent frames on 3 ranks (4 each), pieces of 2 on the global grid,
    # windows reaching both neighbours. Bitwise: every rank decodes the same pieces from the
    # same windows (identical ops on identical shapes) as the one-process decode does.
    pipe = load_pipeline(models["t2v"])
    z = torch.randn(1, 8, 12, 2, 3, generator=torch.Generator().manual_seed(9))
    whole = np.concatenate(list(LTXPipelines().decode(pipe, z, vinf.ClipLayout(12, 1), 0,
                                                      vinf.ClipComm(), 2)))
    parts = np.concatenate([a for r in ranks[1] for a in r["decoded"]])
    assert parts.shape == whole.shape == (89, *LTX_HW, 3)
    assert np.array_equal(parts, whole)


def test_traffic_per_rank_is_flat_in_the_length(ranks):
    # 73 and 153 video frames (10 and 20 latent frames on 3 ranks): halos of 2 frames, and
    # the 2 global frames owned by ranks 0 and 2 at both lengths.
    res = ranks[1]
    assert res[0]["bytes", 73] == res[0]["bytes", 153]
    assert min(res[0]["bytes", 73]) > 0


def test_bad_input_is_refused_on_every_rank(ranks):
    expected = {
        "not 8k+1": "frames must be 8k+1 for LTX-Video",
        "fewer latent frames than ranks": "fewer than ranks",
        "window past the trained range": "window 4 reaches past the trained range",
        "scenes": "one prompt per video",
        "scheduler": "unknown scheduler 'unipc'",
        "blocking": "comm mode 'blocking' is not available for LTX-Video",
        "an image at frame 8": "an image at frame 0",
        "one step": "needs at least 2 steps",
    }
    assert set(expected) == {name for name, _ in BAD}
    res = ranks[1]
    for name, needle in expected.items():
        for r in res:
            assert r["bad", name] is not None and needle in r["bad", name], (name, r["bad", name])
        assert res[0]["bad", name] == res[-1]["bad", name]


def test_the_cli(models, tmp_path):
    from vinf_engine.cli import main
    out = str(tmp_path / "cli.mp4")
    code = main(["generate", "--model", models["t2v"], "--prompt", "the cat", "--frames", "9",
                 "--height", str(LTX_HW[0]), "--width", str(LTX_HW[1]), "--steps", "2",
                 "--fps", "24", "--out", out, "--quiet"])
    assert code == 0
    video, meta = read_video(out)
    assert video.shape == (9, *LTX_HW, 3)
    assert main(["generate", "--model", models["t2v"], "--prompt", "the cat", "--frames", "10",
                 "--out", str(tmp_path / "bad.mp4"), "--quiet"]) == 2


def test_the_drop_in_on_3_ranks_equals_one_process_and_exact_equals_stock(models, ranks):
    # The unchanged LTXPipeline / LTXImageToVideoPipeline / LTXConditionPipeline call after
    # parallelize_pipe: packed tokens split by their frames (5 latent frames over 3 ranks: 2,
    # 2, 1), num_frames and the per-token timesteps cut to each rank's clip; the condition
    # pipeline's video_coords, passed whole, place the tokens.
    runs = _dropin_runs(models)
    one = stock_pipe_rank(0, 1, runs)
    for name in runs:
        for r in ranks[1]:
            # other clip shapes than one process's: fp32 rounding (SPEC: 1e-5)
            got = r["dropin"][name]
            assert rel_err(got, one[name]) <= 1e-5, (name, rel_err(got, one[name]))
    import diffusers
    stock = diffusers.LTXPipeline.from_pretrained(models["t2v"])
    stock.set_progress_bar_config(disable=True)
    ref = stock(generator=torch.Generator().manual_seed(3), **DROPIN_CALL).frames
    # exact config on one process: the same math as stock, other kernels (dual-scope
    # attention by lse merge): fp32 rounding
    assert rel_err(one["exact"], ref) <= 1e-5
    ref_dual = stock(generator=torch.Generator().manual_seed(1), **DROPIN_CALL).frames
    assert rel_err(one["t2v"], ref_dual) > 1e-4                   # dual scope is another model
    cond = diffusers.LTXConditionPipeline.from_pretrained(models["cond"])
    cond.set_progress_bar_config(disable=True)
    for name in ("cond_image", "cond_video"):
        _, _, _, call, seed = runs[name]
        ref = cond(generator=torch.Generator().manual_seed(seed), **call).frames
        assert rel_err(one[name], ref) <= 1e-5, name
