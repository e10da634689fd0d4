"""Image-to-video against text-to-video of the same size: what conditioning costs per step.

    python bench/i2v.py                  # CPU: a small random Wan DiT, 1 process and 2 gloo ranks

An image-to-video Wan transformer takes 36 input channels (the latents, four mask channels and
the condition latents, laid out per global frame: each rank concatenates its own clip's) and,
for Wan 2.1 I2V, CLIP image tokens beside the text in every cross-attention. Neither crosses
ranks: the exchanges move the self-attention's input, the same size for both. This measures
it: time per denoiser call (classifier-free guidance in the batch) and bytes per rank per
call, T2V and I2V side by side in one run. Weights are random (nothing is downloaded).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import vinf_engine as vinf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # already so as a script
from harness import environment, fmt, out_path, print_table, spawn, write_json  # noqa: E402

SHAPE = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, ffn_dim=512,
             freq_dim=64, text_dim=64, num_layers=4, qk_norm="rms_norm_across_heads",
             cross_attn_norm=True, out_channels=16)
CLIP_TOKENS, CLIP_DIM = 257, 64


def build(kind: str):
    from diffusers import WanTransformer3DModel
    torch.manual_seed(0)
    extra = (dict(in_channels=36, image_dim=CLIP_DIM, added_kv_proj_dim=128) if kind == "i2v"
             else dict(in_channels=16))
    return WanTransformer3DModel(**SHAPE, **extra).eval()


def worker(rank, world, opts):
    frames, (h, w), calls = opts["frames"], opts["latent"], opts["calls"]
    layout = vinf.ClipLayout(frames, world)
    mine = layout.frames(rank)
    g = torch.Generator().manual_seed(1)
    text = torch.randn(2, 512, SHAPE["text_dim"], generator=g)
    image = torch.randn(2, CLIP_TOKENS, CLIP_DIM, generator=g)
    out = {}
    for kind in ("t2v", "i2v"):
        model = build(kind)
        vinf.parallelize(model, vinf.DualScopeConfig(window=4, num_global=4))
        x = vinf.initial_noise(0, (2, 16, frames, h, w), mine)
        if kind == "i2v":      # this clip's mask and condition channels, built here, per frame
            x = torch.cat([x, torch.randn(2, 20, len(mine), h, w, generator=g)], dim=1)
        kw = dict(encoder_hidden_states=text,
                  encoder_hidden_states_image=image if kind == "i2v" else None)
        comm = model.vinf_engine.comm
        with torch.no_grad():
            model(hidden_states=x, timestep=torch.full((2,), 900.0), **kw)   # warm-up
            comm.counters.reset()
            t0 = time.perf_counter()
            for i in range(calls):
                model(hidden_states=x, timestep=torch.full((2,), 900.0 - i), **kw)
            seconds = (time.perf_counter() - t0) / calls
        c = comm.counters.snapshot()
        out[kind] = dict(ms_per_call=seconds * 1e3, mib_sent_per_call=c["bytes_sent"] / calls / 2**20,
                         mib_received_per_call=c["bytes_received"] / calls / 2**20)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=12, help="latent frames of the video")
    ap.add_argument("--latent", default="16x16", help="latent HxW (patch 2x2)")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--out", default=out_path("i2v.json"))
    a = ap.parse_args(argv)
    opts = dict(frames=a.frames, latent=tuple(int(v) for v in a.latent.split("x")),
                calls=a.calls)
    rows = []
    for world in (1, 2):
        res, err = spawn(worker, world, opts, label=f"{world} rank(s)", threads=max(1, 2 // world))
        if err:
            rows.append(dict(ranks=world, error=err))
            continue
        for kind in ("t2v", "i2v"):
            per = [r[kind] for r in res]
            rows.append(dict(ranks=world, kind=kind,
                             ms_per_call=max(p["ms_per_call"] for p in per),
                             mib_sent_per_call=max(p["mib_sent_per_call"] for p in per),
                             mib_received_per_call=max(p["mib_received_per_call"] for p in per)))
    print_table([("run", 14), ("ms/call", 10), ("MiB sent", 10), ("MiB recv", 10)],
                [[f"{r['ranks']} rank(s)", r["error"][:80]] if "error" in r else
                 [f"{r['ranks']} rank(s) {r['kind']}", fmt(r["ms_per_call"], ".1f"),
                  fmt(r["mib_sent_per_call"], ".3f"), fmt(r["mib_received_per_call"], ".3f")]
                 for r in rows])
    write_json(a.out, dict(benchmark="i2v", **environment("cpu"), shape=SHAPE, opts=opts,
                           rows=rows))
    print(f"wrote {a.out}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
