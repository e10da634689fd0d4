"""The step cache every rank agrees on (vinf_engine.cache): off, the model is untouched; on,
every rank makes the same decisions (from the whole video's change, also where a rank's own
clip alone would have decided otherwise), the video is the same on 1 and 3 ranks, a resumed
run decides and ends alike, Wan 2.2's two experts keep a cache each, torch.compile makes a
graph per way a decision goes and no more."""
import pytest
import torch

import vinf_engine as vinf
from gen_helpers import generate_rank_report
from helpers import rel_err, run_ranks
from vinf_engine.cache import CacheConfig
from wan_helpers import WAN_HW, save_tiny_wan_pipeline, tiny_wan_transformer, wan_inputs

DUAL = dict(window=2, num_global=2, phase_t=500, phase_bias=2.0)
KW = dict(prompts="the cat", num_frames=21, steps=8, seed=3, guidance_scale=4.0, config=DUAL,
          height=WAN_HW[0], width=WAN_HW[1])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    return {v: save_tiny_wan_pipeline(str(root / v), v) for v in ("2.1", "2.2")}


def test_config_parses_and_refuses():
    c = CacheConfig.parse("fbc:0.1,front=2,back=1,warmup=3,max_skips=0,taylor")
    assert (c.threshold, c.front, c.back, c.warmup, c.max_skips, c.taylor) == (0.1, 2, 1, 3, 0, True)
    assert CacheConfig.parse(c.spec()) == c and CacheConfig.parse(None) is None
    for bad, needle in (("fbc:x", "could not convert"), ("tea:0.1", "must look like"),
                        ("fbc:0.1,depth=2", "unknown cache option"), ("fbc:-1", ">= 0"),
                        ("fbc:0.1,front=0", "front must be an int >= 1")):
        with pytest.raises(ValueError, match=needle):
            CacheConfig.parse(bad)
    model = tiny_wan_transformer()                                  # 2 blocks
    with pytest.raises(ValueError, match="leave no middle of the model's 2 blocks"):
        vinf.parallelize(model, cache="fbc:0.1,front=1,back=1")
    from helpers import tiny_unet
    with pytest.raises(ValueError, match="runs the first down block and the last up block"):
        vinf.parallelize(tiny_unet(), cache="fbc:0.1,front=2")
    with pytest.raises(ValueError, match="does not combine with comm_mode 'stale'"):
        vinf.parallelize(tiny_wan_transformer(num_layers=3), cache="fbc:0.1", comm_mode="stale")


def test_off_is_the_uncached_model_and_zero_threshold_computes_everything():
    x, text = wan_inputs(5)
    t = torch.full((2,), 700.0)
    outs = []
    for cache in (None, "fbc:0,warmup=0"):
        model = tiny_wan_transformer(num_layers=3)
        vinf.parallelize(model, vinf.DualScopeConfig(**DUAL), cache=cache)
        assert ("forward" in model.blocks[1].__dict__) == (cache is not None)
        with torch.no_grad():
            outs.append([model(hidden_states=x * s, timestep=t, encoder_hidden_states=text).sample
                         for s in (1.0, 1.001)])
        if cache is not None:
            assert model.vinf_engine.cache.report()["skipped"] == 0
    # bitwise: with nothing skipped the cached model runs the same operations
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_every_rank_decides_alike_from_the_whole_video(models):
    # The first decided call (after one warm-up call) sees the same history in any run: a
    # threshold between the ranks' own changes there splits what per-rank caches would do.
    call = 1
    res = run_ranks(generate_rank_report, 3, models["2.1"], dict(KW, cache="fbc:1,warmup=1"),
                    timeout=400)
    own = [r["per_rank"][i]["cache"][0]["own_changes"] for i, r in enumerate(res)]
    threshold = (min(o[call] for o in own) + max(o[call] for o in own)) / 2
    spec = f"fbc:{threshold!r},warmup=1,max_skips=0"
    one = vinf.generate(models["2.1"], out=None, progress=False, cache=spec, **KW)
    res = run_ranks(generate_rank_report, 3, models["2.1"], dict(KW, cache=spec), timeout=400)
    decisions = [r["per_rank"][i]["cache"][0]["decisions"] for i, r in enumerate(res)]
    assert decisions[0] == decisions[1] == decisions[2] == one["cache"][0]["decisions"]
    assert "skipped" in decisions[0] and "computed" in decisions[0][1:]
    # at ``call`` a per-rank cache would have split: some ranks' own change below, some above
    own = [r["per_rank"][i]["cache"][0]["own_changes"] for i, r in enumerate(res)]
    assert min(o[call] for o in own) < threshold < max(o[call] for o in own), (own, threshold)
    latents = torch.cat([r["latents"] for r in res], dim=2)
    assert rel_err(latents, one["latents"]) <= 1e-5
    uncached = vinf.generate(models["2.1"], out=None, progress=False, **KW)
    assert 0 < rel_err(one["latents"], uncached["latents"]) < 0.5    # skipping did something


def test_resume_makes_the_same_decisions(models, tmp_path):
    from vinf_engine.pipeline import GenerationFailed
    kw = dict(KW, cache="fbc:0.5,warmup=1,max_skips=2", out=None, progress=False)
    full = vinf.generate(models["2.1"], **kw)

    def crash(step, t, latents):
        if step == 4:
            raise RuntimeError("simulated crash")
    ck = str(tmp_path / "ck")
    with pytest.raises(GenerationFailed):
        vinf.generate(models["2.1"], checkpoint_dir=ck, checkpoint_every=1, callback=crash, **kw)
    again = vinf.generate(models["2.1"], checkpoint_dir=ck, checkpoint_every=1, resume=True, **kw)
    assert again["resumed_from_step"] == 5          # the crash came after step 5 was saved
    assert again["cache"][0]["decisions"] == full["cache"][0]["decisions"]
    # the first call after the resume point was a skip: without the cache's state saved and
    # restored, the resumed run would have computed it
    assert full["cache"][0]["decisions"][5] == "skipped", full["cache"][0]["decisions"]
    # bitwise: the resumed run repeats the uninterrupted one's operations on the same shapes
    assert torch.equal(again["latents"], full["latents"])


def test_two_experts_keep_a_cache_each(models):
    rep = vinf.generate(models["2.2"], out=None, progress=False, cache="fbc:0.5,warmup=1",
                        **dict(KW, steps=6))
    assert len(rep["cache"]) == 2
    assert sum(c["calls"] for c in rep["cache"]) == 6
    assert all(c["decisions"][0] == "computed" for c in rep["cache"])


def test_compile_makes_a_graph_per_decision_not_per_step():
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = tiny_wan_transformer(num_layers=3)
    vinf.parallelize(model, vinf.DualScopeConfig(**DUAL), cache="fbc:0.5,warmup=1,max_skips=1")
    compiled = torch.compile(model, backend="eager")
    x, text = wan_inputs(5)
    graphs, got = [], []
    with torch.no_grad():
        for i, t in enumerate((999, 950, 900, 850, 800, 750)):
            ts = torch.full((2,), float(t))
            got.append(compiled(hidden_states=x + 1e-3 * i, timestep=ts,
                                encoder_hidden_states=text).sample)
            graphs.append(counters["stats"]["unique_graphs"])
    decisions = model.vinf_engine.cache.report()["decisions"]
    assert decisions == ["computed", "skipped", "computed", "skipped", "computed", "skipped"]
    assert graphs[-1] == graphs[3], graphs          # both ways seen by call 4: none new


def test_the_cli_takes_a_cache_and_refuses_a_bad_one(models, tmp_path, capsys):
    import json
    from vinf_engine.cli import main
    argv = ["generate", "--quiet", "--model", models["2.1"], "--prompt", "the cat", "--frames",
            "9", "--steps", "4", "--height", str(WAN_HW[0]), "--width", str(WAN_HW[1]),
            "--save-latents", str(tmp_path / "z.pt")]
    assert main(argv + ["--cache", "fbc:0.5,warmup=1"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["cache"][0]["spec"] == "fbc:0.5,warmup=1" and rep["cache"][0]["calls"] == 4
    assert main(argv[:-1] + [str(tmp_path / "y.pt"), "--cache", "fbc:x"]) == 2
    assert "cache 'fbc:x'" in capsys.readouterr().err and not (tmp_path / "y.pt").exists()


def test_unet3d_caches_its_deep_features_alike_on_every_rank(tmp_path):
    """UNet3D, DeepCache's way: the first down block decides, the deep features are reused;
    the same decisions and latents on 1 and 2 ranks; off, nothing is wrapped."""
    from gen_helpers import HW, save_tiny_pipeline
    model = save_tiny_pipeline(str(tmp_path / "t2v"))
    kw = dict(prompts="the cat", num_frames=6, steps=6, seed=2, guidance_scale=4.0,
              config=DUAL, height=HW[0], width=HW[1], cache="fbc:0.5,warmup=1,max_skips=1")
    one = vinf.generate(model, out=None, progress=False, **kw)
    assert one["cache"][0]["decisions"] == ["computed", "skipped"] * 3
    res = run_ranks(generate_rank_report, 2, model, kw, timeout=300)
    assert all(r["per_rank"][i]["cache"][0]["decisions"] == one["cache"][0]["decisions"]
               for i, r in enumerate(res))
    assert rel_err(torch.cat([r["latents"] for r in res], dim=2), one["latents"]) <= 1e-5
    plain = vinf.generate(model, out=None, progress=False, **dict(kw, cache=None))
    assert rel_err(one["latents"], plain["latents"]) > 0
