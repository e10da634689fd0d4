"""``python -m vinf_engine generate ...`` (see vinf_engine/cli.py)."""
import os
import sys

from .cli import main

if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        # A failed run may hold a broken process group (a dead peer); interpreter teardown
        # could block on it. Everything worth keeping is flushed; leave now.
        os._exit(code)
    sys.exit(0)
