"""vinf.parallelize_pipe: the stock diffusers pipeline call, unchanged, on 2 and 3 real gloo
ranks equals one process (deterministic and stochastic schedulers, UNet3D and Wan, output
types latent, np and pt); in exact config it equals the unpatched pipeline; the rank-local
misuse is a clear error; per-sample timesteps work as in the stock model."""

import diffusers
import pytest
import torch

import vinf_engine as vinf
from gen_helpers import HW, save_tiny_pipeline, stock_pipe_rank
from helpers import rel_err, run_ranks, tiny_unet, unet_inputs
from wan_helpers import WAN_HW, save_tiny_wan_pipeline

DUAL = dict(window=2, num_global=2, phase_t=500, phase_bias=2.0)
EXACT = dict(window=1000, num_global=0, phase_bias=0.0)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return dict(ddim=save_tiny_pipeline(str(root / "ddim")),
                sde=save_tiny_pipeline(str(root / "sde"), scheduler="dpm++sde"),
                wan=save_tiny_wan_pipeline(str(root / "wan"), "2.2"))


def _runs(folders):
    t2v = dict(prompt="the cat", num_frames=7, num_inference_steps=3, guidance_scale=4.0,
               height=HW[0], width=HW[1])
    wan = dict(prompt="the cat", negative_prompt="a dog", num_frames=17, num_inference_steps=2,
               guidance_scale=4.0, height=WAN_HW[0], width=WAN_HW[1], max_sequence_length=16)
    T2V = "TextToVideoSDPipeline"
    runs = {   # name: (class, folder, config, call, seed); the first three also on 2-3 ranks
        "ddim np": (T2V, folders["ddim"], DUAL, dict(t2v, output_type="np"), 1),
        "sde pt": (T2V, folders["sde"], DUAL, dict(t2v, output_type="pt"), 2),
        "wan latent": ("WanPipeline", folders["wan"], None, dict(wan, output_type="latent"), 3),
        "ddim latent": (T2V, folders["ddim"], DUAL, dict(t2v, output_type="latent"), 1),
        "ddim exact": (T2V, folders["ddim"], EXACT, dict(t2v, output_type="latent"), 1),
    }
    return runs


def _distributed(folders):
    return dict(list(_runs(folders).items())[:3])


@pytest.fixture(scope="module")
def one(folders):
    return stock_pipe_rank(0, 1, _runs(folders))


@pytest.mark.parametrize("world", [2, 3])
def test_the_stock_call_on_several_ranks_equals_one_process(folders, one, world):
    res = run_ranks(stock_pipe_rank, world, _distributed(folders), timeout=300)
    for name in _distributed(folders):
        for rank, r in enumerate(res):                   # every rank gets the whole video
            assert r[name].shape == one[name].shape, (name, rank)
            assert rel_err(r[name], one[name]) <= 1e-5, (name, rank, rel_err(r[name], one[name]))
        assert res[0]["misuse"] is not None and "parallelize_pipe" in res[0]["misuse"]
        assert res[0]["misuse"] == res[-1]["misuse"]
    assert one["misuse"] is None                        # one process: nothing to misuse


def test_exact_config_equals_the_unpatched_pipeline(folders, one):
    for name, (cls, folder, cfg, kw, seed) in _runs(folders).items():
        pipe = getattr(diffusers, cls).from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        ref = torch.as_tensor(pipe(generator=torch.Generator().manual_seed(seed), **kw).frames)
        if name == "ddim exact":
            assert rel_err(one[name], ref) <= 1e-5
        elif name == "ddim latent":
            assert rel_err(one[name], ref) > 1e-4         # dual scope is another model


def test_unparallelize_pipe_restores_the_pipeline(folders):
    pipe = diffusers.TextToVideoSDPipeline.from_pretrained(folders["ddim"])
    pipe.set_progress_bar_config(disable=True)
    hooks = (len(pipe.unet._forward_pre_hooks), len(pipe.unet._forward_hooks))
    kw = dict(prompt="the cat", num_frames=5, num_inference_steps=2, height=HW[0],
              width=HW[1], output_type="latent")
    ref = pipe(generator=torch.Generator().manual_seed(0), **kw).frames
    vinf.parallelize_pipe(pipe, vinf.DualScopeConfig(**DUAL))
    with pytest.raises(ValueError, match="already parallelized"):
        vinf.parallelize_pipe(pipe)
    vinf.unparallelize_pipe(pipe)
    assert (len(pipe.unet._forward_pre_hooks), len(pipe.unet._forward_hooks)) == hooks
    assert getattr(pipe.unet, "vinf_engine", None) is None
    assert torch.equal(pipe(generator=torch.Generator().manual_seed(0), **kw).frames, ref)
    with pytest.raises(ValueError, match="not parallelized"):
        vinf.unparallelize_pipe(pipe)
    with pytest.raises(ValueError, match="parallelize_pipe supports"):
        vinf.parallelize_pipe(object())


def test_per_sample_timesteps():
    # One timestep per batch item, as the stock model accepts: in exact config the stock
    # output; in dual config each sample is biased by its own phase (t=10: local, t=900:
    # global), the same as running it alone.
    x, ctx = unet_inputs(6)
    t = torch.tensor([10, 900])
    stock = tiny_unet()
    with torch.no_grad():
        ref = stock(x, t, encoder_hidden_states=ctx).sample
    exact = vinf.parallelize(tiny_unet(), vinf.DualScopeConfig(**EXACT))
    dual = vinf.parallelize(tiny_unet(), vinf.DualScopeConfig(**DUAL))
    with torch.no_grad():
        assert rel_err(exact(x, t, encoder_hidden_states=ctx).sample, ref) <= 1e-5
        both = dual(x, t, encoder_hidden_states=ctx).sample
        alone = torch.cat([dual(x[i:i + 1], int(t[i]), encoder_hidden_states=ctx[i:i + 1]).sample
                           for i in range(2)])
        same_phase = dual(x, torch.tensor([10, 10]), encoder_hidden_states=ctx).sample
    assert rel_err(both, alone) <= 1e-5
    assert rel_err(both[1:], same_phase[1:]) > 1e-3      # the second sample's phase mattered
    with pytest.raises(ValueError, match="one per sample"):
        with torch.no_grad():
            dual(x, torch.tensor([1, 2, 3]), encoder_hidden_states=ctx)
