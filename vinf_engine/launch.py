"""Run a function on several local ranks joined by torch.distributed (no torchrun needed).

For benchmarks, tests and notebooks. Under torchrun, call ``torch.distributed.init_process_group``
yourself instead.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import tempfile
import traceback

__all__ = ["run_local"]


def _child(rank, world, backend, init_file, out_file, timeout_s, threads, fn, args):
    import torch
    import torch.distributed as dist
    if threads:
        torch.set_num_threads(threads)
    result = None
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
        result = ("ok", fn(rank, world, *args))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        result = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    finally:
        with open(out_file + ".tmp", "wb") as f:
            pickle.dump(result, f)
        os.replace(out_file + ".tmp", out_file)
        if dist.is_initialized():
            dist.destroy_process_group()


def run_local(fn, world: int, *args, backend: str = "gloo", timeout: float = 600.0,
              threads: int | None = None) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` spawned processes; return their results.

    ``fn`` must be importable by name (a module-level function). A rank that raises makes
    this raise ``RuntimeError`` with that rank's traceback; ranks still running after
    ``timeout`` seconds are killed and reported. ``threads`` sets torch's intra-op threads
    per rank (default: torch's own choice).
    """
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "init")
        outs = [os.path.join(tmp, f"rank{r}.pkl") for r in range(world)]
        procs = [ctx.Process(target=_child, args=(r, world, backend, init, outs[r], timeout,
                                                  threads, fn, args)) for r in range(world)]
        for p in procs:
            p.start()
        deadline = timeout + 60
        for p in procs:
            p.join(deadline)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        failures, results = [], []
        for r, path in enumerate(outs):
            if not os.path.exists(path):
                failures.append(f"rank {r} " + ("hung" if r in hung else
                                                f"died (exit code {procs[r].exitcode})"))
                continue
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status != "ok":
                failures.append(f"rank {r} failed: {value}")
            results.append(value)
        if failures:
            raise RuntimeError("\n".join(failures))
        return results
