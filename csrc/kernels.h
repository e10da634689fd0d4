// Host-side interface of the CUDA kernels: plain C++ with integers for pointers, strides and the
// stream, so that the pybind11 bindings (cuda_bindings.cpp) compile without CUDA headers and the
// build never needs torch. Launchers throw std::invalid_argument for arguments they cannot take
// and std::runtime_error (naming the op) for any failed CUDA call, launches included.
#pragma once

#include <cstdint>

namespace vinf {

// dtype codes shared with vinf_engine/ops/cuda_backend.py
enum DTypeCode : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

// ---- GroupNorm --------------------------------------------------------------------------------
// x is (N, C, S) with S the product of the trailing dims, either contiguous or channels-last
// (memory order N, S, C). Groups are G consecutive channels blocks of C / G.

struct GroupNormPlan {
  int vec = 1;               // elements per vector access
  int threads = 256;         // threads per block
  std::int64_t chunk = 0;    // elements (contiguous) or positions (channels-last) per block
  std::int64_t splits = 1;   // blocks per group row (contiguous) or per sample (channels-last)
  std::int64_t blocks = 0;   // grid size
  std::int64_t ws_floats = 0;  // workspace the partials kernel needs (fp32 elements)
};

// Pure functions of the shape (no GPU needed): the tests check them on CPU.
GroupNormPlan group_norm_partials_plan(std::int64_t N, std::int64_t C, std::int64_t S,
                                       std::int64_t G, bool channels_last, int dtype,
                                       std::int64_t x_ptr, int sm_count);
GroupNormPlan group_norm_apply_plan(std::int64_t N, std::int64_t C, std::int64_t S,
                                    bool channels_last, int dtype, std::int64_t x_ptr,
                                    std::int64_t y_ptr, int sm_count);

// out: (N, G, 2) fp64, contiguous: [sum x, M2 + n * mean^2] per group (the reference format).
void group_norm_partials(std::int64_t x, int dtype, std::int64_t N, std::int64_t C,
                         std::int64_t S, std::int64_t G, bool channels_last, std::int64_t out,
                         std::int64_t workspace, std::int64_t workspace_floats, int sm_count,
                         std::int64_t stream, int device);

// y = act((x - mean[n, g]) * rstd[n, g] * weight[c] + bias[c]); y has x's layout and dtype.
// mean/rstd: (N, G) of stat_dtype (fp32 or fp64) with strides (sn, sg); weight/bias: (C,) of
// their own dtype and stride, or 0 for none.
struct GroupNormStats {
  std::int64_t mean, rstd;
  int dtype;
  std::int64_t mean_sn, mean_sg, rstd_sn, rstd_sg;
};
struct GroupNormAffine {
  std::int64_t weight, bias;
  int weight_dtype, bias_dtype;
  std::int64_t weight_stride, bias_stride;
};
void group_norm_apply(std::int64_t x, std::int64_t y, int dtype, std::int64_t N, std::int64_t C,
                      std::int64_t S, std::int64_t G, bool channels_last,
                      const GroupNormStats& stats, const GroupNormAffine& affine, bool silu,
                      int sm_count, std::int64_t stream, int device);

// ---- Dual-scope attention, tokens_per_frame == 1 -----------------------------------------------

// A (B, L, H, D) operand: pointer and element strides of B, L and H (D has stride 1).
struct SeqTensor {
  std::int64_t ptr = 0;
  std::int64_t sb = 0, sl = 0, sh = 0;
};

struct AttentionPlan {
  int seqs_per_cta = 1;       // (b, h) sequences staged in one CTA's shared memory
  int q_rows = 0;             // query rows staged per sequence
  int rows_per_seq = 0;       // q_rows + 2 * local keys + 2 * global keys
  std::int64_t smem_bytes = 0;
  std::int64_t ctas = 0;
};

// num_seq = B * H; nloc = valid local key frames (F + valid_left + valid_right).
AttentionPlan dual_scope_attention_plan(std::int64_t num_seq, int F, int nloc, int ng, int D,
                                        int dtype);

// lse: (B, H, F) fp32 contiguous, or 0 for none.
void dual_scope_attention(const SeqTensor& q, const SeqTensor& k, const SeqTensor& v,
                          const SeqTensor& kg, const SeqTensor& vg, const SeqTensor& o,
                          std::int64_t lse, int dtype, std::int64_t B, int F, int H, int D,
                          int pad, int window, int valid_left, int valid_right, int ng,
                          double scale, double local_bias, double global_bias,
                          std::int64_t stream, int device);

}  // namespace vinf
