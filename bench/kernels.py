"""Each vinf kernel beside its peers, on the same inputs, in one run.

    python bench/kernels.py --device cuda            # SPEC section 5 shapes, bf16
    python bench/kernels.py --device cpu             # tiny shapes, fp32, Triton interpreter:
                                                     # a correctness smoke run, not performance
    python bench/kernels.py --only temporal,dit,group_norm

For every op, every backend registered in ``vinf_engine.ops.dispatch`` (reference, triton,
cuda, whatever is installed) runs beside the peers:

    temporal  dual-scope attention, tokens_per_frame == 1: SDPA over concatenated K/V (the
              SPEC peer, without the band mask), SDPA and the math path with the same mask
    dit       tokens_per_frame > 1: FlexAttention with the same block mask (compiled on
              CUDA), and dense flash SDPA over the clip (an upper bound, not the same op)
    group_norm  (+ SiLU), contiguous and channels-last: F.group_norm (+ F.silu)

Each implementation is checked against the reference on the same inputs before it is timed
(a failed check is reported, not timed). Times are triton.testing.do_bench medians on CUDA,
which flushes L2 before every run; inputs are fresh random data. Beside each time: GB/s on
the bytes the op must move (memory-bound ops), effective TFLOP/s on the computed pairs only
(attention), and the floor: bytes over the copy bandwidth measured in this run, or the
computed FLOPs over the dense flash SDPA throughput measured in this run.
Results: a table on stdout and JSON in bench/out/kernels-<device>.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS: list[dict] = []
ENV: dict = {}


def emit(row: dict):
    """Keep ``row``, print it, and rewrite the JSON file: a run cut short keeps its rows."""
    ROWS.append(row)
    print("# row " + json.dumps(row, default=str), flush=True)
    if _SCRIPT:
        os.makedirs(ARGS.out, exist_ok=True)
        harness.write_json(os.path.join(ARGS.out, f"kernels-{DEV}.json"),
                           dict(env=ENV, rows=ROWS, complete=False))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", default="temporal,dit,group_norm",
                   help="comma-separated subset of temporal, dit, group_norm")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "out"))
    return p.parse_args(argv)


# As a script, this file is also what `import kernels` finds from bench/ (transformers probes
# for a package of that name): imported, it must not read argv or change the environment.
_SCRIPT = __name__ == "__main__"
ARGS = parse(None if _SCRIPT else [])
DEV = ARGS.device
if DEV == "cpu" and _SCRIPT:
    # The kernels run in Triton's interpreter; this must precede the first import of triton.
    if "triton" in sys.modules:
        raise SystemExit("bench/kernels.py: triton was imported before TRITON_INTERPRET was set")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ["VINF_BACKEND"] = "triton"       # load the kernels on CPU too
TINY = DEV == "cpu"
DTYPE = torch.bfloat16 if DEV == "cuda" else torch.float32

import torch.nn.functional as F  # noqa: E402

import harness  # noqa: E402  (bench/harness.py, beside this script)

if _SCRIPT:
    sys.path.insert(0, ROOT)
from vinf_engine.ops import dispatch  # noqa: E402
from vinf_engine.ops.attention import dual_scope_attention_reference  # noqa: E402
from vinf_engine.ops.group_norm import (group_norm_apply_reference,  # noqa: E402
                                        group_norm_finalize, group_norm_partials_reference)


# ----------------------------------------------------------------------------- timing
def bench(fn) -> float:
    """Median milliseconds of ``fn()``."""
    if DEV == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    # CPU (a smoke run): the check already ran it once; time one more run.
    times = []
    for _ in range(1):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def check(out, ref) -> tuple[bool, float]:
    """(within tolerance, max abs error) of ``out`` against the fp32-math reference."""
    out = out[0] if isinstance(out, (tuple, list)) else out
    ref = ref[0] if isinstance(ref, (tuple, list)) else ref
    err = float((out.float() - ref.float()).abs().max())
    tol = {torch.bfloat16: 4e-2, torch.float16: 1e-2}.get(ref.dtype, 1e-4)
    ok = out.shape == ref.shape and math.isfinite(err) and err <= tol * max(
        1.0, float(ref.float().abs().max()))
    return ok, err


def record(op, case, impl, fn, ref=None, byts=None, flops=None, floor_ms=None, note=""):
    """Check ``fn`` against ``ref`` (when given), time it, and keep one row."""
    row = dict(op=op, case=case, impl=impl, device=DEV, dtype=str(DTYPE).replace("torch.", ""),
               note=note)
    try:
        if ref is not None:
            ok, err = check(fn(), ref)
            row.update(check="ok" if ok else "FAILED", max_abs_err=err)
            if not ok:
                emit(row)
                return row
        else:
            row["check"] = "n/a"
        ms = bench(fn)
        row["ms"] = ms
        if byts:
            row["gbps"] = byts / ms / 1e6
        if flops:
            row["tflops"] = flops / ms / 1e9
        if floor_ms is not None:
            row["floor_ms"] = floor_ms
    except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
        row.update(check=row.get("check", "error"), error=f"{type(e).__name__}: {e}"[:300])
    emit(row)
    return row


def copy_bandwidth() -> float:
    """Device copy bandwidth in GB/s (read + write), the ceiling for memory-bound kernels."""
    n = (64 << 20) if TINY else (2 << 30)
    src = torch.empty(n, dtype=torch.uint8, device=DEV).random_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    emit(dict(op="copy", case=f"{n >> 20} MiB", impl="copy_", device=DEV, ms=ms,
                     gbps=2 * n / ms / 1e6, check="n/a", note="bandwidth ceiling"))
    return 2 * n / ms / 1e6


def backends(op):
    """(name, fn, reason it cannot run or None) of every registered backend of ``op``."""
    return [(name, impl.fn, impl.supports) for name, impl in
            dispatch.implementations(op).items()]


def why_not(supports, *args, **kwargs):
    return supports(*args, **kwargs) if supports is not None else None


def rand(*shape):
    return torch.randn(*shape, device=DEV, dtype=DTYPE)


# ----------------------------------------------------------------------------- attention
def band_pairs(F_, T, window, pad, lo, hi, Ng):
    """Computed (query, key) pairs per (batch, head): each query token's band keys + Ng."""
    total = 0
    for i in range(F_):
        j0, j1 = max(lo, i + pad - window), min(hi, i + pad + window + 1)
        total += T * (max(0, j1 - j0) * T + Ng)
    return total


def attention_bytes(q, kw, Ng, T):
    """Bytes the op must move: q, out, the valid local k and v, and the global k and v."""
    B, FT, H, D = q.shape
    F_ = FT // T
    valid = F_ + kw["valid_left"] + kw["valid_right"]
    return q.element_size() * B * H * D * (2 * FT + 2 * valid * T + 2 * Ng)


def band_mask(F_, T, window, pad, lo, hi, Ng, device):
    """(F*T, (F + 2*pad)*T + Ng) bool: True where a query sees a key; globals last."""
    qf = torch.arange(F_ * T, device=device) // T + pad
    kf = torch.arange((F_ + 2 * pad) * T, device=device) // T
    local = ((kf[None] - qf[:, None]).abs() <= window) & (kf >= lo) & (kf < hi)
    return torch.cat([local, local.new_ones(F_ * T, Ng)], dim=1)


def vinf_rows(op, case, args, kw, ref, byts, flops, floor_ms):
    for name, fn, supports in backends("dual_scope_attention"):
        reason = why_not(supports, *args, **kw)
        if reason is not None:
            emit(dict(op=op, case=case, impl=f"vinf.{name}", device=DEV,
                      check="skipped", error=reason))
            continue
        record(op, case, f"vinf.{name}", lambda fn=fn: fn(*args, **kw), ref, byts, flops,
               floor_ms)


def temporal(bw):
    # (sequences, query frames, halo = window = pad, global frames, head dim); SPEC section 5.
    heads = 5
    cases = [(40, 16, 4, 8, 64), (40, 20, 8, 16, 64)] if TINY else \
        [(12800, 16, 4, 8, 64), (12800, 64, 8, 16, 64)]
    for case in cases:
        temporal_case(bw, heads, *case)       # one function per case: its tensors die with it


def temporal_case(bw, heads, n_seq, F_, halo, G, D):
    B = n_seq // heads
    q = rand(B, F_, heads, D)
    k, v = rand(B, F_ + 2 * halo, heads, D), rand(B, F_ + 2 * halo, heads, D)
    kg, vg = rand(B, G, heads, D), rand(B, G, heads, D)
    kw = dict(window=halo, pad=halo, valid_left=halo, valid_right=halo, tokens_per_frame=1)
    case = f"{n_seq} seqs, {F_} q, {F_ + 2 * halo} local + {G} global, d{D}"
    ref = dual_scope_attention_reference(q, k, v, kg, vg, **kw)
    byts = attention_bytes(q, kw, G, 1)
    flops = 4 * D * B * heads * band_pairs(F_, 1, halo, halo, 0, F_ + 2 * halo, G)
    floor_ms = byts / bw / 1e6
    vinf_rows("temporal_attn", case, (q, k, v, kg, vg), kw, ref, byts, flops, floor_ms)

    qt = q.transpose(1, 2)
    mask = band_mask(F_, 1, halo, halo, 0, F_ + 2 * halo, G, DEV)

    def concat():
        return (torch.cat([k, kg], 1).transpose(1, 2), torch.cat([v, vg], 1).transpose(1, 2))

    def sdpa_concat():
        kc, vc = concat()
        return F.scaled_dot_product_attention(qt, kc, vc).transpose(1, 2)

    def sdpa_masked():
        kc, vc = concat()
        return F.scaled_dot_product_attention(qt, kc, vc, attn_mask=mask).transpose(1, 2)

    def math_masked():
        kc, vc = concat()
        s = (qt @ kc.transpose(-1, -2)).float() * D ** -0.5
        s = s.masked_fill(~mask, float("-inf"))
        return (s.softmax(-1).to(vc.dtype) @ vc).transpose(1, 2)

    record("temporal_attn", case, "sdpa+concat", sdpa_concat, None, byts, flops, floor_ms,
           note="SPEC peer: no band mask, so not the same op")
    record("temporal_attn", case, "sdpa+concat+mask", sdpa_masked, ref, byts, flops,
           floor_ms)
    record("temporal_attn", case, "math+concat+mask", math_masked, ref, byts, flops,
           floor_ms)


def dit(bw):
    # (tokens per frame, frames, window, every n-th frame global, heads, head dim)
    cases = [(24, 4, 1, 3, 2, 32)] if TINY else [(1560, 21, 2, 10, 12, 128),
                                                 (1560, 64, 2, 16, 12, 128)]
    for case in cases:
        dit_case(*case)


def dit_case(T, F_, w, every, H, D):
    pad = w
    q = rand(1, F_ * T, H, D)
    k, v = rand(1, (F_ + 2 * pad) * T, H, D), rand(1, (F_ + 2 * pad) * T, H, D)
    gframes = list(range(0, F_, every))
    tok = torch.cat([torch.arange((f + pad) * T, (f + pad + 1) * T) for f in gframes])
    kg, vg = k[:, tok.to(DEV)].contiguous(), v[:, tok.to(DEV)].contiguous()
    Ng = kg.shape[1]
    # The whole video in one process: halo frames beyond both ends do not exist.
    kw = dict(window=w, pad=pad, valid_left=0, valid_right=0, tokens_per_frame=T)
    case = f"{F_} frames x {T} tok, {H}x{D}, +-{w} frames, global {gframes}"
    ref = dual_scope_attention_reference(q, k, v, kg, vg, **kw)
    pairs = band_pairs(F_, T, w, pad, pad, pad + F_, Ng)
    flops = 4 * D * H * pairs
    byts = attention_bytes(q, kw, Ng, T)
    masked = 1 - pairs / (F_ * T * ((F_ + 2 * pad) * T + Ng))

    qt = q.transpose(1, 2)
    k_mid = k[:, pad * T:(pad + F_) * T].transpose(1, 2)
    v_mid = v[:, pad * T:(pad + F_) * T].transpose(1, 2)
    dense_flops = 4 * D * H * (F_ * T) ** 2

    def dense():
        return F.scaled_dot_product_attention(qt, k_mid, v_mid)

    row = record("dit_attn", case, "sdpa dense (flash)", dense, None, None, dense_flops,
                 note="upper bound: every pair of the clip, not the same op")
    peak = row.get("tflops")
    floor_ms = flops / peak / 1e9 if peak else None
    vinf_rows("dit_attn", case, (q, k, v, kg, vg), kw, ref, byts, flops, floor_ms)
    global_rows(q, kg, vg, case)

    kc = torch.cat([k, kg], 1).transpose(1, 2).contiguous()
    vc = torch.cat([v, vg], 1).transpose(1, 2).contiguous()
    L_local = k.shape[1]
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def mask_mod(b, h, qi, ki):
            kf = ki // T
            qf = qi // T + pad
            local = (ki < L_local) & (kf - qf <= w) & (qf - kf <= w) & (kf >= pad) \
                & (kf < pad + F_)
            return local | (ki >= L_local)

        # _compile: evaluate mask_mod block by block; uncompiled it materialises the whole
        # (F*T) x (keys) mask first, ~1.1e10 entries at 64 frames x 1,560 tokens.
        bm = create_block_mask(mask_mod, None, None, F_ * T, kc.shape[2], device=DEV,
                               _compile=DEV == "cuda")
        flex = torch.compile(flex_attention, dynamic=False) if DEV == "cuda" else \
            flex_attention
        record("dit_attn", case, "flex (same mask" + (", compiled)" if DEV == "cuda"
                                                      else ", eager)"),
               lambda: flex(qt, kc, vc, block_mask=bm).transpose(1, 2), ref, byts, flops,
               floor_ms, note=f"{masked:.0%} of pairs masked; K/V concatenated untimed")
    except Exception as e:  # noqa: BLE001
        emit(dict(op="dit_attn", case=case, impl="flex", device=DEV, check="error",
                         error=f"{type(e).__name__}: {e}"[:300]))


# ----------------------------------------------------------------------------- group norm
def group_norm(bw):
    G = 8 if TINY else 32
    shapes = [((1, 32, 4, 8, 8), "silu")] if TINY else \
        [((2, 320, 16, 40, 64), None), ((2, 320, 16, 40, 64), "silu"),
         ((2, 320, 64, 40, 64), "silu")]
    for shape, act in shapes:
        for layout in ("contiguous", "channels_last"):
            group_norm_case(bw, G, shape, act, layout)


def group_norm_case(bw, G, shape, act, layout):
    x = rand(*shape)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last_3d)
    C = shape[1]
    w, b = rand(C), rand(C)
    case = f"{shape} G{G} {layout}" + (" +silu" if act else "")
    byts = 2 * x.numel() * x.element_size()            # one read, one write: the floor
    floor_ms = byts / bw / 1e6
    p, n = group_norm_partials_reference(x, G)
    mean, rstd = group_norm_finalize(p, n, 1e-5)
    ref = group_norm_apply_reference(x, mean, rstd, w, b, act)
    applies = dict((name, (fn, sup)) for name, fn, sup in backends("group_norm_apply"))
    for name, part_fn, part_sup in backends("group_norm_partials"):
        if name not in applies:
            continue
        apply_fn, apply_sup = applies[name]
        reason = why_not(part_sup, x, G) or why_not(apply_sup, x, mean, rstd, w, b, act)
        if reason is not None:
            emit(dict(op="group_norm", case=case, impl=f"vinf.{name}",
                             device=DEV, check="skipped", error=reason))
            continue

        def run(part_fn=part_fn, apply_fn=apply_fn):
            parts, cnt = part_fn(x, G)
            mu, rs = group_norm_finalize(parts, cnt, 1e-5)
            return apply_fn(x, mu, rs, w, b, act)

        record("group_norm", case, f"vinf.{name}", run, ref, byts, None, floor_ms,
               note="partials + finalize + apply")

    def torch_gn():
        y = F.group_norm(x, G, w, b)
        return F.silu(y) if act else y

    record("group_norm", case, "torch F.group_norm" + (" + F.silu" if act else ""),
           torch_gn, ref, byts, None, floor_ms)


def global_rows(q, kg, vg, case):
    """The global scope alone (``attention_with_lse``: interior frames' global part, Wan's
    clamped scope): every backend beside SDPA over the same keys (no lse: a lower bound)."""
    from vinf_engine.ops.merge import attention_with_lse_reference
    B, L, H, D = q.shape
    scale = D ** -0.5
    ref = attention_with_lse_reference(q, kg, vg, scale, 0.0)
    flops = 4 * D * H * B * L * kg.shape[1]
    byts = q.element_size() * B * H * D * (2 * L + 2 * kg.shape[1])
    gcase = f"{case}: global only, {kg.shape[1]} keys"
    for name, fn, supports in backends("attention_with_lse"):
        reason = why_not(supports, q, kg, vg, scale, 0.0)
        if reason is not None:
            emit(dict(op="global_attn", case=gcase, impl=f"vinf.{name}", device=DEV,
                      check="skipped", error=reason))
            continue
        record("global_attn", gcase, f"vinf.{name}", lambda fn=fn: fn(q, kg, vg, scale, 0.0),
               ref, byts, flops)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, kg, vg))
    record("global_attn", gcase, "sdpa (no lse)",
           lambda: F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2), ref, byts, flops,
           note="peer without the log-sum-exp the merge needs")


# ----------------------------------------------------------------------------- main
def table():
    cols = ("op", "case", "impl", "check", "ms", "floor_ms", "gbps", "tflops")
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))
    rows = [[fmt(r.get(c)) for c in cols] for r in ROWS]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(wd) for c, wd in zip(cols, widths)))
    for r, raw in zip(rows, ROWS):
        line = "  ".join(v.ljust(wd) for v, wd in zip(r, widths))
        extra = raw.get("error") or raw.get("note") or ""
        print(line + (f"  # {extra}" if extra else ""))


def main():
    torch.manual_seed(0)
    env = ENV
    env.update(torch=torch.__version__, device=DEV, dtype=str(DTYPE))
    if DEV == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError as e:
        env["triton"] = f"missing: {e}"
    dispatch.implementations("dual_scope_attention")          # imports the optional backends
    from vinf_engine.ops import xformers_backend
    env["xformers"] = xformers_backend.STATUS
    if TINY:
        env["note"] = ("CPU: tiny shapes, Triton interpreter. A correctness smoke run; the times "
                       "are not performance.")
    print(json.dumps(env))
    bw = copy_bandwidth()
    for name in ARGS.only.split(","):
        t = time.time()
        {"temporal": temporal, "dit": dit, "group_norm": group_norm}[name.strip()](bw)
        print(f"# {name}: {time.time() - t:.1f}s", file=sys.stderr)
    table()
    os.makedirs(ARGS.out, exist_ok=True)
    path = os.path.join(ARGS.out, f"kernels-{DEV}.json")
    harness.write_json(path, dict(env=env, rows=ROWS, complete=True, dispatch=dispatch.summary()))
    print(f"# wrote {path}")
    failed = [r for r in ROWS if r.get("check") == "FAILED"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
