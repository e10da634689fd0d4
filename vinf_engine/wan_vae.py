"""Exact clip-by-clip decoding and encoding for diffusers' ``AutoencoderKLWan`` (Wan 2.1 and
Wan 2.2 VAEs). Encoding (``encode_clip``, ``encoder_history``) follows the same pattern as the
decoding described here; see the section at the end of the module.

``AutoencoderKLWan._decode`` runs the decoder one latent frame at a time and carries, for every
causal convolution, the last two frames of that convolution's input from one call to the next.
Latent frame 0 is special (``first_chunk``: one video frame out instead of
``scale_factor_temporal``, the temporal upsamplers skip their ``time_conv``), so decoding the
middle of a video as if it were a fresh video is wrong near its start.

The decoder has no other state, and every cached convolution sees a finite window, so the
output of latent frame ``i`` depends only on latent frames ``i - causal_history(vae) .. i``.
``decode_clip`` therefore decodes a clip exactly by first running the decoder over that many
frames of left history (a "warm-up" whose video output is thrown away) and then over the clip.
The receptive field narrows towards the output: a warm-up frame runs only the decoder stages
whose field reaches it (all 38 through conv_in and the mid block, 4 through the last up block,
1 through the head), so a warm-up costs about 8 frames of decoding, not 38 (``warmup_cost``):

    K = causal_history(vae)                                     # 38 for the released VAEs
    hist = z_whole[:, :, max(0, start - K):start]               # what the rank before can send
    for piece in decode_clip(vae, z_whole[:, :, start:stop], start=start, history=hist):
        ...                                                     # (B, 3, m, H, W), in order

and the pieces of all clips of a video, concatenated in order, are bitwise what
``decode_clip`` gives for the whole video at once, by construction: every module runs on the
same tensor shapes in the same order whatever the split (one latent frame per decoder call,
as ``_decode`` does, and ``post_quant_conv`` per frame too; a stage that starts mid-warm-up
has filled its caches before any output frame), so the same kernels see the same numbers on
any CPU or GPU. Against diffusers' ``vae.decode(z_whole).sample``, which runs
``post_quant_conv`` over the whole latent at once, they differ by that convolution's rounding
carried through the decoder (the tests bound it against an fp64 decode); with tiling, where
``tiled_decode`` also runs it per frame and tile, they are its bits.
"""
from __future__ import annotations

from typing import Callable, Iterator, NamedTuple

import torch

from .vae_tiles import blend_tile_grid

__all__ = ["causal_history", "decode_clip", "video_frames_of", "history_range", "temporal_factor",
           "warmup_cost", "encoder_history", "encode_history_range", "encode_clip"]


def _wan():
    from diffusers.models.autoencoders import autoencoder_kl_wan
    return autoencoder_kl_wan


def _left_context(conv) -> int:
    """Past frames a ``WanCausalConv3d`` reads per output frame: ``(k_t - 1) * dilation_t``."""
    k, d, s = conv.kernel_size[0], conv.dilation[0], conv.stride[0]
    if s != 1 or conv._padding[4] != (k - 1) * d:
        raise ValueError(
            f"causal conv with temporal kernel {k}, dilation {d}, stride {s}, left pad "
            f"{conv._padding[4]} is not a same-length causal conv; the decoder walk cannot place it")
    return (k - 1) * d


def _ops_of(modules) -> list[tuple[str, int]]:
    """The temporal structure of decoder ``modules``, in forward order.

    Returns a list of ``("conv", p)`` (a causal conv reading ``p`` past frames at the current
    rate) and ``("up", f)`` (the frame rate multiplies by ``f``; every input frame but the first
    of the video becomes ``f`` frames). Attention, norms, 2-D resamplers, 1x1x1 shortcuts and the
    ``DupUp3D`` shortcut of Wan 2.2 read no past frames and are left out (the last two are
    parallel branches that read a subset of what the main path reads).
    """
    wan = _wan()
    ops: list[tuple[str, int]] = []
    done: set[int] = set()
    # Module registration order is forward order for every conv and resampler of diffusers'
    # Wan decoder (the mid block registers its attentions first, the residual up block its
    # DupUp3D shortcut first; neither reads the past). The split-decode tests check the result.
    for m in (sub for module in modules for sub in module.modules()):
        if id(m) in done:
            continue
        if isinstance(m, wan.WanResample):
            if m.mode == "upsample3d":
                # time_conv runs at the input rate, then each frame's 2*C channels become 2 frames
                ops.append(("conv", _left_context(m.time_conv)))
                ops.append(("up", 2))
                done.add(id(m.time_conv))
            elif m.mode not in ("upsample2d", "none"):
                raise ValueError(f"decoder resampler mode {m.mode!r}")
        elif isinstance(m, wan.WanCausalConv3d):
            ops.append(("conv", _left_context(m)))
    return ops


class _Stage(NamedTuple):
    """A stage of the decoder as ``WanDecoder3d.forward`` runs it."""
    entry: torch.nn.Module          # the module whose call begins it inside that forward
    modules: tuple                  # what it runs
    ops: list                       # its temporal structure (``_ops_of``)


def _decoder_stages(vae) -> list[_Stage]:
    """conv_in and the mid block, each up block, the head (norm_out, conv_out)."""
    d = vae.decoder
    groups = [(d.conv_in, (d.conv_in, d.mid_block)), *[(b, (b,)) for b in d.up_blocks],
              (d.norm_out, (d.norm_out, d.conv_out))]
    return [_Stage(entry, mods, _ops_of(mods)) for entry, mods in groups]


def _temporal_ops(vae) -> list[tuple[str, int]]:
    """The decoder's temporal structure, in forward order (``_ops_of`` the whole decoder)."""
    return [op for stage in _decoder_stages(vae) for op in stage.ops]


def _stage_depths(vae) -> list[int]:
    """Latent frames of warm-up each stage of ``_decoder_stages`` needs before a clip: the
    backward walk of ``causal_history`` from the clip's first video frame, stopped at each
    stage's input, to the latent frame that holds the earliest input index reached there.
    Non-increasing; the first is ``causal_history``. Released VAEs: 38, 28, 14, 7, 4 and 1:
    the late stages, at 4x the frame rate and 16x the area, where the work is, need few."""
    stages = _decoder_stages(vae)
    rate = 2 ** sum(op == "up" for st in stages for op, _ in st.ops)
    i = 1                                    # any i > 0 gives the same depths
    e = rate * (i - 1) + 1
    depths = []
    for st in reversed(stages):
        for op, v in reversed(st.ops):
            if op == "conv":
                e -= v
            else:
                e = -(-e // v)
                rate //= v
        depths.append(i - -(-e // rate))     # the latent frame holding index e: ceil(e / rate)
    return depths[::-1]


def _decoder_rate(vae) -> int:
    r = 1
    for op, f in _temporal_ops(vae):
        if op == "up":
            r *= f
    return r


def temporal_factor(vae) -> int:
    """Video frames per latent frame (after frame 0): ``vae.config.scale_factor_temporal``.

    Checked against the decoder's own upsampling; a config that disagrees is an error.
    """
    r = _decoder_rate(vae)
    cfg = getattr(vae.config, "scale_factor_temporal", None)
    if cfg is not None and cfg != r:
        raise ValueError(f"vae.config.scale_factor_temporal={cfg} but the decoder upsamples time {r}x")
    return r


def causal_history(vae) -> int:
    """Latent frames of left context that make a split decode exact, from the decoder's structure.

    Decoding latent frame ``i >= causal_history(vae)`` after warming the cache up on exactly
    the ``causal_history(vae)`` latent frames before it gives bitwise what the whole-video
    decode gives; one frame fewer does not (for generic weights), so the bound is tight. (A
    decoder with a one-channel stage, e.g. Wan 2.1 with ``base_dim=3``, whose RMS norm of one
    channel is ``sign(x)``, can see one frame less; the bound still holds.)

    Derivation. Index frames at each rate ``r`` (1 at the latent, ``R = scale_factor_temporal``
    at the video) as the whole decode produces them: latent frame 0 gives frame 0, latent frame
    ``a > 0`` gives frames ``r(a-1)+1 .. ra``. A temporal upsampler turns input frame ``a`` into
    output frames ``2a-1, 2a``, a causal conv with temporal kernel ``k`` makes frame ``t`` from
    frames ``t-k+1 .. t``; with ``CACHE_T = 2`` frames cached the chunked decode is exactly
    that convolution. Walk the decoder backwards from the earliest video frame of latent frame
    ``i``, ``e = R(i-1)+1``: each causal conv ``e -= k-1`` at its own rate (conv_in, both convs
    of every residual block, conv_out, and the upsamplers' ``time_conv``), each temporal upsampler
    ``e = ceil(e / 2)``. The index ``e`` reached at the latent rate is ``i - causal_history``.

    Why exactly that much warm-up suffices: a warm-up started at latent frame ``j > 0`` computes
    wrong values (zero padding, the ``first_chunk`` frame with its skipped ``time_conv``, the
    upsamplers' zeroed ``"Rep"`` history) only at indices below a threshold that the same walk,
    run forwards from ``j`` (``T += k-1``; ``T -> 2T-1`` at an upsampler), gives at every layer;
    ``e >= T`` holds at every layer iff ``i - j >= causal_history``. The whole decode's own
    frame-0 special cases lie below the same cone, since ``i - causal_history >= 0``.

    Released Wan 2.1 / 2.2 decoders (``num_res_blocks=2``, three up stages, temporal upsampling
    after the first two): 24 frames at the latent rate (conv_in, 4 mid convs, 6 convs, time_conv),
    14 at 2x, 26 at 4x: ``e = 4i-3 -26 -> ceil /2 = 2i-14 -14 -> ceil /2 = i-14 -24``, so 38.

    Parameters
    ----------
    vae : diffusers.AutoencoderKLWan

    Returns
    -------
    int
        ``H``: a clip starting at latent frame ``start`` needs latent frames
        ``max(0, start - H) .. start - 1`` as history.
    """
    return _stage_depths(vae)[0]


def history_range(vae_or_history: object, start: int) -> range:
    """Global latent frames a clip starting at ``start`` needs as ``history``.

    ``vae_or_history`` is an ``AutoencoderKLWan`` or its ``causal_history`` (int).
    """
    h = vae_or_history if isinstance(vae_or_history, int) else causal_history(vae_or_history)
    return range(max(0, start - h), start)


def video_frames_of(latent_start: int, latent_stop: int, temporal_factor: int = 4) -> range:
    """Global video frames that latent frames ``latent_start .. latent_stop - 1`` decode to.

    Latent frame 0 -> video frame 0; latent frame ``i > 0`` -> video frames
    ``1 + temporal_factor*(i-1) .. temporal_factor*i``.

    Returns
    -------
    range
        Half-open ``range(first, stop)``; empty when the latent range is.
    """
    if not 0 <= latent_start <= latent_stop:
        raise ValueError(f"need 0 <= latent_start <= latent_stop, got {latent_start}, {latent_stop}")

    def first(i):
        return 0 if i == 0 else 1 + temporal_factor * (i - 1)

    return range(first(latent_start), first(latent_stop))


def decode_clip(vae, z: torch.Tensor, *, start: int, history: torch.Tensor | None = None,
                chunk: int = 1) -> Iterator[torch.Tensor]:
    """Decode one clip of a long video's latents, exactly as the whole-video decode would.

    Parameters
    ----------
    vae : diffusers.AutoencoderKLWan
        Any dtype/device; not modified (its ``_feat_map`` cache is never touched: the decode
        keeps its own caches, so other decodes may run between pieces).
    z : Tensor (B, C, n, h, w)
        The clip's latents, ``C = vae.config.z_dim``; its first frame is global latent frame
        ``start``. ``n = 0`` yields nothing.
    start : int
        Global index of the clip's first latent frame.
    history : Tensor (B, C, k, h, w) or None
        The latent frames immediately before the clip. None (or ``k = 0``) when ``start == 0``;
        else ``min(start, causal_history(vae)) <= k <= start`` (only the last
        ``min(start, causal_history(vae))`` are used).
    chunk : int
        Latent frames per yielded piece.

    Returns
    -------
    Iterator[Tensor]
        Lazy: inputs are checked at the call, decoding happens as the iterator is consumed.
        Each item is a Tensor (B, 3, m, H, W): the clip's video frames in order, clamped to [-1, 1] like ``_decode``, computed without
        autograd; each piece covers ``chunk`` latent frames (the last one possibly fewer), so
        ``m = len(video_frames_of(s, s + chunk, R))`` for a piece starting at global latent ``s``.
        ``H, W = h * scale, w * scale`` (patchified VAEs are unpatchified per piece).

    Raises
    ------
    ValueError
        Bad shapes, a history shorter than needed (the message names both numbers), or a history
        with frames before global frame 0.

    Notes
    -----
    The decoder is called one latent frame at a time on the same tensor shapes as ``_decode``
    (and per sample with ``vae.use_slicing``, per spatial tile with ``vae.use_tiling`` when the
    latent exceeds the tile size, mirroring ``tiled_decode``), ``post_quant_conv`` per frame:
    every split of a video gives the bits of its whole decode here (see the module's notes
    for ``vae.decode``). The warm-up runs ``min(start, causal_history)`` latent frames through
    the decoder's first stage and fewer through the later ones (``_stage_depths``), about
    ``warmup_cost(vae)(start)`` frames of whole decoding; its video is never computed.
    """
    if not isinstance(z, torch.Tensor) or z.dim() != 5:
        raise ValueError(f"z must be a 5-D tensor (B, C, n, h, w), got "
                         f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be an int >= 0, got {start!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    z_dim = vae.config.z_dim
    if z.shape[1] != z_dim:
        raise ValueError(f"z has {z.shape[1]} channels, the VAE's latent has {z_dim}")
    full = causal_history(vae)
    h_needed = min(start, full)
    if history is None:
        history = z[:, :, :0]
    if not isinstance(history, torch.Tensor) or history.dim() != 5:
        raise ValueError("history must be None or a 5-D tensor (B, C, k, h, w)")
    b, c, _, hh, ww = z.shape
    if (history.shape[0], history.shape[1], history.shape[3], history.shape[4]) != (b, c, hh, ww):
        raise ValueError(f"history {tuple(history.shape)} does not match z {tuple(z.shape)} "
                         f"outside the frame axis")
    k = history.shape[2]
    if k > start:
        raise ValueError(f"history has {k} frames but the clip starts at latent frame {start}: "
                         f"there are only {start} frames before it")
    if k < h_needed:
        raise ValueError(f"a clip starting at latent frame {start} needs {h_needed} history frames "
                         f"(min(start, causal_history={full})), got {k}")
    if z.shape[2] == 0:
        return iter(())
    window = torch.cat([history[:, :, k - h_needed:].to(z), z], dim=2)
    return _decode_window(vae, window, warm=h_needed, window_start=start - h_needed, chunk=chunk)


def warmup_cost(vae) -> Callable[[int], float]:
    """``cost(start)``: what the warm-up of a clip starting at latent frame ``start`` costs
    ``decode_clip``, in latent frames of whole-decoder work. Each decoder stage runs over the
    warm-up frames its receptive field reaches (``_stage_depths``), weighted by its share of
    the decoder's work, estimated as its convolutions' weights x frames per latent frame x area
    at its input. Released VAEs: about 8 (measured on the CPU: 7.8-8.5) where a whole warm-up
    is 38. Grows by at most 1 per frame of ``start``."""
    rate, area, weights = 1, 1, []
    for st in _decoder_stages(vae):
        convs = sum(m.weight.numel() for mod in st.modules for m in mod.modules()
                    if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)))
        weights.append(convs * rate * area)
        area *= 4 ** sum(getattr(m, "mode", None) in ("upsample2d", "upsample3d")
                         for mod in st.modules for m in mod.modules())
        rate *= 2 ** sum(op == "up" for op, _ in st.ops)
    depths, total = _stage_depths(vae), sum(weights)

    def cost(start: int) -> float:
        return sum(w * min(start, d) for w, d in zip(weights, depths)) / total
    return cost


class _Stop(Exception):
    """Ends a warm-up call of the decoder at a stage boundary (see ``_Stream``)."""


def _stop(module, args):
    raise _Stop


def _upsampler3d(module):
    """The temporal upsampler (``upsample3d`` ``WanResample``) that ends an up block, or None."""
    ups = getattr(module, "upsamplers", None)          # WanUpBlock (2.1) / WanResidualUpBlock
    up = ups[0] if ups else getattr(module, "upsampler", None)
    return up if getattr(up, "mode", None) == "upsample3d" else None


def _seed(block, up):
    """A pre-hook on up block ``block`` that gives its temporal upsampler ``up`` a cached frame
    of zeros: a stage that starts mid-video sees zeros before its first frame, as its convs
    (cache None: zero padding) do, instead of the first-chunk path ("Rep": no time_conv, one
    frame out per frame in), which a Wan 2.2 block's DupUp3D shortcut could not follow."""
    def hook(module, args, kwargs):
        x = args[0]
        idx = kwargs["feat_idx"][0] + 2 * len(block.resnets)     # 2 cached convs per resnet
        kwargs["feat_cache"][idx] = x.new_zeros(x.shape[0], up.dim, 1, *x.shape[3:])
    return hook


class _Stream:
    """One decoder cache: the ``_feat_map`` that ``_decode`` would keep, for one sample/tile.

    ``plan`` is ``(module, start, upsampler)`` per decoder stage: a call for global latent
    frame ``g`` runs the stages with ``start <= g`` (a prefix) and ends at the next one's
    module, by a pre-hook that raises; a stage starting at ``g`` after the first call gets a
    zero history (``_seed``). Every call goes through ``vae.decoder`` itself, so its modules
    run diffusers' own code in the same order, with their hooks (accelerate's) in place.
    """

    def __init__(self, vae, n_convs: int, plan: list):
        self.vae, self.feat, self.first, self.plan = vae, [None] * n_convs, True, plan

    def __call__(self, x1: torch.Tensor, g: int) -> torch.Tensor | None:
        hooks = []
        try:
            for module, start, up in self.plan:
                if start > g:
                    hooks.append(module.register_forward_pre_hook(_stop))
                    break
                if start == g and up is not None and not self.first:
                    hooks.append(module.register_forward_pre_hook(_seed(module, up),
                                                                  with_kwargs=True))
            try:
                return self.vae.decoder(x1, feat_cache=self.feat, feat_idx=[0],
                                        first_chunk=self.first)
            except _Stop:
                return None
        finally:
            self.first = False
            for h in hooks:
                h.remove()


def _decode_window(vae, window: torch.Tensor, *, warm: int, window_start: int,
                   chunk: int) -> Iterator[torch.Tensor]:
    """Decode ``window`` (B, C, T, h, w), global latent frames ``window_start ..``, as a fresh
    video, dropping the video of its first ``warm`` frames. Unchecked: exact only when
    ``warm >= min(window_start + warm, causal_history(vae))``; the tests use it to show that
    less is not."""
    wan = _wan()
    R = temporal_factor(vae)
    n_convs = sum(isinstance(m, wan.WanCausalConv3d) for m in vae.decoder.modules())
    patch = vae.config.patch_size
    B, _, T, h, w = window.shape
    # Warm-up frames run only the stages whose receptive field reaches them: all from the
    # window's start through conv_in and the mid block, few through the late, large stages.
    first = window_start + warm
    plan = [(st.entry, max(first - d, window_start) if warm else window_start,
             _upsampler3d(st.entry)) for st, d in zip(_decoder_stages(vae), _stage_depths(vae))]
    parts = [window[i:i + 1] for i in range(B)] if vae.use_slicing and B > 1 else [window]

    lat_tile_h = vae.tile_sample_min_height // vae.spatial_compression_ratio
    lat_tile_w = vae.tile_sample_min_width // vae.spatial_compression_ratio
    tiled = vae.use_tiling and (w > lat_tile_w or h > lat_tile_h)
    if tiled:
        lat_stride_h = vae.tile_sample_stride_height // vae.spatial_compression_ratio
        lat_stride_w = vae.tile_sample_stride_width // vae.spatial_compression_ratio
        rows_at = list(range(0, h, lat_stride_h))
        cols_at = list(range(0, w, lat_stride_w))
        streams = [[[_Stream(vae, n_convs, plan) for _ in cols_at] for _ in rows_at]
                    for _ in parts]
    else:
        streams = [_Stream(vae, n_convs, plan) for _ in parts]

    def step(t):
        g = window_start + t
        if not tiled:
            # post_quant_conv (1x1x1) per latent frame, where ``_decode`` runs it over the
            # whole latent at once: a convolution's rounding may depend on its length (the
            # CPU's math library picks its kernel by shape), so only one shape for every
            # frame makes every split of the video decode the same bits.
            return [s(vae.post_quant_conv(x[:, :, t:t + 1]), g) for s, x in zip(streams, parts)]
        outs = []
        for p, grid in zip(parts, streams):
            outs.append([[s(vae.post_quant_conv(
                p[:, :, t:t + 1, i:i + lat_tile_h, j:j + lat_tile_w]), g)
                for j, s in zip(cols_at, row)] for i, row in zip(rows_at, grid)])
        return outs

    def assemble(frames):           # frames[t][part] (untiled) or frames[t][part][row][col]
        pieces = []
        for q in range(len(parts)):
            if not tiled:
                out = torch.cat([f[q] for f in frames], dim=2)
            else:
                grid = [[torch.cat([f[q][r][cc] for f in frames], dim=2)
                         for cc in range(len(cols_at))] for r in range(len(rows_at))]
                out = _blend_tiles(vae, grid, h, w)
            if patch is not None:
                out = wan.unpatchify(out, patch_size=patch)
            pieces.append(torch.clamp(out, min=-1.0, max=1.0))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)

    def gen():
        pending, expect = [], 0
        for t in range(T):
            with torch.no_grad():
                outs = step(t)
            g = window_start + t
            if t < warm:
                continue
            pending.append(outs)
            expect += 1 if g == 0 else R
            if len(pending) == chunk or t == T - 1:
                with torch.no_grad():
                    piece = assemble(pending)
                if piece.shape[2] != expect:
                    raise RuntimeError(f"decoder produced {piece.shape[2]} frames for latent frames "
                                       f"ending at {g}, expected {expect}")
                pending, expect = [], 0
                yield piece

    return gen()


def _blend_tiles(vae, rows, height: int, width: int) -> torch.Tensor:
    """``tiled_decode``'s blending of decoded tiles ``rows[r][c]`` (B, C', m, th, tw), for the
    frames at hand only (blending is per frame). Modifies the tiles in place, as diffusers does."""
    sample_h = height * vae.spatial_compression_ratio
    sample_w = width * vae.spatial_compression_ratio
    stride_h, stride_w = vae.tile_sample_stride_height, vae.tile_sample_stride_width
    patch = vae.config.patch_size
    if patch is not None:
        sample_h, sample_w = sample_h // patch, sample_w // patch
        stride_h, stride_w = stride_h // patch, stride_w // patch
        blend_h = vae.tile_sample_min_height // patch - stride_h
        blend_w = vae.tile_sample_min_width // patch - stride_w
    else:
        blend_h = vae.tile_sample_min_height - stride_h
        blend_w = vae.tile_sample_min_width - stride_w
    joined = blend_tile_grid(vae, rows, (blend_h, blend_w), (stride_h, stride_w))
    return joined[:, :, :, :sample_h, :sample_w]


# -- encoding ------------------------------------------------------------------------------------

# Video frames per encoder call after frame 0: ``_encode`` and ``tiled_encode`` hardcode 4 (frame
# 0 alone, then 4 frames per call), whatever ``scale_factor_temporal`` says.
_ENCODE_CALL = 4


def _encoder_ops(vae) -> list[tuple[str, int]]:
    """The encoder's temporal structure, in forward order.

    Returns a list of ``("conv", p)`` (a causal conv reading ``p`` past frames at the current
    rate) and ``("down", 2)`` (a ``downsample3d``: its ``time_conv``, temporal kernel 3 and
    stride 2 over its one cached frame and the call's frames, halves the rate; output frame
    ``j > 0`` reads input frames ``2j-2 .. 2j``, output frame 0 is input frame 0 passed through,
    the first call being special). Attention, norms, 2-D resamplers, 1x1x1 shortcuts and Wan
    2.2's ``AvgDown3D`` shortcut (output ``j`` averages inputs ``2j-1, 2j``, a subset of what
    the main path reads) read no further back and are left out.
    """
    wan = _wan()
    ops: list[tuple[str, int]] = []
    done: set[int] = set()
    # Registration order is forward order for the encoder's convs and resamplers (Wan 2.2's
    # residual down block registers its AvgDown3D shortcut first: it reads no past frame).
    for m in vae.encoder.modules():
        if id(m) in done:
            continue
        if isinstance(m, wan.WanResample):
            if m.mode == "downsample3d":
                tc = m.time_conv
                got = (tc.kernel_size[0], tc.stride[0], tc.dilation[0], tc._padding[4])
                if got != (3, 2, 1, 0):
                    raise ValueError(
                        f"downsample3d time_conv with temporal kernel, stride, dilation, left pad "
                        f"{got}; the encoder walk knows diffusers' (3, 2, 1, 0), whose one cached "
                        "frame is exactly its left context")
                ops.append(("down", 2))
                done.add(id(tc))
            elif m.mode not in ("downsample2d", "none"):
                raise ValueError(f"encoder resampler mode {m.mode!r}")
        elif isinstance(m, wan.WanCausalConv3d):
            ops.append(("conv", _left_context(m)))
    return ops


def _encoder_warmup(vae) -> int:
    """Latent frames of warm-up that make a split encode exact (``encoder_history``'s walk)."""
    ops = _encoder_ops(vae)
    rate = 2 ** sum(op == "down" for op, _ in ops)
    if rate != _ENCODE_CALL:
        raise ValueError(f"the encoder downsamples time {rate}x, but diffusers' _encode calls it "
                         f"on {_ENCODE_CALL} frames at a time (one latent frame per call)")
    cfg = getattr(vae.config, "scale_factor_temporal", None)
    if cfg is not None and cfg != rate:
        raise ValueError(f"vae.config.scale_factor_temporal={cfg} but the encoder downsamples "
                         f"time {rate}x")
    # A window encoded as a fresh video from video frame 4m (here m = 1) computes wrong values
    # (zero padding, its first call's pass-through and shortcut padding) at indices below T, at
    # every rate: T grows by each conv's left context, and a downsampler's output j is right
    # iff j > m' (its first output, a pass-through) and its inputs 2j-2 .. 2j are right.
    T = _ENCODE_CALL
    for op, v in ops:
        T = T + v if op == "conv" else -(-T // 2) + 1
    return T - 1


def encoder_history(vae) -> int:
    """Video frames of left context that make a split encode exact, from the encoder's structure.

    A clip whose first latent frame is ``start > 0`` (its first video frame ``4*start - 3``)
    is encoded exactly (bitwise what the whole-video ``encode_clip`` gives) from the
    ``min(4*start - 3, encoder_history(vae))`` video frames before it; see ``encode_clip``.

    Derivation. ``_encode`` calls the encoder on video frame 0 alone, then on frames
    ``1+4(i-1) .. 4i`` for latent frame ``i``, with 2 frames cached per causal conv (exactly
    that conv over the whole video, zero-padded at frame 0) and, per ``downsample3d``, one
    cached frame before a temporal kernel 3 of stride 2 (output ``j > 0`` reads inputs
    ``2j-2 .. 2j``; output 0 is input 0 passed through, as the first call is special). So the
    earliest video frame latent ``i`` reads is found walking the encoder backwards: each
    causal conv ``e -= k-1`` at its rate, each temporal downsampler ``e = 2e - 2``. A clip is
    encoded as a fresh video over a window that starts at video frame ``4m`` (a first call on
    that one frame, then 4-frame calls on the global latent boundaries, so every later call
    runs the shapes of the whole encode); such a window computes wrong values only below a
    threshold that the same walk, run forwards from ``4m`` (``T += k-1``; ``T -> ceil(T/2)+1``
    at a downsampler), gives at every layer, and ``K = T_latent - m`` latent frames of it are
    warm-up. The history is the window before the clip: ``1 + 4(K-1)`` video frames.

    For every Wan layout the backward walk lands on a window start (an odd number of causal
    convs runs at the video rate), so the bound is tight: latent ``i`` reads video frame
    ``4(i-K)``, the window's first frame (the tests check it by gradient). Released Wan 2.1 /
    2.2 encoders (``num_res_blocks=2``, temporal downsampling after stages 1 and 2): 9 convs at
    the video rate, 4 at 2x down, 9 at the latent rate: ``e = i - 18 -> 2i - 38``, ``- 8 ->
    2i - 46 -> 4i - 94``, ``- 18 -> 4(i - 28)``, so ``K = 28`` and 109 video frames.

    Parameters
    ----------
    vae : diffusers.AutoencoderKLWan

    Returns
    -------
    int
        A clip starting at latent frame ``start > 0`` needs video frames
        ``max(0, 4*start - 3 - encoder_history(vae)) .. 4*start - 4`` (``encode_history_range``).
    """
    return 1 + _ENCODE_CALL * (_encoder_warmup(vae) - 1)


def encode_history_range(vae_or_history: object, start: int) -> range:
    """Global video frames a clip whose first latent frame is ``start`` needs as ``history``.

    ``vae_or_history`` is an ``AutoencoderKLWan`` or its ``encoder_history`` (int).
    """
    h = vae_or_history if isinstance(vae_or_history, int) else encoder_history(vae_or_history)
    first = video_frames_of(start, start, _ENCODE_CALL).start
    return range(max(0, first - h), first)


def _encode_tiles(vae, height: int, width: int) -> bool:
    """Whether ``_encode`` would hand video frames of this size to ``tiled_encode``."""
    return vae.use_tiling and (width > vae.tile_sample_min_width
                               or height > vae.tile_sample_min_height)


def _encode_args(vae, x, start, history) -> tuple:
    """``encode_clip``'s checks: ``(history as a tensor, frames of it needed)``."""
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        raise ValueError(f"x must be a 5-D tensor (B, C, n, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be an int >= 0, got {start!r}")
    patch = vae.config.patch_size or 1
    if x.shape[1] * patch * patch != vae.config.in_channels:
        raise ValueError(f"x has {x.shape[1]} channels, the VAE encodes "
                         f"{vae.config.in_channels // (patch * patch)}")
    b, c, n, H, W = x.shape
    if start == 0 and n % _ENCODE_CALL != 1:
        raise ValueError(f"a clip from latent frame 0 has 1 + 4k video frames, got {n}")
    if start > 0 and n % _ENCODE_CALL:
        raise ValueError(f"a clip from latent frame {start} > 0 has 4k video frames, got {n}")
    if _encode_tiles(vae, H, W):
        raise ValueError(f"vae.use_tiling is on and {H}x{W} frames exceed the "
                         f"{vae.tile_sample_min_height}x{vae.tile_sample_min_width} tile: "
                         "encode_clip does not mirror tiled_encode; call vae.disable_tiling()")
    first = video_frames_of(start, start, _ENCODE_CALL).start
    full = encoder_history(vae)
    need = min(first, full)
    if history is None:
        history = x[:, :, :0]
    if not isinstance(history, torch.Tensor) or history.dim() != 5:
        raise ValueError("history must be None or a 5-D tensor (B, C, k, H, W)")
    if (history.shape[0], history.shape[1], history.shape[3], history.shape[4]) != (b, c, H, W):
        raise ValueError(f"history {tuple(history.shape)} does not match x {tuple(x.shape)} "
                         f"outside the frame axis")
    k = history.shape[2]
    if k > first:
        raise ValueError(f"history has {k} frames but the clip starts at video frame {first}: "
                         f"there are only {first} frames before it")
    if k < need:
        raise ValueError(f"a clip starting at latent frame {start} needs {need} history frames "
                         f"(min(4*start - 3, encoder_history={full})), got {k}")
    return history, need


def encode_clip(vae, x: torch.Tensor, *, start: int,
                history: torch.Tensor | None = None) -> torch.Tensor:
    """Encode one clip of a long video, exactly as the whole-video encode would.

    Parameters
    ----------
    vae : diffusers.AutoencoderKLWan
        Any dtype/device; not modified (the encode keeps its own caches, never the VAE's).
    x : Tensor (B, 3, n, H, W)
        The clip's video frames, its first latent frame being global latent frame ``start``:
        ``n = 1 + 4k`` frames from video frame 0 when ``start == 0``, else ``n = 4k`` frames
        from video frame ``4*start - 3`` (latent frame ``i > 0`` is video frames
        ``1+4(i-1) .. 4i``). ``n = 0`` (``start > 0``) gives an empty result.
    start : int
        Global index of the clip's first latent frame.
    history : Tensor (B, 3, k, H, W) or None
        The video frames immediately before the clip. None (or ``k = 0``) when ``start == 0``;
        else ``min(4*start - 3, encoder_history(vae)) <= k <= 4*start - 3`` (only the last
        ``min(4*start - 3, encoder_history(vae))`` are used).

    Returns
    -------
    Tensor (B, 2*z_dim, k_latent, H/s, W/s)
        The clip's latent moments (mean and log-variance, what ``vae._encode`` returns for
        these latent frames; ``DiagonalGaussianDistribution`` of it is ``vae.encode``'s
        ``latent_dist``), computed without autograd, ``s = vae.config.scale_factor_spatial``.

    Raises
    ------
    ValueError
        Bad shapes, a frame count off the latent grid, a history shorter than needed (the
        message names both numbers) or reaching before video frame 0, and tiling: with
        ``vae.use_tiling`` and frames larger than the tile, ``_encode`` runs ``tiled_encode``,
        which ``encode_clip`` does not mirror (call ``vae.disable_tiling()``).

    Notes
    -----
    The encoder runs one latent frame per call on the same tensor shapes as ``_encode``
    (frame 0 alone, then 4 frames; per sample with ``vae.use_slicing``), ``quant_conv`` per
    latent frame where ``_encode`` runs it over the whole latent at once: every split of a
    video gives the bits of its whole ``encode_clip``, on any device and thread count, and that
    differs from ``vae._encode`` by ``quant_conv``'s rounding only (bounded in the tests
    against an fp64 encode). The warm-up costs ``min(start, K)`` extra latent frames of
    encoding, ``K = (encoder_history(vae) + 3) / 4`` (28 for the released VAEs).
    """
    history, need = _encode_args(vae, x, start, history)
    b, c, n, H, W = x.shape
    k = history.shape[2]
    if n == 0:
        r = vae.config.scale_factor_spatial
        return x.new_zeros(b, 2 * vae.config.z_dim, 0, H // r, W // r)
    window = torch.cat([history[:, :, k - need:].to(x), x], dim=2)
    warm = (need + _ENCODE_CALL - 1) // _ENCODE_CALL      # need = 1 + 4(warm - 1), or 0
    return _encode_window(vae, window, warm=warm)


def _encode_window(vae, window: torch.Tensor, *, warm: int) -> torch.Tensor:
    """Encode ``window`` (B, 3, 1 + 4T, H, W) as a fresh video, dropping its first ``warm``
    latent frames. Unchecked: exact only with enough warm-up (``encoder_history``); the tests
    use it to show that less is not."""
    wan = _wan()
    n_convs = sum(isinstance(m, wan.WanCausalConv3d) for m in vae.encoder.modules())
    patch = vae.config.patch_size
    B = window.shape[0]
    parts = list(window.split(1)) if vae.use_slicing and B > 1 else [window]
    out = []
    with torch.no_grad():
        for p in parts:
            if patch is not None:
                p = wan.patchify(p, patch_size=patch)
            feat = [None] * n_convs
            moments = []
            for t in range(1 + (p.shape[2] - 1) // _ENCODE_CALL):
                frames = p[:, :, :1] if t == 0 else p[:, :, 1 + _ENCODE_CALL * (t - 1):
                                                        1 + _ENCODE_CALL * t]
                h = vae.encoder(frames, feat_cache=feat, feat_idx=[0])
                if h.shape[2] != 1:
                    raise RuntimeError(f"encoder produced {h.shape[2]} latent frames for one call")
                if t >= warm:
                    # quant_conv (1x1x1) per latent frame, where ``_encode`` runs it once over
                    # the whole latent: one shape for every frame, so every split gives the
                    # same bits (a convolution's kernel may be picked by its length).
                    moments.append(vae.quant_conv(h))
            out.append(torch.cat(moments, dim=2))
    return out[0] if len(out) == 1 else torch.cat(out, dim=0)
