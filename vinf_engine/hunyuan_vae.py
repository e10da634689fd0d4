"""Exact clip-by-clip decoding for diffusers' ``AutoencoderKLHunyuanVideo`` (HunyuanVideo 1.0).

The decoder itself is *not* a function of a bounded window of latent frames: every
GroupNorm takes its statistics over all the frames it is given, and the mid block's
attention lets each frame attend to every earlier one (a frame-causal mask). A decoder call
on the whole video couples every frame with every other; no warm-up of a few frames can
reproduce it on a clip, and distributing it would need the norms' statistics and the
attention's keys of the whole video on every rank.

But ``vae.decode`` does not make that call on a long video. With ``use_framewise_decoding``
(on by default) and more than ``tile_sample_min_num_frames / 4`` latent frames, it decodes
fixed *temporal tiles*: tile ``j`` is the latent frames ``[j*s, j*s + m + 1)`` (``m`` =
16 / 4, ``s`` = 12 / 4 by default), each decoded as a video of its own (its first frame
dropped after tile 0), then blends each tile's first frames with the previous (already
blended) tile's last ones, keeps a stride of frames of each and concatenates them. Every
video frame is therefore a function of a few tiles, each a decoder call on a fixed window
of latents, so a rank can decode exactly its own frames: it decodes the tiles its frames
fall in and, as a warm-up, the tile before each (whose last frames blend into its first;
further back only while a short tile at the video's end lets a blend reach past it). The
tiles are the stock calls on the same windows, shapes and modules, and the blends the same
elementwise operations, so the ranks' frames concatenated are ``vae.decode``'s bits.

A video short enough for one tile, or a VAE with ``use_framewise_decoding`` off, is one
decoder call over the whole video: then every rank decodes the whole video and keeps its
frames (exact, not distributed; the latents are small there, or the user chose it).

    tiles = temporal_tiles(vae, L)
    need = needed_range(vae, start, stop, L)          # latent frames the decode reads
    for piece in decode_clip(vae, z[:, :, need.start:need.stop], offset=need.start,
                             frames=range(start, stop), num_frames=L):
        ...                                           # (B, 3, m, H, W), in order
"""
from __future__ import annotations

from typing import Iterator

import torch

__all__ = ["temporal_tiles", "video_frames_of", "needed_range", "decode_clip", "whole_video"]


def whole_video(vae, num_frames: int) -> bool:
    """Whether ``vae.decode`` makes one decoder call over all ``num_frames`` latent frames."""
    m = vae.tile_sample_min_num_frames // vae.temporal_compression_ratio
    return not (vae.use_framewise_decoding and num_frames > m)


def temporal_tiles(vae, num_frames: int) -> list[range]:
    """The latent frames of each decoder call ``vae.decode`` makes (``_temporal_tiled_decode``'s
    tiles, or the whole video)."""
    R = vae.temporal_compression_ratio
    if whole_video(vae, num_frames):
        return [range(0, num_frames)]
    m = vae.tile_sample_min_num_frames // R
    s = vae.tile_sample_stride_num_frames // R
    if s < 1:
        raise ValueError(f"tile_sample_stride_num_frames {vae.tile_sample_stride_num_frames} "
                         f"is under one latent frame ({R} video frames)")
    return [range(i, min(i + m + 1, num_frames)) for i in range(0, num_frames, s)]


def _plan(vae, num_frames: int) -> list[tuple]:
    """Per tile ``(latents, length, extent, place)``: its latent frames, its decoded frames
    after the drop, the frames its blend reads of the previous tile, and the global video
    frames its kept part fills (the stock concatenation, cut to the video's length)."""
    R = vae.temporal_compression_ratio
    tiles = temporal_tiles(vae, num_frames)
    total = (num_frames - 1) * R + 1
    if len(tiles) == 1:
        return [(tiles[0], total, 0, range(0, total))]
    S = vae.tile_sample_stride_num_frames
    blend = vae.tile_sample_min_num_frames - S
    out, at, prev = [], 0, None
    for j, t in enumerate(tiles):
        n = 1 + R * (len(t) - 1) - (1 if j else 0)
        extent = min(prev, n, blend) if j else 0
        kept = min(n, S + 1 if j == 0 else S)
        out.append((t, n, extent, range(min(at, total), min(at + kept, total))))
        at, prev = at + kept, n
    return out


def video_frames_of(latent: range, R: int) -> range:
    """Global video frames of latent frames ``latent`` (frame 0 is one, the others ``R``)."""
    def first(i):
        return 0 if i == 0 else 1 + R * (i - 1)
    return range(first(latent.start), first(latent.stop))


def _chain(plan: list, j: int) -> range:
    """The tiles whose decodes tile ``j``'s blended frames read: back to one whose own blend
    does not reach the frames the next tile reads (or to tile 0)."""
    base = j - 1 if j else 0
    while base > 0:
        _, n, extent, _ = plan[base]
        if n >= extent + plan[base + 1][2]:
            break
        base -= 1
    return range(base, j + 1)


def _wanted(plan: list, video: range) -> list[int]:
    return [j for j, p in enumerate(plan) if p[3].start < video.stop and video.start < p[3].stop]


def needed_range(vae, start: int, stop: int, num_frames: int) -> range:
    """Latent frames a rank decoding latent frames ``[start, stop)`` must hold."""
    plan = _plan(vae, num_frames)
    video = video_frames_of(range(start, stop), vae.temporal_compression_ratio)
    lo, hi = start, stop
    for j in _wanted(plan, video):
        for k in _chain(plan, j):
            lo, hi = min(lo, plan[k][0].start), max(hi, plan[k][0].stop)
    return range(lo, hi)


def decode_clip(vae, z: torch.Tensor, *, offset: int, frames: range,
                num_frames: int) -> Iterator[torch.Tensor]:
    """Decode latent frames ``frames`` of a video exactly as ``vae.decode`` of the whole
    video does.

    Parameters
    ----------
    vae : diffusers.AutoencoderKLHunyuanVideo
        Not modified.
    z : Tensor (B, C, n, h, w)
        Scaled-back latents (``latents / scaling_factor``) of global frames ``offset ..
        offset + n - 1``, covering ``needed_range(vae, frames.start, frames.stop, num_frames)``.
    offset : int
        Global index of ``z``'s first latent frame.
    frames : range
        The global latent frames to decode (a rank's clip).
    num_frames : int
        Latent frames of the whole video.

    Returns
    -------
    Iterator[Tensor]
        Lazy (inputs are checked at the call): the video frames of ``frames`` in order, one
        (B, 3, m, H, W) tensor per tile, computed without autograd.

    Raises
    ------
    ValueError
        Bad shapes, or ``z`` not covering the latent frames the tiles need (both named).
    """
    if not isinstance(z, torch.Tensor) or z.dim() != 5:
        raise ValueError("z must be a 5-D tensor (B, C, n, h, w)")
    if not 0 <= frames.start <= frames.stop <= num_frames:
        raise ValueError(f"frames {frames} are not within the video's {num_frames} latent frames")
    need = needed_range(vae, frames.start, frames.stop, num_frames)
    have = range(offset, offset + z.shape[2])
    if len(frames) and (need.start < have.start or need.stop > have.stop):
        raise ValueError(f"decoding latent frames {frames.start}..{frames.stop - 1} needs "
                         f"latent frames {need.start}..{need.stop - 1}; z holds "
                         f"{have.start}..{have.stop - 1}")
    return _decode_tiles(vae, z, offset, frames, num_frames)


def _decode_tiles(vae, z, offset, frames, num_frames):
    plan = _plan(vae, num_frames)
    video = video_frames_of(frames, vae.temporal_compression_ratio)
    raw: dict = {}

    def decoded(k):                     # tile k as the stock decode has it before blending
        if k not in raw:
            t = plan[k][0]
            with torch.no_grad():
                out = _decode_window(vae, z[:, :, t.start - offset:t.stop - offset])
            raw[k] = out[:, :, 1:] if k else out
        return raw[k]

    for j in _wanted(plan, video):
        chain = _chain(plan, j)
        acc = decoded(chain[0]).clone()
        for k in chain[1:]:
            acc = _blend(acc, decoded(k).clone(), plan[k][2])
        for k in [k for k in raw if k < chain[-1]]:
            del raw[k]                  # later tiles' chains start at this one or later
        place = plan[j][3]
        lo, hi = max(place.start, video.start), min(place.stop, video.stop)
        yield acc[:, :, lo - place.start:hi - place.start]


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int) -> torch.Tensor:
    """``AutoencoderKLHunyuanVideo.blend_t``'s operations: ``b``'s first ``extent`` frames
    faded in from ``a``'s last ones, frame by frame (in place on ``b``)."""
    for x in range(extent):
        b[:, :, x] = a[:, :, -extent + x] * (1 - x / extent) + b[:, :, x] * (x / extent)
    return b


def _decode_one(vae, window: torch.Tensor) -> torch.Tensor:
    """One decoder call of ``vae._decode`` / ``_temporal_tiled_decode`` on ``window`` (spatial
    tiling as the stock decode applies it)."""
    ks = vae.spatial_compression_ratio
    tile_h, tile_w = vae.tile_sample_min_height // ks, vae.tile_sample_min_width // ks
    if vae.use_tiling and (window.shape[-1] > tile_w or window.shape[-2] > tile_h):
        return vae.tiled_decode(window, return_dict=True).sample
    return vae.decoder(vae.post_quant_conv(window))


def _decode_window(vae, window: torch.Tensor) -> torch.Tensor:
    """Per sample under ``use_slicing``, as ``vae.decode`` slices the batch."""
    if vae.use_slicing and window.shape[0] > 1:
        return torch.cat([_decode_one(vae, w) for w in window.split(1)])
    return _decode_one(vae, window)
