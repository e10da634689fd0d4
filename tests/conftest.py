import os

import torch

# Triton kernels run in its CPU interpreter where there is no GPU; must precede any triton import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sys

# Spawned ranks import the helpers by module name; keep tests/ importable for them too.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")


import pytest  # noqa: E402


@pytest.fixture
def threads(request):
    """Run the test with ``request.param`` intra-op threads (parametrize it ``indirect``):
    a kernel the CPU's math library picks by shape and thread count shows up at 1 and at 2."""
    n = getattr(request, "param", 1)
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    yield n
    torch.set_num_threads(before)
