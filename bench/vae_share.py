"""The drop-in's VAE, shared out across ranks (vinf_engine/vae_share.py), measured on the CPU:

1. Frames each rank's VAE encodes and decodes in the stock pipeline call, before (the VAE
   unpatched: every rank encodes and decodes the whole video, which is what every rank of
   the drop-in did) and after ``parallelize_pipe`` shares it, at R ranks, counted by
   pre-hooks on ``vae.encoder`` / ``vae.decoder`` (Wan: video frames into the encoder, latent
   frames into the decoder; UNet3D's 2-D VAE: images). Tiny random pipelines: a Wan 2.1
   ``WanImageToVideoPipeline`` (CLIP image encoder, 36-channel transformer) at two lengths and
   a ``TextToVideoSDPipeline``; each rank also checks its video against the unpatched one.
2. Wall time of ``pipe.vae.decode(z)`` of one video's latents: 1 process (diffusers' own
   decode) against R gloo ranks (the shared decode, one thread each), in the same run, with
   each rank's CPU time and decoder latent frames (its clip plus its causal warm-up; in
   brackets those through the whole decoder: a warm-up frame runs only the stages its
   receptive field reaches), and the ranks' video against the 1-process one. The VAE: ``AutoencoderKLWan`` with the released
   layout (``num_res_blocks=2``, 4 stages, causal history 38 latent frames) at a small
   width (``--base-dim``), random weights.

    python bench/vae_share.py                     # R = 3; JSON in bench/out/vae_share-cpu.json
    python bench/vae_share.py --ranks 2 --decode-latents 48,96

Pipelines and frame counters come from tests/ (``vae_helpers``, ``wan_helpers``): the same
code the tests run. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
warnings.filterwarnings("ignore")


def pipelines(wan_frames: tuple, t2v_frames: int) -> dict:
    specs = {}
    for n in wan_frames:
        specs[f"WanImageToVideoPipeline (Wan 2.1 I2V), {n} frames"] = dict(
            pipe=("wan_i2v", "2.1"), seed=1,
            call=dict(prompt="the cat", num_frames=n, num_inference_steps=2, guidance_scale=4.0,
                      height=32, width=64, max_sequence_length=16, output_type="pt", image=1))
    specs[f"TextToVideoSDPipeline, {t2v_frames} frames"] = dict(
        pipe=("t2v",), seed=4,
        call=dict(prompt="the cat", num_frames=t2v_frames, num_inference_steps=2,
                  guidance_scale=4.0, height=32, width=32, output_type="pt"))
    return specs


def counts_rank(rank, world, specs):
    """Each pipeline call stock (what every rank's VAE did before) and after the drop-in."""
    warnings.filterwarnings("ignore")
    from helpers import rel_err
    from vae_helpers import run_pipeline
    out = {}
    for name, spec in specs.items():
        before = run_pipeline(spec, parallel=False)
        after = run_pipeline(spec, parallel=True)
        out[name] = dict(before=before["counts"], after=after["counts"],
                         rel_diff=rel_err(after["frames"], before["frames"]))
    return out


def big_vae(base_dim: int):
    from diffusers import AutoencoderKLWan
    from helpers import fill_zeros
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        vae = AutoencoderKLWan(base_dim=base_dim).eval()       # the released layout, narrower
    return fill_zeros(vae, 12)


def decode_rank(rank, world, n_latent, hw, base_dim):
    """``pipe.vae.decode(z)``: stock on one process, the drop-in's shared decode on several."""
    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    import vinf_engine as vinf
    from vae_helpers import EXACT, FrameCount
    from wan_helpers import tiny_wan_pipeline
    pipe = tiny_wan_pipeline("2.1")
    pipe.vae = big_vae(base_dim)
    if world > 1:
        vinf.parallelize_pipe(pipe, vinf.DualScopeConfig(**EXACT))
    count = FrameCount(pipe.vae)
    z = torch.randn(1, 16, n_latent, *hw, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        pipe.vae.decode(z[:, :, :2])                 # warm-up (2 frames: stock on every rank)
        count.take()
        if world > 1:
            dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        video = pipe.vae.decode(z).sample
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return dict(wall_s=wall, cpu_s=cpu, **count.take(), video=video if rank == 0 else None)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=3)
    ap.add_argument("--wan-frames", default="17,161", help="video frames, 4k+1, comma-separated")
    ap.add_argument("--t2v-frames", type=int, default=24)
    ap.add_argument("--decode-latents", default="48,96", help="latent frames, comma-separated")
    ap.add_argument("--latent", default="8x8", help="latent height x width of the timed decode")
    ap.add_argument("--base-dim", type=int, default=8)
    ap.add_argument("--skip-counts", action="store_true")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "vae_share-cpu.json"))
    a = ap.parse_args(argv)
    from helpers import rel_err
    from vinf_engine.launch import run_local
    from vinf_engine.vae_share import clip_sizes
    from vinf_engine.wan_vae import causal_history, warmup_cost

    R = a.ranks
    report = dict(date=time.strftime("%Y-%m-%d"), machine=f"{cpu_name()}, {os.cpu_count()} cores",
                  command="python " + " ".join([os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])]),
                  ranks=R, counts={}, decode=[])
    if not a.skip_counts:
        specs = pipelines(tuple(int(f) for f in a.wan_frames.split(",")), a.t2v_frames)
        res = run_local(counts_rank, R, specs, threads=1, timeout=3600)
        print(f"\nFrames through each rank's VAE, {R} ranks (before: the VAE unpatched, every rank "
              "the whole video; after: shared)\n")
        print("| pipeline | rank | encoded before | encoded after | decoded before | decoded after "
              "(of which through the whole decoder) | video vs unpatched |")
        print("|---|---|---|---|---|---|---|")
        for name in specs:
            report["counts"][name] = [r[name] for r in res]
            for rank, r in enumerate(res):
                c = r[name]
                print(f"| {name} | {rank} | {c['before']['encoded']} | {c['after']['encoded']} | "
                      f"{c['before']['decoded']} | {c['after']['decoded']} "
                      f"({c['after']['decoded_full']}) | {c['rel_diff']:.1e} |")

    hw = tuple(int(v) for v in a.latent.split("x"))
    vae = big_vae(a.base_dim)
    H, cost = causal_history(vae), warmup_cost(vae)
    print(f"\npipe.vae.decode of one video: AutoencoderKLWan(base_dim={a.base_dim}) released "
          f"layout (causal history {H}, a warm-up costing {cost(H):.1f} frames), latent "
          f"{a.latent}, fp32, 1 thread per process\n")
    print("| latent frames | video frames | run | wall s | rank CPU s (max) | decoder latent "
          "frames per rank (whole) | speed-up | video vs 1 process |")
    print("|---|---|---|---|---|---|---|---|")
    for n in (int(v) for v in a.decode_latents.split(",")):
        one = run_local(decode_rank, 1, n, hw, a.base_dim, threads=1, timeout=3600)[0]
        many = run_local(decode_rank, R, n, hw, a.base_dim, threads=1, timeout=3600)
        wall = max(r["wall_s"] for r in many)
        diff = rel_err(many[0]["video"], one["video"])
        sizes = clip_sizes(n, R, cost)
        keys = ("wall_s", "cpu_s", "decoded", "decoded_full")
        row = dict(latent_frames=n, video_frames=one["video"].shape[2], clip_sizes=sizes,
                   one={k: one[k] for k in keys}, ranks=[{k: r[k] for k in keys} for r in many],
                   speedup=one["wall_s"] / wall, rel_diff=diff)
        report["decode"].append(row)
        per_rank = ", ".join(f"{r['decoded']} ({r['decoded_full']})" for r in many)
        print(f"| {n} | {row['video_frames']} | 1 process (diffusers) | {one['wall_s']:.1f} | "
              f"{one['cpu_s']:.1f} | {one['decoded']} | 1.00 | - |")
        print(f"| {n} | {row['video_frames']} | {R} ranks (shared), clips {sizes} | {wall:.1f} | "
              f"{max(r['cpu_s'] for r in many):.1f} | "
              f"{per_rank} | "
              f"{row['speedup']:.2f} | "
              f"{diff:.1e} |")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\n{report['machine']}, {report['date']}; JSON in {a.out}")


if __name__ == "__main__":
    main()
