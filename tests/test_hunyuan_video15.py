"""The HunyuanVideo 1.5 family beyond the shared conformance suite (which runs it on 1-4 real
gloo ranks): RoPE at global positions equal to the stock table's, the three text streams'
masks honoured (padding hidden, image slots seen when the image embeddings are not zero),
the default config and trained range, and what the adapter refuses. No spawn."""
import pytest
import torch

import vinf_engine as vinf
from helpers import rel_err
from hunyuan15_helpers import (Hunyuan15Text, hunyuan15_call, hunyuan15_inputs,
                               tiny_hunyuan15_transformer)

FRAMES = 5
EXACT = dict(window=1000, num_global=0, phase_bias=0.0)
DUAL = dict(window=1, num_global=2, phase_t=500, phase_bias=2.0)


def test_rotations_are_the_stock_table_at_global_positions():
    from vinf_engine.models.hunyuan_video import _Rope
    model = tiny_hunyuan15_transformer()
    cos, sin = model.rope(torch.zeros(1, 9, 5, 2, 3))        # 5 frames of 2 x 3 tokens
    rope = _Rope(model.rope)
    rope.set(2, 3, 0, torch.device("cpu"))
    mine = rope.at(tuple(range(5)))
    # bitwise: the stock per-axis fp32 formula on the same position values, elementwise
    assert torch.equal(mine[0], cos) and torch.equal(mine[1], sin)
    part = rope.at((3, 4))
    assert torch.equal(part[0], cos[3 * 6:]) and torch.equal(part[1], sin[3 * 6:])


def _calls(model, x, conds, cfg):
    vinf.parallelize(model, vinf.DualScopeConfig(**cfg))
    with torch.no_grad():
        out = [hunyuan15_call(model, x, 900, c) for c in conds]
    vinf.unparallelize(model)
    return out


def test_the_text_masks_hide_padding_and_nothing_else():
    """Row 1 keeps 3 of its 5 Qwen tokens and none of its ByT5 ones; row 0 keeps 2 ByT5
    tokens. Padding in any stream changes no output; unmasking it does; nonzero image
    embeddings make the image slots keys, in the stock model and the engine alike."""
    model = tiny_hunyuan15_transformer()
    x, (text, mask, text_2, mask_2, image) = hunyuan15_inputs(FRAMES)
    padded = text.clone()
    padded[1, 3:] += 5
    padded_2 = text_2.clone()
    padded_2[0, 2:] += 5
    padded_2[1] += 5
    image_in = torch.randn(image.shape, generator=torch.Generator().manual_seed(3))
    conds = [Hunyuan15Text((text, mask, text_2, mask_2, image)),
             Hunyuan15Text((padded, mask, padded_2, mask_2, image)),
             Hunyuan15Text((text, torch.ones_like(mask), text_2, mask_2, image)),
             Hunyuan15Text((text, mask, text_2, torch.ones_like(mask_2), image)),
             Hunyuan15Text((text, mask, text_2, mask_2, image_in))]
    ref, pad, full, full_2, with_image = _calls(model, x, conds, DUAL)
    assert rel_err(pad, ref) <= 1e-6
    assert rel_err(full[1], ref[1]) > 1e-4 and rel_err(full[0], ref[0]) <= 1e-6
    assert rel_err(full_2, ref) > 1e-4
    assert rel_err(with_image, ref) > 1e-4
    # exact config with image slots in: the stock model (its combined mask read per call)
    with torch.no_grad():
        stock = hunyuan15_call(model, x, 900, conds[4])
    assert rel_err(_calls(model, x, conds[4:], EXACT)[0], stock) <= 1e-5


def test_default_config_and_the_trained_range():
    model = tiny_hunyuan15_transformer()
    vinf.parallelize(model)
    cfg = model.vinf_engine.config
    vinf.unparallelize(model)
    # 31 latent frames (121 video frames): a local scope of 21 and 10 global frames
    assert (cfg.window, cfg.num_global) == (10, 10)
    vinf.parallelize(model, vinf.DualScopeConfig(window=3, trained_frames=3))
    x, cond = hunyuan15_inputs(5)
    with pytest.warns(UserWarning, match="reaches past the trained range"), torch.no_grad():
        hunyuan15_call(model, x, 900, cond)
    vinf.unparallelize(model)


def test_what_the_adapter_refuses():
    from diffusers import HunyuanVideo15Transformer3DModel
    with pytest.raises(ValueError, match="temporal patch size 2"):
        vinf.parallelize(tiny_hunyuan15_transformer(patch_size_t=2))

    class Other(HunyuanVideo15Transformer3DModel):
        pass
    sub = Other(**dict(tiny_hunyuan15_transformer().config))
    with pytest.raises(ValueError, match="Other is not diffusers' HunyuanVideo15Transformer3D"):
        vinf.parallelize(sub)
    model = tiny_hunyuan15_transformer()
    from diffusers.models.attention_processor import AttnProcessor2_0
    model.transformer_blocks[1].attn.set_processor(AttnProcessor2_0())
    with pytest.raises(ValueError, match="transformer_blocks.1.attn runs AttnProcessor2_0; the "
                                         "engine replaces diffusers' HunyuanVideo15AttnProc"):
        vinf.parallelize(model)
