"""The main benchmark: a long video denoised by the clip-parallel engine, side by side with the
same algorithm on one rank and with plain diffusers on the whole video, in one run.

    python bench/throughput.py                      # CPU: tiny random UNet3D, 2 gloo ranks
    python bench/throughput.py --device cuda        # GPUs: 1.41B ModelScope/VideoCrafter2 shape,
                                                    # 320x512, bf16, one rank per GPU (NCCL)
    python bench/throughput.py --model ltx          # a video DiT (wan, ltx, cogvideox, hunyuan,
                                                    # skyreels): bench/dit_throughput.py

Reports frame-steps per second, peak memory per rank, collectives and bytes per UNet step, and
how far the R-rank output is from the 1-rank output (partition invariance). Writes JSON.
Weights are random (never downloaded): the timings do not depend on their values.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

import vinf_engine as vinf
from vinf_engine.scheduler import MODES

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # already so when run as a script
import harness  # noqa: E402  (bench/harness.py, beside this script)
import projection  # noqa: E402

# The DiT families of bench/dit_throughput.py (``--model <family>``), named here so that the
# UNet run does not import it.
DIT_FAMILIES = ("wan", "ltx", "cogvideox", "hunyuan", "skyreels")

PRESETS = {
    # Four levels like the real model, narrow channels: every operator the engine replaces
    # runs at every level, in about a minute per configuration on 2 CPU cores.
    "tiny": dict(
        unet=dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, cross_attention_dim=32,
                  attention_head_dim=8, norm_num_groups=8),
        latent_hw=(24, 24), text_len=8, frames=48, steps=4, dtype="float32"),
    # ModelScope T2V / Zeroscope / VideoCrafter2 UNet (1.41B) at 320x512 (latent 40x64).
    "modelscope": dict(
        unet=dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                  cross_attention_dim=1024, attention_head_dim=64, norm_num_groups=32),
        latent_hw=(40, 64), text_len=77, frames=64, steps=5, dtype="bfloat16"),
}


def build_unet(preset: dict, device, dtype):
    from diffusers import UNet3DConditionModel
    from diffusers.utils import logging as dlogging
    dlogging.set_verbosity_error()
    torch.manual_seed(0)
    m = UNet3DConditionModel(**unet_kwargs(preset))
    # diffusers zero-initialises the last conv of each temporal conv stack; give it values
    # so that the temporal path is not an identity in the output comparison.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return m.to(device=device, dtype=dtype).eval()


def round_floor(preset: dict, sync_groupnorm: bool = True) -> dict:
    """How many dependent communication rounds one exact UNet step needs, from the model's
    structure (built on the meta device: no memory, no weights).

    A round is data one rank needs from others that exists only after its previous round:
    every whole-video GroupNorm's statistics depend on every rank's previous layer, and every
    temporal attention's context on the layer's input. Without recomputing other ranks'
    frames, each temporal conv stack needs one round per GroupNorm (its halo rides with the
    first; the engine does this) and each temporal transformer one per attention (its
    GroupNorm could ride with the first attention's context; the engine keeps it apart so
    that the context is in flight during the projections and the halo-free attention).
    Each round is at least one collective launch."""
    from diffusers import UNet3DConditionModel
    from diffusers.models.resnet import TemporalConvLayer
    from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel
    with torch.device("meta"):
        m = UNet3DConditionModel(**unet_kwargs(preset))
    convs = [m_ for m_ in m.modules() if isinstance(m_, TemporalConvLayer)]
    ttms = [m_ for m_ in m.modules() if isinstance(m_, TransformerTemporalModel)]
    conv_gn = sum(sum(1 for i in range(1, 9) if hasattr(c, f"conv{i}")) for c in convs)
    attns = sum(sum((b.attn1 is not None) + (b.attn2 is not None) for b in t.transformer_blocks)
                for t in ttms)
    conv_rounds = conv_gn if sync_groupnorm else len(convs)
    return dict(temporal_conv_stacks=len(convs), conv_groupnorms=conv_gn,
                temporal_transformers=len(ttms), temporal_attentions=attns,
                floor=conv_rounds + attns,
                engine=conv_rounds + attns + (len(ttms) if sync_groupnorm else 0))


def unet_kwargs(preset: dict) -> dict:
    return dict(sample_size=preset["latent_hw"][0], in_channels=4, out_channels=4,
                down_block_types=("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",),
                up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3, **preset["unet"])


def denoise(rank, world, opts):
    """One rank's share: its clip of the video through ``steps`` CFG denoising steps, once per
    communication mode asked for (the same model, parallelized anew for each)."""
    from diffusers import DPMSolverMultistepScheduler
    preset = PRESETS[opts["preset"]]
    device = torch.device(f"cuda:{rank}" if opts["device"] == "cuda" else "cpu")
    dtype = getattr(torch, preset["dtype"])
    frames, steps = opts["frames"], opts["steps"]
    h, w = opts["latent_hw"]
    model = build_unet(preset, device, dtype)
    layout = vinf.ClipLayout(frames, world)
    g = torch.Generator().manual_seed(opts["seed"] + 1)
    text = torch.randn(2, preset["text_len"], preset["unet"]["cross_attention_dim"],
                       generator=g).to(device, dtype)          # (uncond, cond) embeddings
    guidance = 9.0
    results = {}
    for mode in opts["modes"]:
        if mode != "diffusers":
            vinf.parallelize(model, vinf.DualScopeConfig(**opts["config"]), comm_mode=mode)
        engine = getattr(model, "vinf_engine", None)
        latents = vinf.initial_noise(opts["seed"], (1, 4, frames, h, w), layout.frames(rank),
                                     device=device, dtype=dtype)
        sched = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++")
        sched.set_timesteps(steps)           # CPU timesteps: reading them costs no device sync

        def unet(x, t):
            eps = model(torch.cat([x, x]), t, encoder_hidden_states=text).sample
            uncond, cond = eps.chunk(2)
            return uncond + guidance * (cond - uncond)

        with torch.no_grad():
            unet(latents, sched.timesteps[0])                   # warm-up, not timed
            harness.sync(device, world)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            if engine is not None:
                engine.comm.counters.reset()
            log = []
            t0 = time.perf_counter()
            for i, t in enumerate(sched.timesteps):
                if engine is not None and i == len(sched.timesteps) - 1:
                    engine.scheduler.record = True              # log the last step's exchanges
                latents = sched.step(unet(latents, t), t, latents).prev_sample
            harness.sync(device, world)
            seconds = time.perf_counter() - t0
            if engine is not None:
                engine.scheduler.record = False
                log = engine.scheduler.take_log()
        from vinf_engine.ops import dispatch
        results[mode] = dict(
            seconds=seconds, peak_mib=harness.peak_memory_mib(device), log=log,
            backends=dispatch.summary(),
            counters=engine.comm.counters.snapshot() if engine is not None else None,
            latents=latents.float().cpu())
        if engine is not None:
            vinf.unparallelize(model)
    return results


def run(label, modes, world, opts, threads):
    """Spawn ``world`` ranks running every mode in ``modes``: one table row per mode, and the
    whole video's final latents by row name (for the comparisons; not in the JSON)."""
    backend = "nccl" if opts["device"] == "cuda" else "gloo"
    res, error = harness.spawn(denoise, world, dict(opts, modes=modes), label=label,
                               backend=backend, threads=threads, timeout=3600)
    if error is not None:
        return [dict(name=f"{label}, {m}" if m != "diffusers" else label, mode=m, ranks=world,
                     error=error) for m in modes], {}
    rows, latents = [], {}
    per = opts["steps"]      # one UNet call per denoising step (CFG rides in the batch)
    for mode in modes:
        rr = [r[mode] for r in res]
        wall = max(r["seconds"] for r in rr)
        name = label if mode == "diffusers" else f"{label}, {mode}"
        row = dict(name=name, mode=mode, ranks=world, threads_per_rank=threads,
                   frames=opts["frames"], steps=per, seconds=wall,
                   frame_steps_per_s=opts["frames"] * per / wall,
                   peak_mib_per_rank=[round(r["peak_mib"], 1) for r in rr],
                   backends=rr[0]["backends"])
        if rr[0]["counters"] is not None:
            c = [r["counters"] for r in rr]
            row["collectives_per_step"] = max(x["collectives"] for x in c) / per
            row["p2p_ops_per_step"] = max(x["p2p_ops"] for x in c) / per
            row["device_syncs_per_step"] = max(x["device_syncs"] for x in c) / per
            row["control_per_step"] = max(x["control"] for x in c) / per
            row["mib_sent_per_step"] = max(x["bytes_sent"] for x in c) / per / 2**20
            row["mib_received_per_step"] = max(x["bytes_received"] for x in c) / per / 2**20
            row["exchanges_last_step"] = rr[0]["log"]           # rank 0's, for --project
        latents[name] = torch.cat([r["latents"] for r in rr], dim=2)
        rows.append(row)
        print(f"  {name}: {wall:.2f} s", flush=True)
    return rows, latents


# ------------------------------------------------------------------------------ parse
@dataclasses.dataclass
class Plan:
    """The command line, resolved: defaults by device and preset, checked before any spawn."""
    args: argparse.Namespace
    opts: dict            # what every rank receives (see denoise)
    ranks: int
    modes: list
    target: tuple | None  # --project's (gpus, gpu, link)
    out: str


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("unet3d",) + DIT_FAMILIES, default="unet3d",
                    help="unet3d: this benchmark; a DiT family (wan: Wan 2.1, ltx, cogvideox, "
                         "hunyuan, skyreels) at 1x/2x/4x its trained length "
                         "(bench/dit_throughput.py; --model wan --help for its options)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--preset", choices=tuple(PRESETS), default=None,
                    help="model shape (default: tiny on cpu, modelscope on cuda)")
    ap.add_argument("--frames", type=int, default=None, help="frames of the whole video (latent)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps")
    ap.add_argument("--ranks", type=int, default=None,
                    help="ranks for the engine (default: 2 on cpu, every GPU on cuda)")
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--num-global", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default="overlap,blocking,stale,loopback",
                    help="communication modes of the R-rank engine, comma-separated "
                         "(loopback = exchanges replaced by local copies: the no-comm baseline)")
    ap.add_argument("--latent", default=None,
                    help="latent HxW, e.g. 8x8 (default: the preset's; 40x64 for modelscope)")
    ap.add_argument("--skip-diffusers", action="store_true", help="leave out plain diffusers")
    ap.add_argument("--project", default=None, metavar="GxGPU[:link]",
                    help="also project step time and scaling to e.g. 8xH200 (links: nvlink, ib, "
                         "pcie) from this run's measured exchanges; writes a PNG plot")
    ap.add_argument("--project-frames-per-gpu", type=int, default=64)
    ap.add_argument("--out", default=None, help="JSON path (default bench/out/throughput-<device>.json)")
    return ap


def parse(argv) -> Plan:
    ap = parser()
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    preset_name = a.preset or ("tiny" if a.device == "cpu" else "modelscope")
    preset = PRESETS[preset_name]
    ranks = a.ranks or (2 if a.device == "cpu" else torch.cuda.device_count())
    if a.device == "cuda" and ranks > torch.cuda.device_count():
        ap.error(f"--ranks {ranks}: only {torch.cuda.device_count()} GPUs (one rank per GPU)")
    frames = a.frames or preset["frames"]
    steps = a.steps or preset["steps"]
    if frames < ranks:
        ap.error(f"--frames {frames} is fewer than --ranks {ranks}")
    config = dict(window=a.window, num_global=a.num_global)
    vinf.DualScopeConfig(**config)                             # validate before spawning
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    target = None
    if a.project:
        try:
            target = projection.parse_target(a.project)
        except ValueError as e:
            ap.error(str(e))
        if ranks < 2 or not {"overlap", "loopback"} <= set(modes):
            ap.error("--project needs --ranks >= 2 and the overlap and loopback modes")
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"--modes: unknown {bad}; choose from {MODES}")
    latent_hw = preset["latent_hw"]
    if a.latent:
        try:
            latent_hw = harness.parse_hw(a.latent)
        except ValueError:
            ap.error(f"--latent must look like 8x8, got {a.latent!r}")
    opts = dict(device=a.device, preset=preset_name, frames=frames, steps=steps, seed=a.seed,
                config=config, latent_hw=latent_hw)
    out = a.out or harness.out_path(f"throughput-{a.device}.json")
    return Plan(a, opts, ranks, modes, target, out)


# ------------------------------------------------------------------------------ measure
def measure(plan: Plan):
    """The engine on R ranks (every mode), on 1 rank, and plain diffusers on the whole video;
    each spawn's rows go to disk as soon as they exist. Returns (rows, latents by row name)."""
    a, o = plan.args, plan.opts
    cores = os.cpu_count() or 1
    one = None if a.device == "cuda" else cores                # threads for a lone process
    each = None if a.device == "cuda" else max(1, cores // plan.ranks)
    print(f"vinf_engine throughput: {o['preset']} UNet3D, {o['frames']} frames, {o['steps']} "
          f"steps, {a.device}, window {a.window}, {a.num_global} global frames", flush=True)
    report = harness.Rows(plan.out, dict(benchmark="throughput", complete=False, device=a.device,
                                         preset=o["preset"], frames=o["frames"],
                                         steps=o["steps"], rows=[]))
    latents = {}

    def measured(new):
        rows, lat = new
        latents.update(lat)
        for r in rows:
            print(f"  {r['name']}: " + (r["error"][:200] if "error" in r else
                                        f"{r['seconds']:.2f} s, {r['frame_steps_per_s']:.2f} "
                                        "frame-steps/s"), flush=True)
        report.add(*rows)
    if plan.ranks > 1:
        measured(run(f"engine {plan.ranks} ranks", plan.modes, plan.ranks, o, each))
    measured(run("engine 1 rank", ["overlap"], 1, o, one))
    if not a.skip_diffusers:
        measured(run("diffusers, whole video", ["diffusers"], 1, o, one))
    return report.rows, latents


def compare(rows, latents, ranks, steps):
    """Partition invariance (R ranks against 1, exact), the stale mode's drift from exact, and
    each R-rank row's exposed communication (its step time over the loopback run's).
    Returns (invariance, stale drift), None where a row is missing."""
    one_rank = latents.get("engine 1 rank, overlap")
    exact = latents.get(f"engine {ranks} ranks, overlap")
    stale = latents.get(f"engine {ranks} ranks, stale")
    invariance = stale_drift = None
    if one_rank is not None and exact is not None:
        invariance = harness.rel_diff(exact, one_rank)
    if stale is not None and (exact is not None or one_rank is not None):
        stale_drift = harness.rel_diff(stale, exact if exact is not None else one_rank)
    ok = {r["name"]: r for r in rows if "error" not in r}
    loop = ok.get(f"engine {ranks} ranks, loopback")
    for r in rows:
        if loop and "error" not in r and r["mode"] in ("overlap", "blocking", "stale") and r["ranks"] == ranks:
            r["exposed_comm_ms_per_step"] = (r["seconds"] - loop["seconds"]) / steps * 1e3
    return invariance, stale_drift


# ------------------------------------------------------------------------------ report
COLUMNS = [("run", 30), ("s", 8), ("frame-steps/s", 15), ("peak MiB/rank", 15), ("launches", 10),
           ("syncs", 7), ("MiB sent", 10), ("MiB recv", 10), ("exposed ms", 12)]


def build_report(plan: Plan, rows, invariance, stale_drift) -> dict:
    o = plan.opts
    return dict(benchmark="throughput", **harness.environment(o["device"]), preset=o["preset"],
                frames=o["frames"], steps=o["steps"], latent_hw=o["latent_hw"],
                dtype=PRESETS[o["preset"]]["dtype"], config=o["config"], rows=rows,
                max_rel_diff_R_ranks_vs_1_rank=invariance,
                stale_max_rel_drift_vs_exact=stale_drift, complete=True)


def print_rows(rows):
    def cells(r):
        if "error" in r:
            return [r["name"], r["error"][:60]]
        col = lambda key, spec: harness.fmt(r.get(key), spec)       # noqa: E731
        return [r["name"], f"{r['seconds']:.2f}", f"{r['frame_steps_per_s']:.2f}",
                f"{max(r['peak_mib_per_rank']):.0f}", col("collectives_per_step", ".0f"),
                col("device_syncs_per_step", ".0f"), col("mib_sent_per_step", ".2f"),
                col("mib_received_per_step", ".2f"), col("exposed_comm_ms_per_step", ".1f")]
    print()
    harness.print_table(COLUMNS, [cells(r) for r in rows], suffix="   (per step)")


def print_summary(plan: Plan, report: dict):
    """The table and what it means; adds the round floor (from the model's structure) to
    ``report``."""
    print_rows(report["rows"])
    invariance = report["max_rel_diff_R_ranks_vs_1_rank"]
    stale_drift = report["stale_max_rel_drift_vs_exact"]
    if invariance is not None:
        print(f"\nmax |out(R={plan.ranks}, overlap) - out(R=1)| / max |out(R=1)| = {invariance:.2e}")
    if stale_drift is not None:
        print(f"stale mode drift from exact: max rel {stale_drift:.2e}")
    fl = report["round_floor"] = round_floor(PRESETS[plan.opts["preset"]])
    print(f"dependent rounds per exact step (each >= 1 launch): floor {fl['floor']} = "
          f"{fl['conv_groupnorms']} GroupNorms in {fl['temporal_conv_stacks']} temporal conv "
          f"stacks + {fl['temporal_attentions']} temporal attentions; the overlap mode takes "
          f"{fl['engine']} (+1 GroupNorm per temporal transformer, kept apart to overlap its "
          f"context)")
    print("launches: data-plane collectives (one batch of p2p transfers = 1); exposed: step time "
          "minus the loopback run's (exchanges replaced by local copies of the same size)")
    mem_note = ("GPU max_memory_allocated" if plan.opts["device"] == "cuda" else
                "peak RSS of the rank's process")
    print(f"peak memory: {mem_note}; collectives count data-plane launches (one batched p2p = 1)")


def add_projection(plan: Plan, report: dict):
    """--project: step time and scaling on the target GPUs from this run's exchanges, printed,
    plotted and added to ``report``."""
    target, per_gpu = plan.target, plan.args.project_frames_per_gpu
    if plan.opts["preset"] == "tiny":
        print("\nnote: projecting from the tiny preset's exchanges; use --preset modelscope "
              "(e.g. with --latent 8x8 on a CPU) for the 1.41B model's bytes")
    p = projection.project(report, *target, per_gpu)
    projection.print_projection(p)
    points = projection.sweep(report, target[1], per_gpu)
    png = os.path.splitext(plan.out)[0] + f"-scaling-{target[0]}x{target[1]}.png"
    projection.plot(points, target, png)
    report["projection"] = dict(target=p, sweep=points, assumptions=projection.ASSUMPTIONS,
                                plot=png)
    print(f"wrote {png}")


def main(argv=None):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", choices=("unet3d",) + DIT_FAMILIES, default="unet3d")
    known, rest = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    if known.model != "unet3d":                # a DiT family: bench/dit_throughput.py
        import dit_throughput
        return dit_throughput.main(["--family", known.model, *rest])
    plan = parse(argv)
    rows, latents = measure(plan)
    report = build_report(plan, rows, *compare(rows, latents, plan.ranks, plan.opts["steps"]))
    print_summary(plan, report)
    if plan.target is not None:
        add_projection(plan, report)
    harness.write_json(plan.out, report)
    print(f"wrote {plan.out}")
    failed = [r for r in rows if "error" in r and r["error"] != "out of memory"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
