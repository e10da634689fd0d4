"""How each exchange of a denoising step moves: the engine's communication modes.

    overlap   (default) exchanges are posted asynchronously as soon as their input exists and
              waited for only where their result is needed; the attention of query frames
              whose window needs no halo runs meanwhile (see models/unet3d.py). Exact.
    blocking  the published prototype's pattern: one blocking transfer per tensor and peer,
              a device synchronisation after each. Exact; kept as the side-by-side baseline.
    stale     DistriFusion-style: halos and global context come from the previous denoising
              step, GroupNorm statistics are the other ranks' partials from the previous step
              plus this rank's fresh ones. This step's exchanges are set aside and posted in
              one batch per block of the model (``flush``, ~10 launches per UNet step), each
              with nearly a whole step to arrive. Nothing waits on a peer after the first
              step; the output drifts from exact (the benchmark reports how far). Off by
              default.
    loopback  exchanges replaced by local copies of the same size: for timing only (the
              output is wrong), it gives the step time with communication removed, from which
              the benchmark derives the exposed communication time of the other modes.

The scheduler relies on the process group's own communication stream (ProcessGroupNCCL's):
posting an exchange enqueues it there behind the compute that produced its input, and
``Pending.wait`` makes the compute stream wait on it, so no mode except ``blocking`` ever
synchronises the host with the device.
"""
from __future__ import annotations

import time

import torch

from .comm import ClipComm, Pending, eager_across_ranks, frame_plan, rank_sum
from .layout import ClipLayout

_SEVERAL = eager_across_ranks(lambda self: self.comm.world_size > 1)

__all__ = ["CommScheduler", "MODES"]

MODES = ("overlap", "blocking", "stale", "loopback")


class CommScheduler:
    """Moves one step's exchanges according to ``mode``; owns the stale state of ``stale``."""

    def __init__(self, comm: ClipComm, mode: str = "overlap"):
        if mode not in MODES:
            raise ValueError(f"comm_mode must be one of {MODES}, got {mode!r}")
        self.comm, self.mode = comm, mode
        self._layout: ClipLayout | None = None
        self._seq = 0
        self._stale: dict = {}
        self._deferred: list = []  # stale: (key, Outgoing) set aside until the next flush
        self.record = False      # when True, ``log`` gets one entry per exchange (see below)
        self.log: list[dict] = []

    def _tracked(self, pending: Pending, kind: str, device: torch.device, before: tuple,
                 frames: int = 0, sums_bytes: int = 0) -> Pending:
        """Log an exchange: its kind, bytes, frames, and the compute window between posting
        it and waiting for it (wall clock on CPU, CUDA events on GPUs; ``window_ms``)."""
        if not self.record:
            return pending
        c = self.comm.counters
        entry = dict(kind=kind, frames=frames, sums_bytes=sums_bytes,
                     launches=c.collectives - before[0],
                     bytes_sent=c.bytes_sent - before[1], bytes_received=c.bytes_received - before[2])
        cuda = device.type == "cuda"
        if cuda:
            entry["_ev"] = [torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)]
            entry["_ev"][0].record()
        else:
            entry["_t0"] = time.perf_counter()
        self.log.append(entry)
        inner = pending.wait

        def wait():
            if "_t1" not in entry and "_waited" not in entry:
                if cuda:
                    entry["_ev"][1].record()
                else:
                    entry["_t1"] = time.perf_counter()
                entry["_waited"] = True
            return inner()
        pending.wait = wait
        return pending

    def take_log(self) -> list[dict]:
        """The logged exchanges since the last call, with ``window_ms`` resolved."""
        out = []
        for e in self.log:
            e = dict(e)
            if "_ev" in e:
                e["_ev"][1].synchronize()
                e["window_ms"] = e["_ev"][0].elapsed_time(e["_ev"][1])
            else:
                e["window_ms"] = (e.get("_t1", e["_t0"]) - e["_t0"]) * 1e3
            for k in ("_ev", "_t0", "_t1", "_waited"):
                e.pop(k, None)
            out.append(e)
        self.log = []
        return out

    def _counters(self) -> tuple:
        c = self.comm.counters
        return c.collectives, c.bytes_sent, c.bytes_received

    @_SEVERAL
    def begin_step(self, layout: ClipLayout):
        """Exchanges are numbered in call order within a step; ``stale`` pairs exchange ``i``
        of this step with exchange ``i`` of the previous one (same layer, same shape).
        One process keeps no state from step to step (nothing is stale there); nor may it:
        a torch.compile guard on the previous step's layout would recompile the second step."""
        if self.comm.world_size == 1:
            return
        self._seq = 0
        if layout != self._layout:
            # Transfers still in flight finish before their buffers can be let go (a device
            # backend may still be reading or writing them); every rank posted them alike.
            self.close()
            self._layout = layout
        else:
            self.flush()          # what the previous step set aside and did not flush yet

    @_SEVERAL
    def close(self, quiet: bool = False):
        """Let go of the stale state, after its transfers in flight have finished (``quiet``:
        a transfer that failed, say because a peer died, is let go too, not raised)."""
        for prev in self._stale.values():
            try:
                prev.pending.wait()
            except RuntimeError:
                if not quiet:
                    raise
        self._stale.clear()
        self._deferred.clear()
        self._layout = None

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    @_SEVERAL
    def frames(self, x: torch.Tensor, dim: int, layout: ClipLayout, wants: tuple,
               what: str, sums: torch.Tensor | None = None) -> Pending:
        """Frames ``wants[rank]`` of the distributed video, as a ``Pending``; with ``sums``,
        ``(frames, sum of sums over the ranks)`` moved together (``ClipComm.post_frames``)."""
        before = self._counters()
        plan = frame_plan(layout, self.comm.rank, wants)
        remote = plan.n_out - len(plan.local_pos)
        # sums_bytes: what of bytes_received is ``sums`` (one copy from each peer)
        sums_bytes = 0 if sums is None else sums.numel() * sums.element_size() * (self.comm.world_size - 1)
        return self._tracked(self._frames(x, dim, layout, wants, what, sums), what, x.device,
                             before, remote, sums_bytes)

    def _frames(self, x, dim, layout, wants, what, sums) -> Pending:
        if self.mode == "overlap" or self.comm.world_size == 1:
            return self.comm.post_frames(x, dim, layout, wants, what, sums=sums)
        if self.mode == "blocking":
            # The published pattern moves them apart: frames, then a blocking all-reduce.
            out = self.comm.blocking_frames(x, dim, layout, wants, what)
            if sums is None:
                return Pending.ready(out)
            return Pending.ready((out, self._all_reduce(sums.clone(), what).wait()))
        plan = frame_plan(layout, self.comm.rank, wants)
        if self.mode == "loopback":
            n = x.shape[dim]
            idx = self.comm._index(tuple(i % n for i in range(plan.n_out)), x.device)
            out = x.index_select(dim, idx)
            return Pending.ready(out if sums is None else (out, sums.clone()))
        # stale
        key = ("frames", self._next())
        prev = self._stale.get(key)
        if prev is None:                      # first step: nothing older to use
            live = self.comm.post_frames(x, dim, layout, wants, what, sums=sums)
            self._stale[key] = _Previous(live, own=None if sums is None else sums.clone(),
                                         frames=True)
            return live
        frames, total = prev.get()
        self._defer(key, self.comm.prepare(x, dim, layout, wants, sums))
        # Remote frames from the previous step; own frames and own partials are always fresh.
        frames = self.comm.fill_local(frames.clone(), x, dim, plan)
        return Pending.ready(frames if sums is None else (frames, total(sums)))

    @_SEVERAL
    def all_reduce(self, t: torch.Tensor, what: str) -> Pending:
        """The sum of ``t`` over the ranks, as a ``Pending`` (``t`` may be reduced in place:
        use the waited result, not ``t``)."""
        before = self._counters()
        return self._tracked(self._all_reduce(t, what), what, t.device, before)

    def _all_reduce(self, t, what) -> Pending:
        if self.mode == "overlap" or self.comm.world_size == 1:
            return self.comm.post_all_reduce(t, what)
        if self.mode == "blocking":
            out = self.comm.post_all_reduce(t, what).wait()
            self.comm.device_sync(t.device)
            return Pending.ready(out)
        if self.mode == "loopback":
            return Pending.ready(t.clone())
        # stale: the other ranks' shares from the previous step, this rank's fresh.
        key = ("sum", self._next())
        prev = self._stale.get(key)
        if prev is None:
            own = t.clone()                           # before the in-place all-reduce
            live = self.comm.post_all_reduce(t, what)
            self._stale[key] = _Previous(live, own=own, frames=False)
            return live
        _, total = prev.get()
        self._defer(key, self.comm.prepare(None, 0, None, None, t))
        return Pending.ready(total(t))

    # ---------------------------------------------------------------- stale batching
    def _defer(self, key, outgoing):
        self._deferred.append((key, outgoing))

    @_SEVERAL
    def flush(self):
        """Post every exchange ``stale`` set aside since the last flush, as ONE launch; the
        next step reads their results. The model adapter calls this at the end of each
        block of the model (and a step's end flushes what is left), so that each batch has
        nearly a whole step to arrive. Collective in ``stale`` mode: every rank flushes at
        the same points. Nothing to do in the other modes."""
        if not self._deferred:
            return
        items, self._deferred = self._deferred, []
        before = self._counters()
        pending = self.comm.post_batch([o for _, o in items], "stale exchange batch")
        for i, (key, _) in enumerate(items):
            self._stale[key] = _Previous(pending, index=i)
        self._tracked(pending, f"stale exchange batch ({len(items)} exchanges)",
                      items[0][1].device, before)


class _Previous:
    """One exchange's result from the previous step, for ``stale``: ``get()`` gives
    ``(frames, total)``, the other ranks' frames (own positions for the caller to fill) and
    a function of this rank's fresh partial sums that adds the other ranks' previous ones."""

    def __init__(self, pending: Pending, index: int | None = None, own=None,
                 frames: bool = True):
        self.pending, self.index, self.own, self.frames = pending, index, own, frames

    def get(self):
        got = self.pending.wait()
        if self.index is not None:                       # from a batch: every rank's part
            frames, parts = got[self.index]
            return frames, lambda fresh: rank_sum(parts, fresh)
        if not self.frames:                              # a live all-reduce: the total
            return None, lambda fresh: got - self.own + fresh
        if self.own is None:                             # live frames
            return got, None
        frames, total = got                              # live frames with sums
        return frames, lambda fresh: total - self.own + fresh
