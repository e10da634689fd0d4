"""Exact clip-by-clip decoding for diffusers' ``AutoencoderKLCogVideoX`` (CogVideoX 1.0 and 1.5).

``AutoencoderKLCogVideoX._decode`` runs the decoder over *chunks* of latent frames, the first
``2 + L % 2`` frames then pairs (``num_latent_frames_batch_size = 2``), and carries, for every
causal convolution, the last two frames of its input from one chunk to the next. Inside a
chunk the decoder is not per frame: every GroupNorm (the spatially conditioned norms)
takes its statistics over the chunk's frames, and the temporal upsamplers double the
chunk's frames (its first frame once only in the video's first chunk). So a chunk's video
depends on whole chunks: its own, and through the convolution caches, earlier ones.

Each norm followed by a cached convolution reaches one chunk further back, so the decode of
a chunk depends on a finite number of chunks before it, ``causal_history(vae)``, derived from
the decoder's structure. ``decode_clip`` decodes a clip exactly by first running the decoder
over that many chunks before the clip's first one (a warm-up whose video is thrown away),
then over the chunks that hold the clip's latent frames, keeping the video frames of the
clip's own latent frames (a clip boundary inside a chunk reads the chunk's other frame from
the neighbouring clip):

    K = causal_history(vae)
    need = needed_range(K, start, stop, L)        # global latent frames the decode reads
    for piece in decode_clip(vae, z_whole[:, :, need.start:need.stop], first=need.start,
                             start=start, stop=stop, num_frames=L):
        ...                                        # (B, 3, m, H, W), in order

The pieces of all clips of a video, concatenated in order, are bitwise ``decode_clip`` of
the whole video, by construction: every chunk is decoded on the same shapes by the same
modules with the same cache contents whatever the split. They are ``vae.decode``'s own
calls (``post_quant_conv`` and the decoder per chunk, per sample under ``use_slicing``), so
they are its bits too. Videos of an odd number of latent frames (``4k + 1`` video frames:
the stock pipelines' only kind) are supported; an even number makes ``4L`` frames in
diffusers. Tiled decoding (``vae.enable_tiling()`` on a latent larger than a tile) is
refused: its tiles blend across each other and are not these chunks.
"""
from __future__ import annotations

from typing import Iterator

import torch

__all__ = ["causal_history", "chunks", "needed_range", "decode_clip", "temporal_factor"]


def chunks(num_frames: int) -> list:
    """``[(start, stop)]``: the latent frames of each decoder call of ``_decode``."""
    r = num_frames % 2
    return [(0 if i == 0 else 2 * i + r, 2 * (i + 1) + r if i or num_frames > 1 else 1)
            for i in range(max(num_frames // 2, 1))]


def _chunk_of(i: int) -> int:
    """The chunk holding latent frame ``i`` of a video of an odd number of frames."""
    return 0 if i < 3 else (i - 1) // 2


def _walk(vae) -> list:
    """The decoder's temporal structure in forward order: ``("conv", p)`` (a causal conv
    reading ``p`` past frames), ``("norm",)`` (statistics over the chunk's frames), ``("up",)``
    (the frames double), ``("res", main, p_shortcut)`` (a residual block)."""
    from diffusers.models.autoencoders.autoencoder_kl_cogvideox import CogVideoXCausalConv3d

    def conv(m):
        if not isinstance(m, CogVideoXCausalConv3d):
            return ("conv", 0)                      # a 1x1x1 shortcut reads no past
        if m.pad_mode == "replicate" or m.conv.stride[0] != 1 or m.conv.dilation[0] != 1:
            raise ValueError(f"causal conv with pad mode {m.pad_mode!r}, stride "
                             f"{m.conv.stride[0]}, dilation {m.conv.dilation[0]}: not the "
                             "cached stride-1 convolution the decoder walk can place")
        return ("conv", m.time_kernel_size - 1)

    def res(r):
        main = [("norm",), conv(r.conv1), ("norm",), conv(r.conv2)]
        short = conv(r.conv_shortcut)[1] if r.in_channels != r.out_channels else 0
        return ("res", main, short)
    dec = vae.decoder
    ops = [conv(dec.conv_in)] + [res(r) for r in dec.mid_block.resnets]
    for block in dec.up_blocks:
        ops += [res(r) for r in block.resnets]
        ops += [("up",) for u in (block.upsamplers or ()) if u.compress_time]
    return ops + [("norm",), conv(dec.conv_out)]


def temporal_factor(vae) -> int:
    """Video frames per latent frame (after frame 0), from the decoder's upsamplers, checked
    against ``vae.config.temporal_compression_ratio``."""
    r = 2 ** sum(op[0] == "up" for op in _walk(vae))
    if r != vae.config.temporal_compression_ratio:
        raise ValueError(f"vae.config.temporal_compression_ratio={vae.config.temporal_compression_ratio}"
                         f" but the decoder upsamples time {r}x")
    return r


def _back(ops: list, e: int, rate: int) -> tuple:
    """The earliest frame (at the ops' input rate) that frame ``e`` at their output reads."""
    for op in reversed(ops):
        if op[0] == "conv":
            e -= op[1]
        elif op[0] == "norm":          # the chunk's first frame; chunk c >= 1 starts at 1 + 2Rc
            e = 0 if e < 1 + 2 * rate else 1 + 2 * rate * ((e - 1) // (2 * rate))
        elif op[0] == "up":
            e, rate = -(-e // 2), rate // 2
        else:
            main, rate_in = _back(op[1], e, rate)
            e = min(main, e - op[2])
    return e, rate


def causal_history(vae) -> int:
    """Chunks of warm-up that make a split decode exact, from the decoder's structure.

    Decoding chunk ``c`` after warming the caches up on exactly the ``causal_history(vae)``
    chunks before it gives bitwise what the whole decode gives; one chunk fewer does not
    (for generic weights), so the bound is tight.

    Derivation. Index frames at each rate ``R`` (1 at the latent, 4 at the video) as the
    whole decode produces them: latent frame 0 gives frame 0, latent frame ``a > 0`` frames
    ``R(a-1)+1 .. Ra``; chunk ``c >= 1`` is latent frames ``2c+1, 2c+2``, frames ``1+2Rc ..
    2R(c+1)`` at rate ``R``. Walk the decoder backwards from chunk ``c``'s first video frame:
    a cached causal conv of temporal kernel ``k`` reads ``k-1`` frames back (into the chunk
    before through its cache), a chunk-wide norm reads from its chunk's first frame, an
    upsampler maps frame ``e`` to ``ceil(e/2)``, a residual block reads the earlier of its
    two paths. The chunk of the latent frame reached is ``c - causal_history``. A warm-up
    started at a later chunk computes wrong values (the caches' replicated first frame) only
    in frames that the same cone, run forwards, keeps out of chunk ``c``.

    Parameters
    ----------
    vae : diffusers.AutoencoderKLCogVideoX

    Returns
    -------
    int
        ``K``: a clip whose first latent frame lies in chunk ``c`` needs chunks ``max(0, c-K)
        .. c-1`` decoded before it.
    """
    ops = _walk(vae)
    R = temporal_factor(vae)
    c = 10 ** 6                            # any chunk far from the first gives the same K
    e, _ = _back(ops, 1 + 2 * R * c, R)
    return c - _chunk_of(e)


def needed_range(vae_or_history, start: int, stop: int, num_frames: int) -> range:
    """Global latent frames the decode of clip ``[start, stop)`` of a ``num_frames``-frame
    video reads: from the first frame of the warm-up's first chunk to the last frame of the
    chunk holding ``stop - 1``. ``vae_or_history``: the VAE or its ``causal_history``."""
    K = vae_or_history if isinstance(vae_or_history, int) else causal_history(vae_or_history)
    spans = chunks(num_frames)
    first = max(0, _chunk_of(start) - K)
    return range(spans[first][0], spans[_chunk_of(stop - 1)][1])


def _video_start(i: int, R: int) -> int:
    """The first video frame of latent frame ``i``."""
    return 0 if i == 0 else 1 + R * (i - 1)


def decode_clip(vae, z: torch.Tensor, *, first: int, start: int, stop: int, num_frames: int,
                chunk: int = 2) -> Iterator[torch.Tensor]:
    """Decode the latent frames ``[start, stop)`` of a long video exactly as the whole-video
    decode would.

    Parameters
    ----------
    vae : diffusers.AutoencoderKLCogVideoX
        Any dtype/device; not modified.
    z : Tensor (B, C, n, h, w)
        Latent frames ``first .. first + n - 1`` of the video, covering
        ``needed_range(vae, start, stop, num_frames)``; already scaled for the decoder
        (``latents / scaling_factor``, as the pipeline does).
    first : int
        Global index of ``z``'s first latent frame.
    start, stop : int
        The clip's latent frames, ``0 <= start < stop <= num_frames``.
    num_frames : int
        The whole video's latent frames (odd): it places the decoder's chunks.
    chunk : int
        Latent frames per yielded piece, at least (a piece ends at a decoder chunk).

    Returns
    -------
    Iterator[Tensor]
        Lazy: inputs are checked at the call. Each item (B, 3, m, H, W), the clip's video
        frames in order (latent frame 0 gives one, every other ``temporal_factor``), computed
        without autograd, unclamped as ``vae.decode``'s.

    Raises
    ------
    ValueError
        Bad shapes, an even ``num_frames``, tiling in force, or ``z`` not covering what the
        clip reads (the message names both ranges).
    """
    if not isinstance(z, torch.Tensor) or z.dim() != 5:
        raise ValueError("z must be a 5-D tensor (B, C, n, h, w)")
    if z.shape[1] != vae.config.latent_channels:
        raise ValueError(f"z has {z.shape[1]} channels, the VAE's latent has "
                         f"{vae.config.latent_channels}")
    if num_frames < 1 or num_frames % 2 == 0:
        raise ValueError(f"num_frames={num_frames}: the CogVideoX decoder makes 4k+1 video "
                         "frames from an odd number of latent frames only")
    if not 0 <= start < stop <= num_frames:
        raise ValueError(f"need 0 <= start < stop <= num_frames, got {start}, {stop}, {num_frames}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    if getattr(vae, "num_latent_frames_batch_size", 2) != 2:
        raise ValueError(f"vae.num_latent_frames_batch_size={vae.num_latent_frames_batch_size}:"
                         " the chunks placed here are diffusers' pairs of latent frames")
    if vae.use_tiling and (z.shape[3] > vae.tile_latent_min_height
                           or z.shape[4] > vae.tile_latent_min_width):
        raise ValueError("tiled decoding is not split exactly by decode_clip: call "
                         "vae.disable_tiling(), or decode latents no larger than a tile")
    need = needed_range(vae, start, stop, num_frames)
    have = range(first, first + z.shape[2])
    if need.start < have.start or need.stop > have.stop:
        raise ValueError(f"latent frames {need.start}..{need.stop - 1} are needed to decode "
                         f"{start}..{stop - 1} exactly, got {have.start}..{have.stop - 1}")
    spans = [s for s in chunks(num_frames) if s[0] >= need.start and s[1] <= need.stop]
    return _decode_chunks(vae, z, first, spans, start, stop, chunk)


def _decode_chunks(vae, z, first: int, spans: list, start: int, stop: int, chunk: int):
    """Decode ``spans`` of ``z`` in order with the caches ``_decode`` carries, yielding the
    video of latent frames ``[start, stop)``; unchecked (the tests use it to show that less
    warm-up is not exact)."""
    R = vae.config.temporal_compression_ratio
    parts = list(z.split(1)) if vae.use_slicing and z.shape[0] > 1 else [z]
    caches = [None] * len(parts)

    def gen():
        pending, held = [], 0
        for a, b in spans:
            outs = []
            with torch.no_grad():
                for i, part in enumerate(parts):
                    x = part[:, :, a - first:b - first]
                    if vae.post_quant_conv is not None:
                        x = vae.post_quant_conv(x)
                    out, caches[i] = vae.decoder(x, conv_cache=caches[i])
                    outs.append(out)
            out = outs[0] if len(outs) == 1 else torch.cat(outs)
            base = _video_start(a, R)
            if out.shape[2] != _video_start(b, R) - base:
                raise RuntimeError(f"decoder produced {out.shape[2]} frames for latent frames "
                                   f"{a}..{b - 1}, expected {_video_start(b, R) - base}")
            lo, hi = max(a, start), min(b, stop)
            if lo < hi:
                pending.append(out[:, :, _video_start(lo, R) - base:_video_start(hi, R) - base])
                held += hi - lo
            if pending and (held >= chunk or b >= stop):
                yield torch.cat(pending, dim=2)
                pending, held = [], 0
    return gen()
