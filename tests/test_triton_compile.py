"""Every kernel compiles for sm_90 (H100/H200) as its launcher would launch it at the SPEC
shapes, without spilling registers, on a machine with no GPU: the interpreter runs the
kernels' arithmetic but never the GPU compiler, which rejects things the interpreter allows."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernels_compile_for_sm90_without_spills():
    import triton
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this triton build has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, "-m", "vinf_engine.kernels.compile_check", "--arch",
                          "90", "--dtype", "bf16", "--json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert run.returncode == 0 and rows, run.stdout[-3000:] + run.stderr[-3000:]
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"_temporal_attn_fwd", "_dit_attn_fwd", "_gn_stats_fwd", "_gn_merge_fwd",
                       "_gn_apply_fwd"}
    spilled = [r for r in rows if r["stack_bytes"] > 0]
    assert not spilled, spilled
