"""Long-video generation over a diffusers text-to-video pipeline, on one rank or many.

    import vinf_engine as vinf
    vinf.generate("models/zeroscope", "a red panda eating bamboo", num_frames=256,
                  out="panda.mp4")                       # on every rank (torchrun) or alone

Every rank loads the pipeline, denoises its own clip of the video with the clip-parallel UNet
(classifier-free guidance in the batch, as diffusers' ``TextToVideoSDPipeline`` does it), draws
all noise per global frame from the seed, decodes its frames with the VAE in chunks, and sends
them to rank 0, which encodes the mp4 as they arrive. The video depends on the seed, the prompts
and the settings, not on the number of ranks.

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
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .checkpoint import (Checkpointer, CheckpointError, pack_scheduler_state,
                         restore_scheduler_state, save_temp)
from .comm import ClipComm
from .config import DualScopeConfig
from .layout import ClipLayout
from .noise import initial_noise, step_generators, step_noise

__all__ = ["generate", "load_pipeline", "inspect_model_dir", "read_prompt_file", "GenerationError",
           "GenerationFailed", "SCHEDULERS", "DEFAULTS"]

# The paper's settings (Video-Infinity with VideoCrafter2): DPM-Solver++ (SDE), 30 steps,
# guidance 12, fps conditioning 24; the reference exports its mp4 at 8 frames per second.
DEFAULTS = dict(steps=30, guidance_scale=12.0, video_fps=8.0, crf=18, decode_chunk=8,
                checkpoint_every=5, timeout=600.0)

SCHEDULERS = {
    # name: (diffusers class, overrides of the pipeline's scheduler config)
    "dpm++sde": ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++")),
    "dpm++": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++")),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# How exchanges move (vinf_engine.scheduler.MODES less "loopback", which is for timing only).
COMM_MODES = ("overlap", "blocking", "stale")


class GenerationError(ValueError):
    """Bad input, refused on every rank before any data-plane collective."""


class GenerationFailed(RuntimeError):
    """The run broke after it started: a peer died or timed out, a write failed."""


# ==================================================================== model folder
def _read_json(path):
    with open(path) as f:
        return json.load(f)


def inspect_model_dir(path: str) -> tuple[str | None, dict]:
    """Check that ``path`` is a local diffusers text-to-video pipeline that vinf_engine runs,
    without loading weights. Returns ``(problem, info)``; ``info["kind"]`` is ``"unet3d"``
    (ModelScope / Zeroscope) or ``"videocrafter2"``."""
    from .models.videocrafter2 import is_videocrafter2_unet_dir
    if not path:
        return "no model folder given (a local diffusers pipeline folder; nothing is downloaded)", {}
    if not os.path.exists(path):
        return f"model folder {path!r} does not exist (models are never downloaded: give a local folder)", {}
    if not os.path.isdir(path):
        return f"model path {path!r} is not a folder", {}
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        return (f"{path!r} is not a diffusers pipeline folder (no model_index.json); "
                "save one with pipeline.save_pretrained(folder)"), {}
    try:
        mi = _read_json(index)
    except (OSError, ValueError) as e:
        return f"{index} is unreadable: {e}", {}
    if not isinstance(mi, dict):
        return f"{index} is not a JSON object", {}
    pipe_cls = mi.get("_class_name", "?")
    need = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    missing = [c for c in need if not isinstance(mi.get(c), list) or mi[c][0] is None]
    if missing:
        return (f"{path!r} holds a {pipe_cls}, not a supported text-to-video pipeline: it lacks "
                f"{', '.join(missing)} (vinf_engine runs TextToVideoSDPipeline folders "
                "(ModelScope, Zeroscope) and VideoCrafter2 in diffusers layout)"), {}
    for c in need:
        if not os.path.isdir(os.path.join(path, c)):
            return f"model folder {path!r} lacks its {c}/ subfolder", {}
    unet_dir = os.path.join(path, "unet")
    try:
        ucfg = _read_json(os.path.join(unet_dir, "config.json"))
    except (OSError, ValueError) as e:
        return f"{unet_dir}/config.json is unreadable: {e}", {}
    try:
        vc2 = is_videocrafter2_unet_dir(unet_dir)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
        return f"cannot load unet from {path!r}: its weights are unreadable ({type(e).__name__}: {e})", {}
    ucls = ucfg.get("_class_name", mi["unet"][1])
    if not vc2 and ucls != "UNet3DConditionModel":
        return (f"{path!r} holds a {pipe_cls} whose unet is {ucls}; vinf_engine runs "
                "UNet3DConditionModel pipelines (ModelScope, Zeroscope) and VideoCrafter2"), {}
    vae_cls = mi["vae"][1]
    if vae_cls != "AutoencoderKL":
        return f"{path!r}: vae is {vae_cls}; expected AutoencoderKL", {}
    for c in ("text_encoder", "tokenizer"):
        if mi[c][0] != "transformers":
            return f"{path!r}: {c} comes from {mi[c][0]!r}; expected a transformers class", {}
    return None, dict(kind="videocrafter2" if vc2 else "unet3d", pipeline=pipe_cls, unet=ucls,
                      index=mi)


def load_pipeline(path: str, *, dtype: torch.dtype = torch.float32, device="cpu"):
    """Load a local text-to-video pipeline folder component by component.

    Returns a diffusers ``TextToVideoSDPipeline`` whose ``unet`` is a ``UNet3DConditionModel``
    or, for VideoCrafter2 folders, a ``VideoCrafter2UNet3DConditionModel``. Raises
    ``GenerationError`` for folders vinf_engine does not run and for weights that do not match
    their config. Never downloads.
    """
    import diffusers
    import transformers
    from diffusers import AutoencoderKL, UNet3DConditionModel
    from diffusers.schedulers.scheduling_utils import SchedulerMixin
    from .models.videocrafter2 import VideoCrafter2UNet3DConditionModel
    problem, info = inspect_model_dir(path)
    if problem:
        raise GenerationError(problem)
    mi = info["index"]
    common = dict(local_files_only=True)
    unet_cls = VideoCrafter2UNet3DConditionModel if info["kind"] == "videocrafter2" else UNet3DConditionModel
    loaded = {}
    for name, load in (
        ("unet", lambda: unet_cls.from_pretrained(path, subfolder="unet", dtype=dtype,
                                                  low_cpu_mem_usage=False,
                                                  output_loading_info=True, **common)),
        ("vae", lambda: AutoencoderKL.from_pretrained(path, subfolder="vae", dtype=dtype,
                                                      low_cpu_mem_usage=False,
                                                      output_loading_info=True, **common)),
    ):
        try:
            model, linfo = load()
        except Exception as e:  # noqa: BLE001 - safetensors, torch and diffusers raise many types
            raise GenerationError(f"cannot load {name} from {path!r}: {type(e).__name__}: {e}") from None
        if linfo.get("missing_keys"):
            raise GenerationError(f"{name} weights in {path!r} lack {len(linfo['missing_keys'])} "
                                  f"tensor(s), e.g. {sorted(linfo['missing_keys'])[:3]}")
        loaded[name] = model.eval()
    for name in ("text_encoder", "tokenizer"):
        cls = getattr(transformers, mi[name][1], None)
        if cls is None:
            raise GenerationError(f"{name} class {mi[name][1]!r} is not in transformers")
        kw = dict(dtype=dtype) if name == "text_encoder" else {}
        try:
            obj = cls.from_pretrained(os.path.join(path, name), local_files_only=True, **kw)
        except Exception as e:  # noqa: BLE001
            raise GenerationError(f"cannot load {name} from {path!r}: {type(e).__name__}: {e}") from None
        loaded[name] = obj.eval() if name == "text_encoder" else obj
    try:
        scfg = _read_json(os.path.join(path, "scheduler", "scheduler_config.json"))
        scls = getattr(diffusers, scfg.get("_class_name", ""), None)
        if not (isinstance(scls, type) and issubclass(scls, SchedulerMixin)):
            raise GenerationError(f"scheduler {scfg.get('_class_name')!r} is not a diffusers scheduler")
        loaded["scheduler"] = scls.from_pretrained(path, subfolder="scheduler", **common)
    except (OSError, ValueError) as e:
        if isinstance(e, GenerationError):
            raise
        raise GenerationError(f"cannot load scheduler from {path!r}: {e}") from None
    pipe = _t2v_pipeline(**loaded)
    return pipe.to(device)


def _t2v_pipeline(**components):
    import warnings
    from diffusers import TextToVideoSDPipeline
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = TextToVideoSDPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _model_digest(pipe) -> str:
    """A cheap identity of the weights: configs, parameter names and shapes, and a checksum of
    the first elements of every parameter. Equal digests on every rank and in a checkpoint mean
    the same model, for any practical purpose."""
    h = hashlib.sha256()
    for name in ("unet", "vae", "text_encoder"):
        m = getattr(pipe, name)
        cfg = m.config.to_dict() if hasattr(m.config, "to_dict") else dict(m.config)
        h.update(json.dumps({k: v for k, v in cfg.items() if not k.startswith("_")},
                            sort_keys=True, default=str).encode())
        h.update(type(m).__name__.encode())
        sums = []
        with torch.no_grad():
            for pname, p in m.named_parameters():
                h.update(f"{pname}{tuple(p.shape)}{p.dtype}".encode())
                sums.append(p.detach().reshape(-1)[:4096].double().sum())
        if sums:
            h.update(torch.stack(sums).cpu().numpy().tobytes())
    return h.hexdigest()[:32]


# ==================================================================== prompts
def read_prompt_file(path: str) -> list:
    """Scenes from a text file: one prompt per non-empty line (``#`` starts a comment line).

    Either no line names a frame (the scenes split the video evenly), or every line starts with
    ``FRAME:`` (the global frame at which that scene begins; the first must be 0)::

        0: a red panda wakes up in a bamboo forest
        96: the red panda climbs a tree
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise GenerationError(f"prompt file {path!r} does not exist") from None
    except IsADirectoryError:
        raise GenerationError(f"prompt file {path!r} is a directory") from None
    except PermissionError:
        raise GenerationError(f"prompt file {path!r} is not readable (permission denied)") from None
    except UnicodeDecodeError as e:
        raise GenerationError(f"prompt file {path!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise GenerationError(f"prompt file {path!r} cannot be read: {e}") from None
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise GenerationError(f"prompt file {path!r} holds no prompt")
    starts = []
    for ln in lines:
        head, sep, rest = ln.partition(":")
        starts.append(int(head) if sep and head.strip().isdigit() and rest.strip() else None)
    if all(s is None for s in starts):
        return lines
    if any(s is None for s in starts):
        bad = next(i for i, s in enumerate(starts) if s is None)
        raise GenerationError(f"prompt file {path!r}: line {bad + 1} of its prompts has no "
                              "'FRAME:' prefix; give every scene its first frame, or none")
    return [(s, ln.partition(":")[2].strip()) for s, ln in zip(starts, lines)]


def _scenes(prompts, num_frames: int) -> list[tuple[int, str]]:
    """``prompts`` (a string, a list of strings split evenly, or ``(first_frame, prompt)``
    pairs) as ``[(first_frame, prompt), ...]``; raises ``GenerationError``."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise GenerationError("prompt: give a prompt, a list of prompts or (frame, prompt) pairs")
    if all(isinstance(p, str) for p in prompts):
        n = len(prompts)
        if n > num_frames:
            raise GenerationError(f"{n} scenes do not fit in {num_frames} frames")
        pairs = [((i * num_frames) // n, p) for i, p in enumerate(prompts)]
    else:
        pairs = []
        for p in prompts:
            if (not isinstance(p, (list, tuple)) or len(p) != 2 or not isinstance(p[1], str)
                    or isinstance(p[0], bool) or not isinstance(p[0], int)):
                raise GenerationError(f"prompt schedule entries must be (first_frame, prompt), got {p!r}")
            pairs.append((p[0], p[1]))
    for i, (s, text) in enumerate(pairs):
        if not text.strip():
            raise GenerationError(f"prompt {i} is empty")
    starts = [s for s, _ in pairs]
    if starts[0] != 0:
        raise GenerationError(f"the first scene must start at frame 0, not {starts[0]}")
    if any(b <= a for a, b in zip(starts, starts[1:])):
        raise GenerationError(f"scene start frames must increase strictly, got {starts}")
    if starts[-1] >= num_frames:
        raise GenerationError(f"a scene starts at frame {starts[-1]}, past the video's "
                              f"{num_frames} frames")
    return pairs


def _scene_of(scenes, frame: int) -> int:
    idx = 0
    for i, (s, _) in enumerate(scenes):
        if s <= frame:
            idx = i
    return idx


class _FrameTextProcessor:
    """Cross-attention with text that changes along the video (multi-scene prompts).

    UNet3D repeats the text embedding over frames before its spatial transformers; for a
    schedule of scenes this processor substitutes each frame's own scene embedding, so that
    frame ``f`` is conditioned by the scene that covers global frame ``f`` whatever the split.
    """

    def __init__(self, inner, holder):
        self.inner = inner
        self.holder = holder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 **kwargs):
        text = self.holder.get("text")
        if text is not None and encoder_hidden_states is not None:
            if text.shape[0] != hidden_states.shape[0]:
                raise RuntimeError(f"per-frame text has {text.shape[0]} rows for "
                                   f"{hidden_states.shape[0]} frames")
            encoder_hidden_states = text
        return self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                          attention_mask=attention_mask, **kwargs)


def _install_frame_text(unet, holder) -> Callable[[], None]:
    from diffusers.models.attention_processor import Attention
    undo = []
    for m in unet.modules():
        if isinstance(m, Attention) and m.is_cross_attention:
            old = m.processor
            m.set_processor(_FrameTextProcessor(old, holder))
            undo.append((m, old))

    def restore():
        for m, old in undo:
            m.set_processor(old)
    return restore


# ==================================================================== settings
@dataclass
class _Run:
    """Everything one rank knows about the run; validated before any collective."""
    model: object
    prompts: object
    prompt_file: str | None
    num_frames: int
    out: str | None
    steps: int
    guidance_scale: float
    seed: int
    config: DualScopeConfig
    negative_prompt: str | None
    height: int | None
    width: int | None
    fps: float | None
    video_fps: float
    crf: int
    scheduler: str | None
    dtype: str | None
    decode_chunk: int
    save_latents: str | None
    checkpoint_dir: str | None
    checkpoint_every: int
    resume: bool
    overwrite: bool
    comm_mode: str = "overlap"
    scenes: list = field(default_factory=list)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_args(run: _Run, rank: int, world: int) -> list[str]:
    """Problems with the arguments that need neither a model nor other ranks."""
    p = []
    if not _is_int(run.num_frames) or run.num_frames < 1:
        p.append(f"frames must be a positive integer, got {run.num_frames!r}")
    elif run.num_frames < world:
        p.append(f"frames ({run.num_frames}) is fewer than ranks ({world}): every rank needs at "
                 "least one frame")
    if not _is_int(run.steps) or run.steps < 1:
        p.append(f"steps must be a positive integer, got {run.steps!r}")
    if not _is_num(run.guidance_scale) or run.guidance_scale < 0:
        p.append(f"guidance scale must be a finite number >= 0, got {run.guidance_scale!r}")
    if not _is_int(run.seed) or run.seed < 0:
        p.append(f"seed must be a non-negative integer, got {run.seed!r}")
    if isinstance(run.config, dict):
        try:
            run.config = DualScopeConfig(**run.config)
        except (TypeError, ValueError) as e:
            p.append(f"dual-scope config: {e}")
    elif not isinstance(run.config, DualScopeConfig):
        p.append(f"config must be a vinf_engine.DualScopeConfig, got {type(run.config).__name__}")
    for name in ("height", "width"):
        v = getattr(run, name)
        if v is not None and (not _is_int(v) or v < 1):
            p.append(f"{name} must be a positive integer, got {v!r}")
    if run.fps is not None and (not _is_num(run.fps) or run.fps <= 0):
        p.append(f"fps must be a positive number, got {run.fps!r}")
    if not _is_num(run.video_fps) or run.video_fps <= 0:
        p.append(f"video fps must be a positive number, got {run.video_fps!r}")
    if not _is_int(run.crf) or not 0 <= run.crf <= 51:
        p.append(f"crf must be an integer in [0, 51], got {run.crf!r}")
    if run.scheduler is not None and run.scheduler not in SCHEDULERS:
        p.append(f"unknown scheduler {run.scheduler!r}; choose one of {sorted(SCHEDULERS)} "
                 "or leave it unset for the pipeline's own")
    if run.comm_mode not in COMM_MODES:
        p.append(f"comm mode must be one of {list(COMM_MODES)}, got {run.comm_mode!r}")
    if run.dtype is not None and run.dtype not in _DTYPES:
        p.append(f"dtype must be one of {sorted(_DTYPES)}, got {run.dtype!r}")
    if not _is_int(run.decode_chunk) or run.decode_chunk < 1:
        p.append(f"decode chunk must be a positive integer, got {run.decode_chunk!r}")
    if not _is_int(run.checkpoint_every) or run.checkpoint_every < 1:
        p.append(f"checkpoint interval must be a positive integer, got {run.checkpoint_every!r}")
    if run.resume and not run.checkpoint_dir:
        p.append("--resume needs --checkpoint-dir")
    # Prompts: from a file or given; a file is read by every rank (multi-node: every node).
    if run.prompt_file is not None and run.prompts is not None:
        p.append("give a prompt or a prompt file, not both")
    elif run.prompt_file is None and run.prompts is None:
        p.append("no prompt given")
    else:
        try:
            src = read_prompt_file(run.prompt_file) if run.prompt_file is not None else run.prompts
            if _is_int(run.num_frames) and run.num_frames >= 1:
                run.scenes = _scenes(src, run.num_frames)
        except GenerationError as e:
            p.append(str(e))
    if run.negative_prompt is not None and not isinstance(run.negative_prompt, str):
        p.append("negative prompt must be a string")
    # Outputs are written by rank 0 only.
    if rank == 0:
        from .video import check_output_path
        if run.out is not None:
            e = check_output_path(run.out, overwrite=run.overwrite)
            if e:
                p.append(e)
        if run.save_latents is not None:
            e = check_output_path(run.save_latents, overwrite=run.overwrite, suffixes=(".pt",))
            if e:
                p.append(e.replace("output", "latents output"))
        if run.out is not None:
            # Found now, not after the last denoising step.
            try:
                import imageio_ffmpeg
                imageio_ffmpeg.get_ffmpeg_exe()
            except Exception as e:  # noqa: BLE001
                p.append(f"no video encoder: {type(e).__name__}: {e} (pip install imageio-ffmpeg, "
                         "or vinf_engine[generate])")
    if isinstance(run.model, str):
        e, _ = inspect_model_dir(run.model)
        if e:
            p.append(e)
    return p


def _comparable(run: _Run) -> dict:
    """The settings every rank must share (outputs are rank 0's business; the model is
    compared by weight digest after loading)."""
    def real(v):          # 12 and 12.0 are the same guidance, in every rank's eyes and a hash's
        return float(v) if _is_num(v) else v
    c = run.config
    config = ([c.window, c.num_global, float(c.phase_t), float(c.phase_bias), c.sync_groupnorm]
              if isinstance(c, DualScopeConfig) else None)
    return dict(scenes=[list(s) for s in run.scenes], negative_prompt=run.negative_prompt,
                frames=run.num_frames, steps=run.steps, guidance=real(run.guidance_scale),
                seed=run.seed, config=config, height=run.height, width=run.width,
                fps=real(run.fps), scheduler=run.scheduler, dtype=run.dtype,
                decode_chunk=run.decode_chunk, video_fps=real(run.video_fps),
                crf=run.crf, checkpoint=bool(run.checkpoint_dir),
                checkpoint_every=run.checkpoint_every, resume=run.resume,
                out=run.out is not None, save_latents=run.save_latents is not None,
                # overlap and blocking make the same video; stale another
                comm="stale" if run.comm_mode == "stale" else "exact")


def _refuse(rows, what: str):
    """Raise the same GenerationError on every rank when any rank reported a problem."""
    by_msg: dict = {}
    for r, problems in enumerate(rows):
        for msg in problems:
            by_msg.setdefault(msg, []).append(r)
    if not by_msg:
        return
    world = len(rows)
    parts = []
    for msg, ranks in by_msg.items():
        who = ("" if world == 1 else "every rank: " if len(ranks) == world
               else f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: ")
        parts.append(who + msg)
    raise GenerationError(f"{what}: " + "; ".join(parts))


# ==================================================================== memory / report
def _peak_memory_mib(device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024, "peak RSS of the process"


class _Progress:
    """One line on stderr, rank 0 only: step, frame-steps per second, time left."""

    def __init__(self, enabled: bool, total: int, frames: int, done: int = 0):
        self.enabled, self.total, self.frames, self.done0 = enabled, total, frames, done
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def step(self, done: int, final: bool = False):
        if not self.enabled:
            return
        now = time.perf_counter()
        if not (final or self.tty or now - self.last >= 2.0 or done == self.done0 + 1):
            return
        self.last = now
        dt = now - self.t0
        n = done - self.done0
        rate = self.frames * n / dt if dt > 0 and n else 0.0
        left = (self.total - done) * dt / n if n else float("nan")
        eta = str(datetime.timedelta(seconds=round(left))) if math.isfinite(left) else "?"
        line = (f"denoising: step {done}/{self.total} | {self.frames} frames | "
                f"{rate:.2f} frame-steps/s = {rate / self.total:.3f} frames/s | "
                f"elapsed {datetime.timedelta(seconds=round(dt))} | left {eta}")
        end = "\n" if (final or not self.tty) else ""
        print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)

    def note(self, text: str):
        if self.enabled:
            print(text, file=sys.stderr, flush=True)


# ==================================================================== generate
def generate(model, prompts=None, *, num_frames: int, out: str | None = None,
             steps: int = DEFAULTS["steps"], guidance_scale: float = DEFAULTS["guidance_scale"],
             seed: int = 0, config: DualScopeConfig | dict | None = None,
             negative_prompt: str | None = None, height: int | None = None,
             width: int | None = None, fps: float | None = None,
             video_fps: float = DEFAULTS["video_fps"], crf: int = DEFAULTS["crf"],
             scheduler: str | None = None, dtype: str | None = None, device=None,
             decode_chunk: int = DEFAULTS["decode_chunk"], save_latents: str | None = None,
             checkpoint_dir: str | None = None,
             checkpoint_every: int = DEFAULTS["checkpoint_every"], resume: bool = False,
             overwrite: bool = False, prompt_file: str | None = None,
             comm_mode: str = "overlap", process_group=None,
             timeout: float | None = None, progress: bool = True,
             callback: Callable | None = None, extra_problems: Sequence[str] | None = None) -> dict:
    """Generate a long video; call on every rank with the same arguments (or alone).

    Parameters
    ----------
    model : str or TextToVideoSDPipeline
        A local diffusers pipeline folder (ModelScope / Zeroscope ``TextToVideoSDPipeline``, or
        VideoCrafter2 in diffusers layout), or a pipeline already loaded by ``load_pipeline``.
    prompts : str, list of str, or list of (first_frame, str)
        One prompt; several, splitting the video evenly into scenes; or a schedule of scenes
        by global frame. Alternatively ``prompt_file`` (see ``read_prompt_file``).
    num_frames : int
        Frames of the whole video (UNet3D pipelines: one latent frame per video frame).
    out : str
        The mp4 to write (rank 0). Written to a hidden temporary file and renamed on success;
        an existing file is refused unless ``overwrite``. None: no video (the latents are
        returned, and saved if ``save_latents``).
    steps, guidance_scale, seed, negative_prompt
        As in diffusers; classifier-free guidance when ``guidance_scale > 1``.
    config : DualScopeConfig or dict of its fields
        The clip-parallel attention settings (default: the paper's).
    height, width : int
        Video size in pixels (default: the UNet's sample size times the VAE's factor).
    fps : float
        VideoCrafter2's frame-rate conditioning (default 24); other models have none.
    video_fps, crf : frame rate and x264 quality of the mp4.
    scheduler : str
        One of ``SCHEDULERS`` (``"dpm++sde"`` is the paper's DPM-Solver++ (SDE)); default the
        pipeline's own.
    dtype : "float32" | "float16" | "bfloat16"
        Default float16 on CUDA, float32 on CPU.
    decode_chunk : frames the VAE decodes at once.
    save_latents : str
        A ``.pt`` file for the final latents of the whole video (rank 0).
    checkpoint_dir, checkpoint_every, resume
        Save each rank's latents and scheduler state every ``checkpoint_every`` steps (and after
        the last); ``resume`` continues from the newest checkpoint all ranks hold. A resumed
        video is identical to an uninterrupted one.
    comm_mode : "overlap" | "blocking" | "stale"
        How the ranks' exchanges move (see ``vinf_engine.parallelize``): ``"overlap"`` (exact,
        the default); ``"blocking"`` (the published pattern, same video, slower); ``"stale"``
        (the previous step's halos, context and statistics: no waiting on peers after the
        first step, a slightly different video).
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
    ``(1, C, F_rank, h, w)`` in float32 on the CPU.
    """
    t_start = time.perf_counter()
    timings = {}
    if config is None:
        config = DualScopeConfig()
    run = _Run(model=model, prompts=prompts, prompt_file=prompt_file, num_frames=num_frames,
               out=out, steps=steps, guidance_scale=guidance_scale, seed=seed, config=config,
               negative_prompt=negative_prompt, height=height, width=width, fps=fps,
               video_fps=video_fps, crf=crf, scheduler=scheduler, dtype=dtype,
               decode_chunk=decode_chunk, save_latents=save_latents,
               checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, resume=resume,
               overwrite=overwrite, comm_mode=comm_mode)
    ctl_timeout = datetime.timedelta(seconds=timeout) if timeout else None
    try:
        comm = ClipComm(process_group, timeout=ctl_timeout)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001
        raise GenerationFailed(f"could not set up the control plane with the other ranks: "
                               f"{type(e).__name__}: {_short(e)}") from e
    rank, world = comm.rank, comm.world_size

    def agree(obj, what):
        # A rank that died or hangs before the run starts: a clear failure, not a traceback.
        try:
            return comm.agree(obj)
        except Exception as e:  # noqa: BLE001
            raise GenerationFailed(f"rank {rank}: could not agree with the other ranks on {what}: "
                                   f"{type(e).__name__}: {_short(e)}") from e

    # 1. Arguments, model folder, outputs: local checks, then one agreement.
    try:
        problems = [p for p in (extra_problems or ()) if p] + _check_args(run, rank, world)
    except Exception as e:  # noqa: BLE001 - a local crash must not leave the others waiting
        problems = [f"{type(e).__name__}: {e}"]
    rows = agree((problems, _comparable(run)), "the arguments")
    _refuse([r[0] for r in rows], "generate refused")
    mine = rows[rank][1]
    diff = [r for r, (_, c) in enumerate(rows) if c != rows[0][1]]
    if diff:
        keys = sorted(k for k in mine if any(rows[r][1].get(k) != rows[0][1].get(k) for r in diff))
        detail = "; ".join(f"{k}: " + ", ".join(f"rank {r}: {rows[r][1].get(k)!r}"
                                                 for r in [0] + diff) for k in keys)
        raise GenerationError(f"generate refused: ranks were started with different arguments "
                              f"({detail})")

    # 2. The model, on this rank's device.
    if device is None:
        device = (torch.device("cuda", torch.cuda.current_device())
                  if comm.backend == "nccl" or (torch.cuda.is_available() and world == 1)
                  else torch.device("cpu"))
    device = torch.device(device)
    tdtype = _DTYPES[run.dtype] if run.dtype else (torch.float16 if device.type == "cuda"
                                                   else torch.float32)
    t0 = time.perf_counter()
    problems, pipe, digest = [], None, None
    try:
        pipe = load_pipeline(run.model, dtype=tdtype, device=device) if isinstance(run.model, str) else run.model
        problems = _check_model(run, pipe)
        if not problems:
            digest = _model_digest(pipe)
    except GenerationError as e:
        problems = [str(e)]
    except Exception as e:  # noqa: BLE001
        problems = [f"loading the model failed: {type(e).__name__}: {e}"]
    rows = agree((problems, digest), "the model")
    _refuse([r[0] for r in rows], "generate refused")
    if any(d != rows[0][1] for _, d in rows):
        diff = [r for r, (_, d) in enumerate(rows) if d != rows[0][1]]
        raise GenerationError(f"generate refused: rank(s) {diff} loaded different model weights "
                              "than rank 0")
    timings["load"] = time.perf_counter() - t0

    unet, vae = pipe.unet, pipe.vae
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    H = run.height or unet.config.sample_size * vae_factor
    W = run.width or unet.config.sample_size * vae_factor
    sched = _make_scheduler(pipe, run.scheduler)
    sched.set_timesteps(run.steps, device=device)
    timesteps = sched.timesteps
    n_iter = len(timesteps)
    layout = ClipLayout(run.num_frames, world)
    frames = layout.frames(rank)
    C = unet.config.in_channels
    shape = (1, C, run.num_frames, H // vae_factor, W // vae_factor)
    vc2 = _is_vc2(unet)
    fps_value = (run.fps if run.fps is not None else _vc2_default_fps()) if vc2 else None

    settings = dict(_comparable(run), model_digest=digest, height=H, width=W,
                    fps=None if fps_value is None else float(fps_value),
                    scheduler=type(sched).__name__,
                    # Private keys vary between processes (``_use_default_values`` is a set's
                    # order): only the public config defines the sampler.
                    scheduler_config=json.loads(json.dumps(
                        {k: v for k, v in dict(sched.config).items() if not k.startswith("_")},
                        sort_keys=True, default=str)),
                    dtype=str(tdtype))
    for k in ("decode_chunk", "video_fps", "crf", "checkpoint", "checkpoint_every", "resume",
              "out", "save_latents"):
        settings.pop(k)
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]

    # 3. Checkpoints: what this rank can resume from, then agree on the step.
    ckpt = None
    start_step, latents, restored = 0, None, None
    if run.checkpoint_dir:
        ckpt = Checkpointer(run.checkpoint_dir, rank, world, fingerprint, settings)
        problems, steps_avail = [], []
        try:
            pack_scheduler_state(sched)          # a scheduler we cannot save fails now, not at step k
            if run.resume:
                err, steps_avail = ckpt.check_resumable()
            else:
                err = ckpt.check_fresh()
            if err:
                problems.append(err)
        except CheckpointError as e:
            problems.append(f"checkpointing: {e}")
        except Exception as e:  # noqa: BLE001
            problems.append(f"checkpoint dir: {type(e).__name__}: {e}")
        rows = agree((problems, steps_avail), "the checkpoint")
        _refuse([r[0] for r in rows], "generate refused")
        if run.resume:
            common = set(rows[0][1]).intersection(*(set(s) for _, s in rows[1:]))
            if not common:
                raise GenerationError(
                    "generate refused: --resume: the ranks hold no checkpoint of a common step ("
                    + "; ".join(f"rank {r}: {s}" for r, (_, s) in enumerate(rows)) + ")")
            start_step = max(common)
            problems = []
            try:
                head = ckpt.load(start_step)
                latents = head["latents"].to(torch.float32)
                if tuple(latents.shape) != (1, C, len(frames), shape[3], shape[4]):
                    raise CheckpointError(f"latents of shape {tuple(latents.shape)} in "
                                          f"{ckpt.path(start_step)} do not fit this run")
                restored = head["scheduler"]
            except Exception as e:  # noqa: BLE001
                problems.append(f"checkpoint step {start_step}: {type(e).__name__}: {e}")
            rows = agree((problems, None), "the checkpoint")
            _refuse([r[0] for r in rows], "generate refused")
            restore_scheduler_state(sched, restored, device)
            latents = latents.to(device)

    # Inputs are settled. From here a failure is a broken run, not bad input.
    from .parallel import parallelize, unparallelize
    restore_text = None
    writer = None
    latents_tmp = None
    engine_stats = {}
    phase = "parallelize"
    step_i = start_step
    report_comm = dict(frames_bytes_sent=0, frames_bytes_received=0)
    try:
        parallelize(unet, run.config, process_group, comm_mode=run.comm_mode, timeout=ctl_timeout)
        engine = unet.vinf_engine

        # 4. Text: one embedding per scene (+ the negative prompt for guidance).
        phase = "text encoding"
        t0 = time.perf_counter()
        do_cfg = run.guidance_scale > 1.0
        holder = {}
        text = _encode_scenes(pipe, run, device, do_cfg, frames, holder)
        if len(run.scenes) > 1:
            restore_text = _install_frame_text(unet, holder)
        timings["text"] = time.perf_counter() - t0

        # 5. Denoising.
        phase = "denoising"
        t0 = time.perf_counter()
        if latents is None:
            latents = initial_noise(run.seed, shape, frames, device=device) * sched.init_noise_sigma
        step_params = set(inspect.signature(sched.step).parameters)
        bar = _Progress(progress and rank == 0, n_iter, run.num_frames, start_step)
        if start_step:
            bar.note(f"resuming from the checkpoint of step {start_step}/{n_iter}")
        extra = dict(fps=fps_value) if vc2 else {}
        with torch.no_grad():
            for i in range(start_step, n_iter):
                step_i = i
                t = timesteps[i]
                x = torch.cat([latents] * 2) if do_cfg else latents
                x = sched.scale_model_input(x, t)
                eps = unet(x.to(unet.dtype), t, encoder_hidden_states=text, **extra).sample.float()
                if do_cfg:
                    uncond, cond = eps.chunk(2)
                    eps = uncond + run.guidance_scale * (cond - uncond)
                # The scheduler sees one row per frame, as diffusers' pipeline reshapes it: any
                # per-sample statistic (dynamic thresholding) is then per frame, split-free.
                b, c, f, h, w = latents.shape
                kw = {}
                if "variance_noise" in step_params:
                    kw["variance_noise"] = _rows(step_noise(run.seed, i, shape, frames, device=device))
                elif "generator" in step_params:
                    kw["generator"] = step_generators(run.seed, i, frames)
                latents = sched.step(_rows(eps), t, _rows(latents), **kw).prev_sample
                latents = latents.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4).float()
                done = i + 1
                if ckpt is not None and (done % run.checkpoint_every == 0 or done == n_iter):
                    phase = "checkpoint"
                    ckpt.save(done, latents, pack_scheduler_state(sched))
                    phase = "denoising"
                if callback is not None:
                    callback(i, t, latents)
                bar.step(done, final=done == n_iter)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings["denoise"] = time.perf_counter() - t0
        step_i = n_iter
        engine_stats = engine.comm.counters.snapshot()

        # 6. Outputs: latents, then frames decoded in chunks, streamed to rank 0's encoder.
        t0 = time.perf_counter()
        if run.save_latents is not None:
            phase = "gathering latents"
            latents_tmp = _gather_latents(latents, layout, rank, world, process_group,
                                          comm.backend, device, run.save_latents, report_comm)
        timings["save_latents"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if run.out is not None:
            phase = "decoding and writing the video"
            if rank == 0:
                from .video import VideoWriter
                writer = VideoWriter(run.out, W, H, fps=run.video_fps, crf=run.crf)
            _decode_and_stream(pipe, latents, layout, rank, world, run.decode_chunk, writer,
                               process_group, comm.backend, device, report_comm, bar)
        # Both outputs appear together, and only when both are complete.
        phase = "committing the outputs"
        if writer is not None:
            writer.commit()
            writer = None
        if latents_tmp is not None:
            os.replace(latents_tmp, run.save_latents)
            latents_tmp = None
        timings["decode_write"] = time.perf_counter() - t0
    except GenerationError:
        raise
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        where = f" (step {step_i + 1}/{n_iter})" if phase in ("denoising", "checkpoint") else ""
        msg = f"rank {rank}: generation failed during {phase}{where}: {type(e).__name__}: {_short(e)}"
        if world > 1 and "peer" not in msg:
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
        if restore_text is not None:
            restore_text()
        if getattr(unet, "vinf_engine", None) is not None:
            unparallelize(unet)

    # 7. Report (one more agreement: every rank's timings, memory and traffic).
    timings["total"] = time.perf_counter() - t_start
    peak, kind = _peak_memory_mib(device)
    mine = dict(rank=rank, frames=len(frames), first_frame=frames.start, device=str(device),
                peak_memory_mib=round(peak, 1), memory_kind=kind,
                timings_s={k: round(v, 4) for k, v in timings.items()},
                comm=dict(engine_stats, **report_comm))
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
        output=os.path.abspath(run.out) if run.out else None,
        latents_file=os.path.abspath(run.save_latents) if run.save_latents else None,
        model=run.model if isinstance(run.model, str) else type(run.model).__name__,
        model_kind="videocrafter2" if vc2 else "unet3d",
        frames=run.num_frames, height=H, width=W, steps=run.steps, scheduler_iterations=n_iter,
        scheduler=type(sched).__name__, guidance_scale=run.guidance_scale, seed=run.seed,
        fps_conditioning=fps_value, scenes=[list(s) for s in run.scenes],
        config=dict(zip(("window", "num_global", "phase_t", "phase_bias", "sync_groupnorm"),
                        run.config.as_tuple())),
        ranks=world, backend=comm.backend or "none", comm_mode=run.comm_mode,
        dtype=str(tdtype).replace("torch.", ""),
        resumed_from_step=start_step or None, steps_run=denoised,
        frame_steps_per_s=(run.num_frames * denoised / slowest) if slowest > 0 and denoised else None,
        timings_s={k: max(r["timings_s"].get(k, 0.0) for r in per_rank)
                   for k in per_rank[0]["timings_s"]},
        comm_total={k: sum(r["comm"].get(k, 0) for r in per_rank)
                    for k in per_rank[0]["comm"]},
        per_rank=per_rank)
    report["latents"] = latents.detach().float().cpu()
    return report


def _short(e: BaseException, limit: int = 400) -> str:
    s = str(e).strip().splitlines()
    s = s[0] if s else ""
    return s if len(s) <= limit else s[:limit] + "..."


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) -> (B*F, C, H, W), one row per frame, as the diffusers pipeline steps."""
    b, c, f, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def _is_vc2(unet) -> bool:
    from .models.videocrafter2 import VideoCrafter2UNet3DConditionModel
    return isinstance(unet, VideoCrafter2UNet3DConditionModel) and bool(unet.config.fps_cond)


def _vc2_default_fps():
    from .models.videocrafter2 import DEFAULT_FPS
    return DEFAULT_FPS


def _check_model(run: _Run, pipe) -> list[str]:
    """Problems between the arguments and the loaded model."""
    from diffusers import UNet3DConditionModel
    p = []
    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, UNet3DConditionModel):
        return [f"the pipeline's unet is {type(unet).__name__}; vinf_engine runs UNet3DConditionModel "
                "pipelines (ModelScope, Zeroscope, VideoCrafter2)"]
    if getattr(unet, "vinf_engine", None) is not None:
        return ["the pipeline's unet is already parallelized (call vinf_engine.unparallelize first)"]
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    unet_factor = 2 ** (len(unet.config.block_out_channels) - 1)
    step = vae_factor * unet_factor
    for name, v in (("height", run.height), ("width", run.width)):
        if v is None:
            if not _is_int(unet.config.sample_size):
                p.append(f"the UNet's config has no sample_size to default the {name} from; "
                         f"give the {name}")
                continue
            v = unet.config.sample_size * vae_factor
        if v % step:
            p.append(f"{name} {v} is not a multiple of {step}: the VAE downsamples by {vae_factor} "
                     f"and the UNet by {unet_factor} more (try {max(step, v // step * step)})")
        elif v % 2:
            p.append(f"{name} {v} must be even for H.264 video")
    if run.fps is not None and not _is_vc2(unet):
        p.append(f"--fps conditions VideoCrafter2 only; this {type(unet).__name__} has no fps input "
                 "(use --video-fps for the mp4's frame rate)")
    if pipe.vae.config.latent_channels != unet.config.in_channels:
        p.append(f"the VAE's {pipe.vae.config.latent_channels} latent channels do not match the "
                 f"UNet's {unet.config.in_channels} input channels")
    te_dim = getattr(pipe.text_encoder.config, "hidden_size", None)
    if te_dim is not None and te_dim != unet.config.cross_attention_dim:
        p.append(f"the text encoder's width {te_dim} does not match the UNet's cross-attention "
                 f"width {unet.config.cross_attention_dim}")
    return p


def _make_scheduler(pipe, name: str | None):
    import diffusers
    if name is None:
        cls, overrides = type(pipe.scheduler), {}
    else:
        cls_name, overrides = SCHEDULERS[name]
        cls = getattr(diffusers, cls_name)
    # A fresh scheduler per run: their state (multistep history, step index) lives on them.
    return cls.from_config(pipe.scheduler.config, **overrides)


def _encode_scenes(pipe, run: _Run, device, do_cfg: bool, frames: range, holder: dict):
    """The UNet's ``encoder_hidden_states``: ``(2, L, D)`` ([uncond, cond]) for one scene; for a
    schedule of scenes that same stand-in plus, in ``holder["text"]``, one row per
    (batch, frame) of this rank's clip in the UNet's order (batch-major)."""
    with torch.no_grad():
        embs, neg = [], None
        for _, prompt in run.scenes:
            cond, uncond = pipe.encode_prompt(prompt, device, 1, do_cfg,
                                              negative_prompt=run.negative_prompt)
            embs.append(cond)
            neg = uncond
    dtype = pipe.unet.dtype
    first = embs[_scene_of(run.scenes, frames.start)]
    text = torch.cat([neg, first]) if do_cfg else first
    if len(run.scenes) > 1:
        per_frame = torch.cat([embs[_scene_of(run.scenes, f)] for f in frames])
        holder["text"] = (torch.cat([neg.expand(len(frames), -1, -1), per_frame]) if do_cfg
                          else per_frame).to(dtype)
    return text.to(dtype)


def _chunks(n: int, size: int):
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def _decode(pipe, latents, s, e):
    """Frames ``s:e`` of this rank's latents, decoded: ``(n, H, W, 3)`` uint8 on the CPU."""
    from .video import frames_to_uint8
    vae = pipe.vae
    z = _rows(latents[:, :, s:e]) / vae.config.scaling_factor
    with torch.no_grad():
        images = vae.decode(z.to(vae.dtype)).sample
    return frames_to_uint8(images)


def _decode_and_stream(pipe, latents, layout, rank, world, chunk, writer, group, backend,
                       device, stats, bar):
    """Every rank decodes its frames in chunks of ``chunk``; rank 0 encodes its own as they are
    decoded, then receives the other ranks' chunks in frame order. Ranks > 0 decode everything
    first (their uint8 frames are small next to latents on the GPU), so all ranks decode at
    once and rank 0 never holds more than one foreign chunk."""
    import torch.distributed as dist
    n_own = len(layout.frames(rank))
    if rank == 0:
        written = 0
        for s, e in _chunks(n_own, chunk):
            writer.write(_decode(pipe, latents, s, e))
            written += e - s
        for src in range(1, world):
            peer = dist.get_global_rank(group, src) if group is not None else src
            for s, e in _chunks(layout.sizes[src], chunk):
                h, w = writer.size[1], writer.size[0]
                buf = torch.empty((e - s, h, w, 3), dtype=torch.uint8,
                                  device=device if backend == "nccl" else "cpu")
                dist.recv(buf, src=peer, group=group)
                stats["frames_bytes_received"] += buf.numel()
                writer.write(buf.cpu().numpy())
                written += e - s
            bar.note(f"video: {written}/{layout.num_frames} frames written")
    else:
        decoded = [_decode(pipe, latents, s, e) for s, e in _chunks(n_own, chunk)]
        dst = dist.get_global_rank(group, 0) if group is not None else 0
        for arr in decoded:
            t = torch.from_numpy(arr)
            if backend == "nccl":
                t = t.to(device)
            dist.send(t, dst=dst, group=group)
            stats["frames_bytes_sent"] += t.numel()


def _gather_latents(latents, layout, rank, world, group, backend, device, path, stats):
    """The whole video's final latents in one ``.pt`` file on rank 0: written to a temporary
    file beside ``path``, whose name is returned (rank 0; None elsewhere) for the caller to
    move into place once the video is complete too."""
    import torch.distributed as dist
    if rank == 0:
        parts = [latents.float().cpu()]
        for src in range(1, world):
            peer = dist.get_global_rank(group, src) if group is not None else src
            shape = list(latents.shape)
            shape[2] = layout.sizes[src]
            buf = torch.empty(shape, dtype=torch.float32, device=device if backend == "nccl" else "cpu")
            dist.recv(buf, src=peer, group=group)
            stats["frames_bytes_received"] += buf.numel() * 4
            parts.append(buf.cpu())
        full = torch.cat(parts, dim=2)
        directory, name = os.path.split(os.path.abspath(path))
        return save_temp({"latents": full}, directory, prefix=f".{name}.", suffix=".partial")
    dst = dist.get_global_rank(group, 0) if group is not None else 0
    t = latents.float().contiguous()
    t = t.to(device) if backend == "nccl" else t.cpu()
    dist.send(t, dst=dst, group=group)
    stats["frames_bytes_sent"] += t.numel() * 4
    return None
