"""Argument checks shared by the ops: every failure is a ValueError naming the argument."""
from __future__ import annotations

import math

import torch


def check_int(name: str, v, lo: int = 0) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"{name} must be an int, got {type(v).__name__} {v!r}")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    return v


def check_real(name: str, v) -> float:
    """``v`` as a float; a symbolic number under torch.compile passes as it is (its value is
    the data of the graph, not a constant to specialize on)."""
    if isinstance(v, (torch.SymFloat, torch.SymInt)) or torch.compiler.is_compiling():
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def check_bias(name: str, v, rows: int, device: torch.device):
    """A logit bias: a finite number (``check_real``), or a tensor of one value for all rows
    (shape ``()`` or ``(1,)``) or one per row of the op's batch (``(rows,)``), on the op's
    device, returned as fp32 ``(rows, 1, 1)`` to broadcast over an lse ``(rows, H, L)``. A
    tensor bias is data of the graph: what torch.compile and CUDA graphs need, where the value
    (the phase of a tensor timestep) must not be read on the host."""
    if not isinstance(v, torch.Tensor):
        return check_real(name, v)
    if not (v.is_floating_point() or v.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{name} must be a real tensor, got {v.dtype}")
    if v.device != device:
        raise ValueError(f"{name} is on {v.device}, the op's inputs on {device}")
    if v.numel() == 1 and v.dim() <= 1:
        v = v.reshape(1).expand(rows)
    elif tuple(v.shape) != (rows,):
        raise ValueError(f"{name} must be a number, one value, or one per row ({rows},); "
                         f"got shape {tuple(v.shape)}")
    return v.float().view(rows, 1, 1)


def check_tensor(name: str, t, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return t


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 math for fp16/bf16/fp32 inputs; fp64 inputs stay fp64 (the test oracle's precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
