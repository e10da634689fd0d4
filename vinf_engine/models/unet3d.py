"""diffusers ``UNet3DConditionModel`` (ModelScope / Zeroscope / VideoCrafter2) made clip-parallel.

Spatial layers act per frame and stay untouched. Three things couple frames, and each is
replaced in place, keeping its parameters (and so its ``state_dict``):

    TransformerTemporalModel.norm        -> ClipGroupNorm         statistics over the whole video;
                                                                  starts attn1's context
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
from ..ops.group_norm import group_norm_apply
from ..parallel import halo_wants

__all__ = ["UNet3DAdapter", "ClipGroupNorm", "ClipTemporalConvLayer", "DualScopeAttnProcessor"]




class ClipGroupNorm(nn.GroupNorm):
    """GroupNorm over ``(B, C, F, H, W)`` whose statistics span every rank's frames.

    As a temporal transformer's input norm, it also starts the first attention's context
    exchange (``_vinf_prefetch`` set by the adapter): the halo and global frames of the
    *pre-norm* input go out as soon as it exists, right after the statistics' all-reduce, and
    the receiver maps them to the attention's input itself (GroupNorm with the same
    statistics, ``proj_in``, the block's ``norm1``: all per frame). The context is then in
    flight during the statistics' round, the whole norm, ``proj_in``, ``norm1`` and the
    attention's own projections, instead of from the attention's start; and where the input
    is narrower than the attention (``transformer_in``: 320 channels, 512 in attention) it
    moves fewer bytes. The first attention's processor takes it from ``_vinf_ctx``.
    """

    def forward(self, x):
        eng = self._vinf
        prefetch = getattr(self, "_vinf_prefetch", None)
        if prefetch is None or eng.mode == "blocking" or eng.world_size == 1:
            return eng.group_norm(x, self)
        proj_in, norm1 = prefetch
        stats_pending = eng.start_stats(x, self)   # first: on NCCL it runs before the context
        stats = []

        def to_attention_input(g):                 # (B, C, n, H, W) -> (B*H*W, n, inner)
            y = group_norm_apply(g, *stats[0], self.weight, self.bias)
            B, C, n, H, W = y.shape
            return norm1(proj_in(y.permute(0, 3, 4, 2, 1).reshape(B * H * W, n, C)))
        self._vinf_ctx = eng.start_attention_context(x, dim=2, transform=to_attention_input)
        stats.append(stats_pending.wait())
        return eng.group_norm(x, self, stats=stats[0])


class DualScopeAttnProcessor:
    """Temporal self-attention over ``(B*H*W, F, C)`` as dual-scope attention.

    The attention *input* crosses ranks (halo and global frames), not K and V: one tensor
    instead of two, projected locally by the receiver. The exchange is posted first; while it
    is in flight this rank projects its own frames and attends the query frames whose window
    needs no halo (``w <= i < F - w``) to its own keys. When the context arrives, the edge
    frames attend locally and globally in one softmax, and the interior frames' global scope
    joins their local result through a log-sum-exp merge: the same joint softmax, in parts.
    """

    def __init__(self, engine, prefetched_by: nn.Module | None = None):
        self.engine = engine
        self.prefetched_by = prefetched_by   # a ClipGroupNorm that started this context

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("temporal attention under clip parallelism takes neither "
                             "encoder_hidden_states nor an attention_mask")
        eng = self.engine
        if eng.mode == "blocking":
            out = self._blocking(attn, hidden_states)
        else:
            out = self._overlapped(attn, hidden_states)
        out = attn.to_out[0](out.flatten(2))
        out = attn.to_out[1](out)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor

    @staticmethod
    def _project(attn, x, which):
        H = attn.heads
        if which == "q":
            t = attn.to_q(x).unflatten(-1, (H, -1))
            return attn.norm_q(t) if attn.norm_q is not None else t
        k = attn.to_k(x).unflatten(-1, (H, -1))
        v = attn.to_v(x).unflatten(-1, (H, -1))
        return (attn.norm_k(k) if attn.norm_k is not None else k), v

    def _attend(self, attn, q, k_pad, v_pad, kg, vg, a, b, w, n_left, n_right, Fc):
        """Query frames ``[a, b)`` of the clip against padded keys (local frame ``i`` at
        ``i + w``) and the global scope."""
        eng = self.engine
        return ops.dual_scope_attention(
            q[:, a:b], k_pad[:, a:b + 2 * w], v_pad[:, a:b + 2 * w], kg, vg, window=w, pad=w,
            valid_left=min(w, a + n_left), valid_right=min(w, Fc - b + n_right),
            local_bias=eng.local_bias, global_bias=eng.global_bias, scale=attn.scale)

    def _overlapped(self, attn, h):
        eng = self.engine
        Fc = h.shape[1]
        pending = None
        if self.prefetched_by is not None:                       # in flight since the norm
            pending = self.prefetched_by.__dict__.pop("_vinf_ctx", None)
        if pending is None:
            pending = eng.start_attention_context(h)             # in flight from here
        w = eng.attention_plan().window
        q = self._project(attn, h, "q")
        k, v = self._project(attn, h, "kv")
        interior = eng.world_size > 1 and Fc > 2 * w
        if interior:
            o_mid, lse_mid = ops.dual_scope_attention(
                q[:, w:Fc - w], k, v, window=w, pad=w, valid_left=w, valid_right=w,
                local_bias=eng.local_bias, scale=attn.scale, return_lse=True)
        ctx = pending.wait()
        kl, vl = self._project(attn, ctx.left, "kv")
        kr, vr = self._project(attn, ctx.right, "kv")
        kg = vg = None
        if ctx.glob is not None:
            kg, vg = self._project(attn, ctx.glob, "kv")
        nl, nr = ctx.valid_left, ctx.valid_right
        # Frames past the video's ends are masked by the op, never read: zeros are filler.
        fill = (0, 0, 0, 0, w - nl, w - nr)
        k_pad = F.pad(torch.cat([kl, k, kr], dim=1), fill)
        v_pad = F.pad(torch.cat([vl, v, vr], dim=1), fill)
        if not interior:
            return self._attend(attn, q, k_pad, v_pad, kg, vg, 0, Fc, w, nl, nr, Fc)
        first = self._attend(attn, q, k_pad, v_pad, kg, vg, 0, w, w, nl, nr, Fc)
        last = self._attend(attn, q, k_pad, v_pad, kg, vg, Fc - w, Fc, w, nl, nr, Fc)
        if kg is not None:
            o_glob, lse_glob = ops.attention_with_lse(q[:, w:Fc - w], kg, vg, scale=attn.scale,
                                                      bias=eng.global_bias)
            o_mid = ops.merge_attention(o_mid, lse_mid, o_glob, lse_glob)
        return torch.cat([first, o_mid, last], dim=1)

    def _blocking(self, attn, h):
        """The published prototype's data movement: K and V projected locally, then each of
        them fetched from every neighbour separately (one blocking transfer per tensor and
        peer, a device sync after each), and the global frames' K and V all-gathered."""
        eng = self.engine
        layout = eng.layout
        Fc = h.shape[1]
        w = eng.attention_plan().window
        q = self._project(attn, h, "q")
        k, v = self._project(attn, h, "kv")
        wants = halo_wants(layout, w)
        nl = layout.start(eng.rank) - max(0, layout.start(eng.rank) - w)
        if eng.world_size > 1 and any(wants):
            kh = eng.comm.blocking_frames(k, 1, layout, wants, "halo exchange (K)")
            vh = eng.comm.blocking_frames(v, 1, layout, wants, "halo exchange (V)")
        else:
            kh, vh = k[:, :0], v[:, :0]
        nr = kh.shape[1] - nl
        kg = eng.blocking_global_frames(k)
        vg = eng.blocking_global_frames(v)
        fill = (0, 0, 0, 0, w - nl, w - nr)
        k_pad = F.pad(torch.cat([kh[:, :nl], k, kh[:, nl:]], dim=1), fill)
        v_pad = F.pad(torch.cat([vh[:, :nl], v, vh[:, nl:]], dim=1), fill)
        return self._attend(attn, q, k_pad, v_pad, kg, vg, 0, Fc, w, nl, nr, Fc)


def _conv_stack(layer) -> list:
    """The ``convN`` sequentials of a TemporalConvLayer, in order."""
    out, i = [], 1
    while isinstance(getattr(layer, f"conv{i}", None), nn.Sequential):
        out.append(getattr(layer, f"conv{i}"))
        i += 1
    return out


class ClipTemporalConvLayer(TemporalConvLayer):
    """``TemporalConvLayer`` on one clip: a single halo exchange of exactly the stack's
    receptive field, carrying the first GroupNorm's statistics in the same launch; then every
    conv runs on the extended range (``ops.temporal_conv``), zero padding only at the true
    video ends, GroupNorm statistics counting own frames only. In ``blocking`` mode, the
    published pattern instead: a one-frame halo exchange before each conv."""

    def forward(self, hidden_states, num_frames: int = 1):
        eng = self._vinf
        BF, C, H, W = hidden_states.shape
        x = hidden_states.reshape(BF // num_frames, num_frames, C, H, W).permute(0, 2, 1, 3, 4)
        stack = _conv_stack(self)
        layout = eng.layout
        s, e = layout.start(eng.rank), layout.end(eng.rank)
        if eng.mode == "blocking":
            h = x
            for seq in stack:
                h = eng.group_norm(h, seq[0], activation="silu")
                for m in seq[2:-1]:
                    h = m(h)
                conv = seq[-1]
                h, lo, hi = eng.frame_halo(h, 2, conv.kernel_size[0] // 2)
                h, lo, hi = ops.temporal_conv(h, conv.weight, conv.bias, lo=lo, hi=hi,
                                              num_frames=layout.num_frames)
                # A halo that reaches a true video end keeps its frame (zero padding there):
                # the next conv's input must be this clip's frames again.
                h, lo, hi = h[:, :, s - lo:e - lo], s, e
        else:
            halo = sum(seq[-1].kernel_size[0] // 2 for seq in stack)
            (h, lo, hi), stats = eng.start_halo_and_stats(x, halo, stack[0][0]).wait()
            for i, seq in enumerate(stack):
                h = eng.group_norm(h, seq[0], own=slice(s - lo, e - lo), activation="silu",
                                   stats=stats if i == 0 else None)
                for m in seq[2:-1]:   # dropout (identity in eval)
                    h = m(h)
                conv = seq[-1]
                h, lo, hi = ops.temporal_conv(h, conv.weight, conv.bias, lo=lo, hi=hi,
                                              num_frames=layout.num_frames)
        if not (lo <= s and e <= hi):
            raise RuntimeError(f"temporal conv halo too small: got frames [{lo}, {hi}), "
                               f"clip is [{s}, {e})")
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
                first = m.transformer_blocks[0] if len(m.transformer_blocks) else None
                # The first attention's input is norm1(proj_in(norm(x))), per frame: its context
                # can start from x, if x moves no more bytes than the attention input would.
                prefetch = (first is not None and first.norm_type == "layer_norm"
                            and type(first.norm1) is nn.LayerNorm and first.attn1 is not None
                            and isinstance(m.proj_in, nn.Linear)
                            and m.proj_in.in_features <= m.proj_in.out_features)
                if prefetch:
                    m.norm._vinf_prefetch = (m.proj_in, first.norm1)

                    def forget(norm=m.norm):
                        for attr in ("_vinf_prefetch", "_vinf_ctx"):
                            norm.__dict__.pop(attr, None)
                    engine.on_undo(forget)
                for block in m.transformer_blocks:
                    for attn in (block.attn1, block.attn2):
                        if attn is None:
                            continue
                        old = attn.processor
                        source = m.norm if prefetch and attn is first.attn1 else None
                        attn.set_processor(DualScopeAttnProcessor(engine, source))
                        engine.on_undo(lambda a=attn, p=old: a.set_processor(p))
            elif type(m) is TemporalConvLayer:
                swap(m, ClipTemporalConvLayer)

        def pre_hook(module, args, kwargs):
            sample = kwargs["sample"] if "sample" in kwargs else (args[0] if args else None)
            timestep = kwargs["timestep"] if "timestep" in kwargs else (args[1] if len(args) > 1 else None)
            engine.begin_step(sample, timestep)

        handle = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
        engine.on_undo(handle.remove)
        # Batch boundaries for comm_mode="stale" (no-ops otherwise): the end of each block and
        # of the whole forward. Every rank runs the same blocks, so every rank flushes alike.
        blocks = [getattr(model, "transformer_in", None), *model.down_blocks,
                  getattr(model, "mid_block", None), *model.up_blocks, model]
        for block in blocks:
            if block is not None:
                h = block.register_forward_hook(lambda *_: engine.scheduler.flush())
                engine.on_undo(h.remove)
