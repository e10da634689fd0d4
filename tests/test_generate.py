"""vinf.generate over tiny random pipelines saved to disk and loaded back: the diffusers
pipeline as oracle, the same video on 1, 2 and 3 real gloo ranks, resume == uninterrupted,
VideoCrafter2's fps conditioning, and the per-frame noise and scheduler state it relies on."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import vinf_engine as vinf
from gen_helpers import HW, invariance_rank, save_tiny_pipeline
from helpers import TINY_UNET, assert_lossless_videos_agree, rel_err, run_ranks
from vinf_engine.pipeline import GenerationFailed, inspect_model_dir, load_pipeline, read_prompt_file
from vinf_engine.video import frames_to_uint8, read_video

EXACT = dict(window=1000, num_global=0, phase_bias=0.0)
DUAL = dict(window=2, num_global=2, phase_t=500, phase_bias=2.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return dict(t2v=save_tiny_pipeline(str(root / "t2v")),
                vc2=save_tiny_pipeline(str(root / "vc2"), vc2=True, scheduler="dpm++sde"))


def _nearest_frames(video, expected):
    """For each decoded frame, the index of the closest expected frame (lossy codec)."""
    return [int(np.argmin([np.abs(v.astype(int) - e).mean() for e in expected])) for v in video]


def test_matches_the_diffusers_pipeline(models, tmp_path):
    # Exact mode on one rank is plain diffusers: same latents as TextToVideoSDPipeline from the
    # same initial noise, guidance and negative prompt; the mp4 holds those frames, in order.
    pipe = load_pipeline(models["t2v"])
    kw = dict(negative_prompt="a dog", num_frames=6, steps=3, guidance_scale=4.0, seed=2)
    rep = vinf.generate(models["t2v"], "the cat", config=EXACT, height=HW[0], width=HW[1],
                        out=str(tmp_path / "v.mp4"), progress=False, **kw)
    noise = vinf.initial_noise(2, (1, 4, 6, HW[0] // 2, HW[1] // 2))
    ref = pipe("the cat", negative_prompt="a dog", num_frames=6, num_inference_steps=3,
               guidance_scale=4.0, latents=noise, output_type="latent", height=HW[0],
               width=HW[1]).frames
    assert rel_err(rep["latents"], ref) <= 1e-5
    assert rel_err(noise, ref) > 0.1                      # the steps did something
    video, meta = read_video(str(tmp_path / "v.mp4"))
    assert video.shape == (6, HW[0], HW[1], 3) and meta["size"] == (HW[1], HW[0])
    expected = frames_to_uint8(pipe.decode_latents(rep["latents"])[0].permute(1, 0, 2, 3))
    assert _nearest_frames(video, expected) == list(range(6))
    # Without guidance (scale <= 1) the pipeline runs the conditional branch only.
    rep1 = vinf.generate(pipe, "the cat", config=EXACT, height=HW[0], width=HW[1],
                         out=str(tmp_path / "v1.mp4"), progress=False,
                         **dict(kw, guidance_scale=1.0))
    ref1 = pipe("the cat", num_frames=6, num_inference_steps=3, guidance_scale=1.0,
                latents=noise, output_type="latent", height=HW[0], width=HW[1]).frames
    assert rel_err(rep1["latents"], ref1) <= 1e-5


def test_same_video_on_1_2_and_3_ranks(models, tmp_path):
    # VideoCrafter2 with DPM-Solver++ (SDE): noise at every step, two scenes (the cut falls
    # inside rank 0's clip on 2 ranks, on a clip boundary on 3), window and global frames
    # that cross clips, uneven splits (3, 2, 2) and (4, 3).
    kw = dict(prompts=[(0, "the cat"), (3, "a dog on the rock")], num_frames=7, steps=4,
              seed=5, guidance_scale=4.0, config=DUAL, height=HW[0], width=HW[1], fps=8, crf=0)
    res = run_ranks(invariance_rank, 3, models["vc2"], str(tmp_path), kw, timeout=240)
    one = vinf.generate(models["vc2"], out=str(tmp_path / "r1.mp4"), progress=False, **kw)
    l3 = torch.cat([r[3] for r in res], dim=2)
    l2 = torch.cat([r[2] for r in res[:2]], dim=2)
    assert rel_err(l3, one["latents"]) <= 1e-5
    assert rel_err(l2, one["latents"]) <= 1e-5
    # Stale mode on the pair: the previous step's halos and statistics make another video,
    # close to the exact one.
    stale = torch.cat([r["stale"] for r in res[:2]], dim=2)
    assert 1e-6 < rel_err(stale, one["latents"]) < 0.2, rel_err(stale, one["latents"])
    assert res[0]["report", "stale"]["comm_mode"] == "stale"
    assert torch.equal(torch.load(tmp_path / "r3.pt")["latents"], l3)   # the same tensors, saved
    # The mp4s (lossless) differ only as far as the decoded frames do.
    from vinf_engine.pipelines.unet3d import UNet3DPipelines
    pipe = load_pipeline(models["vc2"])

    def frames(z):
        return np.concatenate(list(UNet3DPipelines().decode(pipe, z, None, 0, None, 7)))
    f1 = frames(one["latents"])
    v1, _ = read_video(str(tmp_path / "r1.mp4"))
    for name, z in (("r2.mp4", l2), ("r3.mp4", l3)):
        v, meta = read_video(str(tmp_path / name))
        assert v.shape == (7, HW[0], HW[1], 3) and meta["size"] == (HW[1], HW[0])
        fz = frames(z)
        assert np.abs(fz.astype(int) - f1).max() <= 1, name
        assert_lossless_videos_agree(v, v1, fz, f1, name)
    # The report: three ranks, frames exchanged, the UNet's halos counted.
    report = res[0]["report", 3]
    assert [r["frames"] for r in report["per_rank"]] == [3, 2, 2]
    assert report["comm_total"]["bytes_sent"] > 0 and report["comm_total"]["frames_bytes_received"] > 0
    assert all(r["peak_memory_mib"] > 0 for r in report["per_rank"])
    json.dumps(report)                                     # the CLI prints it as JSON
    # The schedule and the step noise are not decorative: one prompt, or another seed's step
    # noise, gives another video.
    single = vinf.generate(models["vc2"], out=str(tmp_path / "s.mp4"), progress=False,
                           **dict(kw, prompts="the cat"))
    assert rel_err(single["latents"][:, :, :3], one["latents"][:, :, :3]) > 1e-3


def test_resume_gives_the_uninterrupted_video(models, tmp_path):
    pipe = load_pipeline(models["t2v"])             # loaded once, reused by every run below
    kw = dict(num_frames=5, steps=6, seed=3, guidance_scale=4.0, config=DUAL, height=HW[0],
              width=HW[1], scheduler="dpm++sde", progress=False)
    full = vinf.generate(pipe, "the cat", out=str(tmp_path / "full.mp4"), **kw)
    ck = tmp_path / "ck"

    def crash(step, t, latents):
        if step == 4:
            raise RuntimeError("simulated crash")

    out = tmp_path / "resumed.mp4"
    with pytest.raises(GenerationFailed, match="simulated crash"):
        vinf.generate(pipe, "the cat", out=str(out), checkpoint_dir=str(ck),
                      checkpoint_every=2, callback=crash, **kw)
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["ck", "full.mp4"]            # no partial file left
    assert sorted(os.listdir(ck)) == ["rank00000-of-00001.step000002.pt",
                                      "rank00000-of-00001.step000004.pt"]
    # Another seed is another video: that checkpoint is refused, and nothing is written.
    with pytest.raises(vinf.GenerationError, match=r"different settings \(.*seed: checkpoint 3, now 4"):
        vinf.generate(pipe, "the cat", out=str(out), checkpoint_dir=str(ck), resume=True,
                      **dict(kw, seed=4))
    assert not out.exists()
    rep = vinf.generate(pipe, "the cat", out=str(out), checkpoint_dir=str(ck), resume=True, **kw)
    assert rep["resumed_from_step"] == 4 and rep["steps_run"] == 2
    # bitwise: a resumed run repeats the uninterrupted one's operations on the same shapes
    assert torch.equal(rep["latents"], full["latents"])
    assert out.read_bytes() == (tmp_path / "full.mp4").read_bytes()
    assert os.listdir(ck) == []                                         # cleared on success


def test_videocrafter2_fps_conditioning_loads_from_diffusers_layout(models, tmp_path):
    from diffusers import UNet3DConditionModel
    from vinf_engine.models.videocrafter2 import VideoCrafter2UNet3DConditionModel
    pipe = load_pipeline(models["vc2"])
    unet = pipe.unet
    assert type(unet) is VideoCrafter2UNet3DConditionModel and unet.config.fps_cond
    keys = {k for k in unet.state_dict() if k.startswith("fps_embedding.")}
    assert keys == {f"fps_embedding.linear_{i}.{w}" for i in (1, 2) for w in ("weight", "bias")}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 3, 8, 8, generator=g)
    ctx = torch.randn(1, 5, TINY_UNET["cross_attention_dim"], generator=g)
    with torch.no_grad():
        a = unet(x, 10, ctx, fps=8).sample
        b = unet(x, 10, ctx, fps=24).sample
        c = unet(x, 10, ctx).sample                      # default: the paper's 24
    assert rel_err(a, b) > 1e-3 and torch.equal(b, c)      # c: the same call, fps defaulted
    # A conversion whose config names the stock class but carries fps_cond still loads as
    # VideoCrafter2 (the public conversions differ in _class_name); the stock class would drop
    # the fps weights and compute something else.
    alt = tmp_path / "alt"
    shutil.copytree(models["vc2"], alt)
    cfg_path = alt / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["_class_name"] = "UNet3DConditionModel"
    cfg_path.write_text(json.dumps(cfg))
    assert inspect_model_dir(str(alt))[1]["kind"] == "videocrafter2"
    del cfg["fps_cond"]
    cfg_path.write_text(json.dumps(cfg))
    assert inspect_model_dir(str(alt))[1]["kind"] == "videocrafter2"   # from the weight names
    again = load_pipeline(str(alt)).unet
    stock = UNet3DConditionModel.from_pretrained(str(alt), subfolder="unet").eval()
    with torch.no_grad():
        assert torch.equal(again(x, 10, ctx, fps=8).sample, a)   # the same model, reloaded
        assert rel_err(stock(x, 10, ctx).sample, b) > 1e-3
    # The engine patches it like any UNet3D (the owning up path beneath its fps embedding
    # too): exact mode equals the unpatched model.
    vinf.parallelize(unet, vinf.DualScopeConfig(**EXACT))
    assert "_vinf_unet_forward" in unet.__dict__
    with torch.no_grad():
        assert rel_err(unet(x, 10, ctx, fps=8).sample, a) <= 1e-5
        assert rel_err(unet(x, 10, ctx, fps=24).sample, b) <= 1e-5
    vinf.unparallelize(unet)
    assert "_vinf_unet_forward" not in unet.__dict__


def test_step_noise_is_per_global_frame():
    shape = (1, 4, 10, 3, 5)
    whole = vinf.step_noise(7, 3, shape)
    part = vinf.step_noise(7, 3, shape, range(4, 9))
    assert torch.equal(whole[:, :, 4:9], part)        # per frame, the same generator draws
    assert rel_err(vinf.step_noise(7, 4, shape), whole) > 0.5
    assert rel_err(vinf.initial_noise(7, shape), whole) > 0.5
    from vinf_engine.noise import step_generators
    gens = step_generators(7, 3, range(4, 9))
    drawn = torch.cat([torch.randn((1, 4, 3, 5), generator=g) for g in gens])
    assert torch.equal(drawn, part[0].permute(1, 0, 2, 3))    # the same draws


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "PNDMScheduler", "UniPCMultistepScheduler"])
def test_scheduler_state_survives_a_checkpoint(name, tmp_path):
    # Multistep histories, PNDM's numpy timesteps: packed, saved with weights_only loading,
    # restored into a fresh scheduler, and the next steps are bit-identical.
    import diffusers
    from vinf_engine.checkpoint import Checkpointer, pack_scheduler_state, restore_scheduler_state
    cls = getattr(diffusers, name)
    g = torch.Generator().manual_seed(0)
    outs = [torch.randn(3, 4, 5, 5, generator=g) for _ in range(8)]
    a = cls()
    a.set_timesteps(8)
    x = torch.randn(3, 4, 5, 5, generator=g)
    xa = x
    for i, t in enumerate(a.timesteps[:3]):
        xa = a.step(outs[i], t, xa).prev_sample
    ck = Checkpointer(str(tmp_path), 0, 1, "fp", {})
    ck.save(3, xa, pack_scheduler_state(a))
    b = cls()
    b.set_timesteps(8)
    head = ck.load(3)
    restore_scheduler_state(b, head["scheduler"], "cpu")
    xb = head["latents"]
    for i, t in enumerate(a.timesteps[3:6], 3):
        xa = a.step(outs[i], t, xa).prev_sample
        xb = b.step(outs[i], t, xb).prev_sample
    assert torch.equal(xa, xb)


def test_prompt_files_and_schedules(tmp_path):
    from vinf_engine.pipeline import GenerationError
    from vinf_engine.prompts import scenes as _scenes
    f = tmp_path / "p.txt"
    f.write_text("# scenes\n0: the cat\n\n12: a dog\n")
    assert read_prompt_file(str(f)) == [(0, "the cat"), (12, "a dog")]
    f.write_text("the cat\na dog\nthe end\n")
    assert _scenes(read_prompt_file(str(f)), 10) == [(0, "the cat"), (3, "a dog"), (6, "the end")]
    f.write_text("0: the cat\na dog\n")
    with pytest.raises(GenerationError, match="line 2: no 'FRAME: ' prefix"):
        read_prompt_file(str(f))
    f.write_bytes(b"\xff\xfe bad")
    with pytest.raises(GenerationError, match="not UTF-8"):
        read_prompt_file(str(f))
    for bad, msg in (([(2, "a")], "start at frame 0"), ([(0, "a"), (0, "b")], "increase strictly"),
                     ([(0, "a"), (10, "b")], "past the video"), (["a", " "], "prompt 1 is empty"),
                     (["a"] * 11, "do not fit")):
        with pytest.raises(GenerationError, match=msg):
            _scenes(bad, 10)
