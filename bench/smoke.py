"""One small call of every op on every backend, each backend in its own process, so that a
backend that crashes the process (a bad launch, an illegal address) cannot take the others
with it. Prints one line per (backend, op): ok with the max error against the reference,
refused with the reason, or the exception.

    python bench/smoke.py --device cuda
    python bench/smoke.py --device cpu      # triton under its CPU interpreter
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def probe(backend: str, device: str) -> list:
    """Every op on ``backend`` (VINF_BACKEND, set by the caller) against the reference."""
    sys.path.insert(0, ROOT)
    import vinf_engine as vinf
    from vinf_engine.ops.attention import dual_scope_attention_reference
    from vinf_engine.ops.group_norm import (group_norm_apply_reference, group_norm_finalize,
                                            group_norm_partials_reference)
    from vinf_engine.ops.merge import attention_with_lse_reference
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    rows = []

    def run(op, fn, ref):
        try:
            out = fn()
            out = out[0] if isinstance(out, tuple) else out
            ref_ = ref[0] if isinstance(ref, tuple) else ref
            err = float((out.float() - ref_.float()).abs().max())
            rows.append(dict(backend=backend, op=op, result="ok", max_abs_err=err))
        except ValueError as e:
            rows.append(dict(backend=backend, op=op, result="refused", why=str(e)[:300]))
        except Exception as e:  # noqa: BLE001 - reported, the next op still runs
            rows.append(dict(backend=backend, op=op, result="ERROR",
                             why=f"{type(e).__name__}: {e}"[:300]))

    for T, D in ((1, 64), (6, 64)):
        F, w = 5, 2
        q, k, v = r(3, F * T, 2, D), r(3, (F + 2 * w) * T, 2, D), r(3, (F + 2 * w) * T, 2, D)
        kg, vg = r(3, 2 * T, 2, D), r(3, 2 * T, 2, D)
        kw = dict(window=w, pad=w, valid_left=1, valid_right=w, tokens_per_frame=T,
                  local_bias=0.5, global_bias=-0.5)
        run(f"dual_scope_attention T={T}",
            lambda: vinf.ops.dual_scope_attention(q, k, v, kg, vg, **kw),
            dual_scope_attention_reference(q, k, v, kg, vg, **kw))
    q, kg, vg = r(2, 40, 2, 64), r(2, 24, 2, 64), r(2, 24, 2, 64)
    run("attention_with_lse", lambda: vinf.ops.attention_with_lse(q, kg, vg, bias=0.3),
        attention_with_lse_reference(q, kg, vg, 64 ** -0.5, 0.3))
    x = r(2, 3, 16, 4, 4).permute(0, 2, 1, 3, 4)          # the engine's frame-major view
    p, n = group_norm_partials_reference(x.contiguous(), 4)
    mean, rstd = group_norm_finalize(p, n, 1e-5)
    run("group_norm (frame-major)", lambda: vinf.ops.group_norm(x, 4, activation="silu"),
        group_norm_apply_reference(x.contiguous(), mean, rstd, activation="silu"))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"),
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default=None, help=argparse.SUPPRESS)   # the child's
    a = ap.parse_args(argv)
    if a.backend:
        print(json.dumps(probe(a.backend, a.device)))
        return 0
    backends = ("reference", "triton", "cuda") if a.device == "cuda" else ("reference", "triton")
    sys.path.insert(0, ROOT)
    from vinf_engine.ops import dispatch, xformers_backend
    dispatch.implementations("dual_scope_attention")
    print(f"xformers: {xformers_backend.STATUS}")
    if xformers_backend.STATUS == "registered":
        backends += ("xformers",)
    bad = 0
    for b in backends:
        if b == "reference":               # nothing to crash: in this process
            for row in probe(b, a.device):
                detail = f"max abs err {row['max_abs_err']:.3g}" if row["result"] == "ok" else row["why"]
                print(f"{b:<10} {row['op']:<28} {row['result']:<8} {detail}")
                bad += row["result"] == "ERROR"
            continue
        env = dict(os.environ, VINF_BACKEND=b)
        if a.device == "cpu":
            env["TRITON_INTERPRET"] = "1"
        p = subprocess.run([sys.executable, __file__, "--device", a.device, "--backend", b],
                           env=env, capture_output=True, text=True, timeout=120)
        if p.returncode != 0:
            print(f"{b:<10} PROCESS DIED (rc {p.returncode}): {p.stderr.strip()[-400:]}")
            bad += 1
            continue
        for row in json.loads(p.stdout.strip().splitlines()[-1]):
            detail = (f"max abs err {row['max_abs_err']:.3g}" if row["result"] == "ok"
                      else row["why"])
            print(f"{b:<10} {row['op']:<28} {row['result']:<8} {detail}")
            bad += row["result"] == "ERROR"
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
