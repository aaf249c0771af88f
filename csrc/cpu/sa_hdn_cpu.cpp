// CPU kernels of sa_hdn_forward / sa_hdn_backward (contract: docs/internals.md).
//
// Forward, in O(N + K) apart from the selections:
//  0. Per image, a byte mask of the usable pixels (valid, finite target), shared by all
//     levels.
//  1. Label every (level, image) plane in parallel: the plane is cut into runs of equal
//     ids; ids > 0 are compacted through a small open-addressing hash table (never an
//     array indexed by raw id), so the cost does not depend on how large or sparse the
//     ids are. Only the ids and the mask are read.
//  2. Serially, per plane, sort its few unique ids and number the contexts that have at
//     least max(min_pixels, 1) pixels in canonical order (level, image, id ascending).
//  3. Counting sort: every plane, run by run, scatters its usable pixels into their
//     contexts' segments (pixel index, pred, target) in ascending pixel order and writes
//     seg (the context number k, or -1). Big segments take their strided pivot samples
//     here, while the values are in L1.
//  4. Per segment, an exact lower median and mean absolute deviation of pred and of
//     target: the sample gives two pivots that bracket the median rank with high
//     probability; one pass counts and sums the elements outside the pivots (relative
//     to the pivots, so that no cancellation occurs) and collects the few inside; radix
//     selection on those gives the median and the sums give the MAD. When the pivots
//     miss (rare), the segment falls back to nth_element on all of it. Small segments run
//     entirely in one task (nth_element); big ones are split into fixed blocks.
//  5. Per segment, S1, S2 and the loss numerator, in fixed blocks; partial sums are
//     combined in block order and the loss in context order: deterministic.
// Backward: one elementwise pass with westar::pixel_grad.
//
// The hot float32 loops (3, 4, 5 and the backward) have AVX-512 versions
// (westar/cpu_avx512.h) used when the CPU has AVX-512; WESTAR_CPU_ISA=generic forces the
// portable ones. Parallelism: at::parallel_for / run_tasks over planes, blocks and
// segments; every partial result is combined in a fixed order, so the output does not
// depend on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <limits>
#include <ctime>
#include <memory>
#include <numeric>
#include <type_traits>
#include <vector>

#include "westar/cpu_avx512.h"
#include "westar/cpu_simd.h"
#include "westar/cpu_tasks.h"
#include "westar/cpu_workspace.h"
#include "westar/sa_hdn_math.h"

namespace westar {
namespace {

using cpu::run_tasks;

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

// ------------------------------------------------------------------ id compaction

// Open-addressing hash map from id (> 0) to a plane-local slot number.
class IdTable {
 public:
  IdTable() { rehash(64); }

  // Slot of `id`, inserting it (with the next slot number) when new.
  int32_t slot(int64_t id, std::vector<int64_t>& ids_by_slot) {
    uint64_t h = hash(id) & mask_;
    for (;;) {
      const int64_t k = keys_[h];
      if (k == id) return vals_[h];
      if (k == kEmpty) break;
      h = (h + 1) & mask_;
    }
    const int32_t s = static_cast<int32_t>(ids_by_slot.size());
    ids_by_slot.push_back(id);
    keys_[h] = id;
    vals_[h] = s;
    if (static_cast<uint64_t>(ids_by_slot.size()) * 2 > mask_ + 1) grow(ids_by_slot);
    return s;
  }

 private:
  static constexpr int64_t kEmpty = -1;
  static uint64_t hash(int64_t id) {
    uint64_t x = static_cast<uint64_t>(id) * 0x9E3779B97F4A7C15ull;
    return x ^ (x >> 29);
  }
  void rehash(uint64_t capacity) {
    keys_.assign(capacity, kEmpty);
    vals_.assign(capacity, 0);
    mask_ = capacity - 1;
  }
  void grow(const std::vector<int64_t>& ids_by_slot) {
    rehash((mask_ + 1) * 2);
    for (size_t s = 0; s < ids_by_slot.size(); ++s) {
      uint64_t h = hash(ids_by_slot[s]) & mask_;
      while (keys_[h] != kEmpty) h = (h + 1) & mask_;
      keys_[h] = ids_by_slot[s];
      vals_[h] = static_cast<int32_t>(s);
    }
  }
  std::vector<int64_t> keys_;
  std::vector<int32_t> vals_;
  uint64_t mask_ = 0;
};

// A maximal run of pixels [start, start + len) of a plane with the same id (slot -1:
// id 0, or a level's pixels of no instance).
struct Run {
  int64_t start;
  int64_t len;
  int32_t slot;
  int64_t seg_pos = -1;  // where its usable pixels start in the segment arrays (scatter)
};

// One (level, image) plane.
struct Plane {
  std::vector<Run> runs;           // the plane in runs, in pixel order
  std::vector<int32_t> runs_by_k;  // indices of the runs of each context, grouped by k
  std::vector<int64_t> runs_by_k_off;  // context first_k + i: runs_by_k[off[i], off[i + 1])
  std::vector<int64_t> ids;        // slot -> id
  std::vector<int64_t> counts;     // slot -> usable pixels
  std::vector<int32_t> slot_to_k;  // slot -> context number, or -1 (skipped)
  int64_t first_k = 0;
  int64_t num_k = 0;
  int64_t bad_pixel = -1;  // first pixel with a negative id, if any
};

// usable[j] = 1 where valid (when given) and the target is finite, else 0, for one image;
// returns the number of usable pixels. |x| <= max is false for NaN and +-inf, and unlike
// std::isfinite it vectorizes; valid is read as bytes (GCC does not vectorize bool loads).
template <typename acc_t>
int64_t mark_usable(const bool* valid, const acc_t* q, int64_t hw, uint8_t* usable) {
  int64_t count = 0;
  if (valid == nullptr) {
    for (int64_t j = 0; j < hw; ++j) {
      const uint8_t u = std::abs(q[j]) <= std::numeric_limits<acc_t>::max();
      usable[j] = u;
      count += u;
    }
  } else {
    const uint8_t* v = reinterpret_cast<const uint8_t*>(valid);
    for (int64_t j = 0; j < hw; ++j) {
      const uint8_t u = (v[j] != 0) & (std::abs(q[j]) <= std::numeric_limits<acc_t>::max());
      usable[j] = u;
      count += u;
    }
  }
  return count;
}

inline int64_t count_usable(const uint8_t* usable, int64_t n) {
  int64_t count = 0;
  for (int64_t j = 0; j < n; ++j) count += usable[j];
  return count;
}

// Global level: one run over the image, slot 0 holding every usable pixel.
inline void label_global(int64_t hw, int64_t usable_count, Plane& plane) {
  if (usable_count > 0) {
    plane.ids.push_back(1);
    plane.counts.push_back(usable_count);
  }
  plane.runs.push_back({0, hw, usable_count > 0 ? 0 : -1});
}

// Instance level: the row-major scan is cut into runs of equal ids; the hash table gives
// each id > 0 a slot (in order of first appearance) once per run, and the run adds its
// usable pixels to the slot's count. Only ids and the usable mask are read.
template <typename id_t>
void label_instances(const id_t* ids, const uint8_t* usable, int64_t hw, Plane& plane, bool avx512) {
  IdTable table;
  int64_t j = 0;
  while (j < hw) {
    const id_t id = ids[j];
    int64_t end = j + 1;
#if WESTAR_HAVE_AVX512_PATHS
    if constexpr (std::is_same_v<id_t, int32_t>) {
      if (avx512) end = cpu::run_end_avx512(ids, j, hw);
    }
#endif
    while (end < hw && ids[end] == id) ++end;
    const int64_t id64 = static_cast<int64_t>(id);
    int32_t slot = -1;
    if (id64 > 0) {
      slot = table.slot(id64, plane.ids);
      if (plane.counts.size() < plane.ids.size()) plane.counts.push_back(0);
      plane.counts[slot] += count_usable(usable + j, end - j);
    } else if (id64 < 0 && plane.bad_pixel < 0) {
      plane.bad_pixel = j;
    }
    plane.runs.push_back({j, end - j, slot});
    j = end;
  }
}

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

// ------------------------------------------------------------------------ forward

struct Block {
  int64_t k;      // context
  int64_t start;  // offset in the segment arrays
  int64_t len;
  int64_t cand;   // offset in the candidate arrays (len + 1 keys)
};

template <typename acc_t>
struct ContextResult {
  acc_t lo_p, hi_p, lo_q, hi_q;  // pivots (big segments)
  double loss = 0;
};

template <typename acc_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sa_hdn_forward_impl(
    const at::Tensor& pred_in, const at::Tensor& pred, const at::Tensor& target, const at::Tensor& instances,
    const at::Tensor& valid, bool include_global, double eps, int64_t min_pixels) {
  using key_t = typename KeyTraits<acc_t>::key_t;
  const int64_t B = pred.size(0), H = pred.size(1), W = pred.size(2);
  const int64_t hw = H * W;
  const int64_t L = instances.defined() ? instances.size(1) : 0;
  const int64_t G = include_global ? 1 : 0;
  const int64_t C = G + L;
  const acc_t* P0 = pred.data_ptr<acc_t>();
  const acc_t* Q0 = target.data_ptr<acc_t>();
  const bool* V0 = valid.defined() ? valid.data_ptr<bool>() : nullptr;
  const at::ScalarType stats_dtype = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
  // One ISA decision per call: the id scan is ISA-only, the value loops are float32-only.
  const bool cpu_avx512 = cpu::use_avx512();
  const bool avx512 = std::is_same_v<acc_t, float> && cpu_avx512;

#ifdef WESTAR_PROFILE_PHASES  // build with -DWESTAR_PROFILE_PHASES: CPU time per phase on stderr
  auto cpu_ms = [] {
    timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
  };
  double t_last = cpu_ms();
  auto tick = [&](const char* what) {
    const double now = cpu_ms();
    fprintf(stderr, "%s %.3f ms\n", what, now - t_last);
    t_last = now;
  };
#else
  auto tick = [](const char*) {};
#endif
  at::Tensor seg = cpu::pooled_empty({C, B, H, W}, pred.options().dtype(at::kInt));
  int32_t* S0 = seg.data_ptr<int32_t>();
  const int64_t num_planes = C * B;

  // 0. Usable pixels of every image, once for all levels. The workspace is sized for
  // the most memberships there can be (C usable levels of every pixel); pages that are
  // not used are never touched.
  const int64_t max_total = C * B * hw;
  const int64_t cand_bound = max_total + max_total / kBlock + 2 * max_total / (kSmallSegment + 1) + 2;
  // sample_size(n) <= 512 + n / 8, and there are at most max_total / (kSmallSegment + 1) big segments.
  const int64_t sample_bound = 512 * (max_total / (kSmallSegment + 1) + 1) + max_total / 8 + 1;
  cpu::Workspace ws(cpu::Workspace::bytes_for<uint8_t>(B * hw + 64) + 2 * cpu::Workspace::bytes_for<acc_t>(max_total + 1) + 2 * cpu::Workspace::bytes_for<key_t>(cand_bound) +
                    2 * cpu::Workspace::bytes_for<key_t>(sample_bound));
  uint8_t* U0 = ws.take<uint8_t>(B * hw + 64);
  std::vector<int64_t> usable_count(B);
  run_tasks(B, B * hw, [&](int64_t b) {
    usable_count[b] = mark_usable(V0 ? V0 + b * hw : nullptr, Q0 + b * hw, hw, U0 + b * hw);
  });

  // 1. Label the planes (runs, slots and counts; seg is written by the scatter).
  std::vector<Plane> planes(num_planes);
  run_tasks(num_planes, num_planes * hw, [&](int64_t pi) {
    const int64_t c = pi / B, b = pi % B;
    if (c < G) {
      label_global(hw, usable_count[b], planes[pi]);
    } else {
      const int64_t l = c - G;
      AT_DISPATCH_INTEGRAL_TYPES(instances.scalar_type(), "sa_hdn_forward_cpu", [&] {
        const scalar_t* ids = instances.data_ptr<scalar_t>() + (b * L + l) * hw;
        label_instances<scalar_t>(ids, U0 + b * hw, hw, planes[pi], cpu_avx512);
      });
    }
  });
  for (int64_t pi = 0; pi < num_planes; ++pi) {
    if (planes[pi].bad_pixel >= 0) {
      const int64_t c = pi / B, b = pi % B, j = planes[pi].bad_pixel;
      TORCH_CHECK_VALUE(false, "instances must hold ids >= 0 (0 = no instance); found a negative id at "
                        "instances[", b, ", ", c - G, ", ", j / W, ", ", j % W, "]");
    }
  }

  tick("label");
  // 2. Number the contexts in canonical order.
  const int64_t min_n = std::max<int64_t>(min_pixels, 1);
  std::vector<int64_t> seg_off, seg_len, seg_plane;
  int64_t total = 0;
  for (int64_t pi = 0; pi < num_planes; ++pi) {
    Plane& pl = planes[pi];
    const int64_t slots = static_cast<int64_t>(pl.ids.size());
    std::vector<int32_t> order(slots);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return pl.ids[a] < pl.ids[b]; });
    pl.slot_to_k.assign(slots, -1);
    pl.first_k = static_cast<int64_t>(seg_len.size());
    for (int32_t s : order) {
      if (pl.counts[s] < min_n) continue;
      pl.slot_to_k[s] = static_cast<int32_t>(seg_len.size());
      seg_off.push_back(total);
      seg_len.push_back(pl.counts[s]);
      seg_plane.push_back(pi);
      total += pl.counts[s];
    }
    pl.num_k = static_cast<int64_t>(seg_len.size()) - pl.first_k;
  }
  const int64_t K = static_cast<int64_t>(seg_len.size());
  TORCH_CHECK(K < (int64_t(1) << 31), "sa_hdn_forward: too many contexts");

  tick("number");
  // 3. Counting sort of the pixels into their segments.
  // Scratch: segment arrays (pixel index, pred, target) and, for the big segments'
  // blocks, candidate keys (at most one more per block than pixels).
  // Big segments: where their samples go (sample_off[k], -1 for small segments).
  std::vector<int64_t> sample_off(K, -1);
  int64_t total_samples = 0;
  for (int64_t k = 0; k < K; ++k) {
    if (seg_len[k] <= kSmallSegment) continue;
    sample_off[k] = total_samples;
    total_samples += sample_size(seg_len[k]);
  }
  TORCH_CHECK(total_samples <= sample_bound, "sa_hdn_forward: internal error, sample bound");
  // The segment arrays have one more (sink) element, written by pixels of no context.
  acc_t* sp = ws.take<acc_t>(max_total + 1);
  acc_t* sq = ws.take<acc_t>(max_total + 1);
  key_t* cand_p = ws.take<key_t>(cand_bound);
  key_t* cand_q = ws.take<key_t>(cand_bound);
  key_t* sample_p = ws.take<key_t>(sample_bound);
  key_t* sample_q = ws.take<key_t>(sample_bound);
  run_tasks(num_planes, num_planes * hw, [&](int64_t pi) {
    Plane& pl = planes[pi];
    const int64_t b = pi % B;
    const acc_t* p = P0 + b * hw;
    const acc_t* q = Q0 + b * hw;
    int32_t* s = S0 + pi * hw;
    const uint8_t* u = U0 + b * hw;
    const int32_t* s2k = pl.slot_to_k.data();
    std::vector<int64_t> cursor(pl.num_k);
    std::vector<SampleCursor<acc_t>> samplers(pl.num_k);
    for (int64_t i = 0; i < pl.num_k; ++i) {
      const int64_t k = pl.first_k + i;
      cursor[i] = seg_off[k];
      if (sample_off[k] >= 0) samplers[i].start(seg_off[k], seg_len[k], sample_p + sample_off[k], sample_q + sample_off[k]);
    }
    int64_t* cur = cursor.data() - pl.first_k;
    SampleCursor<acc_t>* sampler = samplers.data() - pl.first_k;
    // Runs of one id: every usable pixel of a run belongs to the run's context (if any).
    const int64_t sink = max_total;  // written by unusable pixels instead of branching
    std::vector<int64_t>& by_k_off = pl.runs_by_k_off;
    by_k_off.assign(pl.num_k + 1, 0);
    for (Run& r : pl.runs) {
      const int32_t k = r.slot >= 0 ? s2k[r.slot] : -1;
      int32_t* sr = s + r.start;
      if (k < 0) {  // id 0, or a skipped context
        std::fill(sr, sr + r.len, -1);
        continue;
      }
      ++by_k_off[k - pl.first_k + 1];
      int64_t pos = cur[k];
      r.seg_pos = pos;
      SampleCursor<acc_t>& sc = sampler[k];
#if WESTAR_HAVE_AVX512_PATHS
      if constexpr (std::is_same_v<acc_t, float>) {
        if (avx512) {
          cur[k] = cpu::compact_run_avx512(p + r.start, q + r.start, u + r.start, sr, r.len, k, sp, sq, pos,
                                           [&](int64_t written) {
                                             if (written > sc.next) sc.take(written, sp, sq);
                                           });
          continue;
        }
      }
#endif
      for (int64_t i = 0; i < r.len; ++i) {
        const bool use = u[r.start + i] != 0;
        sr[i] = use ? k : -1;
        const int64_t w = use ? pos : sink;
        sp[w] = p[r.start + i];
        sq[w] = q[r.start + i];
        pos += use;
        if (pos > sc.next) sc.take(pos, sp, sq);
      }
      cur[k] = pos;
    }
    // The runs of each context in pixel order (their seg_pos ascending), for median_pixel.
    for (int64_t i = 0; i < pl.num_k; ++i) by_k_off[i + 1] += by_k_off[i];
    pl.runs_by_k.resize(by_k_off[pl.num_k]);
    std::vector<int64_t> fill(by_k_off.begin(), by_k_off.end() - 1);
    for (int64_t ri = 0; ri < static_cast<int64_t>(pl.runs.size()); ++ri) {
      const Run& r = pl.runs[ri];
      if (r.seg_pos >= 0) pl.runs_by_k[fill[s2k[r.slot] - pl.first_k]++] = static_cast<int32_t>(ri);
    }
  });

  tick("scatter");
  // Flat pixel index of the element at position pos (0-based, pixel order) of context
  // k's segment: the run that holds it, then its rank among the run's usable pixels.
  auto median_pixel = [&](int64_t k, int64_t pos) -> int64_t {
    const int64_t pi = seg_plane[k];
    const Plane& pl = planes[pi];
    const int64_t i = k - pl.first_k;
    const int32_t* first = pl.runs_by_k.data() + pl.runs_by_k_off[i];
    const int32_t* last = pl.runs_by_k.data() + pl.runs_by_k_off[i + 1];
    const int64_t target = seg_off[k] + pos;
    // The last run that starts at or before target.
    const int32_t* it = std::upper_bound(first, last, target,
                                         [&](int64_t t, int32_t ri) { return t < pl.runs[ri].seg_pos; });
    TORCH_CHECK(it != first, "sa_hdn_forward: internal error, median run not found");
    const Run& r = pl.runs[*(it - 1)];
    const int64_t b = pi % B;
    const uint8_t* u = U0 + b * hw + r.start;
    int64_t left = target - r.seg_pos;  // usable pixels of the run to skip
    int64_t j = 0;
    for (; j + 8 <= r.len; j += 8) {  // whole words first: bytes are 0 or 1
      uint64_t word;
      std::memcpy(&word, u + j, 8);
      const int64_t ones = static_cast<int64_t>((word * 0x0101010101010101ull) >> 56);
      if (ones > left) break;
      left -= ones;
    }
    for (; j < r.len; ++j) {
      if (u[j] != 0 && left-- == 0) return b * hw + r.start + j;
    }
    TORCH_CHECK(false, "sa_hdn_forward: internal error, median pixel not found");
    return -1;
  };
  // 4-5. Per-context statistics.
  at::Tensor stats = at::empty({K, kNumStats}, pred.options().dtype(stats_dtype));
  at::Tensor median_index = at::empty({K}, pred.options().dtype(at::kLong));
  acc_t* ST = stats.data_ptr<acc_t>();
  int64_t* MI = median_index.data_ptr<int64_t>();
  std::vector<ContextResult<acc_t>> ctx(K);
  const acc_t eps_acc = static_cast<acc_t>(eps);

  auto set_scale_stats = [&](int64_t k, const Selected<acc_t>& sel_p, const Selected<acc_t>& sel_q) {
    const double n = static_cast<double>(seg_len[k]);
    acc_t* st = ST + k * kNumStats;
    st[kMedianPred] = sel_p.t;
    st[kScalePred] = static_cast<acc_t>(sel_p.abs_sum / n) + eps_acc;
    st[kMedianTarget] = sel_q.t;
    st[kScaleTarget] = static_cast<acc_t>(sel_q.abs_sum / n) + eps_acc;
    st[kSumSignPred] = static_cast<acc_t>(sel_p.n_greater - sel_p.n_less);
    st[kCount] = static_cast<acc_t>(seg_len[k]);
  };
  auto set_sum_stats = [&](int64_t k, const SumPartial<acc_t>& sums) {
    acc_t* st = ST + k * kNumStats;
    st[kSumSign] = static_cast<acc_t>(sums.s1);
    st[kSumSignHat] = static_cast<acc_t>(sums.s2);
    ctx[k].loss = sums.loss;
    MI[k] = median_pixel(k, sums.median_pos);
  };

  // Big segments first, so that uneven tasks balance across threads.
  std::vector<int64_t> by_size(K);
  std::iota(by_size.begin(), by_size.end(), 0);
  std::stable_sort(by_size.begin(), by_size.end(), [&](int64_t a, int64_t b) { return seg_len[a] > seg_len[b]; });
  std::vector<int64_t> big;
  for (int64_t k : by_size)
    if (seg_len[k] > kSmallSegment) big.push_back(k);

  // 4a. Small segments entirely; pivots of the big ones.
  run_tasks(K, total, [&](int64_t t) {
    const int64_t k = by_size[t];
    const int64_t n = seg_len[k], off = seg_off[k];
    const acc_t* p = sp + off;
    const acc_t* q = sq + off;
    if (n > kSmallSegment) {
      const int64_t ns = sample_size(n);
      sample_pivots(sample_p + sample_off[k], ns, n, &ctx[k].lo_p, &ctx[k].hi_p);
      sample_pivots(sample_q + sample_off[k], ns, n, &ctx[k].lo_q, &ctx[k].hi_q);
      return;
    }
    key_t scratch[kSmallSegment];
    const Selected<acc_t> sel_p = select_exact(p, n, scratch);
    const Selected<acc_t> sel_q = select_exact(q, n, scratch);
    set_scale_stats(k, sel_p, sel_q);
    set_sum_stats(k, sum_pass(p, q, n, ST + k * kNumStats, avx512));
  });

  tick("4a");
  // Blocks of the big segments, in segment order.
  std::vector<Block> blocks;
  std::vector<int64_t> first_block(K + 1, 0);
  int64_t cand_total = 0;
  {
    std::vector<int64_t> big_sorted = big;
    std::sort(big_sorted.begin(), big_sorted.end());
    for (int64_t k : big_sorted) {
      first_block[k] = static_cast<int64_t>(blocks.size());
      for (int64_t s = 0; s < seg_len[k]; s += kBlock) {
        const int64_t len = std::min(kBlock, seg_len[k] - s);
        blocks.push_back({k, seg_off[k] + s, len, cand_total});
        cand_total += len + 1;  // select_pass may write one key past the last candidate
      }
    }
  }
  const int64_t num_blocks = static_cast<int64_t>(blocks.size());
  TORCH_CHECK(cand_total <= cand_bound, "sa_hdn_forward: internal error, candidate bound");
  std::vector<SelectPartial<acc_t>> part_p(num_blocks), part_q(num_blocks);

  // 4b. One pass per block: counts and sums outside the pivots, candidates inside.
  run_tasks(num_blocks, total, [&](int64_t i) {
    const Block& bl = blocks[i];
    const ContextResult<acc_t>& cr = ctx[bl.k];
    part_p[i] = select_pass(sp + bl.start, bl.len, cr.lo_p, cr.hi_p, cand_p + bl.cand, avx512);
    part_q[i] = select_pass(sq + bl.start, bl.len, cr.lo_q, cr.hi_q, cand_q + bl.cand, avx512);
  });

  tick("4b");
  // 4c. Per big segment: gather the candidates, select, MAD.
  auto finish = [&](int64_t k, const acc_t* x, std::vector<SelectPartial<acc_t>>& part, key_t* cand,
                    acc_t lo, acc_t hi) {
    const int64_t n = seg_len[k];
    SelectPartial<acc_t> sum;
    key_t* dst = cand + blocks[first_block[k]].cand;
    for (int64_t i = first_block[k]; i < num_blocks && blocks[i].k == k; ++i) {
      const SelectPartial<acc_t>& pb = part[i];
      sum.n_lo += pb.n_lo;
      sum.n_hi += pb.n_hi;
      sum.s_lo += pb.s_lo;
      sum.s_hi += pb.s_hi;
      sum.has_bounds = i == first_block[k] ? pb.has_bounds : (sum.has_bounds && pb.has_bounds);
      sum.key_min = std::min(sum.key_min, pb.key_min);
      sum.key_max = std::max(sum.key_max, pb.key_max);
      std::memmove(dst + sum.n_cand, cand + blocks[i].cand, sizeof(key_t) * pb.n_cand);
      sum.n_cand += pb.n_cand;
    }
    Selected<acc_t> sel;
    if (!select_finish(sum, lo, hi, n, dst, &sel, avx512)) {
      RawBuffer<key_t> scratch(n);
      sel = select_exact(x, n, scratch.data());
    }
    return sel;
  };
  run_tasks(static_cast<int64_t>(big.size()), total, [&](int64_t t) {
    const int64_t k = big[t];
    const ContextResult<acc_t>& cr = ctx[k];
    const Selected<acc_t> sel_p = finish(k, sp + seg_off[k], part_p, cand_p, cr.lo_p, cr.hi_p);
    const Selected<acc_t> sel_q = finish(k, sq + seg_off[k], part_q, cand_q, cr.lo_q, cr.hi_q);
    set_scale_stats(k, sel_p, sel_q);
  });

  tick("4c");
  // 5. S1, S2 and the loss numerator per block, combined in block order.
  std::vector<SumPartial<acc_t>> part_s(num_blocks);
  run_tasks(num_blocks, total, [&](int64_t i) {
    const Block& bl = blocks[i];
    part_s[i] = sum_pass(sp + bl.start, sq + bl.start, bl.len, ST + bl.k * kNumStats, avx512);
  });
  run_tasks(static_cast<int64_t>(big.size()), total, [&](int64_t t) {
    const int64_t k = big[t];
    SumPartial<acc_t> sum;
    for (int64_t i = first_block[k]; i < num_blocks && blocks[i].k == k; ++i) {
      const SumPartial<acc_t>& pb = part_s[i];
      sum.s1 += pb.s1;
      sum.s2 += pb.s2;
      sum.loss += pb.loss;
      if (sum.median_pos < 0 && pb.median_pos >= 0) sum.median_pos = blocks[i].start - seg_off[k] + pb.median_pos;
    }
    TORCH_CHECK(sum.median_pos >= 0, "sa_hdn_forward: internal error, median element not found");
    set_sum_stats(k, sum);
  });

  tick("5");
  double loss_sum = 0;
  for (int64_t k = 0; k < K; ++k) loss_sum += ctx[k].loss;
  at::Tensor loss = at::zeros({}, pred.options().dtype(stats_dtype));
  if (total > 0) {
    loss.data_ptr<acc_t>()[0] = static_cast<acc_t>(static_cast<acc_t>(loss_sum) / static_cast<acc_t>(total));
  }
  return {loss.to(pred_in.scalar_type()), seg, stats, median_index};
}

void check_image(const char* name, const at::Tensor& t, const at::Tensor& pred) {
  TORCH_CHECK_VALUE(t.dim() == 3 && t.sizes() == pred.sizes(), "sa_hdn: ", name,
                    " must have the shape of pred (B, H, W) = ", pred.sizes(), ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == pred.device(), "sa_hdn: ", name, " is on ", t.device(), " but pred is on ",
                    pred.device());
}

at::Tensor to_acc(const at::Tensor& t) {
  return (t.scalar_type() == at::kDouble ? t : t.to(at::kFloat)).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sa_hdn_forward_cpu(
    const at::Tensor& pred, const at::Tensor& target, const std::optional<at::Tensor>& instances,
    const std::optional<at::Tensor>& valid, bool include_global, double eps, int64_t min_pixels,
    int64_t stats_grad) {
  TORCH_CHECK_TYPE(at::isFloatingType(pred.scalar_type()), "sa_hdn: pred must be a floating tensor, got ",
                   pred.scalar_type());
  TORCH_CHECK_VALUE(pred.dim() == 3, "sa_hdn: pred must have shape (B, H, W), got ", pred.sizes());
  check_image("target", target, pred);
  TORCH_CHECK_TYPE(target.scalar_type() == pred.scalar_type(), "sa_hdn: target must have the dtype of pred (",
                   pred.scalar_type(), "), got ", target.scalar_type());
  TORCH_CHECK_VALUE(eps >= 0, "sa_hdn: eps must be >= 0, got ", eps);
  TORCH_CHECK_VALUE(min_pixels >= 0, "sa_hdn: min_pixels must be >= 0, got ", min_pixels);
  TORCH_CHECK_VALUE(stats_grad >= 0 && stats_grad <= 2, "sa_hdn: stats_grad must be 0, 1 or 2, got ", stats_grad);
  TORCH_CHECK_VALUE(pred.size(1) * pred.size(2) < (int64_t(1) << 31), "sa_hdn: images of ", pred.size(1), "x",
                    pred.size(2), " pixels are too large");
  at::Tensor inst;
  if (instances.has_value() && instances->defined()) {
    inst = *instances;
    TORCH_CHECK_TYPE(at::isIntegralType(inst.scalar_type(), /*includeBool=*/false),
                     "sa_hdn: instances must be an integer tensor (uint8, int16, int32 or int64), got ",
                     inst.scalar_type());
    TORCH_CHECK_VALUE(inst.dim() == 4 && inst.size(0) == pred.size(0) && inst.size(2) == pred.size(1) &&
                          inst.size(3) == pred.size(2),
                      "sa_hdn: instances must have shape (B, L, H, W) with (B, H, W) = ", pred.sizes(), ", got ",
                      inst.sizes());
    TORCH_CHECK_VALUE(inst.device() == pred.device(), "sa_hdn: instances is on ", inst.device(),
                      " but pred is on ", pred.device());
    inst = inst.contiguous();
  }
  at::Tensor val;
  if (valid.has_value() && valid->defined()) {
    val = *valid;
    TORCH_CHECK_TYPE(val.scalar_type() == at::kBool, "sa_hdn: valid must be a bool tensor, got ",
                     val.scalar_type());
    check_image("valid", val, pred);
    val = val.contiguous();
  }
  const at::Tensor p = to_acc(pred), q = to_acc(target);
  if (p.scalar_type() == at::kDouble) {
    return sa_hdn_forward_impl<double>(pred, p, q, inst, val, include_global, eps, min_pixels);
  }
  return sa_hdn_forward_impl<float>(pred, p, q, inst, val, include_global, eps, min_pixels);
}

// ----------------------------------------------------------------------- backward

// Per-context constants of westar::pixel_grad, hoisted out of the pixel loop. With
// r in {-1, 0, +1} (or NaN), r / D == r * (1 / D) exactly, so the vector path below
// gives the same bits as pixel_grad.
template <typename acc_t>
struct GradConsts {
  acc_t inv_scale;   // 1 / D_p
  acc_t scale_term;  // S2 / (D_p n)
  acc_t median_term; // -S1 / D_p + scale_term * S3
};

#if WESTAR_HAVE_AVX512_PATHS
// The chunk loop of sa_hdn_backward_impl<float> with 16-pixel chunks, for chunks
// [begin, end). Per level, the contexts present in the chunk are taken one at a time
// (usually one, two at a boundary): their lanes get the vector form of pixel_grad, and
// the lane of a context's median, if here, its median term. Per lane this is
// pixel_grad's arithmetic in pixel_grad's order (r * (1 / D) == r / D for r in
// {-1, 0, 1}), so no scalar path is needed.
WESTAR_AVX512 void backward_chunks_avx512(int64_t begin, int64_t end, const float* P, const float* Q,
                                          const int32_t* S, int64_t N, int64_t C, const float* ST,
                                          const int64_t* MI, const GradConsts<float>* consts, int stats_grad,
                                          float scale, float* G) {
  const __m512 scale_v = _mm512_set1_ps(scale);
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t ch = begin; ch < end; ++ch) {
    const int64_t j = ch * 16;
    const __m512 pv = _mm512_loadu_ps(P + j), qv = _mm512_loadu_ps(Q + j);
    __m512 g = _mm512_setzero_ps();
    for (int64_t c = 0; c < C; ++c) {
      const int32_t* sk = S + c * N + j;
      const __m512i kv = _mm512_loadu_si512(sk);
      __mmask16 todo = _mm512_cmpge_epi32_mask(kv, zero);
      while (todo) {
        const int32_t k = sk[__builtin_ctz(todo)];
        const __mmask16 lanes = _mm512_mask_cmpeq_epi32_mask(todo, kv, _mm512_set1_epi32(k));
        todo &= ~lanes;
        const float* st = ST + static_cast<int64_t>(k) * kNumStats;
        const GradConsts<float>& gc = consts[k];
        const __m512 tp = _mm512_set1_ps(st[kMedianPred]);
        const __m512 ph = _mm512_div_ps(_mm512_sub_ps(pv, tp), _mm512_set1_ps(st[kScalePred]));
        const __m512 qh = _mm512_div_ps(_mm512_sub_ps(qv, _mm512_set1_ps(st[kMedianTarget])),
                                        _mm512_set1_ps(st[kScaleTarget]));
        __m512 gk = _mm512_mul_ps(cpu::sign16(_mm512_sub_ps(ph, qh)), _mm512_set1_ps(gc.inv_scale));
        if (stats_grad >= kStatsGradScale) {
          gk = _mm512_sub_ps(gk, _mm512_mul_ps(_mm512_set1_ps(gc.scale_term), cpu::sign16(_mm512_sub_ps(pv, tp))));
        }
        if (stats_grad == kStatsGradFull) {
          const int64_t mrel = MI[k] - j;
          if (mrel >= 0 && mrel < 16) {
            const __mmask16 median = static_cast<__mmask16>(lanes & (1u << mrel));
            gk = _mm512_mask_add_ps(gk, median, gk, _mm512_set1_ps(gc.median_term));
          }
        }
        g = _mm512_mask_add_ps(g, lanes, g, gk);
      }
    }
    _mm512_storeu_ps(G + j, _mm512_mul_ps(g, scale_v));
  }
}
#endif

template <typename acc_t>
void sa_hdn_backward_impl(double grad, const at::Tensor& pred, const at::Tensor& target, const at::Tensor& seg,
                          const at::Tensor& stats, const at::Tensor& median_index, int stats_grad,
                          at::Tensor& out) {
  using V = typename cpu::Simd<acc_t>::V;
  using M = typename cpu::Simd<acc_t>::M;
  constexpr int kW = cpu::Simd<acc_t>::kWidth;
  const int64_t C = seg.size(0);
  const int64_t N = pred.numel();
  const int64_t K = stats.size(0);
  const acc_t* P = pred.data_ptr<acc_t>();
  const acc_t* Q = target.data_ptr<acc_t>();
  const int32_t* S = seg.data_ptr<int32_t>();
  const acc_t* ST = stats.data_ptr<acc_t>();
  const int64_t* MI = median_index.data_ptr<int64_t>();
  acc_t* G = out.data_ptr<acc_t>();
  double count = 0;
  for (int64_t k = 0; k < K; ++k) count += static_cast<double>(ST[k * kNumStats + kCount]);
  if (K == 0 || count == 0) {
    std::fill(G, G + N, acc_t(0));
    return;
  }
  std::vector<GradConsts<acc_t>> consts(K);
  for (int64_t k = 0; k < K; ++k) {
    const acc_t* st = ST + k * kNumStats;
    const acc_t scale = st[kScalePred];
    consts[k].inv_scale = acc_t(1) / scale;
    consts[k].scale_term = st[kSumSignHat] / (scale * st[kCount]);
    consts[k].median_term = -st[kSumSign] / scale + consts[k].scale_term * st[kSumSignPred];
  }
  const acc_t scale = static_cast<acc_t>(grad / count);
  const V scale_v = cpu::vsplat<V>(scale), zero = cpu::vsplat<V>(acc_t(0));
  auto scalar_pixel = [&](int64_t j) {
    const acc_t p = P[j], q = Q[j];
    acc_t g = 0;
    for (int64_t c = 0; c < C; ++c) {
      const int32_t k = S[c * N + j];
      if (k < 0) continue;
      g += pixel_grad<acc_t>(p, q, ST + static_cast<int64_t>(k) * kNumStats, MI[k] == j, stats_grad);
    }
    G[j] = g * scale;
  };
#if WESTAR_HAVE_AVX512_PATHS
  if constexpr (std::is_same_v<acc_t, float>) {
    if (cpu::use_avx512()) {
      const int64_t chunks16 = N / 16;
      at::parallel_for(0, chunks16, 1024, [&](int64_t begin, int64_t end) {
        backward_chunks_avx512(begin, end, P, Q, S, N, C, ST, MI, consts.data(), stats_grad, scale, G);
      });
      for (int64_t j = chunks16 * 16; j < N; ++j) scalar_pixel(j);
      return;
    }
  }
#endif
  // Chunks of kW pixels: a level whose usable pixels in the chunk all belong to one
  // context (and hold none of its median) runs in vector form, else lane by lane.
  const int64_t chunks = N / kW;
  at::parallel_for(0, chunks, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch) {
      const int64_t j = ch * kW;
      const V pv = cpu::vload<V>(P + j), qv = cpu::vload<V>(Q + j);
      V g = zero;
      for (int64_t c = 0; c < C; ++c) {
        const int32_t* sk = S + c * N + j;
        int32_t k0 = -1;
        for (int l = 0; l < kW; ++l) k0 = sk[l] > k0 ? sk[l] : k0;
        if (k0 < 0) continue;
        bool uniform = true;
        M use = {};
        for (int l = 0; l < kW; ++l) {
          uniform &= (sk[l] == k0) | (sk[l] < 0);
          use[l] = sk[l] >= 0 ? -1 : 0;
        }
        const int64_t mrel = MI[k0] - j;
        if (uniform && !(stats_grad == kStatsGradFull && mrel >= 0 && mrel < kW)) {
          const acc_t* st = ST + static_cast<int64_t>(k0) * kNumStats;
          const GradConsts<acc_t>& gc = consts[k0];
          const V ph = (pv - cpu::vsplat<V>(st[kMedianPred])) / cpu::vsplat<V>(st[kScalePred]);
          const V qh = (qv - cpu::vsplat<V>(st[kMedianTarget])) / cpu::vsplat<V>(st[kScaleTarget]);
          V gc_v = cpu::vsign<acc_t>(ph - qh) * cpu::vsplat<V>(gc.inv_scale);
          if (stats_grad >= kStatsGradScale) {
            gc_v -= cpu::vsplat<V>(gc.scale_term) * cpu::vsign<acc_t>(pv - cpu::vsplat<V>(st[kMedianPred]));
          }
          g += cpu::vkeep(use, gc_v);
        } else {
          for (int l = 0; l < kW; ++l) {
            const int32_t k = sk[l];
            if (k < 0) continue;
            g[l] += pixel_grad<acc_t>(P[j + l], Q[j + l], ST + static_cast<int64_t>(k) * kNumStats,
                                      MI[k] == j + l, stats_grad);
          }
        }
      }
      const V r = g * scale_v;
      std::memcpy(G + j, &r, sizeof(V));
    }
  });
  for (int64_t j = chunks * kW; j < N; ++j) scalar_pixel(j);
}

at::Tensor sa_hdn_backward_cpu(const at::Tensor& grad, const at::Tensor& pred, const at::Tensor& target,
                               const at::Tensor& seg, const at::Tensor& stats, const at::Tensor& median_index,
                               int64_t stats_grad) {
  TORCH_CHECK_TYPE(at::isFloatingType(pred.scalar_type()), "sa_hdn_backward: pred must be a floating tensor, got ",
                   pred.scalar_type());
  TORCH_CHECK_VALUE(pred.dim() == 3, "sa_hdn_backward: pred must have shape (B, H, W), got ", pred.sizes());
  check_image("target", target, pred);
  TORCH_CHECK_VALUE(grad.numel() == 1, "sa_hdn_backward: grad must hold one element, got ", grad.sizes());
  TORCH_CHECK_TYPE(seg.scalar_type() == at::kInt, "sa_hdn_backward: seg must be int32, got ", seg.scalar_type());
  TORCH_CHECK_VALUE(seg.dim() == 4 && seg.size(1) == pred.size(0) && seg.size(2) == pred.size(1) &&
                        seg.size(3) == pred.size(2),
                    "sa_hdn_backward: seg must have shape (C, B, H, W) with (B, H, W) = ", pred.sizes(), ", got ",
                    seg.sizes());
  const bool is_double = pred.scalar_type() == at::kDouble;
  const at::ScalarType stats_dtype = is_double ? at::kDouble : at::kFloat;
  TORCH_CHECK_TYPE(stats.scalar_type() == stats_dtype, "sa_hdn_backward: stats must be ", stats_dtype, ", got ",
                   stats.scalar_type());
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(1) == kNumStats, "sa_hdn_backward: stats must have shape (K, ",
                    int(kNumStats), "), got ", stats.sizes());
  TORCH_CHECK_TYPE(median_index.scalar_type() == at::kLong, "sa_hdn_backward: median_index must be int64, got ",
                   median_index.scalar_type());
  TORCH_CHECK_VALUE(median_index.dim() == 1 && median_index.size(0) == stats.size(0),
                    "sa_hdn_backward: median_index must have shape (K,) = (", stats.size(0), ",), got ",
                    median_index.sizes());
  TORCH_CHECK_VALUE(stats_grad >= 0 && stats_grad <= 2, "sa_hdn_backward: stats_grad must be 0, 1 or 2, got ",
                    stats_grad);
  const at::Tensor p = to_acc(pred), q = to_acc(target.to(pred.scalar_type()));
  const at::Tensor s = seg.contiguous(), st = stats.contiguous(), mi = median_index.contiguous();
  const double g = grad.to(at::kDouble).contiguous().data_ptr<double>()[0];
  at::Tensor out = cpu::pooled_empty(pred.sizes(), p.options());
  if (is_double) {
    sa_hdn_backward_impl<double>(g, p, q, s, st, mi, static_cast<int>(stats_grad), out);
  } else {
    sa_hdn_backward_impl<float>(g, p, q, s, st, mi, static_cast<int>(stats_grad), out);
  }
  return out.scalar_type() == pred.scalar_type() ? out : out.to(pred.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(westar_ops, CPU, m) {
  m.impl("sa_hdn_forward", &sa_hdn_forward_cpu);
  m.impl("sa_hdn_backward", &sa_hdn_backward_cpu);
}

}  // namespace westar
