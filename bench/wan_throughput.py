"""The main benchmark's Wan mode: a Wan 2.1 DiT (``WanTransformer3DModel``) denoising a video of
1x, 2x and 4x its trained length (21 latent frames: 21, 42, 84), four ways side by side:

    engine R ranks        vinf_engine.parallelize(transformer, DualScopeConfig(window, num_global))
                          on R ranks (gloo on CPU, NCCL on GPUs), each rank its own clip
    engine 1 rank         the same algorithm in one process (the partition-invariance oracle)
    diffusers dense       stock WanTransformer3DModel, dense attention over the whole video
    diffusers Ulysses     diffusers' own context parallelism (ContextParallelConfig(ulysses_degree=R)
                          + enable_parallelism), R ranks; ring attention: see RING_ON_CPU

    python bench/throughput.py --model wan                  # CPU: small random Wan, 2 gloo ranks
    python bench/throughput.py --model wan --device cuda    # GPUs: Wan2.1-T2V-1.3B shape, 480x832, bf16
    python bench/wan_throughput.py ...                      # the same, directly

Per row (one method at one length): seconds per denoising step (classifier-free guidance as
batch 2, flow-matching Euler, ``--steps`` timed steps after one untimed warm-up forward), the
per-frame cost (rank-seconds per frame-step: step time x ranks / frames) and its ratio to dense
at the same length and to the same method at 1x, peak memory per rank, bytes sent / received
per rank per step, and for the engine rows the relative difference between the R-rank and the
1-rank outputs (partition invariance). Each row is printed and added to the JSON file as soon
as it is measured (a run cut short keeps its rows); the figures that compare rows are added
when both rows exist. Weights are random (never downloaded): timings do not depend on them.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
import warnings

import torch

import vinf_engine as vinf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench/: the shared harness
import harness  # noqa: E402
from harness import fmt, peak_memory_mib, rel_diff  # noqa: E402

# Every WanTransformer3DModel here is Wan 2.1's shape except for the sizes the presets set.
WAN21 = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, cross_attn_norm=True,
             qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
PRESETS = {
    # For the test: seconds, not minutes (use it with --frames 3,6,12 or so).
    "tiny": dict(model=dict(num_layers=1, num_attention_heads=2, attention_head_dim=16,
                            ffn_dim=32, text_dim=16, freq_dim=16),
                 latent_hw=(4, 4), text_len=4, steps=1, dtype="float32"),
    # The CPU default: 64 tokens per latent frame, 2 x 64-dim heads, so that attention matters:
    # SDPA is 36% / 53% / 68% of a dense forward at 21 / 42 / 84 frames (measured, one thread;
    # the 1.3B model on an H200: 58% / 73% at 21 / 42, SPEC 5). About a minute in all.
    "cpu": dict(model=dict(num_layers=2, num_attention_heads=2, attention_head_dim=64,
                           ffn_dim=512, text_dim=64, freq_dim=64),
                latent_hw=(16, 16), text_len=16, steps=3, dtype="float32"),
    # diffusers' Wan2.1-T2V-1.3B config at 480x832 (latent 60x104: 1,560 tokens per frame).
    "wan2.1-1.3b": dict(model=dict(num_layers=30, num_attention_heads=12, attention_head_dim=128,
                                   ffn_dim=8960, text_dim=4096, freq_dim=256),
                        latent_hw=(60, 104), text_len=512, steps=2, dtype="bfloat16"),
}
GUIDANCE = 5.0          # Wan 2.1 T2V's default
FLOW_SHIFT = 3.0        # Wan 2.1's flow shift at 480p

METHODS = ("engine", "engine1", "dense", "ulysses", "ring")
DEFAULT_METHODS = "engine,engine1,dense,ulysses"
MULTI = ("engine", "ulysses", "ring")          # run on R ranks; the others on one
LABELS = {"engine": "engine {R} ranks", "engine1": "engine 1 rank", "dense": "diffusers dense",
          "ulysses": "diffusers Ulysses {R} ranks", "ring": "diffusers ring {R} ranks"}

# What diffusers 0.42.1's context parallelism needs to run on CPU processes joined by gloo,
# found by running it (bench/wan_throughput.py, method "ulysses"):
#  1. ModelMixin._resolve_parallel_config does
#         device = torch.device(torch._C._get_accelerator().type, rank % torch.accelerator.device_count())
#     On a CPU-only torch the accelerator is "cpu" but device_count() is 0: ZeroDivisionError.
#     We patch torch.accelerator.device_count to return 1 while enable_parallelism runs. The
#     device type stays "cpu", so init_device_mesh builds a CPU DeviceMesh over the gloo world
#     group, and the collectives (functional all_to_all_single, all_gather_tensor) run on gloo.
#  2. The attention backend must support context parallelism and run on CPU: only "native"
#     (torch SDPA) does. It does not return the log-sum-exp, so it serves Ulysses but not ring.
#  3. The model must be called with return_dict=False: the split hook on the root module checks
#     in its post_forward that the output is a tensor or a tuple of tensors, and rejects the
#     Transformer2DModelOutput of return_dict=True (not CPU-specific; diffusers' pipelines pass
#     return_dict=False).
#  4. Every rank holds the whole video: the plan splits the token sequence after the patch
#     embedding (blocks.0 input and the RoPE tables, dim 1) and all-gathers the output at
#     proj_out. Plain Ulysses needs heads % R == 0 and tokens (frames x h' x w') % R == 0
#     (EquipartitionSharder asserts); otherwise we set ulysses_anything=True.
# Checked by running ring on 2 gloo ranks: diffusers' native backend refuses (it returns no
# LSE); its _native_flash and _native_cudnn backends (bf16) fail because aten has no CPU kernel
# for _scaled_dot_product_flash_attention; their setup (set_attention_backend,
# enable_parallelism) works on CPU.
RING_ON_CPU = (
    "not run on CPU: ring attention (TemplatedRingAttention) merges partial attention by "
    "log-sum-exp, so it needs an attention backend that returns the LSE; in diffusers 0.42.1 "
    "those are _native_flash / _native_cudnn (aten::_scaled_dot_product_flash_attention / "
    "_cudnn_attention have no CPU kernel), flash-attn, flash-3 and sage: CUDA only; the CPU "
    "backend, native SDPA, raises on return_lse=True")


def wan_kwargs(preset: dict) -> dict:
    return {**WAN21, **preset["model"]}


def trained_length(preset: dict) -> int:
    """The 1x length: the engine's own notion of the model's trained length (21 latent frames
    for Wan 2.1), from a model built on the meta device (no memory, no weights)."""
    from diffusers import WanTransformer3DModel
    from vinf_engine.models.wan import trained_frames
    with torch.device("meta"):
        return trained_frames(WanTransformer3DModel(**wan_kwargs(preset)))


def build_wan(preset: dict, device, dtype):
    """A random WanTransformer3DModel, the same on every rank and in every process (seeded;
    built on ``device`` directly: the 1.3B model initialises in well under a second on a GPU).
    Parameters diffusers initialises to zero get small noise, so every module matters."""
    from diffusers import WanTransformer3DModel
    torch.manual_seed(0)
    with torch.device(device):
        m = WanTransformer3DModel(**wan_kwargs(preset))
    g = torch.Generator(device).manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g, device=device) * 0.02)
    if dtype != torch.float32:
        # As from_pretrained(torch_dtype=...) loads it: the modules diffusers keeps in fp32
        # (time embedder, modulation table, norms; the RoPE tables are buffers) stay fp32.
        keep = set(m._keep_in_fp32_modules or ())
        with torch.no_grad():
            for name, p in m.named_parameters():
                if not keep & set(name.split(".")):
                    p.data = p.data.to(dtype)
    return m.eval()


class CollectiveCounter:
    """Bytes and launches of the collectives diffusers' context parallelism calls, counted by
    wrapping them (only while ``active``): the functional ``all_to_all_single`` and
    ``all_gather_tensor`` (Ulysses' 4 all-to-alls per self-attention, the output all-gather,
    ring's K/V all-gather) and ``torch.distributed.all_gather`` (masks, "anything" sizes).
    Per rank: an all-to-all sends the (R-1)/R of its input meant for the others and receives as
    much; an all-gather sends its shard to R-1 peers and receives theirs (the engine's own
    all-gather counts the same way)."""

    def __init__(self):
        self.active = False
        self.bytes_sent = self.bytes_received = self.collectives = 0
        self._undo = []

    def reset(self):
        self.bytes_sent = self.bytes_received = self.collectives = 0

    def snapshot(self) -> dict:
        return dict(bytes_sent=self.bytes_sent, bytes_received=self.bytes_received,
                    collectives=self.collectives)

    def _add(self, sent, received):
        if self.active:
            self.collectives += 1
            self.bytes_sent += int(sent)
            self.bytes_received += int(received)

    def install(self):
        import torch.distributed as dist
        import torch.distributed._functional_collectives as funcol

        def world_rank(group):
            return dist.get_world_size(group), dist.get_rank(group)

        def nbytes(t):
            return t.numel() * t.element_size()

        a2a, ag_t, ag = funcol.all_to_all_single, funcol.all_gather_tensor, dist.all_gather

        def all_to_all_single(x, output_split_sizes, input_split_sizes, group, *a, **k):
            W, r = world_rank(group)
            if input_split_sizes is None:
                sent = nbytes(x) * (W - 1) / W
                received = sent
            else:
                row = nbytes(x) / max(1, x.shape[0])
                sent = row * (sum(input_split_sizes) - input_split_sizes[r])
                received = row * (sum(output_split_sizes) - output_split_sizes[r])
            self._add(sent, received)
            return a2a(x, output_split_sizes, input_split_sizes, group, *a, **k)

        def all_gather_tensor(x, gather_dim, group, *a, **k):
            W, _ = world_rank(group)
            self._add(nbytes(x) * (W - 1), nbytes(x) * (W - 1))
            return ag_t(x, gather_dim, group, *a, **k)

        def all_gather(tensor_list, tensor, group=None, *a, **k):
            W, r = world_rank(group)
            self._add(nbytes(tensor) * (W - 1),
                      sum(nbytes(t) for i, t in enumerate(tensor_list) if i != r))
            return ag(tensor_list, tensor, group, *a, **k)

        funcol.all_to_all_single, funcol.all_gather_tensor = all_to_all_single, all_gather_tensor
        dist.all_gather = all_gather
        self._undo = [(funcol, "all_to_all_single", a2a), (funcol, "all_gather_tensor", ag_t),
                      (dist, "all_gather", ag)]
        return self

    def uninstall(self):
        for mod, name, fn in self._undo:
            setattr(mod, name, fn)
        self._undo = []


def enable_context_parallel(model, method, world, opts, device):
    """diffusers' own context parallelism on ``model``: Ulysses (``ulysses_degree=world``,
    "native" SDPA backend) or ring (``ring_degree=world``, "_native_flash", CUDA only)."""
    from diffusers import ContextParallelConfig
    heads = model.config.num_attention_heads
    pt, ph, pw = model.config.patch_size
    h, w = opts["latent_hw"]
    tokens = [f // pt * (h // ph) * (w // pw) for f in opts["frames"]]
    uneven = heads % world != 0 or any(n % world for n in tokens)
    if method == "ulysses":
        model.set_attention_backend("native")
        cp = ContextParallelConfig(ulysses_degree=world, ulysses_anything=uneven)
    else:
        model.set_attention_backend("_native_flash")
        cp = ContextParallelConfig(ring_degree=world, ring_anything=any(n % world for n in tokens))
    count = torch.accelerator.device_count
    if device.type == "cpu":
        torch.accelerator.device_count = lambda: 1      # see note 1 above the presets
    try:
        model.enable_parallelism(config=cp)
    finally:
        torch.accelerator.device_count = count
    return dict(ulysses_anything=cp.ulysses_anything, ring_anything=cp.ring_anything,
                backend="native" if method == "ulysses" else "_native_flash")


def measure(model, method, rank, world, frames, opts, device, dtype, text, counter):
    """One method at one length: warm-up forward, then ``steps`` timed CFG Euler steps.
    Returns this rank's record and its final latents (its clip, or the whole video)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    h, w = opts["latent_hw"]
    engine = getattr(model, "vinf_engine", None)
    mine = vinf.ClipLayout(frames, world).frames(rank) if engine is not None else range(frames)
    shape = (1, model.config.in_channels, frames, h, w)
    latents = vinf.initial_noise(opts["seed"], shape, mine, device=device, dtype=torch.float32)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=FLOW_SHIFT)
    sched.set_timesteps(opts["steps"])        # CPU timesteps

    def eps(x, t):
        # On a GPU the timestep must be on the device (Wan's time embedder is a Linear there);
        # the engine reads it on the host when it agrees on the step: one device sync per step.
        tt = torch.full((2,), float(t), device=device)
        out = model(hidden_states=torch.cat([x, x]).to(dtype), timestep=tt,
                    encoder_hidden_states=text, return_dict=False)[0].float()
        uncond, cond = out.chunk(2)
        return uncond + GUIDANCE * (cond - uncond)

    with torch.no_grad():
        eps(latents, sched.timesteps[0])                  # warm-up, not timed
        harness.sync(device, world)
        peak_reset = harness.reset_peak_memory(device)
        comm = engine.comm.counters if engine is not None else counter
        if comm is not None:
            comm.reset()
        if counter is not None:
            counter.active = True
        t0 = time.perf_counter()
        for t in sched.timesteps:
            latents = sched.step(eps(latents, t), t, latents).prev_sample
        harness.sync(device, world)
        seconds = time.perf_counter() - t0
        if counter is not None:
            counter.active = False
    rec = dict(seconds=seconds, peak_mib=peak_memory_mib(device), peak_reset=peak_reset)
    if comm is not None:
        rec.update(comm.snapshot())
    return rec, latents.cpu()


def _combine(method, world, frames, recs, opts) -> dict:
    """One table row from every rank's record of one method at one length."""
    steps = opts["steps"]
    row = dict(name=LABELS[method].format(R=world), method=method, ranks=world,
               threads_per_rank=opts["threads"], frames=frames,
               x_trained=round(frames / opts["trained"], 3), steps=steps)
    errors = [r["error"] for r in recs if "error" in r]
    if errors:
        row["error"] = errors[0]
        return row
    sps = max(r["seconds"] for r in recs) / steps
    row.update(seconds_per_step=sps, ms_per_frame_step=sps * world / frames * 1e3,
               peak_mib_per_rank=[round(r["peak_mib"], 1) for r in recs],
               peak_is_since_warmup=all(r["peak_reset"] for r in recs))
    if "bytes_sent" in recs[0]:
        row["mib_sent_per_rank_per_step"] = [r["bytes_sent"] / steps / 2**20 for r in recs]
        row["mib_received_per_rank_per_step"] = [r["bytes_received"] / steps / 2**20 for r in recs]
        row["collectives_per_step"] = max(r["collectives"] for r in recs) / steps
    if method in ("ulysses", "ring"):
        row["context_parallel"] = opts.get("_cp_info")
    return row


def _gather(rec, world, group):
    if world == 1:
        return [rec]
    out = [None] * world
    torch.distributed.all_gather_object(out, rec, group=group)
    return out


def worker(rank, world, opts):
    """One rank of one spawn: every method in ``opts["methods"]`` (all on ``world`` ranks), at
    every length in ``opts["frames"]`` (ascending); rank 0 writes each row as it is measured.
    Returns {method: {frames: this rank's final latents}} for the comparisons."""
    from diffusers.utils import logging as dlogging
    dlogging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)   # funcol.all_gather_tensor
    warnings.filterwarnings("ignore", message=".*trained range.*")
    device = torch.device(f"cuda:{rank}" if opts["device"] == "cuda" else "cpu")
    dtype = getattr(torch, opts["dtype"])
    preset = PRESETS[opts["preset"]]
    group = None
    if world > 1 and device.type == "cuda":
        group = torch.distributed.new_group(backend="gloo")     # rows travel on the CPU
    g = torch.Generator().manual_seed(opts["seed"] + 1)
    kw = wan_kwargs(preset)
    text = torch.randn(2, preset["text_len"], kw["text_dim"], generator=g).to(device, dtype)
    results = {}
    for method in opts["methods"]:
        results[method] = {}
        counter, model, failed = None, None, None
        try:
            model = build_wan(preset, device, dtype)
            if method in ("engine", "engine1"):
                vinf.parallelize(model, vinf.DualScopeConfig(**opts["config"]))
            else:
                if method in ("ulysses", "ring"):
                    opts["_cp_info"] = enable_context_parallel(model, method, world, opts, device)
                    counter = CollectiveCounter().install()
        except Exception as e:   # noqa: BLE001 - becomes the method's rows
            failed = f"setup: {type(e).__name__}: {e}"[:600]
        for frames in opts["frames"]:
            if failed:
                rec, lat = dict(error=failed), None
            else:
                try:
                    rec, lat = measure(model, method, rank, world, frames, opts, device, dtype,
                                       text, counter)
                except Exception as e:   # noqa: BLE001
                    oom = "out of memory" in str(e).lower()
                    rec, lat = dict(error="out of memory" if oom else
                                    f"{type(e).__name__}: {e}"[:600]), None
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            recs = _gather(rec, world, group)
            if rank == 0:
                row = _combine(method, world, frames, recs, opts)
                harness.append_row(opts["out"], row)
                print_row(row)
            if any("error" in r for r in recs):
                failed = failed or f"not run: failed at {frames} frames"
            elif lat is not None and (rank == 0 or method not in ("ulysses", "ring")):
                results[method][frames] = lat          # Ulysses/ring: every rank has it all
        if counter is not None:
            counter.uninstall()
        if getattr(model, "vinf_engine", None) is not None:
            vinf.unparallelize(model)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


# ------------------------------------------------------------------------------ the report
def print_row(row):
    if "error" in row or "skipped" in row:
        why = row.get("error") or row.get("skipped")
        at = f" @ {row['frames']} frames" if row.get("frames") else ""
        print(f"  {row['name']}{at}: {why}", flush=True)
        return
    comm = ""
    if "mib_sent_per_rank_per_step" in row:
        comm = (f", {max(row['mib_sent_per_rank_per_step']):.2f} MiB sent / "
                f"{max(row['mib_received_per_rank_per_step']):.2f} received per rank per step")
    print(f"  {row['name']} @ {row['frames']} frames: {row['seconds_per_step']:.3f} s/step, "
          f"{row['ms_per_frame_step']:.1f} ms per frame-step, peak "
          f"{max(row['peak_mib_per_rank']):.0f} MiB/rank{comm}", flush=True)


def add_comparisons(rows, latents):
    """The figures that compare rows: partition invariance (engine R ranks vs 1 rank, same
    length), Ulysses vs dense output, per-frame cost vs dense and vs the same method at 1x."""
    ok = {(r["method"], r["frames"]): r for r in rows if "error" not in r and "skipped" not in r}
    frames = sorted({f for _, f in ok})
    for (method, f), r in ok.items():
        dense = ok.get(("dense", f))
        if dense is not None and method != "dense":
            r["per_frame_vs_dense"] = r["ms_per_frame_step"] / dense["ms_per_frame_step"]
        first = ok.get((method, frames[0])) if frames else None
        if first is not None:
            r["per_frame_vs_1x"] = r["ms_per_frame_step"] / first["ms_per_frame_step"]
    for (method, f), r in ok.items():
        if method == "engine":
            a = latents.get("engine", {}).get(f)
            b = latents.get("engine1", {}).get(f)
            if a is not None and b is not None:
                r["max_rel_diff_vs_1_rank"] = rel_diff(a, b)
        if method == "engine1":          # how far dual-scope attention is from dense (JSON only)
            a = latents.get("engine1", {}).get(f)
            b = latents.get("dense", {}).get(f)
            if a is not None and b is not None:
                r["output_rel_diff_vs_dense"] = rel_diff(a, b)
        if method in ("ulysses", "ring"):
            a = latents.get(method, {}).get(f)
            b = latents.get("dense", {}).get(f)
            if a is not None and b is not None:
                r["max_rel_diff_vs_dense"] = rel_diff(a, b)


COLUMNS = [("run", 28), ("frames", 7), ("s/step", 9), ("ms/frame", 10), ("vs dense", 9),
           ("vs 1x", 7), ("peak MiB", 10), ("MiB sent", 10), ("MiB recv", 10), ("launch", 8),
           ("rel diff", 10)]


def _cells(r) -> list:
    """One measured row's cells of the table (an error: its text)."""
    if "error" in r:
        return [r["name"], str(r["frames"]), r["error"][:80]]
    sent = r.get("mib_sent_per_rank_per_step")
    recv = r.get("mib_received_per_rank_per_step")
    diff = r.get("max_rel_diff_vs_1_rank" if r["method"] == "engine" else "max_rel_diff_vs_dense")
    return [r["name"], str(r["frames"]), f"{r['seconds_per_step']:.3f}",
            f"{r['ms_per_frame_step']:.1f}", fmt(r.get("per_frame_vs_dense"), ".2f"),
            fmt(r.get("per_frame_vs_1x"), ".2f"), f"{max(r['peak_mib_per_rank']):.0f}",
            fmt(max(sent) if sent else None, ".2f"), fmt(max(recv) if recv else None, ".2f"),
            fmt(r.get("collectives_per_step"), ".0f"), fmt(diff, ".1e")]


def print_table(rows, methods):
    """Rows by length, then method (in ``methods``' order); rows of no length (skipped) last."""
    order = {m: i for i, m in enumerate(methods)}
    measured = [r for r in rows if r.get("frames") is not None]
    lines = [_cells(r) for r in sorted(measured, key=lambda r: (r["frames"], order.get(r["method"], 99)))]
    lines += [[r["name"], "", str(r.get("skipped") or r.get("error"))] for r in rows
              if r.get("frames") is None]
    harness.print_table(COLUMNS, lines)


# ------------------------------------------------------------------------------ parse
@dataclasses.dataclass
class Plan:
    """The command line, resolved: defaults by device and preset, checked before any spawn."""
    args: argparse.Namespace
    ranks: int
    methods: list         # without ring on CPU once the ring row is written (see skip_ring)
    base: dict            # what every rank receives (see worker), but methods and threads
    timeout: float
    backend: str


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--preset", choices=tuple(PRESETS), default=None,
                    help="model shape (default: cpu on cpu, wan2.1-1.3b on cuda)")
    ap.add_argument("--frames", default=None,
                    help="latent frames of each length, comma-separated, ascending (default: "
                         "1x, 2x, 4x the trained length: 21,42,84)")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed denoising steps per row, after one untimed warm-up forward")
    ap.add_argument("--ranks", type=int, default=2, help="ranks of the engine and of Ulysses")
    ap.add_argument("--window", type=int, default=8, help="engine: local window (family default 8)")
    ap.add_argument("--num-global", type=int, default=8,
                    help="engine: global frames (family default 8)")
    ap.add_argument("--methods", default=DEFAULT_METHODS,
                    help=f"comma-separated, from {METHODS} (engine: R ranks; engine1: 1 rank; "
                         "ring: CUDA only, opt-in)")
    ap.add_argument("--latent", default=None, help="latent HxW, e.g. 8x8 (default: the preset's)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                    help="default: the preset's (float32 on the CPU presets, bfloat16 for 1.3B)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU: torch threads per rank (default 1, so that every row's per-frame "
                         "cost is core-time and 1- and R-rank rows compare; 0: cores // ranks)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds per spawn of ranks (default 900 on cpu, 3600 on cuda)")
    ap.add_argument("--out", default=None,
                    help="JSON path (default bench/out/throughput-wan-<device>.json)")
    return ap


def _frames(ap, a, trained, R) -> list:
    """The lengths: --frames, or 1x, 2x and 4x the trained length."""
    if a.frames:
        try:
            frames = sorted({int(f) for f in a.frames.split(",")})
            assert frames and frames[0] >= 1
        except (ValueError, AssertionError):
            ap.error(f"--frames must look like 21,42,84, got {a.frames!r}")
    else:
        frames = [trained, 2 * trained, 4 * trained]
    if frames[0] < R:
        ap.error(f"--frames {frames[0]} is fewer than --ranks {R}")
    return frames


def parse(argv) -> Plan:
    ap = parser()
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    preset_name = a.preset or ("cpu" if a.device == "cpu" else "wan2.1-1.3b")
    preset = PRESETS[preset_name]
    R = a.ranks
    if R < 1:
        ap.error("--ranks must be >= 1")
    if a.device == "cuda" and R > torch.cuda.device_count():
        ap.error(f"--ranks {R}: only {torch.cuda.device_count()} GPUs (one rank per GPU)")
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"--methods: unknown {bad}; choose from {METHODS}")
    if R == 1:
        methods = [m for m in methods if m not in MULTI]      # engine on 1 rank is engine1
    trained = trained_length(preset)
    frames = _frames(ap, a, trained, R)
    latent_hw = preset["latent_hw"]
    if a.latent:
        try:
            latent_hw = harness.parse_hw(a.latent, even=True)
        except ValueError:
            ap.error(f"--latent must look like 8x8 (even: patch 2), got {a.latent!r}")
    config = dict(window=a.window, num_global=a.num_global)
    vinf.DualScopeConfig(**config)                             # validate before spawning
    base = dict(device=a.device, preset=preset_name, frames=frames,
                steps=a.steps or preset["steps"], seed=a.seed, config=config,
                latent_hw=latent_hw, dtype=a.dtype or preset["dtype"],
                trained=trained,
                out=a.out or harness.out_path(f"throughput-wan-{a.device}.json"))
    return Plan(a, R, methods, base, a.timeout or (900.0 if a.device == "cpu" else 3600.0),
                "nccl" if a.device == "cuda" else "gloo")


# ------------------------------------------------------------------------------ measure
def start(plan: Plan):
    """The report's header on disk (rows follow as they are measured) and on stdout; the ring
    row where ring does not run (on CPU it leaves ``plan.methods``)."""
    a, b, R = plan.args, plan.base, plan.ranks
    preset = PRESETS[b["preset"]]
    os.makedirs(os.path.dirname(os.path.abspath(b["out"])), exist_ok=True)
    import diffusers
    harness.write_json(b["out"], dict(
        benchmark="throughput-wan", **harness.environment(a.device, cpu_model=True),
        diffusers=diffusers.__version__, backend=plan.backend, preset=b["preset"],
        model=wan_kwargs(preset), latent_hw=list(b["latent_hw"]), text_len=preset["text_len"],
        dtype=b["dtype"], trained_frames=b["trained"], frames=b["frames"], steps=b["steps"],
        guidance=GUIDANCE, scheduler=f"FlowMatchEulerDiscreteScheduler(shift={FLOW_SHIFT})",
        engine_config=b["config"], ranks=R, methods=plan.methods,
        cpu_threads_per_rank=(a.threads or "cores // ranks") if a.device == "cpu" else None,
        rows=[]))
    hw, m = b["latent_hw"], preset["model"]
    print(f"vinf_engine throughput, Wan: {b['preset']} WanTransformer3DModel "
          f"({m['num_layers']} layers, {m['num_attention_heads']} x "
          f"{m['attention_head_dim']} heads), latent {hw[0]}x{hw[1]}, "
          f"{'/'.join(map(str, b['frames']))} latent frames (trained: {b['trained']}), "
          f"{b['steps']} steps + 1 warm-up, CFG batch 2, {b['dtype']}, {a.device} ({plan.backend}"
          f"{f', {a.threads} thread(s) per rank' if a.device == 'cpu' and a.threads else ''}), "
          f"engine window {a.window}, "
          f"{a.num_global} global frames", flush=True)
    ring_row = None
    if "ring" in plan.methods and a.device == "cpu":
        plan.methods.remove("ring")
        ring_row = dict(name=LABELS["ring"].format(R=R), method="ring", ranks=R, frames=None,
                        skipped=RING_ON_CPU)
    elif "ring" not in plan.methods and R > 1:
        ring_row = dict(name=LABELS["ring"].format(R=R), method="ring", ranks=R, frames=None,
                        skipped=(RING_ON_CPU if a.device == "cpu" else
                                 "not run: opt in with --methods ...,ring (backend _native_flash)"))
    if ring_row:
        harness.append_row(b["out"], ring_row)
        print_row(ring_row)


def measure_all(plan: Plan):
    """The methods on R ranks in one spawn, those on one rank in another; rank 0 of each adds
    every row to the report as it is measured. Returns ({method: {frames: whole video's
    latents}}, whether a spawn failed)."""
    out, cores, latents, failed = plan.base["out"], os.cpu_count() or 1, {}, False
    groups = [(plan.ranks, [m for m in plan.methods if m in MULTI]),
              (1, [m for m in plan.methods if m not in MULTI])]
    for world, group in groups:
        if not group:
            continue
        threads = None if plan.args.device == "cuda" else (plan.args.threads or max(1, cores // world))
        res, error = harness.spawn(worker, world, dict(plan.base, methods=group, threads=threads),
                                   label=f"{', '.join(group)} on {world} rank(s)",
                                   backend=plan.backend, threads=threads, timeout=plan.timeout)
        if error is not None:
            failed = True
            continue
        for m in group:
            if m in MULTI and m != "engine":          # every rank holds the whole video
                latents[m] = res[0][m]
            else:
                latents[m] = {f: torch.cat([r[m][f] for r in res], dim=2)
                              for f in res[0][m] if all(f in r[m] for r in res)}
        with open(out) as f:
            report = json.load(f)
        add_comparisons(report["rows"], latents)
        harness.write_json(out, report)
    return latents, failed


# ------------------------------------------------------------------------------ report
def finish(plan: Plan, latents) -> dict:
    """The report as measured, with the comparisons, the summary and the notes (written)."""
    out, frames = plan.base["out"], plan.base["frames"]
    with open(out) as f:
        report = json.load(f)
    rows = report["rows"]
    add_comparisons(rows, latents)
    ok = {(r["method"], r["frames"]): r for r in rows if "error" not in r and "skipped" not in r}
    summary = {}
    lo, hi = frames[0], frames[-1]
    for m in ("engine", "engine1"):
        r = ok.get((m, hi))
        if r is not None and "per_frame_vs_1x" in r and lo != hi:
            summary[f"{m}_per_frame_{hi}_vs_{lo}"] = r["per_frame_vs_1x"]
    inv = [r["max_rel_diff_vs_1_rank"] for r in rows if "max_rel_diff_vs_1_rank" in r]
    report["max_rel_diff_R_ranks_vs_1_rank"] = max(inv) if inv else None
    report["summary"] = summary
    cpu = plan.args.device == "cpu"
    report["notes"] = dict(
        ms_per_frame="rank-milliseconds per frame-step: step time x ranks / frames",
        peak_memory=("GPU max_memory_allocated since the warm-up" if not cpu else
                     "peak RSS of the rank's process since the warm-up (/proc/self/clear_refs)"),
        bytes="per rank per step (engine: CommCounters; diffusers: its collectives, wrapped)",
        ulysses_on_cpu=("torch.accelerator.device_count patched to 1 during enable_parallelism; "
                        "attention backend native (SDPA); called with return_dict=False"),
        ring=RING_ON_CPU if cpu else None)
    harness.write_json(out, report)
    return report


def print_summary(plan: Plan, report: dict):
    rows, R, frames = report["rows"], plan.ranks, plan.base["frames"]
    cuda = plan.args.device == "cuda"
    print()
    print_table(rows, METHODS)
    inv = report["max_rel_diff_R_ranks_vs_1_rank"]
    if inv is not None:
        print(f"\npartition invariance: max over lengths of max |out(R={R}) - out(R=1)| / "
              f"max |out(R=1)| = {inv:.2e} ({plan.base['dtype']})")
    ok = {(r["method"], r["frames"]): r for r in rows if "error" not in r and "skipped" not in r}
    for m, label in (("engine1", "engine 1 rank"), ("engine", f"engine {R} ranks")):
        parts = [f"{f}: {ok[(m, f)]['per_frame_vs_dense']:.2f}x" for f in frames
                 if "per_frame_vs_dense" in ok.get((m, f), {})]
        if parts:
            print(f"{label} per-frame cost vs dense: " + ", ".join(parts))
    for key, v in report["summary"].items():
        m = key.split("_per_frame")[0]
        label = "engine 1 rank" if m == "engine1" else f"engine {R} ranks"
        goal = " (goal <= 1.2x: " + ("met" if v <= 1.2 else "missed") + ")"
        print(f"{label} per-frame cost at {frames[-1]} frames / at {frames[0]}: {v:.2f}x"
              f"{goal if cuda else ''}")
    if not cuda and "ulysses" in plan.methods:
        print("Ulysses on CPU/gloo: torch.accelerator.device_count patched to 1 (diffusers takes "
              "rank % device_count(), 0 on CPU), native SDPA backend, return_dict=False")
    print("ms/frame: step time x ranks / frames (rank-ms per frame-step); vs dense: that over dense's at the same length; "
          "vs 1x: over the same run's at the shortest length")
    print("peak MiB: per rank, " + report["notes"]["peak_memory"] + "; MiB sent/recv and launch "
          "(collectives): per rank per step, the largest rank's")
    print("rel diff: engine R ranks vs engine 1 rank (partition invariance); Ulysses vs dense")
    print(f"wrote {plan.base['out']}")


def main(argv=None):
    plan = parse(argv)
    start(plan)
    latents, failed = measure_all(plan)
    report = finish(plan, latents)
    print_summary(plan, report)
    errors = [r for r in report["rows"] if "error" in r and r["error"] != "out of memory"]
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
