"""Tiny random text-to-video pipelines saved to disk, for the generation and CLI tests.

Everything is made here: a UNet3D (or the VideoCrafter2 variant), an AutoencoderKL, a CLIP
text encoder and a CLIP tokenizer built from a small vocabulary and merges file written to
disk. ``save_tiny_pipeline`` writes them with ``save_pretrained`` so that the code under test
loads them back through the real loading path.
"""
from __future__ import annotations

import json
import os

import torch

from helpers import TINY_UNET

HW = (16, 24)              # pixels (height, width): latents 8 x 12, VAE factor 2, UNet factor 2
TEXT_LEN = 16


def _tokenizer(folder: str):
    from transformers import CLIPTokenizer
    chars = "abcdefghijklmnopqrstuvwxyz"
    vocab = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = ["t h", "th e</w>", "a n", "an d</w>", "o n", "r e", "e r</w>"]
    for m in merges:
        vocab[m.replace(" ", "")] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                         model_max_length=TEXT_LEN)


def tiny_pipeline(tmp: str, vc2: bool = False, scheduler: str = "ddim"):
    """A TextToVideoSDPipeline of tiny random modules (not yet saved)."""
    from diffusers import AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, UNet3DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from vinf_engine.models.videocrafter2 import VideoCrafter2UNet3DConditionModel
    from vinf_engine.pipelines.unet3d import t2v_pipeline
    torch.manual_seed(0)
    cls = VideoCrafter2UNet3DConditionModel if vc2 else UNet3DConditionModel
    unet = cls(**TINY_UNET).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        # diffusers zero-initialises the temporal convs' last layer and the output conv:
        # give them values so that frames couple and the output depends on everything.
        for p in unet.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                        sample_size=HW[0]).eval()
    tok = _tokenizer(os.path.join(tmp, "_vocab"))
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=TINY_UNET["cross_attention_dim"],
                                      intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=TEXT_LEN,
                                      bos_token_id=len(tok) - 2, eos_token_id=len(tok) - 1,
                                      pad_token_id=len(tok) - 1)).eval()
    if scheduler == "ddim":
        sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    else:
        sched = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                            beta_end=0.012, algorithm_type="sde-dpmsolver++")
    return t2v_pipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched)


def save_tiny_pipeline(folder: str, vc2: bool = False, scheduler: str = "ddim") -> str:
    pipe = tiny_pipeline(folder, vc2=vc2, scheduler=scheduler)
    pipe.save_pretrained(os.path.join(folder, "model"))
    return os.path.join(folder, "model")


# ---------------------------------------------------------------- spawned ranks
def invariance_rank(rank, world, model_dir, out_dir, kwargs):
    """The same video on all ``world`` ranks, then on ranks {0, 1} alone (a subgroup)."""
    import datetime
    import torch.distributed as dist
    from vinf_engine.pipeline import generate
    res = {}
    rep = generate(model_dir, out=os.path.join(out_dir, f"r{world}.mp4"),
                   save_latents=os.path.join(out_dir, f"r{world}.pt"), progress=False, **kwargs)
    res[world] = rep["latents"]
    res["report", world] = {k: v for k, v in rep.items() if k != "latents"}
    if rank < 2:
        # Local synchronisation like the engine's own control groups: on torch 2.13, a plain
        # new_group before them makes their creation time out.
        pair = dist.new_group([0, 1], backend="gloo", use_local_synchronization=True,
                              timeout=datetime.timedelta(seconds=60))
        rep = generate(model_dir, out=os.path.join(out_dir, "r2.mp4"), process_group=pair,
                       progress=False, **kwargs)
        res[2] = rep["latents"]
        rep = generate(model_dir, out=None, process_group=pair, progress=False,
                       comm_mode="stale", **kwargs)
        res["stale"] = rep["latents"]
        res["report", "stale"] = {k: v for k, v in rep.items() if k != "latents"}
    dist.barrier()
    return res


def cli_cases_rank(rank, world, cases, setup):
    """Run ``python -m vinf_engine`` in-process for each case, on every rank, one after the
    other in the same process group: ``cases`` is ``[(name, argv_per_rank)]``. Returns
    ``{name: (exit_code, stderr, seconds)}``. ``setup`` makes a 2-rank checkpoint first (both
    ranks stop at the same step, so the group stays in step) for the checkpoint cases."""
    import contextlib
    import io
    import time
    from vinf_engine.cli import main
    from vinf_engine.pipeline import GenerationFailed, generate
    if setup:
        def stop(step, t, latents):
            if step == 1:
                raise RuntimeError("planned stop")
        try:
            generate(setup["model"], "the cat", num_frames=4, steps=3, height=HW[0], width=HW[1],
                     out=setup["out"], checkpoint_dir=setup["checkpoint_dir"], checkpoint_every=1,
                     seed=1, callback=stop, progress=False)
        except GenerationFailed:
            pass
    results = {}
    for name, argv in cases:
        err = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv[rank])
            except SystemExit as e:          # argparse
                code = e.code
        results[name] = (code, err.getvalue(), time.perf_counter() - t0)
    return results


def stock_pipe_rank(rank, world, runs):
    """The unchanged diffusers pipeline call after ``vinf.parallelize_pipe``, on every rank:
    ``runs`` is ``{name: (pipeline class name, folder, config, call kwargs, seed[, calls])}``,
    ``calls`` methods of the pipeline called after ``parallelize_pipe`` (``"unet.foo"``);
    returns each run's output (latents, np or pt frames). Then the misuse the drop-in
    replaces: a rank-local model given the same whole video on every rank."""
    import diffusers
    import vinf_engine as vinf
    from helpers import tiny_unet, unet_inputs
    out = {}
    for name, (cls, folder, cfg, kw, seed, *calls) in runs.items():
        pipe = getattr(diffusers, cls).from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        vinf.parallelize_pipe(pipe, None if cfg is None else vinf.DualScopeConfig(**cfg))
        for call in (calls[0] if calls else ()):   # the pipeline's own API, after the drop-in
            obj = pipe
            for attr in call.split("."):
                obj = getattr(obj, attr)
            obj()
        res = pipe(generator=torch.Generator().manual_seed(seed), **kw).frames
        out[name] = res if isinstance(res, torch.Tensor) else torch.as_tensor(res)
        vinf.unparallelize_pipe(pipe)
    model = tiny_unet()
    vinf.parallelize(model, vinf.DualScopeConfig(window=2, num_global=2))
    x, ctx = unet_inputs(6)
    try:
        model(x, 900, encoder_hidden_states=ctx)
        out["misuse"] = None
    except ValueError as e:
        out["misuse"] = str(e)
    return out


def generate_rank(rank, world, model_dir, kwargs):
    """This rank's final latents of ``vinf.generate(model_dir, **kwargs)`` (no outputs)."""
    from vinf_engine.pipeline import generate
    return generate(model_dir, out=None, progress=False, **kwargs)["latents"]


def generate_rank_report(rank, world, model_dir, kwargs):
    """This rank's report of ``vinf.generate(model_dir, **kwargs)`` (no outputs)."""
    from vinf_engine.pipeline import generate
    return generate(model_dir, out=None, progress=False, **kwargs)
