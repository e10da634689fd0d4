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
        # the processors reset through diffusers' API: the frame coupling must stay
        "ddim np": (T2V, folders["ddim"], DUAL, dict(t2v, output_type="np"), 1,
                    ("unet.set_default_attn_processor", "enable_attention_slicing")),
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
    for name, (cls, folder, cfg, kw, seed, *_) in _runs(folders).items():
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
    with pytest.raises(ValueError, match="takes a pipeline whose `unet` is a UNet3DConditionModel "
                                         r".* or whose `transformer` is a WanTransformer3DModel "
                                         r".*; got a object$"):
        vinf.parallelize_pipe(object())
    # a Wan pipeline whose transformer is another class: named
    class WanVACEPipeline:                   # its transformer a class of its own
        transformer = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match="got a WanVACEPipeline whose transformer is a Linear$"):
        vinf.parallelize_pipe(WanVACEPipeline())


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


def _pipe(folder, cls="TextToVideoSDPipeline"):
    pipe = getattr(diffusers, cls).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latents(pipe, seed=0, **over):
    if isinstance(pipe, diffusers.WanPipeline):
        kw = dict(prompt="the cat", num_frames=9, num_inference_steps=2, height=WAN_HW[0],
                  width=WAN_HW[1], max_sequence_length=16, output_type="latent")
    else:
        kw = dict(prompt="the cat", num_frames=5, num_inference_steps=2, height=HW[0],
                  width=HW[1], output_type="latent")
    return pipe(generator=torch.Generator().manual_seed(seed), **dict(kw, **over)).frames


class _Custom:
    """A processor of another math (the kind an adapter brings): never on an engine's attention."""

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return hidden_states


@pytest.mark.parametrize("kind", ["unet3d", "wan"])
def test_the_attention_processor_api_keeps_the_frame_coupling(folders, kind):
    """diffusers' attention-processor API on a parallelized pipeline: the engine's processors
    stay on the attentions that couple frames (recording what was asked), the others become
    what the call asks for; in exact config the result is then the unpatched pipeline's after
    the same calls. A processor of another math is refused, naming unparallelize_pipe, before
    anything changes."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor
    from vinf_engine.models.base import EngineProcessor
    plain = WanAttnProcessor if kind == "wan" else AttnProcessor2_0     # the family's own
    cls = "WanPipeline" if kind == "wan" else "TextToVideoSDPipeline"
    folder = folders["wan" if kind == "wan" else "ddim"]
    stock, pipe = _pipe(folder, cls), _pipe(folder, cls)
    vinf.parallelize_pipe(pipe, vinf.DualScopeConfig(**EXACT))
    m = pipe.transformer if kind == "wan" else pipe.unet
    owned = {n for n, p in m.attn_processors.items() if isinstance(p, EngineProcessor)}
    assert owned and len(owned) < len(m.attn_processors)
    before = dict(m.attn_processors)
    for model in (stock, pipe):                         # the same calls on both
        net = model.transformer if kind == "wan" else model.unet
        if kind == "unet3d":
            net.set_default_attn_processor()
            model.enable_attention_slicing()
        net.set_attn_processor(plain())
    after = m.attn_processors
    assert all(after[n] is before[n] for n in owned)    # the frame coupling stays
    assert all(type(after[n].requested) is plain for n in owned)
    assert all(type(p) is plain for n, p in after.items() if n not in owned)
    assert rel_err(_latents(pipe), _latents(stock)) <= 1e-5
    # refused whole: nothing is half-set
    for bad in (_Custom(), {n: _Custom() if n in owned else plain() for n in after}):
        with pytest.raises(ValueError, match="unparallelize_pipe"):
            m.set_attn_processor(bad)
        assert m.attn_processors == after
    attn = m.get_submodule(sorted(owned)[0].rsplit(".", 1)[0])
    with pytest.raises(ValueError, match="tear the video"):
        attn.set_processor(_Custom())
    m.set_attn_processor(before)                        # a round trip puts back what it read
    assert m.attn_processors == before
    if kind == "wan":                                   # diffusers' per-rank step caches
        from diffusers import FirstBlockCacheConfig
        with pytest.raises(ValueError, match="unparallelize_pipe"):
            m.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    vinf.unparallelize_pipe(pipe)
    assert not any(isinstance(p, EngineProcessor) for p in m.attn_processors.values())
    assert "set_attn_processor" not in m.__dict__ and "forward" not in m.__dict__


def _public(config) -> dict:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in d.items() if k not in ("_name_or_path", "name_or_path")}


def test_save_move_and_offload_a_parallelized_pipeline(folders, tmp_path):
    """save_pretrained saves the stock weights and config; ``.to(dtype)`` and
    ``enable_model_cpu_offload`` keep the video (exact config: the unpatched pipeline's);
    unparallelize_pipe after offloading leaves accelerate's hooks working."""
    stock, pipe = _pipe(folders["ddim"]), _pipe(folders["ddim"])
    vinf.parallelize_pipe(pipe, vinf.DualScopeConfig(**EXACT))
    pipe.save_pretrained(str(tmp_path / "saved"))
    again = _pipe(str(tmp_path / "saved"))
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(again, name), getattr(stock, name)
        assert type(a) is type(b) and _public(a.config) == _public(b.config), name
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name
    for model in (stock, pipe):
        model.to(torch.float64)
    assert rel_err(_latents(pipe), _latents(stock)) <= 1e-10
    for model in (stock, pipe):
        model.to(torch.float32)
        model.enable_model_cpu_offload(device="cpu")
    ref = _latents(stock)
    assert rel_err(_latents(pipe), ref) <= 1e-5
    vinf.unparallelize_pipe(pipe)
    hook, calls = pipe.unet._hf_hook, []            # accelerate's offload hook still runs
    real = hook.pre_forward
    hook.pre_forward = lambda module, *a, **k: calls.append(1) or real(module, *a, **k)
    assert rel_err(_latents(pipe), ref) <= 1e-5 and calls
