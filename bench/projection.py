"""Scaling projection for bench/throughput.py --project: step time and efficiency on G GPUs.

Inputs measured in the same benchmark run: the overlap mode's last step, exchange by
exchange (kind, bytes and frames received, and the compute window between posting the
exchange and waiting for it), the loopback run's step time (compute without communication),
and the run's layout. The model:

    compute(G)   = ms per frame-step on the target GPU x frames per GPU
    exchange i   = latency + bytes_i(G) / link bandwidth   (p2p; an all-reduce: its latency)
    overlap      : exposed_i = max(0, exchange_i - window_i), window_i scaled from the run by
                   compute(G) / compute(run): each layer keeps its share of the step
    blocking     : the published pattern rebuilt per exchange from the same measured per-frame
                   bytes (K and V separately, one transfer per peer, halos per conv, global
                   frames all-gathered), every launch followed by a device sync; all exposed
    stale        : nothing waits on a peer after the first step; exposed = 0 (each block's
                   batch has nearly a step to arrive); overlap's bytes, the run's launches
    bytes_i(G)   = measured bytes per frame x the frames the busiest rank receives under the
                   target layout (halos on both sides, non-owned global frames), rescaled from
                   the run's latent size and element size to the target's

Every constant that is not measured here is listed in ASSUMPTIONS and printed with the result.
"""
from __future__ import annotations

import math
import re
from typing import NamedTuple

from vinf_engine import ClipLayout, global_frames
from vinf_engine.comm import frame_plan
from vinf_engine.layout import attention_plan, halo_wants

# Measured on one H200 by ../shared/peers (SPEC.md section 5): eager diffusers UNet3D 1.41B,
# 320x512 (latent 40x64), bf16, classifier-free guidance batch 2.
GPUS = {"H200": dict(ms_per_frame_step=6.95, latent_hw=(40, 64), elem_bytes=2,
                     source="SPEC.md s.5: eager diffusers UNet3D 1.41B at 320x512, bf16, CFG 2, "
                            "one H200 (peers/unet_profile.py, 2026-11-28)")}

# Nominal link figures (not measured here): GB/s each way per GPU, per-message latency.
LINKS = {
    "nvlink": dict(gbps=450.0, latency_us=10.0, what="NVLink 4 (H200 HGX): 900 GB/s per GPU, 450 each way"),
    "ib": dict(gbps=50.0, latency_us=20.0, what="InfiniBand NDR 400 Gb/s per GPU"),
    "pcie": dict(gbps=25.0, latency_us=15.0, what="PCIe 4.0 x16, practical"),
}
ALLREDUCE_LATENCY_US = 20.0     # small-message NCCL all-reduce, per launch (assumed)
DEVICE_SYNC_US = 30.0           # a host-device synchronisation: queue drain + refill (assumed)
CONTROL_MS = 0.2                # the per-step CPU agreement over gloo (assumed)

ASSUMPTIONS = [
    "compute per frame-step on the target GPU: " + GPUS["H200"]["source"] + " = 6.95 ms",
    "compute scales linearly with frames per GPU; each exchange's overlap window keeps the share "
    "of the step it had in the measured run",
    "links (nominal, not measured): " + "; ".join(f"{k}: {v['what']}, {v['latency_us']:g} us" for k, v in LINKS.items()),
    f"small all-reduce {ALLREDUCE_LATENCY_US:g} us, device sync {DEVICE_SYNC_US:g} us, "
    f"control agreement {CONTROL_MS:g} ms per step",
    "the busiest rank (two neighbours) sets the step time",
]


def parse_target(spec: str) -> tuple[int, str, str]:
    """'8xH200' or '8xH200:ib' -> (8, 'H200', 'nvlink' | link)."""
    m = re.fullmatch(r"(\d+)x([A-Za-z0-9]+)(?::([a-z]+))?", spec.strip())
    if not m:
        raise ValueError(f"--project must look like 8xH200 or 16xH200:ib, got {spec!r}")
    gpus, gpu, link = int(m.group(1)), m.group(2).upper(), m.group(3) or "nvlink"
    if gpu not in GPUS:
        raise ValueError(f"--project: no measured compute profile for {gpu} (have {list(GPUS)})")
    if link not in LINKS:
        raise ValueError(f"--project: link must be one of {list(LINKS)}, got {link!r}")
    if gpus < 1:
        raise ValueError("--project: at least one GPU")
    return gpus, gpu, link


def _busiest(layout: ClipLayout) -> int:
    return 1 if layout.world_size > 2 else 0


def _remote(layout, rank, wants) -> int:
    plan = frame_plan(layout, rank, wants)
    return plan.n_out - len(plan.local_pos)


class _Target(NamedTuple):
    """The target run as its busiest rank sees it: its compute, the scales from the measured
    run, and the remote frames it receives per exchange, the engine's and the published
    pattern's."""
    rank: int
    compute_ms: float
    byte_scale: float        # measured bytes -> the target's latent area and element size
    window_scale: float      # measured overlap windows -> the target's compute
    att_frames: int          # engine: an attention context exchange (halos, global frames)
    conv_frames: int         # engine: a temporal conv stack's halo (4 convs deep)
    halo_frames: int         # published: the attention window's halo
    one_frame_halo: int      # published: one conv's one-frame halo
    gather_frames: int       # published: the global frames all-gathered from the others
    peers_halo: int          # neighbours (1 or 2)
    has_global: bool


def _target(run: dict, gpus: int, prof: dict, loop: dict, frames_per_gpu: int) -> _Target:
    cfg = run["config"]
    # Rescale measured bytes to the target's latent area and element size.
    (h, w), (th, tw) = run["latent_hw"], prof["latent_hw"]
    elem = 4 if run["dtype"] == "float32" else 2
    byte_scale = (th * tw) / (h * w) * prof["elem_bytes"] / elem
    layout = ClipLayout(gpus * frames_per_gpu, gpus)
    r = _busiest(layout)
    compute_ms = prof["ms_per_frame_step"] * frames_per_gpu
    run_compute_ms = loop["seconds"] / run["steps"] * 1e3
    wa = attention_plan(layout, r, cfg["window"], cfg["num_global"]).wants
    g = global_frames(layout.num_frames, cfg["num_global"])
    owned = [sum(layout.owner(f) == q for f in g) for q in range(gpus)]
    return _Target(
        rank=r, compute_ms=compute_ms, byte_scale=byte_scale,
        window_scale=compute_ms / run_compute_ms, att_frames=_remote(layout, r, wa),
        conv_frames=_remote(layout, r, halo_wants(layout, 4)),
        halo_frames=_remote(layout, r, halo_wants(layout, min(cfg["window"], layout.num_frames - 1))),
        one_frame_halo=_remote(layout, r, halo_wants(layout, 1)),
        gather_frames=(gpus - 1) * max(owned) if g else 0,
        peers_halo=sum(1 for q in (r - 1, r + 1) if 0 <= q < gpus), has_global=bool(g))


def _price(exchanges: list, t: _Target, lk: dict) -> tuple:
    """Exposed ms, bytes and launches per mode of one step's ``exchanges`` on link ``lk``."""
    bw = lk["gbps"] * 1e6                      # bytes per ms
    lat = lk["latency_us"] / 1e3
    ar = ALLREDUCE_LATENCY_US / 1e3
    sync = DEVICE_SYNC_US / 1e3
    exposed = {"overlap": 0.0, "blocking": 0.0, "stale": 0.0}
    bytes_ = {"overlap": 0.0, "blocking": 0.0}
    launches = {"overlap": 0, "blocking": 0}
    for e in exchanges:
        win = e["window_ms"] * t.window_scale
        if e["frames"] == 0 and e["bytes_received"] > 0:          # statistics all-reduce
            tt = ar + e["bytes_received"] / bw
            exposed["overlap"] += max(0.0, tt - win)
            exposed["blocking"] += tt + sync
            launches["overlap"] += 1
            launches["blocking"] += 1
            continue
        if e["frames"] == 0:
            continue
        stats = e.get("sums_bytes", 0)
        if stats:
            # GroupNorm partials riding in this exchange (overlap: no launch of their own);
            # the published pattern all-reduces them apart, blocking, with a sync.
            exposed["blocking"] += ar + stats / bw + sync
            launches["blocking"] += 1
        per_frame = (e["bytes_received"] - stats) / e["frames"] * t.byte_scale
        if "attention" in e["kind"]:
            b = per_frame * t.att_frames
            # published: K and V halos from each neighbour, K and V global frames all-gathered
            bb = 2 * per_frame * t.halo_frames + (2 * per_frame * t.gather_frames)
            nb = 2 * t.peers_halo + (2 if t.has_global else 0)
        else:
            b = per_frame * t.conv_frames
            # published: a one-frame halo from each neighbour before each of the 4 convs
            bb = 4 * per_frame * t.one_frame_halo
            nb = 4 * t.peers_halo
        tt = lat + b / bw
        exposed["overlap"] += max(0.0, tt - win)
        exposed["blocking"] += nb * (lat + sync) + bb / bw
        bytes_["overlap"] += b
        bytes_["blocking"] += bb
        launches["overlap"] += 1
        launches["blocking"] += nb
    return exposed, bytes_, launches


def project(run: dict, gpus: int, gpu: str, link: str, frames_per_gpu: int) -> dict:
    """Projected step of ``gpus`` GPUs from a throughput report ``run`` (see module doc)."""
    prof, lk = GPUS[gpu], LINKS[link]
    rows = {r["mode"]: r for r in run["rows"] if r.get("ranks", 0) > 1 and "error" not in r}
    if "overlap" not in rows or "loopback" not in rows:
        raise ValueError("the projection needs the overlap and loopback modes in the same run")
    t = _target(run, gpus, prof, rows["loopback"], frames_per_gpu)
    exposed, bytes_, launches = _price(rows["overlap"]["exchanges_last_step"], t, lk)
    if "stale" in rows:
        # The same frames and statistics as overlap, posted as one batch per model block
        # (the measured launches) and read a step later.
        bytes_["stale"] = bytes_["overlap"]
        launches["stale"] = round(rows["stale"].get("collectives_per_step", 0))
    compute_ms = t.compute_ms
    out = dict(gpus=gpus, gpu=gpu, link=link, frames_per_gpu=frames_per_gpu,
               compute_ms=compute_ms, byte_scale=t.byte_scale, window_scale=t.window_scale,
               busiest_rank=t.rank, modes={})
    for mode, ex in exposed.items():
        step = compute_ms + ex + (CONTROL_MS if gpus > 1 else 0.0)
        if gpus == 1:
            step, ex = compute_ms, 0.0
        out["modes"][mode] = dict(
            step_ms=step, exposed_ms=ex, exposed_share=ex / step,
            efficiency=compute_ms / step,
            frame_steps_per_s=gpus * frames_per_gpu / step * 1e3,
            mib_received_per_step=(bytes_.get(mode, float("nan")) / 2**20) if gpus > 1 else 0.0,
            launches_per_step=launches.get(mode))
    return out


def sweep(run: dict, gpu: str, frames_per_gpu: int, counts=(1, 2, 4, 8, 16, 32)) -> list:
    return [project(run, n, gpu, link, frames_per_gpu) for link in LINKS for n in counts]


def plot(points: list, target: tuple, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"overlap": "-", "blocking": "--", "stale": ":"}
    colors = {"nvlink": "tab:green", "ib": "tab:blue", "pcie": "tab:red"}
    for link in LINKS:
        for mode, ls in styles.items():
            pts = [(p["gpus"], p["modes"][mode]["efficiency"]) for p in points if p["link"] == link]
            ax.plot([x for x, _ in pts], [y for _, y in pts], ls, color=colors[link], marker="o",
                    ms=3, label=f"{link}, {mode}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("GPUs")
    ax.set_ylabel("scaling efficiency (compute / step time)")
    low = min(p["modes"][m]["efficiency"] for p in points for m in styles)
    ax.set_ylim(max(0.0, min(0.8, low - 0.05)), 1.01)
    ax.grid(True, alpha=0.3)
    ax.set_title(f"vinf_engine projected scaling, {target[1]}, {points[0]['frames_per_gpu']} frames/GPU")
    ax.legend(fontsize=7, ncol=3, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_projection(p: dict):
    print(f"\nprojection: {p['gpus']} x {p['gpu']} over {p['link']}, {p['frames_per_gpu']} frames "
          f"per GPU ({p['gpus'] * p['frames_per_gpu']} in all); compute {p['compute_ms']:.0f} ms/step")
    print(f"{'mode':<10}{'step ms':>10}{'exposed ms':>12}{'exposed %':>11}{'efficiency':>12}"
          f"{'MiB recv':>10}{'launches':>10}")
    for mode, m in p["modes"].items():
        mib = "-" if math.isnan(m["mib_received_per_step"]) else f"{m['mib_received_per_step']:.0f}"
        la = "-" if m["launches_per_step"] is None else str(m["launches_per_step"])
        print(f"{mode:<10}{m['step_ms']:>10.1f}{m['exposed_ms']:>12.2f}{100 * m['exposed_share']:>10.2f}%"
              f"{m['efficiency']:>12.3f}{mib:>10}{la:>10}")
    print("assumptions:")
    for a in ASSUMPTIONS:
        print("  - " + a)
    print(f"  - measured bytes rescaled x{p['byte_scale']:.3g} (latent area, element size); "
          f"overlap windows x{p['window_scale']:.3g} (target compute / run compute)")
