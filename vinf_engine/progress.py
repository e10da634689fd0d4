"""Progress on rank 0 and the memory figure of the report."""
from __future__ import annotations

import resource
import sys

import torch

__all__ = ["Progress", "peak_memory_mib"]


def peak_memory_mib(device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024, "peak RSS of the process"


class Progress:
    """A tqdm bar on stderr, rank 0 only: steps, time left, frame-steps per second and what
    they make in finished video frames per second. ``note`` prints a line above it."""

    def __init__(self, enabled: bool, total: int, frames: int, done: int = 0):
        from tqdm.auto import tqdm
        self.enabled, self.frames, self.total = enabled, frames, total
        self.bar = tqdm(total=total, initial=done, desc="denoising", unit="step", file=sys.stderr,
                        disable=not enabled, dynamic_ncols=True, smoothing=0.3)

    def step(self, done: int, final: bool = False):
        if not self.enabled:
            return
        self.bar.update(done - self.bar.n)
        rate = self.bar.format_dict.get("rate")
        if rate:
            self.bar.set_postfix_str(f"{self.frames * rate:.2f} frame-steps/s = "
                                     f"{self.frames * rate / self.total:.3f} frames/s",
                                     refresh=final)
        if final:
            self.bar.close()

    def note(self, text: str):
        if self.enabled:
            self.bar.write(text, file=sys.stderr)
