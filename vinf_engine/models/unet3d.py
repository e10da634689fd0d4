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
from diffusers.models.unets.unet_3d_blocks import CrossAttnUpBlock3D, UpBlock3D
from diffusers.models.unets.unet_3d_condition import UNet3DConditionOutput
from diffusers.utils.torch_utils import maybe_adjust_dtype_for_device

from ..config import DualScopeConfig
from ..ops.group_norm import group_norm_apply
from ..layers import (BlockingTemporalConvLayer, ClipGroupNorm, ClipTemporalConvLayer,
                      ContextSlot, blocking_clip_attention, clip_attention, conv_stack)
from ..layers.attention import context_rows
from ..layers.chunked import over_rows
from . import register
from .base import AdapterBase, EngineProcessor, Patcher, step_arguments

__all__ = ["UNet3DAdapter", "DualScopeAttnProcessor", "BlockingDualScopeAttnProcessor"]


class DualScopeAttnProcessor(EngineProcessor):
    """Temporal self-attention over ``(B*H*W, F, C)`` as dual-scope attention.

    The attention *input* crosses ranks (halo and global frames), not K and V: one tensor
    instead of two, projected locally by the receiver. The exchange is posted first (or was
    started by the transformer's input norm: ``slot``); the rest is ``layers.clip_attention``.
    Memory-bounded (the engine's ``chunk_bytes``), on any number of ranks: the rows (spatial
    positions, independent of each other) run in chunks, from the projections to the output
    projection, each chunk taking its rows of the one context exchange.
    """

    def __init__(self, engine, slot: ContextSlot | None = None):
        self.engine = engine
        self.slot = slot

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("temporal attention under clip parallelism takes neither "
                             "encoder_hidden_states nor an attention_mask")
        eng = self.engine
        pending = self._context(hidden_states)
        n = hidden_states.shape[0]
        step = (max(1, eng.chunk_bytes // self._row_bytes(attn, hidden_states))
                if eng.chunk_bytes and pending is not None else n)
        def rows(r0, r1):               # the output of rows [r0, r1)
            h = hidden_states[r0:r1]
            ctx = None if pending is None else context_rows(pending, r0, r1)
            return self._output(attn, h, self._attend(attn, h, ctx))
        if step >= n:
            return rows(0, n)
        out = [None]

        def run(r0, r1):
            y = rows(r0, r1)
            if out[0] is None:
                out[0] = y.new_empty((n,) + tuple(y.shape[1:]))
            out[0][r0:r1] = y
        over_rows(eng, n, step, run)
        return out[0]

    def _row_bytes(self, attn, h) -> int:
        """Working memory of one row, roughly (within ~2x): its q, k and v, the context
        mapped to the attention's input and its K and V, the banded K and V copies (up to
        the clip plus a window each side; conservative where a full window attends densely),
        the attention's output (all at the attention's width, 512 vs 320 channels at
        ``transformer_in``) and ``to_out``'s (the op bounds its own logits)."""
        plan = self.engine.attention_plan()
        Fc, C = h.shape[1], h.shape[2]
        n_ctx = len(plan.left) + len(plan.right) + len(plan.glob)
        inner = 4 * Fc + 4 * n_ctx + 2 * (Fc + 2 * plan.window)
        return h.element_size() * (attn.inner_dim * inner + C * Fc)

    def _context(self, h):
        pending = self.slot.take() if self.slot is not None else None
        return pending if pending is not None else self.engine.start_attention_context(h)

    @staticmethod
    def _output(attn, h, o):
        out = attn.to_out[1](attn.to_out[0](o.flatten(2)))
        if attn.residual_connection:
            out = out + h
        return out / attn.rescale_output_factor

    def _attend(self, attn, h, pending):
        q = _project(attn, h, "q")
        k, v = _project(attn, h, "kv")
        return clip_attention(self.engine, pending, q, k, v,
                              lambda x, _: _project(attn, x, "kv"), scale=attn.scale)


class BlockingDualScopeAttnProcessor(DualScopeAttnProcessor):
    """The published prototype's data movement (``layers.blocking_clip_attention``): its K
    and V exchanged whole, the rows never chunked."""

    def _context(self, h):
        return None

    def _attend(self, attn, h, pending):
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


class PositionChunkedTemporalTransformer(TransformerTemporalModel):
    """Memory-bounded: a ``TransformerTemporalModel`` over chunks of spatial positions. Its
    GroupNorm's statistics come first, from the whole video (fp64 partial sums per frame,
    one pass, nothing held; on several ranks ``ClipGroupNorm.start``: all-reduced, and the
    first attention's context started). On one process each chunk of positions then runs
    the norm's apply, ``proj_in``, the blocks, ``proj_out`` and the residual into the output,
    so that none of the module's intermediates is ever held for the whole video: every
    position is independent past the norm (temporal attention and feed-forwards act per
    position). On several ranks the blocks see every position at once (each attention takes
    one exchange and runs its rows in chunks itself: a block per chunk would exchange per
    chunk), and only the per-position parts around them run in chunks: the norm's apply
    and ``proj_in`` into the blocks' input, ``proj_out`` and the residual into the output
    (never the norm's output, its row-major copy or ``proj_out``'s held whole).

    ``_vinf_bytes``: the working memory allowed per chunk; ``_vinf_engine``: the engine,
    whose ``start_stats`` gives the whole video's statistics on one process too."""

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
        several = isinstance(self.norm, ClipGroupNorm)
        mean, rstd = (self.norm.start(x) if several
                      else self._vinf_engine.start_stats(x, self.norm).wait())
        xp = x.flatten(3)                                                 # (B, C, F, P) view
        out = torch.empty_like(hidden_states)
        outp = out.view(B, F, C, P)
        resp = hidden_states.view(B, F, C, P)
        chunks = [(p0, min(P, p0 + step) - p0) for p0 in range(0, P, step)]

        def rows_in(p0, n):             # the blocks' input at positions [p0, p0 + n)
            h = group_norm_apply(xp[..., p0:p0 + n], mean, rstd, self.norm.weight,
                                 self.norm.bias)                          # (B, C, F, n)
            return self.proj_in(h.permute(0, 3, 2, 1).reshape(B * n, F, C))

        def emit(p0, n, h):             # the blocks' output there, (B*n, F, inner)
            h = self.proj_out(h).view(B, n, F, C).permute(0, 2, 3, 1)      # (B, F, C, n)
            outp[..., p0:p0 + n].copy_(h + resp[..., p0:p0 + n])    # autograd-safe

        def blocks(held):               # handed over: each block's input freed once consumed
            h = held.pop()
            for block in self.transformer_blocks:
                h = block(h, encoder_hidden_states=encoder_hidden_states,
                          cross_attention_kwargs=cross_attention_kwargs)
            return h
        if not several:
            for p0, n in chunks:
                emit(p0, n, blocks([rows_in(p0, n)]))
        else:
            inner = self.proj_in.out_features
            h = None
            for p0, n in chunks:
                y = rows_in(p0, n)
                if h is None:
                    h = y.new_empty(B, P, F, inner)
                h[:, p0:p0 + n] = y.view(B, n, F, inner)
            held = [h.view(B * P, F, inner)]
            del h, y
            h = blocks(held).view(B, P, F, -1)
            for p0, n in chunks:
                emit(p0, n, h[:, p0:p0 + n].reshape(B * n, F, h.shape[-1]))
        if not return_dict:
            return (out,)
        return TransformerTemporalModelOutput(sample=out)


def owned_forward(self, sample, timestep, encoder_hidden_states, class_labels=None,
                  timestep_cond=None, attention_mask=None, cross_attention_kwargs=None,
                  down_block_additional_residuals=None, mid_block_additional_residual=None,
                  return_dict=True):
    """``UNet3DConditionModel.forward``, step for step, except that the up path owns what it
    consumes: each up block gets its input and its skips handed over (``_OwningUp*``), and
    lets each go once concatenated, where diffusers' forward keeps the block's input and all
    of its skips referenced until the block returns (at the last up block: the input and
    three full-resolution skips, most of what a frame holds at the forward's peak). Set on
    a memory-bounded engine's plain ``UNet3DConditionModel`` (``_chunk``); with autograd on,
    or FreeU, the stock forward (what autograd saves is needed anyway)."""
    stock = UNet3DConditionModel.forward
    if torch.is_grad_enabled() or any(getattr(b, "s1", None) for b in self.up_blocks):
        return stock(self, sample, timestep, encoder_hidden_states, class_labels, timestep_cond,
                     attention_mask, cross_attention_kwargs, down_block_additional_residuals,
                     mid_block_additional_residual, return_dict)
    up_factor = 2 ** self.num_upsamplers
    forward_upsample_size = any(s % up_factor != 0 for s in sample.shape[-2:])
    upsample_size = None
    if attention_mask is not None:
        attention_mask = (1 - attention_mask.to(sample.dtype)) * -10000.0
        attention_mask = attention_mask.unsqueeze(1)
    num_frames = sample.shape[2]
    emb, encoder_hidden_states = _embeddings(self, sample, timestep, timestep_cond,
                                             encoder_hidden_states)
    sample = sample.permute(0, 2, 1, 3, 4).reshape((sample.shape[0] * num_frames, -1)
                                                   + sample.shape[3:])
    sample = self.conv_in(sample)
    sample = self.transformer_in(sample, num_frames=num_frames,
                                 cross_attention_kwargs=cross_attention_kwargs,
                                 return_dict=False)[0]
    skips = [sample]
    for block in self.down_blocks:
        if getattr(block, "has_cross_attention", False):
            sample, res = block(hidden_states=sample, temb=emb,
                                encoder_hidden_states=encoder_hidden_states,
                                attention_mask=attention_mask, num_frames=num_frames,
                                cross_attention_kwargs=cross_attention_kwargs)
        else:
            sample, res = block(hidden_states=sample, temb=emb, num_frames=num_frames)
        skips.extend(res)
        del res
    if down_block_additional_residuals is not None:
        skips = [a + b for a, b in zip(skips, down_block_additional_residuals)]
    if self.mid_block is not None:
        sample = self.mid_block(sample, emb, encoder_hidden_states=encoder_hidden_states,
                                attention_mask=attention_mask, num_frames=num_frames,
                                cross_attention_kwargs=cross_attention_kwargs)
    if mid_block_additional_residual is not None:
        sample = sample + mid_block_additional_residual
    for i, block in enumerate(self.up_blocks):
        n = len(block.resnets)
        res = skips[-n:]                   # a list the block pops from: handed over
        del skips[-n:]
        if i < len(self.up_blocks) - 1 and forward_upsample_size:
            upsample_size = skips[-1].shape[2:]
        held = [sample]                    # the block's input, handed over likewise
        del sample
        if getattr(block, "has_cross_attention", False):
            sample = block(hidden_states=held, temb=emb, res_hidden_states_tuple=res,
                           encoder_hidden_states=encoder_hidden_states,
                           upsample_size=upsample_size, attention_mask=attention_mask,
                           num_frames=num_frames, cross_attention_kwargs=cross_attention_kwargs)
        else:
            sample = block(hidden_states=held, temb=emb, res_hidden_states_tuple=res,
                           upsample_size=upsample_size, num_frames=num_frames)
    if self.conv_norm_out:
        sample = self.conv_act(self.conv_norm_out(sample))
    sample = self.conv_out(sample)
    sample = sample[None, :].reshape((-1, num_frames) + sample.shape[1:]).permute(0, 2, 1, 3, 4)
    if not return_dict:
        return (sample,)
    return UNet3DConditionOutput(sample=sample)


def _embeddings(self, sample, timestep, timestep_cond, encoder_hidden_states) -> tuple:
    """``UNet3DConditionModel.forward``'s time embedding and text, repeated per frame."""
    num_frames = sample.shape[2]
    timesteps = timestep
    if not torch.is_tensor(timesteps):
        dtype = maybe_adjust_dtype_for_device(
            torch.float64 if isinstance(timestep, float) else torch.int64, sample.device)
        timesteps = torch.tensor([timesteps], dtype=dtype, device=sample.device)
    elif len(timesteps.shape) == 0:
        timesteps = timesteps[None].to(sample.device)
    timesteps = timesteps.expand(sample.shape[0])
    t_emb = self.time_proj(timesteps).to(dtype=self.dtype)
    emb = self.time_embedding(t_emb, timestep_cond)
    emb = emb.repeat_interleave(num_frames, dim=0, output_size=emb.shape[0] * num_frames)
    encoder_hidden_states = encoder_hidden_states.repeat_interleave(
        num_frames, dim=0, output_size=encoder_hidden_states.shape[0] * num_frames)
    return emb, encoder_hidden_states


class _OwningUpBlock3D(UpBlock3D):
    """``UpBlock3D`` that, handed its input and skips as lists (``owned_forward``), pops each
    and lets it go once concatenated; otherwise the stock forward."""

    def forward(self, hidden_states, res_hidden_states_tuple, temb=None, upsample_size=None,
                num_frames=1):
        if not isinstance(hidden_states, list):
            return super().forward(hidden_states, res_hidden_states_tuple, temb, upsample_size,
                                   num_frames)
        h = hidden_states.pop()
        for resnet, temp_conv in zip(self.resnets, self.temp_convs):
            x = torch.cat([h, res_hidden_states_tuple.pop()], dim=1)
            del h
            h = resnet(x, temb)
            del x
            h = temp_conv(h, num_frames=num_frames)
        if self.upsamplers is not None:
            for upsampler in self.upsamplers:
                h = upsampler(h, upsample_size)
        return h


class _OwningCrossAttnUpBlock3D(CrossAttnUpBlock3D):
    """``CrossAttnUpBlock3D`` likewise (see ``_OwningUpBlock3D``)."""

    def forward(self, hidden_states, res_hidden_states_tuple, temb=None,
                encoder_hidden_states=None, upsample_size=None, attention_mask=None,
                num_frames=1, cross_attention_kwargs=None):
        if not isinstance(hidden_states, list):
            return super().forward(hidden_states, res_hidden_states_tuple, temb,
                                   encoder_hidden_states, upsample_size, attention_mask,
                                   num_frames, cross_attention_kwargs)
        h = hidden_states.pop()
        for resnet, temp_conv, attn, temp_attn in zip(self.resnets, self.temp_convs,
                                                      self.attentions, self.temp_attentions):
            x = torch.cat([h, res_hidden_states_tuple.pop()], dim=1)
            del h
            h = resnet(x, temb)
            del x
            h = temp_conv(h, num_frames=num_frames)
            h = attn(h, encoder_hidden_states=encoder_hidden_states,
                     cross_attention_kwargs=cross_attention_kwargs, return_dict=False)[0]
            h = temp_attn(h, num_frames=num_frames, cross_attention_kwargs=cross_attention_kwargs,
                          return_dict=False)[0]
        if self.upsamplers is not None:
            for upsampler in self.upsamplers:
                h = upsampler(h, upsample_size)
        return h


# Per-frame layers and their peak temporaries per input byte (a resnet holds ~3 activations
# besides its input; a spatial transformer's GEGLU feed-forward 8, plus attention and
# projections), and the temporal transformers' feed-forwards, per position.
_FRAME_LAYERS = ((ResnetBlock2D, ("input_tensor", "temb"), 4),
                 (Transformer2DModel, ("hidden_states", "encoder_hidden_states"), 12),
                 (Downsample2D, ("hidden_states",), 3), (Upsample2D, ("hidden_states",), 4))


@register
class UNet3DAdapter(AdapterBase):
    """Patches a diffusers ``UNet3DConditionModel`` (or a subclass) for clip parallelism."""

    name = "UNet3D (ModelScope, Zeroscope, VideoCrafter2)"
    inputs = ("sample", "timestep")       # the forward's clip and timestep parameters
    comm_modes = ("overlap", "blocking", "stale", "loopback")
    caches = True           # DeepCache's way: the deep features (vinf_engine.cache.cache_unet)

    @staticmethod
    def cache_problem(model, cache) -> str | None:
        if cache.front != 1 or cache.back > 1:
            return ("UNet3D's step cache always runs the first down block and the last up block "
                    f"(front=1, back=0 or 1), got front={cache.front}, back={cache.back}")
        if len(model.up_blocks) < 2 or len(model.down_blocks) < 1:
            return "UNet3D's step cache needs at least two up blocks and one down block"
        return None

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
        blocks (on several ranks a block per chunk would exchange its second attention's
        context per chunk: there each attention runs its rows in chunks instead, taking one
        exchange, ``DualScopeAttnProcessor``); the temporal conv stacks over row chunks
        (``ClipTemporalConvLayer``, one halo for all). ``comm_mode="blocking"``, the
        published pattern kept as a baseline, chunks neither its temporal attention nor its
        conv stacks."""
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
            if patcher.engine.chunk_bytes and type(m) in (TemporalConvLayer,
                                                          ClipTemporalConvLayer):
                # (on one process the stock layer until now: it needs the engine too)
                engine = dict(_vinf=patcher.engine) if alone else {}
                patcher.swap_class(m, ClipTemporalConvLayer,
                                   _vinf_bytes=patcher.engine.chunk_bytes, **engine)
            if type(m) is TransformerTemporalModel:
                if (patcher.engine.chunk_bytes and m.norm.affine
                        and type(m.norm) is (nn.GroupNorm if alone else ClipGroupNorm)
                        and isinstance(m.proj_in, nn.Linear)
                        and isinstance(m.proj_out, nn.Linear)):
                    patcher.swap_class(m, PositionChunkedTemporalTransformer,
                                       _vinf_bytes=patcher.engine.chunk_bytes,
                                       _vinf_engine=patcher.engine)
        # The up path owns what it consumes (``owned_forward``): the plain UNet3D's forward,
        # or the UNet forward beneath a subclass's own that says where (``_unet_forward``:
        # VideoCrafter2's fps embedding); another subclass keeps its forward.
        plain = type(model) is UNet3DConditionModel
        if (patcher.engine.chunk_bytes and (plain or hasattr(type(model), "_unet_forward"))
                and all(type(b) in (UpBlock3D, CrossAttnUpBlock3D) for b in model.up_blocks)):
            for b in model.up_blocks:
                patcher.swap_class(b, _OwningUpBlock3D if type(b) is UpBlock3D
                                   else _OwningCrossAttnUpBlock3D)
            name = "forward" if plain else "_vinf_unet_forward"
            patcher.replace_method(model, name, lambda _: owned_forward.__get__(model))

    def patch(self, model, engine, patcher: Patcher):
        blocking = engine.mode == "blocking"
        # One process holds the whole video: the stock GroupNorm and temporal convs are then
        # exactly the whole-video ones (zero padding at the true ends), with no overhead
        # (memory-bounded execution may still give a conv stack its row chunks: ``_chunk``).
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

        def begin(args, kwargs):
            engine.begin_step(*step_arguments(args, kwargs, self.inputs))
        patcher.before_forward(model, begin)
        # Stale-mode batch boundaries: the end of each block and of the whole forward.
        patcher.flush_after([getattr(model, "transformer_in", None), *model.down_blocks,
                             getattr(model, "mid_block", None), *model.up_blocks, model])
        if engine.cache_config is not None:
            from ..cache import StepCache, cache_unet
            engine.cache = StepCache(engine.cache_config, engine, reuse="output")
            cache_unet(patcher, model, engine.cache)
