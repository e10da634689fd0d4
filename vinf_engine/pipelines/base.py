"""What a pipeline family gives ``vinf_engine.generate``: inspect, load, check, encode,
predict, decode. ``generate`` itself is the phases only (``vinf_engine/pipeline.py``)."""
from __future__ import annotations

import hashlib
import json
import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..config import DualScopeConfig
from ..errors import GenerationError

__all__ = ["PipelineFamily", "VideoPlan", "Conditioning", "read_json", "component_dirs_problem",
           "rows"]


def read_json(path):
    with open(path) as f:
        return json.load(f)


def component_dirs_problem(path: str, index: dict, need: tuple, pipe_cls: str, runs: str):
    """Why the components ``need`` of the pipeline folder ``path`` are missing, or None."""
    missing = [c for c in need if not isinstance(index.get(c), list) or index[c][0] is None]
    if missing:
        return (f"{path!r} holds a {pipe_cls}, not a supported text-to-video pipeline: it lacks "
                f"{', '.join(missing)} ({runs})")
    for c in need:
        if not os.path.isdir(os.path.join(path, c)):
            return f"model folder {path!r} lacks its {c}/ subfolder"
    return None


def rows(x: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) -> (B*F, C, H, W), one row per frame, as diffusers' UNet3D pipeline
    steps its scheduler: any per-sample statistic (dynamic thresholding) is then per frame,
    split-free. Elementwise schedulers give the same on either shape."""
    b, c, f, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


@dataclass(frozen=True)
class VideoPlan:
    """The run's video in latent and pixel terms, from the settings and the model."""

    frames: int                 # video frames
    latent_frames: int          # what the denoiser's clips split (the layout's frames)
    shape: tuple                # (1, C, latent_frames, h, w) of the whole video's latents
    height: int
    width: int
    scene_starts: tuple         # first latent frame of each scene
    temporal: int = 1           # video frames per latent frame (after latent frame 0)
    unit: int = 1               # latent frames per layout frame (CogVideoX 1.5: pairs)

    def video_frames(self, latent: range) -> range:
        """The video frames that latent frames ``latent`` decode to (latent frame 0 is video
        frame 0; latent frame i > 0 is ``temporal`` frames ending at ``temporal * i``)."""
        def first(i):
            return 0 if i == 0 else 1 + self.temporal * (i - 1)
        return range(first(latent.start), first(latent.stop))


class PipelineFamily(ABC):
    """One kind of diffusers text-to-video pipeline.

    A family says whether it claims a folder (its ``model_index.json``) or a loaded pipeline,
    and then: ``inspect`` (check a folder without loading weights), ``load``, ``check`` (the
    settings against the loaded model), ``plan`` (the video in latent terms), ``denoisers``
    (the models to parallelize), ``encode`` (the text, per rank: a ``Conditioning`` whose
    ``predict`` is one guided model evaluation) and ``decode`` (this rank's frames)."""

    name = "?"
    runs = "?"                            # what the family runs, for error messages
    defaults = {}                         # steps, guidance_scale, video_fps
    schedulers = {}                       # --scheduler name -> (diffusers class, overrides)
    components = ()                       # for the digest: modules that define the video
    cuda_dtype = torch.float16            # the denoiser's dtype on CUDA unless --dtype says
    catch_all = False                     # claims any folder no other family claims
    # What a loaded pipeline must hold to be claimed: (attribute, model class name, the stock
    # pipelines that hold one), for the drop-in's refusal of anything else.
    takes = ("?", "?", "?")

    @abstractmethod
    def claims_dir(self, index: dict) -> bool: ...

    @abstractmethod
    def claims(self, pipe) -> bool: ...

    @abstractmethod
    def inspect(self, path: str, index: dict) -> tuple: ...

    @abstractmethod
    def load(self, path: str, info: dict, dtype, device): ...

    @abstractmethod
    def check(self, settings, pipe) -> list: ...

    @abstractmethod
    def plan(self, settings, pipe) -> VideoPlan: ...

    def denoisers(self, pipe) -> list:
        """The models to parallelize: the pipeline's ``transformer`` unless said."""
        return [pipe.transformer]

    def default_config(self, pipe) -> DualScopeConfig:
        """The run's config before the settings' overrides: the one ``parallelize`` takes for
        the first denoiser when given none, its adapter's default."""
        from ..models import adapter_class
        model = self.denoisers(pipe)[0]
        return adapter_class(model)().default_config(model)

    @abstractmethod
    def encode(self, pipe, settings, plan, frames: range, device): ...

    @abstractmethod
    def decode(self, pipe, latents, layout, rank: int, comm, chunk: int): ...

    def kind(self, pipe) -> str:
        return self.name

    def check_visual(self, s, pipe, visual) -> list[str]:
        """What the model cannot take of the run's images or video to extend
        (``conditioning.Visual``); a family that takes none refuses any."""
        if visual:
            return [f"{self.name} pipelines take no images or video to extend"]
        return []

    def prefix_frames(self, pipe, visual, plan):
        """The extended video's frames at the run's size, (P, H, W, 3) uint8, as the model
        sees them (the family's own resize), written before the new ones. A family that
        takes no video to extend never gets here: ``check_visual`` refused it; called anyway,
        it refuses the same way."""
        raise GenerationError(f"{self.name} pipelines take no images or video to extend")

    def text_limit(self, pipe) -> int:
        """Tokens of the text encoder's input; longer prompts are cut to it."""
        return int(pipe.tokenizer.model_max_length)

    def prompt_warnings(self, s, pipe) -> list[str]:
        """A line for every prompt the text encoder will cut short, naming the limit."""
        limit = self.text_limit(pipe)
        out = []
        texts = [t for _, t in s.scenes] + ([s.negative_prompt] if s.negative_prompt else [])
        for text in dict.fromkeys(texts):
            n = len(pipe.tokenizer(text, truncation=False).input_ids)
            if n > limit:
                short = text if len(text) <= 40 else text[:37] + "..."
                out.append(f"prompt {short!r} is {n} tokens; the text encoder takes {limit}, "
                           "the rest is cut")
        return out

    def check_weights(self, pipe) -> list[str]:
        """A problem for every module whose weights hold NaN or Inf (they load, then make a
        black video)."""
        out = []
        for name in self.components:
            m = getattr(pipe, name, None)
            if m is None:
                continue
            bad = [n for n, p in m.named_parameters() if not bool(torch.isfinite(p).all())]
            if bad:
                out.append(f"{name} weights hold NaN or Inf in {len(bad)} tensor(s), e.g. "
                           f"{bad[:3]}")
        return out

    def patch_pipe(self, pipe, patcher) -> None:
        """Under ``parallelize_pipe``: change the pipeline's own methods (through ``patcher``,
        undone with the rest), e.g. to refuse, on every rank before any collective, a call
        whose input clip parallelism cannot split. Nothing by default."""

    # ---------------------------------------------------------------- shared behaviour
    def make_scheduler(self, pipe, name: str | None, plan: VideoPlan | None = None):
        """A fresh scheduler (``name``: one of ``schedulers``; None: the pipeline's own);
        ``plan``: the run's video, for families whose schedule depends on it."""
        import diffusers
        if name is None:
            cls, overrides = type(pipe.scheduler), {}
        else:
            cls_name, overrides = self.schedulers[name]
            cls = getattr(diffusers, cls_name)
        # A fresh scheduler per run: their state (multistep history, step index) lives on them.
        return cls.from_config(pipe.scheduler.config, **overrides)

    def scheduler_problem(self, name: str | None) -> str | None:
        if name is not None and name not in self.schedulers:
            return (f"unknown scheduler {name!r}; choose one of {sorted(self.schedulers)} "
                    f"for {self.name}, or leave it unset for the pipeline's own")
        return None

    def digest(self, pipe) -> str:
        """A cheap identity of the weights: configs, parameter names and shapes, and a checksum
        of the first elements of every parameter. Equal digests on every rank and in a
        checkpoint mean the same model, for any practical purpose."""
        h = hashlib.sha256()
        for name in self.components:
            m = getattr(pipe, name, None)
            if m is None:
                continue
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


class Conditioning:
    """The text of one rank's clip, and ``predict(x, t)``: one guided model evaluation.
    Processors a family swaps in for per-frame text are put back by ``close``."""

    cfg = False

    def __init__(self):
        self._undo = []

    def swap_processor(self, attn, processor):
        old = attn.processor
        attn.set_processor(processor)
        self._undo.append(lambda: attn.set_processor(old))

    def pre_hook(self, module, fn):
        """``fn(module, args, kwargs)`` before every call of ``module``, until ``close``."""
        self._undo.append(module.register_forward_pre_hook(fn, with_kwargs=True).remove)

    # What the denoising loop asks of a conditioning that holds frames fixed (images, an
    # extension's context); by default nothing is held and the latents pass through.
    def prepare(self, sched, latents: torch.Tensor) -> torch.Tensor:
        """The initial latents of this rank's clip, before the first step."""
        return latents

    def after_step(self, sched, latents: torch.Tensor, i: int) -> torch.Tensor:
        """This rank's latents after step ``i`` (of ``sched.timesteps``)."""
        return latents

    def finish(self, latents: torch.Tensor) -> torch.Tensor:
        """This rank's final latents."""
        return latents

    def guided(self, out: torch.Tensor, scale: float) -> torch.Tensor:
        """Classifier-free guidance over a batch of [uncond, cond]."""
        if not self.cfg:
            return out
        uncond, cond = out.chunk(2)
        return uncond + scale * (cond - uncond)

    def close(self):
        while self._undo:
            self._undo.pop()()


def load_error(e: BaseException) -> str:
    """One line for a loading error: torch lists every mismatched tensor (tens of KB for a
    config that does not fit its weights) and ends with advice to ignore the mismatch."""
    text = str(e)
    mismatches = re.findall(r"size mismatch for ([\w.]+): copying a param with shape "
                            r"torch.Size\((\[[^\]]*\])\) from checkpoint, the shape in current "
                            r"model is torch.Size\((\[[^\]]*\])\)", text)
    if mismatches:
        first = "; ".join(f"{n}: weights {a}, config {b}" for n, a, b in mismatches[:2])
        return (f"its config does not match its weights: {len(mismatches)} tensor(s) differ in "
                f"shape, e.g. {first}")
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    return f"{type(e).__name__}: {line if len(line) <= 300 else line[:300] + '...'}"


def load_component(name: str, load, path: str):
    """``load()`` of one diffusers component with its loading info; a GenerationError naming
    the component on failure or missing weights."""
    try:
        model, info = load()
    except Exception as e:  # noqa: BLE001 - safetensors, torch and diffusers raise many types
        raise GenerationError(f"cannot load {name} from {path!r}: {load_error(e)}") from None
    if info.get("missing_keys"):
        raise GenerationError(f"{name} weights in {path!r} lack {len(info['missing_keys'])} "
                              f"tensor(s), e.g. {sorted(info['missing_keys'])[:3]}")
    return model.eval()


def load_transformers(index: dict, path: str, dtype,
                      names: tuple = ("text_encoder", "tokenizer")) -> dict:
    """The text encoder and tokenizer of a pipeline folder (transformers classes); ``names``:
    other components of that kind (HunyuanVideo's ``text_encoder_2``, ``tokenizer_2``)."""
    import transformers
    loaded = {}
    for name in names:
        cls = getattr(transformers, index[name][1], None)
        if cls is None:
            raise GenerationError(f"{name} class {index[name][1]!r} is not in transformers")
        kw = dict(dtype=dtype) if name.startswith("text_encoder") else {}
        try:
            obj = cls.from_pretrained(os.path.join(path, name), local_files_only=True, **kw)
        except Exception as e:  # noqa: BLE001
            raise GenerationError(f"cannot load {name} from {path!r}: {load_error(e)}") from None
        loaded[name] = obj.eval() if name.startswith("text_encoder") else obj
    return loaded


def load_scheduler(path: str):
    import diffusers
    from diffusers.schedulers.scheduling_utils import SchedulerMixin
    try:
        scfg = read_json(os.path.join(path, "scheduler", "scheduler_config.json"))
        scls = getattr(diffusers, scfg.get("_class_name", ""), None)
        if not (isinstance(scls, type) and issubclass(scls, SchedulerMixin)):
            raise GenerationError(f"scheduler {scfg.get('_class_name')!r} is not a diffusers scheduler")
        return scls.from_pretrained(path, subfolder="scheduler", local_files_only=True)
    except (OSError, ValueError) as e:
        if isinstance(e, GenerationError):
            raise
        raise GenerationError(f"cannot load scheduler from {path!r}: {e}") from None
