"""Prompts: one scene or several, from arguments or a prompt file, placed on global frames."""
from __future__ import annotations

from .settings import GenerationError

__all__ = ["read_prompt_file", "scenes", "scene_of"]


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


def scenes(prompts, num_frames: int) -> list[tuple[int, str]]:
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


def scene_of(scenes, frame: int) -> int:
    idx = 0
    for i, (s, _) in enumerate(scenes):
        if s <= frame:
            idx = i
    return idx
