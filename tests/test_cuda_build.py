"""The native extension on a CPU machine: it imports; where nvcc is on PATH the CUDA kernels were
compiled into it for sm_80 and sm_90 (plus sm_90 PTX), without register spills, with the
instructions they were written for; the launch plans (pure host code) cover their data; and the
backend module registers nothing and refuses CPU tensors without a GPU."""
import os
import re
import shutil
import subprocess

import pytest
import torch

if os.environ.get("VINF_BUILD_EXT", "1") == "0":
    pytest.skip("installed with VINF_BUILD_EXT=0: no native extension", allow_module_level=True)

from vinf_engine import _C  # noqa: E402
from vinf_engine.ops import cuda_backend, dispatch  # noqa: E402

NVCC = shutil.which("nvcc") is not None and os.environ.get("VINF_CUDA", "") != "0"
needs_cuda_build = pytest.mark.skipif(not NVCC, reason="nvcc not on PATH: built without CUDA")
ENTRY_POINTS = ("group_norm_partials", "group_norm_apply", "dual_scope_attention",
                "group_norm_partials_plan", "group_norm_apply_plan", "dual_scope_attention_plan")
CODES = getattr(_C, "DTYPE_CODES", {"float32": 0, "float16": 1, "bfloat16": 2, "float64": 3})
BF16, F16, F32 = CODES["bfloat16"], CODES["float16"], CODES["float32"]


def test_module_imports():
    assert isinstance(_C.with_cuda, bool)


@needs_cuda_build
def test_built_with_cuda_when_nvcc_is_present():
    assert _C.with_cuda, "nvcc is on PATH but vinf_engine._C was built without CUDA"
    for name in ENTRY_POINTS:
        assert callable(getattr(_C, name)), name


def _cuobjdump():
    exe = shutil.which("cuobjdump")
    if exe is None:     # Triton's wheel carries one
        try:
            import triton
        except ImportError:
            return None
        cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                            "cuobjdump")
        exe = cand if os.access(cand, os.X_OK) else None
    return exe


def _dump(*flags):
    exe = _cuobjdump()
    if exe is None:
        pytest.skip("no cuobjdump (neither on PATH nor in the triton package)")
    res = subprocess.run([exe, *flags, _C.__file__], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout


@needs_cuda_build
def test_machine_code_for_ampere_and_hopper():
    elf, ptx = _dump("--list-elf"), _dump("--list-ptx")
    for unit in ("attention", "group_norm"):
        assert f"{unit}.sm_80.cubin" in elf and f"{unit}.sm_90.cubin" in elf, elf
        assert f"{unit}.sm_90.ptx" in ptx, ptx


@needs_cuda_build
def test_no_kernel_uses_local_memory():
    usage = _dump("--dump-resource-usage")
    funcs = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    kernels = [f for f in funcs if "kernel" in f[0]]
    assert len(kernels) >= 2 * 30, f"expected every kernel instantiation twice, found {len(kernels)}"
    spilled = [(name, stack, local) for name, _, stack, local in kernels if stack != "0" or local != "0"]
    assert not spilled, spilled


@needs_cuda_build
def test_kernels_use_the_intended_instructions():
    sass = _dump("--dump-sass", "-arch", "sm_90")
    bodies = {}
    for m in re.finditer(r"Function : (\S+)\n(.*?)(?=\n\s*Function : |\Z)", sass, re.S):
        bodies[m.group(1)] = m.group(2)

    def body(*parts):
        hits = [b for n, b in bodies.items() if all(p in n for p in parts)]
        assert hits, f"no kernel named like {parts}"
        return hits[0]

    for dt in ("13__nv_bfloat16", "6__half"):
        for d in ("Li64", "Li128"):
            b = body("dsa_mma_kernel", dt, d)
            assert "HMMA.16816.F32" in b          # tensor cores
            assert "LDSM.16.M88.4" in b and "LDSM.16.MT88.4" in b   # ldmatrix (+ .trans for V)
            assert "LDGSTS.E.BYPASS.128" in b     # 16-byte cp.async staging
            assert "STG.E.128" in b               # 16-byte output stores
    for k in ("gn_partials_contig_kernelI13__nv_bfloat16Li8", "gn_apply_contig_kernelI13__nv_bfloat16Li8",
              "gn_partials_cl_kernelI13__nv_bfloat16Li8", "gn_apply_cl_kernelI13__nv_bfloat16Li8"):
        assert "LDG.E.128" in body(k), k       # 16-byte loads
    assert "STG.E.128" in body("gn_apply_contig_kernelI13__nv_bfloat16Li8")


# ---- launch plans: pure host code, checked without a GPU ----------------------------------------

cuda_plans = pytest.mark.skipif(not _C.with_cuda, reason="built without CUDA")


@cuda_plans
@pytest.mark.parametrize("dtype,elt", [(BF16, 2), (F16, 2), (F32, 4)])
@pytest.mark.parametrize("shape", [(2, 320, 16 * 40 * 64, 32), (2, 64, 315, 32), (3, 6, 1, 2),
                                   (1, 1280, 8 * 5 * 8, 32), (64, 24, 7, 6), (1, 32, 40_000_000, 32)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("sm", [1, 132])
def test_group_norm_partials_plan_covers_every_element(dtype, elt, shape, channels_last, sm):
    N, C, S, G = shape
    p = _C.group_norm_partials_plan(N, C, S, G, channels_last, dtype, 256, sm)
    total = S if channels_last else (C // G) * S         # positions or elements per block row
    per_unit = C // G if channels_last else 1
    assert p["splits"] >= 1 and (p["splits"] - 1) * p["chunk"] < total <= p["splits"] * p["chunk"]
    assert p["chunk"] * per_unit < 2 ** 24                # fp32 block counts stay exact
    assert p["vec"] in (1, 16 // elt)
    if channels_last:
        assert p["threads"] % (C // p["vec"]) == 0 and p["threads"] <= 512
        assert p["blocks"] == N * p["splits"]
        assert p["vec"] == (16 // elt if C % (16 // elt) == 0 else 1)
    else:
        assert p["chunk"] % (256 * p["vec"] * 4) == 0
        assert p["blocks"] == N * G * p["splits"]
        assert p["vec"] == (16 // elt if (C // G * S) % (16 // elt) == 0 else 1)
    assert p["workspace_floats"] == 2 * N * G * p["splits"] + N * G


@cuda_plans
def test_group_norm_plans_fall_back_to_scalar_access_when_misaligned():
    for cl in (False, True):
        assert _C.group_norm_partials_plan(2, 320, 1024, 32, cl, BF16, 256, 132)["vec"] == 8
        assert _C.group_norm_partials_plan(2, 320, 1024, 32, cl, BF16, 258, 132)["vec"] == 1
        assert _C.group_norm_apply_plan(2, 320, 1024, cl, BF16, 256, 512, 132)["vec"] == 8
        assert _C.group_norm_apply_plan(2, 320, 1024, cl, BF16, 256, 514, 132)["vec"] == 1


@cuda_plans
def test_group_norm_plans_reject_what_the_kernels_cannot_take():
    with pytest.raises(ValueError, match="channels-last C"):
        _C.group_norm_partials_plan(1, 8200, 4, 8200 // 8, True, BF16, 256, 132)
    with pytest.raises(ValueError, match="num_groups"):
        _C.group_norm_partials_plan(1, 10, 4, 3, False, BF16, 256, 132)
    with pytest.raises(ValueError, match="fp32, fp16 or bf16"):
        _C.group_norm_apply_plan(1, 8, 4, False, CODES["float64"], 256, 256, 132)


@cuda_plans
def test_attention_plan_at_the_spec_shapes():
    # 16 query frames, 24 local + 8 global keys, bf16, 64-dim: 4 sequences per CTA, 80 rows each
    p = _C.dual_scope_attention_plan(12800, 16, 24, 8, 64, BF16)
    assert (p["seqs_per_cta"], p["q_rows"], p["rows_per_seq"]) == (4, 16, 80)
    assert p["smem_bytes"] == 4 * 80 * (64 * 2 + 16) and p["ctas"] == 3200
    # 64 query frames, 80 local + 16 global: one sequence (4 tiles = 4 warps) per CTA
    p = _C.dual_scope_attention_plan(12800, 64, 80, 16, 64, BF16)
    assert (p["seqs_per_cta"], p["rows_per_seq"], p["ctas"]) == (1, 64 + 160 + 32, 12800)
    # odd sizes: whole 16-row tiles for the tensor cores, exact rows for fp32
    assert _C.dual_scope_attention_plan(5, 17, 20, 3, 128, F16)["q_rows"] == 32
    assert _C.dual_scope_attention_plan(5, 17, 20, 3, 128, F32)["q_rows"] == 17
    # never more sequences than exist, and every sequence in some CTA
    for n in (1, 3, 70001):
        p = _C.dual_scope_attention_plan(n, 16, 24, 8, 64, BF16)
        assert p["seqs_per_cta"] <= n and p["ctas"] * p["seqs_per_cta"] >= n
    with pytest.raises(ValueError, match="head dim"):
        _C.dual_scope_attention_plan(1, 4, 4, 0, 96, BF16)


# ---- the Python backend without a GPU ----------------------------------------------------------

def test_layout_classification():
    x = torch.randn(2, 8, 3, 4, 5)
    assert cuda_backend.gn_layout(x) == "contiguous"
    assert cuda_backend.gn_layout(x.to(memory_format=torch.channels_last_3d)) == "channels_last"
    assert cuda_backend.gn_layout(x.transpose(3, 4)) is None
    assert cuda_backend.gn_layout(x[:, ::2]) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_no_gpu_no_registration_and_cpu_tensors_refused():
    dispatch._load_backends("auto")
    for op in ("dual_scope_attention", "group_norm_partials", "group_norm_apply"):
        assert "cuda" not in dispatch._IMPLS[op]
    x = torch.randn(2, 8, 3, 4, 5)
    assert cuda_backend.group_norm_partials_supports(x, 4) is not None
    q = torch.randn(2, 4, 1, 64)
    k = torch.randn(2, 6, 1, 64)
    assert cuda_backend.dual_scope_attention_supports(
        q, k, k, window=1, pad=1, valid_left=1, valid_right=1) is not None


def test_wrong_sizes_never_reach_the_kernels():
    """The launchers trust sizes with raw pointers; the wrappers check them first (here on CPU
    tensors: the ValueError comes before any pointer is used)."""
    q = torch.randn(2, 4, 1, 64)
    k = torch.randn(2, 6, 1, 64)
    out = torch.empty_like(q)
    kw = dict(window=1, pad=1, valid_left=1, valid_right=1, local_bias=0.0, global_bias=0.0,
              scale=None)
    with pytest.raises(ValueError, match="v must have shape"):
        cuda_backend._dual_scope_attention_into(out, None, q, k, k[:, :5], None, None, **kw)
    with pytest.raises(ValueError, match="k_global must have shape"):
        cuda_backend._dual_scope_attention_into(out, None, q, k, k, torch.randn(2, 3, 2, 64),
                                                torch.randn(2, 3, 1, 64), **kw)
    x = torch.randn(2, 8, 3, 4)
    mean = torch.zeros(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="mean and rstd"):
        cuda_backend._group_norm_apply_into(torch.empty_like(x), x, mean[:1], mean[:1])
    with pytest.raises(ValueError, match="weight must have shape"):
        cuda_backend._group_norm_apply_into(torch.empty_like(x), x, mean, mean, torch.ones(7))
