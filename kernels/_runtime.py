"""What every kernel launcher asks of its inputs: where it can run and which dtypes it takes."""
from __future__ import annotations

import os

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def why_not_tensor(name: str, t: torch.Tensor) -> str | None:
    """Why a Triton kernel cannot read ``t``, or None. The reason names the argument."""
    if t.dtype not in KERNEL_DTYPES:
        return f"{name} has dtype {t.dtype}; the Triton kernels take float16, bfloat16, float32"
    if t.device.type == "cuda":
        return None
    if t.device.type != "cpu" or not interpreting():
        return (f"{name} is on {t.device}; the Triton kernels need a CUDA tensor "
                "(or a CPU tensor with TRITON_INTERPRET=1)")
    if t.dtype == torch.bfloat16:
        return f"{name} is bfloat16, which the Triton CPU interpreter cannot compute"
    return None


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; a small stand-in under the interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2
