"""Profiler trace of one clip-parallel UNet step per rank: do exchanges overlap compute?

    python bench/trace_overlap.py                 # CPU: tiny UNet3D, 2 gloo ranks
    python bench/trace_overlap.py --device cuda   # one rank per GPU (NCCL), 1.41B shape

Writes a Chrome trace per rank (open in chrome://tracing or Perfetto) and prints, per rank,
how much of the communication time (NCCL kernels on GPUs, gloo work on CPUs) ran while a
compute kernel was also running.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import throughput  # noqa: E402
import vinf_engine as vinf  # noqa: E402
from vinf_engine.launch import run_local  # noqa: E402


def _intervals(events, pred):
    return sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                  if e.get("ph") == "X" and pred(e))


def _overlap(a, b) -> float:
    """Total length of a's intervals covered by the union of b's."""
    merged = []
    for s, e in b:
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    total, j = 0.0, 0
    for s, e in a:
        for ms, me in merged:
            if me <= s:
                continue
            if ms >= e:
                break
            total += min(e, me) - max(s, ms)
    return total


def trace_rank(rank, world, opts):
    from torch.profiler import ProfilerActivity, profile
    preset = throughput.PRESETS[opts["preset"]]
    device = torch.device(f"cuda:{rank}" if opts["device"] == "cuda" else "cpu")
    dtype = getattr(torch, preset["dtype"])
    h, w = opts["latent_hw"]
    model = throughput.build_unet(preset, device, dtype)
    vinf.parallelize(model, vinf.DualScopeConfig(window=opts["window"], num_global=opts["num_global"]),
                     comm_mode=opts["mode"])
    layout = vinf.ClipLayout(opts["frames"], world)
    x = vinf.initial_noise(0, (2, 4, opts["frames"], h, w), layout.frames(rank), device=device, dtype=dtype)
    text = torch.randn(2, preset["text_len"], preset["unet"]["cross_attention_dim"]).to(device, dtype)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad():
        model(x, 500, encoder_hidden_states=text)             # warm-up
        with profile(activities=acts) as prof:
            model(x, 500, encoder_hidden_states=text)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    path = os.path.join(opts["out_dir"], f"trace-{opts['mode']}-rank{rank}.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    if device.type == "cuda":
        is_comm = lambda e: e.get("cat") == "kernel" and "nccl" in e.get("name", "").lower()
        is_comp = lambda e: e.get("cat") == "kernel" and "nccl" not in e.get("name", "").lower()
    else:
        is_comm = lambda e: "gloo" in e.get("name", "").lower()
        is_comp = lambda e: e.get("name", "").startswith("aten::") and "gloo" not in e.get("name", "")
    comm, comp = _intervals(events, is_comm), _intervals(events, is_comp)
    comm_us = sum(e - s for s, e in comm)
    return dict(rank=rank, trace=path, comm_us=comm_us, overlapped_us=_overlap(comm, comp),
                comm_events=len(comm))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--preset", choices=tuple(throughput.PRESETS), default=None)
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--ranks", type=int, default=None)
    ap.add_argument("--mode", choices=("overlap", "blocking", "stale"), default="overlap")
    ap.add_argument("--latent", default=None, help="latent HxW (default: the preset's)")
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--num-global", type=int, default=16)
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    a = ap.parse_args(argv)
    preset = a.preset or ("tiny" if a.device == "cpu" else "modelscope")
    ranks = a.ranks or (2 if a.device == "cpu" else torch.cuda.device_count())
    if ranks < 2:
        ap.error("needs at least 2 ranks (on GPUs: 2 GPUs; NCCL takes one rank per GPU)")
    latent = tuple(int(v) for v in a.latent.split("x")) if a.latent else throughput.PRESETS[preset]["latent_hw"]
    os.makedirs(a.out_dir, exist_ok=True)
    opts = dict(device=a.device, preset=preset, frames=a.frames or 8 * ranks, mode=a.mode,
                latent_hw=latent, window=a.window, num_global=a.num_global, out_dir=a.out_dir)
    res = run_local(trace_rank, ranks, opts, backend="nccl" if a.device == "cuda" else "gloo",
                    threads=None if a.device == "cuda" else 1, timeout=1800)
    for r in res:
        share = r["overlapped_us"] / r["comm_us"] if r["comm_us"] else 0.0
        print(f"rank {r['rank']}: {r['comm_events']} communication events, {r['comm_us'] / 1e3:.2f} ms, "
              f"{100 * share:.0f}% of it concurrent with compute; trace {r['trace']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
