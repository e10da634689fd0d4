"""Communication for clip parallelism: one object owns the process group and its counters.

Data plane (the group given by the user; NCCL on GPUs, gloo on CPUs): frame exchanges as one
batch of point-to-point transfers and all-reduces of GroupNorm statistics. Control plane (a
gloo group over the same ranks, on the CPU): the small agreements made before any data moves,
so that ranks that disagree fail with a clear error instead of hanging in a mismatched
collective, and so that checking costs no device synchronisation.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, asdict
from typing import Sequence

import torch

from .layout import ClipLayout

__all__ = ["ClipComm", "CommCounters"]

DEFAULT_TIMEOUT = datetime.timedelta(minutes=5)


@dataclass
class CommCounters:
    """What crossed the data plane since the last ``reset``."""

    collectives: int = 0      # launches: an all-reduce, or one batch of point-to-point ops
    p2p_ops: int = 0          # individual sends and receives inside those batches
    bytes_sent: int = 0
    bytes_received: int = 0
    control: int = 0          # control-plane agreements (CPU, gloo), one per model call

    def reset(self):
        self.collectives = self.p2p_ops = self.bytes_sent = self.bytes_received = self.control = 0

    def snapshot(self) -> dict:
        return asdict(self)


class ClipComm:
    """The ranks of one clip-parallel video, and the means to move frames between them.

    ``process_group=None`` means the default group when ``torch.distributed`` is initialized,
    else a single process (``world_size == 1``; nothing is ever sent).
    """

    def __init__(self, process_group=None, *, timeout: datetime.timedelta | None = None):
        import torch.distributed as dist
        self.counters = CommCounters()
        self.timeout = timeout or DEFAULT_TIMEOUT
        if process_group is None and not (dist.is_available() and dist.is_initialized()):
            self.group = self.ctrl = None
            self.rank, self.world_size = 0, 1
            self.backend = None
            return
        self.group = process_group if process_group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        if self.rank < 0:
            raise ValueError("this process is not a member of process_group")
        self.world_size = dist.get_world_size(self.group)
        self.backend = dist.get_backend(self.group)
        self._global = [dist.get_global_rank(self.group, r) for r in range(self.world_size)]
        if self.backend == "gloo":
            self.ctrl = self.group
        else:
            self.ctrl = dist.new_group(self._global, backend="gloo", timeout=self.timeout,
                                       use_local_synchronization=True)

    # ---------------------------------------------------------------- control plane
    def agree(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order. Collective, on the control plane."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist
        self.counters.control += 1
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.ctrl)
        return out

    # ---------------------------------------------------------------- data plane
    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place."""
        if self.world_size == 1:
            return t
        import torch.distributed as dist
        self.counters.collectives += 1
        n = t.numel() * t.element_size()
        self.counters.bytes_sent += n
        self.counters.bytes_received += n
        if self.backend == "gloo" and t.device.type != "cpu":
            host = t.cpu()
            dist.all_reduce(host, group=self.group)
            t.copy_(host)
        else:
            dist.all_reduce(t, group=self.group)
        return t

    def gather_frames(self, x: torch.Tensor, dim: int, layout: ClipLayout,
                      wants: Sequence[Sequence[int]]) -> torch.Tensor:
        """Frames ``wants[self.rank]`` (global indices, in that order) of the distributed video.

        ``x`` holds this rank's clip, frames along ``dim``. ``wants[r]`` is what rank ``r``
        asks for: every rank passes the same ``wants``, so each knows what to send to whom
        without asking. All transfers go out as one batch, in both directions at once; a frame
        is sent at most once per receiver however many scopes need it.
        """
        me = self.rank
        start, own = layout.start(me), layout.frames(me)
        if x.shape[dim] != len(own):
            raise ValueError(f"x holds {x.shape[dim]} frames along dim {dim}, "
                             f"but rank {me} owns {len(own)}")
        mine = list(wants[me])
        shape = list(x.shape)
        shape[dim] = len(mine)
        out = x.new_empty(shape)
        pos_local = [i for i, f in enumerate(mine) if f in own]
        if pos_local:
            idx = torch.tensor([mine[i] - start for i in pos_local], device=x.device)
            out.index_copy_(dim, torch.tensor(pos_local, device=x.device), x.index_select(dim, idx))
        if self.world_size == 1 or len(pos_local) == len(mine):
            if self.world_size > 1:
                self._send_only(x, dim, layout, wants)
            return out
        import torch.distributed as dist
        ops, recvs = self._send_ops(x, dim, layout, wants), []
        for peer in range(self.world_size):
            if peer == me:
                continue
            pos = [i for i, f in enumerate(mine) if layout.owner(f) == peer]
            if pos:
                shape[dim] = len(pos)
                buf = x.new_empty(shape)
                ops.append(dist.P2POp(dist.irecv, buf, self._global[peer], self.group))
                recvs.append((pos, buf))
                self.counters.bytes_received += buf.numel() * buf.element_size()
        self._run(ops)
        for pos, buf in recvs:
            out.index_copy_(dim, torch.tensor(pos, device=x.device), buf)
        return out

    def _send_ops(self, x, dim, layout, wants):
        import torch.distributed as dist
        me, start, own = self.rank, layout.start(self.rank), layout.frames(self.rank)
        ops = []
        for peer in range(self.world_size):
            if peer == me:
                continue
            send = [f - start for f in wants[peer] if f in own]
            if send:
                buf = x.index_select(dim, torch.tensor(send, device=x.device)).contiguous()
                ops.append(dist.P2POp(dist.isend, buf, self._global[peer], self.group))
                self.counters.bytes_sent += buf.numel() * buf.element_size()
        return ops

    def _send_only(self, x, dim, layout, wants):
        self._run(self._send_ops(x, dim, layout, wants))

    def _run(self, ops):
        if not ops:
            return
        import torch.distributed as dist
        self.counters.collectives += 1
        self.counters.p2p_ops += len(ops)
        for req in dist.batch_isend_irecv(ops):
            req.wait()
