"""Long-video generation over a diffusers text-to-video pipeline, on one rank or many.

    import vinf_engine as vinf
    vinf.generate("models/zeroscope", "a red panda eating bamboo", num_frames=256,
                  out="panda.mp4")                       # on every rank (torchrun) or alone

Every rank loads the pipeline, denoises its own clip of the video with the clip-parallel
denoiser (classifier-free guidance in the batch), draws all noise per global frame from the
seed, decodes its frames, and sends them to rank 0, which encodes the mp4 as they arrive. The
video depends on the seed, the prompts and the settings, not on the number of ranks. What
differs between pipeline families (UNet3D, Wan) lives in ``vinf_engine/pipelines``; this
module is the phases.

Failures are collective: arguments, the model folder, the output path and checkpoints are
checked on every rank and agreed on the CPU control plane before any data moves, so a problem
on one rank raises the same ``GenerationError`` on all of them. A rank that dies or stops
answering mid-run makes the others raise ``GenerationFailed`` when the process group's timeout
expires (or at once, when the transport notices the closed connection).
"""
from __future__ import annotations

import datetime
import hashlib
import inspect
import json
import os
import sys
import time
from typing import Callable, Sequence

import torch

from .checkpoint import (Checkpointer, CheckpointError, pack_scheduler_state,
                         restore_scheduler_state, unreadable)
from .comm import ClipComm
from .layout import ClipLayout
from .noise import initial_noise, step_generators, step_noise
from .pipelines import family_of, inspect_model_dir, load_pipeline
from .pipelines.base import rows
from .progress import Progress, peak_memory_mib
from .prompts import read_prompt_file
from .settings import (DEFAULTS, DTYPES, GenerateSettings, GenerationError, GenerationFailed)

__all__ = ["generate", "load_pipeline", "inspect_model_dir", "read_prompt_file", "GenerationError",
           "GenerationFailed", "GenerateSettings", "DEFAULTS"]


# ==================================================================== agreement
def _refuse(rows_, what: str):
    """Raise the same GenerationError on every rank when any rank reported a problem."""
    by_msg: dict = {}
    for r, problems in enumerate(rows_):
        for msg in problems:
            by_msg.setdefault(msg, []).append(r)
    if not by_msg:
        return
    world = len(rows_)
    parts = []
    for msg, ranks in by_msg.items():
        who = ("" if world == 1 else "every rank: " if len(ranks) == world
               else f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: ")
        parts.append(who + msg)
    raise GenerationError(f"{what}: " + "; ".join(parts))


def _agree(comm: ClipComm, problems: list, payload, what: str) -> list:
    """Every rank's ``payload``, after refusing on every rank if any rank has ``problems``.
    A rank that died or hangs before the run starts: a clear failure, not a traceback."""
    try:
        got = comm.agree((problems, payload))
    except Exception as e:  # noqa: BLE001
        raise GenerationFailed(f"rank {comm.rank}: could not agree with the other ranks on "
                               f"{what}: {type(e).__name__}: {_short(e)}") from e
    _refuse([r[0] for r in got], "generate refused")
    return [r[1] for r in got]


def _checked(fn) -> list:
    """``fn()``'s problems; a local crash becomes a problem, so no rank is left waiting."""
    try:
        return list(fn())
    except GenerationError as e:
        return [str(e)]
    except Exception as e:  # noqa: BLE001
        return [f"{type(e).__name__}: {e}"]


# ==================================================================== generate
def generate(model=None, prompts=None, *, settings: GenerateSettings | None = None,
             device=None, process_group=None, timeout: float | None = None,
             progress: bool = True, callback: Callable | None = None,
             extra_problems: Sequence[str] | None = None, **fields) -> dict:
    """Generate a long video; call on every rank with the same arguments (or alone).

    Parameters
    ----------
    model : str or a loaded pipeline
        A local diffusers pipeline folder (``TextToVideoSDPipeline``: ModelScope, Zeroscope;
        VideoCrafter2 in diffusers layout; ``WanPipeline``: Wan 2.1, Wan 2.2 A14B, Wan 2.2
        TI2V-5B), or a pipeline already loaded by ``load_pipeline``.
    prompts : str, list of str, or list of (first_frame, str)
        One prompt; several, splitting the video evenly into scenes; or a schedule of scenes
        by global (video) frame. Alternatively ``prompt_file`` (see ``read_prompt_file``).
    settings : GenerateSettings
        Everything else; or give its fields as keyword arguments:
        ``num_frames`` (video frames; Wan: ``4k + 1``), ``out`` (the mp4, rank 0; written to a
        hidden temporary file and renamed on success; an existing file is refused unless
        ``overwrite``; None: no video), ``steps``, ``guidance_scale`` (classifier-free guidance
        when > 1), ``guidance_scale_2`` (Wan 2.2's low-noise expert; default the same),
        ``seed``, ``negative_prompt``, ``config`` (a ``DualScopeConfig``, or a dict overriding
        fields of the family's default), ``height``, ``width``, ``fps`` (VideoCrafter2's
        frame-rate conditioning), ``video_fps`` and ``crf`` (the mp4), ``scheduler`` (a name of
        the family's ``schedulers``; default the pipeline's own), ``dtype`` ("float32",
        "float16", "bfloat16"; default bfloat16 for Wan and float16 for UNet3D on CUDA, float32
        on CPU), ``decode_chunk`` (latent frames the VAE decodes at once), ``save_latents`` (a
        ``.pt`` file for the whole video's final latents), ``checkpoint_dir``,
        ``checkpoint_every``, ``resume`` (a resumed video is identical to an uninterrupted
        one), ``chunk_mib`` (each layer's working memory, default 1024; see
        ``vinf_engine.parallelize``), ``comm_mode`` ("overlap", exact, the default; "blocking", the published
        pattern, UNet3D only; "stale", the previous step's halos and statistics).
        Unset steps, guidance and video fps take the family's defaults (UNet3D: the paper's
        30, 12, 8; Wan: WanPipeline's 50, 5, 16).
    device : the rank's device (default: its CUDA device, else the CPU).
    process_group, timeout
        The ranks (default: the whole world, or one process) and the control plane's timeout
        in seconds. The data plane's timeout is the process group's own (set at
        ``init_process_group``; the CLI's ``--timeout`` sets both).
    callback : callable(step, timestep, latents)
        Called on every rank after each denoising step.
    extra_problems : list of str
        Problems the caller found with its own inputs (the CLI's), refused with the others.

    Returns
    -------
    dict: the run's report (every rank gets it) plus ``"latents"``, this rank's final latents
    ``(1, C, F_rank, h, w)`` in float32 on the CPU (F_rank latent frames).
    """
    t_start = time.perf_counter()
    timings = {}
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
                               f"{type(e).__name__}: {_short(e)}") from e
    rank, world = comm.rank, comm.world_size

    # 1. Arguments, model folder, outputs: local checks, then one agreement.
    problems = [p for p in (extra_problems or ()) if p] + _checked(lambda: s.problems(rank, world))
    if not problems and s.num_frames < world:
        problems.append(f"frames ({s.num_frames}) is fewer than ranks ({world}): every rank "
                        "needs at least one frame")
    _same(_agree(comm, problems, s.comparable(), "the arguments"),
          "ranks were started with different arguments")

    # 2. The model, on this rank's device; the family's defaults; its own checks.
    device = _device(device, comm, world)
    t0 = time.perf_counter()
    pipe = family = plan = None
    digest, problems = None, []
    try:
        family = (inspect_model_dir(s.model)[1]["family"] if isinstance(s.model, str)
                  else family_of(s.model))
        if family is None:
            problems = [f"the model is a {type(s.model).__name__}; vinf_engine runs "
                        "TextToVideoSDPipeline, VideoCrafter2 and WanPipeline pipelines"]
        else:
            tdtype = _dtype(s.dtype, device, family)
            pipe = (load_pipeline(s.model, dtype=tdtype, device=device)
                    if isinstance(s.model, str) else s.model)
            for k, v in family.defaults.items():
                if getattr(s, k) is None:
                    setattr(s, k, v)
            problems = _checked(lambda: _model_problems(family, s, pipe, world))
            if not problems:
                plan = family.plan(s, pipe)
                digest = family.digest(pipe)
    except GenerationError as e:
        problems = [str(e)]
    except Exception as e:  # noqa: BLE001
        problems = [f"loading the model failed: {type(e).__name__}: {e}"]
    digests = _agree(comm, problems, digest, "the model")
    if any(d != digests[0] for d in digests):
        raise GenerationError(f"generate refused: rank(s) "
                              f"{[r for r, d in enumerate(digests) if d != digests[0]]} "
                              "loaded different model weights than rank 0")
    timings["load"] = time.perf_counter() - t0
    warns = family.prompt_warnings(s, pipe)
    if rank == 0:
        for w in warns:
            _say(f"warning: {w}")
    config = s.resolved_config(family.default_config(pipe))
    tdtype = next(family.denoisers(pipe)[0].parameters()).dtype

    sched = family.make_scheduler(pipe, s.scheduler)
    sched.set_timesteps(s.steps, device=device)
    timesteps = sched.timesteps
    n_iter = len(timesteps)
    layout = ClipLayout(plan.latent_frames, world)
    frames = layout.frames(rank)
    fps_value = getattr(family, "fps_conditioning", lambda *_: None)(s, pipe)
    record = dict(s.comparable(), model_digest=digest, height=plan.height, width=plan.width,
                  steps=s.steps, guidance=float(s.guidance_scale),
                  config=config.as_dict(), fps=None if fps_value is None else float(fps_value),
                  scheduler=type(sched).__name__,
                  # Private keys vary between processes (``_use_default_values`` is a set's
                  # order): only the public config defines the sampler.
                  scheduler_config=json.loads(json.dumps(
                      {k: v for k, v in dict(sched.config).items() if not k.startswith("_")},
                      sort_keys=True, default=str)),
                  dtype=str(tdtype))
    for k in ("decode_chunk", "video_fps", "crf", "checkpoint", "checkpoint_every", "resume",
              "out", "save_latents"):
        record.pop(k)
    fingerprint = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:32]

    # 3. Checkpoints: what this rank can resume from, then agree on the step.
    ckpt, start_step, latents, skipped = None, 0, None, []
    if s.checkpoint_dir:
        ckpt = Checkpointer(s.checkpoint_dir, rank, world, fingerprint, record)
        start_step, latents, skipped = _resume_point(
            ckpt, s, sched, comm, device, (1, plan.shape[1], len(frames), *plan.shape[3:]))

    # Inputs are settled. From here a failure is a broken run, not bad input.
    from .parallel import parallelize, unparallelize
    cond = writer = latents_tmp = None
    engine_stats = {}
    phase, step_i = "parallelize", start_step
    out_before = comm.counters.snapshot()
    denoisers = family.denoisers(pipe)
    try:
        for m in denoisers:
            parallelize(m, config, process_group, comm_mode=s.comm_mode, timeout=ctl_timeout,
                        chunk_mib=s.chunk_mib)

        # 4. Text: one embedding per scene (+ the negative prompt for guidance).
        phase = "text encoding"
        t0 = time.perf_counter()
        cond = family.encode(pipe, s, plan, frames, device)
        timings["text"] = time.perf_counter() - t0

        # 5. Denoising.
        phase = "denoising"
        t0 = time.perf_counter()
        if latents is None:
            latents = initial_noise(s.seed, plan.shape, frames, device=device) * sched.init_noise_sigma
        bar = Progress(progress and rank == 0, n_iter, plan.frames, start_step)
        if start_step:
            bar.note(f"resuming from the checkpoint of step {start_step}/{n_iter}")
        for x in skipped:
            bar.note(f"skipped an unreadable checkpoint: {x}")
        with torch.no_grad():
            for i in range(start_step, n_iter):
                step_i = i
                latents = denoise_step(sched, cond, latents, i, timesteps[i], s.seed,
                                       plan.shape, frames, device)
                _check_finite(comm, latents, i, n_iter)
                done = i + 1
                if ckpt is not None and (done % s.checkpoint_every == 0 or done == n_iter):
                    phase = "checkpoint"
                    ckpt.save(done, latents, pack_scheduler_state(sched))
                    phase = "denoising"
                if callback is not None:
                    callback(i, timesteps[i], latents)
                bar.step(done, final=done == n_iter)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings["denoise"] = time.perf_counter() - t0
        step_i = n_iter
        engine_stats = _sum_counters(m.vinf_engine.comm.counters.snapshot() for m in denoisers)

        # 6. Outputs: latents, then frames decoded in chunks, streamed to rank 0's encoder.
        from .output import gather_latents, stream_video
        t0 = time.perf_counter()
        if s.save_latents is not None:
            phase = "gathering latents"
            latents_tmp = gather_latents(latents, layout, comm, s.save_latents)
        timings["save_latents"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if s.out is not None:
            phase = "decoding and writing the video"
            if rank == 0:
                from .video import VideoWriter
                writer = VideoWriter(s.out, plan.width, plan.height, fps=s.video_fps, crf=s.crf)
            stream_video(family.decode(pipe, latents, layout, rank, comm, s.decode_chunk), comm,
                         (plan.height, plan.width), writer, bar.note)
        # Both outputs appear together, and only when both are complete.
        phase = "committing the outputs"
        if writer is not None:
            writer.commit()
            writer = None
        if latents_tmp is not None:
            os.replace(latents_tmp, s.save_latents)
            latents_tmp = None
        timings["decode_write"] = time.perf_counter() - t0
    except GenerationError:
        raise
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        where = f" (step {step_i + 1}/{n_iter})" if phase in ("denoising", "checkpoint") else ""
        msg = f"rank {rank}: generation failed during {phase}{where}: {type(e).__name__}: {_short(e)}"
        if world > 1 and "peer" not in msg and not isinstance(e, NonFiniteError):
            msg += (" -- if this is a communication error or a timeout, another rank died or "
                    "stopped responding; see its log")
        raise GenerationFailed(msg) from e
    finally:
        if writer is not None:
            writer.abort()
        if latents_tmp is not None:
            try:
                os.unlink(latents_tmp)
            except FileNotFoundError:
                pass
        if cond is not None:
            cond.close()
        for m in denoisers:
            if getattr(m, "vinf_engine", None) is not None:
                unparallelize(m)

    # 7. Report (one more agreement: every rank's timings, memory and traffic).
    timings["total"] = time.perf_counter() - t_start
    out_after = comm.counters.snapshot()
    peak, kind = peak_memory_mib(device)
    from .ops import dispatch
    mine = dict(rank=rank, frames=len(frames), first_frame=frames.start, device=str(device),
                peak_memory_mib=round(peak, 1), memory_kind=kind, backends=dispatch.summary(),
                timings_s={k: round(v, 4) for k, v in timings.items()},
                comm=dict(engine_stats,
                          frames_bytes_sent=out_after["bytes_sent"] - out_before["bytes_sent"],
                          frames_bytes_received=(out_after["bytes_received"]
                                                 - out_before["bytes_received"])))
    try:
        per_rank = comm.agree(mine)
    except Exception as e:  # noqa: BLE001 - the video is safe; say so
        raise GenerationFailed(f"rank {rank}: the video is done but the final report could not be "
                               f"gathered: {type(e).__name__}: {_short(e)}") from e
    if ckpt is not None:
        ckpt.clear()
    denoised = n_iter - start_step
    slowest = max(r["timings_s"].get("denoise", 0.0) for r in per_rank)
    report = dict(
        output=os.path.abspath(s.out) if s.out else None,
        latents_file=os.path.abspath(s.save_latents) if s.save_latents else None,
        model=s.model if isinstance(s.model, str) else type(s.model).__name__,
        model_kind=family.kind(pipe), frames=plan.frames, latent_frames=plan.latent_frames,
        height=plan.height, width=plan.width, steps=s.steps, scheduler_iterations=n_iter,
        scheduler=type(sched).__name__, guidance_scale=s.guidance_scale, seed=s.seed,
        fps_conditioning=fps_value, scenes=[list(x) for x in s.scenes], config=config.as_dict(),
        ranks=world, backend=comm.backend or "none", comm_mode=s.comm_mode,
        dtype=str(tdtype).replace("torch.", ""),
        resumed_from_step=start_step or None, skipped_checkpoints=skipped, warnings=warns,
        steps_run=denoised,
        frame_steps_per_s=(plan.frames * denoised / slowest) if slowest > 0 and denoised else None,
        timings_s={k: max(r["timings_s"].get(k, 0.0) for r in per_rank)
                   for k in per_rank[0]["timings_s"]},
        comm_total={k: sum(r["comm"].get(k, 0) for r in per_rank) for k in per_rank[0]["comm"]},
        per_rank=per_rank)
    report["latents"] = latents.detach().float().cpu()
    return report


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
def _model_problems(family, s: GenerateSettings, pipe, world: int) -> list[str]:
    from .models import adapter_for
    p = list(family.check(s, pipe))
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
    why = family.scheduler_problem(s.scheduler)
    if why:
        p.append(why)
    else:
        sched = family.make_scheduler(pipe, s.scheduler)
        limit = getattr(sched.config, "num_train_timesteps", None)
        if limit is not None and s.steps > limit:
            p.append(f"steps {s.steps} is more than the scheduler's {limit} training timesteps")
        else:
            try:
                sched.set_timesteps(s.steps)
            except Exception as e:  # noqa: BLE001 - whatever the scheduler says, said now
                p.append(f"{type(sched).__name__} cannot take {s.steps} steps: {_short(e)}")
    if not p:
        plan = family.plan(s, pipe)
        if plan.latent_frames < world:
            p.append(f"{plan.frames} frames make {plan.latent_frames} latent frames, fewer than "
                     f"ranks ({world}): every rank needs at least one latent frame")
    return p


def _resume_point(ckpt, s, sched, comm, device, clip_shape) -> tuple:
    """``(start_step, latents or None)`` from the checkpoints every rank holds, agreed."""
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
    held = _agree(comm, problems, (steps_avail, skipped), "the checkpoint")
    if not s.resume:
        return 0, None, []
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
    except Exception as e:  # noqa: BLE001
        problems.append(f"checkpoint step {start}: {unreadable(e)}")
    _agree(comm, problems, None, "the checkpoint")
    restore_scheduler_state(sched, restored, device)
    return start, latents.to(device), skipped


def _same(values: list, what: str):
    """Refuse unless every rank's ``values`` (dicts) are equal; the message names the keys."""
    diff = [r for r, v in enumerate(values) if v != values[0]]
    if not diff:
        return
    keys = sorted(k for k in values[0] if any(values[r].get(k) != values[0].get(k) for r in diff))
    detail = "; ".join(f"{k}: " + ", ".join(f"rank {r}: {values[r].get(k)!r}" for r in [0] + diff)
                       for k in keys)
    raise GenerationError(f"generate refused: {what} ({detail})")


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
    return torch.bfloat16 if family.name == "Wan" else torch.float16


def _sum_counters(snapshots) -> dict:
    total: dict = {}
    for snap in snapshots:
        for k, v in snap.items():
            total[k] = total.get(k, 0) + v
    return total


def _say(line: str):
    """One line on stderr in one write, so that ranks sharing a terminal never mix lines."""
    sys.stderr.write(f"vinf_engine: {line}\n")
    sys.stderr.flush()


def _short(e: BaseException, limit: int = 400) -> str:
    text = str(e).strip().splitlines()
    text = text[0] if text else ""
    return text if len(text) <= limit else text[:limit] + "..."
