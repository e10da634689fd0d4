"""Progress on rank 0 and the memory figure of the report."""
from __future__ import annotations

import datetime
import math
import resource
import sys
import time

import torch

__all__ = ["Progress", "peak_memory_mib"]


def peak_memory_mib(device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024, "peak RSS of the process"


class Progress:
    """One line on stderr, rank 0 only: step, frame-steps per second, time left."""

    def __init__(self, enabled: bool, total: int, frames: int, done: int = 0):
        self.enabled, self.total, self.frames, self.done0 = enabled, total, frames, done
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def step(self, done: int, final: bool = False):
        if not self.enabled:
            return
        now = time.perf_counter()
        if not (final or self.tty or now - self.last >= 2.0 or done == self.done0 + 1):
            return
        self.last = now
        dt = now - self.t0
        n = done - self.done0
        rate = self.frames * n / dt if dt > 0 and n else 0.0
        left = (self.total - done) * dt / n if n else float("nan")
        eta = str(datetime.timedelta(seconds=round(left))) if math.isfinite(left) else "?"
        line = (f"denoising: step {done}/{self.total} | {self.frames} frames | "
                f"{rate:.2f} frame-steps/s = {rate / self.total:.3f} frames/s | "
                f"elapsed {datetime.timedelta(seconds=round(dt))} | left {eta}")
        end = "\n" if (final or not self.tty) else ""
        print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)

    def note(self, text: str):
        if self.enabled:
            print(text, file=sys.stderr, flush=True)
