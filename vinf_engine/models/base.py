"""What a model family must say to be parallelized, and the one way adapters patch a model.

An adapter names the model classes it serves and says what couples frames in them; it never
touches a model except through a ``Patcher``, which records the undo of every change, so that
``vinf_engine.unparallelize`` restores classes, processors, hooks and attributes exactly.
"""
from __future__ import annotations

import functools
import json
import warnings
from typing import Callable, ClassVar, Protocol, runtime_checkable

import torch

from ..config import DualScopeConfig

__all__ = ["ModelAdapter", "AdapterBase", "Patcher", "EngineProcessor", "PLAIN_PROCESSORS",
           "processor_problem", "config_fingerprint", "step_arguments"]


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


class EngineProcessor:
    """An attention processor the engine installs on an attention that couples frames.
    ``requested``: what diffusers' attention-processor API last asked that attention for (a
    processor of the same math, which the engine's own computes; ``PLAIN_PROCESSORS``)."""

    requested = None


# Processors whose math is the module's own softmax attention over its own projections, in
# another kernel or memory pattern: asked of an attention the engine owns, the engine's
# processor (which computes that attention, dual-scoped) stays.
PLAIN_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor",
                    "SlicedAttnProcessor", "FusedAttnProcessor2_0", "AttnProcessorNPU",
                    "XLAFlashAttnProcessor2_0", "WanAttnProcessor", "WanAttnProcessor2_0",
                    "SkyReelsV2AttnProcessor")


def processor_problem(processor) -> str | None:
    """Why ``processor`` cannot stand for an attention the engine owns, or None."""
    name = type(processor).__name__
    if name in PLAIN_PROCESSORS and type(processor).__module__.startswith("diffusers."):
        return None
    return (f"{name} is not a processor of plain softmax attention ({', '.join(PLAIN_PROCESSORS)}): "
            "on an attention that couples frames it would drop the frame coupling of the "
            "parallelized model and tear the video at every clip boundary")


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

    def set_processor(self, attn, processor: "EngineProcessor"):
        """Give ``attn`` the engine's ``processor``, and make the attention-processor API keep
        it (``attn.set_processor``, hence diffusers' ``set_attn_processor``, attention slicing,
        xformers, fused projections): asked for another processor of the same math (softmax
        attention of the module's own projections, ``PLAIN_PROCESSORS``), the engine's stays,
        recording it as ``requested``; any other is refused, since it would drop the frame
        coupling and tear the video at every clip boundary."""
        old = attn.processor
        stock_set = attn.set_processor
        stock_set(processor)

        def set_processor(new):
            if isinstance(new, EngineProcessor):
                stock_set(new)
                return
            why = processor_problem(new)
            if why:
                raise ValueError(f"{why}; call vinf_engine.unparallelize_pipe(pipe) (or "
                                 "unparallelize(model)) first")
            current = attn.processor
            if isinstance(current, EngineProcessor):
                current.requested = new
        attn.set_processor = set_processor

        def undo():
            attn.__dict__.pop("set_processor", None)
            attn.set_processor(old)
        self.engine.on_undo(undo)

    def guard_attention_api(self, model: torch.nn.Module):
        """Model-level calls that would change what the engine patched: ``set_attn_processor``
        checks every attention the engine owns before it changes any (nothing half-set);
        ``set_default_attn_processor`` (UNet3D) takes the stock rule over the processors the
        engine does not own; ``enable_cache`` (diffusers' step caches, decided per rank: a
        hang or a torn video across ranks) is refused."""
        owned = {f"{n}.processor" for n, m in model.named_modules()
                 if isinstance(getattr(m, "processor", None), EngineProcessor)}
        stock_set = model.set_attn_processor if hasattr(model, "set_attn_processor") else None

        def set_attn_processor(processor):
            asked = (processor.items() if isinstance(processor, dict)
                     else ((name, processor) for name in owned))
            for name, p in asked:
                if name in owned and not isinstance(p, EngineProcessor):
                    why = processor_problem(p)
                    if why:
                        raise ValueError(f"{name}: {why}; call vinf_engine.unparallelize_pipe("
                                         "pipe) (or unparallelize(model)) first")
            stock_set(dict(processor) if isinstance(processor, dict) else processor)

        def set_default_attn_processor():
            from diffusers.models.attention_processor import (
                ADDED_KV_ATTENTION_PROCESSORS, CROSS_ATTENTION_PROCESSORS, AttnAddedKVProcessor,
                AttnProcessor)
            rest = [p for name, p in model.attn_processors.items() if name not in owned]
            if all(type(p) in ADDED_KV_ATTENTION_PROCESSORS for p in rest):
                set_attn_processor(AttnAddedKVProcessor())
            elif all(type(p) in CROSS_ATTENTION_PROCESSORS for p in rest):
                set_attn_processor(AttnProcessor())
            else:
                raise ValueError("Cannot call `set_default_attn_processor` when attention "
                                 f"processors are of type {type(rest[0]).__name__}")

        def enable_cache(*args, **kwargs):
            raise ValueError(
                f"{type(model).__name__}.enable_cache: diffusers' step caches decide per rank "
                "whether to skip, which under clip parallelism hangs the next exchange or tears "
                "the video; call vinf_engine.unparallelize_pipe(pipe) (or unparallelize(model)) "
                "first")
        methods = dict(set_attn_processor=set_attn_processor)
        if stock_set is None:
            methods = {}
        if hasattr(model, "set_default_attn_processor"):
            methods["set_default_attn_processor"] = set_default_attn_processor
        if hasattr(model, "enable_cache"):
            methods["enable_cache"] = enable_cache
        for name, fn in methods.items():
            setattr(model, name, fn)
        self.engine.on_undo(lambda: [model.__dict__.pop(n, None) for n in methods])

    def pre_hook(self, module: torch.nn.Module, fn: Callable):
        """``fn(module, args, kwargs)`` before every call of ``module``."""
        handle = module.register_forward_pre_hook(fn, with_kwargs=True)
        self.engine.on_undo(handle.remove)

    def replace_method(self, module: torch.nn.Module, name: str, make: Callable):
        """Set ``module.<name>`` (an instance attribute) to ``make(inner)``, ``inner`` being
        what ``module.<name>`` resolves to now (the class's method or an instance's own),
        keeping its signature (``inspect.signature`` follows ``__wrapped__``). Undone, it is
        removed; if something has wrapped it since (accelerate's offload hooks replace a
        module's ``forward`` the same way), it stays in that chain as a pass-through to
        ``inner``, so neither wrapper is lost."""
        had = name in module.__dict__
        inner = getattr(module, name, None)         # None: a hook the class looks up
        replacement = make(inner)
        live = [True]

        def method(*args, **kwargs):
            return (replacement if live[0] else inner)(*args, **kwargs)
        if inner is not None:
            method = functools.wraps(inner)(method)
        setattr(module, name, method)

        def undo():
            live[0] = False
            if module.__dict__.get(name) is method:
                if had:
                    setattr(module, name, inner)
                else:
                    module.__dict__.pop(name, None)
        self.engine.on_undo(undo)

    def before_forward(self, module: torch.nn.Module, fn: Callable):
        """``fn(args, kwargs)`` first thing inside every ``module.forward`` call.

        Inside the forward, not a pre-hook: torch.compile traces a hook as a frame of its
        own, one graph more than the stock model, whose guards then see the engine's state
        between the two frames."""
        def make(inner):
            def forward(*args, **kwargs):
                fn(args, kwargs)
                return inner(*args, **kwargs)
            return forward
        self.replace_method(module, "forward", make)

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


# -- the trained range: one wording for every family ---------------------------------------------
def window_past_trained_range(window: int, num_frames: int, trained: int,
                              unit: str = "latent") -> str | None:
    """Why a local ``window`` on a video of ``num_frames`` ``unit`` frames reaches past a model
    trained on ``trained`` of them, or None: what the generation pipeline refuses."""
    w = min(window, num_frames - 1)
    if w > trained - 1:
        return (f"window {w} reaches past the trained range: the model was trained on {trained} "
                f"{unit} frames (relative distances up to {trained - 1}); use a window <= "
                f"{trained - 1}, or give trained_frames if it was trained longer")
    return None


def warn_past_trained_range(model, window: int, num_frames: int, trained: int, warned: set,
                            unit: str = "latent"):
    """Warn once per video length that the window reaches past the trained range (what a
    direct ``parallelize`` user gets instead of the pipeline's refusal). Not under
    torch.compile: ``warned`` is state across calls, whose guard would recompile the step
    once it has warned."""
    w = min(window, num_frames - 1)
    if w > trained - 1 and not torch.compiler.is_compiling() and num_frames not in warned:
        warned.add(num_frames)
        warnings.warn(f"dual-scope window {w} reaches past the trained range: "
                      f"{type(model).__name__} was trained on {trained} {unit} frames "
                      f"(relative distances up to {trained - 1})", stacklevel=4)
