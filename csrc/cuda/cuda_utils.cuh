// Helpers shared by the CUDA kernels in csrc/cuda/ (device code only; nvcc only).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "westar/common.h"

namespace westar {
namespace cuda {

// Accumulation dtype: float for float16/bfloat16/float32, double for float64.
template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_type = typename AccType<scalar_t>::type;

// Ordered-key type of an accumulation dtype (westar::ordered_key).
template <typename acc_t>
struct KeyOf;
template <>
struct KeyOf<float> {
  using type = uint32_t;
  static __device__ __forceinline__ float value(uint32_t k) { return float_from_ordered_key(k); }
};
template <>
struct KeyOf<double> {
  using type = uint64_t;
  static __device__ __forceinline__ double value(uint64_t k) { return double_from_ordered_key(k); }
};

// Reads one element of an input tensor in the accumulation dtype (half read as half).
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t load_as(const scalar_t* p, int64_t i) {
  return static_cast<acc_t>(p[i]);
}

constexpr int kWarp = 32;

// Fixed-order (butterfly) warp sum: every lane gets the same result, and the result
// does not depend on anything but the 32 inputs: deterministic.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_min(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const T w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w < v ? w : v;
  }
  return v;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid size for `n` work items of `per_block` each, capped for grid-stride loops.
inline unsigned grid_for(int64_t n, int64_t per_block, int64_t cap = int64_t(1) << 20) {
  int64_t g = ceil_div(n, per_block);
  if (g < 1) g = 1;
  if (g > cap) g = cap;
  return static_cast<unsigned>(g);
}

}  // namespace cuda
}  // namespace westar
