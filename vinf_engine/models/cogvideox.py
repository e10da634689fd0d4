"""diffusers ``CogVideoXTransformer3DModel`` (CogVideoX 2b and 5b, CogVideoX 1.5) made
clip-parallel.

Its input is ``(B, F, C, H, W)`` (frames along dim 1), text tokens come first in one
self-attention per block, and everything else acts per token (the modulated LayerNorms,
the feed-forward over text and video tokens, the output head). So the only operator that
couples frames is each block's ``attn1``, which also couples the text with every frame:

    attn1               -> CogVideoXJointProcessor  layers.joint_attention: video queries
                                                    attend their dual scope and the text;
                                                    text queries the whole video, merged
                                                    across ranks by log-sum-exp
    patch_embed (2b)    -> ClipCogVideoXPatchEmbed  3-D sin-cos position embedding of the
                                                    clip's *global* frames
    forward pre-hook    -> engine.begin_step        the step's layout and timestep, agreed

The engine's frames are the transformer's token frames: latent frames for CogVideoX 1.0,
pairs of latent frames for CogVideoX 1.5 (``patch_size_t = 2``), so every rank passes whole
pairs. RoPE (5b, 1.5) rotates each clip's frames at their global positions: the temporal
part of ``image_rotary_emb`` is recomputed from the formula at those positions, its spatial
part taken as given (the pipeline's grid), so a clip may pass the whole video's table or its
own rows of it. The global scope's keys sit at clamped relative offsets by default
(``DualScopeConfig.global_positions``), as for Wan. The 2b model's absolute sin-cos
embedding has no relative form to clamp: its frames sit at their true global positions.
"""
from __future__ import annotations


import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention, CogVideoXAttnProcessor2_0
from diffusers.models.embeddings import (CogVideoXPatchEmbed, apply_rotary_emb,
                                         get_1d_rotary_pos_embed,
                                         get_1d_sincos_pos_embed_from_grid,
                                         get_2d_sincos_pos_embed_from_grid)

from ..config import DualScopeConfig
from ..layers.joint_attention import ClampedGlobalScope, JointText, joint_attention
from . import register
from .base import (AdapterBase, EngineProcessor, Patcher, warn_past_trained_range,
                   window_past_trained_range)

__all__ = ["CogVideoXAdapter", "CogVideoXJointProcessor", "ClipCogVideoXPatchEmbed",
           "trained_frames", "frame_unit", "window_problem"]

ROPE_THETA = 10000       # get_3d_rotary_pos_embed's default, which CogVideoXPipeline uses


def frame_unit(model) -> int:
    """Latent frames per engine frame (a token frame): ``patch_size_t`` (1.5: 2), else 1."""
    return model.config.patch_size_t or 1


def trained_frames(model, config: DualScopeConfig | None = None) -> int:
    """Token frames the model was trained on: the config's, else from the model's own
    ``sample_frames`` (video frames): 49 -> 13 latent frames (1.0); 81 -> 21 latent, 11 pairs
    (1.5)."""
    if config is not None and config.trained_frames is not None:
        return config.trained_frames
    c = model.config
    latent = (c.sample_frames - 1) // c.temporal_compression_ratio + 1
    return -(-latent // frame_unit(model))


class _Rope:
    """The step's rotary grid, shared by the patched forward (which sets it from the call's
    ``image_rotary_emb``) and every processor: the spatial part of one frame's tokens, and
    rotations of any frame positions from the formula, cached across steps (no
    host-to-device copy after the first step)."""

    _MAX_CACHED = 256

    def __init__(self, head_dim: int):
        self.dim_t = head_dim // 4                 # get_3d_rotary_pos_embed's split
        self.table = None                          # the call's (cos, sin), or None: no RoPE
        self.T = 0
        self.start = 0
        self._spatial = None
        self._cache: dict = {}

    def set(self, table, T: int, start: int):
        self.T, self.start = T, start
        if table is None:
            self.table = self._spatial = None
            return
        if table is not self.table or len(self._cache) > self._MAX_CACHED:
            self._cache.clear()
        self.table = table
        cos, sin = table
        if cos.dim() != 2 or cos.shape[0] < T or cos.shape[0] % T:
            raise ValueError(f"image_rotary_emb holds {tuple(cos.shape)}: expected rows of "
                             f"{T} tokens per frame, (n*{T}, head_dim)")
        self._spatial = (cos[:T, self.dim_t:], sin[:T, self.dim_t:])

    def at(self, frames: tuple) -> tuple:
        """``(cos, sin)`` (n*T, head_dim) of the tokens of frames at positions ``frames``."""
        if torch.compiler.is_compiling():
            return self._rotations(frames)
        key = (self.T, frames)
        got = self._cache.get(key)
        if got is None:
            got = self._cache[key] = self._rotations(frames)
        return got

    def _rotations(self, frames: tuple) -> tuple:
        cos_s, sin_s = self._spatial
        pos = torch.tensor(frames, dtype=torch.float32, device=cos_s.device)
        cos_t, sin_t = get_1d_rotary_pos_embed(self.dim_t, pos, theta=ROPE_THETA, use_real=True)
        n, T = len(frames), self.T
        return tuple(torch.cat([t[:, None].expand(n, T, -1), s[None].expand(n, T, -1)],
                               dim=-1).reshape(n * T, -1).to(s.dtype)
                     for t, s in ((cos_t, cos_s), (sin_t, sin_s)))


def _rotate(x, rot):
    """``x`` (B, S, H, D) rotated as CogVideoX's processor rotates (B, H, S, D): the same
    elementwise operations."""
    return apply_rotary_emb(x, rot, sequence_dim=1)


class ClipCogVideoXPatchEmbed(CogVideoXPatchEmbed):
    """``CogVideoXPatchEmbed`` with its 3-D sin-cos embedding at this clip's global frames
    (``_vinf``: the engine). The stock forward's operations, the embedding's rows computed
    for the clip's frames only (a long video's whole table would not fit)."""

    def forward(self, text_embeds, image_embeds):
        text_embeds = self.text_proj(text_embeds)
        B, F, C, H, W = image_embeds.shape
        image_embeds = self.proj(image_embeds.reshape(-1, C, H, W))
        image_embeds = image_embeds.view(B, F, *image_embeds.shape[1:]).flatten(3).transpose(2, 3)
        image_embeds = image_embeds.flatten(1, 2)
        start = self._vinf.layout.start(self._vinf.rank)
        pos = self._positions(H // self.patch_size, W // self.patch_size, start, F,
                              image_embeds.device)
        return torch.cat([text_embeds, image_embeds + pos.to(image_embeds.dtype)],
                         dim=1).contiguous()

    def _positions(self, ph: int, pw: int, start: int, n: int, device) -> torch.Tensor:
        """(n*ph*pw, D): ``get_3d_sincos_pos_embed``'s rows of frames ``start..start+n-1``."""
        D = self.embed_dim
        grid_h = torch.arange(ph, device=device, dtype=torch.float32) / self.spatial_interpolation_scale
        grid_w = torch.arange(pw, device=device, dtype=torch.float32) / self.spatial_interpolation_scale
        grid = torch.stack(torch.meshgrid(grid_w, grid_h, indexing="xy"), dim=0)
        spatial = get_2d_sincos_pos_embed_from_grid(3 * D // 4, grid.reshape([2, 1, ph, pw]))
        grid_t = (torch.arange(start, start + n, device=device, dtype=torch.float32)
                  / self.temporal_interpolation_scale)
        temporal = get_1d_sincos_pos_embed_from_grid(D // 4, grid_t)
        return torch.cat([temporal[:, None].expand(n, ph * pw, -1),
                          spatial[None].expand(n, -1, -1)], dim=-1).flatten(0, 1)


class CogVideoXJointProcessor(EngineProcessor):
    """``attn1`` of a CogVideoX block as joint text attention over this rank's clip.

    ``max_distance``: None (global keys at their true positions), or the largest relative
    temporal offset a global logit may see (RoPE models; the trained range)."""

    def __init__(self, engine, rope: _Rope, max_distance: int | None):
        self.engine, self.rope, self.max_distance = engine, rope, max_distance

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None,
                 image_rotary_emb=None):
        if attention_mask is not None or encoder_hidden_states is None:
            raise ValueError("CogVideoX attention under clip parallelism takes the text "
                             "tokens and no attention_mask")
        eng, rope = self.engine, self.rope
        B, S, C = hidden_states.shape
        T = rope.T
        Fc = S // T
        pending = eng.start_attention_context(hidden_states.view(B, Fc, T, C))
        tq, tk, tv = _qkv(attn, encoder_hidden_states)
        q, k, v = _qkv(attn, hidden_states)
        s = rope.start
        rotated = rope.table is not None
        if rotated:
            mine = rope.at(tuple(range(s, s + Fc)))
            q, k = _rotate(q, mine), _rotate(k, mine)

        def project_kv(x, frames):              # x: (B, n, T, C), frames' attention input
            k_, v_ = _kv(attn, x.flatten(1, 2))
            return (_rotate(k_, rope.at(tuple(frames))) if rotated else k_), v_
        g = eng.attention_plan().glob_frames
        scope = None
        if rotated and self.max_distance is not None and g and max(
                abs(a - b) for a in (s, s + Fc - 1) for b in g) > self.max_distance:
            scope = ClampedGlobalScope(eng, q, range(s, s + Fc), T, self.max_distance,
                                       lambda x: _kv(attn, x.flatten(1, 2)),
                                       lambda k_, pos: _rotate(k_, rope.at(pos)),
                                       q.shape[-1] ** -0.5)
        video, text = joint_attention(eng, pending, q, k, v, project_kv, JointText(tq, tk, tv),
                                      scale=q.shape[-1] ** -0.5, tokens_per_frame=T,
                                      global_scope=scope)
        return _out(attn, video, hidden_states), _out(attn, text, encoder_hidden_states)


def _kv(attn, x):
    """Un-rotated keys and values of tokens ``x`` (B, n, C): (B, n, H, D) each."""
    k = attn.to_k(x).unflatten(2, (attn.heads, -1))
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return k, attn.to_v(x).unflatten(2, (attn.heads, -1))


def _qkv(attn, x):
    q = attn.to_q(x).unflatten(2, (attn.heads, -1))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    return (q, *_kv(attn, x))


def _out(attn, o, like):
    return attn.to_out[1](attn.to_out[0](o.flatten(2, 3).type_as(like)))


def _arguments(args: tuple, kwargs: dict) -> tuple:
    """``(hidden_states, timestep, image_rotary_emb)`` of a forward call, by its signature
    ``(hidden_states, encoder_hidden_states, timestep, timestep_cond, ofs,
    image_rotary_emb, ...)``."""
    def get(i, name):
        return kwargs[name] if name in kwargs else (args[i] if len(args) > i else None)
    return get(0, "hidden_states"), get(2, "timestep"), get(5, "image_rotary_emb")


def engine_view(hidden_states, unit: int):
    """The clip as the engine splits it: (B, C*unit, F/unit, H, W) from the model's
    (B, F, C, H, W), a view of whole token frames; or a string saying why it cannot be."""
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 5:
        return hidden_states                      # the agreement refuses it on every rank
    F = hidden_states.shape[1]
    if F % unit:
        return (f"{F} latent frames: CogVideoX 1.5 patches time by {unit}, so every rank "
                f"passes whole {unit}-frame token frames")
    return hidden_states.unflatten(1, (F // unit, unit)).flatten(2, 3).transpose(1, 2)


@register
class CogVideoXAdapter(AdapterBase):
    """Patches a diffusers ``CogVideoXTransformer3DModel`` (or a subclass) for clip
    parallelism."""

    name = "CogVideoX (2b, 5b, 1.5)"
    inputs = ("hidden_states", "timestep")   # as named in the forward (timestep is its third)
    frame_dim = 1                            # (B, F, C, H, W): the drop-in splits dim 1
    comm_modes = ("overlap", "stale", "loopback")

    @staticmethod
    def frame_unit(model) -> int:
        return frame_unit(model)

    @classmethod
    def model_classes(cls) -> tuple:
        return (CogVideoXTransformer3DModel,)

    @staticmethod
    def check(model) -> str | None:
        c = model.config
        if c.use_learned_positional_embeddings:
            return ("learned positional embeddings (CogVideoX-5b-I2V): a table of the trained "
                    "length and size, with no position past it for a longer video")
        if model.patch_embed.use_positional_embeddings and c.patch_size_t:
            return "a sin-cos position embedding with temporal patches: no CogVideoX has one"
        if not len(model.transformer_blocks):
            return "model has no transformer blocks"
        if c.use_rotary_positional_embeddings and c.attention_head_dim % 8:
            return f"attention_head_dim {c.attention_head_dim}: the 3-D RoPE splits it in 4 and 8"
        for i, block in enumerate(model.transformer_blocks):
            attn = getattr(block, "attn1", None)
            where = f"transformer_blocks.{i}.attn1"
            if not isinstance(attn, Attention) or attn.is_cross_attention:
                return f"{where} is {type(attn).__name__}, expected a self-Attention"
            if type(attn.processor) is not CogVideoXAttnProcessor2_0:
                return (f"{where} runs {type(attn.processor).__name__}; the engine replaces "
                        "diffusers' CogVideoXAttnProcessor2_0 only")
        return None

    @staticmethod
    def default_config(model) -> DualScopeConfig:
        # A local scope and global frames that together are about the trained length
        # (13 latent frames: window 4 = 9 frames, 4 global; 1.5's 11 pairs: 7 and 4).
        L = trained_frames(model)
        w = max(1, (L - 1) // 3)
        return DualScopeConfig(window=w, num_global=max(1, L - 2 * w - 1))

    @staticmethod
    def check_config(model, config: DualScopeConfig) -> str | None:
        if config.trained_frames is not None and config.trained_frames < 2:
            return f"trained_frames {config.trained_frames}: a model trained on one frame has no temporal range"
        return None

    def patch(self, model, engine, patcher: Patcher):
        config = engine.config
        L = trained_frames(model, config)
        M = L - 1 if config.global_positions == "clamp" else None
        rope = _Rope(model.config.attention_head_dim)
        if model.patch_embed.use_positional_embeddings:
            patcher.swap_class(model.patch_embed, ClipCogVideoXPatchEmbed, _vinf=engine)
        for block in model.transformer_blocks:
            patcher.set_processor(block.attn1, CogVideoXJointProcessor(engine, rope, M))
            if type(block.ff) is FeedForward:
                # text and video tokens, a hidden layer 4x wide plus the GELU's temporary
                patcher.chunk(block.ff, ("hidden_states",), 1, 8)
        patcher.before_forward(model, self._begin(model, engine, rope, L))
        patcher.flush_after([*model.transformer_blocks, model])

    @staticmethod
    def _begin(model, engine, rope: _Rope, L: int):
        unit, p = frame_unit(model), model.config.patch_size
        warned = set()

        def begin(args, kwargs):
            hs, t, table = _arguments(args, kwargs)
            view = engine_view(hs, unit)
            if unit > 1 and engine.world_size > 1:
                # Every rank learns of a rank's odd clip before any exchange could hang.
                bad = [f"rank {r}: {e}" for r, e in enumerate(engine.comm.agree(
                    view if isinstance(view, str) else None)) if e]
                if bad:
                    raise ValueError("clip-parallel step refused: " + "; ".join(bad))
            elif isinstance(view, str):
                raise ValueError("clip-parallel step refused: " + view)
            layout = engine.begin_step(view, t)
            rope.set(table, (hs.shape[3] // p) * (hs.shape[4] // p), layout.start(engine.rank))
            warn_past_trained_range(model, engine.config.window, layout.num_frames, L, warned,
                                    unit="token")
        return begin


def window_problem(model, config: DualScopeConfig, num_frames: int) -> str | None:
    """Why ``config``'s local window reaches past ``model``'s trained range on a video of
    ``num_frames`` token frames, or None (the generation pipeline refuses it)."""
    return window_past_trained_range(config.window, num_frames, trained_frames(model, config),
                                     unit="token")
