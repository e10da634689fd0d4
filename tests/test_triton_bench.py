"""bench/kernels.py runs end to end at its tiny CPU shapes (kernels in the Triton interpreter):
every implementation it checks agrees with the reference, and every registered backend shows."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run; GPUs run it by hand")
def test_kernel_benchmark_smoke(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VINF_BACKEND")}
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "kernels.py"), "--device",
                          "cpu", "--out", str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = json.load(open(tmp_path / "kernels-cpu.json"))["rows"]
    seen = {(r["op"], r["impl"]) for r in rows}
    for op in ("temporal_attn", "dit_attn", "group_norm"):
        assert (op, "vinf.triton") in seen and (op, "vinf.reference") in seen, op
    checked = [r for r in rows if r["impl"].startswith("vinf.triton")]
    assert checked and all(r["check"] == "ok" and r["ms"] > 0 for r in checked), checked
    assert not [r for r in rows if r.get("check") in ("FAILED", "error")]
