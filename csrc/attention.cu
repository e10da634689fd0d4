// Dual-scope temporal attention for tokens_per_frame == 1: tens of thousands of short (b, h)
// sequences (F <= ~64 query frames, up to ~128 local + global keys, head dim 64 or 128).
//
// One CTA (4 warps) stages whole sequences in shared memory with 16-byte cp.async loads, all in
// flight at once: the query rows, only the *valid* local key/value frames [lo, hi) (frames beyond
// the video's ends are never read) and the global keys/values. Then:
//   fp16/bf16: each warp takes a 16-query tile and runs mma.sync m16n8k16 (fp32 accumulate) over
//              chunks of 16 keys: its local band, then the globals, with an online softmax in
//              the log2 domain. P is rounded to the input type for the PV product, as
//              FlashAttention does. The output tile is staged back through shared memory so that
//              global stores are 16 bytes wide.
//   fp32:      CUDA cores, one warp per query row: lanes over keys for q.k, lanes over D for P.V.
// Small sequences share a CTA (4 per CTA at 16 frames) so that every warp has a tile.
#include "cuda_common.cuh"

#include <algorithm>
#include <cmath>

namespace vinf {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr float kLn2 = 0.6931471805599453f;
// Shared memory one CTA asks for before it stages fewer sequences: leaves room for 3+ CTAs on
// an SM (228 KB on Hopper, 164 KB on A100), so that one CTA's loads overlap another's math.
constexpr std::int64_t kSmemSoftCap = 64 * 1024;
constexpr char kOp[] = "dual_scope_attention";

struct Params {
  const char* q;
  const char* k;
  const char* v;
  const char* kg;
  const char* vg;
  char* o;
  float* lse;
  std::int64_t q_sb, q_sl, q_sh, k_sb, k_sl, k_sh, v_sb, v_sl, v_sh;
  std::int64_t kg_sb, kg_sl, kg_sh, vg_sb, vg_sl, vg_sh, o_sb, o_sl, o_sh;  // elements
  std::int64_t num_seq;
  int H, F, pad, window, lo, nloc, ng;
  int seqs_per_cta, q_rows, rows_per_seq;
  float scale_log2, local_bias_log2, global_bias_log2;
};

// Row pitch in shared memory: one 16-byte pad per row spreads 8 consecutive rows over all 32
// banks, so ldmatrix and the fp32 path's per-lane row reads are conflict-free.
template <typename T, int D>
__host__ __device__ constexpr int row_pitch() { return D * int(sizeof(T)) + 16; }

// Stage sequences seq0 .. seq0 + nseq - 1 of the CTA: rows [0, q_rows) queries (clamped to the
// last frame past F), then nloc keys, nloc values, ng global keys, ng global values.
template <typename T, int D>
__device__ __forceinline__ void stage(const Params& p, char* smem, std::int64_t seq0, int nseq) {
  constexpr int kChunks = D * int(sizeof(T)) / 16;  // 16-byte pieces per row (power of two)
  constexpr int kPitch = row_pitch<T, D>();
  constexpr int kElems = 16 / int(sizeof(T));
  for (int s = 0; s < nseq; ++s) {
    const std::int64_t seq = seq0 + s;
    const std::int64_t b = seq / p.H;
    const std::int64_t h = seq - b * p.H;
    const char* qb = p.q + (b * p.q_sb + h * p.q_sh) * std::int64_t(sizeof(T));
    const char* kb = p.k + (b * p.k_sb + h * p.k_sh + p.lo * p.k_sl) * std::int64_t(sizeof(T));
    const char* vb = p.v + (b * p.v_sb + h * p.v_sh + p.lo * p.v_sl) * std::int64_t(sizeof(T));
    const char* kgb = p.kg + (b * p.kg_sb + h * p.kg_sh) * std::int64_t(sizeof(T));
    const char* vgb = p.vg + (b * p.vg_sb + h * p.vg_sh) * std::int64_t(sizeof(T));
    const std::uint32_t dst0 = smem_addr(smem + std::int64_t(s) * p.rows_per_seq * kPitch);
    const int total = p.rows_per_seq * kChunks;
    for (int idx = threadIdx.x; idx < total; idx += kThreads) {
      const int row = idx / kChunks, piece = idx % kChunks;
      int r = row;
      const char* src;
      if (r < p.q_rows) {
        src = qb + std::int64_t(min(r, p.F - 1)) * p.q_sl * std::int64_t(sizeof(T));
      } else if ((r -= p.q_rows) < p.nloc) {
        src = kb + std::int64_t(r) * p.k_sl * std::int64_t(sizeof(T));
      } else if ((r -= p.nloc) < p.nloc) {
        src = vb + std::int64_t(r) * p.v_sl * std::int64_t(sizeof(T));
      } else if ((r -= p.nloc) < p.ng) {
        src = kgb + std::int64_t(r) * p.kg_sl * std::int64_t(sizeof(T));
      } else {
        r -= p.ng;
        src = vgb + std::int64_t(r) * p.vg_sl * std::int64_t(sizeof(T));
      }
      cp_async_16(dst0 + row * kPitch + piece * 16, src + piece * kElems * int(sizeof(T)));
    }
  }
  cp_async_wait_all();
  __syncthreads();
}

// ---- fp16 / bf16: tensor cores ----------------------------------------------------------------

__device__ __forceinline__ void ldsm_x4(std::uint32_t (&r)[4], std::uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(std::uint32_t (&r)[4], std::uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const std::uint32_t (&a)[4],
                                         std::uint32_t b0, std::uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const std::uint32_t (&a)[4],
                                                        std::uint32_t b0, std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const std::uint32_t (&a)[4],
                                                 std::uint32_t b0, std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <typename T>
__device__ __forceinline__ std::uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ std::uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const std::uint32_t*>(&v);
}
template <>
__device__ __forceinline__ std::uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const std::uint32_t*>(&v);
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// One warp, query rows [i0, i0 + 16) of one staged sequence. Fragment layouts are those of
// mma.m16n8k16: lane = 4 * g + t holds rows g and g + 8, columns 2t and 2t + 1 of each n8 tile.
template <typename T, int D>
__device__ __forceinline__ void mma_tile(const Params& p, char* sbase, std::int64_t seq, int i0) {
  constexpr int kPitch = row_pitch<T, D>();
  constexpr int kK = D / 16;  // k-steps of q.k
  constexpr int kN = D / 8;   // n8 tiles of the output
  const int lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const std::uint32_t s_q = smem_addr(sbase);
  const std::uint32_t s_k = s_q + p.q_rows * kPitch;
  const std::uint32_t s_v = s_k + p.nloc * kPitch;
  const std::uint32_t s_kg = s_v + p.nloc * kPitch;
  const std::uint32_t s_vg = s_kg + p.ng * kPitch;

  // Q fragments, kept in registers for every key chunk (matrices: rows 0-7 / 8-15 x k 0-7 / 8-15).
  std::uint32_t qf[kK][4];
  {
    const int row = i0 + (lane & 7) + 8 * ((lane >> 3) & 1);
    const int col = 8 * (lane >> 4);
#pragma unroll
    for (int kk = 0; kk < kK; ++kk)
      ldsm_x4(qf[kk], s_q + row * kPitch + (kk * 16 + col) * int(sizeof(T)));
  }

  float acc[kN][4];
#pragma unroll
  for (int n = 0; n < kN; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  const int fr[2] = {i0 + g, i0 + g + 8};  // this lane's two query frames

  // Local band of the tile as staged rows [jb, je) (row r = padded key frame lo + r).
  const int i_last = min(i0 + 15, p.F - 1);
  const int jb = max(0, i0 + p.pad - p.window - p.lo);
  const int je = min(p.nloc, i_last + p.pad + p.window + 1 - p.lo);
  const int n_local = je > jb ? (je - jb + 15) / 16 : 0;
  const int n_chunks = n_local + (p.ng + 15) / 16;

  for (int c = 0; c < n_chunks; ++c) {
    const bool local = c < n_local;
    const int r0 = local ? jb + 16 * c : 16 * (c - n_local);
    const int rows = local ? p.nloc : p.ng;
    const std::uint32_t s_kc = local ? s_k : s_kg;
    const std::uint32_t s_vc = local ? s_v : s_vg;

    // S = Q K^T for 16 keys (two n8 tiles). Rows past the section are clamped to its last row:
    // they read this sequence's staged keys, never uninitialized shared memory (whose NaN bit
    // patterns would survive 0 * NaN in P.V), and are masked below.
    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    {
      const int krow = min(r0 + (lane & 7) + 8 * (lane >> 4), rows - 1);
      const int col = 8 * ((lane >> 3) & 1);
#pragma unroll
      for (int kk = 0; kk < kK; ++kk) {
        std::uint32_t b[4];
        ldsm_x4(b, s_kc + krow * kPitch + (kk * 16 + col) * int(sizeof(T)));
        mma16816<T>(s[0], qf[kk], b[0], b[1]);
        mma16816<T>(s[1], qf[kk], b[2], b[3]);
      }
    }
    const float bias = local ? p.local_bias_log2 : p.global_bias_log2;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = r0 + nt * 8 + 2 * t + (e & 1);
        const int qframe = fr[e >> 1] + p.pad;  // padded frame of the query
        const bool ok = r < rows && (!local || abs(p.lo + r - qframe) <= p.window);
        s[nt][e] = ok ? fmaf(s[nt][e], p.scale_log2, bias) : -INFINITY;
      }
    }
    // Online softmax, log2 domain. A row with nothing in this chunk keeps m = -inf; m_use = 0
    // then avoids (-inf) - (-inf).
    float alpha[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float cm = quad_max(fmaxf(fmaxf(s[0][2 * h], s[0][2 * h + 1]),
                                      fmaxf(s[1][2 * h], s[1][2 * h + 1])));
      const float m_new = fmaxf(m_run[h], cm);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      alpha[h] = exp2f(m_run[h] - m_use);
      m_run[h] = m_new;
      float rs = 0.f;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        s[nt][2 * h] = exp2f(s[nt][2 * h] - m_use);
        s[nt][2 * h + 1] = exp2f(s[nt][2 * h + 1] - m_use);
        rs += s[nt][2 * h] + s[nt][2 * h + 1];
      }
      l_run[h] = l_run[h] * alpha[h] + rs;  // per-lane partial; the quad sums at the end
    }
#pragma unroll
    for (int n = 0; n < kN; ++n) {
      acc[n][0] *= alpha[0];
      acc[n][1] *= alpha[0];
      acc[n][2] *= alpha[1];
      acc[n][3] *= alpha[1];
    }
    // P as the A operand (16 queries x 16 keys): the S accumulators are already in that layout.
    const std::uint32_t pa[4] = {pack2<T>(s[0][0], s[0][1]), pack2<T>(s[0][2], s[0][3]),
                                 pack2<T>(s[1][0], s[1][1]), pack2<T>(s[1][2], s[1][3])};
    {
      const int vrow = min(r0 + (lane & 7) + 8 * ((lane >> 3) & 1), rows - 1);
      const int col = 8 * (lane >> 4);
#pragma unroll
      for (int n2 = 0; n2 < kN / 2; ++n2) {
        std::uint32_t b[4];
        ldsm_x4_trans(b, s_vc + vrow * kPitch + (n2 * 16 + col) * int(sizeof(T)));
        mma16816<T>(acc[2 * n2], pa, b[0], b[1]);
        mma16816<T>(acc[2 * n2 + 1], pa, b[2], b[3]);
      }
    }
  }

  // Normalize; every valid row holds its own frame, so l > 0 there.
  float inv[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float l = quad_sum(l_run[h]);
    inv[h] = 1.f / l;
    if (p.lse != nullptr && t == 0 && fr[h] < p.F)
      p.lse[seq * p.F + fr[h]] = (m_run[h] + __log2f(l)) * kLn2;
  }
  // Stage the tile in its own (already consumed) query rows, then 16-byte coalesced stores.
  __syncwarp();
  char* qrows = sbase + std::int64_t(i0) * kPitch;
#pragma unroll
  for (int n = 0; n < kN; ++n) {
    const int col = (n * 8 + 2 * t) * int(sizeof(T));
    *reinterpret_cast<std::uint32_t*>(qrows + g * kPitch + col) =
        pack2<T>(acc[n][0] * inv[0], acc[n][1] * inv[0]);
    *reinterpret_cast<std::uint32_t*>(qrows + (g + 8) * kPitch + col) =
        pack2<T>(acc[n][2] * inv[1], acc[n][3] * inv[1]);
  }
  __syncwarp();
  constexpr int kChunks = D * int(sizeof(T)) / 16;
  const std::int64_t b = seq / p.H, h = seq - b * p.H;
  char* ob = p.o + (b * p.o_sb + h * p.o_sh) * std::int64_t(sizeof(T));
  for (int idx = lane; idx < 16 * kChunks; idx += 32) {
    const int r = idx / kChunks, piece = idx % kChunks;
    if (i0 + r < p.F)
      *reinterpret_cast<uint4*>(ob + std::int64_t(i0 + r) * p.o_sl * std::int64_t(sizeof(T)) + piece * 16) =
          *reinterpret_cast<const uint4*>(qrows + r * kPitch + piece * 16);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) dsa_mma_kernel(const Params p) {
  extern __shared__ __align__(16) char smem[];
  const std::int64_t seq0 = std::int64_t(blockIdx.x) * p.seqs_per_cta;
  const int nseq = int(min(std::int64_t(p.seqs_per_cta), p.num_seq - seq0));
  stage<T, D>(p, smem, seq0, nseq);
  const int tiles = p.q_rows / 16;
  const int warp = threadIdx.x / 32;
  for (int item = warp; item < nseq * tiles; item += kWarps) {
    const int s = item / tiles;
    mma_tile<T, D>(p, smem + std::int64_t(s) * p.rows_per_seq * row_pitch<T, D>(), seq0 + s,
                   16 * (item - s * tiles));
  }
}

// ---- fp32: CUDA cores, one warp per query row -------------------------------------------------

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <int D>
__global__ void __launch_bounds__(kThreads) dsa_f32_kernel(const Params p) {
  extern __shared__ __align__(16) char smem[];
  constexpr int kPitch = row_pitch<float, D>();
  constexpr int kPer = D / 32;  // output elements per lane (2 or 4, contiguous)
  using Out = Pack<float, kPer>;
  const std::int64_t seq0 = std::int64_t(blockIdx.x) * p.seqs_per_cta;
  const int nseq = int(min(std::int64_t(p.seqs_per_cta), p.num_seq - seq0));
  stage<float, D>(p, smem, seq0, nseq);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int item = warp; item < nseq * p.F; item += kWarps) {
    const int s = item / p.F, i = item - s * p.F;
    const char* sb = smem + std::int64_t(s) * p.rows_per_seq * kPitch;
    const char* sk = sb + p.q_rows * kPitch;
    const char* sv = sk + p.nloc * kPitch;
    const char* skg = sv + p.nloc * kPitch;
    const char* svg = skg + p.ng * kPitch;
    const float4* qrow = reinterpret_cast<const float4*>(sb + i * kPitch);
    const int jb = max(0, i + p.pad - p.window - p.lo);
    const int je = min(p.nloc, i + p.pad + p.window + 1 - p.lo);
    const int n_local = je - jb;  // >= 1: the query's own frame
    const int total = n_local + p.ng;
    float m_run = -INFINITY, l_lane = 0.f, acc[kPer];
#pragma unroll
    for (int e = 0; e < kPer; ++e) acc[e] = 0.f;
    for (int c0 = 0; c0 < total; c0 += 32) {
      const int j = c0 + lane;
      float sc = -INFINITY;
      if (j < total) {
        const bool local = j < n_local;
        const float4* krow = reinterpret_cast<const float4*>(
            local ? sk + (jb + j) * kPitch : skg + (j - n_local) * kPitch);
        float dot = 0.f;
#pragma unroll
        for (int d = 0; d < D / 4; ++d) {
          const float4 a = qrow[d], bb = krow[d];
          dot = fmaf(a.x, bb.x, fmaf(a.y, bb.y, fmaf(a.z, bb.z, fmaf(a.w, bb.w, dot))));
        }
        sc = fmaf(dot, p.scale_log2, local ? p.local_bias_log2 : p.global_bias_log2);
      }
      const float m_new = fmaxf(m_run, warp_max(sc));  // finite: chunk 0 holds the own frame
      const float alpha = exp2f(m_run - m_new);
      const float pj = exp2f(sc - m_new);
      m_run = m_new;
      l_lane = l_lane * alpha + pj;
#pragma unroll
      for (int e = 0; e < kPer; ++e) acc[e] *= alpha;
      const int cnt = min(32, total - c0);
      for (int jj = 0; jj < cnt; ++jj) {
        const float pk = __shfl_sync(0xffffffffu, pj, jj);
        const int kj = c0 + jj;
        const char* vrow = kj < n_local ? sv + (jb + kj) * kPitch : svg + (kj - n_local) * kPitch;
        const Out vv = *reinterpret_cast<const Out*>(vrow + lane * kPer * 4);
#pragma unroll
        for (int e = 0; e < kPer; ++e) acc[e] = fmaf(pk, vv.v[e], acc[e]);
      }
    }
    const float l = warp_sum(l_lane);
    const float inv = 1.f / l;
    const std::int64_t seq = seq0 + s;
    const std::int64_t b = seq / p.H, h = seq - b * p.H;
    Out out;
#pragma unroll
    for (int e = 0; e < kPer; ++e) out.v[e] = acc[e] * inv;
    float* orow = reinterpret_cast<float*>(p.o) + b * p.o_sb + h * p.o_sh + std::int64_t(i) * p.o_sl;
    *reinterpret_cast<Out*>(orow + lane * kPer) = out;
    if (p.lse != nullptr && lane == 0) p.lse[seq * p.F + i] = (m_run + __log2f(l)) * kLn2;
  }
}

void check_seq_tensor(const char* name, const SeqTensor& s, int elt, bool required) {
  if (!s.ptr) {
    if (required) throw_arg(kOp, std::string(name) + " is null");
    return;
  }
  // 16-byte cp.async / stores: every row start must be 16-byte aligned.
  if (!aligned(s.ptr, 16) || (s.sb * elt) % 16 || (s.sl * elt) % 16 || (s.sh * elt) % 16)
    throw_arg(kOp, std::string(name) + " rows must start on 16-byte boundaries");
}

template <typename Kernel>
void launch(Kernel kernel, const Params& prm, const AttentionPlan& plan, cudaStream_t st) {
  if (plan.smem_bytes > 48 * 1024) {
    // Above the default 48 KB a kernel must opt in; past the device's limit this call fails,
    // which the check turns into the op's exception.
    VINF_CUDA_CHECK(kOp, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              int(plan.smem_bytes)));
  }
  kernel<<<unsigned(plan.ctas), kThreads, std::size_t(plan.smem_bytes), st>>>(prm);
  VINF_LAUNCH_CHECK(kOp, "dual_scope_attention kernel");
}

}  // namespace

AttentionPlan dual_scope_attention_plan(std::int64_t num_seq, int F, int nloc, int ng, int D,
                                        int dtype) {
  if (num_seq <= 0 || F <= 0 || nloc < F || ng < 0) throw_arg(kOp, "bad sizes");
  if (D != 64 && D != 128) throw_arg(kOp, "head dim must be 64 or 128, got " + std::to_string(D));
  if (dtype != kF32 && dtype != kF16 && dtype != kBF16) throw_arg(kOp, "dtype must be fp32, fp16 or bf16");
  const int elt = dtype == kF32 ? 4 : 2;
  AttentionPlan p;
  // Tensor cores need whole 16-row query tiles; the fp32 path works row by row.
  p.q_rows = dtype == kF32 ? F : (F + 15) / 16 * 16;
  p.rows_per_seq = p.q_rows + 2 * nloc + 2 * ng;
  const std::int64_t per_seq = std::int64_t(p.rows_per_seq) * (D * elt + 16);
  // Enough sequences per CTA that each warp has work: 4 tiles (mma) or ~64 query rows (fp32).
  int seqs = dtype == kF32 ? std::max(1, std::min(kWarps, 64 / F)) : std::max(1, kWarps / (p.q_rows / 16));
  seqs = int(std::min<std::int64_t>(seqs, num_seq));
  while (seqs > 1 && seqs * per_seq > kSmemSoftCap) --seqs;
  p.seqs_per_cta = seqs;
  p.smem_bytes = seqs * per_seq;
  p.ctas = (num_seq + seqs - 1) / seqs;
  if (p.ctas > 0x7fffffff) throw_arg(kOp, "too many sequences for one grid");
  return p;
}

void dual_scope_attention(const SeqTensor& q, const SeqTensor& k, const SeqTensor& v,
                          const SeqTensor& kg, const SeqTensor& vg, const SeqTensor& o,
                          std::int64_t lse, int dtype, std::int64_t B, int F, int H, int D,
                          int pad, int window, int valid_left, int valid_right, int ng,
                          double scale, double local_bias, double global_bias,
                          std::int64_t stream, int device) {
  if (B <= 0 || H <= 0) throw_arg(kOp, "B and H must be positive");
  if (window < 0 || window > pad || valid_left < 0 || valid_left > pad || valid_right < 0 ||
      valid_right > pad)
    throw_arg(kOp, "need 0 <= window, valid_left, valid_right <= pad");
  const int nloc = F + valid_left + valid_right;
  const AttentionPlan plan = dual_scope_attention_plan(B * H, F, nloc, ng, D, dtype);
  const int elt = dtype == kF32 ? 4 : 2;
  check_seq_tensor("q", q, elt, true);
  check_seq_tensor("k", k, elt, true);
  check_seq_tensor("v", v, elt, true);
  check_seq_tensor("out", o, elt, true);
  check_seq_tensor("k_global", kg, elt, ng > 0);
  check_seq_tensor("v_global", vg, elt, ng > 0);
  if (lse && !aligned(lse, 4)) throw_arg(kOp, "lse misaligned");

  Params prm{};
  prm.q = reinterpret_cast<const char*>(q.ptr);
  prm.k = reinterpret_cast<const char*>(k.ptr);
  prm.v = reinterpret_cast<const char*>(v.ptr);
  prm.kg = reinterpret_cast<const char*>(kg.ptr);
  prm.vg = reinterpret_cast<const char*>(vg.ptr);
  prm.o = reinterpret_cast<char*>(o.ptr);
  prm.lse = reinterpret_cast<float*>(lse);
  prm.q_sb = q.sb, prm.q_sl = q.sl, prm.q_sh = q.sh;
  prm.k_sb = k.sb, prm.k_sl = k.sl, prm.k_sh = k.sh;
  prm.v_sb = v.sb, prm.v_sl = v.sl, prm.v_sh = v.sh;
  prm.kg_sb = kg.sb, prm.kg_sl = kg.sl, prm.kg_sh = kg.sh;
  prm.vg_sb = vg.sb, prm.vg_sl = vg.sl, prm.vg_sh = vg.sh;
  prm.o_sb = o.sb, prm.o_sl = o.sl, prm.o_sh = o.sh;
  prm.num_seq = B * H;
  prm.H = H, prm.F = F, prm.pad = pad, prm.window = window;
  prm.lo = pad - valid_left, prm.nloc = nloc, prm.ng = ng;
  prm.seqs_per_cta = plan.seqs_per_cta, prm.q_rows = plan.q_rows, prm.rows_per_seq = plan.rows_per_seq;
  prm.scale_log2 = float(scale * 1.4426950408889634);
  prm.local_bias_log2 = float(local_bias * 1.4426950408889634);
  prm.global_bias_log2 = float(global_bias * 1.4426950408889634);

  DeviceGuard guard(kOp, device);
  cudaStream_t st = as_stream(stream);
  if (dtype == kBF16) {
    if (D == 64) launch(dsa_mma_kernel<__nv_bfloat16, 64>, prm, plan, st);
    else launch(dsa_mma_kernel<__nv_bfloat16, 128>, prm, plan, st);
  } else if (dtype == kF16) {
    if (D == 64) launch(dsa_mma_kernel<__half, 64>, prm, plan, st);
    else launch(dsa_mma_kernel<__half, 128>, prm, plan, st);
  } else {
    if (D == 64) launch(dsa_f32_kernel<64>, prm, plan, st);
    else launch(dsa_f32_kernel<128>, prm, plan, st);
  }
}

}  // namespace vinf
