// CPU-only: AVX-512 versions of the hot float32 loops of the sa_hdn CPU kernel.
//
// The package is built for the baseline x86-64 ISA. These functions carry their own
// target attribute, so only they use AVX-512 instructions, and they are called only
// when the running CPU (and OS) supports them: see use_avx512(). Each one computes what
// the generic loop next to its call site computes (same comparisons, same NaN rules,
// same ordered keys); sums are accumulated in 16 lanes instead of 4, so their last bits
// may differ from the generic path's, but not from run to run.
//
// WESTAR_CPU_ISA=generic in the environment forces the generic loops (read at every
// call, so tests can exercise both paths in one process).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "westar/common.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define WESTAR_HAVE_AVX512_PATHS 1
#include <immintrin.h>
#endif

namespace westar {
namespace cpu {

#if WESTAR_HAVE_AVX512_PATHS

inline bool cpu_has_avx512() {
  static const bool has = [] {
    __builtin_cpu_init();  // libgcc also checks that the OS saves the AVX-512 state
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
  }();
  return has;
}

inline bool use_avx512() {
  const char* isa = std::getenv("WESTAR_CPU_ISA");
  if (isa != nullptr && std::strcmp(isa, "generic") == 0) return false;
  return cpu_has_avx512();
}

#define WESTAR_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,bmi2,popcnt")))

// Mask of the first n (<= 16) lanes.
WESTAR_AVX512 inline __mmask16 first_lanes(int64_t n) {
  return static_cast<__mmask16>(_bzhi_u32(0xFFFFu, static_cast<uint32_t>(n)));
}

// westar::ordered_key on 16 floats: bits ^ (negative ? 0xFFFFFFFF : 0x80000000).
WESTAR_AVX512 inline __m512i ordered_keys(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i flip = _mm512_or_si512(_mm512_srai_epi32(bits, 31), _mm512_set1_epi32(INT32_MIN));
  return _mm512_xor_si512(bits, flip);
}

// torch.sign on 16 floats: -1, 0 or +1; NaN stays NaN (westar::sign).
WESTAR_AVX512 inline __m512 sign16(__m512 x) {
  const __m512 zero = _mm512_setzero_ps();
  __m512 s = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, zero, _CMP_GT_OQ), _mm512_set1_ps(1.0f));
  s = _mm512_mask_mov_ps(s, _mm512_cmp_ps_mask(x, zero, _CMP_LT_OQ), _mm512_set1_ps(-1.0f));
  return _mm512_mask_mov_ps(s, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);
}

// Stores the lanes of v selected by m, packed, at dst; returns how many.
WESTAR_AVX512 inline int64_t store_packed(int32_t* dst, __mmask16 m, __m512i v) {
  const int64_t n = _mm_popcnt_u32(m);
  // Compress into a register, then a masked store: vpcompressd with a memory operand
  // is microcoded and slow on some CPUs (AMD Zen 4).
  _mm512_mask_storeu_epi32(dst, first_lanes(n), _mm512_maskz_compress_epi32(m, v));
  return n;
}
WESTAR_AVX512 inline int64_t store_packed(float* dst, __mmask16 m, __m512 v) {
  const int64_t n = _mm_popcnt_u32(m);
  _mm512_mask_storeu_ps(dst, first_lanes(n), _mm512_maskz_compress_ps(m, v));
  return n;
}

// One run of len pixels of a plane that all belong to context k when usable
// (usable[i] != 0): writes seg = k / -1 and appends (pred, target) of the usable ones at
// position pos of the segment arrays, calling after_chunk(pos) every 256 pixels and at
// the end (the values written since are still in L1). Returns the new pos.
template <typename AfterChunk>
WESTAR_AVX512 inline int64_t compact_run_avx512(const float* p, const float* q, const uint8_t* usable,
                                                int32_t* seg, int64_t len, int32_t k, float* sp, float* sq,
                                                int64_t pos, const AfterChunk& after_chunk) {
  const __m512i kv = _mm512_set1_epi32(k), none = _mm512_set1_epi32(-1);
  for (int64_t i = 0; i < len; i += 16) {
    const __mmask16 in = len - i >= 16 ? __mmask16(0xFFFF) : first_lanes(len - i);
    const __mmask16 use = _mm_mask_test_epi8_mask(in, _mm_maskz_loadu_epi8(in, usable + i), _mm_set1_epi8(1));
    _mm512_mask_storeu_epi32(seg + i, in, _mm512_mask_blend_epi32(use, none, kv));
    store_packed(sp + pos, use, _mm512_maskz_loadu_ps(in, p + i));
    pos += store_packed(sq + pos, use, _mm512_maskz_loadu_ps(in, q + i));
    if ((i & 255) == 240) after_chunk(pos);
  }
  after_chunk(pos);
  return pos;
}

// End of the run of ids equal to ids[j] that starts at j: the first index in (j, n)
// whose id differs, or n. 16 ids per step.
WESTAR_AVX512 inline int64_t run_end_avx512(const int32_t* ids, int64_t j, int64_t n) {
  const __m512i id = _mm512_set1_epi32(ids[j]);
  int64_t i = j + 1;
  for (; i < n; i += 16) {
    const __mmask16 in = n - i >= 16 ? __mmask16(0xFFFF) : first_lanes(n - i);
    const __mmask16 differ = _mm512_mask_cmpneq_epi32_mask(in, _mm512_maskz_loadu_epi32(in, ids + i), id);
    if (differ) return i + __builtin_ctz(differ);
  }
  return n;
}

struct SelectSums {
  int64_t n_lo, n_hi, n_cand;
  double s_lo, s_hi;
  uint32_t key_min, key_max;  // of the candidates (UINT32_MAX, 0 when there are none)
};

// The selection pass of sa_hdn_select.h's select_pass<float>: counts and sums of the
// elements below lo / above hi, and the ordered keys of the others (NaN included) packed
// into cand.
WESTAR_AVX512 inline SelectSums select_pass_avx512(const float* x, int64_t len, float lo, float hi,
                                                   uint32_t* cand) {
  const __m512 lo_v = _mm512_set1_ps(lo), hi_v = _mm512_set1_ps(hi);
  __m512 s_lo = _mm512_setzero_ps(), s_hi = _mm512_setzero_ps();
  __m512i kmin = _mm512_set1_epi32(-1), kmax = _mm512_setzero_si512();
  int64_t n_lo = 0, n_hi = 0, c = 0;
  for (int64_t i = 0; i < len; i += 16) {
    const __mmask16 in = len - i >= 16 ? __mmask16(0xFFFF) : first_lanes(len - i);
    const __m512 v = _mm512_maskz_loadu_ps(in, x + i);
    const __mmask16 below = _mm512_mask_cmp_ps_mask(in, v, lo_v, _CMP_LT_OQ);
    const __mmask16 above = _mm512_mask_cmp_ps_mask(in, v, hi_v, _CMP_GT_OQ);
    n_lo += _mm_popcnt_u32(below);
    n_hi += _mm_popcnt_u32(above);
    s_lo = _mm512_mask_add_ps(s_lo, below, s_lo, _mm512_sub_ps(lo_v, v));
    s_hi = _mm512_mask_add_ps(s_hi, above, s_hi, _mm512_sub_ps(v, hi_v));
    // No branch on whether the chunk has candidates: about half the chunks do, at
    // random, and the misprediction cost more than the masked work.
    const __mmask16 inside = in & ~(below | above);
    const __m512i keys = ordered_keys(v);
    kmin = _mm512_mask_min_epu32(kmin, inside, kmin, keys);
    kmax = _mm512_mask_max_epu32(kmax, inside, kmax, keys);
    c += store_packed(reinterpret_cast<int32_t*>(cand) + c, inside, keys);
  }
  alignas(64) float lanes_lo[16], lanes_hi[16];
  _mm512_store_ps(lanes_lo, s_lo);
  _mm512_store_ps(lanes_hi, s_hi);
  SelectSums r{n_lo, n_hi, c, 0.0, 0.0, _mm512_reduce_min_epu32(kmin), _mm512_reduce_max_epu32(kmax)};
  for (int l = 0; l < 16; ++l) {
    r.s_lo += lanes_lo[l];
    r.s_hi += lanes_hi[l];
  }
  return r;
}

// Filter pass of the radix selection (sa_hdn_select.h's radix_select<uint32_t>): packs
// the keys of src[0, m) whose digit ((key - lo) >> shift) is sel into dst; returns how
// many. dst may be src (the write index never passes the read index).
WESTAR_AVX512 inline int64_t radix_filter_avx512(const uint32_t* src, int64_t m, uint32_t lo, int shift,
                                                 uint32_t sel, uint32_t* dst) {
  const __m512i lo_v = _mm512_set1_epi32(static_cast<int32_t>(lo)), sel_v = _mm512_set1_epi32(static_cast<int32_t>(sel));
  const __m128i sh = _mm_cvtsi32_si128(shift);
  int64_t c = 0;
  for (int64_t i = 0; i < m; i += 16) {
    const __mmask16 in = m - i >= 16 ? __mmask16(0xFFFF) : first_lanes(m - i);
    const __m512i v = _mm512_maskz_loadu_epi32(in, src + i);
    const __m512i digit = _mm512_srl_epi32(_mm512_sub_epi32(v, lo_v), sh);
    c += store_packed(reinterpret_cast<int32_t*>(dst) + c, _mm512_mask_cmpeq_epi32_mask(in, digit, sel_v), v);
  }
  return c;
}

struct CandidateSums {
  double abs_sum;
  int64_t n_less, n_greater;
};

// Over n ordered keys of floats: sum |x - t|, and how many keys are below / above tk
// (the key of t), as in sa_hdn_select.h's select_finish<float>.
WESTAR_AVX512 inline CandidateSums candidate_sums_avx512(const uint32_t* cand, int64_t n, uint32_t tk, float t) {
  const __m512i tk_v = _mm512_set1_epi32(static_cast<int32_t>(tk));
  const __m512 t_v = _mm512_set1_ps(t);
  __m512 acc = _mm512_setzero_ps();
  int64_t less = 0, greater = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 in = n - i >= 16 ? __mmask16(0xFFFF) : first_lanes(n - i);
    const __m512i key = _mm512_maskz_loadu_epi32(in, cand + i);
    // westar::float_from_ordered_key: key ^ (top bit set ? 0x80000000 : 0xFFFFFFFF)
    const __m512i flip = _mm512_or_si512(_mm512_xor_si512(_mm512_srai_epi32(key, 31), _mm512_set1_epi32(-1)),
                                         _mm512_set1_epi32(INT32_MIN));
    const __m512 x = _mm512_castsi512_ps(_mm512_xor_si512(key, flip));
    acc = _mm512_mask_add_ps(acc, in, acc, _mm512_abs_ps(_mm512_sub_ps(x, t_v)));
    less += _mm_popcnt_u32(_mm512_mask_cmplt_epu32_mask(in, key, tk_v));
    greater += _mm_popcnt_u32(_mm512_mask_cmpgt_epu32_mask(in, key, tk_v));
  }
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, acc);
  CandidateSums r{0.0, less, greater};
  for (int l = 0; l < 16; ++l) r.abs_sum += lanes[l];
  return r;
}

struct SumSums {
  double s1, s2, loss;
  int64_t median_pos;
};

// The sum pass of sa_hdn_select.h's sum_pass<float>: S1, S2, the loss numerator, and the
// first position whose pred has the bits of the median tp (or -1).
WESTAR_AVX512 inline SumSums sum_pass_avx512(const float* p, const float* q, int64_t len, float tp, float dp,
                                             float tq, float dq) {
  const __m512 tp_v = _mm512_set1_ps(tp), dp_v = _mm512_set1_ps(dp);
  const __m512 tq_v = _mm512_set1_ps(tq), dq_v = _mm512_set1_ps(dq);
  const __m512i t_bits = _mm512_set1_epi32(static_cast<int32_t>(bit_cast<uint32_t>(tp)));
  __m512 s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(), ls = _mm512_setzero_ps();
  int64_t median_pos = -1;
  for (int64_t i = 0; i < len; i += 16) {
    const __mmask16 in = len - i >= 16 ? __mmask16(0xFFFF) : first_lanes(len - i);
    const __m512 pv = _mm512_maskz_loadu_ps(in, p + i);
    const __m512 ph = _mm512_div_ps(_mm512_sub_ps(pv, tp_v), dp_v);  // westar::normalize
    const __m512 d = _mm512_sub_ps(ph, _mm512_div_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(in, q + i), tq_v), dq_v));
    const __m512 sg = sign16(d);
    s1 = _mm512_mask_add_ps(s1, in, s1, sg);
    s2 = _mm512_mask_add_ps(s2, in, s2, _mm512_mul_ps(sg, ph));
    ls = _mm512_mask_add_ps(ls, in, ls, _mm512_abs_ps(d));
    if (median_pos < 0) {
      const __mmask16 eq = _mm512_mask_cmpeq_epi32_mask(in, _mm512_castps_si512(pv), t_bits);
      if (eq) median_pos = i + __builtin_ctz(eq);
    }
  }
  alignas(64) float l1[16], l2[16], l3[16];
  _mm512_store_ps(l1, s1);
  _mm512_store_ps(l2, s2);
  _mm512_store_ps(l3, ls);
  SumSums r{0.0, 0.0, 0.0, median_pos};
  for (int l = 0; l < 16; ++l) {
    r.s1 += l1[l];
    r.s2 += l2[l];
    r.loss += l3[l];
  }
  return r;
}

#else  // no AVX-512 paths in this build

inline bool use_avx512() { return false; }

#endif

}  // namespace cpu
}  // namespace westar
