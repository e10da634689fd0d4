"""Partition invariance of the GPU kernels: two gloo processes sharing one GPU.

    python bench/gpu_invariance.py --device cuda --out bench/out/invariance.json
    python bench/gpu_invariance.py --device cpu                 # the same at CPU speed

NCCL cannot put two ranks on one GPU; gloo can, staging every exchange through pinned host
buffers (``ClipComm``). Per model family (a small random UNet3D and Wan transformer) and
dtype: the 2-rank output against the 1-rank output (the invariance), the 1-rank output with
the kernels against the reference path (``VINF_BACKEND=reference``), and which backend ran
each op (``dispatch.summary()``, failures included). Weights are random, never downloaded.
Prints one JSON line per row as it is measured and writes them all to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import harness  # noqa: E402  (bench/harness.py, beside this script)

UNET = dict(sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
            up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), block_out_channels=(64, 64),
            layers_per_block=1, cross_attention_dim=64, attention_head_dim=64, norm_num_groups=8)
WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=16,
           out_channels=16, text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2,
           cross_attn_norm=True, rope_max_seq_len=1024)
FRAMES = 12
CONFIG = dict(window=2, num_global=3, phase_t=500, phase_bias=2.0, trained_frames=5)


def _model(family: str, device, dtype):
    from diffusers import UNet3DConditionModel, WanTransformer3DModel
    torch.manual_seed(0)
    m = UNet3DConditionModel(**UNET) if family == "unet3d" else WanTransformer3DModel(**WAN)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():                 # zero-initialised layers couple nothing
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m.to(device=device, dtype=dtype).eval()


def _inputs(family: str, device, dtype):
    g = torch.Generator().manual_seed(2)
    if family == "unet3d":
        x = torch.randn(2, 4, FRAMES, 16, 16, generator=g)
        ctx = torch.randn(2, 7, UNET["cross_attention_dim"], generator=g)
    else:
        x = torch.randn(2, 16, FRAMES, 8, 8, generator=g)
        ctx = torch.randn(2, 7, WAN["text_dim"], generator=g)
    return x.to(device, dtype), ctx.to(device, dtype)


def _call(family, model, x, t, ctx):
    if family == "unet3d":
        return model(x, t, encoder_hidden_states=ctx).sample
    return model(hidden_states=x, timestep=torch.full((x.shape[0],), float(t), device=x.device),
                 encoder_hidden_states=ctx).sample


def rank_outputs(rank, world, device, dtype_name, backend):
    """This rank's outputs per (family, timestep), and the dispatcher's summary (world 1:
    in this process, no process group)."""
    import vinf_engine as vinf
    from vinf_engine.ops import dispatch
    old = os.environ.get("VINF_BACKEND")
    os.environ["VINF_BACKEND"] = backend
    try:
        return _outputs(vinf, dispatch, rank, world, device, dtype_name)
    finally:
        if old is None:
            os.environ.pop("VINF_BACKEND", None)
        else:
            os.environ["VINF_BACKEND"] = old


def _outputs(vinf, dispatch, rank, world, device, dtype_name):
    dtype = getattr(torch, dtype_name)
    dev = torch.device(device)
    out = {}
    for family in ("unet3d", "wan"):
        model = _model(family, dev, dtype)
        x, ctx = _inputs(family, dev, dtype)
        layout = vinf.ClipLayout(FRAMES, world)
        clip = x[:, :, layout.start(rank):layout.end(rank)]
        vinf.parallelize(model, vinf.DualScopeConfig(**CONFIG))
        with torch.no_grad():
            for t in (900, 100):
                out[family, t] = _call(family, model, clip, t, ctx).float().cpu()
        vinf.unparallelize(model)
    return out, dispatch.summary()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"),
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=harness.out_path("invariance.json"))
    a = ap.parse_args(argv)
    from vinf_engine.launch import run_local
    device = "cuda:0" if a.device == "cuda" else "cpu"
    dtypes = ["float32", "bfloat16"] if a.device == "cuda" else ["float32"]
    report = harness.Rows(a.out, dict(device=a.device, gpu=torch.cuda.get_device_name()
                                      if a.device == "cuda" else None, rows=[]))
    rows = report.rows

    def emit(row):
        print(json.dumps(row), flush=True)
        report.add(row)

    for dtype in dtypes:
        t0 = time.time()
        try:
            # One rank in this process (no process group); two in spawned ones.
            one, disp1 = rank_outputs(0, 1, device, dtype, "auto")
            two = run_local(rank_outputs, 2, device, dtype, "auto", threads=1, timeout=240)
            # On the CPU "auto" is the reference already.
            ref = one if a.device == "cpu" else rank_outputs(0, 1, device, dtype, "reference")[0]
        except RuntimeError as e:
            emit(dict(dtype=dtype, error=str(e)[-1500:]))
            continue
        for key in one:
            whole = torch.cat([r[0][key] for r in two], dim=2)
            scale = float(one[key].abs().max())
            emit(dict(dtype=dtype, family=key[0], timestep=key[1],
                      rel_err_2_vs_1_rank=float((whole - one[key]).abs().max()) / scale,
                      rel_err_kernels_vs_reference=float((one[key] - ref[key]).abs().max()) / scale))
        emit(dict(dtype=dtype, backends_1_rank=disp1, backends_2_ranks=two[0][1],
                  seconds=round(time.time() - t0, 1)))
    bad = [r for r in rows if "error" in r or r.get("backends_2_ranks", {}).get("failures")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
