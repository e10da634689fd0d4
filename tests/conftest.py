import os

import torch

# Triton kernels run in its CPU interpreter where there is no GPU; must precede any triton import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sys

# Spawned ranks import the helpers by module name; keep tests/ importable for them too.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")
