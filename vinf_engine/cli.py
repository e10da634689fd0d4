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
import traceback

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def _lenient(kind):
    """argparse ``type``: ``kind(text)``, or the text itself, which the settings' checks then
    name on every rank together (argparse would exit on one rank alone)."""
    def parse(text):
        try:
            return kind(text)
        except (TypeError, ValueError):
            return text
    parse.__name__ = kind.__name__
    return parse


INT, REAL = _lenient(int), _lenient(float)
# Flags that set fields of the dual-scope config (over the model family's default config).
CONFIG_FLAGS = ("window", "num_global", "phase_t", "phase_bias", "global_positions",
                "trained_frames")


def build_parser() -> argparse.ArgumentParser:
    """The ``generate`` flags; their ``dest`` names are ``GenerateSettings`` fields."""
    ap = argparse.ArgumentParser(prog="python -m vinf_engine",
                                 description="Long videos from short-clip video diffusion models.")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a video from text",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Generate a long video on one process or on every rank of "
                                   "torchrun. Numbers are checked after parsing, on every rank "
                                   "together, so that ranks fail with the same message. Unset "
                                   "steps, guidance, video fps and dual-scope settings take the "
                                   "model family's defaults (UNet3D: the paper's; Wan: "
                                   "WanPipeline's, window 8, 8 global frames).")
    for flags in (_model_flags, _input_flags, _video_flags, _sampling_flags, _parallel_flags,
                  _runtime_flags):
        flags(g)
    return ap


def _model_flags(g):
    """The model and what to say."""
    m = g.add_argument_group("model and prompt")
    m.add_argument("--model", required=True, metavar="DIR",
                   help="local diffusers pipeline folder (ModelScope / Zeroscope "
                        "TextToVideoSDPipeline, VideoCrafter2 in diffusers layout, a "
                        "WanPipeline: Wan 2.1, Wan 2.2 A14B, Wan 2.2 TI2V-5B, a "
                        "WanImageToVideoPipeline, or a SkyReels-V2 T2V / I2V pipeline); "
                        "nothing is downloaded")
    m.add_argument("--prompt", dest="prompts", action="append", metavar="TEXT",
                   help="the prompt; repeat it for several scenes splitting the video evenly")
    m.add_argument("--prompt-file", metavar="FILE",
                   help="one scene per line, optionally 'FRAME: prompt' (first video frame of "
                        "the scene)")
    m.add_argument("--negative-prompt", metavar="TEXT", default=None)


def _input_flags(g):
    """Images pinned at frames, or a video to extend."""
    i = g.add_argument_group("images and videos in")
    i.add_argument("--image", dest="images", action="append", metavar="[FRAME:]PATH",
                   help="an image the video holds at FRAME (default 0); repeat for keyframes "
                        "(image-to-video models condition on them; others hold them fixed)")
    i.add_argument("--last-image", metavar="PATH", default=None,
                   help="an image the video ends on (first-last-frame)")
    i.add_argument("--extend", metavar="IN.mp4", default=None,
                   help="continue this video: the output holds its frames, then --frames new "
                        "ones following its last --context-frames (the input is only read)")
    i.add_argument("--context-frames", metavar="N", type=INT, default=None,
                   help="frames of --extend the new ones follow (default 9: for Wan 4k+1, "
                        "three latent frames)")


def _video_flags(g):
    """The video and where it goes."""
    from .settings import DEFAULTS
    v = g.add_argument_group("video")
    v.add_argument("--frames", dest="num_frames", required=True, metavar="N", type=INT,
                   help="video frames of the whole video (Wan: 4k+1)")
    v.add_argument("--height", metavar="PX", type=INT, default=None)
    v.add_argument("--width", metavar="PX", type=INT, default=None)
    v.add_argument("--out", metavar="FILE.mp4", default=None,
                   help="the video (rank 0 writes it; renamed into place when complete)")
    v.add_argument("--overwrite", action="store_true", help="replace an existing --out / --save-latents")
    v.add_argument("--video-fps", metavar="FPS", type=REAL, default=None,
                   help="frame rate of the mp4 (default: the family's: UNet3D 8, Wan 16)")
    v.add_argument("--crf", metavar="Q", type=INT, default=DEFAULTS["crf"], help="x264 quality (0-51)")
    v.add_argument("--save-latents", metavar="FILE.pt", default=None,
                   help="also save the whole video's final latents")


def _sampling_flags(g):
    """How it is sampled."""
    s = g.add_argument_group("sampling")
    s.add_argument("--steps", metavar="S", type=INT, default=None,
                   help="denoising steps (default: UNet3D 30, Wan 50)")
    s.add_argument("--guidance", dest="guidance_scale", metavar="G", type=REAL, default=None,
                   help="classifier-free guidance scale, no guidance at <= 1 (default: UNet3D "
                        "12, Wan 5)")
    s.add_argument("--guidance-2", dest="guidance_scale_2", metavar="G", type=REAL,
                   default=None, help="Wan 2.2 A14B's low-noise expert (default: --guidance)")
    s.add_argument("--seed", metavar="N", type=INT, default=0)
    s.add_argument("--scheduler", default=None, metavar="NAME",
                   help="UNet3D: dpm++sde (the paper's DPM-Solver++ (SDE)), dpm++, ddim, euler, "
                        "euler-a, unipc; Wan: unipc, dpm++, dpm++sde; default: the pipeline's own")
    s.add_argument("--fps", metavar="FPS", type=REAL, default=None,
                   help="VideoCrafter2's frame-rate conditioning (default 24)")
    s.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default on CUDA: "
                                                 "float16 for UNet3D, bfloat16 for Wan; float32 on CPU)")


def _parallel_flags(g):
    """Clip parallelism: the dual-scope config and how exchanges move."""
    c = g.add_argument_group("clip parallelism (dual-scope attention)")
    c.add_argument("--window", metavar="W", type=INT, default=None,
                   help="local scope: +-W (latent) frames (default: 8)")
    c.add_argument("--num-global", metavar="G", type=INT, default=None,
                   help="global frames spread over the video (default: UNet3D 16, Wan 8)")
    c.add_argument("--phase-t", metavar="T", type=REAL, default=None, help="default 800")
    c.add_argument("--phase-bias", metavar="B", type=REAL, default=None, help="default 10")
    c.add_argument("--global-positions", metavar="P", default=None,
                   help="Wan: clamp (default: no logit sees a temporal distance past the trained "
                        "range) or true")
    c.add_argument("--trained-frames", metavar="N", type=INT, default=None,
                   help="Wan: latent frames the model was trained on (default 21; TI2V-5B 31; "
                        "SkyReels-V2 25)")
    c.add_argument("--per-clip-groupnorm", action="store_true",
                   help="GroupNorm statistics per clip (the published prototype; ablation only)")
    c.add_argument("--cache", metavar="fbc:T[,...]", default=None,
                   help="a step cache every rank agrees on: skip the middle blocks on "
                        "steps where the first block's output changed less than T over the "
                        "whole video, e.g. fbc:0.08; options front=, back=, warmup=, "
                        "max_skips=, taylor (vinf_engine.cache). Off by default")
    c.add_argument("--comm-mode", metavar="MODE", default="overlap",
                   help="how the ranks' exchanges move: overlap (exact, default), blocking "
                        "(the published pattern, same video; UNet3D), stale (the previous "
                        "step's halos and statistics: no waiting, a slightly different video)")


def _runtime_flags(g):
    """Memory, checkpoints, timeouts, the device, the report."""
    from .settings import DEFAULTS
    r = g.add_argument_group("runtime")
    r.add_argument("--decode-chunk", metavar="N", type=INT, default=DEFAULTS["decode_chunk"],
                   help="(latent) frames the VAE decodes at once")
    r.add_argument("--chunk-mib", metavar="MIB", type=REAL, default=1024.0,
                   help="working memory of each per-frame or per-token layer: layers that would "
                        "need more run over chunks of frames, positions or tokens (0: off)")
    r.add_argument("--checkpoint-dir", metavar="DIR", default=None,
                   help="save each rank's latents every --checkpoint-every steps")
    r.add_argument("--checkpoint-every", metavar="K", type=INT,
                   default=DEFAULTS["checkpoint_every"])
    r.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    r.add_argument("--timeout", metavar="SECONDS", default=str(DEFAULTS["timeout"]),
                   help="how long a rank waits for the others at any collective before failing "
                        "(also the rendezvous timeout)")
    r.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    r.add_argument("--report", metavar="FILE.json", default=None, help="also write the JSON report here")
    r.add_argument("--quiet", action="store_true", help="no progress on stderr")


def settings_from(args):
    """The ``GenerateSettings`` of parsed ``generate`` arguments."""
    from .settings import GenerateSettings
    values = {k: v for k, v in vars(args).items() if k in GenerateSettings.field_names()}
    prompts = values.get("prompts")
    if prompts:
        values["prompts"] = prompts[0] if len(prompts) == 1 else list(prompts)
    config = {k: getattr(args, k) for k in CONFIG_FLAGS if getattr(args, k) is not None}
    if args.per_clip_groupnorm:
        config["sync_groupnorm"] = False
    values["config"] = config
    return GenerateSettings(**values)


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
    # One write per message: ranks sharing a terminal (torchrun) then never mix their lines.
    prefix = "vinf_engine generate" + (f" [rank {rank}/{world}]" if world > 1 else "")
    sys.stderr.write(f"{prefix}: {msg}\n")
    sys.stderr.flush()


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

    # Problems only the CLI can see travel through generate's agreement, so every rank says them.
    extra = []
    if device == "__no_cuda__":
        extra.append(f"--device {args.device}: CUDA is not available on this machine")
    if args.out is None and args.save_latents is None:
        extra.append("nothing to write: give --out VIDEO.mp4 (and/or --save-latents FILE.pt)")
    if rank == 0 and args.report:
        from .video import check_output_path
        e = check_output_path(args.report, overwrite=args.overwrite, suffixes=(".json",))
        if e:
            extra.append(e.replace("output", "--report", 1))
    code = EXIT_OK
    try:
        report = generate(settings=settings_from(args),
                          device=None if device == "__no_cuda__" else device, timeout=timeout,
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
    from .files import temp_file
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = temp_file(directory, prefix=f".{name}.", suffix=".partial")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
