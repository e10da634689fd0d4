"""Model families: from a model's class to the adapter that says what couples its frames.

One family, one file; each registers its adapter here. ``adapter_for`` walks the model's class
MRO and takes the nearest registered class, so a subclass (VideoCrafter2's UNet) finds its
base family. A new family is a new file and one line in ``_FAMILY_MODULES``: neither the
engine nor the generation pipeline changes.
"""
from __future__ import annotations

import importlib

from .base import ModelAdapter, Patcher

__all__ = ["ModelAdapter", "Patcher", "register", "adapter_for", "adapter_class", "families"]

# Imported on first use: each module imports its diffusers classes and calls ``register``.
_FAMILY_MODULES = ("vinf_engine.models.unet3d", "vinf_engine.models.wan",
                  "vinf_engine.models.cogvideox", "vinf_engine.models.ltx",
                  "vinf_engine.models.hunyuan_video", "vinf_engine.models.hunyuan_video15",
                  "vinf_engine.models.skyreels_v2")

_REGISTRY: dict = {}           # model class -> adapter class
_LOADED = False


def register(adapter_cls):
    """Register ``adapter_cls`` for every class of its ``model_classes()``; usable as a class
    decorator. A class already claimed by another family is an error."""
    for cls in adapter_cls.model_classes():
        other = _REGISTRY.get(cls)
        if other is not None and other is not adapter_cls:
            raise ValueError(f"{cls.__name__} is already served by the {other.name} family")
        _REGISTRY[cls] = adapter_cls
    return adapter_cls


def _load():
    global _LOADED
    if not _LOADED:
        for name in _FAMILY_MODULES:
            importlib.import_module(name)
        _LOADED = True


def families() -> dict:
    """Family name -> the model class names it serves, by name (whatever the import order)."""
    _load()
    out: dict = {}
    for cls, adapter in sorted(_REGISTRY.items(), key=lambda kv: (kv[1].name, kv[0].__name__)):
        out.setdefault(adapter.name, []).append(cls.__name__)
    return out


def adapter_class(model):
    """The adapter class registered for ``model``'s class (the nearest in its MRO), or None;
    unchecked (``adapter_for`` checks)."""
    _load()
    for cls in type(model).__mro__:
        adapter_cls = _REGISTRY.get(cls)
        if adapter_cls is not None:
            return adapter_cls
    return None


def adapter_for(model):
    """The adapter that can parallelize ``model``, or a string saying why none can."""
    adapter_cls = adapter_class(model)
    if adapter_cls is not None:
        adapter = adapter_cls()
        return adapter.check(model) or adapter
    known = "; ".join(f"{name} ({', '.join(classes)})" for name, classes in families().items())
    return (f"vinf_engine.parallelize has no model family for {type(model).__name__}; "
            f"registered families: {known}")
