"""How far low precision alone moves the output: the yardstick for partition differences.

    python bench/precision_noise.py --preset modelscope --latent 8x8 --frames 16 --steps 2

Runs the engine on one rank (in this process) twice, the same weights, noise and steps, once
in bf16 (or --dtype) and once in fp32, and prints their max relative difference. A 2- vs 1-rank
difference in bf16 (``bench/throughput.py``) at or below this number is rounding, not a bug.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import throughput  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=tuple(throughput.PRESETS), default="modelscope")
    ap.add_argument("--latent", default="8x8", help="latent HxW")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    a = ap.parse_args(argv)
    try:
        hw = harness.parse_hw(a.latent)
    except ValueError:
        ap.error(f"--latent must look like 8x8, got {a.latent!r}")
    opts = dict(device=a.device, preset=a.preset, frames=a.frames, steps=a.steps, seed=0,
                config=dict(window=8, num_global=16), latent_hw=hw, modes=["overlap"])
    preset = throughput.PRESETS[a.preset]
    saved = preset["dtype"]
    out = {}
    try:
        for dt in (a.dtype, "float32"):
            preset["dtype"] = dt
            out[dt] = throughput.denoise(0, 1, opts)["overlap"]["latents"]
    finally:
        preset["dtype"] = saved
    d = harness.rel_diff(out[a.dtype], out["float32"])
    print(f"{a.preset}, latent {hw[0]}x{hw[1]}, {a.frames} frames, {a.steps} steps, one rank: "
          f"max |out({a.dtype}) - out(float32)| / max |out(float32)| = {d:.2e}")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    sys.exit(main())
