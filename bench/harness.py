"""What the benchmark scripts share, so that they import this instead of each other: output
paths, the environment block of a report, rows written to JSON as soon as they are measured,
spawned ranks whose failure becomes an error row, peak memory, and a fixed-width table.

A script reads as parse -> measure -> report; these are the pieces of each that would
otherwise be copied from script to script. Plain functions and one small class.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------------------ setup
def out_path(name: str) -> str:
    """The default place of a report: ``bench/out/<name>``."""
    return os.path.join(BENCH, "out", name)


def parse_hw(text: str, even: bool = False) -> tuple:
    """'8x8' -> (8, 8); ValueError unless two positive sizes (with ``even``: even sizes, for
    a patch of 2)."""
    try:
        hw = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(text) from None
    if len(hw) != 2 or min(hw) < (2 if even else 1) or (even and (hw[0] % 2 or hw[1] % 2)):
        raise ValueError(text)
    return hw


def environment(device: str, cpu_model: bool = False) -> dict:
    """The block every report opens with: when, on what hardware, with which torch."""
    env = dict(date=time.strftime("%Y-%m-%d"), device=device,
               gpu=torch.cuda.get_device_name() if device == "cuda" else None,
               cpu=platform.processor() or platform.machine())
    if cpu_model:
        env["cpu_model"] = _cpu_model()
    env.update(cores=os.cpu_count() or 1, torch=torch.__version__)
    return env


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), None)
    except OSError:
        return None


# ------------------------------------------------------------------------------ run
def spawn(fn, world: int, *args, label: str, backend: str = "gloo", threads=None,
          timeout: float = 3600.0, keep: int = 500):
    """``run_local(fn, world, *args)``: ``(results, None)``, or ``(None, error)`` when a rank
    failed, ``error`` being "out of memory" (a result at that size, not a bug) or the last
    ``keep`` characters of the failure. Says which on stdout, the failure's tail on stderr."""
    from vinf_engine.launch import run_local
    try:
        return run_local(fn, world, *args, backend=backend, threads=threads,
                         timeout=timeout), None
    except RuntimeError as e:
        oom = "out of memory" in str(e).lower()
        print(f"  {label}: {'out of memory' if oom else 'FAILED'}", flush=True)
        if not oom:
            print(str(e)[-2000:], file=sys.stderr, flush=True)
        return None, "out of memory" if oom else str(e)[-keep:]


def sync(device, world: int):
    """Wait for the device and for every rank: the edge of a timed region."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if world > 1:
        torch.distributed.barrier()


def rel_diff(a, b) -> float:
    """max |a - b| / max |b|."""
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------------------ memory
def rss_kib(field: str) -> int:
    """A field of /proc/self/status in KiB: "VmRSS:" (resident now), "VmHWM:" (its peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def peak_memory_mib(device) -> float:
    """The peak so far: the allocator's on GPUs, the process's RSS on CPUs."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # peak RSS, KiB on Linux


def reset_peak_memory(device) -> bool:
    """Start a new peak: the allocator's on GPUs; on Linux CPUs the process's peak RSS
    (writing 5 to /proc/self/clear_refs resets VmHWM, which ru_maxrss reads). Returns False
    where the CPU peak cannot be reset (then it is the process's peak so far)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Peak:
    """Peak bytes above what is held at entry (``before``): the device's allocator, or the
    process RSS; ``bytes`` once the block has ended."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            reset_peak_memory(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:      # must reset: no fallback
                f.write("5")
            self.before = rss_kib("VmRSS:") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = rss_kib("VmHWM:") * 1024
        self.bytes = max(0, peak - self.before)
        return False


# ------------------------------------------------------------------------------ report
def write_json(path: str, obj):
    """Write ``obj`` to ``path`` atomically: a reader never sees half a report."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def append_row(path: str, row: dict):
    """Add ``row`` to the JSON report at ``path`` at once (for rows measured in another
    process than the one that holds the report)."""
    with open(path) as f:
        report = json.load(f)
    report["rows"].append(row)
    write_json(path, report)


class Rows:
    """A report whose ``rows`` go to disk as soon as they are measured: a run cut short keeps
    them. ``report`` is the JSON written each time (its "rows" list is ``self.rows``)."""

    def __init__(self, path: str, report: dict):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path, self.report = path, report
        self.rows = report.setdefault("rows", [])

    def add(self, *rows):
        self.rows.extend(rows)
        self.save()

    def save(self):
        write_json(self.path, self.report)


def fmt(v, spec: str) -> str:
    """``v`` formatted, or "-" where there is none."""
    return "-" if v is None else format(v, spec)


def print_table(columns, rows, gap: str = "", rule: bool = True, suffix: str = ""):
    """``columns``: (title, width) pairs, the first left-aligned, the others right-aligned;
    ``rows``: lists of formatted cells. A row with fewer cells than columns ends in free text
    (an error, a reason), two spaces after its other cells."""
    def line(cells):
        n = len(cells) if len(cells) == len(columns) else len(cells) - 1
        text = gap.join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, (_, w)) in enumerate(zip(cells[:n], columns)))
        return text + (gap + "  " + cells[-1] if n < len(cells) else "")
    head = line([title for title, _ in columns]) + suffix
    print(head)
    if rule:
        print("-" * len(head))
    for cells in rows:
        print(line(cells))
