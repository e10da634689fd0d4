"""Peak memory of one denoising forward against the video's length, side by side in one run:
the engine (memory-bounded execution, its default), the engine with chunking off, diffusers,
and diffusers with ``enable_forward_chunking``; the per-frame slope of each; a PNG plot.

    python bench/memory.py                          # CPU: tiny UNet3D, latent 32x32, fp32
    python bench/memory.py --preset modelscope --latent 8x8 --frames 8,16,24
                                                    # the 1.41B UNet's per-frame bytes, scaled
    python bench/memory.py --device cuda --preset modelscope --frames 64,128,256
    python bench/memory.py --combine out/m8.json out/m16.json --out out/projection.json
                                                    # per-frame bytes fitted over latents
    python bench/memory.py --where ...              # also: after which module the peak rose
    python bench/memory.py --ranks 2 --methods engine,"engine unchunked"
                                                    # per-rank peak, each rank a clip (gloo)

One no-grad forward with classifier-free guidance (batch 2) per (method, frames), each in its
own process (a fresh allocator): on CPUs the peak RSS above the process's resident size just
before the forward (``/proc/self/clear_refs`` resets the peak; large allocations mapped one by
one, ``MALLOC_MMAP_THRESHOLD_``, so that freed memory leaves the RSS), on GPUs
``max_memory_allocated`` above the memory held before it. The slope is a least-squares fit of
peak memory against frames. With ``--preset modelscope`` the bytes per frame are also scaled to
320x512 (the activations grow with the latent's area, as bench/throughput.py scales bytes) and
give, with the SPEC's measured H200 step time, the longest video that fits one H200 and the
projected time of 2,300 frames x 30 steps. With ``--ranks N`` the engine runs on N gloo ranks,
each on its clip of ``frames / N`` frames: the figure is the largest rank's peak, against the
whole video's frames (diffusers has no such mode). Weights are random, never downloaded.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from throughput import PRESETS, build_unet  # noqa: E402

METHODS = {
    "engine": "vinf_engine.parallelize (--config, memory-bounded default)",
    "engine unchunked": "vinf_engine.parallelize(chunk_mib=0)",
    "diffusers": "stock UNet3DConditionModel",
    "diffusers chunked FF": "stock + enable_forward_chunking(chunk_size=1, dim=1)",
}
H200_GIB = 139.0                  # SPEC: about 139 GiB of GPU memory
H200_MS_PER_FRAME_STEP = 6.68     # SPEC section 5: eager diffusers, 256 frames, 320x512, CFG
FULL_LATENT = (40, 64)            # 320x512


CONFIGS = {
    "exact": dict(window=1000, num_global=0, phase_bias=0.0),   # full attention, diffusers'
    "paper": {},                                                # DualScopeConfig's defaults
}


def measure(rank, world, method, preset_name, frames, latent_hw, device_name, chunk_mib,
            where=False, config="exact"):
    """Peak bytes of one forward of ``method`` on ``frames`` frames, above the memory held
    just before it; with ``where``, also the modules after which the peak rose."""
    import vinf_engine as vinf
    device = torch.device(device_name)
    if preset_name.startswith("wan:"):
        return _measure_wan(rank, world, method, preset_name[4:], frames, latent_hw, device,
                            chunk_mib, where, config)
    preset = PRESETS[preset_name]
    dtype = getattr(torch, preset["dtype"]) if device.type == "cuda" else torch.float32
    model = build_unet(preset, device, dtype)
    if method.startswith("engine"):
        vinf.parallelize(model, vinf.DualScopeConfig(**CONFIGS[config]),
                         chunk_mib=chunk_mib if method == "engine" else 0)
    elif method == "diffusers chunked FF":
        model.enable_forward_chunking(chunk_size=1, dim=1)
    g = torch.Generator().manual_seed(0)
    x = _clip(torch.randn(2, 4, frames, *latent_hw, generator=g), rank, world).to(device, dtype)
    text = torch.randn(2, preset["text_len"], preset["unet"]["cross_attention_dim"],
                       generator=g).to(device, dtype)
    return _peak(device, lambda: model(x, 500, encoder_hidden_states=text),
                 model if where else None)


def _used(device) -> tuple:
    """(peak so far, held now) in bytes."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), torch.cuda.memory_allocated(device)
    return harness.rss_kib("VmHWM:") * 1024, harness.rss_kib("VmRSS:") * 1024


def _peak(device, forward, model=None) -> dict:
    """Peak bytes of ``forward()`` (no grad) above what is held just before it, and its time.
    With ``model``: ``where``, each module (4 levels deep) after whose call the peak had
    risen, with the peak and the memory still held then (on CPUs, as of the call's end)."""
    rises, hooks = [], []
    if model is not None:
        names = {m: n for n, m in model.named_modules() if n and n.count(".") <= 3}
        last = [0]

        def after(module, args, out):
            peak, held = _used(device)
            if peak > last[0]:
                rises.append((names[module], peak, held))
                last[0] = peak
        hooks = [m.register_forward_hook(after) for m in names]
    with torch.no_grad(), harness.Peak(device) as peak:
        t0 = time.perf_counter()
        forward()
    seconds = time.perf_counter() - t0
    for h in hooks:
        h.remove()
    res = dict(peak_bytes=peak.bytes, seconds=seconds)
    if model is not None:
        res["where"] = [dict(module=n, peak_mib=(p - peak.before) / 2 ** 20,
                             held_mib=(h - peak.before) / 2 ** 20) for n, p, h in rises]
    return res


def _clip(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's clip of ``x`` (B, C, F, H, W): ``F / world`` frames, clips in rank order."""
    n = x.shape[2] // world
    return x[:, :, rank * n:(rank + 1) * n].contiguous()


def _measure_wan(rank, world, method, preset_name, frames, latent_hw, device, chunk_mib,
                 where=False, config="exact"):
    """``measure`` for a WanTransformer3DModel of bench/wan_throughput.py's presets (its
    ``--layers`` blocks: a DiT holds no skip connections, so the per-frame peak is one
    block's, whatever the depth)."""
    import warnings
    import vinf_engine as vinf
    from wan_throughput import PRESETS as WAN_PRESETS, build_wan, wan_kwargs
    name, _, layers = preset_name.partition("@")
    preset = dict(WAN_PRESETS[name])
    if layers:
        preset["model"] = dict(preset["model"], num_layers=int(layers))
    dtype = getattr(torch, preset["dtype"]) if device.type == "cuda" else torch.float32
    model = build_wan(preset, device, dtype).eval()
    if method.startswith("engine"):
        # exact config: a window past the trained length, said at parallelize and each step
        warnings.filterwarnings("ignore", message=".*reaches past the trained range")
        vinf.parallelize(model, vinf.DualScopeConfig(**CONFIGS[config]),
                         chunk_mib=chunk_mib if method == "engine" else 0)
    elif method == "diffusers chunked FF":
        raise ValueError("Wan has no enable_forward_chunking")
    g = torch.Generator().manual_seed(0)
    x = _clip(torch.randn(2, 16, frames, *latent_hw, generator=g), rank, world).to(device, dtype)
    text = torch.randn(2, preset["text_len"], wan_kwargs(preset)["text_dim"],
                       generator=g).to(device, dtype)
    t = torch.full((2,), 500.0, device=device)
    return _peak(device, lambda: model(hidden_states=x, timestep=t, encoder_hidden_states=text),
                 model if where else None)


def slope(points):
    """Least-squares bytes per frame of [(frames, bytes)]."""
    n = len(points)
    mx = sum(f for f, _ in points) / n
    my = sum(b for _, b in points) / n
    den = sum((f - mx) ** 2 for f, _ in points)
    return sum((f - mx) * (b - my) for f, b in points) / den if den else float("nan")


def combine(paths) -> dict:
    """Per-frame bytes at 320x512 from modelscope runs at two or more latents: each method's
    slope fitted as ``a + b * area`` (``a``: what does not grow with the latent, such as the
    UNet's per-frame copy of the text embeddings; ``b``: the activations), extrapolated to
    320x512 and halved for bf16 (fp32 on CPU). Sounder than scaling one small latent's slope
    by the area, which scales ``a`` too."""
    reports = [json.load(open(p)) for p in paths]
    if len({tuple(r["latent_hw"]) for r in reports}) < 2:
        raise SystemExit("--combine: give reports at two or more latent sizes")
    full = FULL_LATENT[0] * FULL_LATENT[1]
    out = dict(benchmark="memory projection", sources=list(paths), per_method={})
    methods = set.intersection(*(set(r.get("mib_per_frame", {})) for r in reports))
    for m in sorted(methods):
        pts = [(r["latent_hw"][0] * r["latent_hw"][1], r["mib_per_frame"][m] * 2 ** 20)
               for r in reports]
        b = slope(pts)
        a = sum(y for _, y in pts) / len(pts) - b * sum(x for x, _ in pts) / len(pts)
        halve = 2 if reports[0]["device"] == "cpu" else 1
        gib = (a + b * full) / halve / 2 ** 30
        out["per_method"][m] = dict(fixed_mib_per_frame=a / 2 ** 20,
                                    mib_per_frame_per_latent_pixel=b / 2 ** 20,
                                    gib_per_frame_320x512_bf16=gib, gib_at_2300_frames=gib * 2300,
                                    longest_video_on_one_h200=int(H200_GIB / gib))
        print(f"{m:<22} fixed {a / 2 ** 20:.3f} MiB/frame + {b / 2 ** 10:.2f} KiB/frame per latent "
              f"pixel -> {gib:.4f} GiB per frame at 320x512 bf16; 2,300 frames {gib * 2300:.1f} "
              f"GiB; one H200 holds {int(H200_GIB / gib)} frames")
    if "engine" in methods and "diffusers" in methods:
        e, d = out["per_method"]["engine"], out["per_method"]["diffusers"]
        out["engine_vs_diffusers_at_320x512"] = e["gib_per_frame_320x512_bf16"] / d["gib_per_frame_320x512_bf16"]
        print(f"engine / diffusers per-frame bytes at 320x512: {out['engine_vs_diffusers_at_320x512']:.2f}x")
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--preset", choices=tuple(PRESETS), default="tiny")
    ap.add_argument("--wan", default=None, metavar="PRESET[@LAYERS]",
                    help="measure a WanTransformer3DModel of bench/wan_throughput.py's presets "
                         "instead (e.g. wan2.1-1.3b@2: the 1.3B model's width, 2 of its blocks)")
    ap.add_argument("--frames", default="8,16,32", help="comma-separated lengths (3 or more)")
    ap.add_argument("--latent", default="32x32")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--chunk-mib", type=float, default=64.0,
                    help="the engine's budget per layer (the package default is 1024; the "
                         "CPU default run's tiny layers need a smaller one to chunk at all)")
    ap.add_argument("--out", default=harness.out_path("memory.json"))
    ap.add_argument("--ranks", type=int, default=1,
                    help="run the engine on this many gloo ranks, each on its clip (frames / "
                         "ranks); the figure is the largest rank's peak")
    ap.add_argument("--config", choices=tuple(CONFIGS), default="exact",
                    help="the engine's dual-scope config: exact (full attention, diffusers' "
                         "computation) or paper (DualScopeConfig's defaults: a local window "
                         "and global frames, whose context does not grow with the video)")
    ap.add_argument("--where", action="store_true",
                    help="also say after which modules each run's peak rose, and what was "
                         "held then")
    ap.add_argument("--combine", nargs="+", metavar="REPORT",
                    help="no run: project the per-frame bytes at 320x512 from modelscope "
                         "reports at two or more latents (see combine())")
    return ap


def resolve(ap, a) -> dict:
    """The runs asked for, checked before any spawn: frames, latent, methods, preset, device."""
    frames = [int(f) for f in a.frames.split(",")]
    if len(frames) < 3:
        ap.error("--frames: give 3 or more lengths")
    latent = tuple(int(v) for v in a.latent.lower().split("x"))
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    preset = f"wan:{a.wan}" if a.wan else a.preset
    if a.wan:
        methods = [m for m in methods if m != "diffusers chunked FF"]   # no such mode in Wan
    if a.ranks < 1:
        ap.error("--ranks: give 1 or more")
    if a.ranks > 1:
        if any(not m.startswith("engine") for m in methods):
            ap.error("--ranks: diffusers runs on one process; give engine methods only")
        if any(n % a.ranks for n in frames):
            ap.error(f"--frames: each length must divide into {a.ranks} clips")
        if a.device == "cuda":
            ap.error("--ranks: gloo ranks on the CPU only (NCCL puts one rank per GPU)")
    return dict(frames=frames, latent=latent, methods=methods, preset=preset,
                device="cuda:0" if a.device == "cuda" else "cpu")


def measure_row(a, run: dict, method: str, n: int) -> dict:
    """One (method, frames) in processes of its own: the largest rank's peak."""
    got, error = harness.spawn(measure, a.ranks, method, run["preset"], n, run["latent"],
                               run["device"], a.chunk_mib, a.where, a.config,
                               label=f"{method}, {n} frames", threads=max(1, 2 // a.ranks),
                               timeout=1800, keep=400)
    if error is not None:
        return dict(method=method, frames=n, error=error)
    r = max(got, key=lambda g: g["peak_bytes"])       # the largest rank's
    row = dict(method=method, frames=n, peak_mib=r["peak_bytes"] / 2 ** 20, seconds=r["seconds"])
    if a.where:
        row["where"] = r["where"]
        # where it (nearly) peaked: later rises of a page or two are noise
        top = next((w for w in r["where"]
                    if w["peak_mib"] >= 0.98 * r["where"][-1]["peak_mib"]), None)
        if top:
            print(f"  {method}, {n} frames: peak reached after {top['module']} "
                  f"({top['peak_mib']:.0f} MiB; {top['held_mib']:.0f} MiB held "
                  "then)", flush=True)
    return row


def measure_all(a, run: dict) -> harness.Rows:
    """Every method at every length, each row on disk as soon as it is measured."""
    report = harness.Rows(a.out, dict(
        benchmark="memory", date=time.strftime("%Y-%m-%d"), device=a.device, preset=run["preset"],
        latent_hw=run["latent"], chunk_mib=a.chunk_mib, ranks=a.ranks, config=a.config, rows=[],
        methods={m: METHODS[m] for m in run["methods"]}))
    print(f"vinf_engine memory: {run['preset']} {'Wan' if a.wan else 'UNet3D'}, latent "
          f"{run['latent']}, CFG batch 2, {a.device}, engine in {a.config} config"
          + (f", {a.ranks} gloo ranks" if a.ranks > 1 else ""),
          flush=True)
    for method in run["methods"]:
        for n in run["frames"]:
            row = measure_row(a, run, method, n)
            print("  " + json.dumps(row), flush=True)
            report.add(row)
    return report


def slopes_of(rows, methods) -> dict:
    """Bytes per frame of each method with two or more measured lengths, printed."""
    slopes = {}
    for method in methods:
        pts = [(r["frames"], r["peak_mib"] * 2 ** 20) for r in rows
               if r["method"] == method and "error" not in r]
        if len(pts) >= 2:
            slopes[method] = slope(pts)
    print()
    for m, s in slopes.items():
        rel = f" ({s / slopes['diffusers']:.2f}x diffusers')" if "diffusers" in slopes else ""
        print(f"{m:<22} {s / 2 ** 20:8.2f} MiB per frame{rel}")
    return slopes


def project_full_size(report: dict, slopes: dict, latent, device: str):
    """Per-frame bytes scaled to 320x512 bf16, and what that means on one H200 (added to
    ``report`` and printed)."""
    scale = (FULL_LATENT[0] * FULL_LATENT[1]) / (latent[0] * latent[1])
    if device == "cpu":
        scale /= 2                             # fp32 here, bf16 on the GPU
    proj = {}
    for m, s in slopes.items():
        per_frame_gib = s * scale / 2 ** 30
        proj[m] = dict(gib_per_frame_320x512_bf16=per_frame_gib,
                       gib_at_2300_frames=per_frame_gib * 2300,
                       longest_video_on_one_h200=int(H200_GIB / per_frame_gib))
        print(f"{m:<22} at 320x512 bf16: {per_frame_gib:.4f} GiB per frame; 2,300 frames "
              f"{per_frame_gib * 2300:.1f} GiB; one H200 holds {proj[m]['longest_video_on_one_h200']} "
              "frames (activations only, beside ~2.8 GiB of weights)")
    report["projection"] = dict(
        per_method=proj, assumption="activations scale with the latent's area; fp32 on CPU "
        "halved for bf16; weights not included",
        time_2300x30_s=2300 * 30 * H200_MS_PER_FRAME_STEP / 1e3,
        time_note="SPEC's measured eager diffusers 6.68 ms per frame-step on one H200 "
                  "(engine overhead on one process ~1.0x on CPU; not measured on a GPU)")
    print(f"2,300 frames x 30 steps at the SPEC's {H200_MS_PER_FRAME_STEP} ms per frame-step: "
          f"{report['projection']['time_2300x30_s']:.0f} s")


def main(argv=None):
    ap = parser()
    a = ap.parse_args(argv)
    if a.combine:
        proj = combine(a.combine)
        with open(a.out, "w") as f:
            json.dump(proj, f, indent=1)
        print(f"wrote {a.out}")
        return 0
    # glibc keeps freed memory mapped (arenas, the trim threshold), so peak RSS would also
    # count what an earlier layer freed: every allocation of 64 KiB or more gets its own
    # mapping instead, returned on free, and the peak RSS follows the live tensors. The
    # spawned processes read it at start.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    run = resolve(ap, a)
    report = measure_all(a, run)
    slopes = slopes_of(report.rows, run["methods"])
    report.report["mib_per_frame"] = {m: s / 2 ** 20 for m, s in slopes.items()}
    if run["preset"] == "modelscope" and "engine" in slopes and a.ranks == 1:
        project_full_size(report.report, slopes, run["latent"], a.device)
    report.save()
    _plot(report.rows, run["methods"], os.path.splitext(a.out)[0] + ".png", report.report)
    print(f"wrote {a.out}")
    return 0


def _plot(rows, methods, path, report):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        pts = [(r["frames"], r["peak_mib"]) for r in rows if r["method"] == m and "error" not in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=m)
    ax.set_xlabel("frames")
    ax.set_ylabel("peak MiB of one forward")
    ax.set_title(f"{report['preset']}, latent {report['latent_hw']}, {report['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    report["plot"] = path


if __name__ == "__main__":
    sys.exit(main())
