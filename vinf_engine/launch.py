"""Run a function on several local ranks joined by torch.distributed (no torchrun needed).

For benchmarks, tests and notebooks. Under torchrun, call ``torch.distributed.init_process_group``
yourself instead.

``run_local`` spawns fresh ranks for one call. ``RankPool`` keeps its ranks (and their process
group) between calls: a spawned rank pays for importing torch, diffusers and the caller's
module (seconds on a small CPU), which a pool pays once. Each call starts from the state a
fresh rank has where it matters to a result: the caller's environment variables, torch's
default dtype, grad mode and thread count, and an empty compile cache; torch's generator is
reseeded with the rank's initial seed, so an unseeded draw repeats from call to call.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import tempfile
import traceback

__all__ = ["run_local", "RankPool"]


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


def _fresh_state(threads, seed, dtype, env):
    """What a just-spawned rank would hold: the parent's environment, torch's default dtype,
    grad mode and thread count, no compiled graphs; the generator at the rank's first seed."""
    import sys

    import torch
    os.environ.clear()
    os.environ.update(env)
    torch.manual_seed(seed)
    torch.set_default_dtype(dtype)
    torch.set_grad_enabled(True)
    if threads:
        torch.set_num_threads(threads)
    if "torch._dynamo" in sys.modules:
        import torch._dynamo
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()


def _pool_child(rank, world, backend, init_file, conn, timeout_s, threads):
    import torch
    import torch.distributed as dist
    seed, dtype = torch.initial_seed(), torch.get_default_dtype()
    try:
        if threads:
            torch.set_num_threads(threads)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
        conn.send(("ready", None))
    except BaseException as e:  # noqa: BLE001 - the parent reports it
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        return
    while True:
        try:
            call = conn.recv()             # unpickling fn imports its module, once per rank
        except EOFError:                   # the parent is gone
            break
        except BaseException as e:  # noqa: BLE001
            conn.send(("error", f"could not receive the call: {type(e).__name__}: {e}"))
            continue
        if call is None:
            break
        fn, args, env = call
        try:
            _fresh_state(threads, seed, dtype, env)
            result = ("ok", fn(rank, world, *args))
        except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
            result = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        try:
            conn.send(result)
        except BaseException as e:  # noqa: BLE001 - an unpicklable result
            conn.send(("error", f"could not send the result: {type(e).__name__}: {e}"))
    if dist.is_initialized():
        dist.destroy_process_group()


class RankPool:
    """``world`` spawned ranks joined by ``backend`` once, each call run on all of them.

    ``pool.run(fn, *args)`` returns ``[fn(r, world, *args) for r in ranks]`` as ``run_local``
    does, without spawning. A call in which any rank raises, dies or outlives ``timeout``
    closes the pool (its ranks may be stuck in a collective) and raises ``RuntimeError``
    with each failing rank's traceback; ``closed`` then says so and a new pool is needed.

    >>> with RankPool(2, threads=1) as pool:
    ...     pool.run(fn, x)
    ...     pool.run(fn, y)
    """

    def __init__(self, world: int, *, backend: str = "gloo", timeout: float = 600.0,
                 threads: int | None = None):
        ctx = mp.get_context("spawn")
        self.world, self.timeout = world, timeout
        self._tmp = tempfile.TemporaryDirectory()
        init = os.path.join(self._tmp.name, "init")
        pipes = [ctx.Pipe() for _ in range(world)]
        self._conns = [parent for parent, _ in pipes]
        self._procs = [ctx.Process(target=_pool_child, daemon=True,
                                   args=(r, world, backend, init, child, timeout, threads))
                       for r, (_, child) in enumerate(pipes)]
        for p in self._procs:
            p.start()
        for _, child in pipes:
            child.close()
        self.closed = False
        self._collect("start", timeout)

    def run(self, fn, *args, timeout: float | None = None) -> list:
        """``fn(rank, world, *args)`` on every rank; their results in rank order. The call
        fails if a rank outlives ``timeout`` (default: the pool's) by a minute."""
        if self.closed:
            raise RuntimeError("this RankPool is closed (a call failed or close() was called)")
        call = (fn, args, dict(os.environ))
        for conn in self._conns:
            conn.send(call)
        return self._collect(getattr(fn, "__name__", "the call"), timeout or self.timeout)

    def _collect(self, what: str, timeout: float) -> list:
        import time
        from multiprocessing.connection import wait
        deadline = time.monotonic() + timeout + 60
        pending, results, failures = set(range(self.world)), [None] * self.world, []
        while pending:
            left = deadline - time.monotonic()
            ready = wait([self._conns[r] for r in pending], timeout=max(left, 0))
            if not ready:
                failures += [f"rank {r} hung in {what}" for r in sorted(pending)]
                break
            for conn in ready:
                r = self._conns.index(conn)
                pending.discard(r)
                try:
                    status, value = conn.recv()
                except EOFError:
                    failures.append(f"rank {r} died in {what} "
                                    f"(exit code {self._procs[r].exitcode})")
                    continue
                if status == "error":
                    failures.append(f"rank {r} failed: {value}")
                results[r] = value
        if failures:
            self.close()
            raise RuntimeError("\n".join(sorted(failures)))
        return results

    def close(self) -> None:
        """End the ranks (politely, then by force) and remove the rendezvous file."""
        if self.closed:
            return
        self.closed = True
        for conn in self._conns:
            try:
                conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        for p in self._procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        for conn in self._conns:
            conn.close()
        self._tmp.cleanup()

    def __enter__(self) -> "RankPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if not getattr(self, "closed", True):
            self.close()
