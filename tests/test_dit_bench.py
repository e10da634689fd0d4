"""The DiT throughput bench (bench/dit_throughput.py) and the LTX long-video peer bench
(bench/ltx_long.py) at their tiniest shapes on the CPU: rows for every method, the engine's
2-rank output equal to its 1-rank output, and the peer's recomputed frames as its tile
arguments predict. Run in this process (the ranks are spawned): one interpreter start less;
each spawned process costs seconds of imports, so the runs have as few as the checks need."""
import json
import os
import sys

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)


def test_dit_bench_rows_and_partition_invariance(tmp_path):
    """LTX-Video: diffusers has a _cp_plan for it, so every row runs, Ulysses included (the
    bench's other families run the same code; a family without one gets a skipped row)."""
    import dit_throughput
    out = tmp_path / "dit.json"
    # 5 frames, window 1, one global frame: halos and the global frame cross ranks
    rc = dit_throughput.main(["--family", "ltx", "--preset", "tiny", "--frames", "5",
                              "--steps", "1", "--window", "1", "--num-global", "1",
                              "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    rows = {r["method"]: r for r in report["rows"]}
    for m in ("engine", "engine1", "dense", "ulysses"):
        assert "error" not in rows[m] and rows[m]["seconds_per_step"] > 0, rows[m]
    assert "skipped" in rows["ring"]
    assert max(rows["engine"]["mib_received_per_rank_per_step"]) > 0
    assert report["max_rel_diff_R_ranks_vs_1_rank"] <= 1e-5
    assert rows["ulysses"]["max_rel_diff_vs_dense"] <= 1e-5


def test_ltx_long_peer_bench_counts_recomputed_frames(tmp_path):
    import ltx_long
    out = tmp_path / "ltx_long.json"
    # 33 video frames = 5 latent; the peer's tiles of 3 latent frames overlapping by 1:
    # [0, 3) and [2, 5), the second also given the first's last frame: 7 frames per step.
    # No 1-rank engine row (a spawn less; the test above checks invariance).
    rc = ltx_long.main(["--preset", "tiny", "--frames", "33", "--steps", "2", "--tile", "24",
                        "--overlap", "8", "--window", "1", "--num-global", "1",
                        "--methods", "engine,peer", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"engine", "peer"}
    peer, eng = rows["peer"], rows["engine"]
    assert peer["frames_passed_per_step"] == peer["predicted_frames_per_step"] == 7
    assert peer["frames_recomputed_per_step"] == 2
    assert eng["frames_recomputed_per_step"] == 0 and eng["frames_passed_per_step"] == 5
    assert eng["transformer_calls_per_rank"] == [2, 2] and peer["transformer_calls_per_rank"] == [4]
    assert all(r["seconds"] > 0 and max(r["peak_mib_per_rank"]) > 0 for r in rows.values())
    assert max(eng["frames_received_per_layer_per_call"]) > 0
