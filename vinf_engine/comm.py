"""Communication for clip parallelism: one object owns the process group and its counters.

Data plane (the group given by the user; NCCL on GPUs, gloo on CPUs): frame exchanges as one
batch of point-to-point transfers, all-reduces of GroupNorm statistics, or both in one batch
(the statistics' partial sums packed with the frames), posted
asynchronously (``Pending``) so that compute proceeds while they are in flight; on NCCL they
run on the process group's own stream and ``Pending.wait`` makes the compute stream wait for
them without blocking the host. Control plane (a gloo group over the same ranks, on the CPU):
the small agreements made before any data moves, so that ranks that disagree fail with a clear
error instead of hanging in a mismatched collective, at no device synchronisation.

Every wait is bounded by ``timeout``: a rank that dies or stalls makes the others raise a
``RuntimeError`` that says so, never a silent hang.
"""
from __future__ import annotations

import datetime
import functools
import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Callable, Sequence

import torch

from .layout import ClipLayout

__all__ = ["ClipComm", "CommCounters", "FramePlan", "Outgoing", "Pending", "eager_across_ranks",
           "rank_sum"]

DEFAULT_TIMEOUT = datetime.timedelta(minutes=5)


def eager_across_ranks(crosses: Callable):
    """Decorate a method that may talk to other ranks: when ``crosses(self)`` it runs outside
    any torch.compile graph (``torch.compiler.disable``: a graph break named after the
    method), so Dynamo never traces process groups, transfer plans or the host objects the
    ranks agree on; otherwise (one process: nothing is sent) it is traced like any code, and
    a fullgraph compile stays whole."""
    def wrap(method):
        reason = f"vinf_engine: {method.__qualname__} talks to the other ranks"
        try:
            eager = torch.compiler.disable(method, reason=reason)
        except TypeError:                   # a torch whose disable() takes no reason
            eager = torch.compiler.disable(method)

        @functools.wraps(method)
        def run(self, *args, **kwargs):
            if crosses(self):
                return eager(self, *args, **kwargs)
            return method(self, *args, **kwargs)
        return run
    return wrap


_SEVERAL = eager_across_ranks(lambda self: self.world_size > 1)


@dataclass
class CommCounters:
    """What crossed the data plane since the last ``reset``."""

    collectives: int = 0      # launches: an all-reduce, an all-gather, or one batch of p2p ops
    p2p_ops: int = 0          # individual sends and receives inside those batches
    bytes_sent: int = 0
    bytes_received: int = 0
    control: int = 0          # control-plane agreements (CPU, gloo), one per model call
    device_syncs: int = 0     # host-device synchronisations the communication asks for

    def reset(self):
        for k in asdict(self):
            setattr(self, k, 0)

    def snapshot(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FramePlan:
    """Who sends which frames to whom, for one layout and one ``wants`` (global frames each
    rank asks for). Every rank derives the same plan without asking anyone."""

    n_out: int                 # frames this rank receives in total (own ones copied locally)
    local_pos: tuple           # positions in the result filled from this rank's own frames
    local_idx: tuple           # ... and which of its local frames fill them
    sends: tuple               # (peer, local frame indices to send)
    recvs: tuple               # (peer, positions in the result the peer's frames fill)


@dataclass
class Outgoing:
    """One exchange set aside for a later ``ClipComm.post_batch``: what goes to each peer
    (copied when prepared, unless posted at once: ``ClipComm.prepare``), and how to read what
    comes back."""

    sends: dict                 # peer -> its frames: a contiguous copy, or a _Select of x
    sums: torch.Tensor | None   # partial sums for every peer, or None
    recvs: dict                 # peer -> positions in the result that the peer's frames fill
    out_shape: tuple | None     # the result's shape (``plan.n_out`` frames along dim); None: sums only
    dim: int
    dtype: torch.dtype
    device: torch.device

    def recv_frame_bytes(self, peer: int) -> int:
        if self.out_shape is None:
            return 0
        per_frame = math.prod(self.out_shape) // max(self.out_shape[self.dim], 1)
        return len(self.recvs.get(peer, ())) * per_frame * self.dtype.itemsize


def _pad8(n: int) -> int:
    return -(-n // 8) * 8


@dataclass(frozen=True)
class _Select:
    """Frames ``idx`` of ``x`` along ``dim``, to be written straight into a message."""

    x: torch.Tensor
    dim: int
    idx: torch.Tensor

    @property
    def shape(self) -> tuple:
        s = list(self.x.shape)
        s[self.dim] = self.idx.numel()
        return tuple(s)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.x.element_size()

    def write(self, dst: torch.Tensor):
        torch.index_select(self.x, self.dim, self.idx, out=dst.view(self.x.dtype).view(self.shape))


def rank_sum(parts: list, own: torch.Tensor) -> torch.Tensor:
    """The sum of every rank's ``parts`` in rank order, ``own`` in this rank's (None) place:
    the same additions in the same order on every rank, so bitwise the same total."""
    total = None
    for p in parts:
        p = own if p is None else p
        total = p.clone() if total is None else total + p
    return total


@lru_cache(maxsize=256)
def frame_plan(layout: ClipLayout, rank: int, wants: tuple) -> FramePlan:
    start, own = layout.start(rank), layout.frames(rank)
    mine = wants[rank]
    local_pos = tuple(i for i, f in enumerate(mine) if f in own)
    sends, recvs = [], []
    for peer in range(layout.world_size):
        if peer == rank:
            continue
        send = tuple(f - start for f in wants[peer] if f in own)
        if send:
            sends.append((peer, send))
        pos = tuple(i for i, f in enumerate(mine) if layout.owner(f) == peer)
        if pos:
            recvs.append((peer, pos))
    return FramePlan(len(mine), local_pos, tuple(mine[i] - start for i in local_pos),
                     tuple(sends), tuple(recvs))


def data_plane_timeout(backend: str, timeout: datetime.timedelta):
    """What a data-plane ``Pending`` waits with on ``backend``: ``timeout`` on the host
    backend (gloo), None (a stream wait, never blocking the host) on device backends."""
    return timeout if backend == "gloo" else None


class Pending:
    """Communication in flight. ``wait()`` returns its result (idempotent)."""

    def __init__(self, works: list, finish: Callable, timeout: datetime.timedelta, what: str,
                 rank: int):
        self._works, self._finish, self._timeout = works, finish, timeout
        self._what, self._rank = what, rank
        self._done, self._result = False, None

    @classmethod
    def ready(cls, value):
        return cls.ready_with(lambda: value)

    @classmethod
    def ready_with(cls, finish: Callable):
        """Nothing in flight of its own: ``wait()`` gives ``finish()`` (which may wait on
        other ``Pending``s), computed once."""
        return cls([], finish, DEFAULT_TIMEOUT, "", 0)

    @eager_across_ranks(lambda self: bool(self._works))
    def wait(self):
        if not self._done:
            for w in self._works:
                try:
                    # A timed wait blocks the host until the transfer ends; without one, a
                    # device backend only makes the current stream wait (see ClipComm).
                    w.wait() if self._timeout is None else w.wait(self._timeout)
                except RuntimeError as e:
                    bound = ("the process group's timeout" if self._timeout is None else
                             f"at most {self._timeout.total_seconds():g} s")
                    raise RuntimeError(
                        f"vinf_engine: {self._what} on rank {self._rank} failed (waited "
                        f"{bound}): a peer rank died, stalled or closed its connection "
                        f"({e})") from e
            self._result = self._finish()
            self._works, self._done = [], True
        return self._result


class ClipComm:
    """The ranks of one clip-parallel video, and the means to move frames between them.

    ``process_group=None`` means the default group when ``torch.distributed`` is initialized,
    else a single process (``world_size == 1``; nothing is ever sent).
    """

    def __init__(self, process_group=None, *, timeout: datetime.timedelta | None = None,
                 stage_all: bool = False):
        import torch.distributed as dist
        self.counters = CommCounters()
        # Tests: stage CPU tensors through host buffers too (the path GPU tensors take on gloo).
        self._stage_all = stage_all
        if isinstance(timeout, (int, float)):
            timeout = datetime.timedelta(seconds=timeout)
        self.timeout = timeout or DEFAULT_TIMEOUT
        self._index_cache: dict = {}
        if process_group is None and not (dist.is_available() and dist.is_initialized()):
            self.group = self.ctrl = None
            self.rank, self.world_size = 0, 1
            self.backend = None
            self._data_timeout = self.timeout
            return
        self.group = process_group if process_group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        if self.rank < 0:
            raise ValueError("this process is not a member of process_group")
        self.world_size = dist.get_world_size(self.group)
        self.backend = dist.get_backend(self.group)
        # How data-plane waits are bounded. gloo runs on the host: each wait blocks it anyway,
        # so ``timeout`` bounds it. On a device backend (NCCL) a wait given a timeout would
        # block the host until the transfer ends, a host sync on every exchange; there the
        # wait is a stream wait only, and a stall mid-step is caught by the process group's
        # own watchdog (``init_process_group(timeout=...)``; the CLI sets it to --timeout).
        self._data_timeout = data_plane_timeout(self.backend, self.timeout)
        self._global = [dist.get_global_rank(self.group, r) for r in range(self.world_size)]
        # The control plane must be a CPU (gloo) group. A gloo data plane serves as its own;
        # for NCCL a gloo twin is made: over the whole world a plain new_group (every rank
        # calls parallelize), for a subgroup one that only its members need to join.
        if self.world_size == 1:
            self.ctrl = None
        elif self.backend == "gloo":
            self.ctrl = self.group
        elif self.world_size == dist.get_world_size():
            self.ctrl = dist.new_group(self._global, backend="gloo", timeout=self.timeout)
        else:
            self.ctrl = dist.new_group(self._global, backend="gloo", timeout=self.timeout,
                                       use_local_synchronization=True)

    # ---------------------------------------------------------------- control plane
    @_SEVERAL
    def agree(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order. Collective, on the control plane;
        waits at most ``timeout`` for the slowest rank."""
        if self.world_size == 1:
            return [obj]
        import pickle

        import torch.distributed as dist
        self.counters.control += 1
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        sizes = [torch.zeros(1, dtype=torch.long) for _ in range(self.world_size)]
        self._ctrl_wait(dist.all_gather(sizes, torch.tensor([data.numel()]), group=self.ctrl,
                                        async_op=True))
        width = int(max(int(n) for n in sizes))
        buf = torch.zeros(width, dtype=torch.uint8)
        buf[:data.numel()] = data
        bufs = [torch.empty(width, dtype=torch.uint8) for _ in range(self.world_size)]
        self._ctrl_wait(dist.all_gather(bufs, buf, group=self.ctrl, async_op=True))
        return [pickle.loads(b[:int(n)].numpy().tobytes()) for b, n in zip(bufs, sizes)]

    def _ctrl_wait(self, work):
        Pending([work], lambda: None, self.timeout, "agreement with the other ranks",
                self.rank).wait()

    # ---------------------------------------------------------------- data plane
    def _staged(self, device) -> bool:
        """Whether transfers of tensors on ``device`` go through host buffers: gloo moves CPU
        tensors only, so two processes on one GPU (or GPUs without NCCL) stage there."""
        return self.backend == "gloo" and (torch.device(device).type != "cpu" or self._stage_all)

    def _outbound(self, t: torch.Tensor) -> torch.Tensor:
        """What goes on the wire for ``t``: itself, or a host copy (pinned for a GPU tensor)."""
        if not self._staged(t.device):
            return t
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda")
        return host.copy_(t)

    def _inbound(self, shape, dtype, device) -> torch.Tensor:
        """A buffer to receive into: on ``device``, or on the host when staged."""
        if not self._staged(device):
            return torch.empty(shape, dtype=dtype, device=device)
        return torch.empty(shape, dtype=dtype, pin_memory=torch.device(device).type == "cuda")

    def _index(self, idx: tuple, device) -> torch.Tensor:
        # Index tensors live on the device once per plan: building them per call would be a
        # host-to-device copy, i.e. a synchronisation, on every exchange.
        if torch.compiler.is_compiling():
            # A constant of the graph (kept on the device by the compiled code): looking it up
            # in the cache would guard on the cache's contents and recompile once it is warm.
            return torch.tensor(idx, dtype=torch.long, device=device)
        key = (idx, device)
        t = self._index_cache.get(key)
        if t is None:
            t = self._index_cache[key] = torch.tensor(idx, dtype=torch.long, device=device)
        return t

    def _count(self, ops_sent: int, ops_recv: int, sent: int, received: int, launches: int = 1):
        c = self.counters
        c.collectives += launches
        c.p2p_ops += ops_sent + ops_recv
        c.bytes_sent += sent
        c.bytes_received += received

    def fill_local(self, out: torch.Tensor, x: torch.Tensor, dim: int, plan: FramePlan) -> torch.Tensor:
        """Copy into ``out`` the wanted frames this rank owns (from ``x``); returns ``out``."""
        if plan.local_pos:
            out.index_copy_(dim, self._index(plan.local_pos, x.device),
                            x.index_select(dim, self._index(plan.local_idx, x.device)))
        return out

    @_SEVERAL
    def post_frames(self, x: torch.Tensor, dim: int, layout: ClipLayout, wants: tuple,
                    what: str = "frame exchange", sums: torch.Tensor | None = None) -> Pending:
        """Start fetching frames ``wants[self.rank]`` (global indices, in that order) of the
        distributed video; ``x`` holds this rank's clip, frames along ``dim``.

        Every rank passes the same ``wants`` (what each rank asks for), so each knows what to
        send to whom without asking. All transfers go out as one batch, both directions at
        once; a frame is sent at most once per receiver however many scopes need it.

        ``sums`` (same shape and dtype on every rank; small, e.g. GroupNorm partials) rides in
        the same batch: it goes to every peer, packed in one message with the frames that
        peer wants, and ``wait()`` then returns ``(frames, total)``, ``total`` the sum over the
        ranks in rank order (so bitwise the same on every rank). One launch instead of two.
        """
        plan = frame_plan(layout, self.rank, wants)
        if x.shape[dim] != layout.sizes[self.rank]:
            raise ValueError(f"x holds {x.shape[dim]} frames along dim {dim}, but rank "
                             f"{self.rank} owns {layout.sizes[self.rank]}")
        if sums is not None:
            # The batch format (one message per peer, sums packed with the frames), one item.
            got = self.post_batch([self.prepare(x, dim, layout, wants, sums, copy=False)], what)

            def finish_with_sums():
                frames, parts = got.wait()[0]
                return self.fill_local(frames, x, dim, plan), rank_sum(parts, sums)
            return Pending([], finish_with_sums, self._data_timeout, what, self.rank)
        shape = list(x.shape)
        shape[dim] = plan.n_out
        out = self.fill_local(x.new_empty(shape), x, dim, plan)
        if not plan.sends and not plan.recvs:
            return Pending.ready(out)
        import torch.distributed as dist
        ops, recvs, sent, received = [], [], 0, 0
        for peer, idx in plan.sends:
            buf = self._outbound(x.index_select(dim, self._index(idx, x.device)))
            ops.append(dist.P2POp(dist.isend, buf, self._global[peer], self.group))
            sent += buf.numel() * buf.element_size()
        for peer, pos in plan.recvs:
            shape[dim] = len(pos)
            buf = self._inbound(shape, x.dtype, x.device)
            ops.append(dist.P2POp(dist.irecv, buf, self._global[peer], self.group))
            recvs.append((pos, buf))
            received += buf.numel() * buf.element_size()
        self._count(len(plan.sends), len(plan.recvs), sent, received)
        works = dist.batch_isend_irecv(ops)

        def finish():
            for pos, buf in recvs:
                out.index_copy_(dim, self._index(pos, x.device), buf.to(x.device))
            return out
        return Pending(works, finish, self._data_timeout, what, self.rank)

    @_SEVERAL
    def prepare(self, x: torch.Tensor | None, dim: int, layout: ClipLayout | None,
                wants: tuple | None, sums: torch.Tensor | None = None,
                copy: bool = True) -> Outgoing:
        """Set aside the exchange ``post_frames(x, dim, layout, wants, sums=sums)`` would
        make, for a later ``post_batch``: the frames each peer wants are copied now, so ``x``
        may change or go. ``x=None``: ``sums`` only. ``copy=False`` (a batch posted at once):
        the frames are read from ``x`` straight into the messages, one copy instead of two."""
        sums = None if sums is None else sums.detach().contiguous()
        if sums is not None and copy:
            sums = sums.clone()
        if x is None:
            if sums is None:
                raise ValueError("prepare needs frames, sums or both")
            return Outgoing({}, sums, {}, None, 0, sums.dtype, sums.device)
        plan = frame_plan(layout, self.rank, wants)
        if x.shape[dim] != layout.sizes[self.rank]:
            raise ValueError(f"x holds {x.shape[dim]} frames along dim {dim}, but rank "
                             f"{self.rank} owns {layout.sizes[self.rank]}")
        if sums is not None and sums.device != x.device:
            raise ValueError(f"sums is on {sums.device}, x is on {x.device}")
        sends = {peer: (x.index_select(dim, self._index(idx, x.device)) if copy else
                        _Select(x, dim, self._index(idx, x.device))) for peer, idx in plan.sends}
        shape = list(x.shape)
        shape[dim] = plan.n_out
        return Outgoing(sends, sums, dict(plan.recvs), tuple(shape), dim, x.dtype, x.device)

    @_SEVERAL
    def post_batch(self, items: Sequence[Outgoing], what: str = "batched exchange") -> Pending:
        """Many prepared exchanges in ONE launch: one byte message per peer and direction,
        holding, item after item, the item's sums and the item's frames for that peer (each
        piece 8-byte aligned). Every rank must post the same items in the same order.

        ``wait()`` gives, per item, ``(frames, parts)``: ``frames`` the result with the
        other ranks' frames in place (this rank's own positions are left unset: the caller
        fills them, ``fill_local``), ``parts`` every rank's sums in rank order, None in this
        rank's place (``rank_sum`` adds them up; None without sums)."""
        items = list(items)
        if self.world_size == 1 or not items:
            return Pending.ready([(None if it.out_shape is None else
                                   torch.empty(it.out_shape, dtype=it.dtype, device=it.device),
                                   None if it.sums is None else [None] * self.world_size)
                                  for it in items])
        import torch.distributed as dist
        device = items[0].device
        ops, incoming, sent, received, n_send, n_recv = [], [], 0, 0, 0, 0
        for peer in range(self.world_size):
            if peer == self.rank:
                continue
            pieces = []
            for it in items:
                if it.sums is not None:
                    pieces.append(it.sums)
                if peer in it.sends:
                    pieces.append(it.sends[peer])
            if pieces:
                nbytes = [t.nbytes for t in pieces]
                size = sum(_pad8(n) for n in nbytes)
                buf = torch.empty(size, dtype=torch.uint8, device=device)
                off = 0
                for t, n in zip(pieces, nbytes):
                    if isinstance(t, _Select):
                        t.write(buf[off:off + n])
                    else:
                        buf[off:off + n].copy_(t.reshape(-1).view(torch.uint8))
                    off += _pad8(n)
                buf = self._outbound(buf)
                ops.append(dist.P2POp(dist.isend, buf, self._global[peer], self.group))
                sent, n_send = sent + size, n_send + 1
            layout_in, off = [], 0
            for it in items:
                s_off = None
                if it.sums is not None:
                    s_off, off = off, off + _pad8(it.sums.numel() * it.sums.element_size())
                f_off, nf = None, it.recv_frame_bytes(peer)
                if nf:
                    f_off, off = off, off + _pad8(nf)
                layout_in.append((s_off, f_off))
            if off:
                buf = self._inbound((off,), torch.uint8, device)
                ops.append(dist.P2POp(dist.irecv, buf, self._global[peer], self.group))
                incoming.append((peer, buf, layout_in))
                received, n_recv = received + off, n_recv + 1
        self._count(n_send, n_recv, sent, received)
        works = dist.batch_isend_irecv(ops) if ops else []

        def finish():
            landed = [(peer, buf.to(device), lay) for peer, buf, lay in incoming]
            results = []
            for i, it in enumerate(items):
                out = None if it.out_shape is None else torch.empty(it.out_shape, dtype=it.dtype,
                                                                      device=it.device)
                parts = None if it.sums is None else [None] * self.world_size
                for peer, buf, layout_in in landed:
                    s_off, f_off = layout_in[i]
                    if s_off is not None:
                        n = it.sums.numel() * it.sums.element_size()
                        parts[peer] = buf[s_off:s_off + n].view(it.sums.dtype).view(it.sums.shape)
                    if f_off is not None:
                        pos = it.recvs[peer]
                        shape = list(it.out_shape)
                        shape[it.dim] = len(pos)
                        n = it.recv_frame_bytes(peer)
                        body = buf[f_off:f_off + n].view(it.dtype).view(shape)
                        out.index_copy_(it.dim, self._index(pos, it.device), body)
                results.append((out, parts))
            return results
        return Pending(works, finish, self._data_timeout, what, self.rank)

    @_SEVERAL
    def gather_frames(self, x: torch.Tensor, dim: int, layout: ClipLayout,
                      wants: Sequence[Sequence[int]]) -> torch.Tensor:
        """``post_frames(...).wait()``."""
        return self.post_frames(x, dim, layout, tuple(tuple(w) for w in wants)).wait()

    @_SEVERAL
    def post_all_reduce(self, t: torch.Tensor, what: str = "statistics all-reduce") -> Pending:
        """Start summing ``t`` over the ranks, in place; ``wait()`` returns ``t``."""
        if self.world_size == 1:
            return Pending.ready(t)
        import torch.distributed as dist
        n = t.numel() * t.element_size()
        self._count(0, 0, n, n)
        if self._staged(t.device):
            host = self._outbound(t)
            work = dist.all_reduce(host, group=self.group, async_op=True)
            return Pending([work], lambda: t.copy_(host), self._data_timeout, what, self.rank)
        work = dist.all_reduce(t, group=self.group, async_op=True)
        return Pending([work], lambda: t, self._data_timeout, what, self.rank)

    @_SEVERAL
    def send(self, t: torch.Tensor, peer: int):
        """Blocking point-to-point send of ``t`` to ``peer`` (a rank of this group), counted."""
        import torch.distributed as dist
        self._count(1, 0, t.numel() * t.element_size(), 0)
        dist.send(self._outbound(t.contiguous()), dst=self._global[peer], group=self.group)

    @_SEVERAL
    def recv(self, t: torch.Tensor, peer: int) -> torch.Tensor:
        """Blocking receive into ``t`` from ``peer``, counted; returns ``t``."""
        import torch.distributed as dist
        self._count(0, 1, 0, t.numel() * t.element_size())
        buf = self._inbound(t.shape, t.dtype, t.device)
        dist.recv(buf, src=self._global[peer], group=self.group)
        return t if buf is t else t.copy_(buf)

    @_SEVERAL
    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place."""
        return self.post_all_reduce(t).wait()

    # ---------------------------------------------------------------- the published pattern
    @_SEVERAL
    def blocking_frames(self, x: torch.Tensor, dim: int, layout: ClipLayout, wants: tuple,
                        what: str = "frame exchange") -> torch.Tensor:
        """The same result as ``post_frames(...).wait()``, moved the way the published
        prototype moves it: one blocking transfer per peer, then a device synchronisation.
        Kept as the side-by-side baseline (``comm_mode="blocking"``)."""
        import torch.distributed as dist
        plan = frame_plan(layout, self.rank, wants)
        shape = list(x.shape)
        shape[dim] = plan.n_out
        out = self.fill_local(x.new_empty(shape), x, dim, plan)
        sends, recvs = dict(plan.sends), dict(plan.recvs)
        for peer in sorted(set(sends) | set(recvs)):
            ops, got = [], None
            sent = received = 0
            if peer in sends:
                buf = self._outbound(x.index_select(dim, self._index(sends[peer], x.device)))
                ops.append(dist.P2POp(dist.isend, buf, self._global[peer], self.group))
                sent = buf.numel() * buf.element_size()
            if peer in recvs:
                shape[dim] = len(recvs[peer])
                got = self._inbound(shape, x.dtype, x.device)
                ops.append(dist.P2POp(dist.irecv, got, self._global[peer], self.group))
                received = got.numel() * got.element_size()
            self._count(int(peer in sends), int(peer in recvs), sent, received)
            Pending(dist.batch_isend_irecv(ops), lambda: None, self._data_timeout, what,
                    self.rank).wait()
            if got is not None:
                out.index_copy_(dim, self._index(recvs[peer], x.device), got.to(x.device))
            self.device_sync(x.device)
        return out

    @_SEVERAL
    def blocking_all_gather(self, t: torch.Tensor, what: str = "context all-gather") -> list:
        """Every rank's ``t`` (same shape everywhere), blocking, then a device sync."""
        import torch.distributed as dist
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        n = t.numel() * t.element_size()
        self._count(0, 0, n * (self.world_size - 1), n * (self.world_size - 1))
        src = t.cpu() if self.backend == "gloo" and t.device.type != "cpu" else t
        bufs = [torch.empty_like(src) for _ in range(self.world_size)]
        work = dist.all_gather(bufs, src.contiguous(), group=self.group, async_op=True)
        Pending([work], lambda: None, self._data_timeout, what, self.rank).wait()
        for o, b in zip(out, bufs):
            o.copy_(b)
        self.device_sync(t.device)
        return out

    def device_sync(self, device):
        # Counted on every device (the pattern makes it), performed where there is one.
        self.counters.device_syncs += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
