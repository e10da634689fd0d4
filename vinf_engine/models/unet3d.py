"""diffusers ``UNet3DConditionModel`` (ModelScope / Zeroscope / VideoCrafter2) made clip-parallel.

Spatial layers act per frame and stay untouched. Three things couple frames, and each is
replaced in place, keeping its parameters (and so its ``state_dict``):

    TransformerTemporalModel.norm        -> layers.ClipGroupNorm   statistics over the whole
                                                                   video; starts attn1's context
    TransformerTemporalModel attn1/attn2 -> DualScopeAttnProcessor halo + global scope, phase
                                                                   bias (layers.clip_attention)
    TemporalConvLayer                    -> layers.ClipTemporalConvLayer  one halo per stack

and a forward pre-hook on the UNet agrees with the other ranks on each step's layout and
timestep before any layer runs. ``comm_mode="blocking"`` patches in the published pattern's
variants instead (chosen here, once; the operators never read the mode back).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from diffusers import UNet3DConditionModel
from diffusers.models.attention import BasicTransformerBlock, FeedForward
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.upsampling import Upsample2D
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import TemporalConvLayer
from diffusers.models.transformers.transformer_temporal import (TransformerTemporalModel,
                                                               TransformerTemporalModelOutput)

from ..config import DualScopeConfig
from ..ops.group_norm import group_norm_apply, group_norm_finalize, group_norm_partials
from ..layers import (BlockingTemporalConvLayer, ClipGroupNorm, ClipTemporalConvLayer,
                      ContextSlot, blocking_clip_attention, clip_attention, conv_stack)
from . import register
from .base import AdapterBase, Patcher, step_arguments

__all__ = ["UNet3DAdapter", "DualScopeAttnProcessor", "BlockingDualScopeAttnProcessor"]


class DualScopeAttnProcessor:
    """Temporal self-attention over ``(B*H*W, F, C)`` as dual-scope attention.

    The attention *input* crosses ranks (halo and global frames), not K and V: one tensor
    instead of two, projected locally by the receiver. The exchange is posted first (or was
    started by the transformer's input norm: ``slot``); the rest is ``layers.clip_attention``.
    """

    def __init__(self, engine, slot: ContextSlot | None = None):
        self.engine = engine
        self.slot = slot

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("temporal attention under clip parallelism takes neither "
                             "encoder_hidden_states nor an attention_mask")
        out = self._attend(attn, hidden_states)
        out = attn.to_out[0](out.flatten(2))
        out = attn.to_out[1](out)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor

    def _attend(self, attn, h):
        eng = self.engine
        pending = self.slot.take() if self.slot is not None else None
        if pending is None:
            pending = eng.start_attention_context(h)             # in flight from here
        q = _project(attn, h, "q")
        k, v = _project(attn, h, "kv")
        return clip_attention(eng, pending, q, k, v, lambda x, _: _project(attn, x, "kv"),
                              scale=attn.scale)


class BlockingDualScopeAttnProcessor(DualScopeAttnProcessor):
    """The published prototype's data movement (``layers.blocking_clip_attention``)."""

    def _attend(self, attn, h):
        q = _project(attn, h, "q")
        k, v = _project(attn, h, "kv")
        return blocking_clip_attention(self.engine, q, k, v, scale=attn.scale)


def _project(attn, x, which):
    H = attn.heads
    if which == "q":
        t = attn.to_q(x).unflatten(-1, (H, -1))
        return attn.norm_q(t) if attn.norm_q is not None else t
    k = attn.to_k(x).unflatten(-1, (H, -1))
    v = attn.to_v(x).unflatten(-1, (H, -1))
    return (attn.norm_k(k) if attn.norm_k is not None else k), v


# Per-frame layers and their peak temporaries per input byte (a resnet holds ~3 activations
# besides its input; a spatial transformer's GEGLU feed-forward 8, plus attention and
# projections), and the temporal transformers' feed-forwards, per position.
class PositionChunkedTemporalTransformer(TransformerTemporalModel):
    """One process, memory-bounded: a whole ``TransformerTemporalModel`` over chunks of
    spatial positions. Its GroupNorm's statistics come first, from the whole video (fp64
    partial sums per frame, one pass, nothing held); then each chunk of positions runs the
    norm's apply, ``proj_in``, the blocks, ``proj_out`` and the residual into the output, so
    that none of the module's intermediates is ever held for the whole video. Every position
    is independent past the norm (temporal attention and feed-forwards act per position).

    ``_vinf_bytes``: the working memory allowed per chunk."""

    _FACTOR = 12        # temporaries per input byte of a chunk: the norm's apply, the two
    #                     layout copies, proj_in/out outputs, a block's own bounded chunks

    def forward(self, hidden_states, encoder_hidden_states=None, timestep=None,
                class_labels=None, num_frames=1, cross_attention_kwargs=None,
                return_dict=True):
        BF, C, H, W = hidden_states.shape
        F = num_frames
        B = BF // F
        P = H * W
        per_position = B * C * F * hidden_states.element_size()
        step = max(1, int(self._vinf_bytes // max(1, per_position * self._FACTOR)))
        if step >= P or timestep is not None or class_labels is not None:
            return super().forward(hidden_states, encoder_hidden_states, timestep,
                                   class_labels, num_frames, cross_attention_kwargs,
                                   return_dict)
        x = hidden_states.view(B, F, C, H, W).permute(0, 2, 1, 3, 4)      # a view
        partials, count = group_norm_partials(x, self.norm.num_groups)
        mean, rstd = group_norm_finalize(partials, count, self.norm.eps)
        xp = x.flatten(3)                                                 # (B, C, F, P) view
        out = torch.empty_like(hidden_states)
        outp = out.view(B, F, C, P)
        resp = hidden_states.view(B, F, C, P)
        for p0 in range(0, P, step):
            n = min(P, p0 + step) - p0
            h = group_norm_apply(xp[..., p0:p0 + n], mean, rstd, self.norm.weight,
                                 self.norm.bias)                          # (B, C, F, n)
            h = self.proj_in(h.permute(0, 3, 2, 1).reshape(B * n, F, C))
            for block in self.transformer_blocks:
                h = block(h, encoder_hidden_states=encoder_hidden_states,
                          cross_attention_kwargs=cross_attention_kwargs)
            h = self.proj_out(h).view(B, n, F, C).permute(0, 2, 3, 1)      # (B, F, C, n)
            outp[..., p0:p0 + n].copy_(h + resp[..., p0:p0 + n])    # autograd-safe
        if not return_dict:
            return (out,)
        return TransformerTemporalModelOutput(sample=out)


class PositionChunkedTemporalConvLayer(TemporalConvLayer):
    """One process, memory-bounded: a ``TemporalConvLayer`` over chunks of spatial rows, one
    conv of the stack at a time. Each GroupNorm's statistics come from its whole input
    first (fp64 partial sums, one pass); then each chunk of rows runs the norm's apply with
    SiLU, the dropout and the k x 1 x 1 conv (which acts per position) into that conv's
    output. The residual is written per chunk straight into the output's frame-major layout.
    The stack then holds its input, one conv's input and its output, never the stock
    forward's norm, activation and conv outputs side by side, nor its final copy.

    ``_vinf_bytes``: the working memory allowed per chunk."""

    _FACTOR = 5         # temporaries per input byte of a chunk: the norm's apply, the
    #                     dropout's, the conv's input copy and output, the residual

    def forward(self, hidden_states, num_frames: int = 1):
        BF, C, H, W = hidden_states.shape
        F = num_frames
        B = BF // F
        step = max(1, int(self._vinf_bytes // max(1, B * C * F * W * hidden_states.element_size()
                                                  * self._FACTOR)))
        if step >= H:
            return super().forward(hidden_states, num_frames)
        x = hidden_states.view(B, F, C, H, W).permute(0, 2, 1, 3, 4)     # a view
        rows = [(r0, min(H, r0 + step)) for r0 in range(0, H, step)]
        h = x
        for seq in conv_stack(self):
            norm, conv = seq[0], seq[-1]
            partials, count = group_norm_partials(h, norm.num_groups)
            mean, rstd = group_norm_finalize(partials, count, norm.eps)
            out = None
            for r0, r1 in rows:
                y = group_norm_apply(h[..., r0:r1, :], mean, rstd, norm.weight, norm.bias,
                                     activation="silu")
                for m in seq[2:-1]:     # dropout (identity in eval)
                    y = m(y)
                y = conv(y)
                if out is None:
                    out = y.new_empty(B, y.shape[1], F, H, W)
                out[..., r0:r1, :].copy_(y)          # autograd-safe
            h = out
        result = torch.empty_like(hidden_states)
        res = result.view(B, F, C, H, W)
        for r0, r1 in rows:
            res[..., r0:r1, :].copy_((x[..., r0:r1, :] + h[..., r0:r1, :]).transpose(1, 2))
        return result


_FRAME_LAYERS = ((ResnetBlock2D, ("input_tensor", "temb"), 4),
                 (Transformer2DModel, ("hidden_states", "encoder_hidden_states"), 12),
                 (Downsample2D, ("hidden_states",), 3), (Upsample2D, ("hidden_states",), 4))


@register
class UNet3DAdapter(AdapterBase):
    """Patches a diffusers ``UNet3DConditionModel`` (or a subclass) for clip parallelism."""

    name = "UNet3D (ModelScope, Zeroscope, VideoCrafter2)"
    inputs = ("sample", "timestep")       # the forward's clip and timestep parameters
    comm_modes = ("overlap", "blocking", "stale", "loopback")

    @classmethod
    def model_classes(cls) -> tuple:
        return (UNet3DConditionModel,)

    @staticmethod
    def check(model) -> str | None:
        """Why ``model`` cannot be parallelized, or None."""
        temporal = [(n, m) for n, m in model.named_modules() if isinstance(m, TransformerTemporalModel)]
        convs = [(n, m) for n, m in model.named_modules() if isinstance(m, TemporalConvLayer)]
        for name, m in temporal + convs:
            if type(m) not in (TransformerTemporalModel, TemporalConvLayer):
                return (f"{name} is {type(m).__name__}, a subclass whose forward the engine "
                        "does not know; not supported")
        if not temporal:
            return "model has no TransformerTemporalModel to parallelize"
        for name, m in temporal:
            if type(m.norm) is not nn.GroupNorm:
                return f"{name}.norm is {type(m.norm).__name__}, expected torch.nn.GroupNorm"
            for bname, block in m.transformer_blocks.named_children():
                where = f"{name}.transformer_blocks.{bname}"
                if not isinstance(block, BasicTransformerBlock):
                    return f"{where} is {type(block).__name__}, expected BasicTransformerBlock"
                if block.pos_embed is not None:
                    return (f"{where} has frame positional embeddings, which would number "
                            "frames per clip; not supported")
                if block.only_cross_attention:
                    return f"{where} uses only_cross_attention; not supported"
                for aname in ("attn1", "attn2"):
                    attn = getattr(block, aname, None)
                    if attn is None:
                        continue
                    if not isinstance(attn, Attention):
                        return f"{where}.{aname} is {type(attn).__name__}, expected Attention"
                    if attn.is_cross_attention:
                        return f"{where}.{aname} is cross-attention; expected temporal self-attention"
                    for flag in ("group_norm", "spatial_norm", "norm_cross"):
                        if getattr(attn, flag, None) is not None:
                            return f"{where}.{aname}.{flag} couples frames; not supported"
        for name, m in convs:
            stack = conv_stack(m)
            if not stack:
                return f"{name} has no conv stack"
            for i, seq in enumerate(stack, 1):
                where = f"{name}.conv{i}"
                if (type(seq[0]) is not nn.GroupNorm or not isinstance(seq[1], nn.SiLU)
                        or not isinstance(seq[-1], nn.Conv3d)
                        or not all(isinstance(x, nn.Dropout) for x in list(seq)[2:-1])):
                    return f"{where} is not GroupNorm, SiLU, [Dropout], Conv3d"
                conv = seq[-1]
                k = conv.kernel_size
                if (k[0] % 2 == 0 or k[1:] != (1, 1) or conv.stride != (1, 1, 1)
                        or conv.dilation != (1, 1, 1) or conv.groups != 1
                        or conv.padding != (k[0] // 2, 0, 0)):
                    return f"{where} is not a same-padded (k, 1, 1) temporal convolution"
        return None

    @staticmethod
    def default_config(model) -> DualScopeConfig:
        return DualScopeConfig()        # the paper's settings (VideoCrafter2)

    @staticmethod
    def _chunk(model, patcher: Patcher, alone: bool):
        """Memory-bounded execution: per-frame layers over frame chunks; the temporal
        transformers' feed-forwards over position chunks, and on one process their whole
        blocks and the temporal conv stacks (on several ranks a block or a stack per chunk
        would exchange its context or halo per chunk)."""
        for m in list(model.modules()):
            for cls, rows, factor in _FRAME_LAYERS:
                if type(m) is cls:
                    patcher.chunk(m, rows, 0, factor)
            if type(m) is TransformerTemporalModel:
                for block in m.transformer_blocks:
                    if type(block.ff) is FeedForward:
                        patcher.chunk(block.ff, ("hidden_states",), 0, 10)
                    if alone and type(block) is BasicTransformerBlock:
                        patcher.chunk(block, ("hidden_states",), 0, 8)
            if alone and patcher.engine.chunk_bytes and type(m) is TemporalConvLayer:
                patcher.swap_class(m, PositionChunkedTemporalConvLayer,
                                   _vinf_bytes=patcher.engine.chunk_bytes)
            if type(m) is TransformerTemporalModel:
                if (alone and patcher.engine.chunk_bytes and type(m.norm) is nn.GroupNorm
                        and m.norm.affine and isinstance(m.proj_in, nn.Linear)
                        and isinstance(m.proj_out, nn.Linear)):
                    patcher.swap_class(m, PositionChunkedTemporalTransformer,
                                       _vinf_bytes=patcher.engine.chunk_bytes)

    def patch(self, model, engine, patcher: Patcher):
        blocking = engine.mode == "blocking"
        # One process holds the whole video: the stock GroupNorm and temporal convs are then
        # exactly the whole-video ones (zero padding at the true ends), with no overhead.
        alone = engine.world_size == 1
        # Starting the context from the transformer's input pays only when it can overlap.
        early = not blocking and not alone
        for m in list(model.modules()):
            if type(m) is TransformerTemporalModel:
                first = m.transformer_blocks[0] if len(m.transformer_blocks) else None
                # The first attention's input is norm1(proj_in(norm(x))), per frame: its context
                # can start from x, if x moves no more bytes than the attention input would.
                slot = None
                if (early and first is not None and first.norm_type == "layer_norm"
                        and type(first.norm1) is nn.LayerNorm and first.attn1 is not None
                        and isinstance(m.proj_in, nn.Linear)
                        and m.proj_in.in_features <= m.proj_in.out_features):
                    slot = ContextSlot(m.proj_in, first.norm1)
                if not alone:
                    patcher.swap_class(m.norm, ClipGroupNorm, _vinf=engine, _vinf_slot=slot)
                for block in m.transformer_blocks:
                    for attn in (block.attn1, block.attn2):
                        if attn is None:
                            continue
                        if blocking:
                            proc = BlockingDualScopeAttnProcessor(engine)
                        else:
                            proc = DualScopeAttnProcessor(
                                engine, slot if attn is first.attn1 else None)
                        patcher.set_processor(attn, proc)
            elif type(m) is TemporalConvLayer and not alone:
                patcher.swap_class(m, BlockingTemporalConvLayer if blocking
                                   else ClipTemporalConvLayer, _vinf=engine)

        self._chunk(model, patcher, alone)

        def begin(module, args, kwargs):
            engine.begin_step(*step_arguments(args, kwargs, self.inputs))
        patcher.pre_hook(model, begin)
        # Stale-mode batch boundaries: the end of each block and of the whole forward.
        patcher.flush_after([getattr(model, "transformer_in", None), *model.down_blocks,
                             getattr(model, "mid_block", None), *model.up_blocks, model])
