"""bench/precision_noise.py: bf16 and fp32 runs of the same engine differ, by a rounding-sized
amount (neither zero, which would mean one dtype ran twice, nor wildly off)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_precision_noise_reports_a_rounding_sized_difference():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "precision_noise.py"),
                        "--preset", "tiny", "--latent", "4x4", "--frames", "4", "--steps", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    d = float(r.stdout.strip().rsplit("=", 1)[1])
    assert 1e-5 < d < 0.5, d
