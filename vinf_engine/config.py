"""The user-facing knobs of dual-scope attention, validated once at construction."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

__all__ = ["DualScopeConfig", "GLOBAL_POSITIONS"]

GLOBAL_POSITIONS = ("clamp", "true")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


@dataclass(frozen=True)
class DualScopeConfig:
    """How a clip-parallel model couples frames.

    Parameters
    ----------
    window : int
        Local scope: query frame ``a`` attends key frames ``b`` with ``|b - a| <= window``.
        A window ``>= num_frames - 1`` means full temporal attention.
    num_global : int
        Global scope: frames spread uniformly over the whole video, shared by every query
        (``0`` disables the global scope).
    phase_t : float
        Diffusion timestep at which the phase bias switches: for ``t >= phase_t`` the global
        logits get ``+phase_bias``, below it the local logits do.
    phase_bias : float
        The logit bias of the favoured scope.
    sync_groupnorm : bool
        GroupNorm statistics over the whole video (exact, the default) or per clip (the
        published prototype's behaviour; breaks partition invariance, kept for ablations).
    global_positions : "clamp" or "true"
        Models with temporal position encodings (Wan's RoPE) only: where the global scope's
        keys sit relative to each query. ``"clamp"`` (default): at the true relative offset
        clipped to the trained range, ``|offset| <= trained_frames - 1``, so that no logit sees
        a temporal distance the model never saw (with the window inside the trained range
        too); equal to ``"true"`` while the video fits the trained length. ``"true"``: at their
        true global positions (exact mode, ablations). See docs/wan.md.
    trained_frames : int or None
        The (latent) frame count the model was trained on, which bounds the relative temporal
        distances it saw; None: the model family's value (Wan 2.1 / 2.2 A14B: 21, TI2V-5B: 31).
        Unused by families without temporal positions (UNet3D).
    """

    window: int = 8
    num_global: int = 16
    phase_t: float = 800
    phase_bias: float = 10.0
    sync_groupnorm: bool = True
    global_positions: str = "clamp"
    trained_frames: int | None = None

    def __post_init__(self):
        if not _is_int(self.window) or self.window < 0:
            raise ValueError(f"window must be a non-negative int, got {self.window!r}")
        if not _is_int(self.num_global) or self.num_global < 0:
            raise ValueError(f"num_global must be a non-negative int, got {self.num_global!r}")
        if not _is_real(self.phase_t) or self.phase_t < 0:
            raise ValueError(f"phase_t must be a finite number >= 0, got {self.phase_t!r}")
        if not _is_real(self.phase_bias):
            raise ValueError(f"phase_bias must be a finite number, got {self.phase_bias!r}")
        if not isinstance(self.sync_groupnorm, bool):
            raise ValueError(f"sync_groupnorm must be a bool, got {self.sync_groupnorm!r}")
        if self.global_positions not in GLOBAL_POSITIONS:
            raise ValueError(f"global_positions must be one of {GLOBAL_POSITIONS}, "
                             f"got {self.global_positions!r}")
        if self.trained_frames is not None and (not _is_int(self.trained_frames)
                                                or self.trained_frames < 1):
            raise ValueError(f"trained_frames must be None or an int >= 1, "
                             f"got {self.trained_frames!r}")

    def biases(self, timestep: float) -> tuple[float, float]:
        """``(local_bias, global_bias)`` at diffusion timestep ``timestep``."""
        if timestep >= self.phase_t:
            return 0.0, float(self.phase_bias)
        return float(self.phase_bias), 0.0

    def as_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self))

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
