"""Compile every kernel for an NVIDIA GPU on a machine without one, as the launchers would.

    python -m vinf_engine.kernels.compile_check            # sm_90 (H100/H200), SPEC shapes
    python -m vinf_engine.kernels.compile_check --arch 100 --json

The Triton interpreter (the CPU tests) runs the kernels' arithmetic but not the compiler:
it accepts code that the GPU compiler rejects (non-constexpr globals, unsupported layouts)
and says nothing about registers. This runs each launcher on meta tensors with the SPEC
shapes, captures the launch it would make (grid, arguments, constexprs, warps, stages),
applies the specialization a real launch gets (integer 1 -> constexpr, multiples of 16 and
pointers -> divisibility 16), and compiles it down to a cubin with the ptxas bundled with
Triton. Reported per kernel: registers per thread, stack bytes (spills), shared memory.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise SystemExit("compile_check compiles for a GPU: unset TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from . import dit_attention, group_norm, temporal_attention  # noqa: E402

H200_SMS = 132

_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
          torch.float64: "fp64"}


class _Capture:
    """Stands in for a @triton.jit kernel: records ``kernel[grid](*args, **kwargs)``."""

    def __init__(self, fn, launches):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.fn, grid, args, kwargs))


def _source(fn, args, kwargs):
    """The ASTSource a launch with these arguments compiles, specialized as Triton does."""
    sig, constexprs, attrs = {}, {}, {}
    values = dict(zip(fn.arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
    for i, name in enumerate(fn.arg_names):
        v = values[name]
        if fn.params[i].is_constexpr:
            sig[name], constexprs[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _TYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            if v == 1:
                sig[name], constexprs[name] = "constexpr", 1
            else:
                sig[name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={v!r}")
    return ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)


def _usage(cubin: bytes) -> dict:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", out)
    return dict(registers=int(m.group(1)), stack_bytes=int(m.group(2)))


def capture(launcher, modules, *args, **kwargs) -> list:
    """Run ``launcher`` with every jit kernel of ``modules`` replaced by a recorder."""
    launches, saved = [], []
    for mod in modules:
        for name in dir(mod):
            obj = getattr(mod, name)
            if isinstance(obj, triton.runtime.jit.JITFunction) and name.startswith("_") \
                    and "fwd" in name:
                saved.append((mod, name, obj))
                setattr(mod, name, _Capture(obj, launches))
        if hasattr(mod, "num_sms"):
            saved.append((mod, "num_sms", mod.num_sms))
            mod.num_sms = lambda device: H200_SMS
    try:
        launcher(*args, **kwargs)
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)
    return launches


def cases(dtype):
    """(label, launcher, modules, args, kwargs) at the SPEC section 5 shapes, on meta."""
    m = dict(device="meta", dtype=dtype)
    out = []
    for n_seq, F, halo, G, D in [(12800, 16, 4, 8, 64), (12800, 64, 8, 16, 64),
                                 (12800, 24, 4, 16, 128)]:
        B = n_seq // 5
        q = torch.empty(B, F, 5, D, **m)
        k = torch.empty(B, F + 2 * halo, 5, D, **m)
        g = torch.empty(B, G, 5, D, **m)
        kw = dict(window=halo, pad=halo, valid_left=halo, valid_right=halo, local_bias=0.0,
                  global_bias=0.0, scale=D ** -0.5, return_lse=True)
        out.append((f"temporal {n_seq}x{F}q +-{halo} {G}g d{D}",
                    temporal_attention.temporal_attention, [temporal_attention],
                    (q, k, k, g, g), kw))
    for T, F, w, Ng, H, D in [(1560, 21, 2, 3 * 1560, 12, 128), (1024, 8, 1, 1024, 16, 64)]:
        q = torch.empty(1, F * T, H, D, **m)
        k = torch.empty(1, (F + 2 * w) * T, H, D, **m)
        g = torch.empty(1, Ng, H, D, **m)
        kw = dict(window=w, pad=w, valid_left=0, valid_right=0, tokens_per_frame=T,
                  local_bias=0.0, global_bias=0.0, scale=D ** -0.5, return_lse=True)
        out.append((f"dit {F}x{T} +-{w} {Ng}g {H}x{D}", dit_attention.dit_attention,
                    [dit_attention], (q, k, k, g, g), kw))
        # The global scope alone (interior frames' global part, Wan's clamped scope).
        out.append((f"dit global {F}x{T} {Ng}g {H}x{D}", dit_attention.global_attention,
                    [dit_attention], (q, g, g), dict(scale=D ** -0.5, bias=0.0)))
    for layout in ("contiguous", "channels_last"):
        x = torch.empty(2, 320, 16, 40, 64, **m)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last_3d)
        out.append((f"group_norm partials {layout}", group_norm.group_norm_partials,
                    [group_norm], (x, 32), {}))
        st = torch.empty(2, 32, device="meta", dtype=torch.float64)
        w = torch.empty(320, **m)
        out.append((f"group_norm apply+silu {layout}", group_norm.group_norm_apply,
                    [group_norm], (x, st, st, w, w, "silu"), {}))
    return out


def run(arch: int = 90, dtypes=(torch.bfloat16, torch.float16, torch.float32)) -> list[dict]:
    target = GPUTarget("cuda", arch, 32)
    rows = []
    for dtype in dtypes:
        for label, launcher, modules, args, kwargs in cases(dtype):
            for fn, grid, a, kw in capture(launcher, modules, *args, **kwargs):
                row = dict(case=label, dtype=_TYPES[dtype], kernel=fn.__name__,
                           num_warps=kw.get("num_warps", 4), num_stages=kw.get("num_stages", 3),
                           tiles={k: v for k, v in kw.items() if k.startswith(("BLOCK", "SEQ"))})
                try:
                    compiled = triton.compile(
                        _source(fn, a, kw), target=target,
                        options=dict(num_warps=row["num_warps"], num_stages=row["num_stages"]))
                    row.update(_usage(compiled.asm["cubin"]), shared_bytes=compiled.metadata.shared)
                except Exception as e:  # noqa: BLE001 - reported per kernel
                    row["error"] = f"{type(e).__name__}: {e}"[:400]
                rows.append(row)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32", "all"), default="all")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    a = p.parse_args()
    pick = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtypes = tuple(pick.values()) if a.dtype == "all" else (pick[a.dtype],)
    rows = run(a.arch, dtypes)
    for r in rows:
        if a.json:
            print(json.dumps(r))
        else:
            usage = r.get("error") or (f"{r['registers']:3d} regs  {r['stack_bytes']:4d} B stack  "
                                       f"{r['shared_bytes']:6d} B smem")
            print(f"{r['dtype']:4s} {r['case']:38s} {r['kernel']:20s} w{r['num_warps']} "
                  f"s{r['num_stages']}  {usage}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
