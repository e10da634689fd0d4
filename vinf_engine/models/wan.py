"""diffusers ``WanTransformer3DModel`` (Wan 2.1, the Wan 2.2 A14B experts, Wan 2.2 TI2V-5B) made
clip-parallel.

The patch embedding has temporal patch 1, so tokens are frame-major (``f*h'w' + h*w' + w``)
and each block's self-attention ``attn1`` is the only thing that couples frames; norms, FFN
and cross-attention act per token and stay untouched.

    rope             -> ClipWanRotaryPosEmbed  this clip's frames at their *global* positions,
                                               from the formula (past the 1024-row table)
    blocks[i].attn1  -> WanDualScopeProcessor  layers.clip_attention over T = h'*w' tokens per
                                               frame; the halo and global frames' attention
                                               input arrives and the receiver projects, norms
                                               and rotates it at those frames' positions
    forward pre-hook -> engine.begin_step      the step's layout and timestep, agreed

The halos carry ``attn1``'s input, already modulated by its own tokens' timestep (TI2V's
per-token timesteps never travel). Global keys sit at clamped relative offsets by default
(``DualScopeConfig.global_positions``): a query never sees a temporal distance past the
trained range, which needs the global scope scored per query frame (``_ClampedGlobalScope``).
"""
from __future__ import annotations


import torch
from diffusers import WanTransformer3DModel
from diffusers.models.attention import FeedForward
from diffusers.models.transformers.transformer_wan import (WanAttention, WanAttnProcessor,
                                                           WanRotaryPosEmbed,
                                                           WanTransformerBlock)

from ..config import DualScopeConfig
from ..layers import clip_attention
from ..layers.attention import clip_attention_in_chunks
from ..layers.attention import global_attention
from . import register
from .base import (AdapterBase, EngineProcessor, Patcher, step_arguments,
                   warn_past_trained_range, window_past_trained_range)

__all__ = ["WanAdapter", "WanDualScopeProcessor", "ClipWanRotaryPosEmbed", "trained_frames"]

ROPE_THETA = 10000.0       # WanRotaryPosEmbed's default; checked against the model's table
# Logits in one chunk of the clamped global scope: bounds its rotated keys to ~256 MiB (fp32).
_GLOBAL_CHUNK_ELEMS = 1 << 26


def trained_frames(model, config: DualScopeConfig | None = None) -> int:
    """Latent frames the model was trained on: the config's, else the family's (Wan 2.1 and
    2.2 A14B: 81 video frames = 21 latent; TI2V-5B, 48 latent channels: 121 = 31)."""
    if config is not None and config.trained_frames is not None:
        return config.trained_frames
    return 31 if model.config.in_channels == 48 else 21


class _Grid:
    """The step's token grid, written by the patched ``rope`` and read by every processor:
    the state they share. ``at(positions)`` caches rotations per grid and position set
    across steps, so that a step after the first makes none (no host-to-device copy: what
    keeps a step free of host syncs, and capturable once warmed up)."""

    _MAX_CACHED = 256

    def __init__(self, rope):
        self.rope = rope
        self.pph = self.ppw = None
        self._cache: dict = {}

    def set(self, pph: int, ppw: int):
        self.pph, self.ppw = pph, ppw
        if len(self._cache) > self._MAX_CACHED:
            self._cache.clear()

    @property
    def tokens_per_frame(self) -> int:
        return self.pph * self.ppw

    def at(self, frames: tuple) -> tuple:
        """Rotations of the tokens of frames at temporal positions ``frames`` (numbers)."""
        if torch.compiler.is_compiling():
            # Computed in the graph: a cache lookup would guard on the cache and recompile the
            # step once it is warm.
            return self.rope.rotations(torch.tensor(frames, dtype=torch.float64), self.pph,
                                       self.ppw)
        key = (self.pph, self.ppw, frames)
        got = self._cache.get(key)
        if got is None:
            pos = torch.tensor(frames, dtype=torch.float64)
            got = self._cache[key] = self.rope.rotations(pos, self.pph, self.ppw)
        return got


class ClipWanRotaryPosEmbed(WanRotaryPosEmbed):
    """``WanRotaryPosEmbed`` at this clip's global frame positions (``_vinf``: the engine;
    ``_vinf_grid``: the shared ``_Grid``)."""

    def forward(self, hidden_states):
        eng = self._vinf
        _, _, F, H, W = hidden_states.shape
        p_t, p_h, p_w = self.patch_size
        self._vinf_grid.set(H // p_h, W // p_w)
        start = eng.layout.start(eng.rank)
        return self._vinf_grid.at(tuple(range(start, start + F // p_t)))

    def rotations(self, frames: torch.Tensor, pph: int, ppw: int) -> tuple:
        """``(cos, sin)``, each (1, n*pph*ppw, 1, head_dim) fp32, for the tokens of frames at
        temporal positions ``frames`` (n,) fp64: the stock table's values (bitwise, for
        integer positions inside it), from its formula, so any position works."""
        dev = self.freqs_cos.device
        t = self.t_dim
        inv = 1.0 / (ROPE_THETA ** (torch.arange(0, t, 2, dtype=torch.float64, device=dev) / t))
        ang = torch.outer(frames.to(dev, torch.float64), inv)
        cos_t = ang.cos().repeat_interleave(2, dim=1).float()
        sin_t = ang.sin().repeat_interleave(2, dim=1).float()
        n = frames.numel()
        out = []
        for table_t, table in ((cos_t, self.freqs_cos), (sin_t, self.freqs_sin)):
            _, h_tab, w_tab = table.split([self.t_dim, self.h_dim, self.w_dim], dim=1)
            f = table_t.view(n, 1, 1, -1).expand(n, pph, ppw, -1)
            h = h_tab[:pph].view(1, pph, 1, -1).expand(n, pph, ppw, -1)
            w = w_tab[:ppw].view(1, 1, ppw, -1).expand(n, pph, ppw, -1)
            out.append(torch.cat([f, h, w], dim=-1).reshape(1, n * pph * ppw, 1, -1))
        return tuple(out)


def _rotate(x, cos, sin):
    """diffusers' Wan ``apply_rotary_emb``, operation for operation (bitwise the same)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = cos[..., 0::2]
    sin = sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def _keys(attn, x):
    """Un-rotated keys and values of ``x`` (B, n, C): (B, n, H, D) each."""
    k = attn.norm_k(attn.to_k(x)).unflatten(2, (attn.heads, -1))
    return k, attn.to_v(x).unflatten(2, (attn.heads, -1))


class WanDualScopeProcessor(EngineProcessor):
    """``attn1`` of a Wan block as dual-scope attention over this rank's clip.

    ``max_distance``: None (global keys at their true positions, in the op's softmax), or the
    largest relative temporal offset a global logit may see (the trained range): global keys
    farther from a query frame sit at that offset instead, scored per query frame."""

    def __init__(self, engine, grid: _Grid, max_distance: int | None):
        self.engine = engine
        self.grid = grid
        self.max_distance = max_distance

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None or rotary_emb is None:
            raise ValueError("Wan self-attention under clip parallelism takes rotary_emb and "
                             "neither encoder_hidden_states nor an attention_mask")
        eng, grid = self.engine, self.grid
        B, S, C = hidden_states.shape
        T = grid.tokens_per_frame
        Fc = S // T
        pending = eng.start_attention_context(hidden_states.view(B, Fc, T, C))
        cos, sin = rotary_emb

        def queries(a, b):                      # frames [a, b) of the clip, rotated
            x = hidden_states[:, a * T:b * T]
            return _rotate(attn.norm_q(attn.to_q(x)).unflatten(2, (attn.heads, -1)),
                           cos[:, a * T:b * T], sin[:, a * T:b * T])
        n = self._frames_per_chunk(hidden_states, Fc)
        if n < Fc:
            # Memory-bounded: the keys and values too, written per chunk of
            # frames into the whole clip's (their projection, norm and rotation temporaries
            # never held for the whole clip).
            k = v = None
            for a in range(0, Fc, n):
                b = min(Fc, a + n)
                kc, vc = _keys(attn, hidden_states[:, a * T:b * T])
                kc = _rotate(kc, cos[:, a * T:b * T], sin[:, a * T:b * T])
                if k is None:
                    k, v = kc.new_empty(B, S, *kc.shape[2:]), vc.new_empty(B, S, *vc.shape[2:])
                k[:, a * T:b * T] = kc
                v[:, a * T:b * T] = vc
        else:
            k, v = _keys(attn, hidden_states)
            k = _rotate(k, *rotary_emb)

        def project_kv(x, frames):              # x: (B, n, T, C), the frames' attention input
            k_, v_ = _keys(attn, x.flatten(1, 2))
            return _rotate(k_, *grid.at(frames)), v_

        s = eng.layout.start(eng.rank)
        g = eng.attention_plan().glob_frames
        clamped = (self.max_distance is not None and g and
                   max(abs(a - b) for a in (s, s + Fc - 1) for b in g) > self.max_distance)

        def scope_of(q, a, b):                  # the global scope of frames [a, b), or None
            if not clamped:
                return None
            return _ClampedGlobalScope(attn, q, range(s + a, s + b), T, self.max_distance,
                                       grid, eng)

        def finish(o):
            return attn.to_out[1](attn.to_out[0](o.flatten(2, 3).type_as(hidden_states)))

        head_dim = attn.inner_dim // attn.heads
        if n < Fc:
            # Memory-bounded: queries, their attention and the output projection
            # per chunk of frames, written into the output (keys and values stay whole).
            out = None

            def emit(a, b, o):
                nonlocal out
                y = finish(o)
                if out is None:
                    out = y.new_empty(B, S, y.shape[-1])
                out[:, a * T:b * T] = y
            clip_attention_in_chunks(eng, pending, queries, k, v, project_kv, emit,
                                     scale=head_dim ** -0.5, tokens_per_frame=T,
                                     frames_per_chunk=n, global_scope_of=scope_of)
            return out
        q = queries(0, Fc)
        out = clip_attention(eng, pending, q, k, v, project_kv, scale=head_dim ** -0.5,
                             tokens_per_frame=T, global_scope=scope_of(q, 0, Fc))
        return finish(out)

    # Per query byte of a chunk: the projection, its norm and rotation, the attention's
    # output and the output projection's (the op bounds its own logits); and the chunk's
    # band of keys and values, its frames and a window each side (padded for the op).
    _CHUNK_FACTOR = 6

    def _frames_per_chunk(self, x, Fc: int) -> int:
        """Query frames per chunk within the engine's budget; ``Fc`` (no chunks) unbudgeted.
        A clip that fits runs whole, on several ranks its interior attending while the
        context is in flight (``clip_attention``)."""
        budget = self.engine.chunk_bytes
        if not budget:
            return Fc
        per_frame = x.shape[0] * (x.shape[1] // Fc) * x.shape[2] * x.element_size()
        frames = budget // max(1, per_frame)
        w = self.engine.attention_plan().window
        if w < self.engine.layout.num_frames - 1:       # banded: K and V, n + 2w frames each
            n = (frames - 4 * w) // (self._CHUNK_FACTOR + 2)
        else:                                           # dense over keys held once
            n = frames // self._CHUNK_FACTOR
        return max(1, min(Fc, int(n)))


class TokenChunkedWanBlock(WanTransformerBlock):
    """Memory-bounded, on any number of ranks: a ``WanTransformerBlock`` whose per-token
    parts run over chunks of tokens. The self-attention's input (``norm1`` and its
    modulation) is written chunk by chunk; ``attn1`` (its own query-frame chunks) sees the
    whole clip; then each chunk runs the gated residual, ``norm2``, cross-attention,
    ``norm3``, the feed-forward and its gated residual straight into the block's output.
    Everything but ``attn1`` acts per token, so no fp32 temporary of the diffusers forward
    is ever held for the whole clip. The same operations as diffusers' forward, per chunk.

    ``_vinf_bytes``: the working memory allowed per chunk."""

    _FACTOR = 16        # fp32 temporaries per chunk token's input byte: the norms' float
    #                     copies, modulations, cross-attention's query and output, residuals

    def forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb):
        B, S, C = hidden_states.shape
        step = max(1, int(self._vinf_bytes // max(1, B * C * 4 * self._FACTOR)))
        if step >= S:
            return super().forward(hidden_states, encoder_hidden_states, temb, rotary_emb)
        if temb.ndim == 4:      # Wan 2.2 TI2V: one modulation per token, (B, S, C) each
            mods = [m.squeeze(2) for m in (self.scale_shift_table.unsqueeze(0)
                                           + temb.float()).chunk(6, dim=2)]
        else:                   # (B, 1, C) each, for every token
            mods = list((self.scale_shift_table + temb.float()).chunk(6, dim=1))
        chunks = [(a, min(S, a + step)) for a in range(0, S, step)]

        def at(m, a, b):
            return m if m.shape[1] == 1 else m[:, a:b]
        shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = mods
        normed = torch.empty_like(hidden_states)
        for a, b in chunks:
            normed[:, a:b] = (self.norm1(hidden_states[:, a:b].float()) * (1 + at(scale_msa, a, b))
                              + at(shift_msa, a, b)).type_as(hidden_states)
        attn_output = self.attn1(normed, None, None, rotary_emb)
        del normed
        out = torch.empty_like(hidden_states)
        for a, b in chunks:
            h = (hidden_states[:, a:b].float() + attn_output[:, a:b] * at(gate_msa, a, b)
                 ).type_as(hidden_states)
            h = h + self.attn2(self.norm2(h.float()).type_as(h), encoder_hidden_states,
                               None, None)
            n3 = (self.norm3(h.float()) * (1 + at(c_scale_msa, a, b))
                  + at(c_shift_msa, a, b)).type_as(h)
            out[:, a:b] = (h.float() + self.ffn(n3).float() * at(c_gate_msa, a, b)).type_as(h)
        return out


class _ClampedGlobalScope:
    """The global scope with clamped relative offsets: query frame ``a`` sees global frame
    ``g``'s keys rotated at ``a - clamp(a - g, -M, M)``, i.e. at distance ``min(|a - g|, M)``.
    Rotation is relative, so the queries keep their own rotation and the keys are rotated
    once per query frame: Ng*T keys per query frame, T times fewer than its logits."""

    def __init__(self, attn, q, frames: range, T: int, M: int, grid: _Grid, engine):
        self.attn, self.q, self.frames, self.T, self.M = attn, q, frames, T, M
        self.grid, self.engine = grid, engine

    def __call__(self, ctx):
        attn, q, T, M = self.attn, self.q, self.T, self.M
        k, v = _keys(attn, ctx.glob.flatten(1, 2))         # (B, Ng*T, H, D), un-rotated
        B, NgT, H, D = k.shape
        n = max(1, min(len(self.frames), _GLOBAL_CHUNK_ELEMS // max(1, B * NgT * H * D)))
        outs, lses = [], []
        for i in range(0, len(self.frames), n):
            chunk = self.frames[i:i + n]
            # global frame g seen from query frame a: at a - clamp(a - g, -M, M)
            pos = tuple(float(a - max(-M, min(M, a - g))) for a in chunk for g in ctx.glob_frames)
            cos, sin = self.grid.at(pos)
            m = len(chunk)
            kr = _rotate(k.unsqueeze(1).expand(B, m, NgT, H, D), cos.view(1, m, NgT, 1, -1),
                         sin.view(1, m, NgT, 1, -1))
            vr = v.unsqueeze(1).expand(B, m, NgT, H, D)
            qc = q[:, i * T:(i + m) * T].reshape(B * m, T, H, D)
            o, lse = global_attention(self.engine, qc, kr.reshape(B * m, NgT, H, D),
                                      vr.reshape(B * m, NgT, H, D), D ** -0.5)
            outs.append(o.reshape(B, m * T, H, D))
            lses.append(lse.reshape(B, m, H, T).permute(0, 2, 1, 3).reshape(B, H, m * T))
        return torch.cat(outs, dim=1), torch.cat(lses, dim=2)


@register
class WanAdapter(AdapterBase):
    """Patches a diffusers ``WanTransformer3DModel`` (or a subclass) for clip parallelism."""

    name = "Wan (Wan 2.1, Wan 2.2 A14B, Wan 2.2 TI2V-5B)"
    # blocking is the published UNet prototype's K/V pattern; with RoPE it would move keys
    # rotated at their owner's positions, which the clamped global scope cannot use.
    inputs = ("hidden_states", "timestep")       # the forward's clip and timestep parameters
    comm_modes = ("overlap", "stale", "loopback")
    caches = True                                # uniform blocks: a step cache fits them

    @staticmethod
    def cache_problem(model, cache) -> str | None:
        n = len(model.blocks)
        if cache.front + cache.back >= n:
            return (f"the step cache's front ({cache.front}) and back ({cache.back}) blocks "
                    f"leave no middle of the model's {n} blocks to skip")
        return None

    @classmethod
    def model_classes(cls) -> tuple:
        return (WanTransformer3DModel,)

    # The diffusers classes the checks and the patch expect: a family built on Wan's
    # architecture in classes of its own (SkyReels-V2) names its own.
    rope_class, clip_rope_class = WanRotaryPosEmbed, ClipWanRotaryPosEmbed
    attention_class, processor_class = WanAttention, WanAttnProcessor
    trained_frames = staticmethod(trained_frames)

    @classmethod
    def check(cls, model) -> str | None:
        p_t = model.config.patch_size[0]
        if p_t != 1:
            return (f"temporal patch size {p_t}: tokens would span {p_t} latent frames; the "
                    "engine splits Wan's frame-major tokens by latent frame (patch 1)")
        if type(model.rope) is not cls.rope_class:
            return (f"rope is {type(model.rope).__name__}, expected diffusers' "
                    f"{cls.rope_class.__name__}")
        rope = model.rope
        rows = min(rope.max_seq_len, 3)
        cos, _ = ClipWanRotaryPosEmbed.rotations(rope, torch.arange(rows, dtype=torch.float64),
                                                 1, 1)
        if not torch.equal(cos.view(rows, -1)[:, :rope.t_dim], rope.freqs_cos[:rows, :rope.t_dim]):
            return ("rope's temporal table does not follow the theta=10000 formula; the engine "
                    "computes positions past the table from it")
        if not len(model.blocks):
            return "model has no transformer blocks"
        for i, block in enumerate(model.blocks):
            attn = getattr(block, "attn1", None)
            where = f"blocks.{i}.attn1"
            if not isinstance(attn, cls.attention_class) or attn.is_cross_attention:
                return (f"{where} is {type(attn).__name__}, expected "
                        f"{cls.attention_class.__name__} self-attention")
            if attn.add_k_proj is not None:
                return f"{where} has added image keys; not supported in self-attention"
            if type(attn.processor) is not cls.processor_class:
                return (f"{where} runs {type(attn.processor).__name__}; the engine replaces "
                        f"diffusers' {cls.processor_class.__name__} only")
            if getattr(attn.processor, "_parallel_config", None) is not None:
                return (f"{where} is set up for diffusers' own context parallelism; use one "
                        "of the two, not both")
        return None

    @staticmethod
    def step_problem(model, args, kwargs) -> str | None:
        """Why this forward call cannot run clip-parallel, or None (told to every rank)."""
        return None

    @staticmethod
    def default_config(model) -> DualScopeConfig:
        # Local scope +-8 (17 frames) and 8 global frames: about the 21 frames of keys each
        # query saw in training, so attention's entropy stays near the trained regime, and
        # its cost per frame stays near the trained length's.
        return DualScopeConfig(window=8, num_global=8)

    @staticmethod
    def check_config(model, config: DualScopeConfig) -> str | None:
        if config.trained_frames is not None and config.trained_frames < 2:
            return f"trained_frames {config.trained_frames}: a model trained on one frame has no temporal range"
        return None

    def patch(self, model, engine, patcher: Patcher):
        config = engine.config
        L = self.trained_frames(model, config)
        M = L - 1 if config.global_positions == "clamp" else None
        grid = _Grid(model.rope)
        patcher.swap_class(model.rope, self.clip_rope_class, _vinf=engine, _vinf_grid=grid)
        for block in model.blocks:
            patcher.set_processor(block.attn1, WanDualScopeProcessor(engine, grid, M))
            if engine.chunk_bytes and type(block) is WanTransformerBlock:
                patcher.swap_class(block, TokenChunkedWanBlock, _vinf_bytes=engine.chunk_bytes)
            if type(block.ffn) is FeedForward:
                # Its hidden layer is ffn_dim/dim (5.8 for Wan 2.1) times the tokens, in the
                # model's dtype, plus the GELU's temporary: over token chunks.
                patcher.chunk(block.ffn, ("hidden_states",), 1, 8)
        warned = set()

        def begin(args, kwargs):
            layout = engine.begin_step(*step_arguments(args, kwargs, self.inputs),
                                       problem=self.step_problem(model, args, kwargs))
            warn_past_trained_range(model, config.window, layout.num_frames, L, warned)
        patcher.before_forward(model, begin)
        patcher.flush_after([*model.blocks, model])
        if engine.cache_config is not None:
            from ..cache import StepCache, cache_blocks
            engine.cache = StepCache(engine.cache_config, engine)
            cache_blocks(patcher, list(model.blocks), engine.cache)


def window_problem(model, config: DualScopeConfig, num_frames: int,
                   frames_of=trained_frames) -> str | None:
    """Why ``config``'s local window reaches past ``model``'s trained range on a video of
    ``num_frames`` latent frames, or None (the generation pipeline refuses it); ``frames_of``:
    the family's ``trained_frames``."""
    return window_past_trained_range(config.window, num_frames, frames_of(model, config))

