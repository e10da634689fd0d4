"""Checkpoints of a generation in progress: each rank's latents and scheduler state, every k steps.

One file per rank and step, ``rank{r}-of-{R}.step{s}.pt``, written to a temporary name and moved
into place with ``os.replace`` (a reader sees the old file or the complete new one, never half
of one). The two newest steps of each rank are kept: a rank killed while writing step ``s``
leaves step ``s - k`` intact, and the ranks resume from the newest step that all of them hold.
Each file carries the run's fingerprint (a hash of everything that determines the video) and
the settings it was made from, so that a checkpoint of another configuration is refused with
the names of the settings that differ.
"""
from __future__ import annotations

import os
import re

import numpy as np
import torch

from .files import temp_file

__all__ = ["Checkpointer", "CheckpointError", "pack_scheduler_state", "restore_scheduler_state",
           "restore_cache_state"]

FORMAT = 1
KEEP = 2
_NAME = re.compile(r"^rank(\d+)-of-(\d+)\.step(\d+)\.pt$")


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def save_temp(obj, directory: str, *, prefix: str, suffix: str) -> str:
    """``torch.save`` ``obj`` into a new hidden file in ``directory``, flushed to disk; returns
    its path, for the caller to ``os.replace`` into place. Nothing is left behind on failure."""
    fd, tmp = temp_file(directory, prefix=prefix, suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _unlink(tmp)
        raise
    return tmp


class CheckpointError(ValueError):
    pass


def unreadable(e: BaseException) -> str:
    """Why a checkpoint file cannot be read, in one short line: torch's own message for a
    damaged file runs to many lines and ends with advice to load it unsafely."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if "weights_only" in str(e) or "Unpickl" in type(e).__name__ or "pickle" in text.lower():
        return "not a complete checkpoint file: truncated or corrupt"
    if "zip archive" in text or "central directory" in text or "EOF" in text:
        return "not a complete checkpoint file: truncated or corrupt"
    return f"{type(e).__name__}: {text[:160]}"


# ---------------------------------------------------------------- scheduler state
def _pack(value, where):
    if isinstance(value, torch.Tensor):
        return {"__tensor__": value.detach().cpu().clone(), "device": value.device.type}
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise CheckpointError(f"{where} is an object array; cannot checkpoint it")
        return {"__ndarray__": torch.from_numpy(value.copy())}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_pack(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"__tuple__": [_pack(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"__dict__": {k: _pack(v, f"{where}.{k}") for k, v in value.items()}}
    raise CheckpointError(f"{where} is a {type(value).__name__}; cannot checkpoint it")


def _unpack(value, device):
    if isinstance(value, list):
        return [_unpack(v, device) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            t = value["__tensor__"]
            return t.to(device) if value["device"] != "cpu" else t
        if "__ndarray__" in value:
            return value["__ndarray__"].numpy()
        if "__tuple__" in value:
            return tuple(_unpack(v, device) for v in value["__tuple__"])
        if "__dict__" in value:
            return {k: _unpack(v, device) for k, v in value["__dict__"].items()}
    return value


def pack_scheduler_state(scheduler) -> dict:
    """Everything a diffusers scheduler keeps between steps (multistep histories, step index,
    sigmas...), as plain containers of CPU tensors; raises ``CheckpointError`` naming the
    attribute when a scheduler keeps something that cannot be saved."""
    name = type(scheduler).__name__
    return {k: _pack(v, f"{name}.{k}") for k, v in vars(scheduler).items()
            if k != "_internal_dict"}


def restore_cache_state(state, device):
    """A step cache's state as ``Checkpointer.save`` packed it (tensors back on ``device``)."""
    return _unpack(state, device)


def restore_scheduler_state(scheduler, state: dict, device):
    for k, v in state.items():
        setattr(scheduler, k, _unpack(v, device))


# ---------------------------------------------------------------- files
class Checkpointer:
    """This rank's checkpoints in ``directory``.

    Parameters
    ----------
    directory : shared by all ranks (or node-local: each rank touches only its own files)
    rank, world : this rank and the number of ranks
    fingerprint : hash of everything that determines the video
    settings : the settings behind the fingerprint (for messages)
    """

    def __init__(self, directory: str, rank: int, world: int, fingerprint: str, settings: dict):
        self.dir = os.path.abspath(directory)
        self.rank, self.world = rank, world
        self.fingerprint = fingerprint
        self.settings = settings

    def path(self, step: int) -> str:
        return os.path.join(self.dir, f"rank{self.rank:05d}-of-{self.world:05d}.step{step:06d}.pt")

    # -------------------------------------------------------- inspection
    def scan(self) -> dict:
        """What the directory holds: ``{world_size: {rank: [steps]}}`` of every checkpoint file."""
        found: dict = {}
        if not os.path.isdir(self.dir):
            return found
        for name in os.listdir(self.dir):
            m = _NAME.match(name)
            if m:
                r, w, s = (int(g) for g in m.groups())
                found.setdefault(w, {}).setdefault(r, []).append(s)
        return found

    def my_steps(self) -> list[int]:
        return sorted(self.scan().get(self.world, {}).get(self.rank, []))

    def check_resumable(self) -> tuple[str | None, list[int], list[str]]:
        """``(problem, steps, skipped)``: the steps this rank can resume from, newest last,
        after checking that they belong to this run, and the unreadable files it skipped; or
        why it cannot resume. Reads only this rank's files."""
        found = self.scan()
        if not found:
            return f"--resume: no checkpoint in {self.dir}", [], []
        if self.world not in found:
            other = ", ".join(str(w) for w in sorted(found))
            return (f"--resume: the checkpoint in {self.dir} was written by {other} rank(s); "
                    f"this run has {self.world}. Resume with the same number of ranks"), [], []
        steps = self.my_steps()
        if not steps:
            return f"--resume: rank {self.rank} has no checkpoint file in {self.dir}", [], []
        good, problems = [], []
        for s in steps:
            try:
                head = self._load(s)
            except Exception as e:  # noqa: BLE001 - a damaged file is reported, not fatal here
                problems.append(f"{os.path.basename(self.path(s))} is unreadable ({unreadable(e)})")
                continue
            if head.get("fingerprint") != self.fingerprint:
                return (f"--resume: the checkpoint in {self.dir} was made with different settings "
                        f"({_diff(head.get('settings', {}), self.settings)}); refusing to mix "
                        "them. Use the original settings or another --checkpoint-dir"), [], []
            good.append(s)
        if not good:
            return (f"--resume: no usable checkpoint for rank {self.rank}: "
                    + "; ".join(problems), [], [])
        return None, good, problems

    def check_fresh(self) -> str | None:
        """Why a new run must not start in this directory (it holds a checkpoint), or None."""
        found = self.scan()
        if found:
            steps = sorted({s for ranks in found.values() for ss in ranks.values() for s in ss})
            return (f"--checkpoint-dir {self.dir} already holds a checkpoint (steps {steps}); "
                    "pass --resume to continue it, or choose an empty directory")
        if os.path.exists(self.dir) and not os.path.isdir(self.dir):
            return f"--checkpoint-dir {self.dir} exists and is not a directory"
        parent = self.dir if os.path.isdir(self.dir) else os.path.dirname(os.path.abspath(self.dir))
        if os.path.exists(parent) and not os.path.isdir(parent):
            return f"--checkpoint-dir: its parent {parent} is a file, not a directory"
        if not os.path.isdir(parent):
            return f"--checkpoint-dir: parent directory {parent} does not exist"
        if not os.access(parent, os.W_OK | os.X_OK):
            return f"--checkpoint-dir {parent} is not writable"
        return None

    # -------------------------------------------------------- save / load
    def save(self, step: int, latents: torch.Tensor, scheduler_state: dict, caches=None):
        """``caches``: each denoiser's step cache state (``cache.StepCache.state_dict``)."""
        os.makedirs(self.dir, exist_ok=True)
        payload = {"format": FORMAT, "fingerprint": self.fingerprint, "settings": self.settings,
                   "rank": self.rank, "world": self.world, "step": step,
                   "latents": latents.detach().cpu(), "scheduler": scheduler_state}
        if caches is not None and any(c is not None for c in caches):
            payload["caches"] = [None if c is None else _pack(c, "step cache") for c in caches]
        tmp = save_temp(payload, self.dir, prefix=f".rank{self.rank:05d}.", suffix=".tmp")
        try:
            os.replace(tmp, self.path(step))
        except BaseException:
            _unlink(tmp)
            raise
        for old in self.my_steps()[:-KEEP]:
            try:
                os.unlink(self.path(old))
            except FileNotFoundError:
                pass

    def load(self, step: int) -> dict:
        head = self._load(step)
        if head.get("fingerprint") != self.fingerprint or head.get("step") != step:
            raise CheckpointError(f"{self.path(step)} does not belong to this run")
        return head

    def _load(self, step: int) -> dict:
        head = torch.load(self.path(step), map_location="cpu", weights_only=True)
        if not isinstance(head, dict) or head.get("format") != FORMAT:
            raise CheckpointError("not a vinf_engine checkpoint of format 1")
        return head

    def clear(self):
        """Remove this rank's checkpoint files (after the video is written)."""
        for s in self.my_steps():
            try:
                os.unlink(self.path(s))
            except FileNotFoundError:
                pass


def _diff(old: dict, new: dict, prefix: str = "") -> str:
    """The settings that differ, by name (nested dicts by dotted name)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out.append(_diff(a, b, f"{prefix}{k}."))
            continue
        ra, rb = repr(a), repr(b)
        ra = ra if len(ra) <= 60 else ra[:57] + "..."
        rb = rb if len(rb) <= 60 else rb[:57] + "..."
        out.append(f"{prefix}{k}: checkpoint {ra}, now {rb}")
    if prefix:
        return "; ".join(out)
    return "; ".join(out) if out else "same settings, different model weights or library state"
