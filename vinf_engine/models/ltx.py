"""diffusers ``LTXVideoTransformer3DModel`` (LTX-Video 0.9.x) made clip-parallel.

Patch size 1 in time and space, so the packed tokens ``(B, F*h*w, C)`` are frame-major and
each block's self-attention ``attn1`` is the only thing that couples frames; norms, the
feed-forward and the text cross-attention ``attn2`` act per token and stay untouched. The
model takes packed tokens with ``num_frames``, ``height`` and ``width`` (latent) arguments
rather than a 5-D latent: each rank passes its clip's tokens and its clip's ``num_frames``.
Or, as ``LTXConditionPipeline`` calls it, with ``video_coords`` (B, 3, N), each token's
(time, row, column) position: under clip parallelism every rank passes the *whole video's*
coordinates (one frame-major grid, ``coords_grid``) with its clip's tokens, so that the
positions of the frames other ranks hold, which it attends to, are known here.

    rope             -> ClipLTXRotaryPosEmbed  this clip's frames at their *global* positions
                                               (frame index x temporal compression / frame
                                               rate / 20, as the stock grid scales them; or
                                               the whole video's video_coords, sliced)
    blocks[i].attn1  -> LTXDualScopeProcessor  layers.clip_attention over T = h*w tokens per
                                               frame; the halo and global frames' attention
                                               input arrives and the receiver projects, norms
                                               and rotates it at those frames' positions
    forward          -> engine.begin_step      the step's layout and timestep, agreed, on a
                                               5-D view (B, C, F, h, w) of the packed tokens

LTX rotates the whole inner dimension (every head) before the head split, with angles affine
in the position (``freqs * (2 * position - 1)``), so a logit depends on the relative offset
only, as with Wan: global keys sit at clamped relative offsets by default
(``DualScopeConfig.global_positions``), scored per query frame (``_ClampedGlobalScope``).
"""
from __future__ import annotations

import hashlib
import inspect
import math

import torch
from diffusers import LTXVideoTransformer3DModel
from diffusers.models.attention import FeedForward
from diffusers.models.transformers.transformer_ltx import (LTXAttention, LTXVideoAttnProcessor,
                                                           LTXVideoRotaryPosEmbed,
                                                           LTXVideoTransformerBlock)

from ..config import DualScopeConfig
from ..layers import clip_attention
from ..layers.attention import clip_attention_in_chunks, global_attention
from . import register
from .base import (AdapterBase, EngineProcessor, Patcher, warn_past_trained_range,
                   window_past_trained_range)

__all__ = ["LTXAdapter", "LTXDualScopeProcessor", "ClipLTXRotaryPosEmbed", "trained_frames",
           "TRAINED_FRAMES", "window_problem", "coords_grid"]

# LTX-Video 0.9.x: LTXPipeline's default 161 video frames = 21 latent frames (relative
# distances up to 20). The model card recommends under 257 frames (33 latent): a model used
# that long may set DualScopeConfig.trained_frames=33.
TRAINED_FRAMES = 21
# Logits in one chunk of the clamped global scope: bounds its rotated keys (fp32).
_GLOBAL_CHUNK_ELEMS = 1 << 26


def trained_frames(model, config: DualScopeConfig | None = None) -> int:
    """Latent frames the model was trained on: the config's, else ``TRAINED_FRAMES``."""
    if config is not None and config.trained_frames is not None:
        return config.trained_frames
    return TRAINED_FRAMES


def _scale_key(scale) -> tuple | None:
    if scale is None:
        return None
    return tuple(float(s) for s in scale)


class _Grid:
    """The step's token grid and RoPE scale, written by the patched ``rope`` and read by every
    processor: the state they share. ``at(positions)`` caches rotations per grid and position
    set across steps (a step after the first computes none)."""

    _MAX_CACHED = 256

    def __init__(self, rope):
        self.rope = rope
        self.h = self.w = None
        self.scale = None
        self.coords = None          # a ``_Coords``: positions given by video_coords
        self._cache: dict = {}

    def set(self, h: int, w: int, scale, coords: "_Coords | None" = None):
        self.h, self.w, self.scale, self.coords = h, w, scale, coords
        if len(self._cache) > self._MAX_CACHED:
            self._cache.clear()

    @property
    def tokens_per_frame(self) -> int:
        return self.h * self.w

    def at(self, frames: tuple, device) -> tuple:
        """Rotations ``(cos, sin)``, each (1, n*h*w, C) fp32, of the tokens of frames at
        temporal positions ``frames`` (integers, global)."""
        c = self.coords
        if torch.compiler.is_compiling():
            return self._rotations(frames, device)
        key = (self.h, self.w, _scale_key(self.scale), frames, str(device),
               c.key if c is not None else None)
        got = self._cache.get(key)
        if got is None:
            got = self._cache[key] = self._rotations(frames, device)
        return got

    def _rotations(self, frames: tuple, device) -> tuple:
        if self.coords is None:
            return self.rope.rotations(frames, self.h, self.w, self.scale, device)
        return self.rope.coord_rotations(self.coords, frames, device)


class _Coords(tuple):
    """The whole video's ``video_coords`` read as one frame-major grid: ``(row, frames, h, w,
    key)``, ``row`` (3, frames*h*w) fp32 (one batch row: every row is the same), ``key`` a
    digest of its values (the rotation cache's)."""

    row = property(lambda self: self[0])
    frames = property(lambda self: self[1])
    h = property(lambda self: self[2])
    w = property(lambda self: self[3])
    key = property(lambda self: self[4])


def coords_grid(video_coords) -> tuple:
    """``(_Coords, None)``, or ``(None, why not)``: ``video_coords`` (B, 3, N) as the stock
    LTX pipelines make them for a video alone, a frame-major grid: each frame's tokens share
    one time coordinate, times rise from frame to frame, every frame has the same row-major
    spatial grid. ``LTXConditionPipeline``'s conditions at ``frame_index > 0`` put their
    latent tokens before the video's, at their own positions: no grid."""
    if not isinstance(video_coords, torch.Tensor) or video_coords.dim() != 3 or \
            video_coords.shape[1] != 3 or video_coords.shape[2] < 1:
        shape = (tuple(video_coords.shape) if isinstance(video_coords, torch.Tensor)
                 else type(video_coords).__name__)
        return None, f"video_coords must be (B, 3, tokens), got {shape}"
    c = video_coords.detach().float()
    if c.shape[0] > 1 and not torch.equal(c, c[:1].expand_as(c)):
        return None, "video_coords differ between batch rows (one video's positions expected)"
    row = c[0]
    cpu = row.cpu()
    N = cpu.shape[1]
    t = cpu[0]
    moved = (t != t[0]).nonzero()
    T = int(moved[0]) if len(moved) else N
    F = N // T
    rows, cols = cpu[1, :T].unique(), cpu[2, :T].unique()
    h, w = len(rows), len(cols)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij")).flatten(1)
    tv, sp = t.view(-1)[:F * T].view(F, T), cpu[1:, :F * T].view(2, F, T)
    if (N % T or h * w != T or not torch.equal(cpu[1:, :T], grid)
            or not bool((tv == tv[:, :1]).all()) or not bool((tv[1:, 0] > tv[:-1, 0]).all())
            or not bool((sp == sp[:, :1]).all())):
        return None, ("video_coords are not one frame-major grid of the video's latent frames "
                      "(LTXConditionPipeline puts the latent tokens of a condition at "
                      "frame_index > 0 before the video's, at their own positions: tokens "
                      "that are no frame of the video, which clip parallelism cannot split)")
    key = hashlib.sha256(cpu.numpy().tobytes()).hexdigest()[:16]
    return _Coords((row, F, h, w, key)), None


def _angles(rope, grid: torch.Tensor, axis: int, scale) -> torch.Tensor:
    """(n, dim // 6) angles of positions ``grid`` (n,) fp32 on one axis (0: frames, 1: rows,
    2: columns): the stock ``_prepare_video_coords`` scaling and ``forward``'s frequencies,
    op for op."""
    base = (rope.base_num_frames, rope.base_height, rope.base_width)[axis]
    patch = rope.patch_size_t if axis == 0 else rope.patch_size
    if scale is not None:
        grid = grid * scale[axis] * patch / base
    freqs = rope.theta ** torch.linspace(math.log(1.0, rope.theta),
                                         math.log(rope.theta, rope.theta), rope.dim // 6,
                                         device=grid.device, dtype=torch.float32)
    freqs = freqs * math.pi / 2.0
    return freqs * (grid.unsqueeze(-1) * 2 - 1)


class ClipLTXRotaryPosEmbed(LTXVideoRotaryPosEmbed):
    """``LTXVideoRotaryPosEmbed`` at this clip's global frame positions (``_vinf``: the engine;
    ``_vinf_grid``: the shared ``_Grid``)."""

    def forward(self, hidden_states, num_frames=None, height=None, width=None,
                rope_interpolation_scale=None, video_coords=None):
        eng = self._vinf
        grid = self._vinf_grid
        if video_coords is None:            # else the grid was set from them (``_begin``)
            grid.set(height, width, rope_interpolation_scale)
        start = eng.layout.start(eng.rank)
        n = hidden_states.shape[1] // grid.tokens_per_frame
        return grid.at(tuple(range(start, start + n)), hidden_states.device)

    def coord_rotations(self, coords: _Coords, frames: tuple, device) -> tuple:
        """``(cos, sin)`` of the tokens of frames ``frames`` (global indices) at their
        ``coords``: the stock forward's own ops on those tokens' coordinates."""
        T = coords.h * coords.w
        row = coords.row
        idx = (torch.tensor(frames, device=row.device)[:, None] * T
               + torch.arange(T, device=row.device)).flatten()
        picked = row[:, idx][None].to(device)
        return LTXVideoRotaryPosEmbed.forward(self, torch.empty(1, 0, device=device),
                                              video_coords=picked)

    def rotations(self, frames: tuple, h: int, w: int, scale, device) -> tuple:
        """``(cos, sin)``, each (1, n*h*w, dim) fp32, for the tokens of frames at temporal
        positions ``frames`` (n integers) on an ``h x w`` grid: the stock values (its
        channel order: per frequency the (f, h, w) triple, each twice; ``dim % 6`` leading
        channels unrotated), for any position."""
        n = len(frames)
        axes = [_angles(self, torch.tensor(frames, dtype=torch.float32, device=device), 0, scale),
                _angles(self, torch.arange(h, dtype=torch.float32, device=device), 1, scale),
                _angles(self, torch.arange(w, dtype=torch.float32, device=device), 2, scale)]
        K = self.dim // 6
        ang = torch.stack([axes[0].view(n, 1, 1, K).expand(n, h, w, K),
                           axes[1].view(1, h, 1, K).expand(n, h, w, K),
                           axes[2].view(1, 1, w, K).expand(n, h, w, K)], dim=-1)
        ang = ang.reshape(1, n * h * w, 3 * K)
        cos, sin = ang.cos().repeat_interleave(2, dim=-1), ang.sin().repeat_interleave(2, dim=-1)
        pad = self.dim % 6
        if pad:
            cos = torch.cat([torch.ones_like(cos[..., :pad]), cos], dim=-1)
            sin = torch.cat([torch.zeros_like(sin[..., :pad]), sin], dim=-1)
        return cos, sin


def _rotate(x, cos, sin):
    """diffusers' LTX ``apply_rotary_emb`` over the last dim (bitwise the same on (B, S, C))."""
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(-2)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def _keys(attn, x):
    """Un-rotated keys (B, n, C) after ``norm_k``, and values (B, n, C), of ``x`` (B, n, C)."""
    return attn.norm_k(attn.to_k(x)), attn.to_v(x)


def _heads(attn, t):
    return t.unflatten(-1, (attn.heads, -1))


class LTXDualScopeProcessor(EngineProcessor):
    """``attn1`` of an LTX block as dual-scope attention over this rank's clip.

    ``max_distance``: None (global keys at their true positions, in the op's softmax), or the
    largest relative temporal offset a global logit may see (the trained range): global keys
    farther from a query frame sit at that offset instead, scored per query frame."""

    def __init__(self, engine, grid: _Grid, max_distance: int | None):
        self.engine = engine
        self.grid = grid
        self.max_distance = max_distance

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None or image_rotary_emb is None:
            raise ValueError("LTX self-attention under clip parallelism takes image_rotary_emb "
                             "and neither encoder_hidden_states nor an attention_mask")
        eng, grid = self.engine, self.grid
        B, S, C = hidden_states.shape
        T = grid.tokens_per_frame
        Fc = S // T
        pending = eng.start_attention_context(hidden_states.view(B, Fc, T, C))
        cos, sin = image_rotary_emb

        def queries(a, b):                      # frames [a, b) of the clip, rotated
            x = hidden_states[:, a * T:b * T]
            return _heads(attn, _rotate(attn.norm_q(attn.to_q(x)), cos[:, a * T:b * T],
                                        sin[:, a * T:b * T]))
        n = self._frames_per_chunk(hidden_states, Fc)
        k, v = self._clip_keys(attn, hidden_states, cos, sin, T, n)

        def project_kv(x, frames):              # x: (B, m, T, C), the frames' attention input
            k_, v_ = _keys(attn, x.flatten(1, 2))
            return _heads(attn, _rotate(k_, *grid.at(frames, x.device))), _heads(attn, v_)

        scope_of = self._global_scope(attn, eng, T, Fc)
        scale = (attn.inner_dim // attn.heads) ** -0.5

        def finish(o):
            return attn.to_out[1](attn.to_out[0](o.flatten(2, 3).type_as(hidden_states)))
        if n < Fc:
            # Memory-bounded: queries, their attention and the output projection per chunk of
            # frames, written into the output (keys and values stay whole).
            out = [None]

            def emit(a, b, o):
                y = finish(o)
                if out[0] is None:
                    out[0] = y.new_empty(B, S, y.shape[-1])
                out[0][:, a * T:b * T] = y
            clip_attention_in_chunks(eng, pending, queries, k, v, project_kv, emit, scale=scale,
                                     tokens_per_frame=T, frames_per_chunk=n,
                                     global_scope_of=scope_of)
            return out[0]
        q = queries(0, Fc)
        return finish(clip_attention(eng, pending, q, k, v, project_kv, scale=scale,
                                     tokens_per_frame=T, global_scope=scope_of(q, 0, Fc)))

    @staticmethod
    def _clip_keys(attn, x, cos, sin, T: int, n: int) -> tuple:
        """The clip's rotated keys and values, (B, S, H, D) each; over chunks of ``n`` frames
        when memory-bounded (no projection, norm or rotation temporary held for the clip)."""
        B, S, _ = x.shape
        if n * T >= S:
            k, v = _keys(attn, x)
            return _heads(attn, _rotate(k, cos, sin)), _heads(attn, v)
        k = v = None
        for a in range(0, S, n * T):
            b = min(S, a + n * T)
            kc, vc = _keys(attn, x[:, a:b])
            kc = _rotate(kc, cos[:, a:b], sin[:, a:b])
            if k is None:
                k, v = kc.new_empty(B, S, kc.shape[-1]), vc.new_empty(B, S, vc.shape[-1])
            k[:, a:b], v[:, a:b] = kc, vc
        return _heads(attn, k), _heads(attn, v)

    def _global_scope(self, attn, eng, T: int, Fc: int):
        """``scope_of(q, a, b)``: the clamped global scope of query frames ``[a, b)``, or None
        where every global frame lies within the trained range of every query frame."""
        s = eng.layout.start(eng.rank)
        g = eng.attention_plan().glob_frames
        M = self.max_distance
        clamped = (M is not None and g and
                   max(abs(a - b) for a in (s, s + Fc - 1) for b in g) > M)

        def scope_of(q, a, b):
            if not clamped:
                return None
            return _ClampedGlobalScope(attn, q, range(s + a, s + b), T, M, self.grid, eng)
        return scope_of

    # Per query byte of a chunk: the projection, its norm and fp32 rotation, the attention's
    # output and the output projection's (the op bounds its own logits); and the chunk's
    # band of keys and values, its frames and a window each side.
    _CHUNK_FACTOR = 6

    def _frames_per_chunk(self, x, Fc: int) -> int:
        """Query frames per chunk within the engine's budget; ``Fc`` (no chunks) unbudgeted."""
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


class _ClampedGlobalScope:
    """The global scope with clamped relative offsets: query frame ``a`` sees global frame
    ``g``'s keys rotated at ``a - clamp(a - g, -M, M)``, i.e. at distance ``min(|a - g|, M)``.
    Rotation is relative (angles affine in the position), so the queries keep their own
    rotation and the keys are rotated once per query frame."""

    def __init__(self, attn, q, frames: range, T: int, M: int, grid: _Grid, engine):
        self.attn, self.q, self.frames, self.T, self.M = attn, q, frames, T, M
        self.grid, self.engine = grid, engine

    def __call__(self, ctx):
        attn, q, T, M = self.attn, self.q, self.T, self.M
        k, v = _keys(attn, ctx.glob.flatten(1, 2))         # (B, Ng*T, C), un-rotated
        B, NgT, C = k.shape
        H = attn.heads
        D = C // H
        n = max(1, min(len(self.frames), _GLOBAL_CHUNK_ELEMS // max(1, B * NgT * C)))
        outs, lses = [], []
        for i in range(0, len(self.frames), n):
            chunk = self.frames[i:i + n]
            m = len(chunk)
            pos = tuple(a - max(-M, min(M, a - g)) for a in chunk for g in ctx.glob_frames)
            cos, sin = self.grid.at(pos, k.device)
            kr = _rotate(k.unsqueeze(1).expand(B, m, NgT, C), cos.view(1, m, NgT, C),
                         sin.view(1, m, NgT, C))
            vr = v.unsqueeze(1).expand(B, m, NgT, C)
            qc = q[:, i * T:(i + m) * T].reshape(B * m, T, H, D)
            o, lse = global_attention(self.engine, qc, kr.reshape(B * m, NgT, H, D),
                                      vr.reshape(B * m, NgT, H, D), D ** -0.5)
            outs.append(o.reshape(B, m * T, H, D))
            lses.append(lse.reshape(B, m, H, T).permute(0, 2, 1, 3).reshape(B, H, m * T))
        return torch.cat(outs, dim=1), torch.cat(lses, dim=2)


class TokenChunkedLTXBlock(LTXVideoTransformerBlock):
    """Memory-bounded, on any number of ranks: an ``LTXVideoTransformerBlock`` whose per-token
    parts run over chunks of tokens. ``attn1``'s input (``norm1`` and its modulation) is
    written chunk by chunk; ``attn1`` (its own query-frame chunks) sees the whole clip; then
    each chunk runs the gated residual, the cross-attention, ``norm2``, the feed-forward and
    its gated residual straight into the block's output: the diffusers forward's operations,
    per chunk. ``_vinf_bytes``: the working memory allowed per chunk."""

    _FACTOR = 12        # fp32 temporaries per chunk token's channel: the norms,
    #                     modulations, cross-attention's query and output, the residuals

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                encoder_attention_mask=None):
        B, S, C = hidden_states.shape
        step = max(1, int(self._vinf_bytes // max(1, B * C * 4 * self._FACTOR)))
        if step >= S:
            return super().forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                   encoder_attention_mask)
        ada = self.scale_shift_table[None, None].to(temb.device) + temb.reshape(
            B, temb.size(1), self.scale_shift_table.shape[0], -1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = ada.unbind(dim=2)
        chunks = [(a, min(S, a + step)) for a in range(0, S, step)]

        def at(m, a, b):            # one modulation for every token, or one per token (I2V)
            return m if m.shape[1] == 1 else m[:, a:b]

        normed = None
        for a, b in chunks:
            y = self.norm1(hidden_states[:, a:b]) * (1 + at(scale_msa, a, b)) + at(shift_msa, a, b)
            if normed is None:
                normed = y.new_empty(B, S, C)
            normed[:, a:b] = y
        attn = self.attn1(hidden_states=normed, encoder_hidden_states=None,
                          image_rotary_emb=image_rotary_emb)
        del normed
        out = None
        for a, b in chunks:
            h = hidden_states[:, a:b] + attn[:, a:b] * at(gate_msa, a, b)
            h = h + self.attn2(h, encoder_hidden_states=encoder_hidden_states,
                               image_rotary_emb=None, attention_mask=encoder_attention_mask)
            n2 = self.norm2(h) * (1 + at(scale_mlp, a, b)) + at(shift_mlp, a, b)
            y = h + self.ff(n2) * at(gate_mlp, a, b)
            if out is None:
                out = y.new_empty(B, S, C)
            out[:, a:b] = y
        return out


_FORWARD_PARAMS = tuple(inspect.signature(LTXVideoTransformer3DModel.forward).parameters)[1:]


def _call_values(args: tuple, kwargs: dict) -> dict:
    """The forward's arguments by name, positional or keyword."""
    got = dict(zip(_FORWARD_PARAMS, args))
    got.update(kwargs)
    return got


def clip_view(hidden_states, num_frames, height, width) -> tuple:
    """``(view, problem)``: the packed tokens ``(B, F*h*w, C)`` as a 5-D view ``(B, C, F, h,
    w)`` (what the engine's agreement compares across ranks), or None and why not."""
    dims = (num_frames, height, width)
    if any(isinstance(d, bool) or not isinstance(d, int) for d in dims):
        return None, ("LTX under clip parallelism takes num_frames, height and width as ints "
                      f"(this rank's clip in latent frames, and the latent size); got {dims}")
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3:
        shape = (tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor)
                 else type(hidden_states).__name__)
        return None, f"hidden_states must be packed tokens (B, F*h*w, C), got {shape}"
    B, S, C = hidden_states.shape
    if S != num_frames * height * width:
        return None, (f"hidden_states holds {S} tokens, but num_frames x height x width = "
                      f"{num_frames} x {height} x {width} = {num_frames * height * width}")
    return hidden_states.view(B, num_frames, height, width, C).permute(0, 4, 1, 2, 3), None


@register
class LTXAdapter(AdapterBase):
    """Patches a diffusers ``LTXVideoTransformer3DModel`` (or a subclass) for clip parallelism."""

    name = "LTX-Video (0.9.x)"
    # The forward's clip and timestep parameters; frames lie in the packed tokens, counted by
    # ``num_frames`` (the drop-in splits them there: ``frames_argument``), or by the whole
    # video's ``video_coords``, which every rank's clip takes whole (``coords_argument``).
    inputs = ("hidden_states", "timestep")
    frames_argument = "num_frames"
    coords_argument = "video_coords"

    @staticmethod
    def coords_frames(video_coords) -> int | None:
        """The video's latent frames that ``video_coords`` place, or None if no grid."""
        got, _ = coords_grid(video_coords)
        return None if got is None else got.frames
    comm_modes = ("overlap", "stale", "loopback")
    caches = True                                # uniform blocks: a step cache fits them

    @staticmethod
    def cache_problem(model, cache) -> str | None:
        n = len(model.transformer_blocks)
        if cache.front + cache.back >= n:
            return (f"the step cache's front ({cache.front}) and back ({cache.back}) blocks "
                    f"leave no middle of the model's {n} blocks to skip")
        return None

    @classmethod
    def model_classes(cls) -> tuple:
        return (LTXVideoTransformer3DModel,)

    @staticmethod
    def check(model) -> str | None:
        cfg = model.config
        if cfg.patch_size != 1 or cfg.patch_size_t != 1:
            return (f"patch sizes {cfg.patch_size_t}x{cfg.patch_size}x{cfg.patch_size}: the "
                    "engine splits LTX's frame-major tokens by latent frame (patch 1, as "
                    "diffusers' LTX pipelines and RoPE assume)")
        if type(model.rope) is not LTXVideoRotaryPosEmbed:
            return f"rope is {type(model.rope).__name__}, expected diffusers' LTXVideoRotaryPosEmbed"
        if not len(model.transformer_blocks):
            return "model has no transformer blocks"
        for i, block in enumerate(model.transformer_blocks):
            attn = getattr(block, "attn1", None)
            where = f"transformer_blocks.{i}.attn1"
            if not isinstance(attn, LTXAttention):
                return f"{where} is {type(attn).__name__}, expected LTXAttention"
            if type(attn.processor) is not LTXVideoAttnProcessor:
                return (f"{where} runs {type(attn.processor).__name__}; the engine replaces "
                        "diffusers' LTXVideoAttnProcessor only")
            if getattr(attn.processor, "_parallel_config", None) is not None:
                return (f"{where} is set up for diffusers' own context parallelism; use one "
                        "of the two, not both")
        return None

    @staticmethod
    def default_config(model) -> DualScopeConfig:
        # As Wan's: a local scope of 17 latent frames and 8 global frames, about the 21 latent
        # frames (161 video frames) of keys each query saw at the pipeline's default length.
        return DualScopeConfig(window=8, num_global=8)

    @staticmethod
    def check_config(model, config: DualScopeConfig) -> str | None:
        if config.trained_frames is not None and config.trained_frames < 2:
            return (f"trained_frames {config.trained_frames}: a model trained on one frame has "
                    "no temporal range")
        return None

    def patch(self, model, engine, patcher: Patcher):
        config = engine.config
        L = trained_frames(model, config)
        M = L - 1 if config.global_positions == "clamp" else None
        grid = _Grid(model.rope)
        patcher.swap_class(model.rope, ClipLTXRotaryPosEmbed, _vinf=engine, _vinf_grid=grid)
        blocks = list(model.transformer_blocks)
        for block in blocks:
            patcher.set_processor(block.attn1, LTXDualScopeProcessor(engine, grid, M))
            if engine.chunk_bytes and type(block) is LTXVideoTransformerBlock:
                patcher.swap_class(block, TokenChunkedLTXBlock, _vinf_bytes=engine.chunk_bytes)
            if type(block.ff) is FeedForward:
                # Its hidden layer is 4x the tokens, plus the GELU's temporary: token chunks.
                patcher.chunk(block.ff, ("hidden_states",), 1, 8)
        patcher.before_forward(model, _begin(model, engine, L, grid))
        patcher.flush_after([*blocks, model])
        if engine.cache_config is not None:
            from ..cache import StepCache, cache_blocks
            engine.cache = StepCache(engine.cache_config, engine)
            cache_blocks(patcher, blocks, engine.cache)


def _begin(model, engine, L: int, grid: _Grid):
    """The step's start inside the forward: the agreement on a 5-D view of the packed clip
    (any problem with this rank's arguments told to every rank), and a warning, once per
    length, for a window past the trained range."""
    warned = set()

    def begin(args, kwargs):
        v = _call_values(args, kwargs)
        x, coords = v.get("hidden_states"), None
        if v.get("video_coords") is None:
            view, problem = clip_view(x, v.get("num_frames"), v.get("height"), v.get("width"))
        else:
            # LTXConditionPipeline's call: the whole video's positions, this rank's tokens.
            coords, problem = coords_grid(v["video_coords"])
            view = None
            if coords is not None:
                T = coords.h * coords.w
                S = x.shape[1] if isinstance(x, torch.Tensor) and x.dim() == 3 else 0
                if S % T or not S:
                    problem = (f"video_coords place {T} tokens per frame; hidden_states holds "
                               f"{S}, not whole frames")
                else:
                    view, problem = clip_view(x, S // T, coords.h, coords.w)
        layout = engine.begin_step(view, v.get("timestep"), problem)
        if coords is not None:
            if coords.frames != layout.num_frames:
                raise ValueError(f"video_coords place {coords.frames} latent frames, but the "
                                 f"ranks' clips hold {layout.num_frames}: under clip "
                                 "parallelism every rank passes the whole video's video_coords")
            grid.set(coords.h, coords.w, None, coords)
        warn_past_trained_range(model, engine.config.window, layout.num_frames, L, warned)
    return begin


def window_problem(model, config: DualScopeConfig, num_frames: int) -> str | None:
    """Why ``config``'s local window reaches past ``model``'s trained range on a video of
    ``num_frames`` latent frames, or None (the generation pipeline refuses it)."""
    return window_past_trained_range(config.window, num_frames, trained_frames(model, config))
