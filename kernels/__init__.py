"""Triton kernels of vinf_engine (installed as ``vinf_engine.kernels``).

Importing the package registers the ``triton`` backend of each op with
``vinf_engine.ops.dispatch`` (see ``register.py``); the dispatcher imports it on first use.
``python -m vinf_engine.kernels.compile_check`` compiles every kernel for a GPU without one.
"""
# From the repository root this directory is also importable as a top-level ``kernels``, and
# transformers imports any package of that name to read its version. Only the installed name
# loads and registers the kernels: a second copy would replace the registered functions, and
# its @triton.jit functions could predate TRITON_INTERPRET.
if __name__ == "vinf_engine.kernels":
    from .register import (attention_with_lse, dual_scope_attention, group_norm_apply,
                           group_norm_partials)

    __all__ = ["dual_scope_attention", "attention_with_lse", "group_norm_partials",
               "group_norm_apply"]
