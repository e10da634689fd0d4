"""Divided clip-by-clip decoding for diffusers' ``AutoencoderKLHunyuanVideo15`` (HunyuanVideo 1.5).

``vae.decode`` is one decoder call over the whole video (``HunyuanVideo15Decoder3D``). Its
structure, in forward order: ``conv_in`` (a causal conv, plus a channel-repeat shortcut), the
mid block (resnet, attention, resnet), five up blocks (resnets, then an upsampler whose causal
conv is followed by a 2x2 spatial and, in the first two, a 2x temporal pixel shuffle), and the
head (RMS norm, SiLU, ``conv_out``). Every norm is per position (``F.normalize`` over the
channels), every shortcut per frame, every conv causal: ``HunyuanVideo15CausalConv3d`` pads
``k_t - 1`` replicated first frames in front, so output frame ``t`` reads input frames
``t - k_t + 1 .. t``. The temporal upsampler turns input frame 0 into one frame and every later
frame ``g`` into frames ``2g - 1, 2g``. So, except for the attention, the decoder is a stack
of operators of bounded temporal reach: its frames ``[e, hi)`` are exact given its input's
frames ``[e', hi)`` for an ``e'`` computed from the module structure (``_reach``).

The attention (``HunyuanVideo15AttnBlock``) lets every token attend to every token of its own
frame and of all earlier frames (the stock code builds that as a dense additive mask over all
``T * h * w`` tokens). It is the one operator whose reach is unbounded: its output at frame
``t`` needs the keys and values of frames ``0 .. t``. But it sits in the mid block, at latent
size, where the decoder is cheapest. So a rank decoding latent frames ``[a, b)``:

* runs ``conv_in``, the first mid resnet and the attention's norm and key/value projections
  over latent frames ``[0, b)`` (the whole prefix: about 0.5 % of the decoder's work per
  latent frame for the released VAE, see ``decode_work``);
* runs the attention's queries only for the frames the rest needs, each query frame ``t``
  against the keys and values of frames ``0 .. t`` (one unmasked attention per query frame:
  the stock mask's allowed set, without the ``(T h w)^2`` mask);
* runs everything after the attention (the second mid resnet, the up blocks, the head) over
  the clip plus a warm-up that narrows towards the output: each operator gets exactly the
  frames the next one's exact frames read (``decode_plan``), and the frames a window's start
  spoils (replicated padding of a frame that is not the video's first, the first-frame rule of
  an upsampler applied to a window's first frame) are cut before the next operator. The
  released VAE reads 36 latent frames back at the second mid resnet, 42 video frames at the
  third up block, 14 at the last, 2 at ``conv_out``.

The ranks' frames concatenated equal ``vae.decode`` of the whole video *to rounding*: every
output frame is the same operators on the same values, but on windows of other lengths (a
convolution, a projection) and the attention sums over the keys a frame may see instead of
over all keys with zeros from the mask, so reductions may be ordered differently. The tests
bound it in fp64 (1e-12 relative) and, in fp32, by the stock fp32 decode's own error against
fp64. A clip that is the whole video (one rank) is the stock call, bitwise.

Without an attention in the mid block (``add_attention=False``) everything has bounded reach
and the prefix part disappears: ``needed_range`` then starts a warm-up before the clip.

``vae.enable_tiling()``: the stock decode cuts the latent into overlapping spatial tiles when it
is wider or taller than ``tile_latent_min_*``, decodes each tile with one decoder call over all
frames and blends neighbouring tiles per frame (``blend_v``, ``blend_h``). Here each tile is
decoded over the clip as above and the stock blend functions run on the clip's frames: per
frame, so the same arithmetic. ``use_slicing`` decodes a batch one sample at a time, as stock.

    need = needed_range(vae, start, stop)             # latent frames the rank must hold
    video = decode_clip(vae, z[:, :, need.start:stop], offset=need.start,
                        frames=range(start, stop), num_frames=L)   # (B, 3, n, H, W)
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from .vae_tiles import blend_tile_grid

__all__ = ["decode_plan", "needed_range", "decode_clip", "decode_work", "video_frames_of"]


def _hy15():
    from diffusers.models.autoencoders import autoencoder_kl_hunyuanvideo15 as m
    return m


def video_frames_of(latent: range, R: int = 4) -> range:
    """Global video frames of latent frames ``latent`` (frame 0 is one, the others ``R``)."""
    def first(i):
        return 0 if i == 0 else 1 + R * (i - 1)
    return range(first(latent.start), first(latent.stop))


class _Op(NamedTuple):
    """One operator of ``HunyuanVideo15Decoder3D.forward`` as this module runs it.

    ``past``: input frames before each output frame it reads (its causal convs' ``k_t - 1``
    summed along its main path), at its input rate; ``-1`` for the attention (all of them).
    ``factor``: output frames per input frame after the first (2 for a temporal upsampler).
    ``module``: the stock module whose weights it runs (for ``decode_work``); ``area``: pixels
    per latent pixel at its input."""
    name: str
    past: int
    factor: int
    run: Callable
    module: torch.nn.Module
    area: int


def _past(conv) -> int:
    """Past frames a ``HunyuanVideo15CausalConv3d`` reads per output frame: ``k_t - 1``."""
    c = conv.conv
    k, s, d = c.kernel_size[0], c.stride[0], c.dilation[0]
    front, back = conv.time_causal_padding[4], conv.time_causal_padding[5]
    if s != 1 or d != 1 or back != 0 or front != k - 1 or c.padding[0] != 0:
        raise ValueError(f"causal conv with temporal kernel {k}, stride {s}, dilation {d}, pads "
                         f"({front}, {back}) is not a same-length causal conv; the split decode "
                         "cannot place it")
    return front


def _resnet_past(block) -> int:
    if not isinstance(block, _hy15().HunyuanVideo15ResnetBlock):
        raise ValueError(f"unexpected decoder block {type(block).__name__}")
    return _past(block.conv1) + _past(block.conv2)


def _ops(vae) -> list[_Op]:
    """The decoder's operators in forward order (``HunyuanVideo15Decoder3D.forward``)."""
    m = _hy15()
    d = vae.decoder
    if type(d) is not m.HunyuanVideo15Decoder3D:
        raise ValueError(f"the VAE's decoder is {type(d).__name__}, not HunyuanVideo15Decoder3D")
    ops = [_Op("conv_in", _past(d.conv_in), 1,
               lambda x: d.conv_in(x) + x.repeat_interleave(repeats=d.repeat, dim=1),
               d.conv_in, 1)]
    mid = d.mid_block
    ops.append(_Op("mid.resnets.0", _resnet_past(mid.resnets[0]), 1, mid.resnets[0],
                   mid.resnets[0], 1))
    for i, (attn, res) in enumerate(zip(mid.attentions, mid.resnets[1:])):
        if attn is not None:
            ops.append(_Op(f"mid.attentions.{i}", -1, 1, attn, attn, 1))
        ops.append(_Op(f"mid.resnets.{i + 1}", _resnet_past(res), 1, res, res, 1))
    area = 1
    for j, block in enumerate(d.up_blocks):
        for i, res in enumerate(block.resnets):
            ops.append(_Op(f"up_blocks.{j}.resnets.{i}", _resnet_past(res), 1, res, res, area))
        for up in block.upsamplers or ():
            if not isinstance(up, m.HunyuanVideo15Upsample):
                raise ValueError(f"unexpected upsampler {type(up).__name__}")
            ops.append(_Op(f"up_blocks.{j}.upsampler", _past(up.conv),
                           2 if up.add_temporal_upsample else 1, up, up, area))
            area *= 4
    ops.append(_Op("head", _past(d.conv_out), 1,
                   lambda x: d.conv_out(d.conv_act(d.norm_out(x))), d.conv_out, area))
    return ops


def _exact_from(op: _Op, e: int) -> int:
    """The first exact output frame of ``op`` run on a window whose frames ``[e, hi)`` are
    exact and whose first frame is ``e`` (``e == 0``: the video's own start, all exact)."""
    if e == 0:
        return 0
    if op.factor == 1:
        return e + op.past
    # the window's first frame takes the upsampler's frame-0 rule; input frame g > e gives
    # output frames 2g - 1, 2g once the conv is exact at g
    return op.factor * (e + max(op.past, 1)) - (op.factor - 1)


def _first_of(op: _Op, e: int) -> int:
    """Global index of the output window's first frame for an input window starting at ``e``."""
    return op.factor * e


def _need(op: _Op, o: int) -> int:
    """The latest input start ``e`` with ``_exact_from(op, e) <= o``."""
    if op.past < 0:
        return 0                                # the attention's keys: every earlier frame
    if op.factor == 1:
        return max(0, o - op.past)
    if o == 0:
        return 0
    e = max(0, (o + op.factor - 1) // op.factor - max(op.past, 1))
    assert _exact_from(op, e) <= o
    return e


class _Step(NamedTuple):
    op: _Op
    start: int          # global index (at the op's input rate) of its input window's first frame
    stop: int           # ... and one past its last
    keep: int           # global index of the first output frame kept for the next op


def decode_plan(vae, start: int, stop: int) -> list[_Step]:
    """Per decoder operator, the input frames a clip of latent frames ``[start, stop)`` runs it
    on (global indices at that operator's input rate) and the first output frame it keeps.

    Walks the decoder backwards from the clip's first video frame: each operator's input must
    be exact from ``_need(op, o)`` on for its output to be exact from ``o`` (the attention:
    from frame 0). The last step keeps ``video_frames_of(range(start, stop)).start``."""
    if not 0 <= start < stop:
        raise ValueError(f"bad clip [{start}, {stop})")
    ops = _ops(vae)
    o = video_frames_of(range(start, stop), vae.temporal_compression_ratio).start
    keeps = []
    for op in reversed(ops):
        keeps.append(o)
        o = _need(op, o)
    keeps.reverse()
    hi, steps, e = stop, [], o
    for op, keep in zip(ops, keeps):
        steps.append(_Step(op, e, hi, keep))
        if op.factor != 1:
            hi = op.factor * hi - (op.factor - 1)
        e = keep
    if hi != video_frames_of(range(start, stop), vae.temporal_compression_ratio).stop:
        raise ValueError(f"the decoder upsamples time to {hi} frames for latent frames "
                         f"[{start}, {stop}), not the VAE's temporal_compression_ratio "
                         f"{vae.temporal_compression_ratio}")
    return steps


def needed_range(vae, start: int, stop: int) -> range:
    """Latent frames a rank decoding latent frames ``[start, stop)`` must hold."""
    return range(decode_plan(vae, start, stop)[0].start, stop)


def _attention(attn, x: torch.Tensor, q0: int) -> torch.Tensor:
    """``HunyuanVideo15AttnBlock.forward`` for query frames ``[q0, T)`` of ``x`` (B, C, T, h, w),
    frames ``0 .. T-1``: each query frame ``t`` attends the tokens of frames ``0 .. t`` (the
    stock mask's allowed keys), one attention per query frame, no mask. (B, C, T - q0, h, w)."""
    identity = x[:, :, q0:]
    n = attn.norm(x)
    key, value, query = attn.to_k(n), attn.to_v(n), attn.to_q(n[:, :, q0:])
    B, C, T, H, W = key.shape
    hw = H * W

    def tokens(t):      # the stock layout: (B, 1, frames * h * w, C)
        return t.reshape(B, C, -1).permute(0, 2, 1).unsqueeze(1).contiguous()
    query, key, value = tokens(query), tokens(key), tokens(value)
    out = torch.empty_like(query)
    for t in range(q0, T):
        rows = slice((t - q0) * hw, (t - q0 + 1) * hw)
        out[:, :, rows] = F.scaled_dot_product_attention(
            query[:, :, rows], key[:, :, :(t + 1) * hw], value[:, :, :(t + 1) * hw])
    out = out.squeeze(1).reshape(B, T - q0, H, W, C).permute(0, 4, 1, 2, 3)
    return attn.proj_out(out) + identity


def _decode_window(vae, steps: list[_Step], z: torch.Tensor, offset: int) -> torch.Tensor:
    """The decoder over ``steps`` on latents ``z`` of global frames ``offset ..``: the video
    frames from ``steps[-1].keep`` to the clip's end."""
    first = steps[0]
    x = z[:, :, first.start - offset:first.stop - offset]
    for st in steps:
        if st.op.past < 0:
            x = _attention(st.op.run, x, st.keep)       # x holds frames 0 .. stop - 1
            continue
        x = st.op.run(x)
        cut = st.keep - _first_of(st.op, st.start)
        assert _exact_from(st.op, st.start) <= st.keep and cut >= 0
        x = x[:, :, cut:]
    return x


def _tiled(vae, decode: Callable, z: torch.Tensor) -> torch.Tensor:
    """``AutoencoderKLHunyuanVideo15.tiled_decode`` with ``decode`` for ``self.decoder``: the
    same tiles, the stock blend functions on the decoded frames (per frame)."""
    _, _, _, height, width = z.shape
    overlap_height = int(vae.tile_latent_min_height * (1 - vae.tile_overlap_factor))
    overlap_width = int(vae.tile_latent_min_width * (1 - vae.tile_overlap_factor))
    blend_height = int(vae.tile_sample_min_height * vae.tile_overlap_factor)
    blend_width = int(vae.tile_sample_min_width * vae.tile_overlap_factor)
    row_limit_height = vae.tile_sample_min_height - blend_height
    row_limit_width = vae.tile_sample_min_width - blend_width
    rows = []
    for i in range(0, height, overlap_height):
        rows.append([decode(z[:, :, :, i:i + vae.tile_latent_min_height,
                              j:j + vae.tile_latent_min_width])
                     for j in range(0, width, overlap_width)])
    return blend_tile_grid(vae, rows, (blend_height, blend_width),
                           (row_limit_height, row_limit_width))


def decode_clip(vae, z: torch.Tensor, *, offset: int, frames: range,
                num_frames: int) -> torch.Tensor:
    """Decode latent frames ``frames`` of a video as ``vae.decode`` of the whole video does
    (to rounding; bitwise when ``frames`` is the whole video, which is the stock call).

    Parameters
    ----------
    vae : diffusers.AutoencoderKLHunyuanVideo15
        Not modified.
    z : Tensor (B, C, n, h, w)
        Scaled-back latents (``latents / scaling_factor``) of global latent frames ``offset ..
        offset + n - 1``, covering ``needed_range(vae, frames.start, frames.stop)``.
    offset : int
        Global index of ``z``'s first latent frame.
    frames : range
        The global latent frames to decode (a rank's clip), not empty.
    num_frames : int
        Latent frames of the whole video.

    Returns
    -------
    Tensor (B, 3, m, H, W)
        The video frames ``video_frames_of(frames)``, computed without autograd.

    Raises
    ------
    ValueError
        Bad shapes, a decoder this module cannot place, or ``z`` not covering the latent
        frames the clip needs (named).
    """
    if not isinstance(z, torch.Tensor) or z.dim() != 5:
        raise ValueError("z must be a 5-D tensor (B, C, n, h, w)")
    if not 0 <= frames.start < frames.stop <= num_frames:
        raise ValueError(f"frames {frames} are not a non-empty part of the video's "
                         f"{num_frames} latent frames")
    steps = decode_plan(vae, frames.start, frames.stop)
    need, have = range(steps[0].start, frames.stop), range(offset, offset + z.shape[2])
    if need.start < have.start or need.stop > have.stop:
        raise ValueError(f"decoding latent frames {frames.start}..{frames.stop - 1} needs "
                         f"latent frames {need.start}..{need.stop - 1}; z holds "
                         f"{have.start}..{have.stop - 1}")
    with torch.no_grad():
        if frames == range(0, num_frames) and have == frames:
            return vae.decode(z).sample                 # the whole video: the stock call

        def decode(t):
            return _decode_window(vae, steps, t, offset)

        def one(t):                                     # AutoencoderKLHunyuanVideo15._decode
            _, _, _, h, w = t.shape
            if vae.use_tiling and (w > vae.tile_latent_min_width or h > vae.tile_latent_min_height):
                return _tiled(vae, decode, t)
            return decode(t)
        if vae.use_slicing and z.shape[0] > 1:
            return torch.cat([one(t) for t in z.split(1)])
        return one(z)


def decode_work(vae, start: int, stop: int, h: int, w: int) -> dict:
    """Multiply-adds of ``decode_clip`` for latent frames ``[start, stop)`` at latent size
    ``h x w`` (no tiling), per part: ``"prefix"`` (conv_in, the mid block up to its attention:
    frames from 0), ``"attention"`` (scores and weighted sums), ``"window"`` (everything after
    it, over the clip and its warm-up), with ``"frames"``: per operator, its input frames.
    Counts convolution weights x output positions; works on a meta-device VAE."""
    steps = decode_plan(vae, start, stop)
    last_attn = max((i for i, s in enumerate(steps) if s.op.past < 0), default=-1)
    out = {"prefix": 0, "attention": 0, "window": 0, "frames": {}}
    for i, st in enumerate(steps):
        n = st.stop - st.start
        out["frames"][st.op.name] = n
        px = h * w * st.op.area
        if st.op.past < 0:
            C, T, q = st.op.module.in_channels, st.stop, st.stop - st.keep
            out["prefix"] += 2 * C * C * T * px                      # keys, values
            out["window"] += 2 * C * C * q * px                      # queries, proj_out
            keys = sum((t + 1) for t in range(st.keep, st.stop)) * px
            out["attention"] += 2 * C * keys * px
            continue
        convs = [m for m in st.op.module.modules() if isinstance(m, torch.nn.Conv3d)]
        macs = 0
        for c in convs:
            k = c.weight.numel()
            # the upsampler's conv and everything else run at the input's size
            macs += k * n * px
        out["prefix" if i < last_attn else "window"] += macs
    return out
