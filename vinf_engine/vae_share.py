"""The drop-in's VAE calls, shared out across the ranks.

After ``parallelize_pipe`` every rank runs the whole pipeline, so each would encode the whole
conditioning video and decode every latent frame. Here the pipeline's own ``vae.encode`` and
``vae.decode`` of a video run this rank's clip only and gather the others', so every rank
still returns the whole result and does about ``1/R`` of the frames:

* ``AutoencoderKLWan`` (Wan): the causal VAE, split along latent frames with
  ``wan_vae.encode_clip`` / ``decode_clip``. Each rank warms the causal caches up on the frames
  before its clip, which it already holds (every rank holds the whole input): no
  communication before the encode or decode, one gather after it. Clips are sized so that
  every rank's work (clip plus warm-up: a whole encode of up to 28 latent frames, about 8
  frames of decoding for the released VAEs) is about equal: rank 0, with none, takes more.
* ``AutoencoderKL`` (UNet3D pipelines): a 2-D VAE fed ``(B*F, C, h, w)`` rows, split along the
  rows; each rank runs the stock call on its rows.
* ``AutoencoderKLHunyuanVideo`` (decode only): each rank decodes its clip's frames as the
  stock decode's own temporal tiles (``hunyuan_vae.decode_clip``, bitwise the stock decode);
  a video of one tile, or with framewise decoding off, is one call and runs stock.

Every call starts with one agreement on the control plane (shape, dtype, VAE settings and a
checksum of the input): a call the split does not understand on any rank (a Wan image batch,
a one-frame video, encode tiling, fewer frames or rows than ranks, a call under autograd)
runs stock on every rank; ranks that passed different calls are refused on every rank. Results equal the stock call up
to rounding: the 2-D VAE runs its own convolutions on fewer rows, Wan's ``post_quant_conv`` /
``quant_conv`` runs per latent frame (``wan_vae``'s notes bound both).
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, NamedTuple

import torch

from .layout import ClipLayout
from .wan_vae import (decode_clip, encode_clip, encode_history_range, encoder_history,
                      history_range, temporal_factor, video_frames_of, warmup_cost)

__all__ = ["share_vae", "clip_sizes", "VaeCall"]


def clip_sizes(n: int, ranks: int, warmup: Callable[[int], float] | int) -> tuple[int, ...]:
    """Contiguous clips of ``n`` frames over ``ranks`` ranks (``n >= ranks``, at least one
    frame each) that minimize the largest per-rank work, a clip of ``n_r`` frames from frame
    ``s_r`` costing ``n_r + warmup(s_r)`` (an int ``w``: ``min(s_r, w)``; a function: growing
    by at most 1 per frame, such as ``wan_vae.warmup_cost(vae)``).

    For the smallest feasible largest work ``W`` (bisected), clips are filled from the last
    rank back, each as long as ``W`` allows: a rank's work only grows with its clip, and fewer
    frames left over never hurts the ranks before it, so this fits whenever any split does,
    and it keeps the early ranks' clips, hence everyone's warm-up, short.
    """
    if not 1 <= ranks <= n:
        raise ValueError(f"need 1 <= ranks <= n, got {ranks} ranks for {n} frames")
    cost = [(warmup(s) if callable(warmup) else min(s, warmup)) for s in range(n + 1)]

    def fill(W):
        sizes, left = [], n
        for r in range(ranks - 1, 0, -1):
            # the longest clip ending at frame ``left`` within W that leaves a frame for each
            # of the r ranks before it (its work, take + cost(left - take), grows with take)
            take = left - r
            while take >= 1 and take + cost[left - take] > W:
                take -= 1
            if take < 1:
                return None
            sizes.append(take)
            left -= take
        return (left, *reversed(sizes)) if left <= W else None

    lo, hi = 0.0, n + cost[n]                # fill(hi) always fits: one frame per rank
    for _ in range(64):                      # to below any gap between two works
        mid = (lo + hi) / 2
        if fill(mid) is None:
            lo = mid
        else:
            hi = mid
    return fill(hi)


class VaeCall(NamedTuple):
    """What one rank passed to a shared VAE method: the ranks agree on it before any split."""
    method: str                 # "encode" or "decode"
    shape: tuple | None         # the input's shape, None when it is not a tensor
    dtype: str
    device: str                 # device type: ranks on cuda:0 and cuda:1 agree
    settings: tuple             # the VAE's slicing and tiling state, return_dict
    splits: bool                # whether this rank's split would share it out
    total: float                # sum and 2-norm of the input in fp64: the same data
    norm: float

    def same_call(self, other: "VaeCall") -> bool:
        if self[:6] != other[:6]:
            return False
        tol = 1e-9 * max(self.norm, other.norm)
        return all(a == b or abs(a - b) <= tol or (math.isnan(a) and math.isnan(b))
                   for a, b in ((self.total, other.total), (self.norm, other.norm)))

    def describe(self) -> str:
        if self.shape is None:
            return "no tensor"
        return (f"{tuple(self.shape)} {self.dtype} on {self.device}, settings {self.settings}, "
                f"sum {self.total:.9g}, norm {self.norm:.9g}")


def _call_of(method: str, x, settings: tuple, splits: bool) -> VaeCall:
    if not isinstance(x, torch.Tensor):
        return VaeCall(method, None, "", "", settings, splits, 0.0, 0.0)
    stats = torch.stack([x.detach().sum(dtype=torch.float64),
                         torch.linalg.vector_norm(x.detach(), dtype=torch.float64)])
    total, norm = stats.tolist()                        # one device sync per VAE call
    return VaeCall(method, tuple(x.shape), str(x.dtype).replace("torch.", ""), x.device.type,
                   settings, splits, total, norm)


def _fire_offload_hook(vae):
    """What diffusers' ``apply_forward_hook`` does before ``encode`` / ``decode``: accelerate's
    model offload moves the VAE to its execution device there."""
    hook = getattr(vae, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(vae)


def _gather(comm, mine: torch.Tensor, dim: int, sizes: tuple, what: str) -> torch.Tensor:
    """Every rank's ``mine`` (rank r's holds ``sizes[r]`` along ``dim``), concatenated in rank
    order, on every rank: one batched exchange on the engine's data plane (counted)."""
    layout = ClipLayout.from_sizes(sizes)
    everything = tuple(tuple(range(layout.num_frames)) for _ in range(layout.world_size))
    return comm.post_frames(mine.contiguous(), dim, layout, everything, what).wait()


class _WanSplit:
    """``AutoencoderKLWan``: a video (B, C, F, H, W) split along latent frames."""

    def __init__(self, vae):
        self.vae = vae

    def settings(self) -> tuple:
        v = self.vae
        return (v.use_slicing, v.use_tiling, v.tile_sample_min_height, v.tile_sample_min_width,
                v.tile_sample_stride_height, v.tile_sample_stride_width)

    def encode_splits(self, x, ranks: int) -> bool:
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[2] < 1:
            return False
        from .wan_vae import _encode_tiles
        patch = self.vae.config.patch_size or 1
        return (1 + (x.shape[2] - 1) // 4 >= max(ranks, 2)
                and x.shape[1] * patch * patch == self.vae.config.in_channels
                and not _encode_tiles(self.vae, x.shape[3], x.shape[4]))

    def decode_splits(self, z, ranks: int) -> bool:
        # decode_clip mirrors tiled_decode and slicing: everything a video's decode does
        return (isinstance(z, torch.Tensor) and z.dim() == 5 and z.shape[2] >= max(ranks, 2)
                and z.shape[1] == self.vae.config.z_dim)

    def encode(self, comm, x, return_dict: bool):
        """``vae.encode(x)`` (a video of ``F`` frames: ``1 + (F-1)//4`` latent frames, the
        frames past the last whole one dropped, as ``_encode`` does), this rank's clip only."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
        from diffusers.models.modeling_outputs import AutoencoderKLOutput
        vae = self.vae
        n = 1 + (x.shape[2] - 1) // 4
        sizes = clip_sizes(n, comm.world_size, (encoder_history(vae) + 3) // 4)
        s = sum(sizes[:comm.rank])
        e = s + sizes[comm.rank]
        first = [video_frames_of(i, i).start for i in (s, e)]
        hist = encode_history_range(vae, s)
        _fire_offload_hook(vae)
        mine = encode_clip(vae, x[:, :, first[0]:first[1]], start=s,
                           history=x[:, :, hist.start:hist.stop])
        posterior = DiagonalGaussianDistribution(_gather(comm, mine, 2, sizes, "VAE encode gather"))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, comm, z, return_dict: bool):
        """``vae.decode(z)``, this rank's clip of latent frames only."""
        from diffusers.models.autoencoders.vae import DecoderOutput
        vae = self.vae
        R = temporal_factor(vae)
        sizes = clip_sizes(z.shape[2], comm.world_size, warmup_cost(vae))
        starts = [sum(sizes[:r]) for r in range(len(sizes) + 1)]
        s, e = starts[comm.rank], starts[comm.rank + 1]
        hist = history_range(vae, s)
        _fire_offload_hook(vae)
        mine = torch.cat(list(decode_clip(vae, z[:, :, s:e], start=s,
                                          history=z[:, :, hist.start:hist.stop], chunk=e - s)),
                         dim=2)
        frames = tuple(len(video_frames_of(a, b, R)) for a, b in zip(starts, starts[1:]))
        video = _gather(comm, mine, 2, frames, "VAE decode gather")
        return DecoderOutput(sample=video) if return_dict else (video,)


class _HunyuanSplit:
    """``AutoencoderKLHunyuanVideo``: a video's latents (B, C, F, h, w) decoded along latent
    frames (every rank holds them all); encoding runs stock."""

    def __init__(self, vae):
        self.vae = vae

    def settings(self) -> tuple:
        v = self.vae
        return (v.use_slicing, v.use_tiling, v.use_framewise_decoding,
                v.tile_sample_min_num_frames, v.tile_sample_stride_num_frames,
                v.tile_sample_min_height, v.tile_sample_min_width)

    def encode_splits(self, x, ranks: int) -> bool:
        return False

    def decode_splits(self, z, ranks: int) -> bool:
        from .hunyuan_vae import whole_video
        return (isinstance(z, torch.Tensor) and z.dim() == 5 and z.shape[2] >= max(ranks, 2)
                and z.shape[1] == self.vae.config.latent_channels
                and not whole_video(self.vae, z.shape[2]))

    def decode(self, comm, z, return_dict: bool):
        """``vae.decode(z)``, this rank's clip of latent frames only."""
        from diffusers.models.autoencoders.vae import DecoderOutput
        from .hunyuan_vae import decode_clip
        from .hunyuan_vae import video_frames_of as frames_of
        F, R = z.shape[2], self.vae.temporal_compression_ratio
        sizes = clip_sizes(F, comm.world_size, 0)
        starts = [sum(sizes[:r]) for r in range(len(sizes) + 1)]
        _fire_offload_hook(self.vae)
        mine = torch.cat(list(decode_clip(self.vae, z, offset=0, num_frames=F, frames=range(
            starts[comm.rank], starts[comm.rank + 1]))), dim=2)
        frames = tuple(len(frames_of(range(a, b), R)) for a, b in zip(starts, starts[1:]))
        video = _gather(comm, mine, 2, frames, "VAE decode gather")
        return DecoderOutput(sample=video) if return_dict else (video,)


class _RowSplit:
    """``AutoencoderKL`` (2-D): a batch of images (N, C, h, w), split along the rows, each
    rank's rows through the stock call (its slicing, tiling and offload hook included)."""

    def __init__(self, vae):
        self.vae = vae

    def settings(self) -> tuple:
        return (self.vae.use_slicing, self.vae.use_tiling)

    def encode_splits(self, x, ranks: int) -> bool:
        return isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[0] >= max(ranks, 2)

    decode_splits = encode_splits

    @staticmethod
    def _rows(comm, n):
        sizes = clip_sizes(n, comm.world_size, 0)
        s = sum(sizes[:comm.rank])
        return sizes, s, s + sizes[comm.rank]

    def encode(self, comm, inner, x, args, kwargs):
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
        sizes, s, e = self._rows(comm, x.shape[0])
        out = inner(x[s:e], *args, **kwargs)
        part = out[0] if isinstance(out, tuple) else out.latent_dist
        whole = DiagonalGaussianDistribution(
            _gather(comm, part.parameters, 0, sizes, "VAE encode gather"),
            deterministic=part.deterministic)
        return (whole, *out[1:]) if isinstance(out, tuple) else type(out)(latent_dist=whole)

    def decode(self, comm, inner, z, args, kwargs):
        sizes, s, e = self._rows(comm, z.shape[0])
        out = inner(z[s:e], *args, **kwargs)
        part = out[0] if isinstance(out, tuple) else out.sample
        whole = _gather(comm, part, 0, sizes, "VAE decode gather")
        return (whole, *out[1:]) if isinstance(out, tuple) else type(out)(sample=whole)


def _shared(method: str, split, comm_of: Callable, inner: Callable) -> Callable:
    """The replacement of ``vae.<method>``: agree, then split, run stock, or refuse."""
    params = inspect.signature(inner)

    def call(*args, **kwargs):
        comm = comm_of()
        if comm.world_size == 1:
            return inner(*args, **kwargs)
        try:
            bound = params.bind(*args, **kwargs)
        except TypeError:
            bound = None                # stock raises it, on every rank alike
        x = next(iter(bound.arguments.values()), None) if bound else None
        return_dict = bound.arguments.get("return_dict", True) if bound else True
        # Under autograd the stock call: the gather passes no gradient back.
        splits = (not torch.is_grad_enabled()
                  and getattr(split, f"{method}_splits")(x, comm.world_size))
        mine = _call_of(method, x, (*split.settings(), return_dict), splits)
        calls = comm.agree(mine)
        if not any(c.splits for c in calls):
            return inner(*args, **kwargs)    # nothing to share on any rank: no collective next
        odd = [r for r, c in enumerate(calls) if not c.same_call(calls[0])]
        if odd:
            raise ValueError(
                f"vae.{method} on a pipeline made by parallelize_pipe: rank {odd[0]} passed "
                f"{calls[odd[0]].describe()}, rank 0 {calls[0].describe()}; the drop-in shares "
                f"the VAE's work out across the ranks and needs the same call on every rank. "
                f"To {method} rank-local data, call vinf_engine.unparallelize_pipe(pipe) first")
        if isinstance(split, _RowSplit):
            rest = bound.args[1:], bound.kwargs
            return getattr(split, method)(comm, inner, x, *rest)
        return getattr(split, method)(comm, x, return_dict)
    return call


def share_vae(pipe, comm_of: Callable, patcher) -> bool:
    """Replace ``pipe.vae.encode`` and ``pipe.vae.decode`` by their shared versions, through
    ``patcher.replace_method`` (undone with the rest of the pipeline; a wrapper added since,
    such as accelerate's or a compiled method, keeps working as a pass-through). ``comm_of()``
    gives the ``ClipComm`` to talk on at call time. Returns whether the VAE was a kind this
    module splits (``AutoencoderKLWan``, ``AutoencoderKL``, ``AutoencoderKLHunyuanVideo``); any
    other is left alone."""
    from diffusers import AutoencoderKL, AutoencoderKLHunyuanVideo, AutoencoderKLWan
    vae = getattr(pipe, "vae", None)
    if isinstance(vae, AutoencoderKLWan):
        split = _WanSplit(vae)
    elif isinstance(vae, AutoencoderKLHunyuanVideo):
        split = _HunyuanSplit(vae)
    elif isinstance(vae, AutoencoderKL):
        split = _RowSplit(vae)
    else:
        return False
    for method in ("encode", "decode"):
        patcher.replace_method(vae, method,
                               lambda inner, m=method: _shared(m, split, comm_of, inner))
    return True
