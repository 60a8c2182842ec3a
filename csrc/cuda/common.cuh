// Shared device helpers for the flashback CUDA kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace flashback {
namespace cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Physical slot of logical token j (docs/DESIGN.md, ring layout); int64 so huge caches cannot overflow.
__device__ __forceinline__ int64_t slot_of(int64_t j, int64_t sink, int64_t ring, int64_t offset) {
  return j < sink ? j : sink + (j - sink + offset) % ring;
}

template <typename T> struct Convert;
template <> struct Convert<__half> {
  __device__ __forceinline__ static float to_float(__half x) { return __half2float(x); }
  __device__ __forceinline__ static __half from_float(float x) { return __float2half_rn(x); }
};
template <> struct Convert<__nv_bfloat16> {
  __device__ __forceinline__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float x) {
    return __float2bfloat16_rn(x);
  }
};

// 8 half-precision values moved as one 16-byte transaction.
union Pack8 {
  uint4 raw;
  uint16_t bits[8];
};

template <typename T>
__device__ __forceinline__ void unpack8(const uint4& raw, float (&dst)[8]) {
  Pack8 p;
  p.raw = raw;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    T v;
    *reinterpret_cast<uint16_t*>(&v) = p.bits[i];
    dst[i] = Convert<T>::to_float(v);
  }
}

template <typename T>
__device__ __forceinline__ uint4 pack8(const float (&src)[8]) {
  Pack8 p;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    T v = Convert<T>::from_float(src[i]);
    p.bits[i] = *reinterpret_cast<uint16_t*>(&v);
  }
  return p.raw;
}

}  // namespace cuda
}  // namespace flashback
