"""bench/throughput.py --model wan runs end to end at a tiny size (the tiny preset: one layer,
3 / 6 / 12 latent frames): every method's rows are written, the engine's 2-rank output equals
its 1-rank output, Ulysses' equals dense attention's, and ring says why it does not run."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run; GPUs run it by hand")
def test_wan_benchmark_smoke(tmp_path):
    out = tmp_path / "wan.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "throughput.py"),
                          "--model", "wan", "--preset", "tiny", "--frames", "3,6,12",
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.load(open(out))
    rows = {(r["method"], r["frames"]): r for r in report["rows"]}
    for method in ("engine", "engine1", "dense", "ulysses"):
        for frames in (3, 6, 12):
            r = rows[(method, frames)]
            assert "error" not in r, r
            assert r["seconds_per_step"] > 0 and r["peak_mib_per_rank"], r
            assert len(r["peak_mib_per_rank"]) == (1 if method in ("engine1", "dense") else 2)
    for frames in (3, 6, 12):
        assert rows[("engine", frames)]["max_rel_diff_vs_1_rank"] <= 1e-5
        assert rows[("ulysses", frames)]["max_rel_diff_vs_dense"] <= 1e-5
        assert "per_frame_vs_dense" in rows[("engine", frames)]
    # Both distributed methods move bytes, counted per rank.
    assert all(b > 0 for b in rows[("ulysses", 12)]["mib_sent_per_rank_per_step"])
    assert all(b > 0 for b in rows[("engine", 12)]["mib_received_per_rank_per_step"])
    assert "LSE" in rows[("ring", None)]["skipped"]
    assert report["max_rel_diff_R_ranks_vs_1_rank"] <= 1e-5
