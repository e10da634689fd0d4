"""The Wan family beyond the shared conformance suite: RoPE at global positions past the
model's table, the clamped global scope against a hand-written oracle, per-token timesteps,
per-rank traffic flat as the video grows, and the trained-range warning."""
import numpy as np
import pytest
import torch

import vinf_engine as vinf
from families import DUAL, FRAMES, SPLITS, Wan, wan_rank
from helpers import rel_err, run_ranks
from wan_helpers import tiny_wan_transformer, wan_inputs


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(wan_rank, 2, timeout=240)


def test_rotations_are_the_stock_table_and_extend_past_it():
    from vinf_engine.models.wan import ClipWanRotaryPosEmbed
    rope = tiny_wan_transformer().rope
    x = torch.zeros(1, 16, 9, 6, 4)
    cos, sin = rope(x)                                   # stock: frames 0..8 from the table
    mine = ClipWanRotaryPosEmbed.rotations(rope, torch.arange(9, dtype=torch.float64), 3, 2)
    # bitwise: the table's own elementwise fp64 ops per position (no reduction), then the cast
    assert torch.equal(mine[0], cos) and torch.equal(mine[1], sin)
    # Past the 1024-row table: the formula, continued (position 2000 of a 4096-row table).
    big = tiny_wan_transformer(rope_max_seq_len=4096).rope
    far = ClipWanRotaryPosEmbed.rotations(rope, torch.tensor([2000.0], dtype=torch.float64), 1, 1)
    assert torch.equal(far[0].view(-1)[:rope.t_dim], big.freqs_cos[2000, :rope.t_dim])


def test_a_video_past_the_rope_table(two_ranks):
    # rope_max_seq_len=8, 12 frames: the stock model cannot run it (its table has 8 rows); the
    # engine's 2 ranks equal one process and the stock model with a longer table.
    x, text = wan_inputs(12)
    out = torch.cat([r["past_table"] for r in two_ranks], dim=2)
    one = tiny_wan_transformer(rope_max_seq_len=8)
    vinf.parallelize(one, vinf.DualScopeConfig(**DUAL))
    with torch.no_grad():
        ref = Wan.call(one, x, 900, text)
    assert rel_err(out, ref) <= 1e-5
    with pytest.raises(RuntimeError):
        with torch.no_grad():
            Wan.call(tiny_wan_transformer(rope_max_seq_len=8), x, 900, text)
    exact = tiny_wan_transformer(rope_max_seq_len=8)
    vinf.parallelize(exact, vinf.DualScopeConfig(window=11, num_global=0, phase_bias=0.0))
    with torch.no_grad():
        got = Wan.call(exact, x, 900, text)
        stock = Wan.call(tiny_wan_transformer(rope_max_seq_len=64), x, 900, text)
    assert rel_err(got, stock) <= 1e-5


def _oracle(attn, h, F, T, pph, ppw, window, glob, M, local_bias, global_bias):
    """Dual-scope self-attention of one WanAttention, written out in fp64 from its weights:
    local keys at their true positions, global frame g's keys seen by query frame a at
    position a - clamp(a - g, -M, M) (M=None: true positions)."""
    from diffusers.models.embeddings import get_1d_rotary_pos_embed
    rope = tiny_wan_transformer().rope
    t_dim = rope.t_dim

    def rot(x, frame_pos):                     # x (n*T, H, D) tokens of frames at frame_pos
        pos = np.repeat(np.asarray(frame_pos, dtype=np.float64), 1)
        c_t, s_t = get_1d_rotary_pos_embed(t_dim, pos, 10000.0, use_real=True,
                                           repeat_interleave_real=True, freqs_dtype=torch.float64)
        n = len(frame_pos)
        _, ch, cw = rope.freqs_cos.split([t_dim, rope.h_dim, rope.w_dim], dim=1)
        _, sh, sw = rope.freqs_sin.split([t_dim, rope.h_dim, rope.w_dim], dim=1)
        def grid(t, hh, ww):
            return torch.cat([t.double().view(n, 1, 1, -1).expand(n, pph, ppw, -1),
                              hh[:pph].double().view(1, pph, 1, -1).expand(n, pph, ppw, -1),
                              ww[:ppw].double().view(1, 1, ppw, -1).expand(n, pph, ppw, -1)],
                             dim=-1).reshape(n * T, 1, -1)
        c, s = grid(c_t, ch, cw), grid(s_t, sh, sw)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2] = x1 * c[..., 0::2] - x2 * s[..., 1::2]
        out[..., 1::2] = x1 * s[..., 0::2] + x2 * c[..., 1::2]
        return out

    H = attn.heads
    with torch.no_grad():
        q = attn.norm_q(attn.to_q(h)).double()[0].unflatten(-1, (H, -1))      # (F*T, H, D)
        k = attn.norm_k(attn.to_k(h)).double()[0].unflatten(-1, (H, -1))
        v = attn.to_v(h).double()[0].unflatten(-1, (H, -1))
        D = q.shape[-1]
        frames = list(range(F))
        qr, kr = rot(q, frames), rot(k, frames)
        out = torch.empty_like(q)
        for a in frames:
            qa = qr[a * T:(a + 1) * T]                                          # (T, H, D)
            loc = [b for b in frames if abs(b - a) <= window]
            keys = torch.cat([kr[b * T:(b + 1) * T] for b in loc])
            vals = torch.cat([v[b * T:(b + 1) * T] for b in loc])
            bias = [local_bias] * len(keys)
            for g in glob:
                p = g if M is None else a - max(-M, min(M, a - g))
                keys = torch.cat([keys, rot(k[g * T:(g + 1) * T], [p])])
                vals = torch.cat([vals, v[g * T:(g + 1) * T]])
                bias += [global_bias] * T
            s = torch.einsum("thd,nhd->htn", qa, keys) / D ** 0.5 + torch.tensor(bias, dtype=torch.float64)
            out[a * T:(a + 1) * T] = torch.einsum("htn,nhd->thd", s.softmax(-1), vals)
        return attn.to_out[0](out.flatten(1).float()[None])


@pytest.mark.parametrize("positions", ["clamp", "true"])
def test_the_global_scope_against_a_hand_written_oracle(positions):
    from vinf_engine.layout import global_frames
    model = tiny_wan_transformer()
    F, pph, ppw = 11, 2, 3
    T = pph * ppw
    cfg = vinf.DualScopeConfig(window=2, num_global=3, phase_t=500, phase_bias=1.5,
                               trained_frames=3, global_positions=positions)
    vinf.parallelize(model, cfg)
    x = torch.zeros(1, 16, F, 2 * pph, 2 * ppw)
    eng = model.vinf_engine
    eng.begin_step(x, 900)
    rotary = model.rope(x)
    attn = model.blocks[0].attn1
    h = torch.randn(1, F * T, attn.inner_dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = attn(h, None, None, rotary)
    ref = _oracle(attn, h, F, T, pph, ppw, 2, global_frames(F, 3), 2 if positions == "clamp" else None,
                  eng.local_bias, eng.global_bias)
    assert eng.global_bias == 1.5
    assert rel_err(got, ref) <= 1e-5
    if positions == "clamp":                              # the clamp changes something here
        other = _oracle(attn, h, F, T, pph, ppw, 2, global_frames(F, 3), None, 0.0, 1.5)
        assert rel_err(other, ref) > 1e-4


def test_per_token_timesteps(two_ranks):
    # TI2V-5B passes one timestep per token, (B, S); each rank passes its own clip's tokens.
    model = tiny_wan_transformer()
    x, text = wan_inputs(FRAMES)
    S = FRAMES * 2 * 2
    with torch.no_grad():
        stock = model(hidden_states=x, timestep=torch.full((2, S), 900.0),
                      encoder_hidden_states=text).sample
    vinf.parallelize(model, vinf.DualScopeConfig(**DUAL))
    with torch.no_grad():
        one = model(hidden_states=x, timestep=torch.full((2, S), 900.0),
                    encoder_hidden_states=text).sample
    out = torch.cat([r["per_token"] for r in two_ranks], dim=2)
    assert rel_err(out, one) <= 1e-5 and rel_err(one, stock) > 1e-3
    vinf.unparallelize(model)
    vinf.parallelize(model, vinf.DualScopeConfig(window=100, num_global=0, phase_bias=0.0))
    with torch.no_grad():
        exact = model(hidden_states=x, timestep=torch.full((2, S), 900.0),
                      encoder_hidden_states=text).sample
    assert rel_err(exact, stock) <= 1e-5


def test_bytes_per_rank_are_flat_as_the_video_grows(two_ranks):
    for r in two_ranks:
        assert r["bytes", 8] > 0
        assert r["bytes", 16] == r["bytes", 32], (r["bytes", 16], r["bytes", 32])


def test_a_window_past_the_trained_range_warns_with_both_numbers():
    model = tiny_wan_transformer()
    vinf.parallelize(model, vinf.DualScopeConfig(window=24, num_global=0))
    x, text = wan_inputs(26)
    with pytest.warns(UserWarning, match=r"window 24 reaches past the trained range: .* "
                                         r"trained on 21 latent frames \(relative distances up to 20\)"):
        with torch.no_grad():
            Wan.call(model, x, 900, text)
    from vinf_engine.models.wan import window_problem
    assert window_problem(model, model.vinf_engine.config, 26) is not None
    assert window_problem(model, model.vinf_engine.config, 21) is None     # window clipped to 20


def test_a_whole_forward_runs_the_triton_kernels(monkeypatch):
    # VINF_BACKEND=triton forces every op onto the Triton kernels (here in their CPU
    # interpreter): the DiT kernel for the local + global scope, its global-only variant for
    # the interior frames' and the clamped global scope. Same output as the reference path.
    pytest.importorskip("triton")
    from vinf_engine.ops import dispatch
    cfg = vinf.DualScopeConfig(window=1, num_global=2, trained_frames=3, phase_t=500,
                               phase_bias=1.0)
    x, text = wan_inputs(7, batch=1)
    model = tiny_wan_transformer()
    vinf.parallelize(model, cfg)
    with torch.no_grad():
        ref = Wan.call(model, x, 900, text)
    calls = []
    for op in ("dual_scope_attention", "attention_with_lse"):
        impl = dispatch.implementations(op)["triton"]
        monkeypatch.setitem(dispatch._IMPLS[op], "triton", dispatch.Impl(
            lambda *a, _f=impl.fn, _op=op, **k: calls.append(_op) or _f(*a, **k), impl.supports))
    monkeypatch.setenv("VINF_BACKEND", "triton")
    with torch.no_grad():
        out = Wan.call(model, x, 900, text)
    assert {"dual_scope_attention", "attention_with_lse"} <= set(calls)
    assert rel_err(out, ref) <= 1e-4
