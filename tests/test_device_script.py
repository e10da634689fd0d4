"""bench/device_check.sh, the one call a lent GPU gets: it must parse, and keep to its time
budget (a step that does not fit is skipped and said so, never started). Its full CPU run
(DEVICE=cpu, about 90 s) is how it was tested; that is too slow for the suite."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "device_check.sh")


def test_device_script_parses():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


def test_device_script_skips_what_the_budget_cannot_hold(tmp_path):
    env = dict(os.environ, DEVICE="cpu", BUDGET="0", OUT=str(tmp_path), PY=sys.executable)
    r = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    summary = r.stdout.split("=== summary")[1]
    for name in ("build", "tests", "kernels", "throughput", "trace"):
        assert f"{name}" in summary and "SKIPPED (budget)" in summary
    assert "===" not in r.stdout.split("=== summary")[0]       # no step started


def test_device_script_reports_failed_steps_and_exits_nonzero(tmp_path):
    env = dict(os.environ, DEVICE="cpu", BUDGET="120", OUT=str(tmp_path), PY="false")
    r = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    summary = r.stdout.split("=== summary")[1]
    assert summary.count("FAILED (rc 1)") == 5, summary
    assert (tmp_path / "build.log").exists()
