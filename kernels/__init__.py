"""Triton kernels of vinf_engine (installed as ``vinf_engine.kernels``)."""
