// Small helpers compiled both by the host compiler and by nvcc.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define WESTAR_HD __host__ __device__ __forceinline__
#else
#define WESTAR_HD inline
#endif

namespace westar {

// Bit-copy between a float and an integer of the same width, usable on host and device.
template <typename To, typename From>
WESTAR_HD To bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs equal sizes");
  To to;
  memcpy(&to, &from, sizeof(To));
  return to;
}

// Order-preserving map from IEEE floats to unsigned integers: a < b as floats (with
// -0 < +0 and NaN above +inf) iff key(a) < key(b) as integers. Radix selection and
// sorting work on these keys.
WESTAR_HD uint32_t ordered_key(float x) {
  const uint32_t bits = bit_cast<uint32_t>(x);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}
WESTAR_HD uint64_t ordered_key(double x) {
  const uint64_t bits = bit_cast<uint64_t>(x);
  return (bits & 0x8000000000000000ull) ? ~bits : (bits | 0x8000000000000000ull);
}
WESTAR_HD float float_from_ordered_key(uint32_t key) {
  return bit_cast<float>((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}
WESTAR_HD double double_from_ordered_key(uint64_t key) {
  return bit_cast<double>((key & 0x8000000000000000ull) ? (key & 0x7fffffffffffffffull) : ~key);
}

// torch.sign: -1, 0 or +1 (NaN gives NaN).
template <typename T>
WESTAR_HD T sign(T x) {
  return x > T(0) ? T(1) : (x < T(0) ? T(-1) : (x == T(0) ? T(0) : x));
}

// Rank of the lower median among n values, 0-based (what torch.median returns).
WESTAR_HD int64_t lower_median_rank(int64_t n) { return (n - 1) / 2; }

}  // namespace westar
