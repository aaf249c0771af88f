// CPU-only: small fixed-width vectors (GCC/Clang vector extensions) for the hot loops of
// the C++ kernels. Every lane computes exactly the scalar expression of the shared
// headers (same operations, same order), so vector and scalar paths give the same bits.
#pragma once

#include <cstdint>
#include <cstring>

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace westar {
namespace cpu {

template <typename T>
struct Simd;

// 16-byte vectors: the baseline x86-64 (SSE2) register width. Wider generic vectors
// make GCC split comparisons into scalar code.
template <>
struct Simd<float> {
  static constexpr int kWidth = 4;
  typedef float V __attribute__((vector_size(16)));
  typedef int32_t M __attribute__((vector_size(16)));  // comparison masks: 0 or -1
  typedef uint32_t Bits __attribute__((vector_size(16)));
};

template <>
struct Simd<double> {
  static constexpr int kWidth = 2;
  typedef double V __attribute__((vector_size(16)));
  typedef int64_t M __attribute__((vector_size(16)));
  typedef uint64_t Bits __attribute__((vector_size(16)));
};

template <typename V>
inline __attribute__((always_inline)) V vload(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
inline __attribute__((always_inline)) V vsplat(T x) {
  V v = {};
  return v + x;
}

// True if any lane of the mask is set.
template <typename M>
inline __attribute__((always_inline)) bool vany(M m) {
  uint64_t w[sizeof(M) / 8];
  std::memcpy(w, &m, sizeof(M));
  uint64_t r = 0;
  for (size_t i = 0; i < sizeof(M) / 8; ++i) r |= w[i];
  return r != 0;
}

// mask ? a : b lane by lane, with bit operations (plain vector ?: is not always
// vectorized by GCC for vectors wider than the target's registers).
template <typename V, typename M>
inline __attribute__((always_inline)) V vselect(M mask, V a, V b) {
  return (V)(((M)a & mask) | ((M)b & ~mask));
}

// mask ? a : 0 lane by lane.
template <typename V, typename M>
inline __attribute__((always_inline)) V vkeep(M mask, V a) {
  return (V)((M)a & mask);
}

// torch.sign lane by lane: -1, 0 or +1, NaN stays NaN (westar::sign).
template <typename T>
inline __attribute__((always_inline)) typename Simd<T>::V vsign(typename Simd<T>::V x) {
  using V = typename Simd<T>::V;
  using M = typename Simd<T>::M;
  const V one = vsplat<V>(T(1)), zero = vsplat<V>(T(0));
  const M gt = x > zero, lt = x < zero, nan = x != x;
  return (V)((gt & (M)one) | (lt & (M)(-one)) | (nan & (M)x));
}

// |x| as written in westar::abs_normalized_diff (x < 0 ? -x : x).
template <typename T>
inline __attribute__((always_inline)) typename Simd<T>::V vabs(typename Simd<T>::V x) {
  using V = typename Simd<T>::V;
  return vselect(x < vsplat<V>(T(0)), -x, x);
}

}  // namespace cpu
}  // namespace westar

#pragma GCC diagnostic pop
