// GroupNorm for video tensors in three launches, so that a cross-rank all-reduce fits between
// the statistics and the apply (see vinf_engine/ops/group_norm.py):
//
//   partials  many blocks per group; each thread keeps fp32 (count, mean, M2), updated once per
//             batch of UNROLL 16-byte loads (two-pass inside the batch, then a Chan merge), the
//             block merges its threads Chan-style and writes (mean, M2) to a workspace. Values
//             are shifted by a pivot (an element of the group) first, so fp32 rounding scales
//             with the spread of the data, not with |mean|: a group with mean 1e3 * std keeps
//             its variance to fp32 accuracy.
//   merge     one warp per group merges its blocks in fp64 and writes the reference format
//             [sum x, M2 + n * mean^2] (fp64), which the all-reduce then sums across ranks
//   apply     y = act((x - mean) * rstd * w + b), one read and one write, 16-byte accesses
//
// Layouts: contiguous (N, C, S), where a group is one contiguous run of (C / G) * S elements,
// and channels-last (memory order N, S, C), where a thread owns VEC fixed channels and walks
// spatial positions, so no per-element index division is ever needed.
#include "cuda_common.cuh"

#include <algorithm>

namespace vinf {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;               // 16-byte loads in flight per thread per iteration
static_assert(kUnroll == 4, "the partial-sum trees below are written for 4 packs");
constexpr std::int64_t kMaxBlockCount = std::int64_t{1} << 22;  // keeps fp32 counts exact
constexpr int kBlocksPerSm = 8;          // 8 x 256 threads fill an SM: one balanced wave
// Channels-last blocks span all C / VEC channel vectors of a position; 512 threads at most, so
// that the compiler keeps 128 registers per thread (at 1024 it had to spill).
constexpr int kClMaxThreads = 512;

std::int64_t cdiv(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }
std::int64_t round_up(std::int64_t a, std::int64_t b) { return cdiv(a, b) * b; }

// ---- Chan merge of (count, mean, M2) --------------------------------------------------------

template <typename F>
__device__ __forceinline__ void chan_merge(F& n, F& mean, F& m2, F nb, F meanb, F m2b) {
  if (nb == F(0)) return;
  if (n == F(0)) {
    n = nb;
    mean = meanb;
    m2 = m2b;
    return;
  }
  const F nn = n + nb;
  const F delta = meanb - mean;
  const F wb = nb / nn;
  mean += delta * wb;
  m2 += m2b + delta * delta * n * wb;
  n = nn;
}

template <typename F>
__device__ __forceinline__ void warp_merge(F& n, F& mean, F& m2) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const F nb = __shfl_xor_sync(0xffffffffu, n, o);
    const F mb = __shfl_xor_sync(0xffffffffu, mean, o);
    const F qb = __shfl_xor_sync(0xffffffffu, m2, o);
    chan_merge(n, mean, m2, nb, mb, qb);
  }
}

// ---- partials, contiguous: grid = N*G*splits blocks, block (group, split) ---------------------

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) gn_partials_contig_kernel(
    const T* __restrict__ x, float2* __restrict__ ws, float* __restrict__ pivots, std::int64_t L,
    std::int64_t chunk, std::int64_t splits) {
  const std::int64_t grp = blockIdx.x / splits;
  const std::int64_t split = blockIdx.x - grp * splits;
  const T* base = x + grp * L;
  const float pivot = to_f32(base[0]);  // the same for every block of the group
  const std::int64_t begin = split * chunk;
  const std::int64_t end = min(L, begin + chunk);
  constexpr int kStep = kThreads * VEC;

  float n = 0.f, mean = 0.f, m2 = 0.f;
  for (std::int64_t i0 = begin + threadIdx.x * VEC; i0 < end; i0 += kStep * kUnroll) {
    Pack<T, VEC> p[kUnroll];
    bool ok[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // every load issued before the first use
      ok[u] = i0 + u * kStep < end;      // L and chunk are multiples of VEC: whole packs
      if (ok[u]) p[u] = load_pack<T, VEC>(base + i0 + u * kStep);
    }
    // One partial sum per pack: four short dependency chains instead of one long one.
    float v[kUnroll][VEC], su[kUnroll], cnt = 0.f;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      su[u] = 0.f;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        v[u][e] = ok[u] ? to_f32(p[u].v[e]) - pivot : 0.f;
        su[u] += v[u][e];
      }
      cnt += ok[u] ? float(VEC) : 0.f;
    }
    const float mb = ((su[0] + su[1]) + (su[2] + su[3])) / cnt;
    float qu[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      qu[u] = 0.f;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float d = v[u][e] - mb;
        qu[u] += ok[u] ? d * d : 0.f;
      }
    }
    const float qb = (qu[0] + qu[1]) + (qu[2] + qu[3]);
    chan_merge(n, mean, m2, cnt, mb, qb);
  }

  warp_merge(n, mean, m2);
  __shared__ float sh[3][kThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sh[0][warp] = n;
    sh[1][warp] = mean;
    sh[2][warp] = m2;
  }
  __syncthreads();
  if (warp == 0) {
    const bool has = lane < kThreads / 32;
    n = has ? sh[0][lane] : 0.f;
    mean = has ? sh[1][lane] : 0.f;
    m2 = has ? sh[2][lane] : 0.f;
    warp_merge(n, mean, m2);
    if (lane == 0) {
      ws[blockIdx.x] = make_float2(mean, m2);
      if (split == 0) pivots[grp] = pivot;
    }
  }
}

// ---- partials, channels-last: grid = N*splits blocks, block (sample, split) ------------------
// Threads form rows x cols: a thread owns channels [col*VEC, col*VEC + VEC) and positions
// row, row + rows, ... of its block's range. Per-channel stats merge over rows, then the C / G
// channels of a group (equal counts) merge exactly: M2 = sum M2_c + n_c * sum (mean_c - mean)^2.
// Channel c is shifted by its value at position 0 of the sample; the group's pivot is that of its
// first channel, and channel means move onto it by the (exact, nearby) pivot difference.

template <typename T, int VEC>
__global__ void __launch_bounds__(kClMaxThreads) gn_partials_cl_kernel(
    const T* __restrict__ x, float2* __restrict__ ws, float* __restrict__ pivots, int C, int G,
    std::int64_t S, std::int64_t chunk, std::int64_t splits) {
  extern __shared__ float smem[];  // mean[rows][C], m2[rows][C], n[rows], pivot[C]
  const int cols = C / VEC;
  const int rows = blockDim.x / cols;
  const int col = threadIdx.x % cols, row = threadIdx.x / cols;
  const std::int64_t sample = blockIdx.x / splits;
  const std::int64_t split = blockIdx.x - sample * splits;
  const std::int64_t p_begin = split * chunk;
  const std::int64_t p_end = min(S, p_begin + chunk);
  const T* base = x + sample * S * C + col * VEC;
  const Pack<T, VEC> piv = load_pack<T, VEC>(base);

  float mean[VEC], m2[VEC], n = 0.f;
#pragma unroll
  for (int e = 0; e < VEC; ++e) mean[e] = m2[e] = 0.f;

  for (std::int64_t p0 = p_begin + row; p0 < p_end; p0 += std::int64_t(rows) * kUnroll) {
    Pack<T, VEC> p[kUnroll];
    bool ok[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const std::int64_t pos = p0 + std::int64_t(u) * rows;
      ok[u] = pos < p_end;
      if (ok[u]) p[u] = load_pack<T, VEC>(base + pos * C);
    }
    float cnt = 0.f;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) cnt += ok[u] ? 1.f : 0.f;
    const float inv = 1.f / cnt;
    const float nn = n + cnt;
    const float wb = cnt / nn;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      float v[kUnroll], sum = 0.f;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        v[u] = ok[u] ? to_f32(p[u].v[e]) - to_f32(piv.v[e]) : 0.f;
        sum += v[u];
      }
      const float mb = sum * inv;
      float qb = 0.f;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const float d = v[u] - mb;
        qb += ok[u] ? d * d : 0.f;
      }
      const float delta = mb - mean[e];
      mean[e] += delta * wb;  // n == 0: wb == 1 up to rounding, mean[e] == 0: exact enough
      m2[e] += qb + delta * delta * n * wb;
    }
    n = nn;
  }

  float* s_mean = smem;
  float* s_m2 = smem + rows * C;
  float* s_n = smem + 2 * rows * C;
  float* s_piv = s_n + rows;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    s_mean[row * C + col * VEC + e] = mean[e];
    s_m2[row * C + col * VEC + e] = m2[e];
    if (row == 0) s_piv[col * VEC + e] = to_f32(piv.v[e]);
  }
  if (col == 0) s_n[row] = n;
  __syncthreads();
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float cn = 0.f, cm = 0.f, cq = 0.f;
    for (int r = 0; r < rows; ++r) chan_merge(cn, cm, cq, s_n[r], s_mean[r * C + c], s_m2[r * C + c]);
    s_mean[c] = cm + (s_piv[c] - s_piv[c - c % (C / G)]);  // onto the group's pivot
    s_m2[c] = cq;
  }
  __syncthreads();
  const int cg = C / G;
  const float n_chan = float(p_end - p_begin);
  for (int g = threadIdx.x; g < G; g += blockDim.x) {
    float msum = 0.f;
    for (int c = g * cg; c < (g + 1) * cg; ++c) msum += s_mean[c];
    const float mg = msum / float(cg);
    float q = 0.f;
    for (int c = g * cg; c < (g + 1) * cg; ++c) {
      const float d = s_mean[c] - mg;
      q += s_m2[c] + n_chan * d * d;
    }
    ws[(sample * G + g) * splits + split] = make_float2(mg, q);
    if (split == 0) pivots[sample * G + g] = s_piv[g * cg];
  }
}

// ---- merge: one warp per group, fp64 --------------------------------------------------------
// Block counts come from the plan (exact integers), not from the fp32 workspace.

__global__ void __launch_bounds__(kThreads) gn_merge_kernel(
    const float2* __restrict__ ws, const float* __restrict__ pivots, double* __restrict__ out,
    std::int64_t groups,
    std::int64_t splits, std::int64_t chunk, std::int64_t total, std::int64_t mult) {
  const std::int64_t grp = (std::int64_t(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (grp >= groups) return;  // whole warps leave together
  double n = 0.0, mean = 0.0, m2 = 0.0;
  for (std::int64_t s = lane; s < splits; s += 32) {
    const double nb = double(min(chunk, total - s * chunk) * mult);
    const float2 w = ws[grp * splits + s];
    chan_merge(n, mean, m2, nb, double(w.x), double(w.y));
  }
  warp_merge(n, mean, m2);
  if (lane == 0) {
    mean += double(pivots[grp]);
    out[grp * 2] = n * mean;
    out[grp * 2 + 1] = m2 + n * mean * mean;
  }
}

// ---- apply ----------------------------------------------------------------------------------

// A parameter of any dtype code (kF32/kF16/kBF16/kF64): a run-time switch here saves the Python
// side a conversion kernel per call. Used only outside unrolled loops (unrolled per channel it
// multiplied the kernel's code size twentyfold).
__device__ __forceinline__ float load_any(const void* p, int dtype, std::int64_t i) {
  switch (dtype) {
    case kF16: return __half2float(static_cast<const __half*>(p)[i]);
    case kBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case kF64: return static_cast<float>(static_cast<const double*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

struct ApplyArgs {
  GroupNormStats st;
  GroupNormAffine af;
  int C, G;
  bool silu;
};

// Per-channel (mean, scale = rstd * w, bias).
__device__ __forceinline__ void channel_params(const ApplyArgs& a, std::int64_t n, int c,
                                               float& m, float& s, float& b) {
  const int g = c / (a.C / a.G);
  m = load_any(reinterpret_cast<const void*>(a.st.mean), a.st.dtype, n * a.st.mean_sn + g * a.st.mean_sg);
  s = load_any(reinterpret_cast<const void*>(a.st.rstd), a.st.dtype, n * a.st.rstd_sn + g * a.st.rstd_sg);
  if (a.af.weight) s *= load_any(reinterpret_cast<const void*>(a.af.weight), a.af.weight_dtype, c * a.af.weight_stride);
  b = a.af.bias ? load_any(reinterpret_cast<const void*>(a.af.bias), a.af.bias_dtype, c * a.af.bias_stride) : 0.f;
}

__device__ __forceinline__ float act(float y, bool silu) {
  // y * sigmoid(y); for y < -88, __expf overflows to inf and the quotient is -0: the limit.
  return silu ? __fdividef(y, 1.f + __expf(-y)) : y;
}

// Blocks run in reverse order: the partials kernel finished at the end of x, whose last tens
// of MB may still sit in L2, so starting there saves some of this read.
__device__ __forceinline__ std::int64_t reversed_block() {
  return std::int64_t(gridDim.x) - 1 - blockIdx.x;
}

// Contiguous: block (row = n*C + c, part); grid = N*C*parts.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) gn_apply_contig_kernel(
    const T* __restrict__ x, T* __restrict__ y, const ApplyArgs a, std::int64_t S,
    std::int64_t parts) {
  const std::int64_t bid = reversed_block();
  const std::int64_t row = bid / parts;
  const std::int64_t part = bid - row * parts;
  const std::int64_t n = row / a.C;
  const int c = int(row - n * a.C);
  float m, s, b;
  constexpr int kStep = kThreads * VEC;
  const std::int64_t i0 = part * kStep * kUnroll + threadIdx.x * VEC;
  const T* xr = x + row * S;
  T* yr = y + row * S;
  Pack<T, VEC> p[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u)
    if (i0 + u * kStep < S) p[u] = load_pack<T, VEC>(xr + i0 + u * kStep);
  channel_params(a, n, c, m, s, b);  // its loads overlap the x loads above
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (i0 + u * kStep < S) {
      Pack<T, VEC> o;
#pragma unroll
      for (int e = 0; e < VEC; ++e) o.v[e] = from_f32<T>(act((to_f32(p[u].v[e]) - m) * s + b, a.silu));
      store_pack<T, VEC>(yr + i0 + u * kStep, o);
    }
  }
}

// Channels-last: block (sample, split) over positions; a thread owns VEC channels, whose
// parameters the block first gathers into shared memory, one channel per thread.
template <typename T, int VEC>
__global__ void __launch_bounds__(kClMaxThreads) gn_apply_cl_kernel(
    const T* __restrict__ x, T* __restrict__ y, const ApplyArgs a, std::int64_t S,
    std::int64_t chunk, std::int64_t splits) {
  extern __shared__ float sp[];  // mean[C], scale[C], bias[C]
  const int cols = a.C / VEC;
  const int rows = blockDim.x / cols;
  const int col = threadIdx.x % cols, row = threadIdx.x / cols;
  const std::int64_t bid = reversed_block();
  const std::int64_t sample = bid / splits;
  const std::int64_t split = bid - sample * splits;
  const std::int64_t p_end = min(S, (split + 1) * chunk);
  for (int c = threadIdx.x; c < a.C; c += blockDim.x)
    channel_params(a, sample, c, sp[c], sp[a.C + c], sp[2 * a.C + c]);
  __syncthreads();
  float m[VEC], s[VEC], b[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    m[e] = sp[col * VEC + e];
    s[e] = sp[a.C + col * VEC + e];
    b[e] = sp[2 * a.C + col * VEC + e];
  }
  const std::int64_t off = sample * S * a.C + col * VEC;
  for (std::int64_t p0 = split * chunk + row; p0 < p_end; p0 += std::int64_t(rows) * kUnroll) {
    Pack<T, VEC> p[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const std::int64_t pos = p0 + std::int64_t(u) * rows;
      if (pos < p_end) p[u] = load_pack<T, VEC>(x + off + pos * a.C);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const std::int64_t pos = p0 + std::int64_t(u) * rows;
      if (pos < p_end) {
        Pack<T, VEC> o;
#pragma unroll
        for (int e = 0; e < VEC; ++e) o.v[e] = from_f32<T>(act((to_f32(p[u].v[e]) - m[e]) * s[e] + b[e], a.silu));
        store_pack<T, VEC>(y + off + pos * a.C, o);
      }
    }
  }
}

int elt_bytes(const char* op, int dtype) {
  switch (dtype) {
    case kF32: return 4;
    case kF16:
    case kBF16: return 2;
    default: throw_arg(op, "x must be fp32, fp16 or bf16 (dtype code " + std::to_string(dtype) + ")");
  }
}

// Channels-last thread shape: cols threads across C, rows of them across positions.
void cl_shape(const char* op, std::int64_t C, int vec, int& cols, int& rows) {
  if (C / vec > kClMaxThreads)
    throw_arg(op, "channels-last C / vector width must be <= " + std::to_string(kClMaxThreads) +
                      ", got C = " + std::to_string(C) + " with vectors of " + std::to_string(vec));
  cols = int(C / vec);
  rows = std::max(1, kThreads / cols);
}

void check_shape(const char* op, std::int64_t N, std::int64_t C, std::int64_t S) {
  if (N <= 0 || C <= 0 || S <= 0)
    throw_arg(op, "N, C and S must be positive (the Python side handles empty tensors)");
}

constexpr char kPartials[] = "group_norm_partials";
constexpr char kApply[] = "group_norm_apply";

}  // namespace

GroupNormPlan group_norm_partials_plan(std::int64_t N, std::int64_t C, std::int64_t S,
                                       std::int64_t G, bool channels_last, int dtype,
                                       std::int64_t x_ptr, int sm_count) {
  check_shape(kPartials, N, C, S);
  if (G <= 0 || C % G) throw_arg(kPartials, "num_groups must divide C");
  const int elt = elt_bytes(kPartials, dtype);
  const int max_vec = 16 / elt;
  const std::int64_t target = std::int64_t(std::max(sm_count, 1)) * kBlocksPerSm;
  const std::int64_t cg = C / G;
  GroupNormPlan p;
  if (!channels_last) {
    const std::int64_t L = cg * S;
    p.vec = (L % max_vec == 0 && aligned(x_ptr, 16)) ? max_vec : 1;
    p.threads = kThreads;
    const std::int64_t quantum = std::int64_t(kThreads) * p.vec * kUnroll;
    std::int64_t splits = std::min(cdiv(target, N * G), cdiv(L, quantum));
    splits = std::max({splits, cdiv(L, kMaxBlockCount), std::int64_t{1}});
    p.chunk = round_up(cdiv(L, splits), quantum);
    p.splits = cdiv(L, p.chunk);
  } else {
    p.vec = (C % max_vec == 0 && aligned(x_ptr, 16)) ? max_vec : 1;
    int cols, rows;
    cl_shape(kPartials, C, p.vec, cols, rows);
    p.threads = cols * rows;
    if ((2 * std::int64_t(rows) * C + rows + C) * 4 > 48 * 1024)
      throw_arg(kPartials, "channels-last C too large for the statistics tile: C = " + std::to_string(C));
    const std::int64_t quantum = std::int64_t(rows) * kUnroll;
    std::int64_t splits = std::min(cdiv(target, N), cdiv(S, quantum));
    splits = std::max({splits, cdiv(S * cg, kMaxBlockCount), std::int64_t{1}});
    p.chunk = round_up(cdiv(S, splits), quantum);
    p.splits = cdiv(S, p.chunk);
  }
  p.blocks = (channels_last ? N : N * G) * p.splits;
  p.ws_floats = 2 * N * G * p.splits + N * G;  // (mean, M2) per block, then a pivot per group
  if (p.blocks > 0x7fffffff) throw_arg(kPartials, "tensor too large for one grid");
  return p;
}

GroupNormPlan group_norm_apply_plan(std::int64_t N, std::int64_t C, std::int64_t S,
                                    bool channels_last, int dtype, std::int64_t x_ptr,
                                    std::int64_t y_ptr, int sm_count) {
  check_shape(kApply, N, C, S);
  const int elt = elt_bytes(kApply, dtype);
  const int max_vec = 16 / elt;
  const bool al = aligned(x_ptr, 16) && aligned(y_ptr, 16);
  GroupNormPlan p;
  if (!channels_last) {
    p.vec = (S % max_vec == 0 && al) ? max_vec : 1;
    p.threads = kThreads;
    p.chunk = std::int64_t(kThreads) * p.vec * kUnroll;
    p.splits = cdiv(S, p.chunk);
    p.blocks = N * C * p.splits;
  } else {
    p.vec = (C % max_vec == 0 && al) ? max_vec : 1;
    int cols, rows;
    cl_shape(kApply, C, p.vec, cols, rows);
    p.threads = cols * rows;
    if (3 * C * 4 > 48 * 1024)
      throw_arg(kApply, "channels-last C too large for the parameter table: C = " + std::to_string(C));
    const std::int64_t target = std::int64_t(std::max(sm_count, 1)) * kBlocksPerSm;
    const std::int64_t quantum = std::int64_t(rows) * kUnroll;
    const std::int64_t splits = std::max<std::int64_t>(1, std::min(cdiv(target, N), cdiv(S, quantum)));
    p.chunk = round_up(cdiv(S, splits), quantum);
    p.splits = cdiv(S, p.chunk);
    p.blocks = N * p.splits;
  }
  if (p.blocks > 0x7fffffff) throw_arg(kApply, "tensor too large for one grid");
  return p;
}

void group_norm_partials(std::int64_t x, int dtype, std::int64_t N, std::int64_t C,
                         std::int64_t S, std::int64_t G, bool channels_last, std::int64_t out,
                         std::int64_t workspace, std::int64_t workspace_floats, int sm_count,
                         std::int64_t stream, int device) {
  const GroupNormPlan p = group_norm_partials_plan(N, C, S, G, channels_last, dtype, x, sm_count);
  if (workspace_floats < p.ws_floats)
    throw_arg(kPartials, "workspace of " + std::to_string(workspace_floats) + " floats, need " +
                             std::to_string(p.ws_floats));
  if (!aligned(workspace, 8) || !aligned(out, 8)) throw_arg(kPartials, "misaligned workspace or output");
  DeviceGuard guard(kPartials, device);
  cudaStream_t st = as_stream(stream);
  float2* ws = reinterpret_cast<float2*>(workspace);
  float* pivots = reinterpret_cast<float*>(workspace) + 2 * N * G * p.splits;
  dispatch_dtype(kPartials, dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = 16 / sizeof(T);
    const T* xp = reinterpret_cast<const T*>(x);
    if (!channels_last) {
      const std::int64_t L = (C / G) * S;
      if (p.vec == V) {
        gn_partials_contig_kernel<T, V><<<unsigned(p.blocks), kThreads, 0, st>>>(xp, ws, pivots, L, p.chunk, p.splits);
        VINF_LAUNCH_CHECK(kPartials, "gn_partials_contig_kernel");
      } else {
        gn_partials_contig_kernel<T, 1><<<unsigned(p.blocks), kThreads, 0, st>>>(xp, ws, pivots, L, p.chunk, p.splits);
        VINF_LAUNCH_CHECK(kPartials, "gn_partials_contig_kernel");
      }
    } else {
      int cols, rows;
      cl_shape(kPartials, C, p.vec, cols, rows);
      const std::size_t smem = std::size_t(2 * std::int64_t(rows) * C + rows + C) * sizeof(float);
      if (p.vec == V) {
        gn_partials_cl_kernel<T, V><<<unsigned(p.blocks), p.threads, smem, st>>>(xp, ws, pivots, int(C), int(G), S, p.chunk, p.splits);
        VINF_LAUNCH_CHECK(kPartials, "gn_partials_cl_kernel");
      } else {
        gn_partials_cl_kernel<T, 1><<<unsigned(p.blocks), p.threads, smem, st>>>(xp, ws, pivots, int(C), int(G), S, p.chunk, p.splits);
        VINF_LAUNCH_CHECK(kPartials, "gn_partials_cl_kernel");
      }
    }
  });
  const std::int64_t groups = N * G;
  const std::int64_t total = channels_last ? S : (C / G) * S;
  const std::int64_t mult = channels_last ? C / G : 1;
  const unsigned merge_blocks = unsigned((groups * 32 + kThreads - 1) / kThreads);
  gn_merge_kernel<<<merge_blocks, kThreads, 0, st>>>(ws, pivots, reinterpret_cast<double*>(out), groups,
                                                      p.splits, p.chunk, total, mult);
  VINF_LAUNCH_CHECK(kPartials, "gn_merge_kernel");
}

void group_norm_apply(std::int64_t x, std::int64_t y, int dtype, std::int64_t N, std::int64_t C,
                      std::int64_t S, std::int64_t G, bool channels_last,
                      const GroupNormStats& stats, const GroupNormAffine& affine, bool silu,
                      int sm_count, std::int64_t stream, int device) {
  if (G <= 0 || C % G) throw_arg(kApply, "num_groups must divide C");
  if (stats.dtype != kF32 && stats.dtype != kF64) throw_arg(kApply, "mean/rstd must be fp32 or fp64");
  for (int d : {affine.weight ? affine.weight_dtype : kF32, affine.bias ? affine.bias_dtype : kF32})
    if (d != kF32 && d != kF16 && d != kBF16 && d != kF64) throw_arg(kApply, "weight/bias dtype");
  const GroupNormPlan p = group_norm_apply_plan(N, C, S, channels_last, dtype, x, y, sm_count);
  DeviceGuard guard(kApply, device);
  cudaStream_t st = as_stream(stream);
  const ApplyArgs a{stats, affine, int(C), int(G), silu};
  const std::size_t smem = channels_last ? 3 * std::size_t(C) * sizeof(float) : 0;
  dispatch_dtype(kApply, dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = 16 / sizeof(T);
    const T* xp = reinterpret_cast<const T*>(x);
    T* yp = reinterpret_cast<T*>(y);
    if (!channels_last) {
      if (p.vec == V) {
        gn_apply_contig_kernel<T, V><<<unsigned(p.blocks), kThreads, 0, st>>>(xp, yp, a, S, p.splits);
      } else {
        gn_apply_contig_kernel<T, 1><<<unsigned(p.blocks), kThreads, 0, st>>>(xp, yp, a, S, p.splits);
      }
      VINF_LAUNCH_CHECK(kApply, "gn_apply_contig_kernel");
    } else {
      if (p.vec == V) {
        gn_apply_cl_kernel<T, V><<<unsigned(p.blocks), p.threads, smem, st>>>(xp, yp, a, S, p.chunk, p.splits);
      } else {
        gn_apply_cl_kernel<T, 1><<<unsigned(p.blocks), p.threads, smem, st>>>(xp, yp, a, S, p.chunk, p.splits);
      }
      VINF_LAUNCH_CHECK(kApply, "gn_apply_cl_kernel");
    }
  });
}

}  // namespace vinf
