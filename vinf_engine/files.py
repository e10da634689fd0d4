"""Output files: written under a hidden temporary name, renamed into place when complete."""
from __future__ import annotations

import os
import tempfile

__all__ = ["temp_file"]


def temp_file(directory: str, *, prefix: str, suffix: str) -> tuple[int, str]:
    """``(fd, path)`` of a new hidden file in ``directory`` for an output, with the mode a
    plain ``open`` would give it (0666 less the umask), which the rename keeps: ``mkstemp``
    alone makes every output 0600 whatever the umask."""
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, path
