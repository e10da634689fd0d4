"""One device, one process: the engine against diffusers, eager and compiled, in one run.
Milliseconds per frame-step and peak memory at each length, and each output's distance from
eager diffusers' at the same input.

    python bench/one_gpu.py --device cuda --frames 64,256 --compile
                                        # the 1.41B UNet3D at 320x512, bf16, CFG (issue 11)
    python bench/one_gpu.py             # CPU smoke: tiny UNet3D, latent 16x16, fp32

Methods, each on the same weights and inputs:

    diffusers           the stock UNet3DConditionModel
    engine-exact        vinf_engine.parallelize, exact config (the whole video in every
                        window, no global frames, no bias): the same attention as diffusers,
                        so its time is the engine's own overhead and its output diffusers'
    engine              the paper's dual-scope config (window 8, 16 global frames)
    diffusers-compiled  torch.compile(stock)            (with --compile)
    engine-compiled     torch.compile(engine)           (with --compile)

A frame-step is one frame through one denoising step: one UNet call on the CFG batch of 2
(uncond, cond). The timestep is a 0-dim tensor on the device, as diffusers' pipelines pass it
(the engine then reads nothing on the host). Each method: ``--warmup`` untimed calls (compiled:
the compile, and the engine's one recompile for its warmed caches), then ``--steps`` timed
calls at distinct timesteps; peak memory is the device's (CPU: the process's RSS) above what
was held before the timed calls. Rows are written to the JSON as they are measured, eager
lengths first, so a run cut short keeps what it finished. Weights are random.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from throughput import PRESETS, build_unet  # noqa: E402

METHODS = ("diffusers", "engine-exact", "engine", "diffusers-compiled", "engine-compiled")
EXACT = dict(num_global=0, phase_bias=0.0)        # and a window of the whole video
PAPER = dict(window=8, num_global=16)


def _prepare(model, method, frames):
    """``model`` as ``method`` runs it (parallelized or not, compiled or not)."""
    import vinf_engine as vinf
    if getattr(model, "vinf_engine", None) is not None:
        vinf.unparallelize(model)
    torch._dynamo.reset()                  # no graph or guard of an earlier method survives
    if method.startswith("engine"):
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = dict(EXACT, window=frames) if method == "engine-exact" else PAPER
            vinf.parallelize(model, vinf.DualScopeConfig(**cfg))
    return torch.compile(model) if method.endswith("compiled") else model


def measure(model, method, frames, opts, device, dtype, reference):
    """One row: ``method`` at ``frames`` frames."""
    preset = PRESETS[opts.preset]
    h, w = opts.latent
    g = torch.Generator().manual_seed(frames)
    x = torch.randn(2, 4, frames, h, w, generator=g).to(device, dtype)
    text = torch.randn(2, preset["text_len"], preset["unet"]["cross_attention_dim"],
                       generator=g).to(device, dtype)
    ts = [torch.tensor(float(999 - 997 * i / max(1, opts.steps + opts.warmup - 1)),
                       device=device) for i in range(opts.warmup + opts.steps)]
    t0 = time.perf_counter()
    run = _prepare(model, method, frames)
    with torch.no_grad():
        out = None
        for t in ts[:opts.warmup]:
            out = run(x, t, encoder_hidden_states=text).sample
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        warm_s = time.perf_counter() - t0
        with harness.Peak(device) as peak:
            t1 = time.perf_counter()
            for t in ts[opts.warmup:]:
                out = run(x, t, encoder_hidden_states=text).sample
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t1
        last = out.float()                  # the last timed call's, compared at the same t
    row = dict(method=method, frames=frames, steps=opts.steps,
               ms_per_frame_step=seconds * 1e3 / (frames * opts.steps),
               peak_gib=peak.bytes / 2 ** 30, warmup_s=warm_s)
    key = frames
    if method == "diffusers":
        reference[key] = last
    elif key in reference:
        ref = reference[key]
        row["max_rel_diff_vs_diffusers"] = harness.rel_diff(last, ref)
    if not torch.isfinite(last).all():
        row["error"] = "non-finite output"
    del out, last, x, text
    return row


@dataclasses.dataclass
class Plan:
    """The command line, resolved: defaults by device."""
    args: argparse.Namespace      # with .preset and .latent resolved (measure reads them)
    frames: list
    methods: list
    device: torch.device
    dtype: torch.dtype
    out: str


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--preset", choices=tuple(PRESETS), default=None,
                    help="default: modelscope on cuda, tiny on cpu")
    ap.add_argument("--frames", default=None, help="comma-separated lengths "
                    "(default: 64,256 on cuda, 8,16 on cpu)")
    ap.add_argument("--latent", default=None, help="HxW (default: the preset's on cuda, 16x16 on cpu)")
    ap.add_argument("--steps", type=int, default=3, help="timed calls per method and length")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also the compiled methods (after "
                    "every eager row)")
    ap.add_argument("--methods", default=None, help=f"comma-separated, of {', '.join(METHODS)}")
    ap.add_argument("--out", default=None, help="JSON path (default bench/out/one_gpu-<device>.json)")
    return ap


def parse(argv) -> Plan:
    ap = parser()
    a = ap.parse_args(argv)
    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    a.preset = a.preset or ("modelscope" if cuda else "tiny")
    preset = PRESETS[a.preset]
    frames = [int(f) for f in (a.frames or ("64,256" if cuda else "8,16")).split(",")]
    a.latent = (tuple(int(v) for v in a.latent.lower().split("x")) if a.latent
                else tuple(preset["latent_hw"]) if cuda else (16, 16))
    methods = [m.strip() for m in a.methods.split(",")] if a.methods else [
        m for m in METHODS if a.compile or not m.endswith("compiled")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    if a.steps < 1 or a.warmup < 1:
        ap.error("--steps and --warmup must be >= 1")
    return Plan(a, frames, methods, torch.device("cuda:0" if cuda else "cpu"),
                getattr(torch, preset["dtype"]) if cuda else torch.float32,
                a.out or harness.out_path(f"one_gpu-{a.device}.json"))


def measure_all(plan: Plan, report: harness.Rows):
    """Every method at every length, eager rows first (the most per second of device time),
    then the compiled ones; each row on disk as soon as it is measured."""
    a, device = plan.args, plan.device
    t0 = time.perf_counter()
    model = build_unet(PRESETS[a.preset], device, plan.dtype)
    report.report["build_s"] = time.perf_counter() - t0
    report.save()
    print(f"vinf_engine one device: {a.preset} UNet3D, latent {a.latent}, "
          f"{report.report['dtype']}, CFG batch 2, {report.report['gpu'] or 'cpu'} (built in "
          f"{report.report['build_s']:.0f} s)", flush=True)
    reference: dict = {}
    order = [m for m in plan.methods if not m.endswith("compiled")] + [
        m for m in plan.methods if m.endswith("compiled")]
    for compiled in (False, True):
        for n in plan.frames:
            for method in order:
                if method.endswith("compiled") != compiled:
                    continue
                try:
                    row = measure(model, method, n, a, device, plan.dtype, reference)
                except Exception as e:          # an OOM at 256 frames is a row, not the end
                    oom = "out of memory" in str(e).lower()
                    row = dict(method=method, frames=n, error="out of memory" if oom
                               else f"{type(e).__name__}: {str(e)[-400:]}")
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                print("  " + json.dumps(row), flush=True)
                report.add(row)


COLUMNS = [("method", 20), ("frames", 6), ("ms/frame-step", 14), ("vs diffusers", 13),
           ("vs compiled", 12), ("peak GiB", 9), ("rel diff", 9)]


def print_rows(rows):
    """Each row beside eager and compiled diffusers at the same length."""
    base = {r["frames"]: r["ms_per_frame_step"] for r in rows
            if r["method"] == "diffusers" and "error" not in r}
    base_c = {r["frames"]: r["ms_per_frame_step"] for r in rows
              if r["method"] == "diffusers-compiled" and "error" not in r}

    def cells(r):
        if "error" in r:
            return [r["method"], str(r["frames"]), r["error"][:80]]
        ms, n = r["ms_per_frame_step"], r["frames"]
        return [r["method"], str(n), f"{ms:.3f}", f"{base[n] / ms:.2f}x" if n in base else "-",
                f"{base_c[n] / ms:.2f}x" if n in base_c else "-", f"{r['peak_gib']:.2f}",
                harness.fmt(r.get("max_rel_diff_vs_diffusers"), ".1e")]
    print()
    harness.print_table(COLUMNS, [cells(r) for r in rows], gap=" ", rule=False)
    print("vs diffusers / vs compiled: its speed-up over eager / compiled diffusers at the same "
          "length; rel diff: max |out - diffusers'| / max |diffusers'| (engine-exact: the same "
          "attention; engine: the dual-scope approximation)")


def main(argv=None):
    plan = parse(argv)
    a, cuda = plan.args, plan.device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    report = harness.Rows(plan.out, dict(
        benchmark="one_gpu", date=time.strftime("%Y-%m-%d"), device=a.device,
        gpu=torch.cuda.get_device_name(plan.device) if cuda else None,
        torch=torch.__version__, preset=a.preset, latent_hw=a.latent,
        dtype=str(plan.dtype).replace("torch.", ""), cfg_batch=2, exact_config=EXACT,
        paper_config=PAPER, rows=[], complete=False))
    measure_all(plan, report)
    report.report["complete"] = True
    print_rows(report.rows)
    report.save()
    print(f"wrote {plan.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
