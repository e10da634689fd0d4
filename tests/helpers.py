"""Shared test tools: tiny random diffusers models and real multi-process gloo runs."""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import tempfile
import traceback

import torch

TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
    up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
    block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=8,
    attention_head_dim=4, norm_num_groups=4)


def tiny_unet(seed: int = 0, **overrides):
    """A small UNet3DConditionModel with random weights, the same on every rank.

    diffusers zero-initialises the last conv of every TemporalConvLayer (identity at init);
    those are filled with noise too, so that the temporal convs couple frames for real.
    """
    from diffusers import UNet3DConditionModel
    torch.manual_seed(seed)
    m = UNet3DConditionModel(**{**TINY_UNET, **overrides}).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in m.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m


def unet_inputs(frames: int, seed: int = 1, batch: int = 2, hw: int = 8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, frames, hw, hw, generator=g)
    ctx = torch.randn(batch, 5, TINY_UNET["cross_attention_dim"], generator=g)
    return x, ctx


def _child(rank, world, init_file, out_file, fn, args):
    import torch.distributed as dist
    torch.set_num_threads(1)
    result = None
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world)
        result = ("ok", fn(rank, world, *args))
    except BaseException as e:  # noqa: BLE001 - report everything to the parent
        result = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    finally:
        with open(out_file, "wb") as f:
            pickle.dump(result, f)
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout: float = 180.0) -> list:
    """Run ``fn(rank, world, *args)`` in ``world`` real processes joined by gloo; return each
    rank's result. A rank that raises makes this raise with its traceback."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "init")
        outs = [os.path.join(tmp, f"out{r}") for r in range(world)]
        procs = [ctx.Process(target=_child, args=(r, world, init, outs[r], fn, args))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
        if hung:
            raise TimeoutError(f"ranks {hung} did not finish within {timeout}s")
        results = []
        for r, path in enumerate(outs):
            if not os.path.exists(path):
                raise RuntimeError(f"rank {r} died without a result (exit code {procs[r].exitcode})")
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status != "ok":
                raise RuntimeError(f"rank {r} failed: {value}")
            results.append(value)
        return results


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))
