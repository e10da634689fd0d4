"""The scaling projection's arithmetic, on a synthetic run report."""
import importlib.util
import os

import pytest

# Loaded by path: putting bench/ on sys.path would let `import kernels` (which transformers
# probes for) resolve to bench/kernels.py.
_spec = importlib.util.spec_from_file_location(
    "vinf_bench_projection", os.path.join(os.path.dirname(__file__), "..", "bench", "projection.py"))
projection = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(projection)


def report(window_ms):
    # One attention exchange of 10 remote frames, one halo exchange of 4, one all-reduce,
    # measured at latent 40x64 in bf16, so no rescaling of bytes.
    log = [dict(kind="attention context exchange", frames=10, bytes_received=10 * 2**20, window_ms=window_ms),
           dict(kind="temporal halo exchange", frames=4, bytes_received=4 * 2**20, window_ms=0.0),
           dict(kind="GroupNorm statistics all-reduce", frames=0, bytes_received=1024, window_ms=0.0)]
    rows = [dict(mode="overlap", ranks=2, seconds=1.0, exchanges_last_step=log),
            dict(mode="loopback", ranks=2, seconds=1.0)]
    return dict(rows=rows, config=dict(window=8, num_global=16), latent_hw=[40, 64],
                dtype="bfloat16", steps=1)


def test_exposed_time_follows_bytes_and_windows():
    lk = projection.LINKS["nvlink"]
    p = projection.project(report(0.0), 8, "H200", "nvlink", 64)
    assert p["byte_scale"] == 1.0 and p["compute_ms"] == pytest.approx(6.95 * 64)
    over = p["modes"]["overlap"]
    # Busiest rank: 8 + 8 halo frames and the 16 - 2 non-owned global frames, minus overlap.
    att_frames = 8 + 8 + 14
    att_ms = lk["latency_us"] / 1e3 + att_frames * 2**20 / (lk["gbps"] * 1e6)
    halo_ms = lk["latency_us"] / 1e3 + 8 * 2**20 / (lk["gbps"] * 1e6)
    ar_ms = projection.ALLREDUCE_LATENCY_US / 1e3 + 1024 / (lk["gbps"] * 1e6)
    assert over["exposed_ms"] == pytest.approx(att_ms + halo_ms + ar_ms, rel=1e-9)
    assert p["modes"]["blocking"]["exposed_ms"] > over["exposed_ms"]
    assert p["modes"]["stale"]["exposed_ms"] == 0.0
    # A compute window longer than the exchange hides it completely.
    hidden = projection.project(report(1e3), 8, "H200", "nvlink", 64)["modes"]["overlap"]
    assert hidden["exposed_ms"] == pytest.approx(halo_ms + ar_ms, rel=1e-9)
    single = projection.project(report(0.0), 1, "H200", "nvlink", 64)["modes"]["overlap"]
    assert single["efficiency"] == 1.0


@pytest.mark.parametrize("spec", ["8xA100", "eight", "8xH200:carrier-pigeon", "0xH200"])
def test_bad_targets(spec):
    with pytest.raises(ValueError, match="--project"):
        projection.parse_target(spec)


def test_plot_writes_a_png(tmp_path):
    points = projection.sweep(report(0.5), "H200", 32, counts=(1, 2, 4))
    path = tmp_path / "s.png"
    projection.plot(points, (4, "H200", "nvlink"), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_statistics_riding_in_a_halo_cost_the_published_pattern_an_all_reduce():
    base = report(0.0)
    fused = report(0.0)
    log = fused["rows"][0]["exchanges_last_step"]
    # The halo carries the all-reduce's 1 KiB: one entry instead of two, same bytes in all.
    log[1] = dict(log[1], kind="temporal halo exchange with GroupNorm statistics",
                  bytes_received=log[1]["bytes_received"] + 1024, sums_bytes=1024)
    del log[2]
    a = projection.project(base, 8, "H200", "nvlink", 64)["modes"]
    b = projection.project(fused, 8, "H200", "nvlink", 64)["modes"]
    assert b["overlap"]["launches_per_step"] == a["overlap"]["launches_per_step"] - 1
    assert b["blocking"]["launches_per_step"] == a["blocking"]["launches_per_step"]
    assert b["blocking"]["exposed_ms"] == pytest.approx(a["blocking"]["exposed_ms"], rel=1e-9)
    # Overlap saves the all-reduce's latency; the halo's frames are priced without the sums.
    saved = projection.ALLREDUCE_LATENCY_US / 1e3 + 1024 / (projection.LINKS["nvlink"]["gbps"] * 1e6)
    assert b["overlap"]["exposed_ms"] == pytest.approx(a["overlap"]["exposed_ms"] - saved, rel=1e-9)


def _memory_bench():
    import sys
    bench = os.path.join(os.path.dirname(__file__), "..", "bench")
    before = list(sys.path)
    spec = importlib.util.spec_from_file_location("vinf_bench_memory", os.path.join(bench, "memory.py"))
    memory = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(memory)
    finally:
        sys.path[:] = before                # memory.py puts bench/ first: take it back out
    return memory


def test_memory_bench_says_where_the_peak_rose():
    # A 64 MiB temporary inside the second layer: the peak rises after it, not after the
    # others (each holds a few KiB), and what is held after it is far below the peak.
    import torch

    class Big(torch.nn.Module):
        def forward(self, x):
            return x + torch.ones(16 * 2 ** 20).sum()       # 64 MiB, freed on return
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), Big(), torch.nn.Linear(8, 8))
    memory = _memory_bench()
    r = memory._peak(torch.device("cpu"), lambda: model(torch.ones(4, 8)), model)
    assert r["peak_bytes"] >= 60 * 2 ** 20
    big = [w for w in r["where"] if w["peak_mib"] >= 60]
    assert big and big[0]["module"] == "1" and big[0]["held_mib"] < 30, r["where"]
    assert not model._forward_hooks and not model[1]._forward_hooks     # hooks removed


def test_memory_projection_fits_fixed_and_per_pixel_bytes(tmp_path):
    import json
    memory = _memory_bench()
    fixed, per_pixel = 1.5, 0.02            # MiB per frame, MiB per frame and latent pixel
    paths = []
    for hw in (8, 16):
        p = tmp_path / f"m{hw}.json"
        p.write_text(json.dumps(dict(device="cpu", latent_hw=[hw, hw], mib_per_frame=dict(
            engine=fixed + per_pixel * hw * hw, diffusers=4 * (fixed + per_pixel * hw * hw)))))
        paths.append(str(p))
    out = memory.combine(paths)
    e = out["per_method"]["engine"]
    assert e["fixed_mib_per_frame"] == pytest.approx(fixed)
    assert e["mib_per_frame_per_latent_pixel"] == pytest.approx(per_pixel)
    want = (fixed + per_pixel * 40 * 64) / 2 / 1024          # fp32 on CPU halved, in GiB
    assert e["gib_per_frame_320x512_bf16"] == pytest.approx(want)
    assert out["engine_vs_diffusers_at_320x512"] == pytest.approx(0.25)
    with pytest.raises(SystemExit, match="two or more latent"):
        memory.combine(paths[:1])


def test_memory_bench_measures_each_rank_on_its_clip(tmp_path):
    # --ranks 2: the engine on 2 gloo ranks, each on half the frames; the figure is the
    # larger rank's peak. diffusers has no several-rank mode: refused before any run.
    import json
    memory = _memory_bench()
    out = tmp_path / "m.json"
    with pytest.raises(SystemExit):
        memory.main(["--ranks", "2", "--methods", "engine,diffusers", "--out", str(out)])
    with pytest.raises(SystemExit):
        memory.main(["--ranks", "2", "--frames", "4,6,7", "--methods", "engine", "--out", str(out)])
    assert not out.exists()
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(__file__), "..", "bench", "memory.py")
    subprocess.run([sys.executable, script, "--ranks", "2", "--frames", "4,6,8", "--latent",
                    "8x8", "--config", "paper", "--methods", "engine", "--out", str(out)],
                   check=True, timeout=600)
    report = json.loads(out.read_text())
    assert report["ranks"] == 2 and report["config"] == "paper"
    assert [r["frames"] for r in report["rows"]] == [4, 6, 8]
    assert all("error" not in r and r["peak_mib"] > 0 for r in report["rows"]), report["rows"]
