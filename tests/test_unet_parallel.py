"""UNet3D-specific behaviour of the engine (what every family shares is in test_families.py):
per-clip GroupNorm breaks partition invariance, unsupported diffusers models are refused,
and the engine runs on a user's subgroup."""
import pytest
import torch

import vinf_engine as vinf
from helpers import rel_err, run_ranks, tiny_unet, unet_inputs
from workers import CASE_CONFIGS, run_engine, unet_rank

FRAMES = 11


def test_per_clip_groupnorm_breaks_invariance():
    # sync_groupnorm=False (the published prototype) is not partition invariant; the whole-
    # video statistics are what make test_families' invariance hold.
    local = {"local_gn": CASE_CONFIGS["local_gn"]}
    single = run_engine(tiny_unet(), (FRAMES,), 0, FRAMES, local)
    results = run_ranks(unet_rank, 2, (6, 5), local)
    out = torch.cat([r["local_gn", 900] for r in results], dim=2)
    assert rel_err(out, single["local_gn", 900]) > 1e-4


def test_unsupported_models_are_refused_single_process():
    with pytest.raises(ValueError, match="no model family for Conv2d; registered families: "
                                         r".*UNet3D .*\(UNet3DConditionModel\)"):
        vinf.parallelize(torch.nn.Conv2d(2, 2, 1))
    from diffusers import UNet2DConditionModel
    m = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1,
                             down_block_types=("DownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
                             cross_attention_dim=8)
    with pytest.raises(ValueError, match="no model family for UNet2DConditionModel"):
        vinf.parallelize(m)
    with pytest.raises(ValueError, match="config must be"):
        vinf.parallelize(tiny_unet(), config=dict(window=3))


def test_engine_on_a_user_subgroup():
    from workers import subgroup_rank
    results = run_ranks(subgroup_rank, 3)
    assert results[2] is None
    single = tiny_unet()
    vinf.parallelize(single, vinf.DualScopeConfig(window=2, num_global=2))
    x, ctx = unet_inputs(6)
    with torch.no_grad():
        ref = single(x, 900, encoder_hidden_states=ctx).sample
    assert rel_err(torch.cat(results[:2], dim=2), ref) <= 1e-5
