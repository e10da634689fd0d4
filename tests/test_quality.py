"""The quality figures (bench/quality_lib.py) on constructed videos with known answers, and a
smoke run of bench/quality.py.

A video from the generator has no seam (ratio ~1), keeps its objects and obeys the motion rule;
a cut at a known frame shows there and only there; a frozen video has no motion and breaks the
rule's speed range, so it does not score as well as a moving one."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Loaded by path: putting bench/ on sys.path would let `import kernels` (which transformers
# probes for) resolve to bench/kernels.py.
_spec = importlib.util.spec_from_file_location("vinf_bench_quality_lib",
                                               os.path.join(ROOT, "bench", "quality_lib.py"))
q = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = q                    # its dataclasses look their module up
_spec.loader.exec_module(q)

PROMPT = "red square and blue disc"


def _scene(seed=3, prompt=PROMPT):
    return q.scene_for_label(prompt, seed)


def _seams(F):
    return {str(r): q.seam_boundaries(F, r) for r in (2, 4, 8)}


def test_labels_name_the_objects_and_the_scene_is_deterministic():
    sc = _scene()
    assert q.label(sc) == PROMPT and q.colours_of(PROMPT) == ("red", "blue")
    assert np.array_equal(q.render(sc, range(5, 9)), q.render(_scene(), range(10))[5:9])
    assert len(set(q.all_labels())) == len(q.all_labels()) == 174
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = q.sample_scene(rng)
        assert q.scene_for_label(q.label(s), 0).objects[0].colour == s.objects[0].colour
        speeds = [np.hypot(*o.v) for o in s.objects]
        assert all(q.SPEED[0] <= v <= q.SPEED[1] for v in speeds)


@pytest.mark.parametrize("shape", q.SHAPES)
def test_tracking_follows_the_truth_to_a_fraction_of_a_pixel(shape):
    sc = q.scene_for_label(f"green {shape}", 5)
    video = q.render(sc, range(48))
    tr = q.track(video)
    assert tr.present[:, list(q.COLOURS).index("green")].all()
    assert not tr.present[:, [0, 2, 3]].any()
    err = np.abs(tr.centroid[:, 1] - q.truth(sc, range(48))[:, 0])
    assert err.max() < 0.2          # the triangle's centroid sits 0.04 R off its drawn mass


def test_a_video_of_the_generator_has_no_seam_and_obeys_the_rule():
    sc = _scene()
    video = (q.render(sc, range(128)) * 255).round().astype(np.uint8)
    f = q.video_figures(video, q.colours_of(PROMPT), _seams(128))
    for r in (2, 4, 8):
        assert 0.6 < f[f"seam_{r}"] < 1.5, f
    assert f["objects_ok"] > 0.9 and f["judged"] > 20
    assert f["rule_err"] < 0.1
    speed = np.linalg.norm(np.diff(q.truth(sc, range(128)), axis=0), axis=-1).mean()
    assert f["motion"] == pytest.approx(speed / q.DATA_SPEED, rel=0.05)


def test_a_cut_shows_at_its_frame_and_only_there():
    sc = _scene()
    video = np.concatenate([q.render(sc, range(32)), q.render(sc, range(200, 232))])
    change = q.frame_change(video)
    assert q.seam_ratio(change, [32]) > 3
    assert 0.6 < q.seam_ratio(change, [16]) < 1.5 and 0.6 < q.seam_ratio(change, [48]) < 1.5
    cut = q.video_figures(video, q.colours_of(PROMPT), {"2": [32]})
    whole = q.video_figures(q.render(sc, range(64)), q.colours_of(PROMPT), {"2": [32]})
    assert cut["seam_2"] > 3 and whole["seam_2"] < 1.5
    # The objects jump at the cut: the rule breaks there, if they are judged there.
    if np.isfinite(cut["rule_err_seam"]):
        assert cut["rule_err_seam"] > 5 * whole["rule_err"]


def test_a_frozen_video_has_no_motion_and_does_not_score_as_good():
    sc = _scene(prompt="yellow triangle")
    moving = q.render(sc, range(64))
    pos = q.truth(sc, range(64))[:, 0]                        # a frame where the rule can judge
    t = int(np.flatnonzero(np.all((pos > q.WALL_MARGIN) & (pos < q.SIZE - q.WALL_MARGIN), 1))[0])
    frozen = np.repeat(moving[t:t + 1], 64, axis=0)
    f, g = (q.video_figures(v, ("yellow",), _seams(64)) for v in (frozen, moving))
    assert f["motion"] == 0.0 and g["motion"] > 0.5
    assert all(np.isnan(f[f"seam_{r}"]) for r in (2, 4, 8))     # no change: no seam to find
    assert f["rule_err"] >= q.SPEED[0] - 1e-6 > 5 * g["rule_err"]


def test_a_wrong_or_missing_object_is_counted():
    sc = _scene()
    video = q.render(sc, range(32))
    other = q.render(q.scene_for_label("red square and yellow disc", 3), range(32))
    mixed = np.concatenate([video[:16], other[16:]])
    f = q.video_figures(mixed, q.colours_of(PROMPT), {"2": [16]})
    assert f["objects_ok"] <= 0.5 + 1e-9 and f["obj_seam_ok"] == 0.0
    empty = np.repeat(video[:, :1, :1], 16, axis=1).repeat(16, axis=2)   # background only
    assert q.video_figures(empty, q.colours_of(PROMPT), {})["objects_ok"] == 0.0


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "bench", "quality_models", "wan",
                                                    "model_index.json")),
                    reason="no trained quality models (bench/quality_train.py)")
def test_the_quality_bench_runs_every_quick_mode(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "quality.py"), "--quick",
                        "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    report = json.loads((tmp_path / "quality.json").read_text())
    for kind in ("unet3d", "wan"):
        m = report["models"][kind]
        modes = {r["mode"] for r in m["rows"]}
        assert {"independent", "default", "exact (full attention)", "stale (2 ranks)",
                "data (the rule)"} <= modes
        # The stock diffusers pipeline on one clip equals the engine in exact config.
        assert all(v < 1e-4 for v in m["checks"].values()) and m["checks"]
        assert all(os.path.exists(x) for x in m["pictures"])
    assert "| frames | mode |" in p.stdout
