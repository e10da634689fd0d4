"""``python -m vinf_engine generate``: a long video from a local diffusers pipeline folder.

    python -m vinf_engine generate --model models/zeroscope --prompt "a red panda" \\
        --frames 256 --steps 30 --out panda.mp4
    torchrun --nproc-per-node 8 -m vinf_engine generate --model ... --frames 2300 --out long.mp4

One process, or one per rank under torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous variables from the environment; NCCL when CUDA is available, gloo otherwise; one
GPU per local rank). Rank 0 shows progress on stderr and prints a JSON report on stdout.

Exit codes: 0 done; 2 bad input (the same message on every rank, nothing written); 1 the run
failed after it started (a rank died or timed out, a write failed; nothing written under the
output's name); 130 interrupted.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import traceback

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def build_parser() -> argparse.ArgumentParser:
    from .pipeline import DEFAULTS, SCHEDULERS
    ap = argparse.ArgumentParser(prog="python -m vinf_engine",
                                 description="Long videos from short-clip video diffusion models.")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a video from text",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Generate a long video on one process or on every rank of "
                                   "torchrun. Numbers are checked after parsing, on every rank "
                                   "together, so that ranks fail with the same message.")
    m = g.add_argument_group("model and prompt")
    m.add_argument("--model", required=True, metavar="DIR",
                   help="local diffusers pipeline folder (ModelScope / Zeroscope "
                        "TextToVideoSDPipeline, or VideoCrafter2 in diffusers layout); "
                        "nothing is downloaded")
    m.add_argument("--prompt", action="append", metavar="TEXT",
                   help="the prompt; repeat it for several scenes splitting the video evenly")
    m.add_argument("--prompt-file", metavar="FILE",
                   help="one scene per line, optionally 'FRAME: prompt' (first frame of the scene)")
    m.add_argument("--negative-prompt", metavar="TEXT", default=None)
    v = g.add_argument_group("video")
    v.add_argument("--frames", required=True, metavar="N", help="frames of the whole video")
    v.add_argument("--height", metavar="PX", default=None)
    v.add_argument("--width", metavar="PX", default=None)
    v.add_argument("--out", metavar="FILE.mp4", default=None,
                   help="the video (rank 0 writes it; renamed into place when complete)")
    v.add_argument("--overwrite", action="store_true", help="replace an existing --out / --save-latents")
    v.add_argument("--video-fps", metavar="FPS", default=str(DEFAULTS["video_fps"]),
                   help="frame rate of the mp4")
    v.add_argument("--crf", metavar="Q", default=str(DEFAULTS["crf"]), help="x264 quality (0-51)")
    v.add_argument("--save-latents", metavar="FILE.pt", default=None,
                   help="also save the whole video's final latents")
    s = g.add_argument_group("sampling")
    s.add_argument("--steps", metavar="S", default=str(DEFAULTS["steps"]))
    s.add_argument("--guidance", metavar="G", default=str(DEFAULTS["guidance_scale"]),
                   help="classifier-free guidance scale (no guidance at <= 1)")
    s.add_argument("--seed", metavar="N", default="0")
    s.add_argument("--scheduler", default=None, metavar="NAME",
                   help=f"one of {', '.join(sorted(SCHEDULERS))} (dpm++sde: the paper's "
                        "DPM-Solver++ (SDE)); default: the pipeline's own")
    s.add_argument("--fps", metavar="FPS", default=None,
                   help="VideoCrafter2's frame-rate conditioning (default 24)")
    s.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: "
                                                 "float16 on CUDA, float32 on CPU)")
    c = g.add_argument_group("clip parallelism (dual-scope attention)")
    c.add_argument("--window", metavar="W", default="8")
    c.add_argument("--num-global", metavar="G", default="16")
    c.add_argument("--phase-t", metavar="T", default="800")
    c.add_argument("--phase-bias", metavar="B", default="10.0")
    c.add_argument("--per-clip-groupnorm", action="store_true",
                   help="GroupNorm statistics per clip (the published prototype; ablation only)")
    c.add_argument("--comm-mode", metavar="MODE", default="overlap",
                   help="how the ranks' exchanges move: overlap (exact, default), blocking "
                        "(the published pattern, same video), stale (the previous step's "
                        "halos and statistics: no waiting, a slightly different video)")
    r = g.add_argument_group("runtime")
    r.add_argument("--decode-chunk", metavar="N", default=str(DEFAULTS["decode_chunk"]),
                   help="frames the VAE decodes at once")
    r.add_argument("--checkpoint-dir", metavar="DIR", default=None,
                   help="save each rank's latents every --checkpoint-every steps")
    r.add_argument("--checkpoint-every", metavar="K", default=str(DEFAULTS["checkpoint_every"]))
    r.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    r.add_argument("--timeout", metavar="SECONDS", default=str(DEFAULTS["timeout"]),
                   help="how long a rank waits for the others at any collective before failing "
                        "(also the rendezvous timeout)")
    r.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    r.add_argument("--report", metavar="FILE.json", default=None, help="also write the JSON report here")
    r.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return ap


def _num(text, kind):
    """``text`` as ``kind``; on failure the text itself, which generate's checks then name."""
    if text is None:
        return None
    try:
        return kind(text)
    except (TypeError, ValueError):
        return text


def _env_int(name, default):
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise SystemExit(f"vinf_engine generate: error: environment variable {name}={v!r} "
                         "is not an integer") from None


def _log(rank: int, world: int, msg: str):
    prefix = "vinf_engine generate" + (f" [rank {rank}/{world}]" if world > 1 else "")
    print(f"{prefix}: {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        return generate_command(args)
    return EXIT_BAD_INPUT


def _terminate_as_interrupt(signum, frame):
    # torchrun (and schedulers) stop workers with SIGTERM: unwind like Ctrl-C, so that the
    # partial video is deleted and the checkpoint is left consistent.
    raise KeyboardInterrupt(f"signal {signum}")


def generate_command(args) -> int:
    import signal

    try:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog
        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except Exception:  # noqa: BLE001 - logging levels are cosmetic
        pass

    previous = None
    try:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            previous = signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    except ValueError:          # not the main thread: leave signals alone
        pass
    try:
        return _generate_command(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _generate_command(args) -> int:
    import torch
    import torch.distributed as dist
    from .pipeline import GenerationError, GenerationFailed, generate

    timeout = _num(args.timeout, float)
    if not isinstance(timeout, float) or not timeout > 0:
        print(f"vinf_engine generate: error: --timeout must be a positive number of seconds, "
              f"got {args.timeout!r}", file=sys.stderr)
        return EXIT_BAD_INPUT

    owns_group = False
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", rank)
    else:
        world = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        local_rank = _env_int("LOCAL_RANK", 0)
        if world > 1:
            use_cuda = torch.cuda.is_available() and args.device != "cpu"
            backend = "nccl" if use_cuda else "gloo"
            if use_cuda:
                torch.cuda.set_device(local_rank)
            try:
                dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
            except Exception as e:  # noqa: BLE001
                _log(rank, world, f"error: could not join the {world} ranks ({backend}) within "
                                  f"{timeout:g} s: {type(e).__name__}: {e}")
                return EXIT_FAILED
            owns_group = True

    if args.device is not None:
        device = args.device
    elif torch.cuda.is_available() and (world == 1 or dist.get_backend() == "nccl"):
        device = f"cuda:{local_rank}" if world > 1 else "cuda"
    else:
        device = "cpu"
    if isinstance(device, str) and device.startswith("cuda") and not torch.cuda.is_available():
        device = "__no_cuda__"

    config = dict(window=_num(args.window, int), num_global=_num(args.num_global, int),
                  phase_t=_num(args.phase_t, float), phase_bias=_num(args.phase_bias, float),
                  sync_groupnorm=not args.per_clip_groupnorm)
    prompts = None
    if args.prompt:
        prompts = args.prompt[0] if len(args.prompt) == 1 else list(args.prompt)
    # Problems only the CLI can see travel through generate's agreement, so every rank says them.
    extra = []
    if device == "__no_cuda__":
        extra.append(f"--device {args.device}: CUDA is not available on this machine")
    if args.out is None and args.save_latents is None:
        extra.append("nothing to write: give --out VIDEO.mp4 (and/or --save-latents FILE.pt)")
    if rank == 0 and args.report:
        parent = os.path.dirname(os.path.abspath(args.report))
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
            extra.append(f"--report: directory {parent!r} does not exist or is not writable")
    code = EXIT_OK
    try:
        report = generate(
            args.model, prompts, prompt_file=args.prompt_file,
            num_frames=_num(args.frames, int), out=args.out, steps=_num(args.steps, int),
            guidance_scale=_num(args.guidance, float), seed=_num(args.seed, int),
            config=config, negative_prompt=args.negative_prompt,
            height=_num(args.height, int), width=_num(args.width, int), fps=_num(args.fps, float),
            video_fps=_num(args.video_fps, float), crf=_num(args.crf, int),
            scheduler=args.scheduler, dtype=args.dtype,
            device=None if device == "__no_cuda__" else device,
            decode_chunk=_num(args.decode_chunk, int), save_latents=args.save_latents,
            checkpoint_dir=args.checkpoint_dir, checkpoint_every=_num(args.checkpoint_every, int),
            resume=args.resume, overwrite=args.overwrite, comm_mode=args.comm_mode,
            timeout=timeout,
            progress=not args.quiet, extra_problems=extra)
        report.pop("latents", None)
        if rank == 0:
            text = json.dumps(report, indent=1)
            print(text, flush=True)
            if args.report:
                _write_atomic(args.report, text + "\n")
    except GenerationError as e:
        _log(rank, world, f"error: {e}")
        code = EXIT_BAD_INPUT
    except GenerationFailed as e:
        _log(rank, world, f"error: {e}")
        code = EXIT_FAILED
    except KeyboardInterrupt as e:
        _log(rank, world, f"interrupted{f' ({e})' if str(e) else ''}; nothing written")
        code = EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - report, never hang
        _log(rank, world, f"error: unexpected {type(e).__name__}: {e}\n{traceback.format_exc()}")
        code = EXIT_FAILED
    if owns_group and code in (EXIT_OK, EXIT_BAD_INPUT):
        # After a failure the group may be broken (a dead peer): tearing it down could block,
        # so the process exits without it (see __main__).
        dist.destroy_process_group()
    return code


def _write_atomic(path: str, text: str):
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=directory)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
