"""Prompts: one scene or several, from arguments or a prompt file, placed on global frames."""
from __future__ import annotations

import re

from .errors import GenerationError

__all__ = ["read_prompt_file", "scenes", "scene_of"]


_SCENE = re.compile(r"^(\d+):(?:\s+(.*))?$")


def read_prompt_file(path: str) -> list:
    """Scenes from a UTF-8 text file (a byte-order mark is fine): one prompt per non-empty
    line; a line starting with ``#`` is a comment.

    Either no line names a frame (the scenes split the video evenly), or every line is a scene
    ``FRAME: prompt``, digits, a colon, then whitespace: the global (video) frame at which that
    scene begins, the first 0::

        0: a red panda wakes up in a bamboo forest
        96: the red panda climbs a tree

    ``16:9 cinematic shot`` is a plain prompt (no space after the colon). A line that starts
    with a backslash is taken literally without it: ``\12: the apostles`` is the prompt
    ``12: the apostles``, ``\# one`` the prompt ``# one``.
    """
    try:
        with open(path, encoding="utf-8-sig") as f:
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
    entries = []                              # (line number, frame or None, text)
    for number, raw in enumerate(text.splitlines(), 1):
        ln = raw.strip()
        if not ln or ln.startswith("#"):
            continue
        if ln.startswith("\\"):
            entries.append((number, None, ln[1:].strip()))
            continue
        m = _SCENE.match(ln)
        if m is None:
            entries.append((number, None, ln))
            continue
        if not (m.group(2) or "").strip():
            raise GenerationError(f"prompt file {path!r}, line {number}: the scene at frame "
                                  f"{m.group(1)} has no text")
        entries.append((number, int(m.group(1)), m.group(2).strip()))
    if not entries:
        raise GenerationError(f"prompt file {path!r} holds no prompt")
    if all(f is None for _, f, _ in entries):
        return [t for _, _, t in entries]
    plain = [n for n, f, _ in entries if f is None]
    if plain:
        raise GenerationError(f"prompt file {path!r}, line {plain[0]}: no 'FRAME: ' prefix, but "
                              "other lines have one; give every scene its first frame, or none "
                              "(a prompt that itself starts with digits and ': ' is written "
                              "with a leading backslash)")
    return [(f, t) for _, f, t in entries]


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
