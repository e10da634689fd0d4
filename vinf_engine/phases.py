"""The phases of one generation run, each a function of the ``Run`` the previous one handed on.

    open_run -> check_and_agree -> load_model -> plan -> resume
             -> attached( condition -> denoise -> decode_and_write ) -> report

Until ``attached``, a problem is bad input: every rank refuses with the same
``GenerationError`` (``agreement``). From there the denoisers are parallelized and a failure
is a broken run: ``GenerationFailed``, naming the phase and step, and nothing half-written is
left behind. A model family plugs into named phases (``pipelines.PipelineFamily``: check,
plan, encode, decode), never into the middle of one.
"""
from __future__ import annotations

import datetime
import hashlib
import inspect
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .agreement import agree, checked, same, say, short
from .checkpoint import (Checkpointer, CheckpointError, pack_scheduler_state,
                         restore_cache_state, restore_scheduler_state, unreadable)
from .comm import ClipComm
from .conditioning import read_visual
from .errors import GenerationError, GenerationFailed
from .layout import ClipLayout
from .noise import initial_noise, step_generators, step_noise
from .pipelines import accepted_pipelines, family_of, inspect_model_dir, load_pipeline
from .pipelines.base import rows
from .progress import Progress, peak_memory_mib
from .settings import DTYPES, GenerateSettings

__all__ = ["Run", "open_run", "check_and_agree", "load_model", "plan", "resume", "attached",
           "condition", "denoise", "decode_and_write", "report", "denoise_step",
           "NonFiniteError"]

# What a run's fingerprint leaves out: how it writes, not what it makes.
_OUTPUT_KEYS = ("decode_chunk", "video_fps", "crf", "checkpoint", "checkpoint_every", "resume",
                "out", "save_latents")


@dataclass
class Run:
    """One generation run as it goes through the phases: each fills in its part."""

    s: GenerateSettings
    comm: ClipComm
    group: object                         # the process group asked for (None: the default)
    timeout: datetime.timedelta | None
    t_start: float = field(default_factory=time.perf_counter)
    timings: dict = field(default_factory=dict)
    device: torch.device | None = None
    family: object = None                 # pipelines.PipelineFamily
    pipe: object = None
    plan: object = None                   # pipelines.VideoPlan
    digest: str | None = None
    warnings: list = field(default_factory=list)
    config: object = None                 # DualScopeConfig
    dtype: torch.dtype | None = None
    sched: object = None
    layout: ClipLayout | None = None
    fps: float | None = None
    record: dict = field(default_factory=dict)
    fingerprint: str = ""
    ckpt: Checkpointer | None = None
    start_step: int = 0
    latents: torch.Tensor | None = None   # this rank's clip (1, C, F_rank, h, w)
    skipped: list = field(default_factory=list)
    visual: object = None                 # conditioning.Visual: images, a video extended
    cond: object = None                   # pipelines.Conditioning
    engine_stats: dict = field(default_factory=dict)
    comm_before: dict = field(default_factory=dict)
    pending: dict = field(default_factory=dict)   # outputs written, not yet in place
    resumed_caches: list | None = None    # the checkpoint's step cache states, per denoiser
    cache_reports: list = field(default_factory=list)
    phase: str = "parallelize"
    step: int = 0
    bar: Progress | None = None

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world(self) -> int:
        return self.comm.world_size

    @property
    def frames(self) -> range:
        """This rank's global latent frames."""
        return self.layout.frames(self.rank)

    @property
    def n_iter(self) -> int:
        return len(self.sched.timesteps)

    @property
    def denoisers(self) -> list:
        return self.family.denoisers(self.pipe)


# ==================================================================== before any data moves
def open_run(model, prompts, settings, fields: dict, process_group, timeout) -> Run:
    """The run's settings and its control plane with the other ranks."""
    if settings is not None and fields:
        raise TypeError("give either settings or its fields as keyword arguments, not both")
    s = settings if settings is not None else GenerateSettings(**fields)
    if model is not None:
        s.model = model
    if prompts is not None:
        s.prompts = prompts
    ctl_timeout = datetime.timedelta(seconds=timeout) if timeout else None
    try:
        comm = ClipComm(process_group, timeout=ctl_timeout)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001
        raise GenerationFailed(f"could not set up the control plane with the other ranks: "
                               f"{type(e).__name__}: {short(e)}") from e
    return Run(s=s, comm=comm, group=process_group, timeout=ctl_timeout)


def check_and_agree(run: Run, extra_problems=None):
    """Arguments, model folder and outputs: every rank's own checks, then one agreement that
    refuses on every rank what any rank found, and that every rank was given the same run."""
    s, rank, world = run.s, run.rank, run.world

    def local():
        p = list(s.problems(rank, world))
        if isinstance(s.model, str):
            e, _ = inspect_model_dir(s.model)
            if e:
                p.append(e)
        return p
    problems = [p for p in (extra_problems or ()) if p] + checked(local)
    if not problems and s.video_frames < world:
        problems.append(f"frames ({s.video_frames}) is fewer than ranks ({world}): every rank "
                        "needs at least one frame")
    same(agree(run.comm, problems, s.comparable(), "the arguments"),
         "ranks were started with different arguments")


def load_model(run: Run, device=None):
    """The pipeline on this rank's device, the family's defaults for unset settings, the
    family's own checks; every rank agrees that they loaded the same weights."""
    s = run.s
    run.device = _device(device, run.comm, run.world)
    t0 = time.perf_counter()
    problems = []
    try:
        run.family = (inspect_model_dir(s.model)[1]["family"] if isinstance(s.model, str)
                      else family_of(s.model))
        if run.family is None:
            problems = [f"the model is a {type(s.model).__name__}; vinf_engine runs "
                        f"{accepted_pipelines()}"]
        else:
            run.pipe = (load_pipeline(s.model, dtype=_dtype(s.dtype, run.device, run.family),
                                      device=run.device)
                        if isinstance(s.model, str) else s.model)
            for k, v in run.family.defaults.items():
                if getattr(s, k) is None:
                    setattr(s, k, v)
            run.visual = read_visual(s)
            problems = checked(lambda: _model_problems(run.family, s, run.pipe, run.world,
                                                       run.visual))
            if not problems:
                run.digest = run.family.digest(run.pipe)
    except GenerationError as e:
        problems = [str(e)]
    except Exception as e:  # noqa: BLE001
        problems = [f"loading the model failed: {type(e).__name__}: {e}"]
    digests = agree(run.comm, problems, run.digest, "the model")
    if any(d != digests[0] for d in digests):
        raise GenerationError(f"generate refused: rank(s) "
                              f"{[r for r, d in enumerate(digests) if d != digests[0]]} "
                              "loaded different model weights than rank 0")
    run.timings["load"] = time.perf_counter() - t0


def plan(run: Run):
    """The video in latent terms, the config, the scheduler, this rank's clip, and the run's
    fingerprint (what a checkpoint must match)."""
    s, family, pipe = run.s, run.family, run.pipe
    run.plan = family.plan(s, pipe)
    run.warnings = family.prompt_warnings(s, pipe)
    if run.rank == 0:
        for w in run.warnings:
            say(f"warning: {w}")
    run.config = s.resolved_config(family.default_config(pipe))
    run.dtype = next(family.denoisers(pipe)[0].parameters()).dtype
    run.sched = family.make_scheduler(pipe, s.scheduler, run.plan)
    run.sched.set_timesteps(s.steps, device=run.device)
    run.layout = ClipLayout(run.plan.latent_frames, run.world)
    run.fps = getattr(family, "fps_conditioning", lambda *_: None)(s, pipe)
    record = dict(s.comparable(), model_digest=run.digest, height=run.plan.height,
                  width=run.plan.width, steps=s.steps, guidance=float(s.guidance_scale),
                  config=run.config.as_dict(), fps=None if run.fps is None else float(run.fps),
                  scheduler=type(run.sched).__name__,
                  # Private keys vary between processes (``_use_default_values`` is a set's
                  # order): only the public config defines the sampler.
                  scheduler_config=json.loads(json.dumps(
                      {k: v for k, v in dict(run.sched.config).items() if not k.startswith("_")},
                      sort_keys=True, default=str)),
                  dtype=str(run.dtype))
    for k in _OUTPUT_KEYS:
        record.pop(k)
    run.record = record
    run.fingerprint = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:32]


def resume(run: Run):
    """Checkpoints: what this rank can resume from, agreed with the others, and the step the
    run starts at (0 without ``resume``; a fresh checkpoint folder is checked either way)."""
    s = run.s
    if not s.checkpoint_dir:
        return
    run.ckpt = Checkpointer(s.checkpoint_dir, run.rank, run.world, run.fingerprint, run.record)
    shape = (1, run.plan.shape[1], len(run.frames), *run.plan.shape[3:])
    (run.start_step, run.latents, run.skipped,
     run.resumed_caches) = _resume_point(run.ckpt, s, run.sched, run.comm, run.device, shape)


# ==================================================================== the engine attached
@contextmanager
def attached(run: Run):
    """The denoisers parallelized for the phases inside; whatever breaks there is a broken
    run (``GenerationFailed``: the phase, the step, whether a peer may be to blame), and on
    the way out, success or not, every patch is undone and nothing half-written is left."""
    from .parallel import parallelize, unparallelize
    run.comm_before = run.comm.counters.snapshot()
    run.phase, run.step = "parallelize", run.start_step
    try:
        for m in run.denoisers:
            parallelize(m, run.config, run.group, comm_mode=run.s.comm_mode,
                        timeout=run.timeout, chunk_mib=run.s.chunk_mib, cache=run.s.cache)
        for m, state in zip(run.denoisers, run.resumed_caches or ()):
            if state is not None:
                m.vinf_engine.cache.load_state_dict(state)
        yield run
    except GenerationError:
        raise
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise GenerationFailed(_failure(run, e)) from e
    finally:
        _let_go(run)
        for m in run.denoisers:
            if getattr(m, "vinf_engine", None) is not None:
                unparallelize(m)


def condition(run: Run):
    """What the denoiser is conditioned on, for this rank's clip: the text of every scene
    (and the negative prompt, for guidance), through the family's encoder."""
    run.phase = "text encoding"
    t0 = time.perf_counter()
    run.cond = run.family.encode(run.pipe, run.s, run.plan, run.frames, run.device,
                                 run.visual)
    run.timings["text"] = time.perf_counter() - t0


def denoise(run: Run, progress: bool = True, callback=None):
    """The denoising loop over this rank's clip, checkpointed as asked; all noise drawn per
    global frame, so the video does not depend on the split."""
    s, sched = run.s, run.sched
    run.phase = "denoising"
    t0 = time.perf_counter()
    n_iter, timesteps = run.n_iter, sched.timesteps
    if run.latents is None:
        run.latents = run.cond.prepare(sched, initial_noise(
            s.seed, run.plan.shape, run.frames, device=run.device) * sched.init_noise_sigma)
    run.bar = bar = Progress(progress and run.rank == 0, n_iter, run.plan.frames, run.start_step)
    if run.start_step:
        bar.note(f"resuming from the checkpoint of step {run.start_step}/{n_iter}")
    for x in run.skipped:
        bar.note(f"skipped an unreadable checkpoint: {x}")
    with torch.no_grad():
        for i in range(run.start_step, n_iter):
            run.step = i
            run.latents = run.cond.after_step(sched, denoise_step(
                sched, run.cond, run.latents, i, timesteps[i], s.seed, run.plan.shape,
                run.frames, run.device), i)
            _check_finite(run.comm, run.latents, i, n_iter)
            done = i + 1
            if run.ckpt is not None and (done % s.checkpoint_every == 0 or done == n_iter):
                run.phase = "checkpoint"
                run.ckpt.save(done, run.latents, pack_scheduler_state(sched),
                              caches=_cache_states(run))
                run.phase = "denoising"
            if callback is not None:
                callback(i, timesteps[i], run.latents)
            bar.step(done, final=done == n_iter)
    run.latents = run.cond.finish(run.latents)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    run.timings["denoise"] = time.perf_counter() - t0
    run.step = n_iter
    run.engine_stats = _sum_counters(m.vinf_engine.comm.counters.snapshot()
                                     for m in run.denoisers)
    run.cache_reports = [m.vinf_engine.cache.report() for m in run.denoisers
                         if m.vinf_engine.cache is not None]


def _cache_states(run: Run):
    """Every denoiser's step cache state (None without one): a resumed run decides alike."""
    return [None if m.vinf_engine.cache is None else m.vinf_engine.cache.state_dict()
            for m in run.denoisers]


def decode_and_write(run: Run):
    """The outputs: the whole video's latents gathered to rank 0, every rank's frames decoded
    in chunks and streamed to rank 0's encoder; both appear, renamed into place, only when
    both are complete."""
    from .output import gather_latents, stream_video
    s, rank, pending = run.s, run.rank, run.pending
    t0 = time.perf_counter()
    if s.save_latents is not None:
        run.phase = "gathering latents"
        tmp = gather_latents(run.latents, run.layout, run.comm, s.save_latents)
        if tmp is not None:
            pending["latents"] = tmp
    run.timings["save_latents"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if s.out is not None:
        run.phase = "decoding and writing the video"
        if rank == 0:
            from .video import VideoWriter
            pending["video"] = VideoWriter(s.out, run.plan.width, run.plan.height,
                                           fps=s.video_fps, crf=s.crf)
            if run.visual.prefix is not None:       # the video extended, then the new frames
                pending["video"].write(run.family.prefix_frames(run.pipe, run.visual, run.plan))
        chunks = run.family.decode(run.pipe, run.latents, run.layout, rank, run.comm,
                                   s.decode_chunk)
        first = run.plan.video_frames(run.frames).start
        stream_video(_after(chunks, run.visual.context - first), run.comm,
                     (run.plan.height, run.plan.width), pending.get("video"), run.bar.note)
    run.phase = "committing the outputs"
    if "video" in pending:
        pending.pop("video").commit()
    if "latents" in pending:
        os.replace(pending.pop("latents"), s.save_latents)
    run.timings["decode_write"] = time.perf_counter() - t0


def _after(chunks, skip: int):
    """The frames of ``chunks`` ((n, H, W, 3) arrays, in order) past their first ``skip``:
    an extension's context opens the new video and is written as the input's own frames."""
    for arr in chunks:
        if skip >= len(arr):
            skip -= len(arr)
            continue
        yield arr[max(0, skip):]
        skip = 0


# ==================================================================== after
def report(run: Run) -> dict:
    """The run's report, the same on every rank (one more agreement: every rank's timings,
    memory and traffic), with this rank's final latents (fp32, CPU) under ``"latents"``."""
    s, plan_ = run.s, run.plan
    run.timings["total"] = time.perf_counter() - run.t_start
    per_rank = _per_rank(run)
    if run.ckpt is not None:
        run.ckpt.clear()
    denoised = run.n_iter - run.start_step
    slowest = max(r["timings_s"].get("denoise", 0.0) for r in per_rank)
    out = dict(
        output=os.path.abspath(s.out) if s.out else None,
        latents_file=os.path.abspath(s.save_latents) if s.save_latents else None,
        model=s.model if isinstance(s.model, str) else type(s.model).__name__,
        model_kind=run.family.kind(run.pipe), frames=plan_.frames,
        latent_frames=plan_.latent_frames, height=plan_.height, width=plan_.width,
        steps=s.steps, scheduler_iterations=run.n_iter, scheduler=type(run.sched).__name__,
        guidance_scale=s.guidance_scale, seed=s.seed, fps_conditioning=run.fps,
        scenes=[list(x) for x in s.scenes], config=run.config.as_dict(), ranks=run.world,
        images=list(run.visual.frames) if run.visual and s.extend is None else [],
        extended=None if s.extend is None else dict(
            input=os.path.abspath(s.extend), input_frames=len(run.visual.prefix),
            context_frames=run.visual.context, new_frames=s.num_frames,
            output_frames=len(run.visual.prefix) + s.num_frames),
        backend=run.comm.backend or "none", comm_mode=s.comm_mode,
        dtype=str(run.dtype).replace("torch.", ""), resumed_from_step=run.start_step or None,
        skipped_checkpoints=run.skipped, warnings=run.warnings, steps_run=denoised,
        frame_steps_per_s=(plan_.frames * denoised / slowest) if slowest > 0 and denoised else None,
        timings_s={k: max(r["timings_s"].get(k, 0.0) for r in per_rank)
                   for k in per_rank[0]["timings_s"]},
        comm_total={k: sum(r["comm"].get(k, 0) for r in per_rank) for k in per_rank[0]["comm"]},
        cache=run.cache_reports or None, per_rank=per_rank)
    out["latents"] = run.latents.detach().float().cpu()
    return out


def _per_rank(run: Run) -> list:
    from .ops import dispatch
    after, before = run.comm.counters.snapshot(), run.comm_before
    peak, kind = peak_memory_mib(run.device)
    mine = dict(rank=run.rank, frames=len(run.frames), first_frame=run.frames.start,
                cache=[dict(decisions=r["decisions"], own_changes=r["own_changes"])
                       for r in run.cache_reports],
                device=str(run.device), peak_memory_mib=round(peak, 1), memory_kind=kind,
                backends=dispatch.summary(),
                timings_s={k: round(v, 4) for k, v in run.timings.items()},
                comm=dict(run.engine_stats,
                          frames_bytes_sent=after["bytes_sent"] - before["bytes_sent"],
                          frames_bytes_received=after["bytes_received"] - before["bytes_received"]))
    try:
        return run.comm.agree(mine)
    except Exception as e:  # noqa: BLE001 - the video is safe; say so
        raise GenerationFailed(f"rank {run.rank}: the video is done but the final report could "
                               f"not be gathered: {type(e).__name__}: {short(e)}") from e


# ==================================================================== the denoising step
def denoise_step(sched, cond, latents, i: int, t, seed: int, shape: tuple, frames: range,
                 device) -> torch.Tensor:
    """One denoising step of this rank's latents ``(1, C, F_rank, h, w)``: the guided model
    prediction, then the scheduler, with any noise it adds drawn per global frame."""
    out = cond.predict(latents, t)
    b, c, f, h, w = latents.shape
    params = inspect.signature(sched.step).parameters
    kw = {}
    if "variance_noise" in params:
        kw["variance_noise"] = rows(step_noise(seed, i, shape, frames, device=device))
    elif "generator" in params:
        kw["generator"] = step_generators(seed, i, frames)
    # The scheduler sees one row per frame (see pipelines.base.rows).
    nxt = sched.step(rows(out), t, rows(latents), **kw).prev_sample
    return nxt.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4).float()


class NonFiniteError(RuntimeError):
    """The latents hold NaN or Inf: the model's weights or numerics broke, not a peer."""


def _check_finite(comm: ClipComm, latents, i: int, n: int):
    """Every rank's latents finite after step ``i``, or every rank raises naming the ranks:
    one device sync and, with several ranks, one control-plane agreement per step."""
    ok = bool(torch.isfinite(latents).all())
    oks = comm.agree(ok) if comm.world_size > 1 else [ok]
    if not all(oks):
        bad = [r for r, x in enumerate(oks) if not x]
        raise NonFiniteError(
            f"the latents hold NaN or Inf after step {i + 1}/{n} on rank(s) {bad}: the model's "
            "weights or its numerics produce them (in float16, try --dtype bfloat16); nothing "
            "was written")


# ==================================================================== phases' helpers
def _failure(run: Run, e: BaseException) -> str:
    where = (f" (step {run.step + 1}/{run.n_iter})"
             if run.phase in ("denoising", "checkpoint") else "")
    msg = (f"rank {run.rank}: generation failed during {run.phase}{where}: "
           f"{type(e).__name__}: {short(e)}")
    if run.world > 1 and "peer" not in msg and not isinstance(e, NonFiniteError):
        msg += (" -- if this is a communication error or a timeout, another rank died or "
                "stopped responding; see its log")
    return msg


def _let_go(run: Run):
    """Outputs not committed are removed; the conditioning's patches are undone."""
    video, latents = run.pending.pop("video", None), run.pending.pop("latents", None)
    if video is not None:
        video.abort()
    if latents is not None:
        try:
            os.unlink(latents)
        except FileNotFoundError:
            pass
    if run.cond is not None:
        run.cond.close()


def _model_problems(family, s: GenerateSettings, pipe, world: int, visual) -> list[str]:
    from .models import adapter_for
    p = list(family.check(s, pipe)) + list(family.check_visual(s, pipe, visual))
    config = s.resolved_config(family.default_config(pipe))
    for m in family.denoisers(pipe):
        if getattr(m, "vinf_engine", None) is not None:
            return [f"the pipeline's {type(m).__name__} is already parallelized (call "
                    "vinf_engine.unparallelize first)"]
        adapter = adapter_for(m)
        if isinstance(adapter, str):
            return [adapter]
        if s.comm_mode not in adapter.comm_modes:
            p.append(f"comm mode {s.comm_mode!r} is not available for {family.name} (it runs "
                     f"{', '.join(x for x in adapter.comm_modes if x != 'loopback')})")
        why = adapter.check_config(m, config)
        if why:
            p.append(why)
    p = list(dict.fromkeys(p))                 # two experts: one message each
    p += family.check_weights(pipe)
    p += _scheduler_problems(family, s, pipe)
    if not p:
        plan_ = family.plan(s, pipe)
        if plan_.latent_frames < world:
            what = ("latent frames" if plan_.unit == 1 else
                    f"token frames ({plan_.unit} latent frames each)")
            p.append(f"{plan_.frames} frames make {plan_.latent_frames} {what}, fewer than "
                     f"ranks ({world}): every rank needs at least one")
    return p


def _scheduler_problems(family, s: GenerateSettings, pipe) -> list[str]:
    why = family.scheduler_problem(s.scheduler)
    if why:
        return [why]
    sched = family.make_scheduler(pipe, s.scheduler)
    limit = getattr(sched.config, "num_train_timesteps", None)
    if limit is not None and s.steps > limit:
        return [f"steps {s.steps} is more than the scheduler's {limit} training timesteps"]
    try:
        sched.set_timesteps(s.steps)
    except Exception as e:  # noqa: BLE001 - whatever the scheduler says, said now
        return [f"{type(sched).__name__} cannot take {s.steps} steps: {short(e)}"]
    return []


def _resume_point(ckpt, s, sched, comm, device, clip_shape) -> tuple:
    """``(start_step, latents or None, skipped)`` from the checkpoints every rank holds,
    agreed."""
    problems, steps_avail, skipped = [], [], []
    try:
        pack_scheduler_state(sched)          # a scheduler we cannot save fails now, not at step k
        if s.resume:
            err, steps_avail, skipped = ckpt.check_resumable()
        else:
            err = ckpt.check_fresh()
        if err:
            problems.append(err)
    except CheckpointError as e:
        problems.append(f"checkpointing: {e}")
    except Exception as e:  # noqa: BLE001
        problems.append(f"checkpoint dir: {type(e).__name__}: {e}")
    held = agree(comm, problems, (steps_avail, skipped), "the checkpoint")
    if not s.resume:
        return 0, None, [], None
    skipped = [f"rank {r}: {x}" for r, (_, sk) in enumerate(held) for x in sk]
    held = [h for h, _ in held]
    common = set(held[0]).intersection(*(set(x) for x in held[1:]))
    if not common:
        raise GenerationError(
            "generate refused: --resume: the ranks hold no checkpoint of a common step ("
            + "; ".join(f"rank {r}: {x}" for r, x in enumerate(held)) + ")")
    start = max(common)
    problems, latents, restored = [], None, None
    try:
        head = ckpt.load(start)
        latents = head["latents"].to(torch.float32)
        if tuple(latents.shape) != tuple(clip_shape):
            raise CheckpointError(f"latents of shape {tuple(latents.shape)} in "
                                  f"{ckpt.path(start)} do not fit this run")
        restored = head["scheduler"]
        caches = head.get("caches")
    except Exception as e:  # noqa: BLE001
        problems.append(f"checkpoint step {start}: {unreadable(e)}")
    agree(comm, problems, None, "the checkpoint")
    restore_scheduler_state(sched, restored, device)
    caches = [None if c is None else restore_cache_state(c, device) for c in (caches or ())]
    return start, latents.to(device), skipped, caches


def _device(device, comm, world) -> torch.device:
    if device is None:
        device = (torch.device("cuda", torch.cuda.current_device())
                  if comm.backend == "nccl" or (torch.cuda.is_available() and world == 1)
                  else torch.device("cpu"))
    return torch.device(device)


def _dtype(name, device, family) -> torch.dtype:
    if name:
        return DTYPES[name]
    if device.type != "cuda":
        return torch.float32
    return family.cuda_dtype


def _sum_counters(snapshots) -> dict:
    total: dict = {}
    for snap in snapshots:
        for k, v in snap.items():
            total[k] = total.get(k, 0) + v
    return total
