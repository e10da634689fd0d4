"""The LTX-Video family beyond the shared conformance suite: RoPE at global positions equal
to the stock grid's, the clamped global scope against a hand-written fp64 oracle, per-token
timesteps (image-to-video), per-rank traffic flat as the video grows, a video far past the
trained length, memory-bounded chunks, a rank's bad call refused on every rank, and the
trained-range warning."""
import math

import pytest
import torch

import vinf_engine as vinf
from families import DUAL, FRAMES, LTX
from helpers import rel_err, run_ranks
from ltx_helpers import RIS, ltx_call, ltx_inputs, ltx_rank, tiny_ltx_transformer


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(ltx_rank, 2, timeout=240)


@pytest.mark.parametrize("scale", [RIS, None, "tensor"])
@pytest.mark.parametrize("dim", [16, 2048])
def test_rotations_are_the_stock_grid_at_any_position(scale, dim):
    from diffusers.models.transformers.transformer_ltx import LTXVideoRotaryPosEmbed
    from vinf_engine.models.ltx import ClipLTXRotaryPosEmbed
    scale = torch.tensor(RIS, dtype=torch.float32) if scale == "tensor" else scale
    rope = LTXVideoRotaryPosEmbed(dim)
    cos, sin = rope(torch.zeros(1, 7 * 3 * 5, 4), 7, 3, 5, scale)
    mine = ClipLTXRotaryPosEmbed.rotations(rope, tuple(range(7)), 3, 5, scale, "cpu")
    # bitwise: the stock elementwise fp32 ops per value (no reduction), in the same order
    assert torch.equal(mine[0], cos) and torch.equal(mine[1], sin)
    # A clip at frames 4..6 is the whole video's rows there.
    part = ClipLTXRotaryPosEmbed.rotations(rope, (4, 5, 6), 3, 5, scale, "cpu")
    assert torch.equal(part[0], cos[:, 4 * 15:]) and torch.equal(part[1], sin[:, 4 * 15:])


def _oracle(attn, h, F, hw, window, glob, M, local_bias, global_bias, scale):
    """Dual-scope self-attention of one LTXAttention in fp64 from its weights and LTX's RoPE
    formula (angle ``freq * (2 * position - 1)``, frame position ``f * s_t / 20``): local
    keys at their true positions, global frame g's keys seen by query frame a at position
    a - clamp(a - g, -M, M) (M=None: true positions)."""
    pph, ppw = hw
    T = pph * ppw
    C = attn.inner_dim
    K = C // 6
    # The angles in fp32 in the stock order (position x scale / base): up to 1e4 radians, so
    # an ulp of a position or angle moves a rotation by ~1e-3; the rest in fp64.
    freqs = 10000.0 ** torch.linspace(0, 1, K) * math.pi / 2

    def rot(x, f):                  # x (T, C): one frame's tokens at frame position f
        g = torch.stack(torch.meshgrid(torch.tensor([float(f)]), torch.arange(float(pph)),
                                       torch.arange(float(ppw)), indexing="ij"), -1).reshape(T, 3)
        g = g * torch.tensor([float(x) for x in scale]) / torch.tensor([20.0, 2048.0, 2048.0])
        ang = (freqs.view(1, 1, K) * (2 * g.unsqueeze(-1) - 1)).transpose(1, 2).reshape(T, 3 * K)
        ang = ang.double()
        c = torch.cat([torch.ones(T, C % 6), ang.cos().repeat_interleave(2, -1)], -1)
        s = torch.cat([torch.zeros(T, C % 6), ang.sin().repeat_interleave(2, -1)], -1)
        pairs = x.unflatten(-1, (-1, 2))
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], -1).flatten(-2)
        return x * c + rotated * s

    H = attn.heads
    with torch.no_grad():
        q = attn.norm_q(attn.to_q(h)).double()[0]
        k = attn.norm_k(attn.to_k(h)).double()[0]
        v = attn.to_v(h).double()[0]
        D = C // H
        tok = lambda t, b: t[b * T:(b + 1) * T]            # noqa: E731
        out = torch.empty_like(q)
        for a in range(F):
            keys = [rot(tok(k, b), b) for b in range(F) if abs(b - a) <= window]
            vals = [tok(v, b) for b in range(F) if abs(b - a) <= window]
            bias = [local_bias] * (len(keys) * T)
            for g in glob:
                p = g if M is None else a - max(-M, min(M, a - g))
                keys.append(rot(tok(k, g), p))
                vals.append(tok(v, g))
                bias += [global_bias] * T
            qa = rot(tok(q, a), a).view(T, H, D)
            kk, vv = torch.cat(keys).view(-1, H, D), torch.cat(vals).view(-1, H, D)
            s = torch.einsum("thd,nhd->htn", qa, kk) / D ** 0.5 + torch.tensor(bias).double()
            out[a * T:(a + 1) * T] = torch.einsum("htn,nhd->thd", s.softmax(-1), vv).flatten(1)
        return attn.to_out[0](out.float()[None])


@pytest.mark.parametrize("positions", ["clamp", "true"])
def test_the_global_scope_against_a_hand_written_oracle(positions):
    from vinf_engine.layout import global_frames
    model = tiny_ltx_transformer()
    F, hw = 11, (2, 3)
    cfg = vinf.DualScopeConfig(window=2, num_global=3, phase_t=500, phase_bias=1.5,
                               trained_frames=3, global_positions=positions)
    vinf.parallelize(model, cfg)
    eng = model.vinf_engine
    eng.begin_step(torch.zeros(1, 8, F, *hw), 900)
    scale = (8.0, 32, 32)           # a frame every 0.4 of the rope's base: positions matter
    rotary = model.rope(torch.zeros(1, F * 6, 8), F, *hw, scale)
    attn = model.transformer_blocks[0].attn1
    h = torch.randn(1, F * 6, attn.inner_dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = attn(h, None, None, rotary)
    M = 2 if positions == "clamp" else None
    ref = _oracle(attn, h, F, hw, 2, global_frames(F, 3), M, eng.local_bias, eng.global_bias, scale)
    assert eng.global_bias == 1.5
    assert rel_err(got, ref) <= 1e-5
    if positions == "clamp":                              # the clamp changes something here
        other = _oracle(attn, h, F, hw, 2, global_frames(F, 3), None, 0.0, 1.5, scale)
        assert rel_err(other, ref) > 1e-4


def test_per_token_timesteps(two_ranks):
    # LTXImageToVideoPipeline passes one timestep per token, (B, S), 0 on the held frame 0.
    model = tiny_ltx_transformer()
    x, extra = ltx_inputs(FRAMES)
    per_token = torch.full((2, FRAMES * 16), 900.0)
    per_token[:, :16] = 0.0
    with torch.no_grad():
        stock = ltx_call(model, x, per_token, extra)
    vinf.parallelize(model, vinf.DualScopeConfig(**DUAL))
    with torch.no_grad():
        one = ltx_call(model, x, per_token, extra)
    out = torch.cat([r["per_token"] for r in two_ranks], dim=2)
    assert rel_err(out, one) <= 1e-5 and rel_err(one, stock) > 1e-3
    vinf.unparallelize(model)
    vinf.parallelize(model, vinf.DualScopeConfig(window=100, num_global=0, phase_bias=0.0))
    with torch.no_grad():
        exact = ltx_call(model, x, per_token, extra)
    assert rel_err(exact, stock) <= 1e-5


def test_bytes_per_rank_are_flat_as_the_video_grows(two_ranks):
    for r in two_ranks:
        assert r["bytes", 8] > 0
        assert r["bytes", 16] == r["bytes", 32], (r["bytes", 16], r["bytes", 32])


def test_a_video_three_times_the_trained_length(two_ranks):
    # 64 latent frames (the trained 21 three times over): 2 ranks equal one process.
    x, extra = ltx_inputs(64, hw=(2, 2))
    one = tiny_ltx_transformer()
    vinf.parallelize(one, vinf.DualScopeConfig(**DUAL))
    with torch.no_grad():
        ref = ltx_call(one, x, 900, extra)
    assert rel_err(torch.cat([r["long"] for r in two_ranks], dim=2), ref) <= 1e-5


def test_a_bad_call_on_one_rank_fails_on_every_rank(two_ranks):
    for r in two_ranks:
        assert "rank 1: video_coords" in r["bad", "video_coords"]
        assert "rank 1: hidden_states holds 128 tokens, but num_frames x height x width = 31" \
            in r["bad", "num_frames"]


def test_memory_bounded_chunks_equal_the_whole_clip():
    # A budget of a few KiB: the blocks over token chunks, attn1 over query-frame chunks,
    # the feed-forward over token chunks; the same output up to the rounding of smaller
    # matrix products.
    from vinf_engine.models.ltx import TokenChunkedLTXBlock
    x, extra = ltx_inputs(FRAMES)
    model = tiny_ltx_transformer()
    outs = {}
    for budget in (None, 0.004):
        vinf.parallelize(model, vinf.DualScopeConfig(**dict(DUAL, window=2, trained_frames=3)),
                         chunk_mib=budget)
        chunked = isinstance(model.transformer_blocks[0], TokenChunkedLTXBlock)
        assert chunked == (budget is not None)
        with torch.no_grad():
            outs[budget] = ltx_call(model, x, 900, extra)
        vinf.unparallelize(model)
    assert rel_err(outs[0.004], outs[None]) <= 1e-5


def test_a_window_past_the_trained_range_warns_with_both_numbers():
    model = tiny_ltx_transformer()
    vinf.parallelize(model, vinf.DualScopeConfig(window=24, num_global=0))
    x, extra = ltx_inputs(26, hw=(2, 2))
    with pytest.warns(UserWarning, match=r"window 24 reaches past the trained range: .* "
                                         r"trained on 21 latent frames \(relative distances up to 20\)"):
        with torch.no_grad():
            LTX.call(model, x, 900, extra)
    from vinf_engine.models.ltx import window_problem
    assert window_problem(model, model.vinf_engine.config, 26) is not None
    assert window_problem(model, model.vinf_engine.config, 21) is None


def test_the_step_cache_skips_ltx_blocks_together():
    # First-block cache over LTX's uniform blocks: a small change of the first block's output
    # skips the middle blocks (one process here; the decision is the engine's, shared).
    model = tiny_ltx_transformer(num_layers=4)
    x, extra = ltx_inputs(6)
    vinf.parallelize(model, vinf.DualScopeConfig(window=2, num_global=2), cache="fbc:0.5")
    with torch.no_grad():
        outs = [ltx_call(model, x + 1e-3 * t / 1000, t, extra) for t in (999, 900, 800)]
    report = model.vinf_engine.cache.report()
    assert report["decisions"][0] == "computed" and "skipped" in report["decisions"]
    assert all(o.shape == x.shape for o in outs)
