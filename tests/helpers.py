"""Shared test tools: tiny random diffusers models and real multi-process gloo runs."""
from __future__ import annotations

import os

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
    return fill_zeros(UNet3DConditionModel(**{**TINY_UNET, **overrides}).eval(), seed + 1)


def fill_zeros(model, seed: int):
    """Fill every all-zero parameter of ``model`` with small noise (diffusers zero-initialises
    some layers), so that the output depends on every module. Returns the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def unet_inputs(frames: int, seed: int = 1, batch: int = 2, hw: int = 8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, frames, hw, hw, generator=g)
    ctx = torch.randn(batch, 5, TINY_UNET["cross_attention_dim"], generator=g)
    return x, ctx


_POOLS: dict = {}     # world -> RankPool, most recently used last
_MAX_POOLS = 3


def run_ranks(fn, world: int, *args, timeout: float = 180.0, fresh: bool = False) -> list:
    """``fn(rank, world, *args)`` on ``world`` real processes joined by gloo, one thread each.

    The ranks are kept between calls (``vinf_engine.launch.RankPool``, a few per test worker):
    spawning pays for importing torch and diffusers on every rank, most of a small test's
    time. Each call starts from a fresh rank's state (environment, seed, dtype, compile
    cache); ``fresh=True`` (or ``VINF_TEST_FRESH_RANKS=1`` for the whole suite) spawns new
    ranks for tests that break or time out their process group on purpose."""
    from vinf_engine.launch import RankPool, run_local
    if fresh or os.environ.get("VINF_TEST_FRESH_RANKS") == "1":
        return run_local(fn, world, *args, timeout=timeout, threads=1)
    pool = _POOLS.pop(world, None)
    if pool is None or pool.closed:
        while len(_POOLS) >= _MAX_POOLS:
            _POOLS.pop(next(iter(_POOLS))).close()
        pool = RankPool(world, timeout=600, threads=1)
    results = pool.run(fn, *args, timeout=timeout)  # a failed call closes its pool
    _POOLS[world] = pool
    return results


def dual_scope_inputs(case, dtype, *, poison=float("nan"), seed=0, device="cpu"):
    """Inputs of a dual-scope attention case ``(B, F, T, H, D, window, pad, valid_left,
    valid_right, Ng)``, with ``poison`` in every key/value frame that does not exist.
    Returns ``((q, k, v, k_global, v_global), mask kwargs, T)``."""
    B, F, T, H, D, w, pad, vl, vr, Ng = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, F * T, H, D, generator=g)
    k = torch.randn(B, (F + 2 * pad) * T, H, D, generator=g)
    v = torch.randn(B, (F + 2 * pad) * T, H, D, generator=g)
    kf = torch.arange(k.shape[1]) // T
    invalid = (kf < pad - vl) | (kf >= pad + F + vr)
    k[:, invalid] = poison
    v[:, invalid] = poison
    kg = torch.randn(B, Ng, H, D, generator=g) if Ng else None
    vg = torch.randn(B, Ng, H, D, generator=g) if Ng else None
    cast = lambda t: None if t is None else t.to(device, dtype)
    return ((cast(q), cast(k), cast(v), cast(kg), cast(vg)),
            dict(window=w, pad=pad, valid_left=vl, valid_right=vr), T)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def assert_lossless_videos_agree(video, ref_video, frames, ref_frames, name=""):
    """Two mp4s written losslessly (``crf=0``: x264's lossless mode, yuv420p) from ``frames``
    and ``ref_frames`` ((N, H, W, 3) uint8, the decoded frames before the encoder): they may
    differ only as far as the frames do, carried through the colour conversion. A value one
    level off moves its pixel's luma and its 2x2 block's two chroma samples by at most a level
    each (rounded), and each decoded value is luma x 1.164 plus chroma terms up to 2.018 and
    0.813 (BT.601): at most 4 levels, in at most the 12 values of that 2x2 block."""
    import numpy as np
    d = np.abs(frames.astype(int) - ref_frames.astype(int))
    v = np.abs(video.astype(int) - ref_video.astype(int))
    assert video.shape == ref_video.shape == frames.shape, name
    assert v.max() <= 4 * d.max(), (name, v.max(), d.max())
    assert v.mean() <= 12 * 4 * d.mean() + 1e-12, (name, v.mean(), d.mean())
