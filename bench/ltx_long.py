"""LTX-Video long videos two ways, on the same saved model: diffusers' own long-video pipeline
(``LTXI2VLongMultiPromptPipeline``, 0.42.1: temporal tiles denoised one after another, each
new tile also given the previous tile's last latent frames, fused by a cross-fade) beside the
engine's ``vinf_engine.generate`` (the whole video at once, split across ranks, halos
exchanged instead of recomputed):

    engine R ranks     vinf_engine.generate(folder, ...) on R gloo ranks (NCCL on GPUs)
    engine 1 rank      the same in one process (the partition-invariance oracle)
    diffusers tiles    LTXI2VLongMultiPromptPipeline.from_pretrained(folder, ...)(...)

    python bench/ltx_long.py                      # CPU: the LTX "cpu" transformer, 2 gloo ranks
    python bench/ltx_long.py --preset tiny --frames 65 --steps 1     # seconds (the test's)

One folder (a tiny random LTXPipeline: T5 encoder and tokenizer, LTX VAE, flow-matching
scheduler, and the transformer of bench/dit_throughput.py's LTX ``--preset``) is saved and
both load it; the same video frames, resolution, guidance (CFG as batch 2), prompt and sigma
schedule (the engine's: LTXPipeline's shifted sigmas; the peer takes them as ``sigmas``, with
its intended LTXEulerAncestralRFScheduler), latents out (no decode: the peer's default
``output_type="latent"``; the engine's ``out=None``). Text-to-video: no conditioning image.

Per row: wall seconds of the call (after an untimed 2-step warm-up call of the same
method), seconds inside the transformer, peak memory (CPU: the process's peak RSS since the
warm-up; GPU: max_memory_allocated), transformer calls, and the latent frames given to the
transformer, counted by a forward pre-hook (packed tokens / (h*w) per call, the CFG batch
once): per denoising step for the whole video (the peer: every tile of one step) against the
video's frames, the difference being the frames recomputed. The peer's figure is checked
against the one its tile arguments predict (``split_into_temporal_windows`` plus the
previous tile's tail, ``overlap`` latent frames, given to every tile after the first). The
engine recomputes no frame: each rank passes its own clip; what it receives instead (halo and
global frames' attention inputs, one per frame per attention layer, whose keys and values it
projects) is given in bytes and in frames per layer per call. Rows are printed and written
to JSON as measured. Weights are random (never downloaded); the two methods make different
videos (different algorithms): only the engine's R-rank vs 1-rank outputs are compared.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
sys.path.insert(1, os.path.join(os.path.dirname(BENCH), "tests"))   # the tiny LTX pipeline
import harness  # noqa: E402
from dit_throughput import FAMILIES, build  # noqa: E402
from harness import fmt, peak_memory_mib, rel_diff  # noqa: E402

PROMPT = "a red car on a river in the city"
METHODS = ("engine", "engine1", "peer")
LABELS = {"engine": "engine {R} ranks", "engine1": "engine 1 rank",
          "peer": "diffusers LTXI2VLongMultiPrompt"}
SPATIAL, TEMPORAL = 32, 8        # the LTX VAE's compression (the tiny one's too)


# ------------------------------------------------------------------------------ the model
def save_model(folder: str, preset: str, seed: int = 0) -> str:
    """A tiny random LTXPipeline with bench/dit_throughput.py's LTX ``preset`` transformer,
    saved under ``folder``; its path."""
    from ltx_helpers import tiny_ltx_pipeline
    pipe = tiny_ltx_pipeline(seed)
    pipe.transformer = build(FAMILIES["ltx"], preset, torch.device("cpu"), torch.float32)
    pipe.register_modules(transformer=pipe.transformer)
    path = os.path.join(folder, "model")
    pipe.save_pretrained(path)
    return path


def latent_frames(video_frames: int) -> int:
    return (video_frames - 1) // TEMPORAL + 1


def peer_windows(video_frames: int, tile: int, overlap: int) -> dict:
    """What the peer's tile arguments say it gives the transformer per denoising step: its
    windows (latent frames), and each window after the first also gets the previous one's last
    ``overlap`` latent frames (``inject_prev_tail_latents``; no image: no negative-index
    frame)."""
    from diffusers.pipelines.ltx.pipeline_ltx_i2v_long_multi_prompt import (
        split_into_temporal_windows)
    F = latent_frames(video_frames)
    t, o = max(1, tile // TEMPORAL), max(0, overlap // TEMPORAL)
    wins = split_into_temporal_windows(F, t, o, TEMPORAL)
    per_window = [(b - a) + (min(o, F) if i and o else 0) for i, (a, b) in enumerate(wins)]
    return dict(tile_latent=t, overlap_latent=o, windows=[list(w) for w in wins],
                frames_per_window=per_window, frames_per_step=sum(per_window))


class FrameCounter:
    """Calls of a transformer, the latent frames each is given (packed tokens (B, S, C): S /
    (h*w) per sample) and the seconds spent inside it: a forward pre- and post-hook."""

    def __init__(self, model, tokens_per_frame: int):
        self.tpf = tokens_per_frame
        self.reset()
        self._hooks = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                       model.register_forward_hook(self._post, with_kwargs=True)]

    def reset(self):
        self.calls, self.frames, self.seconds, self.sizes = 0, 0, 0.0, Counter()

    def _pre(self, module, args, kwargs):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        n = x.shape[1] // self.tpf
        self.calls += 1
        self.frames += n
        self.sizes[n] += 1
        self._t0 = time.perf_counter()

    def _post(self, module, args, kwargs, out):
        self.seconds += time.perf_counter() - self._t0

    def remove(self):
        for h in self._hooks:
            h.remove()


# ------------------------------------------------------------------------------ measure
def _engine(pipe, opts, n_frames, steps, rank, world):
    import vinf_engine as vinf
    rep = vinf.generate(pipe, PROMPT, num_frames=n_frames, steps=steps, out=None,
                        progress=False, guidance_scale=opts["guidance"], seed=opts["seed"],
                        height=opts["height"], width=opts["width"], config=opts["config"])
    mine = rep["per_rank"][rank]
    return rep["latents"], dict(denoise_s=rep["timings_s"].get("denoise"),
                                bytes_received=mine["comm"]["bytes_received"],
                                bytes_sent=mine["comm"]["bytes_sent"],
                                config=rep["config"])


def _sigmas(folder, opts, steps):
    """The engine's sigma schedule for this video (LTXPipeline's shifted sigmas, its final 0)."""
    from types import SimpleNamespace
    from diffusers import FlowMatchEulerDiscreteScheduler
    from vinf_engine.pipelines.base import VideoPlan
    from vinf_engine.pipelines.ltx import LTXPipelines
    F = latent_frames(opts["frames"])
    h, w = opts["height"] // SPATIAL, opts["width"] // SPATIAL
    plan = VideoPlan(frames=opts["frames"], latent_frames=F, shape=(1, 8, F, h, w),
                     height=opts["height"], width=opts["width"], scene_starts=(0,),
                     temporal=TEMPORAL)
    stock = SimpleNamespace(scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(
        folder, subfolder="scheduler"))
    sched = LTXPipelines().make_scheduler(stock, None, plan)
    sched.set_timesteps(steps)
    return [float(s) for s in sched.sigmas]


def _peer(pipe, opts, n_frames, sigmas):
    out = pipe(prompt=PROMPT, negative_prompt="", height=opts["height"], width=opts["width"],
               num_frames=n_frames, guidance_scale=opts["guidance"], sigmas=sigmas,
               seed=opts["seed"], temporal_tile_size=opts["tile"],
               temporal_overlap=opts["overlap"], output_type="latent")
    return out.frames, {}


def worker(rank, world, opts):
    """One method (``opts["method"]``) on ``world`` ranks: an untimed warm-up call (2 steps,
    the shortest video the ranks can split), then the timed call. Returns this rank's record
    and latents."""
    from diffusers.utils import logging as dlogging
    dlogging.set_verbosity_error()
    dlogging.disable_progress_bar()
    from transformers.utils import logging as tlogging
    tlogging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*trained range.*")
    import vinf_engine as vinf
    device = torch.device(f"cuda:{rank}" if opts["device"] == "cuda" else "cpu")
    method, folder = opts["method"], opts["folder"]
    tpf = (opts["height"] // SPATIAL) * (opts["width"] // SPATIAL)
    if method == "peer":
        from diffusers import LTXEulerAncestralRFScheduler, LTXI2VLongMultiPromptPipeline
        pipe = LTXI2VLongMultiPromptPipeline.from_pretrained(
            folder, scheduler=LTXEulerAncestralRFScheduler()).to(device)
        pipe.set_progress_bar_config(disable=True)
        sigmas = _sigmas(folder, opts, opts["steps"])

        def run(n, steps):
            return _peer(pipe, opts, n, sigmas if steps == opts["steps"] else [1.0, 0.5, 0.0])
    else:
        pipe = vinf.load_pipeline(folder, device=device)

        def run(n, steps):
            return _engine(pipe, opts, n, steps, rank, world)
    counter = FrameCounter(pipe.transformer, tpf)
    with torch.no_grad():
        run(TEMPORAL * world + 1, 2)                             # warm-up, not timed
        harness.sync(device, world)
        counter.reset()
        peak_reset = harness.reset_peak_memory(device)
        t0 = time.perf_counter()
        latents, extra = run(opts["frames"], opts["steps"])
        harness.sync(device, world)
        seconds = time.perf_counter() - t0
    rec = dict(seconds=seconds, peak_mib=peak_memory_mib(device), peak_reset=peak_reset,
               calls=counter.calls, frames_passed=counter.frames,
               frames_per_call=dict(sorted(counter.sizes.items())),
               transformer_s=counter.seconds, **extra)
    counter.remove()
    return rec, latents.float().cpu()


def _row(method, world, recs, opts) -> dict:
    """One table row from every rank's record."""
    F, steps = latent_frames(opts["frames"]), opts["steps"]
    r0 = recs[0]
    row = dict(name=LABELS[method].format(R=world), method=method, ranks=world,
               video_frames=opts["frames"], latent_frames=F, steps=steps,
               seconds=max(r["seconds"] for r in recs),
               transformer_s=max(r["transformer_s"] for r in recs),
               peak_mib_per_rank=[round(r["peak_mib"], 1) for r in recs],
               peak_is_since_warmup=all(r["peak_reset"] for r in recs),
               transformer_calls_per_rank=[r["calls"] for r in recs],
               frames_per_call_per_rank=[r["frames_per_call"] for r in recs])
    # per denoising step, over the whole video: every rank's (engine) or every tile's (peer)
    per_step = sum(r["frames_passed"] for r in recs) / steps
    row.update(frames_passed_per_step=per_step, frames_recomputed_per_step=per_step - F,
               recomputed_fraction=(per_step - F) / F)
    if method == "peer":
        pred = peer_windows(opts["frames"], opts["tile"], opts["overlap"])
        row.update(peer_tiles=pred, predicted_frames_per_step=pred["frames_per_step"],
                   temporal_tile_size=opts["tile"], temporal_overlap=opts["overlap"])
    else:
        row["denoise_s"] = max(r["denoise_s"] for r in recs)
        row["engine_config"] = r0["config"]
        row["mib_received_per_rank"] = [r["bytes_received"] / 2**20 for r in recs]
        row["mib_sent_per_rank"] = [r["bytes_sent"] / 2**20 for r in recs]
        # one received frame of one layer's attention input: CFG batch x tokens x width x fp32
        tr = opts["transformer"]
        width = tr["num_attention_heads"] * tr["attention_head_dim"]
        batch = 2 if opts["guidance"] > 1 else 1
        frame_bytes = batch * (opts["height"] // SPATIAL) * (opts["width"] // SPATIAL) * width * 4
        row["frames_received_per_layer_per_call"] = [
            r["bytes_received"] / frame_bytes / tr["num_layers"] / max(1, r["calls"])
            for r in recs]
    return row


# ------------------------------------------------------------------------------ report
COLUMNS = [("run", 32), ("wall s", 8), ("model s", 8), ("peak MiB", 9), ("calls", 6),
           ("frames/step", 12), ("video", 6), ("recomputed", 11), ("recv frames", 12)]


def _cells(r) -> list:
    if "error" in r:
        last = [l for l in r["error"].splitlines() if l.strip()]
        return [r["name"], (last[-1] if last else "failed")[:100]]
    recv = r.get("frames_received_per_layer_per_call")
    return [r["name"], f"{r['seconds']:.2f}", f"{r['transformer_s']:.2f}",
            f"{max(r['peak_mib_per_rank']):.0f}", str(max(r["transformer_calls_per_rank"])),
            f"{r['frames_passed_per_step']:.0f}", str(r["latent_frames"]),
            f"{r['frames_recomputed_per_step']:.0f} ({100 * r['recomputed_fraction']:.0f}%)",
            fmt(max(recv) if recv else None, ".1f")]


def print_row(r):
    if "error" in r:
        print(f"  {r['name']}: {r['error']}", flush=True)
        return
    print(f"  {r['name']}: {r['seconds']:.2f} s ({r['transformer_s']:.2f} in the transformer), "
          f"peak {max(r['peak_mib_per_rank']):.0f} MiB/rank, "
          f"{max(r['transformer_calls_per_rank'])} calls/rank, "
          f"{r['frames_passed_per_step']:.0f} latent frames given per step for a "
          f"{r['latent_frames']}-frame video", flush=True)


def parser():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--preset", choices=("tiny", "cpu"), default="cpu",
                    help="the LTX transformer of bench/dit_throughput.py (8 latent channels, "
                         "16-wide captions: the tiny VAE and T5 take it)")
    ap.add_argument("--frames", type=int, default=321,
                    help="video frames, 8k+1 (default 321: 41 latent frames, about 2x LTX's "
                         "trained 21)")
    ap.add_argument("--steps", type=int, default=4, help="denoising steps (both methods)")
    ap.add_argument("--hw", default=None,
                    help="video HxW in pixels, multiples of 32 (default: the preset's latent "
                         "x 32: tiny 64x64, cpu 256x256)")
    ap.add_argument("--tile", type=int, default=80,
                    help="the peer's temporal_tile_size, video frames (its default 80)")
    ap.add_argument("--overlap", type=int, default=24,
                    help="the peer's temporal_overlap, video frames (its default 24)")
    ap.add_argument("--guidance", type=float, default=3.0, help="CFG scale (LTXPipeline's 3)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--window", type=int, default=None,
                    help="engine: local window (default: LTX's, 8)")
    ap.add_argument("--num-global", type=int, default=None,
                    help="engine: global frames (default: LTX's, 8)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=1, help="CPU: torch threads per rank")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-dir", default=None,
                    help="where to save the model folder (default: a temporary one, removed)")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--out", default=None,
                    help="JSON path (default bench/out/ltx-long-<device>.json)")
    return ap


def _args(argv):
    """The parsed arguments, the video's size and the methods to run; bad input refused."""
    ap = parser()
    a = ap.parse_args(argv)
    if a.steps < 2:
        ap.error("--steps must be >= 2 (LTX's schedule: the engine refuses one step)")
    if a.frames < 1 or (a.frames - 1) % TEMPORAL:
        ap.error(f"--frames must be 8k+1, got {a.frames}")
    if latent_frames(a.frames) < a.ranks:
        ap.error(f"--frames {a.frames}: fewer latent frames than --ranks {a.ranks}")
    preset = FAMILIES["ltx"].presets[a.preset]
    if a.hw:
        try:
            H, W = harness.parse_hw(a.hw)
            assert H % SPATIAL == 0 and W % SPATIAL == 0
        except (ValueError, AssertionError):
            ap.error(f"--hw must be HxW in multiples of 32, got {a.hw!r}")
    else:
        H, W = (n * SPATIAL for n in preset["latent_hw"])
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    if set(methods) - set(METHODS):
        ap.error(f"--methods: choose from {METHODS}")
    if a.ranks == 1:
        methods = [m for m in methods if m != "engine"]
    return a, H, W, methods


NOTES = dict(
    frames_passed_per_step=("latent frames given to the transformer per denoising step, "
                            "over the whole video (engine: every rank's clip; peer: every "
                            "tile, with the previous tile's tail); recomputed: that minus "
                            "the video's latent frames"),
    frames_received_per_layer_per_call=(
        "engine: bytes received / (CFG batch x tokens per frame x width x 4 bytes) / layers "
        "/ calls: the halo and global frames' attention inputs it projects keys and "
        "values from, instead of running the blocks over them"),
    wall=("the whole call after a 2-step warm-up: text encoding (the peer: once per tile), "
          "denoising, the peer's fusion; no decode"))


def _run_methods(a, methods, opts, rows) -> tuple[dict, bool]:
    """Each method on its ranks, a row printed and saved as soon as it is measured."""
    latents, failed = {}, False
    backend = "nccl" if a.device == "cuda" else "gloo"
    for m in methods:
        world = a.ranks if m == "engine" else 1
        threads = None if a.device == "cuda" else a.threads
        res, error = harness.spawn(worker, world, dict(opts, method=m),
                                   label=f"{m} on {world} rank(s)", backend=backend,
                                   threads=threads, timeout=a.timeout)
        if error is not None:
            failed = True
            row = dict(name=LABELS[m].format(R=world), method=m, ranks=world, error=error)
        else:
            row = _row(m, world, [r[0] for r in res], opts)
            latents[m] = torch.cat([r[1] for r in res], dim=2) if m != "peer" else res[0][1]
        rows.add(row)
        print_row(row)
    return latents, failed


def _summary(a, rows, inv) -> None:
    print()
    harness.print_table(COLUMNS, [_cells(r) for r in rows.rows])
    if inv is not None:
        print(f"\npartition invariance: max |out(R={a.ranks}) - out(R=1)| / max |out(R=1)| = "
              f"{inv:.2e}")
    peer = next((r for r in rows.rows if r["method"] == "peer" and "error" not in r), None)
    if peer is not None:
        t = peer["peer_tiles"]
        print(f"peer: {len(t['windows'])} tiles {t['windows']} (tile {t['tile_latent']}, overlap "
              f"{t['overlap_latent']} latent frames) + each later tile's {t['overlap_latent']}"
              f"-frame tail: predicted {t['frames_per_step']} frames per step, counted "
              f"{peer['frames_passed_per_step']:.0f}")
    print("model s: seconds inside the transformer's forward; frames/step: latent frames given "
          "to the transformer per step (all ranks / all tiles); recv frames: the engine's "
          "received attention-input frames per layer per call (largest rank)")


def main(argv=None):
    a, H, W, methods = _args(argv)
    out = a.out or harness.out_path(f"ltx-long-{a.device}.json")
    tmp = None if a.model_dir else tempfile.mkdtemp(prefix="ltx-long-")
    folder = save_model(a.model_dir or tmp, a.preset, a.seed)
    import diffusers
    tr = FAMILIES["ltx"].kwargs(a.preset)
    opts = dict(device=a.device, folder=folder, frames=a.frames, steps=a.steps, height=H,
                width=W, tile=a.tile, overlap=a.overlap, guidance=a.guidance, seed=a.seed,
                transformer=tr, config={k: v for k, v in (("window", a.window),
                                                          ("num_global", a.num_global))
                                        if v is not None} or None)
    rows = harness.Rows(out, dict(
        benchmark="ltx-long", **harness.environment(a.device, cpu_model=True),
        diffusers=diffusers.__version__, preset=a.preset, transformer=tr, video_frames=a.frames,
        latent_frames=latent_frames(a.frames), height=H, width=W, steps=a.steps,
        guidance=a.guidance, ranks=a.ranks, methods=methods, cpu_threads_per_rank=a.threads,
        peer=dict(pipeline="LTXI2VLongMultiPromptPipeline",
                  scheduler="LTXEulerAncestralRFScheduler (the engine's sigmas)",
                  **peer_windows(a.frames, a.tile, a.overlap)),
        rows=[]))
    print(f"LTX long video: {a.preset} LTX transformer ({tr['num_layers']} layers, "
          f"{tr['num_attention_heads']} x {tr['attention_head_dim']} heads), {a.frames} video "
          f"frames = {latent_frames(a.frames)} latent of {H // SPATIAL}x{W // SPATIAL} at "
          f"{H}x{W}, {a.steps} steps, CFG {a.guidance}, {a.device}; the peer's tiles: "
          f"{a.tile} frames, overlap {a.overlap}", flush=True)
    latents, failed = _run_methods(a, methods, opts, rows)
    inv = None
    if "engine" in latents and "engine1" in latents:
        inv = rel_diff(latents["engine"], latents["engine1"])
        rows.report["max_rel_diff_R_ranks_vs_1_rank"] = inv
        next(r for r in rows.rows if r["method"] == "engine")["max_rel_diff_vs_1_rank"] = inv
    rows.report["notes"] = dict(NOTES, peak_memory=(
        "GPU max_memory_allocated since the warm-up" if a.device == "cuda" else
        "peak RSS of the rank's process since the warm-up (/proc/self/clear_refs)"))
    rows.save()
    _summary(a, rows, inv)
    print(f"wrote {out}")
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
