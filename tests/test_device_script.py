"""bench/device_check.sh, the one call a lent GPU gets: its CPU dry run (DEVICE=cpu, the same
steps at tiny shapes) passes every step and returns what the device tool can bring back (the
kernel and Wan benchmarks' rows checked here: their CPU smoke runs); the
budget skips what does not fit, never starting it; failures are reported, the next step still
runs; ONLY reruns chosen steps."""
import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "device_check.sh")
STEPS = ("build", "smoke", "tests", "invariance", "onegpu", "wan", "kernels")


def _run(tmp_path, **env):
    base = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VINF_BACKEND")}
    env = dict(base, **dict(dict(DEVICE="cpu", OUT=str(tmp_path), PY=sys.executable), **env))
    return subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=3000)


def test_device_script_parses():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


def test_the_step_limits_fit_the_budget():
    text = open(SCRIPT).read()
    budget = int(text.split("BUDGET=${BUDGET:-")[1].split("}")[0])
    limits = [int(line.split()[2]) for line in text.splitlines()
              if line.strip().startswith("step ") and line.split()[1] != "NAME"]
    assert sum(limits) <= budget <= 500, (limits, budget)     # room for a rerun in 15 min


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU dry run")
def test_the_cpu_dry_run_passes_every_step(tmp_path):
    r = _run(tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    summary = (tmp_path / "summary.txt").read_text()
    for name in STEPS:
        line = next(ln for ln in summary.splitlines() if ln.startswith(name))
        assert " ok " in line, line
    files = sorted(os.listdir(tmp_path))
    assert len(files) <= 8 and all(os.path.isfile(tmp_path / f) for f in files), files
    with tarfile.open(tmp_path / "logs.tgz") as t:
        assert {f"./{n}.log" for n in STEPS} <= set(t.getnames())
    assert "<testsuite" in (tmp_path / "junit.xml").read_text()
    # The kernel benchmark: every Triton kernel checked against the reference and timed.
    rows = json.load(open(tmp_path / "kernels-cpu.json"))["rows"]
    seen = {(x["op"], x["impl"]) for x in rows}
    for op in ("temporal_attn", "dit_attn", "global_attn", "group_norm"):
        assert (op, "vinf.triton") in seen and (op, "vinf.reference") in seen, op
    triton = [x for x in rows if x["impl"] == "vinf.triton"]
    assert triton and all(x["check"] == "ok" and x["ms"] > 0 for x in triton)
    assert not [x for x in rows if x.get("check") in ("FAILED", "error")]
    inv = json.load(open(tmp_path / "invariance.json"))["rows"]
    errs = [x["rel_err_2_vs_1_rank"] for x in inv if "rel_err_2_vs_1_rank" in x]
    assert len(errs) == 4 and max(errs) <= 1e-5
    # One device: every eager method at each length, the exact engine equal to diffusers.
    one = json.load(open(tmp_path / "one_gpu.json"))
    assert one["complete"]
    got = {(x["method"], x["frames"]): x for x in one["rows"]}
    for method in ("diffusers", "engine-exact", "engine"):
        for frames in (4, 8):
            x = got[(method, frames)]
            assert "error" not in x and x["ms_per_frame_step"] > 0, x
    assert all(got[("engine-exact", n)]["max_rel_diff_vs_diffusers"] <= 1e-5 for n in (4, 8))
    # The Wan benchmark: every method at each length, the engine's 2-rank output equal to
    # its 1-rank output, Ulysses' to dense attention's, ring's reason for not running.
    report = json.load(open(tmp_path / "throughput-wan.json"))
    wan = {(x["method"], x["frames"]): x for x in report["rows"]}
    for method in ("engine", "engine1", "dense", "ulysses"):
        for frames in (3, 6):
            x = wan[(method, frames)]
            assert "error" not in x and x["seconds_per_step"] > 0, x
            assert len(x["peak_mib_per_rank"]) == (1 if method in ("engine1", "dense") else 2)
    for frames in (3, 6):
        assert wan[("engine", frames)]["max_rel_diff_vs_1_rank"] <= 1e-5
        assert wan[("ulysses", frames)]["max_rel_diff_vs_dense"] <= 1e-5
        assert "per_frame_vs_dense" in wan[("engine", frames)]
    assert all(b > 0 for b in wan[("ulysses", 6)]["mib_sent_per_rank_per_step"])
    assert all(b > 0 for b in wan[("engine", 6)]["mib_received_per_rank_per_step"])
    assert "LSE" in wan[("ring", None)]["skipped"]


def test_the_budget_skips_steps_it_cannot_hold(tmp_path):
    r = _run(tmp_path, BUDGET="0")
    assert r.returncode == 0, r.stderr
    summary = (tmp_path / "summary.txt").read_text()
    assert all(f"{n}" in summary for n in STEPS) and summary.count("SKIPPED (budget)") == len(STEPS)
    assert "=== build" not in r.stdout                       # no step started


def test_failed_steps_are_reported_and_the_run_goes_on(tmp_path):
    r = _run(tmp_path, PY="false", BUDGET="120", ONLY="build,smoke,kernels")
    assert r.returncode == 1
    summary = (tmp_path / "summary.txt").read_text()
    assert summary.count("FAILED (rc 1)") == 3, summary
    assert "invariance" not in summary                       # ONLY: the other steps not run
