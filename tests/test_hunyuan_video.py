"""The HunyuanVideo (1.0) family beyond the shared conformance suite: RoPE at global
positions equal to the stock table's, the exact config equal to the stock model, 1/2/3 real
gloo ranks (uneven splits, a 1-frame clip) giving one output, the text stream the same bits
on every rank and equal to one process, the prompt mask honoured, the position policies,
and what the family refuses."""
import pytest
import torch

import vinf_engine as vinf
from helpers import rel_err, run_ranks
from hunyuan_helpers import (CONFIGS, FRAMES, HunyuanText, hunyuan_call, hunyuan_inputs,
                             hunyuan_rank, stock_hunyuan, tiny_hunyuan_transformer)

SPLITS = {1: (FRAMES,), 2: (4, 3), 3: (1, 4, 2)}
TIMESTEPS = (900, 100)
_RUNS: dict = {}


def _runs(world):
    if world not in _RUNS:
        _RUNS[world] = ([hunyuan_rank(0, 1, SPLITS[1])] if world == 1 else
                        run_ranks(hunyuan_rank, world, SPLITS[world], timeout=240))
    return _RUNS[world]


def _video(world, key):
    return torch.cat([r[key] for r in _runs(world)], dim=2)


@pytest.fixture(scope="module")
def stock():
    return stock_hunyuan(TIMESTEPS)


def test_rotations_are_the_stock_table_at_global_positions():
    from vinf_engine.models.hunyuan_video import _Rope
    model = tiny_hunyuan_transformer()
    cos, sin = model.rope(torch.zeros(1, 4, 5, 4, 6))      # 5 frames of 2 x 3 tokens
    rope = _Rope(model.rope)
    rope.set(2, 3, 0, torch.device("cpu"))
    mine = rope.at(tuple(range(5)))
    # bitwise: the stock per-axis fp32 formula on the same position values, elementwise
    assert torch.equal(mine[0], cos) and torch.equal(mine[1], sin)
    part = rope.at((3, 4))
    assert torch.equal(part[0], cos[3 * 6:]) and torch.equal(part[1], sin[3 * 6:])
    assert not torch.equal(rope.at((0, 1))[0], part[0])     # positions move the rotation


@pytest.mark.parametrize("world", [1, 2, 3])
def test_exact_config_equals_the_stock_model(world, stock):
    for t in TIMESTEPS:
        out = _video(world, ("exact", t))
        assert rel_err(out, stock[t]) <= 1e-5, (world, t, rel_err(out, stock[t]))
        for r in _runs(world):
            for mine, ref in zip(r["text", "exact", t], stock["text", t]):
                assert rel_err(mine, ref) <= 1e-5


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_give_one_output_and_one_text_stream(world):
    one = _runs(1)[0]
    for name in CONFIGS:
        for t in TIMESTEPS:
            out = _video(world, (name, t))
            assert rel_err(out, one[name, t]) <= 1e-5, (name, t, rel_err(out, one[name, t]))
            first = _runs(world)[0]["text", name, t]
            assert len(first) == 2                           # one dual-, one single-stream block
            for r in _runs(world):
                for mine, ref in zip(r["text", name, t], first):
                    # bitwise: every rank merges the same gathered partials in rank order
                    assert torch.equal(mine, ref), (name, t)
            for mine, ref in zip(first, one["text", name, t]):
                assert rel_err(mine, ref) <= 1e-5, (name, t)


def test_the_configs_are_not_the_same_computation(stock):
    one = _runs(1)[0]
    assert rel_err(one["dual", 900], stock[900]) > 1e-3
    assert rel_err(one["dual", 900], one["dual", 100]) > 1e-3        # the bias phases
    # the 7-frame video passes the trained range 3: clamped global offsets differ from true
    assert rel_err(one["clamp", 900], one["true_positions", 900]) > 1e-4
    assert rel_err(one["text", "dual", 900][-1], stock["text", 900][-1]) > 1e-4


def test_the_prompt_mask_hides_padding_and_nothing_else():
    """Row 1 keeps 3 of its 5 text tokens: its padding changes no output under the engine
    (the stock model masks it as keys too), while unmasking it changes the video."""
    model = tiny_hunyuan_transformer()
    x, (text, mask, pooled) = hunyuan_inputs(FRAMES)
    other = text.clone()
    other[1, 3:] = torch.randn(2, text.shape[2]) * 5
    vinf.parallelize(model, vinf.DualScopeConfig(**CONFIGS["dual"]))
    with torch.no_grad():
        ref = hunyuan_call(model, x, 900, HunyuanText((text, mask, pooled)))
        padded = hunyuan_call(model, x, 900, HunyuanText((other, mask, pooled)))
        full = hunyuan_call(model, x, 900, HunyuanText((text, torch.ones_like(mask), pooled)))
        hunyuan_call(model, x, 900, HunyuanText((text, mask, pooled)))
        mask[1, 3] = 1              # changed in place after a call: the next call reads it again
        more = hunyuan_call(model, x, 900, HunyuanText((text, mask, pooled)))
    vinf.unparallelize(model)
    vinf.parallelize(model, vinf.DualScopeConfig(**CONFIGS["dual"]))
    with torch.no_grad():
        fresh = hunyuan_call(model, x, 900, HunyuanText((text, mask, pooled)))
    vinf.unparallelize(model)
    # bitwise: the same operations on the same shapes, if the lengths were read again
    assert torch.equal(more, fresh) and rel_err(more[1], ref[1]) > 1e-4
    assert rel_err(padded, ref) <= 1e-6
    assert rel_err(full[1], ref[1]) > 1e-4
    assert rel_err(full[0], ref[0]) <= 1e-6                  # row 0 had no padding


def test_what_the_family_refuses():
    from diffusers import HunyuanVideoTransformer3DModel
    with pytest.raises(ValueError, match="image-to-video"):
        vinf.parallelize(tiny_hunyuan_transformer(image_condition_type="latent_concat",
                                                  in_channels=9))
    with pytest.raises(ValueError, match="temporal patch size 2"):
        vinf.parallelize(tiny_hunyuan_transformer(patch_size_t=2))

    class Framepackish(HunyuanVideoTransformer3DModel):
        pass
    sub = Framepackish(**dict(tiny_hunyuan_transformer().config))
    with pytest.raises(ValueError, match="Framepackish is not diffusers' HunyuanVideo"):
        vinf.parallelize(sub)
    model = tiny_hunyuan_transformer()
    from diffusers.models.attention_processor import AttnProcessor2_0
    model.single_transformer_blocks[0].attn.set_processor(AttnProcessor2_0())
    with pytest.raises(ValueError, match="single_transformer_blocks.0.attn runs AttnProcessor2_0"):
        vinf.parallelize(model)


def test_default_config_and_the_trained_range():
    from vinf_engine.models.hunyuan_video import window_problem
    model = tiny_hunyuan_transformer()
    vinf.parallelize(model)
    cfg = model.vinf_engine.config
    vinf.unparallelize(model)
    # 33 latent frames (129 video frames): a local scope of 21 and 12 global frames
    assert (cfg.window, cfg.num_global) == (10, 12)
    assert window_problem(model, cfg, 200) is None
    assert "trained range" in window_problem(model, vinf.DualScopeConfig(window=40), 200)
    vinf.parallelize(model, vinf.DualScopeConfig(window=3, trained_frames=3))
    x, cond = hunyuan_inputs(5)
    with pytest.warns(UserWarning, match="reaches past the trained range"), torch.no_grad():
        hunyuan_call(model, x, 900, cond)
    vinf.unparallelize(model)


def _oracle(attn, x, ctx, valid, rope, F, window, glob, M):
    """One block's joint attention in fp64, written from the definition: video query frame a
    sees frames |b - a| <= window at their positions, global frame g's keys at position
    a - clamp(a - g, -M, M) (M None: g), and its row's valid text keys; a text query every
    video key at its position and the valid text keys. RoPE rows from the stock table."""
    from diffusers.models.embeddings import apply_rotary_emb
    cos, sin = rope
    T = x.shape[1] // F
    def qkv(t, proj, norms):
        return [n(p(t).unflatten(2, (attn.heads, -1))) for p, n in zip(proj, norms)]
    same = lambda t: t                                              # noqa: E731
    q, k, v = qkv(x, (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k, same))
    if attn.add_q_proj is None:
        tq, tk, tv = qkv(ctx, (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k, same))
    else:
        tq, tk, tv = qkv(ctx, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
                         (attn.norm_added_q, attn.norm_added_k, same))

    def rot(t, p):                           # one frame's tokens t, rotated at position p
        return apply_rotary_emb(t, (cos[p * T:(p + 1) * T], sin[p * T:(p + 1) * T]),
                                sequence_dim=1)
    tok = lambda t, f: t[:, f * T:(f + 1) * T]                      # noqa: E731
    scale = q.shape[-1] ** -0.5

    def attend(qq, ks, vs):                  # qq (L, H, D); ks, vs lists of (n, H, D)
        s = torch.einsum("lhd,nhd->hln", qq, torch.cat(ks)) * scale
        return torch.einsum("hln,nhd->lhd", s.softmax(-1), torch.cat(vs))
    video, text = torch.empty_like(q), torch.empty_like(tq)
    for b in range(x.shape[0]):
        n = valid[b]
        for a in range(F):
            ks = [rot(tok(k, f), f)[b] for f in range(F) if abs(f - a) <= window]
            vs = [tok(v, f)[b] for f in range(F) if abs(f - a) <= window]
            for g in glob:
                p = g if M is None else a - max(-M, min(M, a - g))
                ks.append(rot(tok(k, g), p)[b])
                vs.append(tok(v, g)[b])
            qa = rot(tok(q, a), a)[b]
            video[b, a * T:(a + 1) * T] = attend(qa, ks + [tk[b, :n]], vs + [tv[b, :n]])
        keys = torch.cat([rot(tok(k, f), f)[b] for f in range(F)])
        text[b] = attend(tq[b], [keys, tk[b, :n]], [v[b], tv[b, :n]])
    video, text = video.flatten(2), text.flatten(2)
    if getattr(attn, "to_out", None) is not None:
        video = attn.to_out[1](attn.to_out[0](video))
    if getattr(attn, "to_add_out", None) is not None:
        text = attn.to_add_out(text)
    return video, text


@pytest.mark.parametrize("positions", ["true", "clamp"])
def test_each_attention_against_a_dense_oracle(positions):
    """Both block kinds' attention in fp64 on one rank, as the model calls it (its RMS norms,
    the prompt mask from the forward, RoPE at global and clamped positions)."""
    from vinf_engine.layout import global_frames
    model = tiny_hunyuan_transformer().double()
    x, (text, mask, pooled) = hunyuan_inputs(FRAMES)
    cond = HunyuanText((text.double(), mask, pooled.double()))
    M = 2
    cfg = dict(window=1, num_global=3, phase_bias=0.0, trained_frames=M + 1,
               global_positions=positions)
    seen = []
    attns = [model.transformer_blocks[0].attn, model.single_transformer_blocks[0].attn]
    hooks = [a.register_forward_hook(lambda m, args, kw, out: seen.append((m, kw, out)),
                                     with_kwargs=True) for a in attns]
    vinf.parallelize(model, vinf.DualScopeConfig(**cfg))
    with torch.no_grad():
        hunyuan_call(model, x.double(), 900, cond)
        vinf.unparallelize(model)
        rope = model.rope(torch.zeros(1, 4, FRAMES, 4, 6))
        for h in hooks:
            h.remove()
        assert len(seen) == 2
        glob = global_frames(FRAMES, 3)
        for attn, kw, (video, txt) in seen:
            ref_v, ref_t = _oracle(attn, kw["hidden_states"], kw["encoder_hidden_states"], (5, 3),
                                   tuple(r.double() for r in rope), FRAMES, 1, glob,
                                   M if positions == "clamp" else None)
            # fp64 throughout; the engine's partial log-sum-exps are fp32 (as the ops return them)
            assert rel_err(video, ref_v) <= 1e-6, rel_err(video, ref_v)
            assert rel_err(txt, ref_t) <= 1e-6, rel_err(txt, ref_t)
