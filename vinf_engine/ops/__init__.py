"""Operators that couple frames, each with its plain-PyTorch reference (the CPU path)."""
from .attention import dual_scope_attention, window_attention
from .group_norm import group_norm
from .merge import attention_with_lse, merge_attention
from .temporal_conv import temporal_conv

__all__ = ["dual_scope_attention", "window_attention", "group_norm", "temporal_conv",
           "attention_with_lse", "merge_attention"]
