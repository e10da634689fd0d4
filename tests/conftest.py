import os
import sys

# Spawned ranks import the helpers by module name; keep tests/ importable for them too.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")
