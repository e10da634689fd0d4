"""Which implementation runs an op: ``reference`` (plain PyTorch), ``triton`` or ``cuda``.

Backends register implementations per op name; each says which arguments it can take. On
CPU tensors the reference runs. On CUDA tensors, by default, every registered backend that
can take the arguments is checked once against the reference on those very inputs and timed;
the fastest that passed is cached per shape key for the life of the process. The environment
variable ``VINF_BACKEND=reference|triton|cuda|auto`` overrides the choice
(``triton`` on CPU runs the kernels under ``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["register", "call", "chosen", "BACKENDS"]

BACKENDS = ("reference", "triton", "cuda")


@dataclass(frozen=True)
class Impl:
    fn: Callable
    supports: Callable | None        # (*args, **kwargs) -> reason it cannot, or None


_IMPLS: dict[str, dict[str, Impl]] = {}
_CHOSEN: dict[tuple, str] = {}
_LOCK = threading.Lock()
_LOADED = False


def register(op: str, backend: str, fn: Callable, supports: Callable | None = None):
    """Make ``fn`` the ``backend`` implementation of ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _IMPLS.setdefault(op, {})[backend] = Impl(fn, supports)


def _requested() -> str:
    b = os.environ.get("VINF_BACKEND", "auto").strip().lower() or "auto"
    if b not in BACKENDS + ("auto",):
        raise ValueError(f"VINF_BACKEND must be one of {BACKENDS + ('auto',)}, got {b!r}")
    return b


def _load_backends(requested: str):
    """Import the optional backends once; each registers what it can run here."""
    global _LOADED
    if _LOADED:
        return
    with _LOCK:
        if _LOADED:
            return
        if requested == "triton" and not torch.cuda.is_available():
            # Must precede the first import of triton.
            os.environ.setdefault("TRITON_INTERPRET", "1")
        for mod in ("vinf_engine.kernels", "vinf_engine.ops.cuda_backend"):
            try:
                __import__(mod)
            except ImportError:
                pass
        _LOADED = True


def _why_not(impl: Impl, args, kwargs) -> str | None:
    return impl.supports(*args, **kwargs) if impl.supports is not None else None


def call(op: str, key: tuple, *args, **kwargs):
    """Run ``op`` on the chosen backend. ``key`` identifies the shape class for caching."""
    requested = _requested()
    impls = _IMPLS[op]
    if requested == "reference":
        return impls["reference"].fn(*args, **kwargs)
    _load_backends(requested)
    if requested != "auto":
        impl = impls.get(requested)
        if impl is None:
            raise ValueError(f"VINF_BACKEND={requested}: no {requested} implementation of {op} "
                             "is available in this installation")
        why = _why_not(impl, args, kwargs)
        if why is not None:
            raise ValueError(f"VINF_BACKEND={requested} cannot run {op}: {why}")
        return impl.fn(*args, **kwargs)
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
    if device.type != "cuda":
        return impls["reference"].fn(*args, **kwargs)
    full_key = (op, key)
    name = _CHOSEN.get(full_key)
    if name is None:
        name = _autoselect(op, full_key, args, kwargs)
    return impls[name].fn(*args, **kwargs)


def chosen() -> dict:
    """The backend picked for each (op, shape key) so far."""
    return dict(_CHOSEN)


def _close(out, ref) -> bool:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    for o, r in zip(outs, refs):
        if not isinstance(o, torch.Tensor):
            continue
        if o.shape != r.shape or o.dtype != r.dtype or not torch.isfinite(o).all():
            return False
        tol = {torch.float16: 1e-2, torch.bfloat16: 4e-2}.get(r.dtype, 1e-4)
        scale = r.float().abs().max().clamp_min(1.0)
        if (o.float() - r.float()).abs().max() > tol * scale:
            return False
    return True


def _autoselect(op, full_key, args, kwargs) -> str:
    """Check each candidate against the reference on these inputs, time those that pass."""
    impls = _IMPLS[op]
    candidates = [b for b in ("cuda", "triton") if b in impls and _why_not(impls[b], args, kwargs) is None]
    if not candidates or torch.cuda.is_current_stream_capturing():
        # Nothing to choose from, or inside CUDA-graph capture where we must not time.
        return candidates[0] if candidates else "reference"
    ref = impls["reference"].fn(*args, **kwargs)
    best, best_ms = "reference", _time(impls["reference"].fn, args, kwargs)
    for b in candidates:
        try:
            ok = _close(impls[b].fn(*args, **kwargs), ref)
        except Exception:  # noqa: BLE001 - a backend that fails its check is not chosen
            ok = False
        if ok:
            ms = _time(impls[b].fn, args, kwargs)
            if ms < best_ms:
                best, best_ms = b, ms
    _CHOSEN[full_key] = best
    return best


def _time(fn, args, kwargs, reps: int = 5) -> float:
    fn(*args, **kwargs)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn(*args, **kwargs)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def reference_autograd(op, reference: Callable):
    """Give the torch.library custom op ``op`` gradients by recomputing ``reference`` (same
    arguments and outputs as ``op``, plain PyTorch) under autograd. The kernels are
    forward-only; this keeps every op as differentiable as its reference path was."""

    def setup_context(ctx, inputs, output):
        ctx.is_tensor = [isinstance(a, torch.Tensor) for a in inputs]
        ctx.others = [None if t else a for a, t in zip(inputs, ctx.is_tensor)]
        ctx.save_for_backward(*[a for a, t in zip(inputs, ctx.is_tensor) if t])

    def backward(ctx, *grads):
        saved = iter(ctx.saved_tensors)
        args = [next(saved).detach().requires_grad_(True) if t else o
                for t, o in zip(ctx.is_tensor, ctx.others)]
        with torch.enable_grad():
            outs = reference(*args)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        used = [(o, g) for o, g in zip(outs, grads) if g is not None and o.numel()]
        wrt = [a for a in args if isinstance(a, torch.Tensor)]
        got = torch.autograd.grad([o for o, _ in used], wrt, [g for _, g in used],
                                  allow_unused=True) if used else [None] * len(wrt)
        got = iter(got)
        return tuple(next(got) if isinstance(a, torch.Tensor) else None for a in args)

    op.register_autograd(backward, setup_context=setup_context)


def implementations(op: str) -> dict[str, Impl]:
    """Every backend registered for ``op``, optional backends imported first (benchmarks
    iterate this, so a new backend shows up there without edits)."""
    _load_backends(_requested())
    return dict(_IMPLS[op])
