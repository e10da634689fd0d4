"""diffusers ``UNet3DConditionModel`` (ModelScope / Zeroscope / VideoCrafter2) made clip-parallel.

Spatial layers act per frame and stay untouched. Three things couple frames, and each is
replaced in place, keeping its parameters (and so its ``state_dict``):

    TransformerTemporalModel.norm        -> ClipGroupNorm         statistics over the whole video
    TransformerTemporalModel attn1/attn2 -> DualScopeAttnProcessor halo + global scope, phase bias
    TemporalConvLayer                    -> ClipTemporalConvLayer one halo exchange per layer

and a forward pre-hook on the UNet agrees with the other ranks on each step's layout and
timestep before any layer runs.
"""
from __future__ import annotations

import json

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffusers import UNet3DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import TemporalConvLayer
from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel

from .. import ops

__all__ = ["UNet3DAdapter", "ClipGroupNorm", "ClipTemporalConvLayer", "DualScopeAttnProcessor"]




class ClipGroupNorm(nn.GroupNorm):
    """GroupNorm over ``(B, C, F, H, W)`` whose statistics span every rank's frames."""

    def forward(self, x):
        return self._vinf.group_norm(x, self)


class DualScopeAttnProcessor:
    """Temporal self-attention over ``(B*H*W, F, C)`` as dual-scope attention.

    The attention *input* crosses ranks (halo and global frames), not K and V: one tensor
    instead of two, projected locally by the receiver.
    """

    def __init__(self, engine):
        self.engine = engine

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("temporal attention under clip parallelism takes neither "
                             "encoder_hidden_states nor an attention_mask")
        eng = self.engine
        N, Fc, _ = hidden_states.shape
        ctx = eng.attention_context(hidden_states)
        H = attn.heads
        q = attn.to_q(hidden_states)
        k = attn.to_k(ctx.ext)
        v = attn.to_v(ctx.ext)
        D = q.shape[-1] // H
        q, k, v = (t.unflatten(-1, (H, D)) for t in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        pad = ctx.window
        # Frames past the video's ends are masked by the op, never read: zeros are filler.
        fill = (0, 0, 0, 0, pad - ctx.valid_left, pad - ctx.valid_right)
        k, v = F.pad(k, fill), F.pad(v, fill)
        kg = vg = None
        if ctx.glob is not None:
            kg = attn.to_k(ctx.glob).unflatten(-1, (H, D))
            vg = attn.to_v(ctx.glob).unflatten(-1, (H, D))
            if attn.norm_k is not None:
                kg = attn.norm_k(kg)
        out = ops.dual_scope_attention(
            q, k, v, kg, vg, window=ctx.window, pad=pad, valid_left=ctx.valid_left,
            valid_right=ctx.valid_right, local_bias=eng.local_bias, global_bias=eng.global_bias,
            scale=attn.scale)
        out = attn.to_out[0](out.flatten(2))
        out = attn.to_out[1](out)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def _conv_stack(layer) -> list:
    """The ``convN`` sequentials of a TemporalConvLayer, in order."""
    out, i = [], 1
    while isinstance(getattr(layer, f"conv{i}", None), nn.Sequential):
        out.append(getattr(layer, f"conv{i}"))
        i += 1
    return out


class ClipTemporalConvLayer(TemporalConvLayer):
    """``TemporalConvLayer`` on one clip: a single halo exchange of exactly the stack's
    receptive field, then every conv runs on the extended range (``ops.temporal_conv``), zero
    padding only at the true video ends; GroupNorm statistics count own frames only."""

    def forward(self, hidden_states, num_frames: int = 1):
        eng = self._vinf
        BF, C, H, W = hidden_states.shape
        x = hidden_states.reshape(BF // num_frames, num_frames, C, H, W).permute(0, 2, 1, 3, 4)
        stack = _conv_stack(self)
        halo = sum(seq[-1].kernel_size[0] // 2 for seq in stack)
        layout = eng.layout
        s, e = layout.start(eng.rank), layout.end(eng.rank)
        h, lo, hi = eng.frame_halo(x, 2, halo)
        for seq in stack:
            h = eng.group_norm(h, seq[0], own=slice(s - lo, e - lo), activation="silu")
            for m in seq[2:-1]:   # dropout (identity in eval)
                h = m(h)
            conv = seq[-1]
            h, lo, hi = ops.temporal_conv(h, conv.weight, conv.bias, lo=lo, hi=hi,
                                          num_frames=layout.num_frames)
        h = x + h[:, :, s - lo:e - lo]
        return h.permute(0, 2, 1, 3, 4).reshape(BF, C, H, W)


class UNet3DAdapter:
    """Patches a diffusers ``UNet3DConditionModel`` (or a subclass) for clip parallelism."""

    @staticmethod
    def check(model) -> str | None:
        """Why ``model`` cannot be parallelized, or None."""
        if not isinstance(model, UNet3DConditionModel):
            return ("vinf_engine.parallelize supports diffusers UNet3DConditionModel "
                    f"(ModelScope / Zeroscope / VideoCrafter2); got {type(model).__name__}")
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
            stack = _conv_stack(m)
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
    def fingerprint(model) -> tuple:
        cfg = json.dumps({k: v for k, v in dict(model.config).items() if not k.startswith("_")},
                         sort_keys=True, default=str)
        params = sum(p.numel() for p in model.parameters())
        return type(model).__name__, cfg, params, str(next(model.parameters()).dtype)

    def patch(self, model, engine):
        def swap(module, cls):
            old = module.__class__
            module.__class__ = cls
            module._vinf = engine

            def undo():
                module.__class__ = old
                del module._vinf
            engine.on_undo(undo)

        for m in list(model.modules()):
            if type(m) is TransformerTemporalModel:
                swap(m.norm, ClipGroupNorm)
                for block in m.transformer_blocks:
                    for attn in (block.attn1, block.attn2):
                        if attn is None:
                            continue
                        old = attn.processor
                        attn.set_processor(DualScopeAttnProcessor(engine))
                        engine.on_undo(lambda a=attn, p=old: a.set_processor(p))
            elif type(m) is TemporalConvLayer:
                swap(m, ClipTemporalConvLayer)

        def pre_hook(module, args, kwargs):
            sample = kwargs["sample"] if "sample" in kwargs else (args[0] if args else None)
            timestep = kwargs["timestep"] if "timestep" in kwargs else (args[1] if len(args) > 1 else None)
            engine.begin_step(sample, timestep)

        handle = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
        engine.on_undo(handle.remove)
