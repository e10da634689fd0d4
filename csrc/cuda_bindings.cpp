// pybind11 bindings of the CUDA kernels (compiled only when the build found a CUDA compiler).
// Tensors cross as integers: data pointers, element strides, the CUDA stream handle and the
// device index; vinf_engine/ops/cuda_backend.py does the torch side. C++ exceptions map to
// Python: std::invalid_argument -> ValueError, std::runtime_error -> RuntimeError.
#ifdef VINF_WITH_CUDA
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>

#include "kernels.h"
#include "vinf.h"

namespace py = pybind11;
using i64 = std::int64_t;

namespace vinf {
namespace {

SeqTensor seq_tensor(const std::array<i64, 4>& t) { return SeqTensor{t[0], t[1], t[2], t[3]}; }

py::dict plan_dict(const GroupNormPlan& p) {
  py::dict d;
  d["vec"] = p.vec;
  d["threads"] = p.threads;
  d["chunk"] = p.chunk;
  d["splits"] = p.splits;
  d["blocks"] = p.blocks;
  d["workspace_floats"] = p.ws_floats;
  return d;
}

}  // namespace

void register_cuda(py::module_& m) {
  m.attr("DTYPE_CODES") = py::dict(py::arg("float32") = int(kF32), py::arg("float16") = int(kF16),
                                    py::arg("bfloat16") = int(kBF16), py::arg("float64") = int(kF64));

  m.def("group_norm_partials_plan",
        [](i64 N, i64 C, i64 S, i64 G, bool channels_last, int dtype, i64 x_ptr, int sm_count) {
          return plan_dict(group_norm_partials_plan(N, C, S, G, channels_last, dtype, x_ptr, sm_count));
        },
        py::arg("N"), py::arg("C"), py::arg("S"), py::arg("G"), py::arg("channels_last"),
        py::arg("dtype"), py::arg("x_ptr"), py::arg("sm_count"),
        "Launch plan of the partials kernel (pure; no GPU needed).");
  m.def("group_norm_apply_plan",
        [](i64 N, i64 C, i64 S, bool channels_last, int dtype, i64 x_ptr, i64 y_ptr, int sm_count) {
          return plan_dict(group_norm_apply_plan(N, C, S, channels_last, dtype, x_ptr, y_ptr, sm_count));
        },
        py::arg("N"), py::arg("C"), py::arg("S"), py::arg("channels_last"), py::arg("dtype"),
        py::arg("x_ptr"), py::arg("y_ptr"), py::arg("sm_count"),
        "Launch plan of the apply kernel (pure; no GPU needed).");
  m.def("group_norm_partials", &group_norm_partials, py::arg("x"), py::arg("dtype"), py::arg("N"),
        py::arg("C"), py::arg("S"), py::arg("G"), py::arg("channels_last"), py::arg("out"),
        py::arg("workspace"), py::arg("workspace_floats"), py::arg("sm_count"), py::arg("stream"),
        py::arg("device"),
        "x (N, C, S) -> out (N, G, 2) fp64 [sum x, sum x^2] through an fp32 workspace.");
  m.def("group_norm_apply",
        [](i64 x, i64 y, int dtype, i64 N, i64 C, i64 S, i64 G, bool channels_last,
           const std::array<i64, 4>& mean, const std::array<i64, 4>& rstd, int stat_dtype,
           const std::array<i64, 3>& weight, const std::array<i64, 3>& bias, bool silu,
           int sm_count, i64 stream, int device) {
          // mean/rstd: (ptr, stride_n, stride_g, unused); weight/bias: (ptr, dtype, stride)
          const GroupNormStats st{mean[0], rstd[0], stat_dtype, mean[1], mean[2], rstd[1], rstd[2]};
          const GroupNormAffine af{weight[0], bias[0], int(weight[1]), int(bias[1]), weight[2], bias[2]};
          group_norm_apply(x, y, dtype, N, C, S, G, channels_last, st, af, silu, sm_count, stream, device);
        },
        py::arg("x"), py::arg("y"), py::arg("dtype"), py::arg("N"), py::arg("C"), py::arg("S"),
        py::arg("G"), py::arg("channels_last"), py::arg("mean"), py::arg("rstd"),
        py::arg("stat_dtype"), py::arg("weight"), py::arg("bias"), py::arg("silu"),
        py::arg("sm_count"), py::arg("stream"), py::arg("device"),
        "y = act((x - mean) * rstd * weight + bias) in x's layout.");

  m.def("dual_scope_attention_plan",
        [](i64 num_seq, int F, int nloc, int ng, int D, int dtype) {
          const AttentionPlan p = dual_scope_attention_plan(num_seq, F, nloc, ng, D, dtype);
          py::dict d;
          d["seqs_per_cta"] = p.seqs_per_cta;
          d["q_rows"] = p.q_rows;
          d["rows_per_seq"] = p.rows_per_seq;
          d["smem_bytes"] = p.smem_bytes;
          d["ctas"] = p.ctas;
          return d;
        },
        py::arg("num_seq"), py::arg("F"), py::arg("nloc"), py::arg("ng"), py::arg("D"),
        py::arg("dtype"), "Launch plan of the attention kernel (pure; no GPU needed).");
  m.def("dual_scope_attention",
        [](const std::array<i64, 4>& q, const std::array<i64, 4>& k, const std::array<i64, 4>& v,
           const std::array<i64, 4>& kg, const std::array<i64, 4>& vg, const std::array<i64, 4>& o,
           i64 lse, int dtype, i64 B, int F, int H, int D, int pad, int window, int valid_left,
           int valid_right, int ng, double scale, double local_bias, double global_bias,
           i64 stream, int device) {
          dual_scope_attention(seq_tensor(q), seq_tensor(k), seq_tensor(v), seq_tensor(kg),
                               seq_tensor(vg), seq_tensor(o), lse, dtype, B, F, H, D, pad, window,
                               valid_left, valid_right, ng, scale, local_bias, global_bias, stream,
                               device);
        },
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("k_global"), py::arg("v_global"),
        py::arg("out"), py::arg("lse"), py::arg("dtype"), py::arg("B"), py::arg("F"), py::arg("H"),
        py::arg("D"), py::arg("pad"), py::arg("window"), py::arg("valid_left"),
        py::arg("valid_right"), py::arg("ng"), py::arg("scale"), py::arg("local_bias"),
        py::arg("global_bias"), py::arg("stream"), py::arg("device"),
        "Dual-scope attention, tokens_per_frame == 1. Tensors as (ptr, stride_b, stride_l, "
        "stride_h) in elements; lse (B, H, F) fp32 pointer or 0.");
}

}  // namespace vinf
#endif  // VINF_WITH_CUDA
