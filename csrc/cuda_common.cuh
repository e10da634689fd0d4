// Shared helpers of the CUDA translation units: status checks that become exceptions naming the
// op, a device guard, dtype codes, 16-byte packs and the few PTX wrappers the kernels use.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels.h"

namespace vinf {

[[noreturn]] inline void throw_cuda(const char* op, const char* what, cudaError_t err) {
  // Clear the runtime's last-error slot (a no-op for sticky faults), so that this failure is not
  // reported again by the next, healthy launch's check.
  static_cast<void>(cudaGetLastError());
  throw std::runtime_error(std::string("vinf_engine._C.") + op + ": " + what + " failed: " +
                           cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}

// Every CUDA runtime call goes through this; a failure is a C++ exception (RuntimeError in
// Python) that names the op.
#define VINF_CUDA_CHECK(op, expr)                                  \
  do {                                                             \
    cudaError_t vinf_err_ = (expr);                                \
    if (vinf_err_ != cudaSuccess) ::vinf::throw_cuda(op, #expr, vinf_err_); \
  } while (0)

// After each <<<>>>: a bad configuration (or an earlier sticky fault) surfaces here, at once.
#define VINF_LAUNCH_CHECK(op, kernel_name) \
  VINF_CUDA_CHECK(op, (static_cast<void>(kernel_name), cudaGetLastError()))

// Runs the launch on the tensors' device and restores the caller's current device after it: the
// CUDA stream handed in from Python belongs to that device.
class DeviceGuard {
 public:
  DeviceGuard(const char* op, int device) {
    VINF_CUDA_CHECK(op, cudaGetDevice(&prev_));
    if (prev_ != device) {
      VINF_CUDA_CHECK(op, cudaSetDevice(device));
    } else {
      prev_ = -1;
    }
  }
  ~DeviceGuard() {
    if (prev_ >= 0 && cudaSetDevice(prev_) != cudaSuccess) static_cast<void>(cudaGetLastError());
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = -1;
};

inline cudaStream_t as_stream(std::int64_t s) { return reinterpret_cast<cudaStream_t>(s); }

[[noreturn]] inline void throw_arg(const char* op, const std::string& msg) {
  throw std::invalid_argument(std::string("vinf_engine._C.") + op + ": " + msg);
}

// ---------------------------------------------------------------------------------------------
// Element conversions (all math in fp32).

template <typename T>
__device__ __forceinline__ float to_f32(T v);
template <>
__device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// VEC consecutive elements moved as one access (16 bytes when VEC * sizeof(T) == 16).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& v) {
  *reinterpret_cast<Pack<T, VEC>*>(p) = v;
}

template <typename T>
struct CudaType;  // dtype code -> device type, see dispatch_dtype below
template <>
struct CudaType<float> {
  static constexpr int code = kF32;
};
template <>
struct CudaType<__half> {
  static constexpr int code = kF16;
};
template <>
struct CudaType<__nv_bfloat16> {
  static constexpr int code = kBF16;
};

// Calls f(T{}) with the device element type of a dtype code.
template <typename F>
void dispatch_dtype(const char* op, int dtype, F&& f) {
  switch (dtype) {
    case kF32: f(float{}); break;
    case kF16: f(__half{}); break;
    case kBF16: f(__nv_bfloat16{}); break;
    default: throw_arg(op, "unsupported dtype code " + std::to_string(dtype));
  }
}

inline bool aligned(std::int64_t ptr, int bytes) { return ptr % bytes == 0; }

// ---------------------------------------------------------------------------------------------
// PTX wrappers (sm_80+).

__device__ __forceinline__ std::uint32_t smem_addr(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async_16(std::uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
}

}  // namespace vinf
