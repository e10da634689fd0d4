"""Which implementation runs an op: ``reference`` (plain PyTorch), ``triton`` or ``cuda``.

Backends register implementations per op name; each says which arguments it can take
(``supports``: the reason it cannot, or None). Which one runs is a pure function of the
arguments' device, shapes and dtypes, the same on every rank and every run (timing backends
belongs to ``bench/kernels.py``):

- CPU tensors: the reference.
- CUDA tensors: the first backend of ``ORDER`` that supports the arguments, checked on every
  call (what decides support, such as the halo sizes that size the CUDA kernel's shared
  memory or a row's alignment, is not all in a cache key). ``ORDER_REASON`` says why.
- A backend that raises is reported, never silently replaced: the failure (op, backend, shape
  key, exception) is logged once, kept in ``failures()`` (the generation report and the
  benchmarks print it), that key never uses the backend again in this process, and the call
  goes on with the next backend. Under CUDA-graph capture the error is raised instead.

The environment variable ``VINF_BACKEND=reference|triton|cuda|xformers|auto`` overrides the choice
(``triton`` on CPU runs the kernels under ``TRITON_INTERPRET=1``); a forced backend that
cannot take the arguments is a ValueError naming why.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["register", "call", "chosen", "failures", "summary", "choose", "BACKENDS", "ORDER"]

BACKENDS = ("reference", "triton", "cuda", "xformers")
# Candidates on CUDA tensors, first supported wins.
ORDER = ("cuda", "triton", "xformers", "reference")
ORDER_REASON = (
    "cuda first: the native kernels read the engine's own layouts (strided QKV views, "
    "channels-last) without launch-time compilation; triton next: every shape the CUDA "
    "kernels refuse (tokens per frame > 1, head dims other than 64/128); xformers (a peer, "
    "when its CUDA operator runs: a dense bias per clip) before the reference, last. "
    "Not yet timed on a GPU: bench/kernels.py times each backend beside its peers, and a "
    "GPU session that measures otherwise should change this order.")

_log = logging.getLogger("vinf_engine.dispatch")


@dataclass(frozen=True)
class Impl:
    fn: Callable
    supports: Callable | None        # (*args, **kwargs) -> reason it cannot, or None


_IMPLS: dict[str, dict[str, Impl]] = {}
_CHOSEN: dict[tuple, str] = {}       # (op, key) -> the backend that ran it last
_FAILED: dict[tuple, dict] = {}      # (op, key, backend) -> the failure
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
        for mod in ("vinf_engine.kernels", "vinf_engine.ops.cuda_backend",
                    "vinf_engine.ops.xformers_backend"):
            try:
                __import__(mod)
            except ImportError:
                pass
        _LOADED = True


def _why_not(impl: Impl, args, kwargs) -> str | None:
    return impl.supports(*args, **kwargs) if impl.supports is not None else None


def _accelerated(device: torch.device) -> bool:
    return device.type == "cuda"


def choose(op: str, key: tuple, args, kwargs) -> list:
    """The backends that would run ``op`` on these arguments, in order, each with why not the
    ones before it: ``[(backend, reason)]``, the first being the one that runs. Pure: the
    same arguments give the same answer on every rank and every run."""
    impls = _IMPLS[op]
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
    if not _accelerated(device):
        return [("reference", f"{device.type} tensors run the reference")]
    out, skipped = [], []
    for name in ORDER:
        impl = impls.get(name)
        if impl is None:
            skipped.append(f"{name}: not installed")
            continue
        if (op, key, name) in _FAILED:
            skipped.append(f"{name}: failed earlier on this shape")
            continue
        why = _why_not(impl, args, kwargs)
        if why is not None:
            skipped.append(f"{name}: {why}")
            continue
        out.append((name, "; ".join(skipped) or "first in ORDER"))
    return out


def call(op: str, key: tuple, *args, **kwargs):
    """Run ``op`` on the chosen backend. ``key`` names the shape class in reports."""
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
    for name, _ in choose(op, key, args, kwargs):
        if name == "reference":
            break
        try:
            out = impls[name].fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - reported below, then the next backend
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"vinf_engine: the {name} backend of {op} failed under "
                                   f"CUDA-graph capture on {key}: {type(e).__name__}: {e}") from e
            _record_failure(op, key, name, e)
            continue
        _CHOSEN[(op, key)] = name
        return out
    _CHOSEN[(op, key)] = "reference"
    return impls["reference"].fn(*args, **kwargs)


def _record_failure(op, key, name, e):
    with _LOCK:
        _FAILED[(op, key, name)] = dict(op=op, backend=name, key=repr(key),
                                        error=f"{type(e).__name__}: {e}"[:500])
    _log.warning("vinf_engine: the %s backend of %s failed on %r and is not used for it again "
                 "(%s: %s); the next backend runs it", name, op, key, type(e).__name__, e)


def chosen() -> dict:
    """The backend that ran each (op, shape key) on CUDA tensors so far."""
    return dict(_CHOSEN)


def failures() -> list:
    """Every backend failure so far: dicts of op, backend, key, error."""
    return list(_FAILED.values())


def summary() -> dict:
    """JSON-ready: per op, how many shape keys each backend ran on CUDA tensors; and every
    failure. The generation report and the benchmarks print it."""
    ran: dict = {}
    for (op, _), name in _CHOSEN.items():
        ran.setdefault(op, {}).setdefault(name, 0)
        ran[op][name] += 1
    return dict(ran=ran, failures=failures())


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
