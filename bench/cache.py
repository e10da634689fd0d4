"""The step cache every rank agrees on, measured: forwards skipped, the final latents' error
against no cache and time, per threshold and schedule length, on one process and on 3 gloo
ranks (the same decisions), with cache-dit's DBCache on the same model and schedule beside it.

    python bench/cache.py                 # CPU: a small random Wan DiT, UniPC 30 and 50 steps
    python bench/cache.py --quick         # a smoke run

cache-dit (the peer) is optional: ``pip install -r bench/requirements-peers.txt``. Weights are
random (nothing is downloaded): what the figures show is the cache's mechanics (how often a
threshold skips, how far the latents move, that every rank agrees), not a model's quality.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

import vinf_engine as vinf
from vinf_engine.launch import run_local

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPE = dict(num_layers=8, num_attention_heads=2, attention_head_dim=32, ffn_dim=128,
             freq_dim=32, text_dim=32)
HW = (64, 64)                  # pixels: latents 8x8, 16 tokens per latent frame (patch 2x2)


def save_model(folder: str) -> str:
    """A small random ``WanPipeline`` saved to ``folder`` (random weights, the tiny UMT5 and
    VAE of the tests' builders scaled to the bench shape)."""
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    import wan_helpers
    from diffusers import UniPCMultistepScheduler, WanPipeline
    tok = wan_helpers._tokenizer()
    te = wan_helpers._seeded(lambda: _text_encoder(len(tok)), 100)
    tr = wan_helpers._seeded(lambda: wan_helpers._transformer(16, **SHAPE), 200)
    vae = wan_helpers._seeded(lambda: wan_helpers._vae(False), 400)
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                    flow_shift=3.0, num_train_timesteps=1000)
    WanPipeline(tokenizer=tok, text_encoder=te, transformer=tr, vae=vae,
                scheduler=sched).save_pretrained(folder)
    return folder


def _text_encoder(vocab: int):
    from transformers import UMT5Config, UMT5EncoderModel
    return UMT5EncoderModel(UMT5Config(vocab_size=vocab, d_model=SHAPE["text_dim"], d_kv=8,
                                       d_ff=64, num_layers=2, num_heads=4,
                                       relative_attention_num_buckets=8,
                                       feed_forward_proj="gated-gelu", dropout_rate=0.0))


def ours(folder, frames, steps, cache, seed=0):
    """One process: final latents, the report's cache figures, seconds of denoising."""
    rep = vinf.generate(folder, "a red panda", num_frames=frames, steps=steps, seed=seed,
                        height=HW[0], width=HW[1], out=None, progress=False, cache=cache)
    c = rep["cache"][0] if rep["cache"] else None
    return rep["latents"], c, rep["timings_s"]["denoise"]


def _rank(rank, world, folder, frames, steps, cache):
    rep = vinf.generate(folder, "a red panda", num_frames=frames, steps=steps, seed=0,
                        height=HW[0], width=HW[1], out=None, progress=False, cache=cache)
    return rep["latents"], rep["per_rank"][rank]["cache"][0]["decisions"]


def peer(folder, frames, steps, threshold, noise):
    """cache-dit's DBCache (front 1 block, back 0, its residual-difference threshold, the
    same warm-up and run of skips as ours) on the stock WanPipeline from the same initial
    noise: latents, steps skipped per CFG half, seconds. None if cache-dit is missing."""
    try:
        import cache_dit
    except ImportError:
        return None
    from diffusers import WanPipeline
    pipe = WanPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    if threshold is not None:
        cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(
            Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=threshold,
            max_warmup_steps=2, max_continuous_cached_steps=3))
    t0 = time.perf_counter()
    with torch.no_grad():
        out = pipe("a red panda", num_frames=frames, num_inference_steps=steps, height=HW[0],
                   width=HW[1], latents=noise, output_type="latent").frames
    seconds = time.perf_counter() - t0
    skipped = None
    if threshold is not None:
        stats = cache_dit.summary(pipe, logging=False)[0]
        # cache-dit runs the two halves of CFG as calls of their own, each with its cache
        skipped = dict(cond=len(stats.cached_steps), uncond=len(stats.cfg_cached_steps))
    return out, skipped, seconds


def rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def measure(folder, frames, schedules, thresholds):
    rows = []
    noise = vinf.initial_noise(0, (1, 16, (frames - 1) // 4 + 1, HW[0] // 8, HW[1] // 8))
    for steps in schedules:
        base, _, base_s = ours(folder, frames, steps, None)
        stock = peer(folder, frames, steps, None, noise)
        for t in thresholds:
            spec = f"fbc:{t}"
            got, c, sec = ours(folder, frames, steps, spec)
            row = dict(steps=steps, threshold=t, ours_computed=c["computed"],
                       ours_skipped=c["skipped"], ours_rel_err=rel(got, base),
                       ours_seconds=round(sec, 2), no_cache_seconds=round(base_s, 2))
            theirs = peer(folder, frames, steps, t, noise)
            if theirs is not None and stock is not None:
                row.update(cache_dit_rel_err=rel(theirs[0], stock[0]),
                           cache_dit_seconds=round(theirs[2], 2),
                           stock_seconds=round(stock[2], 2), cache_dit_skipped=theirs[1])
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def ranks_agree(folder, frames, steps, spec):
    """The same run on 3 gloo ranks: every rank's decisions and the 1-process ones, and the
    3-rank latents against the 1-process latents."""
    one, c, _ = ours(folder, frames, steps, spec)
    res = run_local(_rank, 3, folder, frames, steps, spec, timeout=1800, threads=1)
    decisions = [d for _, d in res]
    three = torch.cat([z for z, _ in res], dim=2)
    return dict(spec=spec, steps=steps, same_decisions=all(d == c["decisions"] for d in decisions),
                skipped=c["skipped"], rel_err_3_vs_1=rel(three, one))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="9 frames, 6 and 8 steps, one threshold")
    ap.add_argument("--out", default=os.path.join(HERE, "out", "cache.json"))
    a = ap.parse_args(argv)
    frames, schedules, thresholds = (9, (6, 8), (0.1,)) if a.quick else (41, (30, 50),
                                                                         (0.05, 0.1, 0.2))
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_model(os.path.join(tmp, "wan"))
        rows = measure(folder, frames, schedules, thresholds)
        agree = ranks_agree(folder, frames, schedules[0], f"fbc:{thresholds[len(thresholds) // 2]}")
    print(json.dumps(agree), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    report = dict(benchmark="cache", date=time.strftime("%Y-%m-%d"), frames=frames,
                  shape=SHAPE, hw=HW, rows=rows, ranks=agree, torch=torch.__version__)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {a.out}")
    return 0 if agree["same_decisions"] and agree["rel_err_3_vs_1"] <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
