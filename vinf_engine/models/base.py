"""What a model family must say to be parallelized, and the one way adapters patch a model.

An adapter names the model classes it serves and says what couples frames in them; it never
touches a model except through a ``Patcher``, which records the undo of every change, so that
``vinf_engine.unparallelize`` restores classes, processors, hooks and attributes exactly.
"""
from __future__ import annotations

import functools
import json
from typing import Callable, ClassVar, Protocol, runtime_checkable

import torch

from ..config import DualScopeConfig

__all__ = ["ModelAdapter", "AdapterBase", "Patcher", "config_fingerprint", "step_arguments"]


@runtime_checkable
class ModelAdapter(Protocol):
    """One model family (registered in ``vinf_engine.models``)."""

    name: ClassVar[str]                  # shown in errors and ``vinf_engine.models.families()``
    inputs: ClassVar[tuple]              # names of the forward's clip and timestep parameters
    comm_modes: ClassVar[tuple]          # the ``scheduler.MODES`` this family runs

    @classmethod
    def model_classes(cls) -> tuple:
        """The model classes served; subclasses resolve to the nearest along their MRO."""

    def check(self, model) -> str | None:
        """Why ``model`` cannot be parallelized, or None. Touches nothing."""

    def fingerprint(self, model) -> tuple:
        """Picklable identity of the model that every rank must share."""

    def default_config(self, model) -> DualScopeConfig:
        """The config ``parallelize(model)`` uses when given none."""

    def check_config(self, model, config: DualScopeConfig) -> str | None:
        """Why ``config`` does not suit ``model``, or None."""

    def patch(self, model, engine, patcher: "Patcher") -> None:
        """Replace what couples frames; ``engine.mode`` and ``engine.world_size`` are final."""


class AdapterBase:
    """What most adapters share: the fingerprint of a diffusers model, no config limits."""

    @staticmethod
    def fingerprint(model) -> tuple:
        return config_fingerprint(model)

    @staticmethod
    def check_config(model, config: DualScopeConfig) -> str | None:
        return None


class Patcher:
    """Changes to a model, each recorded with its undo on the engine (newest undone first)."""

    def __init__(self, engine):
        self.engine = engine

    def swap_class(self, module: torch.nn.Module, cls: type, **attrs):
        """Give ``module`` the class ``cls`` (a subclass of its own: same parameters, same
        ``state_dict``) and the instance attributes ``attrs``."""
        if not issubclass(cls, type(module)):
            raise TypeError(f"{cls.__name__} is not a subclass of {type(module).__name__}")
        old = module.__class__
        module.__class__ = cls
        for k, v in attrs.items():
            setattr(module, k, v)

        def undo():
            module.__class__ = old
            for k in attrs:
                module.__dict__.pop(k, None)
        self.engine.on_undo(undo)

    def set_processor(self, attn, processor):
        old = attn.processor
        attn.set_processor(processor)
        self.engine.on_undo(lambda: attn.set_processor(old))

    def pre_hook(self, module: torch.nn.Module, fn: Callable):
        """``fn(module, args, kwargs)`` before every call of ``module``."""
        handle = module.register_forward_pre_hook(fn, with_kwargs=True)
        self.engine.on_undo(handle.remove)

    def before_forward(self, module: torch.nn.Module, fn: Callable):
        """``fn(args, kwargs)`` first thing inside every ``module.forward`` call.

        Inside the forward, not a pre-hook: torch.compile traces a hook as a frame of its
        own, one graph more than the stock model, whose guards then see the engine's state
        between the two frames. Wraps whatever ``forward`` resolves to now (the class's, or
        an instance's own), keeping its signature (``inspect.signature`` follows
        ``__wrapped__``, as pipelines that probe the forward's parameters do)."""
        had = "forward" in module.__dict__
        inner = module.forward

        @functools.wraps(inner)
        def forward(*args, **kwargs):
            fn(args, kwargs)
            return inner(*args, **kwargs)
        module.forward = forward

        def undo():
            if had:
                module.forward = inner
            else:
                module.__dict__.pop("forward", None)
        self.engine.on_undo(undo)

    def post_hook(self, module: torch.nn.Module, fn: Callable):
        handle = module.register_forward_hook(fn)
        self.engine.on_undo(handle.remove)

    def chunk(self, module: torch.nn.Module, rows: tuple, dim: int, factor: float):
        """Run ``module`` over chunks of the rows (dim ``dim`` of its arguments ``rows``)
        within the engine's memory budget (``layers.chunked``); nothing when unbudgeted."""
        from ..layers.chunked import chunked
        if not self.engine.chunk_bytes:
            return
        self.swap_class(module, chunked(type(module)), _vinf_rows=rows, _vinf_dim=dim,
                        _vinf_bytes=self.engine.chunk_bytes, _vinf_factor=factor,
                        _vinf_engine=self.engine)

    def flush_after(self, modules):
        """Stale-mode batch boundaries: the scheduler posts what it set aside after each of
        ``modules`` runs (no-op in the other modes). Every rank runs the same modules, so
        every rank flushes at the same points."""
        for m in modules:
            if m is not None:
                self.post_hook(m, lambda *_: self.engine.scheduler.flush())


def step_arguments(args: tuple, kwargs: dict, names: tuple) -> list:
    """The values of the parameters ``names`` (in signature order, positional or keyword) of a
    forward call, None where absent."""
    return [kwargs[n] if n in kwargs else (args[i] if len(args) > i else None)
            for i, n in enumerate(names)]


def config_fingerprint(model) -> tuple:
    """Class, public config, parameter count and dtype: what every rank's copy must share."""
    cfg = json.dumps({k: v for k, v in dict(model.config).items() if not k.startswith("_")},
                     sort_keys=True, default=str)
    params = sum(p.numel() for p in model.parameters())
    return type(model).__name__, cfg, params, str(next(model.parameters()).dtype)
