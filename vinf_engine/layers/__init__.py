"""Family-agnostic replacement operators: what every model family's adapter patches in.

    attention.py      dual-scope attention over one rank's clip, for any tokens per frame
                      (UNet temporal attention: 1; DiT 3-D attention: h*w)
    group_norm.py     GroupNorm whose statistics span every rank's frames
    temporal_conv.py  a stack of temporal convolutions with one halo of its receptive field
"""
from .attention import ContextSlot, blocking_clip_attention, clip_attention
from .group_norm import ClipGroupNorm
from .temporal_conv import BlockingTemporalConvLayer, ClipTemporalConvLayer, conv_stack

__all__ = ["clip_attention", "blocking_clip_attention", "ContextSlot", "ClipGroupNorm",
           "ClipTemporalConvLayer", "BlockingTemporalConvLayer", "conv_stack"]
