"""The engine's own overhead on one process: diffusers' UNet3D and the same model parallelized in
exact config (every window the whole video, no global frames, no bias: the same attention),
timed interleaved so that the machine's drift falls on both alike.

    python bench/overhead.py                        # tiny UNet3D, 16 frames, latent 16x16, CPU
    python bench/overhead.py --rounds 7 --calls 3

Each round times ``--calls`` no-grad forwards (CFG batch 2, after one untimed call) of
diffusers, of the engine (memory-bounded default) and of the engine with chunking off; the
medians over rounds are reported, with the engine's ratio to diffusers. Weights are random.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import PRESETS, build_unet  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--latent", type=int, default=16, help="latent height = width")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="JSON path (optional)")
    a = ap.parse_args(argv)
    import vinf_engine as vinf
    torch.set_num_threads(a.threads)
    model = build_unet(PRESETS["tiny"], "cpu", torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, a.frames, a.latent, a.latent, generator=g)
    text = torch.randn(2, 8, PRESETS["tiny"]["unet"]["cross_attention_dim"], generator=g)
    t = torch.tensor(500.0)

    def ms():
        with torch.no_grad():
            model(x, t, encoder_hidden_states=text)
            t0 = time.perf_counter()
            for _ in range(a.calls):
                model(x, t, encoder_hidden_states=text)
        return (time.perf_counter() - t0) / a.calls * 1e3
    variants = {"diffusers": None, "engine": 1024.0, "engine, chunking off": 0.0}
    times = {k: [] for k in variants}
    for _ in range(a.rounds):
        for name, chunk in variants.items():
            if chunk is not None:
                vinf.parallelize(model, vinf.DualScopeConfig(window=a.frames, num_global=0,
                                                             phase_bias=0.0), chunk_mib=chunk)
            times[name].append(ms())
            if chunk is not None:
                vinf.unparallelize(model)
    base = statistics.median(times["diffusers"])
    rows = [dict(name=k, median_ms=statistics.median(v), min_ms=min(v),
                 vs_diffusers=statistics.median(v) / base) for k, v in times.items()]
    print(f"one process, tiny UNet3D, {a.frames} frames, latent {a.latent}x{a.latent}, CFG "
          f"batch 2, exact config, {a.rounds} interleaved rounds of {a.calls} calls")
    for r in rows:
        print(f"  {r['name']:<22} {r['median_ms']:8.1f} ms  (min {r['min_ms']:.1f})  "
              f"{r['vs_diffusers']:.3f}x diffusers'")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(benchmark="overhead", args=vars(a), rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
