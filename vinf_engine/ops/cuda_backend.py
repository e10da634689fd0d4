"""The CUDA C++ kernels of ``vinf_engine._C`` as the dispatcher's ``cuda`` backend.

Registers ``dual_scope_attention``, ``group_norm_partials`` and ``group_norm_apply`` when the
extension was built with CUDA (``_C.with_cuda``) and torch sees a GPU. The kernels take raw
pointers, element strides and the current stream; this module checks what they can take (each
``*_supports`` returns the reason it cannot, else None), allocates the outputs and launches.

What the kernels cover:

- ``dual_scope_attention``: ``tokens_per_frame == 1``, head dim 64 or 128, fp16/bf16 (tensor
  cores, fp32 accumulation) or fp32 (CUDA cores); any strides whose rows start on 16-byte
  boundaries (views of a fused QKV projection included); a sequence's staged rows must fit the
  device's shared memory (~128 local + global keys at 64 frames is far inside it).
- ``group_norm_partials`` / ``group_norm_apply``: fp16/bf16/fp32 ``x`` (N, C, *) contiguous or
  channels-last (memory order N, *, C); the output keeps x's layout.
"""
from __future__ import annotations

import functools

import torch

from . import dispatch

try:
    from vinf_engine import _C
except ImportError:  # the package was installed without its native extension
    _C = None

__all__ = ["AVAILABLE", "dual_scope_attention", "dual_scope_attention_supports",
           "group_norm_partials", "group_norm_partials_supports", "group_norm_apply",
           "group_norm_apply_supports", "gn_layout"]

AVAILABLE = bool(getattr(_C, "with_cuda", False))

_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_HEAD_DIMS = (64, 128)


@functools.lru_cache(maxsize=None)
def _device_props(index: int) -> tuple[int, int]:
    """(multiprocessor count, opt-in shared memory per block) of a CUDA device."""
    p = torch.cuda.get_device_properties(index)
    return p.multi_processor_count, int(getattr(p, "shared_memory_per_block_optin", 48 * 1024))


def _index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def _stream(index: int) -> int:
    return torch.cuda.current_stream(index).cuda_stream


def _cuda_reason(name, t) -> str | None:
    if not AVAILABLE:
        return "vinf_engine._C was built without CUDA"
    if not isinstance(t, torch.Tensor) or t.device.type != "cuda":
        return f"{name} is not a CUDA tensor"
    return None


# ---- GroupNorm ------------------------------------------------------------------------------

def gn_layout(x: torch.Tensor) -> str | None:
    """``"contiguous"`` or ``"channels_last"`` (memory order N, *spatial, C) for x (N, C, *);
    None for any other layout."""
    if x.is_contiguous():
        return "contiguous"
    if x.dim() >= 3 and x.permute(0, *range(2, x.dim()), 1).is_contiguous():
        return "channels_last"
    return None


def _gn_shape(x):
    N, C = x.shape[0], x.shape[1]
    return N, C, (x.numel() // (N * C)) if N * C else 0


def _gn_x_reason(x) -> str | None:
    why = _cuda_reason("x", x)
    if why:
        return why
    if x.dtype not in _X_DTYPES:
        return f"x has dtype {x.dtype}; the CUDA GroupNorm kernels take fp32, fp16 and bf16"
    if x.dim() < 2:
        return f"x must be (N, C, *), got shape {tuple(x.shape)}"
    if gn_layout(x) is None:
        return f"x must be contiguous or channels-last, got strides {x.stride()}"
    return None


def group_norm_partials_supports(x, num_groups) -> str | None:
    why = _gn_x_reason(x)
    if why or x.numel() == 0:
        return why
    N, C, S = _gn_shape(x)
    try:
        _C.group_norm_partials_plan(N, C, S, num_groups, gn_layout(x) == "channels_last",
                                    _CODES[x.dtype], x.data_ptr(), _device_props(_index(x))[0])
    except ValueError as e:
        return str(e)
    return None


def _group_norm_partials_into(out: torch.Tensor, x: torch.Tensor, num_groups: int) -> None:
    """Write x's (N, G, 2) fp64 partials into ``out`` (contiguous, on x's device)."""
    N, C, S = _gn_shape(x)
    if out.dtype != torch.float64 or not out.is_contiguous() or tuple(out.shape) != (N, num_groups, 2):
        raise ValueError(f"out must be a contiguous ({N}, {num_groups}, 2) fp64 tensor")
    idx = _index(x)
    sm = _device_props(idx)[0]
    cl = gn_layout(x) == "channels_last"
    code = _CODES[x.dtype]
    plan = _C.group_norm_partials_plan(N, C, S, num_groups, cl, code, x.data_ptr(), sm)
    # Freed on return but reused only by later work on this stream, ordered after the kernels.
    ws = torch.empty(plan["workspace_floats"], dtype=torch.float32, device=x.device)
    _C.group_norm_partials(x.data_ptr(), code, N, C, S, num_groups, cl, out.data_ptr(),
                           ws.data_ptr(), ws.numel(), sm, _stream(idx), idx)


def group_norm_partials(x: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, int]:
    """Per-group ``[sum x, sum x^2]`` of x (N, C, *): (N, G, 2) fp64, and the element count
    of each group (the reference's format). Per-block fp32 (count, mean, M2), merged in fp64."""
    N, C, S = _gn_shape(x)
    count = (C // num_groups) * S
    if x.numel() == 0:
        return torch.zeros((N, num_groups, 2), dtype=torch.float64, device=x.device), count
    out = torch.empty((N, num_groups, 2), dtype=torch.float64, device=x.device)
    _group_norm_partials_into(out, x, num_groups)
    return out, count


def group_norm_apply_supports(x, mean, rstd, weight=None, bias=None, activation=None):
    why = _gn_x_reason(x)
    if why:
        return why
    if activation not in (None, "silu"):
        return f"activation {activation!r} (the CUDA kernel has None and 'silu')"
    N, C, S = _gn_shape(x)
    for name, t in (("mean", mean), ("rstd", rstd)):
        if not isinstance(t, torch.Tensor) or t.device != x.device:
            return f"{name} must be a tensor on {x.device}"
        if t.dtype not in (torch.float32, torch.float64):
            return f"{name} has dtype {t.dtype}; the kernel reads fp32 or fp64 statistics"
        if t.dim() != 2 or t.shape[0] != N or t.shape[1] < 1 or C % t.shape[1]:
            return f"{name} must be (N, G) with G dividing C, got {tuple(t.shape)}"
    if mean.dtype != rstd.dtype or mean.shape != rstd.shape:
        return "mean and rstd must have the same dtype and shape"
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.device != x.device or t.dim() != 1 \
                or t.shape[0] != C or t.dtype not in _CODES:
            return f"{name} must be a ({C},) floating tensor on {x.device}"
    if x.numel() == 0:
        return None
    try:
        _C.group_norm_apply_plan(N, C, S, gn_layout(x) == "channels_last", _CODES[x.dtype],
                                 x.data_ptr(), x.data_ptr(), _device_props(_index(x))[0])
    except ValueError as e:
        return str(e)
    return None


def _group_norm_apply_into(y, x, mean, rstd, weight=None, bias=None, activation=None) -> None:
    """Write ``act((x - mean) * rstd * weight + bias)`` into ``y`` (x's shape, strides, dtype)."""
    if y.stride() != x.stride() or y.shape != x.shape or y.dtype != x.dtype:
        raise ValueError("y must have x's shape, strides and dtype")
    N, C, S = _gn_shape(x)
    G = mean.shape[1]
    # The kernel trusts these sizes with raw pointers: never let a wrong one read out of bounds.
    if tuple(mean.shape) != (N, G) or tuple(rstd.shape) != (N, G) or C % G:
        raise ValueError(f"mean and rstd must be (N, G) = ({N}, G) with G dividing {C}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (C,):
            raise ValueError(f"{name} must have shape ({C},), got {tuple(t.shape)}")
    idx = _index(x)

    def param(t):
        return (0, 0, 0) if t is None else (t.data_ptr(), _CODES[t.dtype], t.stride(0))

    _C.group_norm_apply(
        x.data_ptr(), y.data_ptr(), _CODES[x.dtype], N, C, S, G, gn_layout(x) == "channels_last",
        (mean.data_ptr(), mean.stride(0), mean.stride(1), 0),
        (rstd.data_ptr(), rstd.stride(0), rstd.stride(1), 0), _CODES[mean.dtype],
        param(weight), param(bias), activation == "silu", _device_props(idx)[0], _stream(idx),
        idx)


def group_norm_apply(x, mean, rstd, weight=None, bias=None, activation=None) -> torch.Tensor:
    """``act((x - mean) * rstd * weight + bias)`` for x (N, C, *), mean/rstd (N, G) fp32/fp64,
    weight/bias (C,) or None; returns x's dtype in x's layout (one read, one write)."""
    y = torch.empty_like(x)  # dense x: same strides, so channels-last stays channels-last
    if x.numel():
        _group_norm_apply_into(y, x, mean, rstd, weight, bias, activation)
    return y


# ---- dual-scope attention ---------------------------------------------------------------------

def _rows_reason(name, t, elt) -> str | None:
    if t.stride(-1) != 1:
        return f"{name} must have a unit stride along the head dim, got strides {t.stride()}"
    if t.data_ptr() % 16 or any((s * elt) % 16 for s in t.stride()[:3]):
        return f"{name} rows must start on 16-byte boundaries (pointer and strides), got strides {t.stride()}"
    return None


def dual_scope_attention_supports(q, k, v, k_global=None, v_global=None, *, window, pad,
                                  valid_left, valid_right, tokens_per_frame=1, local_bias=0.0,
                                  global_bias=0.0, scale=None, return_lse=False) -> str | None:
    why = _cuda_reason("q", q)
    if why:
        return why
    if tokens_per_frame != 1:
        return f"tokens_per_frame = {tokens_per_frame}: the CUDA kernel covers 1 (UNet temporal attention)"
    if q.dtype not in _X_DTYPES:
        return f"q has dtype {q.dtype}; the CUDA attention kernel takes fp32, fp16 and bf16"
    if q.dim() != 4 or q.shape[3] not in _HEAD_DIMS:
        return f"head dim {q.shape[-1]}: the CUDA attention kernel covers {_HEAD_DIMS}"
    tensors = [("q", q), ("k", k), ("v", v)]
    if k_global is not None and k_global.shape[1] > 0:
        tensors += [("k_global", k_global), ("v_global", v_global)]
    elt = q.element_size()
    for name, t in tensors:
        if not isinstance(t, torch.Tensor) or t.device != q.device or t.dtype != q.dtype:
            return f"{name} must be a {q.dtype} tensor on {q.device}"
        why = _rows_reason(name, t, elt)
        if why:
            return why
    B, F, H, D = q.shape
    if B * H == 0:
        return None
    ng = 0 if k_global is None else k_global.shape[1]
    plan = _C.dual_scope_attention_plan(B * H, F, F + valid_left + valid_right, ng, D,
                                        _CODES[q.dtype])
    limit = _device_props(_index(q))[1]
    if plan["smem_bytes"] > limit:
        return (f"one sequence needs {plan['smem_bytes']} bytes of shared memory, the device "
                f"allows {limit}: too many frames or keys for the CUDA kernel")
    return None


def _seq(t) -> tuple[int, int, int, int]:
    return (0, 0, 0, 0) if t is None else (t.data_ptr(), t.stride(0), t.stride(1), t.stride(2))


def _dual_scope_attention_into(out, lse, q, k, v, k_global, v_global, *, window, pad,
                               valid_left, valid_right, local_bias, global_bias, scale) -> None:
    """Write the attention of q (B, F, H, D) into ``out`` (B, F, H, D) (any strides with 16-byte
    rows) and, if ``lse`` is a tensor, its (B, H, F) fp32 log-sum-exp."""
    B, F, H, D = q.shape
    ng = 0 if k_global is None else k_global.shape[1]
    # The kernel trusts these sizes with raw pointers: never let a wrong one read out of bounds.
    want = {"k": (B, F + 2 * pad, H, D), "v": (B, F + 2 * pad, H, D), "out": (B, F, H, D)}
    if ng:
        want.update(k_global=(B, ng, H, D), v_global=(B, ng, H, D))
    got = dict(k=k, v=v, out=out, k_global=k_global, v_global=v_global)
    for name, shape in want.items():
        if got[name] is None or tuple(got[name].shape) != shape:
            raise ValueError(f"{name} must have shape {shape}")
    if ng == 0:
        k_global = v_global = None
    if lse is not None and (lse.dtype != torch.float32 or not lse.is_contiguous()
                            or tuple(lse.shape) != (B, H, F)):
        raise ValueError(f"lse must be a contiguous ({B}, {H}, {F}) fp32 tensor")
    idx = _index(q)
    _C.dual_scope_attention(
        _seq(q), _seq(k), _seq(v), _seq(k_global), _seq(v_global), _seq(out),
        0 if lse is None else lse.data_ptr(), _CODES[q.dtype], B, F, H, D, pad, window,
        valid_left, valid_right, ng, float(D ** -0.5 if scale is None else scale),
        float(local_bias), float(global_bias), _stream(idx), idx)


def dual_scope_attention(q, k, v, k_global=None, v_global=None, *, window, pad, valid_left,
                         valid_right, tokens_per_frame=1, local_bias=0.0, global_bias=0.0,
                         scale=None, return_lse=False):
    """``vinf.ops.dual_scope_attention`` for ``tokens_per_frame == 1``: q (B, F, H, D),
    k/v (B, F + 2*pad, H, D), k_global/v_global (B, Ng, H, D) or None. Returns a contiguous
    (B, F, H, D) tensor of q's dtype, and with ``return_lse`` also (B, H, F) fp32."""
    if tokens_per_frame != 1:
        raise ValueError("the CUDA attention kernel covers tokens_per_frame == 1")
    B, F, H, D = q.shape
    out = torch.empty((B, F, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, F), dtype=torch.float32, device=q.device) if return_lse else None
    if B * H:
        _dual_scope_attention_into(out, lse, q, k, v, k_global, v_global, window=window,
                                   pad=pad, valid_left=valid_left, valid_right=valid_right,
                                   local_bias=local_bias, global_bias=global_bias, scale=scale)
    return (out, lse) if return_lse else out


if AVAILABLE and torch.cuda.is_available():
    dispatch.register("dual_scope_attention", "cuda", dual_scope_attention,
                      dual_scope_attention_supports)
    dispatch.register("group_norm_partials", "cuda", group_norm_partials,
                      group_norm_partials_supports)
    dispatch.register("group_norm_apply", "cuda", group_norm_apply, group_norm_apply_supports)
