"""What one generation run is asked to do: a settings dataclass, checked before any collective.

``GenerateSettings`` is built by ``vinf_engine.generate`` from its keyword arguments and by the
CLI from its flags (their ``dest`` names are the field names). ``problems(rank, world)`` lists
everything wrong that needs neither a model nor the other ranks; ``generate`` agrees on every
rank's list (and on ``comparable()``) before anything else, so that every rank refuses the
same way. Fields left None take the model family's default (``pipelines``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch

from .cache import CacheConfig
from .conditioning import input_digest, visual_problems
from .config import DualScopeConfig
from .errors import GenerationError, GenerationFailed
from .prompts import read_prompt_file, scenes

__all__ = ["GenerateSettings", "GenerationError", "GenerationFailed", "DEFAULTS", "DTYPES",
           "COMM_MODES"]

# Family-independent defaults (the families give steps, guidance and the mp4's frame rate).
# context_frames: 9 = 4*2 + 1, whole latent frames for Wan's VAE (three), 9 for UNet3D.
DEFAULTS = dict(crf=18, decode_chunk=8, checkpoint_every=5, timeout=600.0, context_frames=9)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# How exchanges move (vinf_engine.scheduler.MODES less "loopback", which is for timing only).
COMM_MODES = ("overlap", "blocking", "stale")


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class GenerateSettings:
    """Everything that defines a run (see ``vinf_engine.generate`` for each field's meaning).

    ``num_frames`` counts video frames (UNet3D: one latent frame each; Wan: ``4k + 1``, ``k + 1``
    latent frames). ``config`` is a ``DualScopeConfig``, a dict of fields overriding the
    family's default config, or None (the family's default)."""

    model: object = None
    prompts: object = None
    prompt_file: str | None = None
    num_frames: int | None = None
    out: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    guidance_scale_2: float | None = None
    seed: int = 0
    config: object = None
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    fps: float | None = None
    video_fps: float | None = None
    crf: int = DEFAULTS["crf"]
    scheduler: str | None = None
    dtype: str | None = None
    decode_chunk: int = DEFAULTS["decode_chunk"]
    save_latents: str | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = DEFAULTS["checkpoint_every"]
    resume: bool = False
    overwrite: bool = False
    comm_mode: str = "overlap"
    chunk_mib: float = 1024.0
    images: object = None          # a path or PIL image (frame 0), or (frame, image) pairs
    last_image: object = None      # pinned at the last frame
    extend: str | None = None      # an mp4 to continue: its frames, then num_frames new ones
    context_frames: int | None = None   # the input's last frames the new ones follow
    cache: object = None           # a step cache: "fbc:0.08" or a cache.CacheConfig (off: None)
    scenes: list = field(default_factory=list, init=False)   # set by problems()
    inputs: dict = field(default_factory=dict, init=False)   # checksums of images, video

    @property
    def video_frames(self) -> int:
        """Frames of the video the model makes: ``num_frames``, and when extending, the
        input's ``context_frames`` before them."""
        extra = self.context_frames if self.extend is not None and _is_int(self.context_frames) else 0
        return self.num_frames + extra

    @classmethod
    def field_names(cls) -> tuple:
        return tuple(f.name for f in fields(cls) if f.init)

    def resolved_config(self, default: DualScopeConfig) -> DualScopeConfig:
        """The run's config: ``config`` itself, or ``default`` with ``config``'s overrides."""
        if isinstance(self.config, DualScopeConfig):
            return self.config
        return DualScopeConfig(**{**default.as_dict(), **(self.config or {})})

    def problems(self, rank: int, world: int) -> list[str]:
        """What is wrong with the settings, without a model or the other ranks (the model
        folder is the check phase's: ``vinf_engine.phases``)."""
        p = []
        if self.extend is not None and self.context_frames is None:
            self.context_frames = DEFAULTS["context_frames"]
        if not _is_int(self.num_frames) or self.num_frames < 1:
            p.append(f"frames must be a positive integer, got {self.num_frames!r}")
        if self.steps is not None and (not _is_int(self.steps) or self.steps < 1):
            p.append(f"steps must be a positive integer, got {self.steps!r}")
        for name in ("guidance_scale", "guidance_scale_2"):
            v = getattr(self, name)
            if v is not None and (not _is_num(v) or v < 0):
                what = "guidance scale" + (" 2" if name.endswith("2") else "")
                p.append(f"{what} must be a finite number >= 0, got {v!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2 ** 64:
            p.append(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        if isinstance(self.config, dict):
            try:
                DualScopeConfig(**self.config)
            except (TypeError, ValueError) as e:
                p.append(f"dual-scope config: {e}")
        elif self.config is not None and not isinstance(self.config, DualScopeConfig):
            p.append(f"config must be a vinf_engine.DualScopeConfig, got {type(self.config).__name__}")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 1):
                p.append(f"{name} must be a positive integer, got {v!r}")
        if self.fps is not None and (not _is_num(self.fps) or self.fps <= 0):
            p.append(f"fps must be a positive number, got {self.fps!r}")
        if self.video_fps is not None and (not _is_num(self.video_fps) or self.video_fps <= 0):
            p.append(f"video fps must be a positive number, got {self.video_fps!r}")
        if not _is_int(self.crf) or not 0 <= self.crf <= 51:
            p.append(f"crf must be an integer in [0, 51], got {self.crf!r}")
        if not _is_num(self.chunk_mib) or self.chunk_mib < 0:
            p.append(f"chunk MiB must be a number >= 0 (0: unchunked), got {self.chunk_mib!r}")
        if self.comm_mode not in COMM_MODES:
            p.append(f"comm mode must be one of {list(COMM_MODES)}, got {self.comm_mode!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            p.append(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not _is_int(self.decode_chunk) or self.decode_chunk < 1:
            p.append(f"decode chunk must be a positive integer, got {self.decode_chunk!r}")
        if not _is_int(self.checkpoint_every) or self.checkpoint_every < 1:
            p.append(f"checkpoint interval must be a positive integer, got {self.checkpoint_every!r}")
        if self.resume and not self.checkpoint_dir:
            p.append("--resume needs --checkpoint-dir")
        # Prompts: from a file or given; a file is read by every rank (multi-node: every node).
        if self.prompt_file is not None and self.prompts is not None:
            p.append("give a prompt or a prompt file, not both")
        elif self.prompt_file is None and self.prompts is None:
            p.append("no prompt given")
        else:
            try:
                src = (read_prompt_file(self.prompt_file) if self.prompt_file is not None
                       else self.prompts)
                if _is_int(self.num_frames) and self.num_frames >= 1:
                    self.scenes = scenes(src, self.video_frames)
            except GenerationError as e:
                p.append(str(e))
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            p.append("negative prompt must be a string")
        if self.context_frames is not None and (not _is_int(self.context_frames)
                                                or self.context_frames < 1):
            p.append(f"context frames must be a positive integer, got {self.context_frames!r}")
        elif self.context_frames is not None and self.extend is None:
            p.append("--context-frames is for --extend")
        try:
            CacheConfig.parse(self.cache)
        except ValueError as e:
            p.append(str(e))
        p += visual_problems(self)
        self.inputs = input_digest(self)
        if rank == 0:                              # outputs are written by rank 0 only
            p += self._output_problems()
        return p

    def _cache_spec(self):
        try:
            c = CacheConfig.parse(self.cache)
        except ValueError:
            return self.cache if isinstance(self.cache, str) else repr(self.cache)
        return None if c is None else c.spec()

    def _output_problems(self) -> list[str]:
        from .video import check_output_path
        p = []
        if self.out is not None:
            e = check_output_path(self.out, overwrite=self.overwrite)
            if e:
                p.append(e)
        if self.save_latents is not None:
            e = check_output_path(self.save_latents, overwrite=self.overwrite, suffixes=(".pt",))
            if e:
                p.append(e.replace("output", "latents output"))
        if self.out is not None:
            try:                                   # found now, not after the last step
                import imageio_ffmpeg
                imageio_ffmpeg.get_ffmpeg_exe()
            except Exception as e:  # noqa: BLE001
                p.append(f"no video encoder: {type(e).__name__}: {e} (pip install imageio-ffmpeg, "
                         "or vinf_engine[generate])")
        return p

    def comparable(self) -> dict:
        """The settings every rank must share (outputs are rank 0's business; the model is
        compared by weight digest after loading)."""
        def real(v):      # 12 and 12.0 are the same guidance, in every rank's eyes and a hash's
            return float(v) if _is_num(v) else v
        c = self.config
        config = c.as_dict() if isinstance(c, DualScopeConfig) else c
        if isinstance(config, dict):
            config = {k: real(v) for k, v in sorted(config.items())}
        return dict(scenes=[list(s) for s in self.scenes], negative_prompt=self.negative_prompt,
                    frames=self.num_frames, steps=self.steps, guidance=real(self.guidance_scale),
                    guidance_2=real(self.guidance_scale_2), seed=self.seed,
                    config=config,
                    height=self.height, width=self.width, fps=real(self.fps),
                    scheduler=self.scheduler, dtype=self.dtype, decode_chunk=self.decode_chunk,
                    video_fps=real(self.video_fps), crf=self.crf,
                    checkpoint=bool(self.checkpoint_dir), checkpoint_every=self.checkpoint_every,
                    resume=self.resume, out=self.out is not None,
                    save_latents=self.save_latents is not None,
                    inputs=self.inputs, context_frames=self.context_frames,
                    cache=self._cache_spec(),
                    # overlap and blocking make the same video; stale another
                    comm="stale" if self.comm_mode == "stale" else "exact")
