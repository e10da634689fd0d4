"""diffusers ``HunyuanVideoTransformer3DModel`` (HunyuanVideo 1.0, text-to-video) made
clip-parallel.

Its input is ``(B, C, F, H, W)`` with temporal patch 1, so tokens are frame-major and the
engine's frames are latent frames. The text tokens (refined per token by the
``context_embedder``) join the video tokens in every attention: the dual-stream blocks
project them with their own weights (``add_q_proj``...), the single-stream blocks with the
video's; everything else (AdaLN modulation, feed-forwards, the output head) acts per token.
So each block's ``attn`` is the only operator that couples frames, and it also couples the
text with every frame:

    attn (both kinds)   -> HunyuanJointProcessor      layers.joint_attention: video queries
                                                      attend their dual scope and the text;
                                                      text queries the whole video, merged
                                                      across ranks by log-sum-exp
    rope                -> ClipHunyuanRotaryPosEmbed  the clip's frames at their *global*
                                                      temporal positions
    forward (begins)    -> engine.begin_step          the step's layout and timestep, agreed;
                                                      the prompt mask's text lengths

The prompt mask: the stock model masks, as keys, every text token past the row's
``encoder_attention_mask.sum()`` (padding of the Llama prompt), for text and video queries
alike; ``JointText.valid`` carries those lengths. The 3-D RoPE rotates (t, h, w) with
``rope_axes_dim`` channels each; its temporal part is computed from the formula at any
frame position, so the global scope's keys may sit at clamped relative offsets
(``DualScopeConfig.global_positions``, the default) or at their true positions.
"""
from __future__ import annotations


import torch
from diffusers import HunyuanVideoTransformer3DModel
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import apply_rotary_emb, get_1d_rotary_pos_embed
from diffusers.models.transformers.transformer_hunyuan_video import (
    HunyuanVideoAttnProcessor2_0, HunyuanVideoRotaryPosEmbed, HunyuanVideoSingleTransformerBlock,
    HunyuanVideoTransformerBlock)

from ..config import DualScopeConfig
from ..layers.joint_attention import ClampedGlobalScope, JointText, joint_attention
from . import register
from .base import (AdapterBase, EngineProcessor, Patcher, step_arguments,
                   warn_past_trained_range, window_past_trained_range)

__all__ = ["HunyuanVideoAdapter", "HunyuanJointProcessor", "ClipHunyuanRotaryPosEmbed",
           "trained_frames", "window_problem", "TRAINED_LATENT_FRAMES"]

# HunyuanVideo 1.0 was trained on 129 video frames: (129 - 1) / 4 + 1 = 33 latent frames.
TRAINED_LATENT_FRAMES = 33


def trained_frames(model, config: DualScopeConfig | None = None) -> int:
    """Latent frames the model was trained on: the config's, else HunyuanVideo 1.0's 33."""
    if config is not None and config.trained_frames is not None:
        return config.trained_frames
    return TRAINED_LATENT_FRAMES


class _Rope:
    """The step's rotary grid, shared by the patched ``rope`` and every processor: tokens per
    frame, the clip's first global frame, the prompt's text lengths, and rotations of any
    frame positions (cached across steps: no host-to-device copy after the first step)."""

    _MAX_CACHED = 256

    def __init__(self, rope: HunyuanVideoRotaryPosEmbed):
        self.dims, self.theta = tuple(rope.rope_dim), rope.theta
        self.ph = self.pw = 0
        self.start = 0
        self.device = None
        self.valid = None
        self._cache: dict = {}
        self._mask = [None, -1, None]           # the last mask read: tensor, version, lengths

    def set(self, ph: int, pw: int, start: int, device):
        self.ph, self.pw, self.start, self.device = ph, pw, start, device
        if len(self._cache) > self._MAX_CACHED:
            self._cache.clear()

    @property
    def T(self) -> int:
        return self.ph * self.pw

    def read_valid(self, mask):
        """``valid``: the text lengths of the prompt mask ``mask`` (B, Lt). One host read per
        mask, not per step or block: a pipeline passes the same tensor every step (its version
        counter tells an in-place change), a forward the same one to every block."""
        if mask is None or torch.compiler.is_compiling():
            self.valid = text_lengths(mask)
            return
        last = self._mask
        if mask is not last[0] or mask._version != last[1]:
            last[:] = [mask, mask._version, text_lengths(mask)]
        self.valid = last[2]

    def at(self, frames: tuple) -> tuple:
        """``(cos, sin)`` (n*T, head_dim) of the tokens of frames at positions ``frames``."""
        frames = tuple(float(f) for f in frames)
        if torch.compiler.is_compiling():
            return self._rotations(frames)
        key = (self.ph, self.pw, self.device, frames)
        got = self._cache.get(key)
        if got is None:
            got = self._cache[key] = self._rotations(frames)
        return got

    def _rotations(self, frames: tuple) -> tuple:
        """The stock ``HunyuanVideoRotaryPosEmbed``'s per-axis formula, its rows for the
        tokens of ``frames``: the same elementwise operations on the same position values."""
        n, ph, pw, dev = len(frames), self.ph, self.pw, self.device
        axes = [torch.tensor(frames, dtype=torch.float32, device=dev),
                torch.arange(ph, dtype=torch.float32, device=dev),
                torch.arange(pw, dtype=torch.float32, device=dev)]
        cs = [get_1d_rotary_pos_embed(d, a, self.theta, use_real=True)
              for d, a in zip(self.dims, axes)]
        out = []
        for i in range(2):                                  # cos, then sin
            t, h, w = (c[i] for c in cs)
            out.append(torch.cat([t[:, None, None].expand(n, ph, pw, -1),
                                  h[None, :, None].expand(n, ph, pw, -1),
                                  w[None, None, :].expand(n, ph, pw, -1)],
                                 dim=-1).reshape(n * ph * pw, -1))
        return tuple(out)


class ClipHunyuanRotaryPosEmbed(HunyuanVideoRotaryPosEmbed):
    """``HunyuanVideoRotaryPosEmbed`` giving this clip's frames at their global positions
    (``_vinf_rope``: the step's grid)."""

    def forward(self, hidden_states):
        r = self._vinf_rope
        F = hidden_states.shape[2] // self.patch_size_t
        return r.at(tuple(range(r.start, r.start + F)))


def _rotate(x, rot):
    """``x`` (B, S, H, D) rotated as the stock processor rotates it."""
    return apply_rotary_emb(x, rot, sequence_dim=1)


def _kv(attn, x):
    """Un-rotated video keys and values of tokens ``x`` (B, n, C): (B, n, H, D) each."""
    k = attn.to_k(x).unflatten(2, (attn.heads, -1))
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return k, attn.to_v(x).unflatten(2, (attn.heads, -1))


def _qkv(attn, x):
    q = attn.to_q(x).unflatten(2, (attn.heads, -1))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    return (q, *_kv(attn, x))


def _text_qkv(attn, x):
    """The text tokens' q, k, v: the dual-stream blocks' own projections, else the video's."""
    if attn.add_q_proj is None:
        return _qkv(attn, x)
    q = attn.add_q_proj(x).unflatten(2, (attn.heads, -1))
    k = attn.add_k_proj(x).unflatten(2, (attn.heads, -1))
    if attn.norm_added_q is not None:
        q = attn.norm_added_q(q)
    if attn.norm_added_k is not None:
        k = attn.norm_added_k(k)
    return q, k, attn.add_v_proj(x).unflatten(2, (attn.heads, -1))


class HunyuanJointProcessor(EngineProcessor):
    """``attn`` of a HunyuanVideo dual- or single-stream block as joint text attention over
    this rank's clip.

    ``max_distance``: None (global keys at their true positions), or the largest relative
    temporal offset a global logit may see (the trained range)."""

    def __init__(self, engine, rope: _Rope, max_distance: int | None):
        self.engine, self.rope, self.max_distance = engine, rope, max_distance

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        if encoder_hidden_states is None:
            raise ValueError("HunyuanVideo attention under clip parallelism takes the text "
                             "tokens (encoder_hidden_states)")
        eng, rope = self.engine, self.rope
        B, S, C = hidden_states.shape
        T = rope.T
        Fc, s = S // T, rope.start
        pending = eng.start_attention_context(hidden_states.view(B, Fc, T, C))
        tq, tk, tv = _text_qkv(attn, encoder_hidden_states)
        q, k, v = _qkv(attn, hidden_states)
        mine = rope.at(tuple(range(s, s + Fc)))
        q, k = _rotate(q, mine), _rotate(k, mine)
        scale = q.shape[-1] ** -0.5

        def project_kv(x, frames):              # x: (B, n, T, C), frames' attention input
            k_, v_ = _kv(attn, x.flatten(1, 2))
            return _rotate(k_, rope.at(tuple(frames))), v_
        g = eng.attention_plan().glob_frames
        scope = None
        if self.max_distance is not None and g and max(
                abs(a - b) for a in (s, s + Fc - 1) for b in g) > self.max_distance:
            scope = ClampedGlobalScope(eng, q, range(s, s + Fc), T, self.max_distance,
                                       lambda x: _kv(attn, x.flatten(1, 2)),
                                       lambda k_, pos: _rotate(k_, rope.at(pos)), scale)
        video, text = joint_attention(eng, pending, q, k, v, project_kv,
                                      JointText(tq, tk, tv, rope.valid), scale=scale,
                                      tokens_per_frame=T, global_scope=scope)
        video = video.flatten(2, 3).to(q.dtype)
        text = text.flatten(2, 3).to(tq.dtype)
        if getattr(attn, "to_out", None) is not None:
            video = attn.to_out[1](attn.to_out[0](video))
        if getattr(attn, "to_add_out", None) is not None:
            text = attn.to_add_out(text)
        return video, text


def text_lengths(mask) -> tuple | None:
    """Per batch row, how many leading text tokens the stock model lets be keys (its
    ``encoder_attention_mask.sum()``), or None where every token is one."""
    if mask is None:
        return None
    n = mask.sum(dim=1, dtype=torch.int).tolist()
    return None if all(x == mask.shape[1] for x in n) else tuple(n)


def _check_blocks(model, kinds: tuple, processor_cls: type) -> str | None:
    """Why a block of ``kinds`` ((attribute, block class) pairs) is not what the adapter
    patches, or None."""
    for kind, cls in kinds:
        for i, block in enumerate(getattr(model, kind)):
            where = f"{kind}.{i}"
            if type(block) is not cls:
                return f"{where} is {type(block).__name__}, expected {cls.__name__}"
            attn = getattr(block, "attn", None)
            if not isinstance(attn, Attention):
                return f"{where}.attn is {type(attn).__name__}, expected an Attention"
            if type(attn.processor) is not processor_cls:
                return (f"{where}.attn runs {type(attn.processor).__name__}; the engine "
                        f"replaces diffusers' {processor_cls.__name__} only")
            if getattr(attn.processor, "_parallel_config", None) is not None:
                return (f"{where}.attn is set up for diffusers' own context parallelism; use "
                        "one of the two, not both")
    return None


@register
class HunyuanVideoAdapter(AdapterBase):
    """Patches a diffusers ``HunyuanVideoTransformer3DModel`` for clip parallelism.

    The class attributes name what a variant swaps (HunyuanVideo 1.5 subclasses this)."""

    name = "HunyuanVideo (1.0)"
    inputs = ("hidden_states", "timestep")   # the forward's clip and timestep parameters
    comm_modes = ("overlap", "stale", "loopback")
    rope_class, clip_rope_class = HunyuanVideoRotaryPosEmbed, ClipHunyuanRotaryPosEmbed
    processor_class, joint_processor_class = HunyuanVideoAttnProcessor2_0, HunyuanJointProcessor
    block_kinds = (("transformer_blocks", HunyuanVideoTransformerBlock),
                   ("single_transformer_blocks", HunyuanVideoSingleTransformerBlock))
    mask_argument = 3          # the forward's prompt mask, whose lengths the step reads
    trained_frames = staticmethod(trained_frames)

    @classmethod
    def model_classes(cls) -> tuple:
        return (HunyuanVideoTransformer3DModel,)

    @classmethod
    def check(cls, model) -> str | None:
        c = model.config
        if type(model) is not HunyuanVideoTransformer3DModel:
            # Framepack and other subclasses add history tokens or other inputs.
            return (f"{type(model).__name__} is not diffusers' HunyuanVideoTransformer3DModel "
                    "(HunyuanVideo 1.0 text-to-video); its extra inputs are not supported")
        if c.image_condition_type is not None:
            return (f"image_condition_type {c.image_condition_type!r}: image-to-video "
                    "HunyuanVideo is not supported under clip parallelism (text-to-video only)")
        return cls.check_layout(model)

    @classmethod
    def check_layout(cls, model) -> str | None:
        """The patch size, rope and blocks the adapter relies on."""
        c = model.config
        if c.patch_size_t != 1:
            return (f"temporal patch size {c.patch_size_t}: the engine splits HunyuanVideo's "
                    "frame-major tokens by latent frame (patch 1)")
        if type(model.rope) is not cls.rope_class:
            return (f"rope is {type(model.rope).__name__}, expected diffusers' "
                    f"{cls.rope_class.__name__}")
        if sum(c.rope_axes_dim) != c.attention_head_dim:
            return (f"rope_axes_dim {tuple(c.rope_axes_dim)} does not sum to attention_head_dim "
                    f"{c.attention_head_dim}")
        if not sum(len(getattr(model, kind)) for kind, _ in cls.block_kinds):
            return "model has no transformer blocks"
        return _check_blocks(model, cls.block_kinds, cls.processor_class)

    @classmethod
    def default_config(cls, model) -> DualScopeConfig:
        # A local scope and global frames that together are the trained length (33 latent
        # frames: window 10 = 21 frames, 12 global), so each query sees about as many keys,
        # and at most the relative distances, it saw in training.
        L = cls.trained_frames(model)
        w = max(1, (L - 1) // 3)
        return DualScopeConfig(window=w, num_global=max(1, L - 2 * w - 1))

    @staticmethod
    def check_config(model, config: DualScopeConfig) -> str | None:
        if config.trained_frames is not None and config.trained_frames < 2:
            return (f"trained_frames {config.trained_frames}: a model trained on one frame has "
                    "no temporal range")
        return None

    def patch(self, model, engine, patcher: Patcher):
        config = engine.config
        L = self.trained_frames(model, config)
        M = L - 1 if config.global_positions == "clamp" else None
        rope = _Rope(model.rope)
        patcher.swap_class(model.rope, self.clip_rope_class, _vinf_rope=rope)
        blocks = [b for kind, _ in self.block_kinds for b in getattr(model, kind)]
        for block in blocks:
            patcher.set_processor(block.attn, self.joint_processor_class(engine, rope, M))
            if type(getattr(block, "ff", None)) is FeedForward:
                # the video stream's feed-forward: a hidden layer 4x wide plus the GELU's
                patcher.chunk(block.ff, ("hidden_states",), 1, 8)
        patcher.before_forward(model, _begin(model, engine, rope, L, self.mask_argument))
        patcher.flush_after([*blocks, model])


def _begin(model, engine, rope: _Rope, L: int, mask_argument: int | None):
    """The step's start inside the forward: the agreement, the grid at the clip's global
    frames, the prompt mask's lengths (the forward's argument ``mask_argument``; None: the
    processors read them), and a warning, once per length, for a window past the trained
    range."""
    p = model.config.patch_size
    warned = set()

    def begin(args, kwargs):
        hs, t = step_arguments(args, kwargs, ("hidden_states", "timestep"))
        layout = engine.begin_step(hs, t)
        rope.set(hs.shape[3] // p, hs.shape[4] // p, layout.start(engine.rank), hs.device)
        if mask_argument is not None:
            mask = kwargs.get("encoder_attention_mask",
                              args[mask_argument] if len(args) > mask_argument else None)
            rope.read_valid(mask)
        warn_past_trained_range(model, engine.config.window, layout.num_frames, L, warned)
    return begin


def window_problem(model, config: DualScopeConfig, num_frames: int) -> str | None:
    """Why ``config``'s local window reaches past ``model``'s trained range on a video of
    ``num_frames`` latent frames, or None (the generation pipeline refuses it)."""
    return window_past_trained_range(config.window, num_frames, trained_frames(model, config))
