"""Memory-bounded execution: a module's forward over chunks of its rows.

Layers that act per frame (a UNet's resnets, spatial transformers, samplers) or per token
(feed-forwards, cross-attention) hold, at their peak, several temporaries the size of their
input. Run over chunks of rows, each chunk's temporaries are freed before the next starts and
the outputs are written into one preallocated tensor, so a layer's working memory is bounded
by the budget whatever the video's length; what still grows with the video is what must be
held per frame between layers (the latents, the skip connections, layer outputs).

``chunked(cls)`` is ``cls`` with that forward, a subclass (same parameters, same
``state_dict``), given to a module with ``Patcher.swap_class`` and these attributes:

    _vinf_rows    names of the forward's arguments whose dim ``_vinf_dim`` are the rows
    _vinf_dim     the row dimension (0: frames or positions in a batch; 1: a DiT's tokens)
    _vinf_bytes   the working memory allowed: a chunk's input rows x ``_vinf_factor``
    _vinf_factor  temporaries per input byte at the layer's peak (a reasoned estimate)
    _vinf_engine  the engine, told which rows each chunk holds (``ClipParallel.row_window``)
"""
from __future__ import annotations

import inspect

import torch

__all__ = ["chunked", "rows_per_chunk", "over_rows"]

_CLASSES: dict = {}


def rows_per_chunk(x: torch.Tensor, dim: int, budget_bytes: int, factor: float) -> int:
    """Rows of ``x`` (along ``dim``) per chunk: the largest number whose input bytes times
    ``factor`` fit ``budget_bytes``, at least one."""
    n = x.shape[dim]
    per_row = x.numel() // max(1, n) * x.element_size()
    return max(1, int(budget_bytes // max(1.0, per_row * factor)))


def over_rows(engine, n: int, step: int, run) -> None:
    """``run(r0, r1)`` for each chunk ``[r0, r1)`` of ``n`` rows, ``step`` at a time, the
    engine (if any) told which rows of the step's batch-major attention input each chunk
    holds (``ClipParallel.row_window``: per-sample biases map rows to samples). Nested
    chunks compose: an outer chunk's offset is kept."""
    outer = engine.row_window if engine is not None else None
    off, total = outer if outer is not None else (0, n)
    try:
        for r0 in range(0, n, step):
            if engine is not None:
                engine.row_window = (off + r0, total)
            run(r0, min(n, r0 + step))
    finally:
        if engine is not None:
            engine.row_window = outer


class _Chunked:
    def forward(self, *args, **kwargs):
        d = self._vinf_dim
        args = list(args)
        # Each row argument's place: by name, else by position (``_vinf_pos``, from the
        # signature at class creation: nothing inspected while torch.compile traces).
        where = []
        for nm in self._vinf_rows:
            if nm in kwargs:
                where.append((kwargs, nm))
            elif self._vinf_pos.get(nm, len(args)) < len(args):
                where.append((args, self._vinf_pos[nm]))
        where = [(c, k) for c, k in where if isinstance(c[k], torch.Tensor)]
        base = super().forward
        if not where or not self._vinf_bytes:
            return base(*args, **kwargs)
        x = where[0][0][where[0][1]]
        n = x.shape[d]
        step = rows_per_chunk(x, d, self._vinf_bytes, self._vinf_factor)
        if step >= n:
            return base(*args, **kwargs)
        full = [(c, k, c[k]) for c, k in where if c[k].dim() > d and c[k].shape[d] == n]
        out = [None]

        def run(r0, r1):
            for c, k, t in full:
                c[k] = t.narrow(d, r0, r1 - r0)
            out[0] = _place(out[0], base(*args, **kwargs), d, n, r0, r1)
        # Rows along dim 0 are rows of the attention input: the engine learns which.
        over_rows(getattr(self, "_vinf_engine", None) if d == 0 else None, n, step, run)
        return out[0]


def _place(out, y, d: int, n: int, r0: int, r1: int):
    """Write chunk output ``y`` (a tensor, a tuple of them, or a diffusers output) into
    ``out``, allocated at the first chunk with ``n`` rows along ``d``."""
    if isinstance(y, torch.Tensor):
        if out is None:
            shape = list(y.shape)
            shape[d] = n
            out = y.new_empty(shape)
        out.narrow(d, r0, r1 - r0).copy_(y)
        return out
    if isinstance(y, tuple):
        return tuple(_place(None if out is None else o, v, d, n, r0, r1)
                     for o, v in zip(out or (None,) * len(y), y))
    # diffusers' BaseOutput: an ordered dict of tensors
    placed = {k: _place(None if out is None else out[k], v, d, n, r0, r1) for k, v in y.items()}
    return type(y)(**placed)


def chunked(cls: type) -> type:
    """``cls`` with its forward run over chunks of rows (see the module docstring)."""
    got = _CLASSES.get(cls)
    if got is None:
        got = _CLASSES[cls] = type(f"Chunked{cls.__name__}", (_Chunked, cls),
                                   {"_vinf_pos": _positions(cls.forward)})
    return got


def _positions(forward) -> dict:
    """``{name: index in *args}`` of ``forward``'s positional parameters (after ``self``)."""
    params = list(inspect.signature(forward).parameters.values())[1:]
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return {p.name: i for i, p in enumerate(params) if p.kind in kinds}
