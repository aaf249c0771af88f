// Per-segment math of the CPU sa_hdn forward (sa_hdn_forward_cpu.cpp), phases 4 and 5:
// exact lower median and mean absolute deviation by pivot selection (select_pass,
// select_finish, with select_exact / nth_element as the fallback and for small segments),
// the strided samples that give the pivots, and the sums S1, S2 and the loss numerator.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu_avx512.h"
#include "cpu_simd.h"
#include "westar/sa_hdn_math.h"

namespace westar {
// Internal linkage, as in the one translation unit that includes this header
// (sa_hdn_forward_cpu.cpp): the compiler may inline and specialise freely.
namespace {

// Segments with at most this many pixels are handled by one task with nth_element.
constexpr int64_t kSmallSegment = 1024;
// Big segments are split into blocks of this many pixels for their elementwise passes.
constexpr int64_t kBlock = 16384;
// Partial sums inside a block use this many independent lanes (vectorizable, fixed order).
constexpr int kLanes = 8;

template <typename acc_t>
struct KeyTraits;
template <>
struct KeyTraits<float> {
  using key_t = uint32_t;
  static float from_key(uint32_t k) { return float_from_ordered_key(k); }
};
template <>
struct KeyTraits<double> {
  using key_t = uint64_t;
  static double from_key(uint64_t k) { return double_from_ordered_key(k); }
};

// An uninitialized array (std::vector would zero it: one more pass over memory).
template <typename T>
class RawBuffer {
 public:
  explicit RawBuffer(int64_t n) : data_(new T[n > 0 ? n : 1]) {}
  T* data() { return data_.get(); }
  const T* data() const { return data_.get(); }
  T& operator[](int64_t i) { return data_[i]; }
  const T& operator[](int64_t i) const { return data_[i]; }

 private:
  std::unique_ptr<T[]> data_;
};

// ---------------------------------------------------------------- per-segment math

template <typename acc_t>
struct SelectPartial {
  using key_t = typename KeyTraits<acc_t>::key_t;
  int64_t n_lo = 0;    // elements < lo
  int64_t n_hi = 0;    // elements > hi
  int64_t n_cand = 0;  // elements in [lo, hi] (or unordered: NaN)
  double s_lo = 0;     // sum of (lo - x) over x < lo
  double s_hi = 0;     // sum of (x - hi) over x > hi
  bool has_bounds = false;  // key_min/key_max hold the candidates' smallest and largest key
  key_t key_min = std::numeric_limits<key_t>::max();
  key_t key_max = 0;
};

// Counts and sums the elements of x[0, len) outside [lo, hi] and writes the keys of the
// others (NaN included) to cand[0, count); cand[count] may be written too: cand holds
// len + 1 keys.
template <typename acc_t>
SelectPartial<acc_t> select_pass(const acc_t* x, int64_t len, acc_t lo, acc_t hi,
                                 typename KeyTraits<acc_t>::key_t* cand, bool avx512) {
#if WESTAR_HAVE_AVX512_PATHS
  if constexpr (std::is_same_v<acc_t, float>) {
    if (avx512) {
      const cpu::SelectSums r = cpu::select_pass_avx512(x, len, lo, hi, cand);
      SelectPartial<acc_t> out;
      out.n_lo = r.n_lo;
      out.n_hi = r.n_hi;
      out.n_cand = r.n_cand;
      out.s_lo = r.s_lo;
      out.s_hi = r.s_hi;
      out.has_bounds = true;
      out.key_min = r.key_min;
      out.key_max = r.key_max;
      return out;
    }
  }
#endif
  using V = typename cpu::Simd<acc_t>::V;
  using M = typename cpu::Simd<acc_t>::M;
  constexpr int kW = cpu::Simd<acc_t>::kWidth;
  const V lo_v = cpu::vsplat<V>(lo), hi_v = cpu::vsplat<V>(hi), zero = cpu::vsplat<V>(acc_t(0));
  V s_lo = zero, s_hi = zero;
  M n_lo = {}, n_hi = {};
  int64_t c = 0;
  int64_t i = 0;
  for (; i + kW <= len; i += kW) {
    const V v = cpu::vload<V>(x + i);
    const M below = v < lo_v, above = v > hi_v;
    n_lo -= below;
    n_hi -= above;
    s_lo += cpu::vkeep(below, lo_v - v);
    s_hi += cpu::vkeep(above, v - hi_v);
    const M inside = ~(below | above);
    if (cpu::vany(inside)) {
      for (int l = 0; l < kW; ++l) {
        cand[c] = ordered_key(x[i + l]);
        c += inside[l] != 0;
      }
    }
  }
  SelectPartial<acc_t> r;
  for (int l = 0; l < kW; ++l) {
    r.n_lo += n_lo[l];
    r.n_hi += n_hi[l];
    r.s_lo += s_lo[l];
    r.s_hi += s_hi[l];
  }
  for (; i < len; ++i) {
    const acc_t v = x[i];
    const bool below = v < lo, above = v > hi;
    r.n_lo += below;
    r.n_hi += above;
    r.s_lo += below ? lo - v : acc_t(0);
    r.s_hi += above ? v - hi : acc_t(0);
    cand[c] = ordered_key(v);
    c += !(below || above);
  }
  r.n_cand = c;
  return r;
}

// Lower median (rank k) and sum |x - t| of x[0, n), exactly, with nth_element on keys.
// scratch holds n keys. Also returns the numbers of elements below and above t.
template <typename acc_t>
struct Selected {
  acc_t t;
  double abs_sum;
  int64_t n_less;
  int64_t n_greater;
};

template <typename acc_t>
Selected<acc_t> select_exact(const acc_t* x, int64_t n, typename KeyTraits<acc_t>::key_t* scratch) {
  using key_t = typename KeyTraits<acc_t>::key_t;
  for (int64_t i = 0; i < n; ++i) scratch[i] = ordered_key(x[i]);
  const int64_t k = lower_median_rank(n);
  std::nth_element(scratch, scratch + k, scratch + n);
  const key_t tk = scratch[k];
  const acc_t t = KeyTraits<acc_t>::from_key(tk);
  acc_t sums[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) sums[l] += std::abs(x[i + l] - t);
  }
  for (; i < n; ++i) sums[0] += std::abs(x[i] - t);
  double abs_sum = 0;
  for (int l = 0; l < kLanes; ++l) abs_sum += sums[l];
  // After nth_element: keys before k are <= tk, after k are >= tk.
  int64_t n_less = 0, n_greater = 0;
  for (int64_t j = 0; j < k; ++j) n_less += scratch[j] < tk;
  for (int64_t j = k + 1; j < n; ++j) n_greater += scratch[j] > tk;
  return {t, abs_sum, n_less, n_greater};
}

// The k-th smallest of the n keys a[0, n) (a is not modified), by radix selection:
// histogram the next 11 bits of (key - min), keep the bucket that holds rank k (copied
// to buf), repeat; small remainders go to nth_element.
template <typename key_t>
key_t radix_select(const key_t* a, int64_t n, int64_t k, std::vector<key_t>& buf, const key_t* bounds = nullptr,
                   bool avx512 = false) {
  constexpr int kDigit = 11;
  const key_t* src = a;
  int64_t m = n;
  bool in_buf = false;
  uint32_t hist[size_t(1) << kDigit];
  for (;;) {
    if (m <= 256) {
      if (!in_buf) buf.assign(src, src + m);
      std::nth_element(buf.begin(), buf.begin() + k, buf.begin() + m);
      return buf[k];
    }
    key_t lo, hi;
    if (bounds != nullptr && !in_buf) {  // the smallest and largest key, already known
      lo = bounds[0];
      hi = bounds[1];
    } else {
      lo = src[0];
      hi = src[0];
      for (int64_t i = 1; i < m; ++i) {
        lo = src[i] < lo ? src[i] : lo;
        hi = src[i] > hi ? src[i] : hi;
      }
    }
    if (lo == hi) return lo;
    const int bits = 64 - __builtin_clzll(static_cast<unsigned long long>(hi - lo));
    const int shift = bits > kDigit ? bits - kDigit : 0;
    std::fill(hist, hist + (size_t(1) << kDigit), 0u);
    for (int64_t i = 0; i < m; ++i) ++hist[static_cast<size_t>((src[i] - lo) >> shift)];
    size_t sel = 0;
    int64_t before = 0;
    for (;; ++sel) {
      if (before + hist[sel] > k) break;
      before += hist[sel];
    }
    k -= before;
    if (!in_buf) buf.resize(hist[sel]);
    key_t* dst = buf.data();  // in place once src is buf: the write index never passes the read index
    int64_t c = 0;
#if WESTAR_HAVE_AVX512_PATHS
    if constexpr (std::is_same_v<key_t, uint32_t>) {
      if (avx512) c = cpu::radix_filter_avx512(src, m, lo, shift, static_cast<uint32_t>(sel), dst);
    }
#endif
    if (!(avx512 && std::is_same_v<key_t, uint32_t>)) {
      for (int64_t i = 0; i < m; ++i) {
        const key_t v = src[i];
        if (static_cast<size_t>((v - lo) >> shift) == sel) dst[c++] = v;
      }
    }
    m = c;
    src = buf.data();
    in_buf = true;
    if (shift == 0) return src[0];  // a bucket of width 1: all its keys are equal
  }
}

// Finishes a pivot selection: cand holds the keys of the n_cand elements in [lo, hi],
// p the combined partials. Returns false when the pivots missed the median rank.
template <typename acc_t>
bool select_finish(const SelectPartial<acc_t>& p, acc_t lo, acc_t hi, int64_t n,
                   const typename KeyTraits<acc_t>::key_t* cand, Selected<acc_t>* out, bool avx512) {
  using key_t = typename KeyTraits<acc_t>::key_t;
  const int64_t k = lower_median_rank(n);
  const int64_t kc = k - p.n_lo;
  if (kc < 0 || kc >= p.n_cand) return false;
  thread_local std::vector<key_t> buf;  // reused: no allocation per segment
  const key_t bounds[2] = {p.key_min, p.key_max};
  const key_t tk = radix_select(cand, p.n_cand, kc, buf, p.has_bounds ? bounds : nullptr, avx512);
  const acc_t t = KeyTraits<acc_t>::from_key(tk);
  // Elements outside the pivots: |x - t| = (lo - x) + (t - lo) below, (x - hi) + (hi - t) above.
  auto finish_with = [&](double abs_sum, int64_t n_less, int64_t n_greater) {
    abs_sum += p.s_lo + static_cast<double>(p.n_lo) * (static_cast<double>(t) - static_cast<double>(lo));
    abs_sum += p.s_hi + static_cast<double>(p.n_hi) * (static_cast<double>(hi) - static_cast<double>(t));
    out->t = t;
    out->abs_sum = abs_sum;
    out->n_less = n_less;
    out->n_greater = n_greater;
    return true;
  };
#if WESTAR_HAVE_AVX512_PATHS
  if constexpr (std::is_same_v<acc_t, float>) {
    if (avx512) {
      const cpu::CandidateSums cs = cpu::candidate_sums_avx512(cand, p.n_cand, tk, t);
      return finish_with(cs.abs_sum, p.n_lo + cs.n_less, p.n_hi + cs.n_greater);
    }
  }
#endif
  acc_t sums[kLanes] = {};
  int64_t less[kLanes] = {}, greater[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= p.n_cand; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const key_t c = cand[i + l];
      sums[l] += std::abs(KeyTraits<acc_t>::from_key(c) - t);
      less[l] += c < tk;
      greater[l] += c > tk;
    }
  }
  for (; i < p.n_cand; ++i) {
    const key_t c = cand[i];
    sums[0] += std::abs(KeyTraits<acc_t>::from_key(c) - t);
    less[0] += c < tk;
    greater[0] += c > tk;
  }
  double abs_sum = 0;
  int64_t n_less = p.n_lo, n_greater = p.n_hi;
  for (int l = 0; l < kLanes; ++l) {
    abs_sum += sums[l];
    n_less += less[l];
    n_greater += greater[l];
  }
  return finish_with(abs_sum, n_less, n_greater);
}

// Size of the strided sample that gives a big segment of n elements its pivots.
inline int64_t sample_size(int64_t n) {
  const double n23 = std::pow(static_cast<double>(n), 2.0 / 3.0);
  return std::min<int64_t>(n, std::max<int64_t>(512, static_cast<int64_t>(n23)));
}

// Rank (in segment order) of sample i of s from a segment of n elements.
inline int64_t sample_rank(int64_t i, int64_t s, int64_t n) {
  const int64_t pos = static_cast<int64_t>((static_cast<double>(i) + 0.5) * static_cast<double>(n) / s);
  return std::min(pos, n - 1);
}

// Takes the strided sample of a big context while the scatter writes its segment: after
// each write, the samples whose positions were reached are read back from the segment
// arrays, still in L1 (a gather after the scatter missed the cache on every element).
template <typename acc_t>
struct SampleCursor {
  using key_t = typename KeyTraits<acc_t>::key_t;
  int64_t next = std::numeric_limits<int64_t>::max();  // absolute position of the next sample
  int64_t i = 0, s = 0, n = 0, off = 0;
  key_t* keys_p = nullptr;
  key_t* keys_q = nullptr;

  void start(int64_t seg_off, int64_t seg_len, key_t* kp, key_t* kq) {
    off = seg_off;
    n = seg_len;
    s = sample_size(seg_len);
    keys_p = kp;
    keys_q = kq;
    next = off + sample_rank(0, s, n);
  }
  // pos: the segment arrays are written up to (not including) pos.
  void take(int64_t pos, const acc_t* sp, const acc_t* sq) {
    while (next < pos) {
      keys_p[i] = ordered_key(sp[next]);
      keys_q[i] = ordered_key(sq[next]);
      ++i;
      next = i < s ? off + sample_rank(i, s, n) : std::numeric_limits<int64_t>::max();
    }
  }
};

// Two pivots that bracket the lower median's rank (of a segment of n elements) with high
// probability, from its strided sample of s keys (reordered in place).
template <typename acc_t>
void sample_pivots(typename KeyTraits<acc_t>::key_t* sample, int64_t s, int64_t n, acc_t* lo, acc_t* hi) {
  const int64_t ks = lower_median_rank(n) * s / n;
  const int64_t d = static_cast<int64_t>(2.0 * std::sqrt(static_cast<double>(s))) + 2;
  const int64_t rl = std::max<int64_t>(0, ks - d);
  const int64_t rh = std::min<int64_t>(s - 1, ks + d);
  std::nth_element(sample, sample + rl, sample + s);
  // The second selection leaves sample[rl] in place: it only permutes (rl, s).
  if (rh > rl) std::nth_element(sample + rl + 1, sample + rh, sample + s);
  *lo = KeyTraits<acc_t>::from_key(sample[rl]);
  *hi = KeyTraits<acc_t>::from_key(sample[rh]);
}

// Sums of one block of a context: S1, S2, loss numerator, and the first position whose
// pred equals the median (by key), or -1.
template <typename acc_t>
struct SumPartial {
  double s1 = 0, s2 = 0, loss = 0;
  int64_t median_pos = -1;
};

template <typename acc_t>
SumPartial<acc_t> sum_pass(const acc_t* p, const acc_t* q, int64_t len, const acc_t* stat, bool avx512) {
#if WESTAR_HAVE_AVX512_PATHS
  if constexpr (std::is_same_v<acc_t, float>) {
    if (avx512) {
      const cpu::SumSums r = cpu::sum_pass_avx512(p, q, len, stat[kMedianPred], stat[kScalePred],
                                                  stat[kMedianTarget], stat[kScaleTarget]);
      SumPartial<acc_t> out;
      out.s1 = r.s1;
      out.s2 = r.s2;
      out.loss = r.loss;
      out.median_pos = r.median_pos;
      return out;
    }
  }
#endif
  using V = typename cpu::Simd<acc_t>::V;
  using M = typename cpu::Simd<acc_t>::M;
  using Bits = typename cpu::Simd<acc_t>::Bits;
  using key_t = typename KeyTraits<acc_t>::key_t;
  constexpr int kW = cpu::Simd<acc_t>::kWidth;
  const acc_t tp = stat[kMedianPred], dp = stat[kScalePred];
  const acc_t tq = stat[kMedianTarget], dq = stat[kScaleTarget];
  const V tp_v = cpu::vsplat<V>(tp), dp_v = cpu::vsplat<V>(dp);
  const V tq_v = cpu::vsplat<V>(tq), dq_v = cpu::vsplat<V>(dq);
  const key_t t_bits = bit_cast<key_t>(tp);  // same bits <=> same ordered key
  const Bits t_bits_v = cpu::vsplat<Bits>(t_bits);
  V s1 = {}, s2 = {}, ls = {};
  SumPartial<acc_t> r;
  int64_t i = 0;
  for (; i + kW <= len; i += kW) {
    const V pv = cpu::vload<V>(p + i);
    const V ph = (pv - tp_v) / dp_v;                          // westar::normalize
    const V d = ph - (cpu::vload<V>(q + i) - tq_v) / dq_v;  // normalized difference
    const V sg = cpu::vsign<acc_t>(d);
    s1 += sg;
    s2 += sg * ph;
    ls += cpu::vabs<acc_t>(d);
    if (r.median_pos < 0) {
      const M eq = cpu::vload<Bits>(p + i) == t_bits_v;
      if (cpu::vany(eq)) {
        for (int l = 0; l < kW; ++l) {
          if (eq[l]) {
            r.median_pos = i + l;
            break;
          }
        }
      }
    }
  }
  for (int l = 0; l < kW; ++l) {
    r.s1 += s1[l];
    r.s2 += s2[l];
    r.loss += ls[l];
  }
  for (; i < len; ++i) {
    const acc_t ph = normalize(p[i], tp, dp);
    const acc_t d = ph - normalize(q[i], tq, dq);
    const acc_t sg = sign(d);
    r.s1 += sg;
    r.s2 += sg * ph;
    r.loss += d < acc_t(0) ? -d : d;
    if (r.median_pos < 0 && bit_cast<key_t>(p[i]) == t_bits) r.median_pos = i;
  }
  return r;
}

}  // namespace
}  // namespace westar
