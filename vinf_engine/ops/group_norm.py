"""GroupNorm whose statistics can span a whole video split across ranks.

Three steps, so that a cross-rank reduction fits between them:

    partials  (N, G, 2) fp64 per rank: [sum x, sum x^2] of each group, the second computed
              about the local mean (two-pass) so it carries no cancellation of its own
    reduce    one all-reduce (sum) of the partials plus the element count
    apply     y = act((x - mean) * rstd * weight + bias), math in fp32, output in x's dtype

Statistics merge in fp64: with the sum of squares formed as M2 + n*mean^2 per rank, the
cancellation in var = E[x^2] - mean^2 costs ~1e-16 * (mean/std)^2 relative, which stays far
below fp32 resolution even when |mean|/std is in the thousands.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import dispatch
from ._checks import check_int, check_real, check_tensor, compute_dtype

__all__ = ["group_norm", "group_norm_partials", "group_norm_finalize", "group_norm_apply", "frame_major",
           "group_norm_partials_reference", "group_norm_apply_reference", "check_group_norm_args"]

_ACTIVATIONS = (None, "silu")


def check_group_norm_args(x, num_groups, weight, bias, eps, activation):
    check_tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must be (N, C, *), got shape {tuple(x.shape)}")
    G = check_int("num_groups", num_groups, 1)
    C = x.shape[1]
    if C % G:
        raise ValueError(f"num_groups ({G}) must divide the channels of x ({C})")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(name, t, 1)
            if t.shape[0] != C:
                raise ValueError(f"{name} must have shape ({C},), got {tuple(t.shape)}")
            if t.device != x.device:
                raise ValueError(f"{name} is on {t.device}, x is on {x.device}")
    if check_real("eps", eps) <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")


_PARTIALS_CHUNK_ELEMS = 1 << 23     # fp64 elements per chunk of a large input (64 MiB)


def group_norm_partials_reference(x: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, int]:
    """Per-group ``[sum x, sum x^2]`` of ``x`` (N, C, *) as an (N, G, 2) fp64 tensor, and the
    number of elements in each group. ``sum x^2`` as ``sum (x - mean)^2 + mean * sum x`` (no
    cancellation). A large input goes in chunks along dim 2 (two passes: the sums, then the
    centred squares), so that its fp64 copies stay within ~64 MiB whatever its size."""
    N = x.shape[0]
    if x.dim() < 3 or x.shape[2] == 1 or x.numel() <= _PARTIALS_CHUNK_ELEMS:
        xs = x.reshape(N, num_groups, -1).to(torch.float64)
        n = xs.shape[-1]
        s1 = xs.sum(-1)
        m = s1 / max(n, 1)
        s2 = (xs - m[..., None]).square().sum(-1) + s1 * m
        return torch.stack([s1, s2], dim=-1), n
    step = max(1, _PARTIALS_CHUNK_ELEMS // max(1, x.numel() // x.shape[2]))
    parts = [(a, min(x.shape[2], a + step)) for a in range(0, x.shape[2], step)]

    def chunk(a, b):
        return x[:, :, a:b].reshape(N, num_groups, -1).to(torch.float64)
    n = x[0].numel() // num_groups
    s1 = sum(chunk(a, b).sum(-1) for a, b in parts)
    m = s1 / max(n, 1)
    s2 = sum((chunk(a, b) - m[..., None]).square().sum(-1) for a, b in parts) + s1 * m
    return torch.stack([s1, s2], dim=-1), n


def group_norm_finalize(partials: torch.Tensor, count, eps: float):
    """(mean, rstd), each (N, G) fp64, from summed partials and the summed element count."""
    mean = partials[..., 0] / count
    var = (partials[..., 1] / count - mean.square()).clamp_min(0.0)
    return mean, torch.rsqrt(var + eps)


def group_norm_apply_reference(x, mean, rstd, weight=None, bias=None, activation=None):
    """``act((x - mean) * rstd * weight + bias)`` for x (N, C, *) and (N, G) statistics."""
    N, C = x.shape[:2]
    G = mean.shape[1]
    cdt = compute_dtype(x.dtype)
    xs = x.reshape(N, G, -1).to(cdt)
    y = (xs - mean.to(cdt)[..., None]) * rstd.to(cdt)[..., None]
    y = y.reshape(N, C, -1)
    if weight is not None:
        y = y * weight.to(cdt)[:, None]
    if bias is not None:
        y = y + bias.to(cdt)[:, None]
    if activation == "silu":
        y = F.silu(y)
    return y.reshape(x.shape).to(x.dtype)


def _group_count(x: torch.Tensor, num_groups: int) -> int:
    return x.numel() // max(1, x.shape[0] * num_groups)


@torch.library.custom_op("vinf::group_norm_partials", mutates_args=())
def _group_norm_partials_op(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(N, G, 2) fp64 partials of x (N, C, *) on the backend ``dispatch`` picks."""
    key = (x.dtype, tuple(x.shape), tuple(x.stride()), num_groups)
    partials, _ = dispatch.call("group_norm_partials", key, x, num_groups)
    return partials


@_group_norm_partials_op.register_fake
def _(x, num_groups):
    return x.new_empty((x.shape[0], num_groups, 2), dtype=torch.float64)


dispatch.reference_autograd(_group_norm_partials_op,
                            lambda x, g: group_norm_partials_reference(x, g)[0])


@torch.library.custom_op("vinf::group_norm_apply", mutates_args=())
def _group_norm_apply_op(x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                         weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                         activation: Optional[str]) -> torch.Tensor:
    """``act((x - mean) * rstd * weight + bias)`` on the backend ``dispatch`` picks; the
    result has x's memory format (``torch.empty_like``)."""
    key = (x.dtype, tuple(x.shape), tuple(x.stride()), mean.shape[1], weight is not None,
           bias is not None, activation)
    y = dispatch.call("group_norm_apply", key, x, mean, rstd, weight, bias, activation)
    if y.stride() != torch.empty_like(x, device="meta").stride():
        y = torch.empty_like(x).copy_(y)      # the reference returns NCDHW for channels-last x
    return y


@_group_norm_apply_op.register_fake
def _(x, mean, rstd, weight, bias, activation):
    return torch.empty_like(x)


dispatch.reference_autograd(_group_norm_apply_op, group_norm_apply_reference)


def frame_major(x: torch.Tensor):
    """``x`` (N, C, F, *rest) as an (N*F, C, *rest) view when its memory is frame-major,
    (N, F, C, *rest) contiguous or channels-last per frame, and its spatial dims share no
    single stride; else None.

    That is how the engine's GroupNorms see their input: diffusers' UNet3D keeps activations
    as (B*F, C, H, W) and its temporal layers permute them to (B, C, F, H, W). No kernel reads
    (C, F, H, W) at two strides, so such an ``x`` is normalized as B*F frames: per-frame
    partial sums added over the frames in fp64 (the sums are additive, as across ranks), the
    apply per frame with the video's statistics. No copy."""
    if x.dim() < 4 or x.numel() == 0:
        return None
    N, C, F = x.shape[:3]
    size, stride = tuple(x.shape), x.stride()
    # Decided from the strides (not by trying a view: torch.compile cannot catch that).
    if _mergeable(size[2:], stride[2:]):
        return None                         # one stride already: the kernels read it as is
    if not (_mergeable((N, F), (stride[0], stride[2])) and _mergeable(size[3:], stride[3:])):
        return None
    return x.transpose(1, 2).view(N * F, C, *size[3:])


def _mergeable(size, stride) -> bool:
    """Whether dims of these sizes and strides flatten into one without a copy (``view``)."""
    dims = [(n, s) for n, s in zip(size, stride) if n != 1]
    return all(s0 == s1 * n1 for (_, s0), (n1, s1) in zip(dims, dims[1:]))


def group_norm_partials(x: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, int]:
    """Per-group ``[sum x, sum x^2]`` of ``x`` (N, C, *): (N, G, 2) fp64, and the element
    count of each group. Runs as ``torch.ops.vinf.group_norm_partials`` (see ``dispatch``);
    a frame-major ``x`` frame by frame (``frame_major``)."""
    folded = frame_major(x)
    if folded is not None:
        N, F = x.shape[0], x.shape[2]
        parts = _group_norm_partials_op(folded, num_groups).view(N, F, num_groups, 2)
        return parts.sum(dim=1), _group_count(x, num_groups)
    return _group_norm_partials_op(x, num_groups), _group_count(x, num_groups)


def group_norm_apply(x, mean, rstd, weight=None, bias=None, activation=None):
    """``act((x - mean) * rstd * weight + bias)`` for x (N, C, *), mean and rstd (N, G),
    weight and bias (C,) or None; the result has x's layout. Runs as
    ``torch.ops.vinf.group_norm_apply``; a frame-major ``x`` frame by frame."""
    folded = frame_major(x)
    if folded is not None:
        F = x.shape[2]
        y = _group_norm_apply_op(folded, mean.repeat_interleave(F, dim=0),
                                 rstd.repeat_interleave(F, dim=0), weight, bias, activation)
        return y.view(x.shape[0], F, *y.shape[1:]).transpose(1, 2)
    return _group_norm_apply_op(x, mean, rstd, weight, bias, activation)


dispatch.register("group_norm_partials", "reference", group_norm_partials_reference)
dispatch.register("group_norm_apply", "reference", group_norm_apply_reference)


def _check_same_across(x, num_groups, activation, group):
    """Every rank must normalize the same (N, C, spatial) with the same groups: one small
    all-gather so that a mismatch is a clear error on every rank, not a hung all-reduce."""
    import torch.distributed as dist
    spatial = 1
    for s in x.shape[3:]:
        spatial *= s
    dev = x.device if dist.get_backend(group) != "gloo" else torch.device("cpu")
    mine = torch.tensor([x.dim(), x.shape[0], x.shape[1], spatial, num_groups,
                         _ACTIVATIONS.index(activation)], dtype=torch.float64, device=dev)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    rows = [tuple(int(v) for v in t.tolist()) for t in every]
    if any(r != rows[0] for r in rows):
        raise ValueError(
            "group_norm: ranks disagree on (ndim, N, C, spatial size, num_groups, activation): "
            + ", ".join(f"rank {i}: {r}" for i, r in enumerate(rows)))


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, activation=None,
               process_group=None):
    """GroupNorm (+ optional SiLU), statistics over the whole video when distributed.

    Parameters
    ----------
    x : (N, C, F, *) tensor; with ``process_group``, dim 2 is the frame axis along which the
        ranks' tensors concatenate (each rank may hold a different number of frames)
    num_groups : int dividing C
    weight, bias : (C,) tensors or None
    eps : float > 0
    activation : None or ``"silu"``
    process_group : torch.distributed group or None (local statistics). Collective: every
        rank of the group must call it with the same N, C, spatial size and groups.

    Returns
    -------
    Tensor like ``x``: ``F.group_norm`` (+ activation) of the frame-wise concatenation of every
    rank's ``x``, sliced back to this rank.
    """
    check_group_norm_args(x, num_groups, weight, bias, eps, activation)
    partials, n = group_norm_partials(x, num_groups)
    count = n
    if process_group is not None:
        import torch.distributed as dist
        if dist.get_world_size(process_group) > 1:
            if x.dim() < 3:
                raise ValueError(f"x must be (N, C, F, *) to be normalized across ranks, "
                                 f"got shape {tuple(x.shape)}")
            _check_same_across(x, num_groups, activation, process_group)
            flat = torch.cat([partials.flatten(), partials.new_tensor([float(n)])])
            if dist.get_backend(process_group) == "gloo":
                flat = flat.cpu()
            dist.all_reduce(flat, group=process_group)
            flat = flat.to(partials.device)
            partials, count = flat[:-1].view_as(partials), flat[-1]
    mean, rstd = group_norm_finalize(partials, count, eps)
    return group_norm_apply(x, mean, rstd, weight, bias, activation)
