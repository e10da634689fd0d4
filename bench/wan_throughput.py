"""The Wan mode of the main benchmark, kept under its old name: bench/dit_throughput.py with
``--family wan`` (its options and presets; ``python bench/dit_throughput.py --help``).

    python bench/wan_throughput.py [options]   ==  python bench/dit_throughput.py --family wan [options]
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dit_throughput  # noqa: E402
from dit_throughput import PRESETS, WAN21, build_wan, wan_kwargs  # noqa: E402

__all__ = ["PRESETS", "WAN21", "build_wan", "wan_kwargs", "main"]   # bench/memory.py's imports


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    return dit_throughput.main(["--family", "wan", *argv])


if __name__ == "__main__":
    sys.exit(main())
