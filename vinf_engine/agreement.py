"""How the ranks of a generation run agree before any data moves: every rank's problems and
values travel on the CPU control plane, and a problem on any rank refuses the run on all of
them with the same ``GenerationError``, so no rank is ever left waiting in a collective."""
from __future__ import annotations

import sys

from .comm import ClipComm
from .errors import GenerationError, GenerationFailed

__all__ = ["agree", "checked", "refuse", "same", "say", "short"]


def refuse(rows_, what: str):
    """Raise the same GenerationError on every rank when any rank reported a problem."""
    by_msg: dict = {}
    for r, problems in enumerate(rows_):
        for msg in problems:
            by_msg.setdefault(msg, []).append(r)
    if not by_msg:
        return
    world = len(rows_)
    parts = []
    for msg, ranks in by_msg.items():
        who = ("" if world == 1 else "every rank: " if len(ranks) == world
               else f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: ")
        parts.append(who + msg)
    raise GenerationError(f"{what}: " + "; ".join(parts))


def agree(comm: ClipComm, problems: list, payload, what: str) -> list:
    """Every rank's ``payload``, after refusing on every rank if any rank has ``problems``.
    A rank that died or hangs before the run starts: a clear failure, not a traceback."""
    try:
        got = comm.agree((problems, payload))
    except Exception as e:  # noqa: BLE001
        raise GenerationFailed(f"rank {comm.rank}: could not agree with the other ranks on "
                               f"{what}: {type(e).__name__}: {short(e)}") from e
    refuse([r[0] for r in got], "generate refused")
    return [r[1] for r in got]


def checked(fn) -> list:
    """``fn()``'s problems; a local crash becomes a problem, so no rank is left waiting."""
    try:
        return list(fn())
    except GenerationError as e:
        return [str(e)]
    except Exception as e:  # noqa: BLE001
        return [f"{type(e).__name__}: {e}"]


def same(values: list, what: str):
    """Refuse unless every rank's ``values`` (dicts) are equal; the message names the keys."""
    diff = [r for r, v in enumerate(values) if v != values[0]]
    if not diff:
        return
    keys = sorted(k for k in values[0] if any(values[r].get(k) != values[0].get(k) for r in diff))
    detail = "; ".join(f"{k}: " + ", ".join(f"rank {r}: {values[r].get(k)!r}" for r in [0] + diff)
                       for k in keys)
    raise GenerationError(f"generate refused: {what} ({detail})")


def say(line: str):
    """One line on stderr in one write, so that ranks sharing a terminal never mix lines."""
    sys.stderr.write(f"vinf_engine: {line}\n")
    sys.stderr.flush()


def short(e: BaseException, limit: int = 400) -> str:
    text = str(e).strip().splitlines()
    text = text[0] if text else ""
    return text if len(text) <= limit else text[:limit] + "..."
