"""The main benchmark (bench/throughput.py, what `make bench` runs) at tiny shapes on the CPU:
it runs to the end, the engine's 2-rank output equals its 1-rank output, diffusers sits in the
same table, and the exchanges are counted."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_throughput_bench_runs_and_checks_partition_invariance(tmp_path):
    out = tmp_path / "throughput.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VINF_BACKEND")}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "throughput.py"),
                        "--ranks", "2", "--frames", "6", "--steps", "1", "--modes", "overlap",
                        "--latent", "8x8", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["complete"]
    rows = {r["name"]: r for r in report["rows"]}
    two = next(r for n, r in rows.items() if n.startswith("engine 2 ranks"))
    assert "error" not in two and two["frame_steps_per_s"] > 0
    assert two["mib_received_per_step"] > 0 and two["collectives_per_step"] >= 1
    assert any(n.startswith("diffusers") and "error" not in r for n, r in rows.items())
    assert report["max_rel_diff_R_ranks_vs_1_rank"] <= 1e-5


def test_overhead_bench_times_diffusers_and_the_engine(tmp_path):
    out = tmp_path / "overhead.json"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "overhead.py"), "--frames",
                        "3", "--latent", "8", "--rounds", "1", "--calls", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"diffusers", "engine", "engine, chunking off"}
    assert all(r["median_ms"] > 0 for r in rows.values())
