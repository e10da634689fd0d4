"""Quality you can measure: long videos of the two trained models, every mode side by side.

    python bench/quality.py            # both models, 1x 4x 8x the trained length (16 frames)
    python bench/quality.py --lengths 1,4,8,16   # and 16x: the run in bench/RESULTS.md
    python bench/quality.py --quick    # smoke: 1x and 2x, 2 steps, a few modes

For each model (``bench/quality_models/{unet3d,wan}``, trained by ``bench/quality_train.py``)
and each length, the same prompt and seed go through every mode, and each video is scored by
``quality_lib.video_figures`` (seam jump at the boundaries of 2, 4, 8 ranks and every trained
length; objects present as the prompt says; the motion rule's error inside clips and at seams;
speed against the data's). Beside them, on the same figures: the procedural data itself at
that length (the rule), and once per model the training set, its VAE round trip and the
model's own trained-length samples (the ceiling).

Modes. ``independent``: clips of the trained length, each denoised alone by the stock diffusers
pipeline (no engine, no communication) from the same global-frame noise, concatenated: what a
naive split gives, cut every 16 frames. ``default``: ``vinf.generate`` with the family's default
config. A sweep of window / global frames / phase. ``exact``: full attention over the whole video
(window >= frames - 1, no global frames, no phase bias: the unmodified model out of its trained
length). ``stale``: ``comm_mode="stale"`` on 2 real gloo processes (``run_local``). Wan: the
global positions ``clamp`` (default) and ``true``. All modes but ``stale`` and ``independent``
run on one process: the engine's output does not depend on the number of ranks, so the seams of
2, 4 and 8 ranks are measured at ``ClipLayout(frames, ranks)``'s boundaries of one video.

Writes ``bench/out/quality/quality.json``, a contact sheet PNG per model and mode (frames around
each seam of 8 ranks at the longest length, the seam marked red) and an animated GIF per model
and mode, and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality_lib as q  # noqa: E402
import quality_models as qm  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "quality")
RANKS = (2, 4, 8)
FIGS = ("seam_2", "seam_4", "seam_8", "seam_16f", "objects_ok", "obj_seam_ok", "rule_err",
        "rule_err_seam", "motion")
PROMPTS = (("red square and blue disc", 1), ("green triangle and yellow disc", 2))
GUIDANCE = {"unet3d": 6.0, "wan": 3.0}
CACHE = "fbc:0.08"          # the step cache's mode: the threshold the README's example uses


@dataclass(frozen=True)
class Mode:
    """One way to make the long video: ``how`` is "engine" (``vinf.generate`` on one process),
    "stale" (2 gloo ranks) or "independent"; ``config`` overrides the family's default;
    ``cache``: the step cache's spec (``generate(cache=...)``), None for none."""

    name: str
    how: str
    config: dict = field(default_factory=dict)
    quick: bool = False                  # run under --quick
    sweep: bool = False                  # run at the --sweep-lengths only
    cache: str | None = None


def modes(kind: str) -> list:
    """Every mode of family ``kind``; the exact mode's window is set per length."""
    base = {} if kind == "unet3d" else {"trained_frames": q.FRAMES}
    out = [Mode("independent", "independent", quick=True),
           Mode("default", "engine", dict(base), quick=True)]
    if kind == "wan":
        out.append(Mode("default, true positions", "engine",
                        dict(base, global_positions="true"), quick=True))
        sweep = [dict(window=4), dict(num_global=0), dict(num_global=16), dict(phase_bias=0.0),
                 dict(window=15)]
    else:
        sweep = [dict(window=4), dict(num_global=0), dict(num_global=8), dict(phase_bias=0.0),
                 dict(phase_t=500.0)]
    for s in sweep:
        out.append(Mode(" ".join(f"{k}={v:g}" for k, v in s.items()), "engine", dict(base, **s),
                        sweep=True))
    out.append(Mode(f"default, cache {CACHE}", "engine", dict(base), cache=CACHE))
    out.append(Mode("exact (full attention)", "engine",
                    dict(num_global=0, phase_bias=0.0, global_positions="true"), quick=True))
    out.append(Mode("stale (2 ranks)", "stale", dict(base), quick=True))
    return out


def _config(kind: str, mode: Mode, frames: int) -> dict:
    cfg = dict(mode.config)
    if mode.name.startswith("exact"):
        cfg["window"] = frames - 1
        if kind == "wan":
            cfg["trained_frames"] = frames      # lifts the window guard; no global keys to clamp
        else:
            cfg.pop("global_positions")
    return cfg


# ==================================================================== making the videos
def engine_latents(pipe, prompt: str, frames: int, seed: int, run: dict, config: dict,
                   **kw) -> torch.Tensor:
    """``vinf.generate`` on this process: the whole video's final latents (1, C, F, h, w)."""
    import vinf_engine as vinf
    rep = vinf.generate(pipe, prompt, num_frames=frames, height=q.SIZE, width=q.SIZE,
                        steps=run["steps"], guidance_scale=run["guidance"], seed=seed,
                        config=config, out=None, progress=False, **kw)
    for c in rep.get("cache") or []:          # one per denoiser (Wan 2.2: per expert)
        print(f"  cache {kw.get('cache')}: {c['skipped']} of {c['skipped'] + c['computed']} "
              f"steps skipped, {frames} frames", file=sys.stderr, flush=True)
    return rep["latents"]


def independent_latents(pipe, prompt: str, frames: int, seed: int, run: dict) -> torch.Tensor:
    """Clips of the trained length, each denoised alone by the stock diffusers pipeline from
    the whole video's noise of its global frames, concatenated: (1, C, F, h, w)."""
    import vinf_engine as vinf
    shape = (1, qm.LATENT_CH, frames, q.SIZE // 2, q.SIZE // 2)
    clips = []
    for a in range(0, frames, q.FRAMES):
        b = min(frames, a + q.FRAMES)
        noise = vinf.initial_noise(seed, shape, range(a, b))
        with torch.no_grad():
            out = pipe(prompt, num_frames=b - a, height=q.SIZE, width=q.SIZE,
                       num_inference_steps=run["steps"], guidance_scale=run["guidance"],
                       latents=noise, output_type="latent").frames
        clips.append(torch.as_tensor(out).float())
    return torch.cat(clips, dim=2)


def decode(pipe, latents: torch.Tensor) -> np.ndarray:
    """The engine's own decode of a whole video's latents: (F, S, S, 3) uint8."""
    import vinf_engine as vinf
    from vinf_engine.pipelines import family_of
    F = latents.shape[2]
    pieces = family_of(pipe).decode(pipe, latents, vinf.ClipLayout(F, 1), 0, vinf.ClipComm(), 64)
    return np.concatenate(list(pieces))


def stale_rank(rank: int, world: int, jobs: list) -> dict:
    """On each of ``world`` gloo ranks: every job ``(kind, prompt, frames, seed, run, config)``
    through ``vinf.generate(comm_mode="stale")``; this rank's latents per job."""
    torch.set_num_threads(1)
    from diffusers.utils import logging as dlog
    from vinf_engine.pipelines import load_pipeline
    dlog.set_verbosity_error()
    pipes, out = {}, {}
    for i, (kind, prompt, frames, seed, run, config) in enumerate(jobs):
        if kind not in pipes:
            pipes[kind] = load_pipeline(run["model_dir"])
        out[i] = engine_latents(pipes[kind], prompt, frames, seed, run, config, comm_mode="stale")
    return out


def stale_all(jobs: list) -> list:
    """Every stale job's whole-video latents, from 2 real gloo processes (one run)."""
    from vinf_engine.launch import run_local
    if not jobs:
        return []
    per_rank = run_local(stale_rank, 2, jobs, timeout=1800, threads=1)
    return [torch.cat([r[i] for r in per_rank], dim=2) for i in range(len(jobs))]


# ==================================================================== figures
def seam_sets(frames: int) -> dict:
    """The boundaries scored: 2, 4 and 8 ranks' (where a clip has >= 1 frame each), and every
    trained length ("16f": where independent clips are cut)."""
    out = {str(r): q.seam_boundaries(frames, r) for r in RANKS if frames >= 2 * r}
    out["16f"] = list(range(q.FRAMES, frames, q.FRAMES))
    return out


def figures(video: np.ndarray, prompt: str) -> dict:
    return q.video_figures(video, q.colours_of(prompt), seam_sets(len(video)))


def mean_figures(rows: list) -> dict:
    """Figure by figure, the mean over samples of what is defined (NaN: nothing was)."""
    out = {}
    for k in FIGS:
        vals = [r[k] for r in rows if k in r and np.isfinite(r[k])]
        out[k] = float(np.mean(vals)) if vals else float("nan")
    return out


def reference_rows(pipe, kind: str, run: dict, n: int) -> list:
    """The training set, its VAE round trip and the model's trained-length samples, each over
    ``n`` 16-frame clips: the same figures where no seam exists (their noise floor)."""
    import quality_train as qt
    vids, labels = qt.render_clips(n, 10, q.FRAMES)            # the training set's first clips
    data = (vids.permute(0, 2, 3, 4, 1).numpy() + 1) / 2
    lat = qt.normalised_latents(kind, pipe.vae, vids)          # decode() undoes the scaling
    rows = []
    rows.append(("training set", [figures(v, t) for v, t in zip(data, labels)]))
    rows.append(("training set, VAE round trip",
                 [figures(decode(pipe, lat[i:i + 1]), labels[i]) for i in range(n)]))
    exact = next(m for m in modes(kind) if m.name.startswith("exact"))
    samples = []
    for i in range(n):                     # the model as trained: full attention, 16 frames
        prompt, seed = labels[i], 1000 + i
        samples.append(figures(decode(pipe, engine_latents(
            pipe, prompt, q.FRAMES, seed, run, _config(kind, exact, q.FRAMES))), prompt))
    rows.append(("trained-length samples", samples))
    return [(name, mean_figures(r), len(r)) for name, r in rows]


# ==================================================================== one model, every mode
def run_model(kind: str, args, stale_jobs: list) -> dict:
    """Every mode of ``kind`` at every length and sample; stale jobs are queued in
    ``stale_jobs`` (run later, together). Returns {"rows": [...], "videos": {...}, ...}."""
    from vinf_engine.pipelines import load_pipeline
    pipe = load_pipeline(qm.MODEL_DIRS[kind])
    run = dict(steps=args.steps, guidance=args.guidance or GUIDANCE[kind],
               model_dir=qm.MODEL_DIRS[kind], samples=args.samples)
    ms = [m for m in modes(kind) if m.quick or not args.quick]
    res = dict(kind=kind, run=run, rows=[], videos={}, checks={})
    t0 = time.perf_counter()
    res["reference"] = reference_rows(pipe, kind, run, args.reference)
    res["reference_s"] = round(time.perf_counter() - t0, 1)
    longest = max(args.lengths) * q.FRAMES
    for L in (k * q.FRAMES for k in args.lengths):
        for si, (prompt, seed) in enumerate(PROMPTS[:args.samples]):
            data = q.render(q.scene_for_label(prompt, seed), range(L))
            res["rows"].append(dict(length=L, mode="data (the rule)", sample=si,
                                    seconds=0.0, **figures(data, prompt)))
            if L == longest and si == 0:
                res["videos"]["data (the rule)"] = (data * 255).round().astype(np.uint8)
            lat = {}
            for m in ms:
                if m.sweep and L // q.FRAMES not in args.sweep_lengths:
                    continue
                if m.how == "stale":
                    stale_jobs.append(((kind, prompt, L, seed, run, _config(kind, m, L)),
                                       dict(kind=kind, length=L, mode=m.name, sample=si)))
                    continue
                t1 = time.perf_counter()
                lat[m.name] = (independent_latents(pipe, prompt, L, seed, run)
                               if m.how == "independent" else
                               engine_latents(pipe, prompt, L, seed, run, _config(kind, m, L),
                                              cache=m.cache))
                video = decode(pipe, lat[m.name])
                secs = round(time.perf_counter() - t1, 1)
                res["rows"].append(dict(length=L, mode=m.name, sample=si, seconds=secs,
                                        **figures(video, prompt)))
                print(f"{kind}, {L} frames, {m.name}: {secs} s", file=sys.stderr, flush=True)
                if L == longest and si == 0:
                    res["videos"][m.name] = video
            if L == q.FRAMES and "exact (full attention)" in lat:
                a, b = lat["independent"], lat["exact (full attention)"]
                res["checks"][f"sample {si}: independent vs exact at {L} frames, max rel diff"] = \
                    float((a - b).abs().max() / b.abs().max())
    res["pipe"] = pipe
    return res


def finish_stale(results: dict, jobs: list):
    """Run the queued stale jobs on 2 gloo ranks and score them into their model's rows."""
    if not jobs:
        return
    t0 = time.perf_counter()
    lats = stale_all([j for j, _ in jobs])
    # One 2-rank launch runs every job: no time per video, only their mean (printed).
    print(f"stale (2 ranks): {len(jobs)} videos in one launch, "
          f"{(time.perf_counter() - t0) / len(jobs):.1f} s per video on average", flush=True)
    longest = {k: max(r["length"] for r in res["rows"]) for k, res in results.items()}
    for (job, meta), lat in zip(jobs, lats):
        res = results[meta["kind"]]
        video = decode(res["pipe"], lat)
        prompt = job[1]
        res["rows"].append(dict(length=meta["length"], mode=meta["mode"], sample=meta["sample"],
                                seconds=None, **figures(video, prompt)))
        if meta["length"] == longest[meta["kind"]] and meta["sample"] == 0:
            res["videos"][meta["mode"]] = video


# ==================================================================== the table
def table(res: dict) -> list:
    """The model's rows, samples averaged: [(length or "16", mode, figures, n, seconds)]."""
    out = [(str(q.FRAMES), name, figs, n, None) for name, figs, n in res["reference"]]
    order = ["data (the rule)"] + [m.name for m in modes(res["kind"])]
    for L in sorted({r["length"] for r in res["rows"]}):
        for name in order:
            rows = [r for r in res["rows"] if r["length"] == L and r["mode"] == name]
            if rows:
                secs = [r["seconds"] for r in rows]
                out.append((str(L), name, mean_figures(rows), len(rows),
                            None if None in secs else round(sum(secs) / len(secs), 1)))
    return out


HEAD = ("frames", "mode", "seam@2", "seam@4", "seam@8", "seam@16f", "objects", "obj@seam",
        "rule", "rule@seam", "motion", "s/video")


def _cell(k: str, v) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    if k in ("objects_ok", "obj_seam_ok"):
        return f"{100 * v:.0f}%"
    return f"{v:.2f}"


def markdown(res: dict) -> str:
    """The model's table in Markdown."""
    run = res["run"]
    lines = [f"**{res['kind']}** ({run['steps']} steps, guidance {run['guidance']:g}, "
             f"{run.get('samples', 1)} sample(s) per row; reference rows over "
             f"{res['reference'][0][2]} clips)",
             "", "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    for L, name, figs, n, secs in table(res):
        cells = [L, name] + [_cell(k, figs.get(k)) for k in FIGS] + [_cell("s", secs)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ==================================================================== pictures
def _up(frame: np.ndarray, k: int) -> np.ndarray:
    return frame.repeat(k, 0).repeat(k, 1)


def seam_strip(video: np.ndarray, b: int, k: int = 6, before: int = 3, after: int = 3):
    """Frames ``b-before .. b+after-1`` side by side, upscaled ``k`` times, a red bar between
    frames ``b-1`` and ``b`` (the seam): (k*S, n*(k*S+2) + 4, 3) uint8."""
    S = video.shape[1] * k
    tiles = []
    for f in range(b - before, b + after):
        tile = _up(video[f], k) if 0 <= f < len(video) else np.zeros((S, S, 3), np.uint8)
        tiles.append(tile)
        gap = np.full((S, 2, 3), 255, np.uint8)
        if f == b - 1:
            gap = np.zeros((S, 6, 3), np.uint8)
            gap[..., 0] = 255
        tiles.append(gap)
    return np.concatenate(tiles, axis=1)


def _with_labels(strips: list, labels: list, width: int = 210) -> "Image":
    from PIL import Image, ImageDraw
    w = width + max(s.shape[1] for s in strips)
    h = sum(s.shape[0] + 4 for s in strips)
    img = Image.new("RGB", (w, h), "white")
    draw, y = ImageDraw.Draw(img), 0
    for s, text in zip(strips, labels):
        img.paste(Image.fromarray(s), (width, y))
        draw.text((4, y + s.shape[0] // 2 - 6), text, fill="black")
        y += s.shape[0] + 4
    return img


def contact_sheet(video: np.ndarray, seams: list, path: str, title: str):
    """Frames around each seam of ``video`` (F, S, S, 3) uint8, one row per seam."""
    strips = [seam_strip(video, b) for b in seams]
    _with_labels(strips, [f"{title}: seam at {b}" for b in seams]).save(path)


def overview(videos: dict, b: int, path: str):
    """One row per mode, the frames around seam ``b``."""
    names = list(videos)
    _with_labels([seam_strip(videos[n], b) for n in names], names).save(path)


def write_gif(video: np.ndarray, seams: list, path: str, k: int = 8, fps: float = 8.0):
    """``video`` upscaled ``k`` times as an animated GIF; the first frame after a seam gets a
    red band along its top edge."""
    from PIL import Image
    frames = []
    for f, fr in enumerate(video):
        big = _up(fr, k)
        if f in seams:
            big[:k // 2] = (255, 0, 0)
        frames.append(Image.fromarray(big))
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 / fps),
                   loop=0)


def pictures(res: dict, out_dir: str) -> list:
    """A contact sheet and a GIF per mode, one overview sheet per model; the paths."""
    paths = []
    for name, video in res["videos"].items():
        L = len(video)
        seams = q.seam_boundaries(L, max(r for r in (1,) + RANKS if L >= 2 * r))
        slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
        stem = os.path.join(out_dir, f"{res['kind']}_{L}f_{slug}")
        if seams:
            contact_sheet(video, seams, stem + ".png", name)
            paths.append(stem + ".png")
        write_gif(video, seams, stem + ".gif")
        paths.append(stem + ".gif")
    L = len(next(iter(res["videos"].values())))
    if L >= 2:
        path = os.path.join(out_dir, f"{res['kind']}_{L}f_overview.png")
        overview(res["videos"], L // 2, path)
        paths.append(path)
    return paths


# ==================================================================== main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="unet3d,wan")
    ap.add_argument("--lengths", default=None,
                    help="multiples of the trained length (default 1,4,8; --quick 1,2)")
    ap.add_argument("--sweep-lengths", default=None,
                    help="multiples at which the config sweep runs (default: the longest)")
    ap.add_argument("--samples", type=int, default=None, help="prompts (default 1)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default 20)")
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--reference", type=int, default=None,
                    help="clips of the reference rows (default 8; --quick 2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", default=OUT)
    ap.add_argument("--quick", action="store_true", help="a smoke run at tiny sizes")
    args = ap.parse_args(argv)
    qk = args.quick
    args.lengths = [int(x) for x in (args.lengths or ("1,2" if qk else "1,4,8")).split(",")]
    args.sweep_lengths = ([int(x) for x in args.sweep_lengths.split(",")] if args.sweep_lengths
                          else [max(args.lengths)])
    args.samples = args.samples or 1
    args.steps = args.steps or (2 if qk else 20)
    args.reference = args.reference or (2 if qk else 8)
    torch.set_num_threads(args.threads)
    from diffusers.utils import logging as dlog
    dlog.set_verbosity_error()
    os.makedirs(args.out_dir, exist_ok=True)
    t0 = time.perf_counter()
    results, stale_jobs = {}, []
    for kind in args.models.split(","):
        if not os.path.exists(os.path.join(qm.MODEL_DIRS[kind], "model_index.json")):
            sys.exit(f"no trained {kind} model in {qm.MODEL_DIRS[kind]}: run "
                     f"bench/quality_train.py --train vae, then --train {kind}")
        results[kind] = run_model(kind, args, stale_jobs)
    finish_stale(results, stale_jobs)
    report = dict(command=" ".join(["python", "bench/quality.py"] + (argv or sys.argv[1:])),
                  machine=f"{platform.processor() or platform.machine()}, "
                          f"{os.cpu_count()} cores, torch {torch.__version__}",
                  date=time.strftime("%Y-%m-%d"), seconds=None, models={})
    for kind, res in results.items():
        print(markdown(res) + "\n")
        for k, v in res["checks"].items():
            print(f"check, {kind}: {k}: {v:.2e}")
        paths = pictures(res, args.out_dir)
        report["models"][kind] = dict(
            run={k: v for k, v in res["run"].items() if k != "model_dir"},
            reference=[dict(mode=n, n=c, **f) for n, f, c in res["reference"]],
            rows=res["rows"], checks=res["checks"], markdown=markdown(res), pictures=paths)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    with open(os.path.join(args.out_dir, "quality.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"{report['seconds']:.0f} s; pictures and quality.json in {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
