"""Exact clip-by-clip decoding for diffusers' ``AutoencoderKLLTXVideo`` (LTX-Video 0.9.x).

The LTX decoder is a plain function of the whole latent video: temporal convolutions padded
by repeating the first (and, non-causal, the last) frame, channel-wise norms, and
depth-to-space upsamplers that turn each latent frame into ``s`` frames and drop the first
``s - 1`` of the video (so latent frame 0 is one video frame, latent frame ``i > 0`` the
``R = 8`` frames ending at ``8i``). The released decoder is *non-causal*
(``decoder_causal=False``): a video frame depends on latent frames on both sides. It keeps
no state between frames, so a window of latent frames decoded as a video of its own is
right wherever the repeated-frame padding at the window's false ends has not reached.

``window_of`` derives, from the decoder's structure, the latent frames the video frames of
latent frames ``[a, b)`` depend on: walk backwards from those video frames, widening by each
convolution's padding (``(k - 1) / 2`` frames each side, non-causal; ``k - 1`` left,
causal) at its own rate, and mapping each upsampler's output frame ``e`` to its input frame
``ceil(e / s)``. Decoding that window as a video gives the frames bitwise as a decode whose
padding lies farther away would; one frame less on either side does not (for generic
weights), so it is tight. (Why it suffices: at every layer the window's wrong values lie
within a threshold of its false ends that the same walk, run forwards, gives, and the cone
of the wanted frames stays outside it at every layer iff it does at the latent input.)

Every decode here runs on a *global grid of pieces* of ``chunk`` latent frames,
``[m*chunk, (m+1)*chunk)``, each from its window: a rank decodes the pieces its clip
touches and keeps its frames. The same pieces, the same tensor shapes and the same kernels
whatever the split, so the ranks' frames, concatenated, are bitwise ``decode_clip`` of the
whole video by construction; against ``vae.decode`` of the whole latent at once they differ
by the rounding of convolutions over other lengths (the tests bound it against fp64).

    need = needed_range(vae, start, stop, num_frames, chunk)    # latent frames to hold
    for piece in decode_clip(vae, z[:, :, need.start:need.stop], offset=need.start,
                             frames=range(start, stop), num_frames=F, chunk=chunk):
        ...                                                     # (B, 3, m, H, W), in order
"""
from __future__ import annotations

from typing import Iterator

import torch

__all__ = ["temporal_ops", "temporal_factor", "window_of", "needed_range", "receptive_field",
           "video_frames_of", "decode_clip"]


def _ltx():
    from diffusers.models.autoencoders import autoencoder_kl_ltx
    return autoencoder_kl_ltx


def _pads(conv) -> tuple[int, int]:
    """Past and future frames an ``LTXVideoCausalConv3d`` reads per output frame."""
    k = conv.kernel_size[0]
    d, s = conv.conv.dilation[0], conv.conv.stride[0]
    if d != 1 or s != 1:
        raise ValueError(f"temporal conv with dilation {d}, stride {s}: not a same-length "
                         "convolution; the decoder walk cannot place it")
    return (k - 1, 0) if conv.is_causal else ((k - 1) // 2, (k - 1) // 2)


def temporal_ops(vae) -> list[tuple]:
    """The decoder's temporal structure in forward order: ``("conv", left, right)`` (a
    convolution reading ``left`` past and ``right`` future frames at the current rate) and
    ``("up", s)`` (each frame becomes ``s``, the first ``s - 1`` of the video dropped).
    Norms, activations and 1x1x1 shortcuts read no other frame and are left out."""
    ltx = _ltx()
    ops, done = [], set()
    # Module registration order is forward order in diffusers' LTX decoder (conv_in, mid
    # block, each up block's conv_in, upsampler, resnets; conv_out); a resnet's shortcut is
    # a parallel 1x1x1 branch. The split-decode tests check the result.
    for m in vae.decoder.modules():
        if id(m) in done:
            continue
        if isinstance(m, ltx.LTXVideoUpsampler3d):
            ops.append(("conv", *_pads(m.conv)))
            done.add(id(m.conv))
            if m.stride[0] > 1:
                ops.append(("up", m.stride[0]))
        elif isinstance(m, ltx.LTXVideoCausalConv3d):
            ops.append(("conv", *_pads(m)))
    return ops


def temporal_factor(vae) -> int:
    """Video frames per latent frame (after frame 0), from the decoder's upsamplers; checked
    against ``vae.temporal_compression_ratio``."""
    r = 1
    for op in temporal_ops(vae):
        if op[0] == "up":
            r *= op[1]
    if r != vae.temporal_compression_ratio:
        raise ValueError(f"vae.temporal_compression_ratio={vae.temporal_compression_ratio} but "
                         f"the decoder upsamples time {r}x")
    return r


def video_frames_of(latent: range, R: int) -> range:
    """Global video frames that latent frames ``latent`` decode to."""
    def first(i):
        return 0 if i == 0 else 1 + R * (i - 1)
    return range(first(latent.start), first(latent.stop))


def window_of(vae, a: int, b: int, num_frames: int, ops=None) -> range:
    """The latent frames (within the video's ``num_frames``) that the video frames of latent
    frames ``[a, b)`` depend on, from the decoder's structure (see the module notes)."""
    ops = temporal_ops(vae) if ops is None else ops
    R = 1
    for op in ops:
        if op[0] == "up":
            R *= op[1]
    video = video_frames_of(range(a, b), R)
    lo, hi = video.start, video.stop - 1
    for op in reversed(ops):
        if op[0] == "conv":
            lo, hi = lo - op[1], hi + op[2]
        else:
            lo, hi = -(-lo // op[1]), -(-hi // op[1])
    return range(max(0, lo), min(num_frames, hi + 1))


def receptive_field(vae) -> tuple[int, int]:
    """``(left, right)``: latent frames before and after a latent frame that its video frames
    depend on, away from the video's ends (the released LTX-Video 0.9 decoder: see the docs)."""
    big = 1000
    w = window_of(vae, big, big + 1, 2 * big)
    return big - w.start, w.stop - big - 1


def _pieces(start: int, stop: int, chunk: int) -> list[tuple[int, int]]:
    """The global grid's pieces ``[m*chunk, (m+1)*chunk)`` that ``[start, stop)`` touches,
    cut to the frames wanted."""
    first = start // chunk * chunk
    return [(max(a, start), min(a + chunk, stop)) for a in range(first, stop, chunk)]


def needed_range(vae, start: int, stop: int, num_frames: int, chunk: int) -> range:
    """Latent frames a rank decoding ``[start, stop)`` must hold: the windows of the grid's
    pieces its clip touches (its own frames, and its neighbours' on both sides)."""
    ops = temporal_ops(vae)
    lo, hi = start, stop
    for a, _ in _pieces(start, stop, chunk):
        g = a // chunk * chunk
        w = window_of(vae, g, min(g + chunk, num_frames), num_frames, ops)
        lo, hi = min(lo, w.start), max(hi, w.stop)
    return range(lo, hi)


def decode_clip(vae, z: torch.Tensor, *, offset: int, frames: range, num_frames: int,
                chunk: int = 8, temb: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """Decode latent frames ``frames`` of a video exactly as the whole video's decode on the
    same grid of pieces would.

    Parameters
    ----------
    vae : diffusers.AutoencoderKLLTXVideo
        Not modified.
    z : Tensor (B, C, n, h, w)
        Denormalized latents of global frames ``offset .. offset + n - 1``, covering
        ``needed_range(vae, frames.start, frames.stop, num_frames, chunk)``.
    offset : int
        Global index of ``z``'s first latent frame.
    frames : range
        The global latent frames to decode (a rank's clip).
    num_frames : int
        Latent frames of the whole video.
    chunk : int
        Latent frames per piece of the global grid (the decode's working set: a piece and
        its window).
    temb : Tensor (B,) or None
        The decoder's timestep (``timestep_conditioning`` VAEs), as ``vae.decode`` takes it.

    Returns
    -------
    Iterator[Tensor]
        Lazy (inputs are checked at the call): the video frames of ``frames`` in order, one
        (B, 3, m, H, W) tensor per piece, computed without autograd.

    Raises
    ------
    ValueError
        Bad shapes, or ``z`` not covering the frames the pieces need (both ranges named).
    """
    if not isinstance(z, torch.Tensor) or z.dim() != 5:
        raise ValueError("z must be a 5-D tensor (B, C, n, h, w)")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    if not 0 <= frames.start <= frames.stop <= num_frames:
        raise ValueError(f"frames {frames} are not within the video's {num_frames} latent frames")
    need = needed_range(vae, frames.start, frames.stop, num_frames, chunk)
    have = range(offset, offset + z.shape[2])
    if len(frames) and (need.start < have.start or need.stop > have.stop):
        raise ValueError(f"decoding latent frames {frames.start}..{frames.stop - 1} needs "
                         f"latent frames {need.start}..{need.stop - 1}; z holds "
                         f"{have.start}..{have.stop - 1}")
    return _decode_pieces(vae, z, offset, frames, num_frames, chunk, temb)


def _decode_pieces(vae, z, offset, frames, num_frames, chunk, temb):
    ops = temporal_ops(vae)
    R = temporal_factor(vae)
    for a, b in _pieces(frames.start, frames.stop, chunk):
        g = a // chunk * chunk
        piece = range(g, min(g + chunk, num_frames))
        w = window_of(vae, piece.start, piece.stop, num_frames, ops)
        window = z[:, :, w.start - offset:w.stop - offset]
        with torch.no_grad():
            video = _decode_window(vae, window, temb)
        # The window decodes as a video of its own: its output frame 0 is global video frame
        # R * w.start (the last of that latent frame's R; all of frame 0's at the start).
        want = video_frames_of(range(a, b), R)
        lo = want.start - R * w.start
        if lo < 0:
            raise RuntimeError(f"window {w} cannot give video frame {want.start}")
        yield video[:, :, lo:lo + len(want)]


def _decode_window(vae, window: torch.Tensor, temb) -> torch.Tensor:
    """``vae._decode``'s decoder call on ``window`` (spatial tiling as ``tiled_decode`` does
    it when enabled; never the temporal tiles of framewise decoding, which blend frames)."""
    h, w = window.shape[3], window.shape[4]
    tile_h = vae.tile_sample_min_height // vae.spatial_compression_ratio
    tile_w = vae.tile_sample_min_width // vae.spatial_compression_ratio
    if vae.use_tiling and (w > tile_w or h > tile_h):
        return vae.tiled_decode(window, temb, return_dict=True).sample
    return vae.decoder(window, temb)
