"""Model adapters: from a model class to the operators that couple its frames."""
from __future__ import annotations


def adapter_for(model):
    """The adapter that can parallelize ``model``, or a string saying why none can."""
    from .unet3d import UNet3DAdapter
    return UNet3DAdapter.check(model) or UNet3DAdapter()
