"""The clip-parallel engine: per-step agreement, frame exchanges and whole-video statistics.

One ``ClipParallel`` per parallelized model. Patched modules call it for everything that
crosses a clip boundary; it owns the communicator, the layout of the current step and the
exchange plans derived from it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .comm import ClipComm, Pending, eager_across_ranks
from .config import DualScopeConfig
from .layout import AttentionPlan, ClipLayout, attention_plan, global_frames, halo_wants
from .ops.group_norm import group_norm_apply, group_norm_finalize, group_norm_partials
from .scheduler import MODES, CommScheduler

__all__ = ["ClipParallel", "parallelize", "unparallelize"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class AttentionContext:
    """The frames of a dual-scope attention's input that other ranks hold, with their global
    frame indices (a family whose projection depends on position, such as RoPE, needs them)."""

    left: torch.Tensor           # (N, valid_left, ...): halo frames before the clip
    right: torch.Tensor          # (N, valid_right, ...): halo frames after it
    glob: torch.Tensor | None    # (N, Ng, ...) global-scope frames, or None
    window: int                  # the window clipped to the video
    left_frames: tuple = ()      # global indices of ``left``, in order
    right_frames: tuple = ()
    glob_frames: tuple = ()
    # Per row, what still maps the frames above to the attention's input (None: nothing),
    # applied by ``rows``: a receiver that attends in chunks of rows maps only a chunk's.
    row_map: Callable | None = None

    @property
    def valid_left(self) -> int:
        return self.left.shape[1]

    @property
    def valid_right(self) -> int:
        return self.right.shape[1]

    def rows(self, r0: int, r1: int) -> "AttentionContext":
        """The context of attention rows ``[r0, r1)`` (dim 0), mapped to the attention's input."""
        m = self.row_map
        if m is None and r0 == 0 and r1 >= self.left.shape[0]:
            return self
        m = m if m is not None else (lambda t: t)
        return AttentionContext(
            left=m(self.left[r0:r1]), right=m(self.right[r0:r1]),
            glob=None if self.glob is None else m(self.glob[r0:r1]), window=self.window,
            left_frames=self.left_frames, right_frames=self.right_frames,
            glob_frames=self.glob_frames)


class ClipParallel:
    """Everything a patched model needs to run one clip of a long video.

    Parameters
    ----------
    config : DualScopeConfig
    comm : ClipComm
    mode : str, one of ``scheduler.MODES``
    """

    def __init__(self, config: DualScopeConfig, comm: ClipComm, mode: str = "overlap",
                 chunk_mib: float | None = None):
        self.config = config
        # Per-layer working memory of memory-bounded execution (layers.chunked); 0: off.
        self.chunk_bytes = int((chunk_mib or 0) * 2 ** 20)
        self.comm = comm
        self.scheduler = CommScheduler(comm, mode)
        self.mode = mode
        self.layout: ClipLayout | None = None
        self.timestep: float | None = None     # the step's timestep (tuple: one per sample)
        self.local_bias = 0.0                  # the step's biases; None when samples differ
        self.global_bias = 0.0
        self._sample_biases: tuple = ((0.0, 0.0),)
        self._bias_tensors: tuple | None = None  # (local, global) (B,): a traced timestep's
        # (offset, total): the rows of the attention input now running are rows [offset,
        # offset + rows) of the step's batch-major ``total`` (a memory-bounded chunk); None:
        # all of them
        self.row_window: tuple | None = None
        self.cache_config = None               # cache.CacheConfig, or None: no step cache
        self.cache = None                      # cache.StepCache, installed by the adapter
        self._undo = []

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    # ---------------------------------------------------------------- per step
    @eager_across_ranks(lambda self: self.world_size > 1)
    def begin_step(self, sample: torch.Tensor, timestep, problem: str | None = None) -> ClipLayout:
        """Agree with the other ranks on this step's layout and timestep.

        ``sample`` is this rank's clip ``(B, C, F, H, W)``. One small all-gather on the control
        plane; every rank raises the same ``ValueError`` if the ranks disagree, so no data-plane
        collective is ever entered with mismatched shapes. ``problem``: what the family found
        wrong with this rank's call, told to every rank like the engine's own findings.
        """
        # Nothing may raise before the agreement: a rank that refused alone would leave the
        # others waiting in it. Local problems travel with the row and fail every rank.
        if self.world_size == 1:                # nothing to agree with: no control traffic
            if problem:
                raise ValueError(problem)
            if not isinstance(sample, torch.Tensor) or sample.dim() != 5:
                raise ValueError(f"sample must be the clip (B, C, F, H, W), got "
                                 f"{tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__}")
            if sample.shape[2] < 1:
                raise ValueError("clip-parallel step refused: the video needs at least one frame")
            layout = ClipLayout.from_sizes([sample.shape[2]])
            if isinstance(timestep, torch.Tensor) and (
                    _traced() or (timestep.device == sample.device and sample.device.type != "cpu")):
                # Under torch.compile or a CUDA-graph capture the timestep is graph data, and on
                # one accelerator reading it would be the step's one host sync: its phase becomes
                # tensor biases, never read on the host (no sync, no guard). The same path
                # eager and captured, so a graph's warm-up runs what its replay will.
                return self._start_traced(layout, _timestep_tensor(timestep, sample))
            if torch.compiler.is_compiling() and _is_number(timestep):
                # A Python number under torch.compile: made a tensor inside the graph, so that
                # its phase is tensor biases too. Read on the host, the phase would be a guard
                # and every change of phase a new graph (the stock model has none to change).
                t = torch.full((sample.shape[0],), timestep, dtype=torch.float64,
                               device=sample.device)
                return self._start_traced(layout, t)
            return self._start(layout, _sample_timesteps(timestep, sample.shape[0]))
        local, row, probe = None, (0, 0, 0, 0, 0, -1, None, False), None
        try:
            if problem:
                raise ValueError(problem)
            if not isinstance(sample, torch.Tensor) or sample.dim() != 5:
                shape = tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__
                raise ValueError(f"sample must be this rank's clip (B, C, F, H, W), got {shape}")
            B, C, F, H, W = sample.shape
            timestep, probe = _read_with_probe(timestep, sample)
            t = _sample_timesteps(timestep, B)
            dt = _DTYPES.index(sample.dtype) if sample.dtype in _DTYPES else -1
            row = (F, B, C, H, W, dt, t, _per_token(timestep, B))
        except ValueError as e:
            local = str(e)
        except Exception as e:          # whatever fails here must reach every rank too
            local = f"{type(e).__name__}: {e}"
        got = self.comm.agree((local, row, probe))
        bad = [f"rank {r}: {err}" for r, (err, _, _) in enumerate(got) if err]
        if bad:
            raise ValueError("clip-parallel step refused: " + "; ".join(bad))
        rows = [row for _, row, _ in got]
        if all(r == rows[0] for r in rows) and all(p == got[0][2] for _, _, p in got):
            # Every rank holds the same clip, bit for bit: a stock pipeline run on every rank
            # with the whole video, which the rank-local model would turn into N wrong videos.
            raise ValueError(
                "clip-parallel step refused: every rank passed the same clip (bitwise), but "
                "each rank must pass its own clip of the video, in rank order; to run an "
                "unchanged diffusers pipeline on every rank with the whole video, use "
                "vinf_engine.parallelize_pipe(pipe)")
        t, per_token = _agreed_timestep(rows, self.rank)
        problems = []
        empty = [r for r, row in enumerate(rows) if row[0] < 1]
        if empty:
            problems.append(f"rank(s) {empty} hold no frames: the video needs at least one frame "
                            f"per rank ({len(rows)} ranks, {sum(r[0] for r in rows)} frames)")
        for what, cols in (("(batch, channels, height, width)", slice(1, 5)),
                           ("dtype", slice(5, 6)),
                           ("timestep", slice(6, 6 if per_token else 7))):
            vals = [row[cols] for row in rows]
            if any(v != vals[0] for v in vals):
                problems.append(f"ranks disagree on the clip's {what}: "
                                + ", ".join(f"rank {r}: {v}" for r, v in enumerate(vals)))
        if problems:
            raise ValueError("clip-parallel step refused: " + "; ".join(problems))
        return self._start(ClipLayout.from_sizes([row[0] for row in rows]), t)

    def _start(self, layout: ClipLayout, t: tuple) -> ClipLayout:
        self.layout = layout
        self.scheduler.begin_step(self.layout)
        self._bias_tensors = None
        self._sample_biases = tuple(self.config.biases(x) for x in t)
        if len(set(self._sample_biases)) == 1:
            self.timestep = t[0]
            self.local_bias, self.global_bias = self._sample_biases[0]
        else:
            self.timestep, self.local_bias, self.global_bias = t, None, None
        return self.layout

    def _start_traced(self, layout: ClipLayout, t: torch.Tensor) -> ClipLayout:
        self.layout = layout
        self.scheduler.begin_step(self.layout)
        # Kernels only (no host-to-device copy): capturable.
        # compared in fp64, as the host path does (a bf16 timestep vs a rounded phase_t
        # could otherwise land in the other phase)
        late = (t.to(torch.float64) >= self.config.phase_t).to(torch.float32)
        pb = float(self.config.phase_bias)
        self._bias_tensors = ((1.0 - late) * pb, late * pb)
        self.timestep, self.local_bias, self.global_bias = t, None, None
        return self.layout

    def bias_runs(self, rows: int) -> list:
        """``[(row0, row1, local_bias, global_bias)]``: the step's biases over ``rows`` rows of
        attention input, batch-major (``rows / B`` rows per sample). One run when every sample
        is in the same phase; else one per run of consecutive samples sharing a phase. Under
        a trace of a tensor timestep: one run whose biases are (rows,) tensors."""
        off, total = self.row_window if self.row_window is not None else (0, rows)
        if self._bias_tensors is not None:
            per = total // self._bias_tensors[0].shape[0]
            return [(0, rows, *(b.repeat_interleave(per)[off:off + rows]
                                for b in self._bias_tensors))]
        if self.local_bias is not None:
            return [(0, rows, self.local_bias, self.global_bias)]
        per = total // len(self._sample_biases)
        runs = []
        for b in range(off // per, (off + rows - 1) // per + 1):    # the samples these rows hold
            biases = self._sample_biases[b]
            lo, hi = max(off, b * per) - off, min(off + rows, (b + 1) * per) - off
            if runs and runs[-1][2:] == biases:
                runs[-1] = (runs[-1][0], hi, *biases)
            else:
                runs.append((lo, hi, *biases))
        return runs

    def _require_step(self) -> ClipLayout:
        if self.layout is None:
            raise RuntimeError("no step in progress: call the parallelized model itself, "
                               "which agrees on the step's layout before any layer runs")
        return self.layout

    # ---------------------------------------------------------------- exchanges
    def attention_plan(self) -> AttentionPlan:
        return attention_plan(self._require_step(), self.rank, self.config.window,
                              self.config.num_global)

    def start_attention_context(self, h: torch.Tensor, dim: int = 1, transform=None,
                                row_map=None) -> Pending:
        """Start fetching halo and global-scope frames of ``h`` (N, F, C), the input of a
        temporal attention; ``wait()`` gives an ``AttentionContext``. Or of any tensor with
        its frames along ``dim`` that ``transform`` maps, per frame, to (N, n, C) rows once
        the frames have arrived, and ``row_map`` (kept in the context, applied by its
        ``rows``) maps, per row, to the attention's input."""
        layout = self._require_step()
        plan = self.attention_plan()
        got = self.scheduler.frames(h, dim, layout, plan.wants, "attention context exchange")

        def finish():
            g = got.wait()
            if transform is not None:
                g = transform(g)
            empty = g.narrow(1, 0, 0)
            return AttentionContext(
                left=_take(g, plan.left, self.comm) if plan.left else empty,
                right=_take(g, plan.right, self.comm) if plan.right else empty,
                glob=_take(g, plan.glob, self.comm) if plan.glob else None, window=plan.window,
                left_frames=plan.left_frames, right_frames=plan.right_frames,
                glob_frames=plan.glob_frames, row_map=row_map)
        return Pending([], finish, self.comm.timeout, "", self.rank)

    def start_frame_halo(self, x: torch.Tensor, dim: int, halo: int,
                         sums: torch.Tensor | None = None) -> Pending:
        """Start extending ``x`` by up to ``halo`` frames on each side from the neighbouring
        clips (fewer at the video's ends); ``wait()`` gives ``(ext, lo, hi)``, ``[lo, hi)``
        the global frame range ``ext`` holds. With ``sums``, in the same launch, their sum
        over the ranks: ``wait()`` gives ``((ext, lo, hi), total)``."""
        layout = self._require_step()
        s, e = layout.start(self.rank), layout.end(self.rank)
        lo, hi = max(0, s - halo), min(layout.num_frames, e + halo)
        if lo == s and hi == e and sums is None:
            return Pending.ready((x, lo, hi))
        what = "temporal halo exchange" + (" with GroupNorm statistics" if sums is not None else "")
        got = self.scheduler.frames(x, dim, layout, halo_wants(layout, halo), what, sums=sums)

        def finish():
            g, total = got.wait() if sums is not None else (got.wait(), None)
            n_left = s - lo
            ext = torch.cat([g.narrow(dim, 0, n_left), x, g.narrow(dim, n_left, hi - e)], dim=dim)
            return (ext, lo, hi) if sums is None else ((ext, lo, hi), total)
        return Pending([], finish, self.comm.timeout, "", self.rank)

    def start_halo_and_stats(self, x: torch.Tensor, halo: int, norm: torch.nn.GroupNorm) -> Pending:
        """``start_frame_halo(x, 2, halo)`` and ``start_stats(x, norm)`` of ``x`` (N, C, F, H,
        W), this rank's own frames, moved as ONE exchange: the statistics' partial sums ride
        with the halo frames (``ClipComm.post_frames(sums=...)``). ``wait()`` gives
        ``((ext, lo, hi), (mean, rstd))``."""
        if not (self.config.sync_groupnorm and self.world_size > 1):
            pend = self.start_frame_halo(x, 2, halo), self.start_stats(x, norm)
            return Pending([], lambda: tuple(p.wait() for p in pend), self.comm.timeout, "",
                           self.rank)
        partials, total = self._partials(x, norm)
        got = self.start_frame_halo(x, 2, halo, sums=partials)

        def finish():
            extended, summed = got.wait()
            return extended, group_norm_finalize(summed, total, norm.eps)
        return Pending([], finish, self.comm.timeout, "", self.rank)

    def frame_halo(self, x: torch.Tensor, dim: int, halo: int) -> tuple[torch.Tensor, int, int]:
        return self.start_frame_halo(x, dim, halo).wait()

    def blocking_global_frames(self, t: torch.Tensor) -> torch.Tensor | None:
        """Global-scope frames of ``t`` (N, F, ...), the published way: each rank contributes
        the global frames it owns (padded to the largest share) to one blocking all-gather
        per tensor. For ``comm_mode="blocking"`` only."""
        layout = self._require_step()
        g = global_frames(layout.num_frames, self.config.num_global)
        if not g:
            return None
        if self.world_size == 1:
            return t.index_select(1, self.comm._index(g, t.device))
        owned = [[f for f in g if layout.owner(f) == r] for r in range(self.world_size)]
        width = max(len(o) for o in owned)
        start = layout.start(self.rank)
        mine = t.new_zeros((t.shape[0], width) + tuple(t.shape[2:]))
        if owned[self.rank]:
            mine[:, :len(owned[self.rank])] = t.index_select(
                1, self.comm._index(tuple(f - start for f in owned[self.rank]), t.device))
        parts = self.comm.blocking_all_gather(mine)
        return torch.cat([p[:, :len(o)] for p, o in zip(parts, owned) if o], dim=1)

    # ---------------------------------------------------------------- statistics
    def start_stats(self, x_own: torch.Tensor, norm: torch.nn.GroupNorm) -> Pending:
        """Start the whole-video GroupNorm statistics of ``x_own`` (N, C, F, H, W), this
        rank's own frames; ``wait()`` gives ``(mean, rstd)``, each (N, G) fp64."""
        if not (self.config.sync_groupnorm and self.world_size > 1):
            partials, count = group_norm_partials(x_own, norm.num_groups)
            return Pending.ready(group_norm_finalize(partials, count, norm.eps))
        partials, total = self._partials(x_own, norm)
        summed = self.scheduler.all_reduce(partials, "GroupNorm statistics all-reduce")
        return Pending([], lambda: group_norm_finalize(summed.wait(), total, norm.eps),
                       self.comm.timeout, "", self.rank)

    def _partials(self, x_own: torch.Tensor, norm: torch.nn.GroupNorm) -> tuple:
        """This rank's (N, G, 2) partial sums of ``x_own`` and the whole video's element
        count per group. Every frame holds the same number of elements per group, so the
        count follows from the layout: only the sums travel, no scalar is built on the device."""
        partials, count = group_norm_partials(x_own, norm.num_groups)
        return partials, count // x_own.shape[2] * self._require_step().num_frames

    def group_norm(self, x, norm: torch.nn.GroupNorm, own: slice | None = None,
                   activation: str | None = None, stats: tuple | None = None) -> torch.Tensor:
        """GroupNorm of ``x`` (N, C, F, H, W) with statistics over the whole video.

        ``own`` selects, along the frame axis, the frames this rank owns when ``x`` also holds
        halo frames: statistics count each frame of the video exactly once. ``stats`` passes
        statistics already gathered with ``start_stats``.
        """
        if stats is None:
            stats = self.start_stats(x if own is None else x[:, :, own], norm).wait()
        mean, rstd = stats
        return group_norm_apply(x, mean, rstd, norm.weight, norm.bias, activation)

    # ---------------------------------------------------------------- patching
    def on_undo(self, fn):
        self._undo.append(fn)

    def detach(self):
        """Undo every patch, newest first (stale transfers in flight finish first)."""
        self.scheduler.close(quiet=True)    # unpatching must not fail on a dead peer
        while self._undo:
            self._undo.pop()()


def _take(t: torch.Tensor, positions: tuple, comm: ClipComm) -> torch.Tensor:
    start = positions[0]
    if positions == tuple(range(start, start + len(positions))):
        return t.narrow(1, start, len(positions))
    return t.index_select(1, comm._index(positions, t.device))


def _read_with_probe(timestep, sample: torch.Tensor) -> tuple:
    """``(timestep on the CPU, probe)``: ``probe`` is a checksum of the clip's first elements
    (telling apart ranks that were given the same clip). A CUDA timestep and the probe come
    to the host in one copy: the step's one device sync."""
    # The first frame's first channel of the first sample: a copy of at most one plane (and
    # of nothing for an empty clip, which the agreement refuses on every rank).
    probe = sample[:1, :1, :1].reshape(-1)[:4096].double().sum().reshape(1)
    if isinstance(timestep, torch.Tensor) and timestep.device == sample.device:
        both = torch.cat([timestep.detach().reshape(-1).double(), probe]).cpu()
        return both[:-1].view(timestep.shape), float(both[-1])
    return timestep, float(probe)


def _agreed_timestep(rows: list, rank: int) -> tuple:
    """``(the step's timestep per sample, whether any rank's is one per token)`` from the
    agreement's rows. One timestep per token: a sample's phase is the noise level of its
    noisiest tokens in the whole video, which a clip of held frames alone does not hold."""
    if not any(row[7] for row in rows):
        return rows[rank][6], False
    return tuple(max(ts) for ts in zip(*(row[6] for row in rows if row[6] is not None))), True


def _per_token(timestep, batch: int) -> bool:
    """Whether ``timestep`` is one per token ``(B, S)``, S > 1 (``_sample_timesteps``)."""
    return (isinstance(timestep, torch.Tensor) and timestep.dim() == 2
            and timestep.shape[0] == batch and timestep.shape[1] > 1)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _traced() -> bool:
    """Whether this call is being traced: by torch.compile, or into a CUDA graph."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _timestep_tensor(timestep: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """The step's timestep per sample, (B,), as ``_sample_timesteps`` reads it, on the
    sample's device and never read back."""
    batch = sample.shape[0]
    t = timestep.detach().to(sample.device)
    if t.numel() == 1:
        return t.reshape(1).expand(batch)
    if t.dim() == 1 and t.shape[0] == batch:
        return t
    if t.dim() == 2 and t.shape[0] == batch and t.shape[1] > 0:
        return t.amax(dim=1)
    raise ValueError(f"timestep must be a number, one value, one per sample ({batch},) or "
                     f"one per token ({batch}, S); got shape {tuple(t.shape)}")


def _sample_timesteps(timestep, batch: int) -> tuple:
    """The step's timestep per sample, as floats: a number or a 1-element tensor for every
    sample, a (B,) tensor one per sample, a (B, S) tensor one per token (TI2V; a sample's
    phase is its largest, the noise level of its noisiest tokens)."""
    if isinstance(timestep, torch.Tensor):
        t = timestep.detach().to("cpu", torch.float64)
        if t.numel() == 0:
            raise ValueError("timestep is an empty tensor")
        if t.numel() == 1:
            return (float(t.reshape(())),) * batch
        if t.dim() == 1 and t.shape[0] == batch:
            return tuple(float(x) for x in t)
        if t.dim() == 2 and t.shape[0] == batch:
            return tuple(float(x) for x in t.amax(dim=1))
        raise ValueError(f"timestep must be a number, one value, one per sample ({batch},) or "
                         f"one per token ({batch}, S); got shape {tuple(t.shape)}")
    if isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
        return (float(timestep),) * batch
    raise ValueError(f"timestep must be a number or a tensor, got {type(timestep).__name__}")


DEFAULT_CHUNK_MIB = 1024


def parallelize(model, config: DualScopeConfig | None = None, process_group=None, *,
                comm_mode: str = "overlap", timeout=None, chunk_mib: float | None = DEFAULT_CHUNK_MIB,
                cache=None):
    """Make ``model`` run one clip of a long video per rank; patches it in place.

    ``model`` is any model of a registered family (``vinf_engine.models.families()``: diffusers
    ``UNet3DConditionModel`` and its subclasses, ``WanTransformer3DModel``). Collective: every
    rank of ``process_group`` (default: the whole world, or a single process when
    ``torch.distributed`` is not initialized) calls it with the same model and config.
    Afterwards each rank calls ``model(...)`` with the stock signature on its own clip, clips
    in rank order. If any rank's model or config is unsupported or differs, every rank raises
    the same ``ValueError`` and every model is left unpatched.

    ``config`` defaults to the family's (``DualScopeConfig()``, the paper's, for UNet3D).
    ``comm_mode`` is how exchanges move (``scheduler.MODES``): ``"overlap"`` (default, exact),
    ``"blocking"`` (the published prototype's pattern, exact, for comparison; UNet3D only),
    ``"stale"`` (previous step's halos, context and statistics; approximate), ``"loopback"``
    (timing only: exchanges replaced by local copies; wrong output). ``timeout`` (seconds or a
    timedelta, default 5 minutes) bounds every wait on another rank on the control plane and
    on gloo: a rank that dies or stalls makes the others raise instead of hanging. On NCCL
    the waits inside a step are stream waits, which never block the host; there the process
    group's own timeout (``init_process_group(timeout=...)``) bounds them.

    ``chunk_mib`` (default 1024) bounds each layer's working memory, on any number of ranks:
    layers whose temporaries would exceed it run over chunks of frames (a UNet's resnets,
    spatial transformers, samplers), spatial positions (temporal attention, temporal conv
    stacks, temporal feed-forwards; on one process whole temporal transformers), tokens (a
    DiT's blocks) or query frames (a DiT's self-attention), their outputs written in place,
    so that memory grows with the video only by what each frame must keep between layers.
    The exchanges stay one per layer (a chunk takes its rows of them); ``comm_mode=
    "blocking"`` leaves its temporal attention and conv stacks whole. The same output as
    unchunked up to the rounding of a smaller matrix product. None or 0: off.

    ``cache`` (default None: off, the model untouched) is a step cache every rank agrees on:
    ``"fbc:0.08"`` or a ``vinf_engine.cache.CacheConfig`` (``vinf_engine.cache``); the
    middle of the model is skipped on calls where its first blocks' output changed less than
    the threshold over the whole video since the last computed call (Wan: the middle blocks,
    First-Block-Cache style; UNet3D: the deep features, DeepCache style). Not with
    ``comm_mode="stale"``. ``model.vinf_engine.cache.report()`` says what it did.

    Returns the model.
    """
    from .models import Patcher
    local_error, adapter, config = _local_problem(model, config, comm_mode, chunk_mib)
    cache, why = _cache_problem(model, adapter, cache, comm_mode)
    if why:
        local_error, adapter = local_error or why, None
    comm = ClipComm(process_group, timeout=timeout)
    fingerprint = None if adapter is None else (config.as_tuple(), comm_mode,
                                                adapter.fingerprint(model),
                                                None if cache is None else cache.spec())
    rows = comm.agree((local_error, fingerprint))
    errors = [f"rank {r}: {err}" for r, (err, _) in enumerate(rows) if err]
    if errors:
        raise ValueError("parallelize refused: " + "; ".join(errors))
    if any(fp != rows[0][1] for _, fp in rows):
        diff = [r for r, (_, fp) in enumerate(rows) if fp != rows[0][1]]
        raise ValueError(f"parallelize refused: rank(s) {diff} hold a different config or model "
                         f"than rank 0 (config {rows[0][1][0]} on rank 0)")
    engine = ClipParallel(config, comm, comm_mode, chunk_mib)
    engine.cache_config = cache
    if comm.world_size > 1:
        # Touch the data plane once so that a broken link fails here, not mid-step, and so
        # that NCCL's first collective is one every rank joins.
        device = next(model.parameters()).device if comm.backend != "gloo" else "cpu"
        comm.all_reduce_(torch.zeros(1, device=device))
        comm.counters.reset()
    engine.adapter = adapter
    patcher = Patcher(engine)
    adapter.patch(model, engine, patcher)
    patcher.guard_attention_api(model)
    model.vinf_engine = engine
    engine.on_undo(lambda: delattr(model, "vinf_engine"))
    return model


def _cache_problem(model, adapter, cache, comm_mode: str) -> tuple:
    """``(CacheConfig or None, error or None)``: ``cache`` parsed, and what this rank finds
    wrong with it for ``model``'s family and ``comm_mode``."""
    from .cache import CacheConfig
    try:
        cache = CacheConfig.parse(cache)
    except ValueError as e:
        return None, str(e)
    if cache is None or adapter is None:
        return cache, None
    if not getattr(adapter, "caches", False):
        return cache, f"the {adapter.name} family has no step cache"
    why = adapter.cache_problem(model, cache)
    if not why and comm_mode == "stale":
        why = ("the step cache does not combine with comm_mode 'stale': stale pairs each "
               "step's exchanges with the previous step's, which a skipped step lacks")
    return cache, why


def _local_problem(model, config, comm_mode: str, chunk_mib) -> tuple:
    """``(error or None, adapter or None, config)``: what this rank alone finds wrong with
    the arguments (``config`` defaulted to the family's), before the ranks compare."""
    from .models import adapter_for
    if config is not None and not isinstance(config, DualScopeConfig):
        return (f"config must be a vinf_engine.DualScopeConfig, got {type(config).__name__}",
                None, config)
    if comm_mode not in MODES:
        return f"comm_mode must be one of {MODES}, got {comm_mode!r}", None, config
    if chunk_mib is not None and (isinstance(chunk_mib, bool) or not isinstance(
            chunk_mib, (int, float)) or not chunk_mib >= 0):
        return f"chunk_mib must be a number of MiB >= 0 or None, got {chunk_mib!r}", None, config
    if getattr(model, "vinf_engine", None) is not None:
        return "model is already parallelized (call vinf_engine.unparallelize first)", None, config
    adapter = adapter_for(model)
    if isinstance(adapter, str):
        return adapter, None, config
    if comm_mode not in adapter.comm_modes:
        return (f"comm_mode {comm_mode!r} is not available for the {adapter.name} family (it "
                f"runs {', '.join(adapter.comm_modes)})"), None, config
    config = config if config is not None else adapter.default_config(model)
    error = adapter.check_config(model, config)
    return error, (None if error else adapter), config


def unparallelize(model):
    """Restore a parallelized model to its original modules. Returns the model."""
    engine = getattr(model, "vinf_engine", None)
    if engine is None:
        raise ValueError("model is not parallelized")
    engine.detach()
    return model
