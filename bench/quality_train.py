"""Train the quality bench's two small text-to-video models on the procedural video set, on CPU.

    python bench/quality_train.py --train vae        # both VAEs (minutes); writes the folders
                                                     # (--family unet3d|wan: one of them)
    python bench/quality_train.py --train unet3d     # the UNet3D denoiser (see --steps)
    python bench/quality_train.py --train wan        # the Wan DiT denoiser

Everything is seeded (one thread: the same run gives the same weights on this torch build). A
denoiser trains on ``--clips`` clips of ``FRAMES`` frames (the models' trained length) rendered
by ``quality_lib``, encoded once by the family's trained VAE, conditioned on the pipeline's own
``encode_prompt`` embeddings of each clip's label (the empty prompt for 10% of samples, so that
classifier-free guidance has an unconditional model). UNet3D: DDPM epsilon prediction on the
pipeline's scaled-linear betas; Wan: flow matching (velocity ``noise - x0``) at shifted
sigmas, as the pipeline's UniPC flow sampler (shift 3) samples them. AdamW, warm-up then cosine
decay, gradient clipping, an exponential moving average of the weights (what is saved).

Each model folder under ``bench/quality_models/<kind>/`` is a diffusers pipeline folder
(``save_pretrained``; the denoiser in fp16 safetensors to stay small, loaded back in fp32),
with ``train_log.csv`` (step, loss, lr, seconds) and ``train_info.json`` beside it.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality_lib as q  # noqa: E402
import quality_models as qm  # noqa: E402

P_UNCOND = 0.1
FLOW_SHIFT = 3.0
DEFAULT_STEPS = {"unet3d": 2500, "wan": 6000}
DEFAULT_LR = {"unet3d": 1e-3, "wan": 1e-3}
# Frames per VAE training clip. The Wan VAE encodes frame 0 alone, then chunks of 4 frames,
# each after the cache of the one before: 9 frames train the chunk that follows a chunk (one
# trained on 5-frame clips tinted frames 5+: 2.8% mean absolute error on four 16-frame clips,
# against 1.7% for 9-frame clips, measured).
VAE_CLIP = {"unet3d": 5, "wan": 9}


def render_clips(n: int, seed: int, frames: int) -> tuple:
    """``n`` random scenes' first ``frames`` frames and labels.

    Returns (n, 3, frames, S, S) float32 in [-1, 1] and a list of ``n`` labels."""
    rng = np.random.default_rng(seed)
    vids, labels = [], []
    for _ in range(n):
        sc = q.sample_scene(rng)
        vids.append(q.render(sc, range(frames)).transpose(3, 0, 1, 2))
        labels.append(q.label(sc))
    return torch.from_numpy(np.stack(vids)) * 2 - 1, labels


# ==================================================================== VAEs
def _vae_loss(kind: str, vae, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Reconstruction MSE plus a small KL of one batch: frames (B, 3, S, S) for the 2-D VAE,
    clips (B, 3, 9, S, S) for the causal Wan VAE (frame 0 alone, then two chunks of 4)."""
    post = vae.encode(x).latent_dist
    z = post.sample(generator=gen)
    rec = vae.decode(z).sample
    return torch.nn.functional.mse_loss(rec, x) + 1e-6 * post.kl().mean()


def train_vae(kind: str, steps: int, seed: int) -> dict:
    """Train ``kind``'s VAE on rendered frames; set its latent normalisation from the data."""
    torch.manual_seed(seed)
    pipe = qm.build(kind, seed)
    vae = pipe.vae.train()
    clips, _ = render_clips(2048, seed + 1, VAE_CLIP[kind])
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed + 2)
    t0, log = time.perf_counter(), []
    for step in range(steps):
        idx = torch.randint(0, len(clips), (8,), generator=gen)
        x = clips[idx]
        if kind == "unet3d":                       # 2-D: the clips' frames, one row each
            x = x.permute(0, 2, 1, 3, 4).reshape(-1, 3, q.SIZE, q.SIZE)
        for g in opt.param_groups:
            g["lr"] = 1e-3 * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * (1 - step / steps))
        loss = _vae_loss(kind, vae, x, gen)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        log.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            print(f"vae {kind} step {step} loss {np.mean(log[-100:]):.5f} "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
    vae.eval()
    with torch.no_grad():
        mu = _encode_mean(kind, vae, clips[:256])
    if kind == "unet3d":
        vae.register_to_config(scaling_factor=float(1.0 / mu.std()))
    else:
        vae.register_to_config(latents_mean=mu.mean(dim=(0, 2, 3, 4)).tolist(),
                               latents_std=mu.std(dim=(0, 2, 3, 4)).tolist())
    return dict(pipe=pipe, steps=steps, seconds=time.perf_counter() - t0,
                final_loss=float(np.mean(log[-100:])), log=log)


def _encode_mean(kind: str, vae, clips: torch.Tensor) -> torch.Tensor:
    """Posterior means of ``clips`` (B, 3, F, S, S): (B, C, F, s, s), un-normalised. The Wan
    VAE encodes ``1 + 4k`` frames at a time: the clip is padded with copies of its last frame
    and the extra latents dropped (its encoder is causal, so they change nothing before)."""
    B, _, F, S, _ = clips.shape
    if kind == "unet3d":
        x = clips.permute(0, 2, 1, 3, 4).reshape(B * F, 3, S, S)
        mu = torch.cat([vae.encode(c).latent_dist.mean for c in x.split(512)])
        return mu.reshape(B, F, *mu.shape[1:]).permute(0, 2, 1, 3, 4)
    pad = (-(F - 1)) % 4
    x = torch.cat([clips, clips[:, :, -1:].expand(-1, -1, pad, -1, -1)], dim=2)
    return torch.cat([vae.encode(c).latent_dist.mean for c in x.split(64)])[:, :, :F]


def normalised_latents(kind: str, vae, clips: torch.Tensor) -> torch.Tensor:
    """What the denoiser sees: ``mean * scaling_factor`` (UNet3D, as TextToVideoSDPipeline
    decodes ``latents / scaling_factor``); ``(mean - latents_mean) / latents_std`` (Wan)."""
    with torch.no_grad():
        mu = _encode_mean(kind, vae, clips)
    if kind == "unet3d":
        return mu * vae.config.scaling_factor
    m = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    s = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    return (mu - m) / s


# ==================================================================== denoisers
def _noised(kind: str, alphas: torch.Tensor | None, x0, gen) -> tuple:
    """(model input, timestep (B,), target) of one training batch ``x0`` (B, C, F, h, w)."""
    B = x0.shape[0]
    eps = torch.randn(x0.shape, generator=gen)
    if kind == "unet3d":
        t = torch.randint(0, 1000, (B,), generator=gen)
        a = alphas[t].view(B, 1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps, t, eps
    u = torch.rand(B, generator=gen)
    sigma = FLOW_SHIFT * u / (1 + (FLOW_SHIFT - 1) * u)
    s = sigma.view(B, 1, 1, 1, 1)
    return (1 - s) * x0 + s * eps, sigma * 1000, eps - x0


def _predict(kind: str, model, x, t, text):
    if kind == "unet3d":
        return model(x, t, encoder_hidden_states=text).sample
    return model(hidden_states=x, timestep=t.float(), encoder_hidden_states=text).sample


def _lr(step: int, steps: int, base: float) -> float:
    """Linear warm-up over 200 steps, then cosine decay to a tenth."""
    if step < 200:
        return base * (step + 1) / 200
    return base * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - 200) / max(1, steps - 200))))


def _data(kind: str, pipe, clips: int, seed: int) -> tuple:
    """Latents (N, C, F, h, w), label index per clip (N,), embeddings (n_labels + 1, L, D);
    the last embedding row is the empty prompt."""
    t0 = time.perf_counter()
    vids, labels = render_clips(clips, seed, q.FRAMES)
    lat = normalised_latents(kind, pipe.vae, vids)
    names = sorted(set(labels))
    emb = qm.text_embeddings(pipe, names + [""])
    table = torch.cat([emb[n] for n in names + [""]])
    index = torch.tensor([names.index(x) for x in labels])
    print(f"data: {clips} clips, {len(names)} labels, latents {tuple(lat.shape)} "
          f"std {lat.std():.3f}, {time.perf_counter() - t0:.0f}s", flush=True)
    return lat, index, table


def train_denoiser(kind: str, steps: int, seed: int, clips: int, batch: int, log_path: str,
                   save_every: int, folder: str) -> dict:
    """Train the denoiser of the pipeline in ``folder`` (its VAE trained); save the EMA weights
    every ``save_every`` steps and at the end; the loss curve goes to ``log_path``."""
    from vinf_engine.pipelines import load_pipeline
    torch.manual_seed(seed)
    pipe = load_pipeline(folder)
    lat, index, table = _data(kind, pipe, clips, seed + 10)
    model = qm.make_denoiser(kind).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    alphas = pipe.scheduler.alphas_cumprod.float() if kind == "unet3d" else None
    base = DEFAULT_LR[kind]
    opt = torch.optim.AdamW(model.parameters(), lr=base, betas=(0.9, 0.99), weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed + 20)
    t0, c0, window, rows = time.perf_counter(), time.process_time(), [], []
    with open(log_path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["step", "loss", "lr", "seconds"])
        for step in range(steps):
            idx = torch.randint(0, len(lat), (batch,), generator=gen)
            cond = torch.where(torch.rand(batch, generator=gen) < P_UNCOND,
                               torch.full((batch,), len(table) - 1), index[idx])
            x, t, target = _noised(kind, alphas, lat[idx], gen)
            for g in opt.param_groups:
                g["lr"] = _lr(step, steps, base)
            loss = torch.nn.functional.mse_loss(_predict(kind, model, x, t, table[cond]), target)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            _ema_update(ema, model, min(0.999, (1 + step) / (10 + step)))
            window.append(loss.item())
            if (step + 1) % 25 == 0 or step == steps - 1:
                row = [step + 1, float(np.mean(window)), opt.param_groups[0]["lr"],
                       round(time.perf_counter() - t0, 1)]
                out.writerow(row)
                f.flush()
                rows.append(row)
                window = []
                if (step + 1) % 250 == 0:
                    print(f"{kind} step {row[0]} loss {row[1]:.4f} lr {row[2]:.2e} {row[3]:.0f}s",
                          flush=True)
            if (step + 1) % save_every == 0 or step == steps - 1:
                _save_denoiser(kind, ema, folder)
    return dict(steps=steps, seconds=round(time.perf_counter() - t0, 1),
                cpu_seconds=round(time.process_time() - c0, 1), final_loss=rows[-1][1],
                final_loss_mean_last_250=float(np.mean([r[1] for r in rows[-10:]])),
                params=sum(p.numel() for p in model.parameters()), clips=clips, batch=batch,
                lr=base, seed=seed)


@torch.no_grad()
def _ema_update(ema, model, decay: float):
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.mul_(decay).add_(pm.detach(), alpha=1 - decay)


def _save_denoiser(kind: str, model, folder: str):
    sub = "unet" if kind == "unet3d" else "transformer"
    half = copy.deepcopy(model).to(torch.float16)
    half.save_pretrained(os.path.join(folder, sub), safe_serialization=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", required=True, choices=("vae", "unet3d", "wan"))
    ap.add_argument("--family", choices=qm.KINDS, default=None,
                    help="with --train vae: train only this family's VAE (default: both)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clips", type=int, default=8192, help="training clips (denoisers)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model-dir", default=None,
                    help="the pipeline folder (default bench/quality_models/<family>)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers.utils import logging as dlog
    dlog.set_verbosity_error()
    machine = dict(cpu=platform.processor() or platform.machine(), threads=args.threads,
                   torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    if args.train == "vae":
        for kind in (args.family,) if args.family else qm.KINDS:
            res = train_vae(kind, args.steps or (1500 if kind == "unet3d" else 1000), args.seed)
            folder = args.model_dir or qm.MODEL_DIRS[kind]
            res["pipe"].save_pretrained(folder, safe_serialization=True)
            _save_denoiser(kind, getattr(res["pipe"], "unet", None) or res["pipe"].transformer,
                           folder)
            info = dict(vae=dict(steps=res["steps"], seconds=round(res["seconds"], 1),
                                 final_loss=res["final_loss"], seed=args.seed), machine=machine)
            with open(os.path.join(folder, "train_info.json"), "w") as f:
                json.dump(info, f, indent=1)
        return 0
    kind, folder = args.train, args.model_dir or qm.MODEL_DIRS[args.train]
    info_path = os.path.join(folder, "train_info.json")
    with open(info_path) as f:
        info = json.load(f)
    res = train_denoiser(kind, args.steps or DEFAULT_STEPS[kind], args.seed, args.clips,
                         args.batch, os.path.join(folder, "train_log.csv"), args.save_every,
                         folder)
    info["denoiser"] = dict(res, machine=machine)
    with open(info_path, "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info["denoiser"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
