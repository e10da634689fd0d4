"""The geometry of a split video: which global frames each rank owns, which frames the global
scope shares, and which frames each rank's halos and attention need from the others.

Everything here is a pure function of global frame indices, so every rank derives the same
plans without asking anyone.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Sequence

__all__ = ["ClipLayout", "global_frames", "AttentionPlan", "attention_plan", "halo_wants"]


class ClipLayout:
    """A video of ``num_frames`` frames split into contiguous clips, one per rank, in rank order.

    ``ClipLayout(num_frames, world_size)`` is the balanced split: sizes differ by at most one and
    the first ranks take the extra frame. ``ClipLayout.from_sizes(sizes)`` takes any split with
    at least one frame per rank.
    """

    __slots__ = ("num_frames", "world_size", "sizes", "_starts", "__dict__")

    def __init__(self, num_frames: int, world_size: int):
        if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        if not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames < 1:
            raise ValueError(f"num_frames must be an int >= 1, got {num_frames!r}")
        if num_frames < world_size:
            raise ValueError(
                f"num_frames ({num_frames}) is smaller than world_size ({world_size}): "
                "every rank needs at least one frame")
        base, extra = divmod(num_frames, world_size)
        self._init(tuple(base + (r < extra) for r in range(world_size)))

    @classmethod
    def from_sizes(cls, sizes: Sequence[int]) -> "ClipLayout":
        sizes = tuple(sizes)
        if not sizes:
            raise ValueError("sizes must name at least one rank")
        for r, s in enumerate(sizes):
            if not isinstance(s, int) or isinstance(s, bool) or s < 1:
                raise ValueError(f"rank {r} holds {s!r} frames; every rank needs at least one frame")
        self = cls.__new__(cls)
        self._init(sizes)
        return self

    def _init(self, sizes):
        self.sizes = sizes
        self.world_size = len(sizes)
        self.num_frames = sum(sizes)
        starts, acc = [], 0
        for s in sizes:
            starts.append(acc)
            acc += s
        self._starts = tuple(starts)

    def start(self, rank: int) -> int:
        return self._starts[self._check(rank)]

    def end(self, rank: int) -> int:
        return self._starts[self._check(rank)] + self.sizes[rank]

    def frames(self, rank: int) -> range:
        return range(self.start(rank), self.end(rank))

    def owner(self, frame: int) -> int:
        if not 0 <= frame < self.num_frames:
            raise ValueError(f"frame {frame} is outside the video [0, {self.num_frames})")
        return bisect_right(self._starts, frame) - 1

    def _check(self, rank):
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside [0, {self.world_size})")
        return rank

    def __eq__(self, other):
        return isinstance(other, ClipLayout) and other.sizes == self.sizes

    def __hash__(self):
        return hash(self.sizes)

    def __repr__(self):
        return f"ClipLayout(num_frames={self.num_frames}, sizes={self.sizes})"

    @cached_property
    def max_size(self) -> int:
        return max(self.sizes)


def global_frames(num_frames: int, num_global: int) -> tuple[int, ...]:
    """The global scope: ``num_global`` frames spread uniformly over the whole video.

    Index ``j`` of ``0..G-1`` maps to frame ``floor((j + 0.5) * F / G)`` (exact integer form
    below); every frame when ``G >= F``. Depends on global quantities only, so every rank
    selects the same set whatever the split.
    """
    if num_global <= 0:
        return ()
    if num_global >= num_frames:
        return tuple(range(num_frames))
    return tuple(((2 * j + 1) * num_frames) // (2 * num_global) for j in range(num_global))


@dataclass(frozen=True)
class AttentionPlan:
    """What one rank's dual-scope attention needs beyond its own frames, for one layout."""

    wants: tuple          # per rank: the global frames it gathers (halos and global scope)
    window: int           # the window clipped to the video: min(window, F - 1)
    left: tuple           # positions in wants[me] of the left halo, in frame order
    right: tuple          # ... of the right halo
    glob: tuple           # ... of the global frames, in global-scope order

    @property
    def left_frames(self) -> tuple:
        return tuple(self.wants_of_me[i] for i in self.left)

    @property
    def right_frames(self) -> tuple:
        return tuple(self.wants_of_me[i] for i in self.right)

    @property
    def glob_frames(self) -> tuple:
        return tuple(self.wants_of_me[i] for i in self.glob)

    wants_of_me: tuple = ()   # wants[rank], for the properties above


@lru_cache(maxsize=64)
def attention_plan(layout: ClipLayout, rank: int, window: int, num_global: int) -> AttentionPlan:
    F = layout.num_frames
    w = min(window, F - 1)
    g = global_frames(F, num_global)
    wants = []
    for r in range(layout.world_size):
        s, e = layout.start(r), layout.end(r)
        wants.append(tuple(sorted(set(range(max(0, s - w), s)) | set(range(e, min(F, e + w)))
                                  | set(g))))
    s, e = layout.start(rank), layout.end(rank)
    pos = {f: i for i, f in enumerate(wants[rank])}
    return AttentionPlan(
        wants=tuple(wants), window=w,
        left=tuple(pos[f] for f in range(max(0, s - w), s)),
        right=tuple(pos[f] for f in range(e, min(F, e + w))),
        glob=tuple(pos[f] for f in g), wants_of_me=wants[rank])


@lru_cache(maxsize=64)
def halo_wants(layout: ClipLayout, halo: int) -> tuple:
    """Per rank: the up to ``halo`` frames on each side of its clip (fewer at the video's ends)."""
    F = layout.num_frames
    return tuple(tuple(range(max(0, layout.start(r) - halo), layout.start(r)))
                 + tuple(range(layout.end(r), min(F, layout.end(r) + halo)))
                 for r in range(layout.world_size))
