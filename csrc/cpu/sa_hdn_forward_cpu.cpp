// CPU kernel of sa_hdn_forward (contract: docs/internals.md). In O(N + K) apart from the
// selections, in named phases (sa_hdn_forward_impl calls them in order):
//  0. mark_usable_pixels: per image, a byte mask of the usable pixels (valid, finite
//     target), shared by all levels.
//  1. label_planes (sa_hdn_labeling.h): every (level, image) plane in parallel is cut
//     into runs of equal ids; ids > 0 are compacted through a small open-addressing hash
//     table (never an array indexed by raw id), so the cost does not depend on how large
//     or sparse the ids are. Only the ids and the mask are read.
//  2. number_contexts: serially, per plane, sort its few unique ids and number the
//     contexts that have at least max(min_pixels, 1) pixels in canonical order (level,
//     image, id ascending).
//  3. scatter_pixels: counting sort; every plane, run by run, scatters its usable pixels
//     into their contexts' segments (pred, target) in ascending pixel order and writes
//     seg (the context number k, or -1). Big segments take their strided pivot samples
//     here, while the values are in L1.
//  4. Per segment, an exact lower median and mean absolute deviation of pred and of
//     target (sa_hdn_select.h): the sample gives two pivots that bracket the median rank
//     with high probability; one pass counts and sums the elements outside the pivots
//     (relative to the pivots, so that no cancellation occurs) and collects the few
//     inside; radix selection on those gives the median and the sums give the MAD. When
//     the pivots miss (rare), the segment falls back to nth_element on all of it.
//     4a small_segments_and_pivots: small segments entirely, in one task each
//        (nth_element), and the pivots of the big ones;
//     4b select_big_blocks: big segments in fixed blocks, one pass each;
//     4c finish_big_selection: per big segment, combine the blocks and select.
//  5. sum_big_blocks: per big segment, S1, S2 and the loss numerator in fixed blocks,
//     combined in block order; the loss sums the contexts in context order.
// The hot float32 loops (3, 4, 5) have AVX-512 versions (cpu_avx512.h) used when the CPU
// has AVX-512; WESTAR_CPU_ISA=generic forces the portable ones. Parallelism:
// at::parallel_for / run_tasks over planes, blocks and segments; every partial result is
// combined in a fixed order, so the output does not depend on the number of threads.
// The backward is in sa_hdn_backward_cpu.cpp.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "cpu_avx512.h"
#include "cpu_tasks.h"
#include "cpu_workspace.h"
#include "sa_hdn_labeling.h"
#include "sa_hdn_select.h"
#include "westar/op_checks.h"
#include "westar/sa_hdn_math.h"

namespace westar {
namespace {

using cpu::run_tasks;

// The inputs of one forward call, as every phase sees them.
template <typename acc_t>
struct Problem {
  int64_t B, H, W, hw;
  int64_t L;  // instance levels
  int64_t G;  // 1 with the global level, else 0
  int64_t C;  // levels: G + L
  int64_t num_planes;  // C * B, plane pi = (level pi / B, image pi % B)
  const acc_t* pred;
  const acc_t* target;
  const bool* valid;  // or nullptr
  bool cpu_avx512;    // the CPU has AVX-512 (id scan)
  bool avx512;        // ... and acc_t is float (value loops)
};

// The kept contexts in canonical order: context k's pixels are [off[k], off[k] + len[k])
// of the segment arrays; it lives in plane plane[k].
struct Segments {
  std::vector<int64_t> off, len, plane;
  int64_t total = 0;  // memberships of kept contexts
  int64_t count() const { return static_cast<int64_t>(len.size()); }
};

// Scratch of one call, carved out of one cpu::Workspace. Sized for the most memberships
// there can be (C usable levels of every pixel); pages that are not used are never
// touched.
template <typename acc_t>
struct Scratch {
  using key_t = typename KeyTraits<acc_t>::key_t;
  int64_t max_total, cand_bound, sample_bound;
  uint8_t* usable;  // (B * hw) usable-pixel bytes
  acc_t* sp;        // segment arrays of pred and target, plus one sink element
  acc_t* sq;
  key_t* cand_p;  // candidate keys of the big segments' blocks
  key_t* cand_q;
  key_t* sample_p;  // strided samples of the big segments
  key_t* sample_q;
};

// The bounds of a Scratch (its pointers are taken later, in the order of the phases).
template <typename acc_t>
Scratch<acc_t> scratch_bounds(const Problem<acc_t>& pr) {
  Scratch<acc_t> s{};
  s.max_total = pr.C * pr.B * pr.hw;
  // At most one more candidate per block than pixels, and at most
  // max_total / (kSmallSegment + 1) big segments.
  s.cand_bound = s.max_total + s.max_total / kBlock + 2 * s.max_total / (kSmallSegment + 1) + 2;
  // sample_size(n) <= 512 + n / 8.
  s.sample_bound = 512 * (s.max_total / (kSmallSegment + 1) + 1) + s.max_total / 8 + 1;
  return s;
}

template <typename acc_t>
size_t scratch_bytes(const Problem<acc_t>& pr, const Scratch<acc_t>& s) {
  using key_t = typename KeyTraits<acc_t>::key_t;
  using WS = cpu::Workspace;
  return WS::bytes_for<uint8_t>(pr.B * pr.hw + 64) + 2 * WS::bytes_for<acc_t>(s.max_total + 1) +
         2 * WS::bytes_for<key_t>(s.cand_bound) + 2 * WS::bytes_for<key_t>(s.sample_bound);
}

// ------------------------------------------------------------- phases 0 to 2: labeling

// 0. The usable-pixel bytes of every image; returns the number of usable pixels per image.
template <typename acc_t>
std::vector<int64_t> mark_usable_pixels(const Problem<acc_t>& pr, uint8_t* usable) {
  std::vector<int64_t> usable_count(pr.B);
  run_tasks(pr.B, pr.B * pr.hw, [&](int64_t b) {
    usable_count[b] = mark_usable(pr.valid ? pr.valid + b * pr.hw : nullptr, pr.target + b * pr.hw, pr.hw,
                                  usable + b * pr.hw);
  });
  return usable_count;
}

// 1. Runs, slots and counts of every plane (seg is written by the scatter). Raises for
// the first bad id in instances' (b, l, y, x) order, negative ids first.
template <typename acc_t>
std::vector<Plane> label_planes(const Problem<acc_t>& pr, const at::Tensor& instances, const uint8_t* usable,
                                const std::vector<int64_t>& usable_count) {
  std::vector<Plane> planes(pr.num_planes);
  run_tasks(pr.num_planes, pr.num_planes * pr.hw, [&](int64_t pi) {
    const int64_t c = pi / pr.B, b = pi % pr.B;
    if (c < pr.G) {
      label_global(pr.hw, usable_count[b], planes[pi]);
    } else {
      const int64_t l = c - pr.G;
      AT_DISPATCH_INTEGRAL_TYPES(instances.scalar_type(), "sa_hdn_forward_cpu", [&] {
        const scalar_t* ids = instances.data_ptr<scalar_t>() + (b * pr.L + l) * pr.hw;
        label_instances<scalar_t>(ids, usable + b * pr.hw, pr.hw, planes[pi], pr.cpu_avx512);
      });
    }
  });
  for (const bool negative : {true, false}) {
    int64_t first = -1;  // flat index into instances (B, L, H, W)
    for (int64_t pi = pr.G * pr.B; pi < pr.num_planes; ++pi) {
      const int64_t j = negative ? planes[pi].negative_pixel : planes[pi].large_pixel;
      if (j < 0) continue;
      const int64_t at = ((pi % pr.B) * pr.L + (pi / pr.B - pr.G)) * pr.hw + j;
      if (first < 0 || at < first) first = at;
    }
    if (first >= 0) {
      const int64_t j = first % pr.hw, bl = first / pr.hw;
      raise_bad_id(negative, bl / pr.L, bl % pr.L, j / pr.W, j % pr.W);
    }
  }
  return planes;
}

// 2. Numbers the contexts with at least min_n pixels in canonical order (level, image, id).
inline Segments number_contexts(std::vector<Plane>& planes, int64_t min_n) {
  Segments seg;
  for (int64_t pi = 0; pi < static_cast<int64_t>(planes.size()); ++pi) {
    Plane& pl = planes[pi];
    const int64_t slots = static_cast<int64_t>(pl.ids.size());
    std::vector<int32_t> order(slots);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return pl.ids[a] < pl.ids[b]; });
    pl.slot_to_k.assign(slots, -1);
    pl.first_k = seg.count();
    for (int32_t s : order) {
      if (pl.counts[s] < min_n) continue;
      // K <= memberships <= kMaxMemberships (check_sa_hdn_forward): k fits in int32.
      pl.slot_to_k[s] = static_cast<int32_t>(seg.count());
      seg.off.push_back(seg.total);
      seg.len.push_back(pl.counts[s]);
      seg.plane.push_back(pi);
      seg.total += pl.counts[s];
    }
    pl.num_k = seg.count() - pl.first_k;
  }
  return seg;
}

// Where the samples of each big segment go (-1 for small segments); returns their total.
inline int64_t sample_offsets(const Segments& seg, std::vector<int64_t>& sample_off) {
  sample_off.assign(seg.count(), -1);
  int64_t total_samples = 0;
  for (int64_t k = 0; k < seg.count(); ++k) {
    if (seg.len[k] <= kSmallSegment) continue;
    sample_off[k] = total_samples;
    total_samples += sample_size(seg.len[k]);
  }
  return total_samples;
}

// ---------------------------------------------------------------- phase 3: the scatter

// Scatters the usable pixels of plane pi into their segments (pred, target), writes the
// plane's seg, takes the big segments' samples, and lists each context's runs in pixel
// order (for median_pixel).
template <typename acc_t>
void scatter_plane(const Problem<acc_t>& pr, int64_t pi, Plane& pl, const Segments& seg,
                   const std::vector<int64_t>& sample_off, const Scratch<acc_t>& sc, int32_t* seg_out) {
  const int64_t b = pi % pr.B;
  const acc_t* p = pr.pred + b * pr.hw;
  const acc_t* q = pr.target + b * pr.hw;
  int32_t* s = seg_out + pi * pr.hw;
  const uint8_t* u = sc.usable + b * pr.hw;
  acc_t* sp = sc.sp;
  acc_t* sq = sc.sq;
  const int32_t* s2k = pl.slot_to_k.data();
  std::vector<int64_t> cursor(pl.num_k);
  std::vector<SampleCursor<acc_t>> samplers(pl.num_k);
  for (int64_t i = 0; i < pl.num_k; ++i) {
    const int64_t k = pl.first_k + i;
    cursor[i] = seg.off[k];
    if (sample_off[k] >= 0) {
      samplers[i].start(seg.off[k], seg.len[k], sc.sample_p + sample_off[k], sc.sample_q + sample_off[k]);
    }
  }
  int64_t* cur = cursor.data() - pl.first_k;
  SampleCursor<acc_t>* sampler = samplers.data() - pl.first_k;
  // Runs of one id: every usable pixel of a run belongs to the run's context (if any).
  const int64_t sink = sc.max_total;  // written by unusable pixels instead of branching
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
    SampleCursor<acc_t>& smp = sampler[k];
#if WESTAR_HAVE_AVX512_PATHS
    if constexpr (std::is_same_v<acc_t, float>) {
      if (pr.avx512) {
        cur[k] = cpu::compact_run_avx512(p + r.start, q + r.start, u + r.start, sr, r.len, k, sp, sq, pos,
                                         [&](int64_t written) {
                                           if (written > smp.next) smp.take(written, sp, sq);
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
      if (pos > smp.next) smp.take(pos, sp, sq);
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
}

// Flat pixel index of the element at position pos (0-based, pixel order) of context k's
// segment: the run that holds it, then its rank among the run's usable pixels.
template <typename acc_t>
int64_t median_pixel(const Problem<acc_t>& pr, const std::vector<Plane>& planes, const Segments& seg,
                     const uint8_t* usable, int64_t k, int64_t pos) {
  const int64_t pi = seg.plane[k];
  const Plane& pl = planes[pi];
  const int64_t i = k - pl.first_k;
  const int32_t* first = pl.runs_by_k.data() + pl.runs_by_k_off[i];
  const int32_t* last = pl.runs_by_k.data() + pl.runs_by_k_off[i + 1];
  const int64_t target = seg.off[k] + pos;
  // The last run that starts at or before target.
  const int32_t* it =
      std::upper_bound(first, last, target, [&](int64_t t, int32_t ri) { return t < pl.runs[ri].seg_pos; });
  TORCH_CHECK(it != first, "sa_hdn_forward: internal error, median run not found");
  const Run& r = pl.runs[*(it - 1)];
  const int64_t b = pi % pr.B;
  const uint8_t* u = usable + b * pr.hw + r.start;
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
    if (u[j] != 0 && left-- == 0) return b * pr.hw + r.start + j;
  }
  TORCH_CHECK(false, "sa_hdn_forward: internal error, median pixel not found");
  return -1;
}

// --------------------------------------------------------- phases 4 and 5: statistics

// One fixed block of a big segment.
struct Block {
  int64_t k;      // context
  int64_t start;  // offset in the segment arrays
  int64_t len;
  int64_t cand;  // offset in the candidate arrays (len + 1 keys)
};

// The blocks of the big segments, in segment order; first[k] is context k's first block.
struct BlockPlan {
  std::vector<Block> blocks;
  std::vector<int64_t> first;
  int64_t cand_total = 0;
  int64_t count() const { return static_cast<int64_t>(blocks.size()); }
};

// The outputs of phases 4 and 5: stats, median_index and the per-context loss
// numerators, with the pivots of the big segments in between.
template <typename acc_t>
struct ContextStats {
  acc_t* stats;            // (K, kNumStats)
  int64_t* median_index;   // (K,)
  std::vector<double> loss;  // (K,) loss numerators
  std::vector<acc_t> lo_p, hi_p, lo_q, hi_q;  // pivots (big segments)
  acc_t eps;

  ContextStats(acc_t* st, int64_t* mi, int64_t K, acc_t eps_)
      : stats(st), median_index(mi), loss(K, 0.0), lo_p(K), hi_p(K), lo_q(K), hi_q(K), eps(eps_) {}

  void set_scale(int64_t k, int64_t n, const Selected<acc_t>& sel_p, const Selected<acc_t>& sel_q) {
    const double nd = static_cast<double>(n);
    acc_t* st = stats + k * kNumStats;
    st[kMedianPred] = sel_p.t;
    st[kScalePred] = static_cast<acc_t>(sel_p.abs_sum / nd) + eps;
    st[kMedianTarget] = sel_q.t;
    st[kScaleTarget] = static_cast<acc_t>(sel_q.abs_sum / nd) + eps;
    st[kSumSignPred] = static_cast<acc_t>(sel_p.n_greater - sel_p.n_less);
    st[kCount] = static_cast<acc_t>(n);
  }
  void set_sums(int64_t k, const SumPartial<acc_t>& sums, int64_t median_flat) {
    acc_t* st = stats + k * kNumStats;
    st[kSumSign] = static_cast<acc_t>(sums.s1);
    st[kSumSignHat] = static_cast<acc_t>(sums.s2);
    loss[k] = sums.loss;
    median_index[k] = median_flat;
  }
};

// Everything phases 4 and 5 read.
template <typename acc_t>
struct StatsInput {
  const Problem<acc_t>& pr;
  const std::vector<Plane>& planes;
  const Segments& seg;
  const Scratch<acc_t>& sc;
  const std::vector<int64_t>& sample_off;
  int64_t median_of(int64_t k, int64_t pos) const { return median_pixel(pr, planes, seg, sc.usable, k, pos); }
};

// 4a. Small segments entirely (nth_element, sums); pivots of the big ones. by_size lists
// the contexts big first, so that uneven tasks balance across threads.
template <typename acc_t>
void small_segments_and_pivots(const StatsInput<acc_t>& in, const std::vector<int64_t>& by_size,
                               ContextStats<acc_t>& cs) {
  using key_t = typename KeyTraits<acc_t>::key_t;
  const Segments& seg = in.seg;
  run_tasks(seg.count(), seg.total, [&](int64_t t) {
    const int64_t k = by_size[t];
    const int64_t n = seg.len[k], off = seg.off[k];
    const acc_t* p = in.sc.sp + off;
    const acc_t* q = in.sc.sq + off;
    if (n > kSmallSegment) {
      const int64_t ns = sample_size(n);
      sample_pivots(in.sc.sample_p + in.sample_off[k], ns, n, &cs.lo_p[k], &cs.hi_p[k]);
      sample_pivots(in.sc.sample_q + in.sample_off[k], ns, n, &cs.lo_q[k], &cs.hi_q[k]);
      return;
    }
    key_t scratch[kSmallSegment];
    const Selected<acc_t> sel_p = select_exact(p, n, scratch);
    const Selected<acc_t> sel_q = select_exact(q, n, scratch);
    cs.set_scale(k, n, sel_p, sel_q);
    const SumPartial<acc_t> sums = sum_pass(p, q, n, cs.stats + k * kNumStats, in.pr.avx512);
    cs.set_sums(k, sums, in.median_of(k, sums.median_pos));
  });
}

inline BlockPlan plan_blocks(const Segments& seg, std::vector<int64_t> big_sorted) {
  BlockPlan plan;
  plan.first.assign(seg.count() + 1, 0);
  std::sort(big_sorted.begin(), big_sorted.end());
  for (int64_t k : big_sorted) {
    plan.first[k] = plan.count();
    for (int64_t s = 0; s < seg.len[k]; s += kBlock) {
      const int64_t len = std::min(kBlock, seg.len[k] - s);
      plan.blocks.push_back({k, seg.off[k] + s, len, plan.cand_total});
      plan.cand_total += len + 1;  // select_pass may write one key past the last candidate
    }
  }
  return plan;
}

// Partial selections of pred and target per block.
template <typename acc_t>
struct BlockSelect {
  std::vector<SelectPartial<acc_t>> p, q;
};

// 4b. One pass per block: counts and sums outside the pivots, candidates inside.
template <typename acc_t>
BlockSelect<acc_t> select_big_blocks(const StatsInput<acc_t>& in, const BlockPlan& plan,
                                     const ContextStats<acc_t>& cs) {
  BlockSelect<acc_t> part{std::vector<SelectPartial<acc_t>>(plan.count()),
                          std::vector<SelectPartial<acc_t>>(plan.count())};
  const Scratch<acc_t>& sc = in.sc;
  run_tasks(plan.count(), in.seg.total, [&](int64_t i) {
    const Block& bl = plan.blocks[i];
    part.p[i] = select_pass(sc.sp + bl.start, bl.len, cs.lo_p[bl.k], cs.hi_p[bl.k], sc.cand_p + bl.cand, in.pr.avx512);
    part.q[i] = select_pass(sc.sq + bl.start, bl.len, cs.lo_q[bl.k], cs.hi_q[bl.k], sc.cand_q + bl.cand, in.pr.avx512);
  });
  return part;
}

// Combines the block partials of big segment k (values x, candidates in cand) and
// selects its median; nth_element on the whole segment when the pivots missed.
template <typename acc_t>
Selected<acc_t> combine_and_select(const BlockPlan& plan, int64_t k, int64_t n, const acc_t* x,
                                   const std::vector<SelectPartial<acc_t>>& part,
                                   typename KeyTraits<acc_t>::key_t* cand, acc_t lo, acc_t hi, bool avx512) {
  using key_t = typename KeyTraits<acc_t>::key_t;
  const int64_t num_blocks = plan.count();
  const int64_t first = plan.first[k];
  SelectPartial<acc_t> sum;
  key_t* dst = cand + plan.blocks[first].cand;
  for (int64_t i = first; i < num_blocks && plan.blocks[i].k == k; ++i) {
    const SelectPartial<acc_t>& pb = part[i];
    sum.n_lo += pb.n_lo;
    sum.n_hi += pb.n_hi;
    sum.s_lo += pb.s_lo;
    sum.s_hi += pb.s_hi;
    sum.has_bounds = i == first ? pb.has_bounds : (sum.has_bounds && pb.has_bounds);
    sum.key_min = std::min(sum.key_min, pb.key_min);
    sum.key_max = std::max(sum.key_max, pb.key_max);
    std::memmove(dst + sum.n_cand, cand + plan.blocks[i].cand, sizeof(key_t) * pb.n_cand);
    sum.n_cand += pb.n_cand;
  }
  Selected<acc_t> sel;
  if (!select_finish(sum, lo, hi, n, dst, &sel, avx512)) {
    RawBuffer<key_t> scratch(n);
    sel = select_exact(x, n, scratch.data());
  }
  return sel;
}

// 4c. Per big segment: gather the candidates, select, MAD.
template <typename acc_t>
void finish_big_selection(const StatsInput<acc_t>& in, const std::vector<int64_t>& big, const BlockPlan& plan,
                          const BlockSelect<acc_t>& part, ContextStats<acc_t>& cs) {
  const Scratch<acc_t>& sc = in.sc;
  run_tasks(static_cast<int64_t>(big.size()), in.seg.total, [&](int64_t t) {
    const int64_t k = big[t];
    const int64_t n = in.seg.len[k], off = in.seg.off[k];
    const bool avx512 = in.pr.avx512;
    const Selected<acc_t> sel_p =
        combine_and_select(plan, k, n, sc.sp + off, part.p, sc.cand_p, cs.lo_p[k], cs.hi_p[k], avx512);
    const Selected<acc_t> sel_q =
        combine_and_select(plan, k, n, sc.sq + off, part.q, sc.cand_q, cs.lo_q[k], cs.hi_q[k], avx512);
    cs.set_scale(k, n, sel_p, sel_q);
  });
}

// 5. S1, S2 and the loss numerator per block, combined in block order.
template <typename acc_t>
void sum_big_blocks(const StatsInput<acc_t>& in, const std::vector<int64_t>& big, const BlockPlan& plan,
                    ContextStats<acc_t>& cs) {
  const int64_t num_blocks = plan.count();
  std::vector<SumPartial<acc_t>> part(num_blocks);
  run_tasks(num_blocks, in.seg.total, [&](int64_t i) {
    const Block& bl = plan.blocks[i];
    part[i] = sum_pass(in.sc.sp + bl.start, in.sc.sq + bl.start, bl.len, cs.stats + bl.k * kNumStats, in.pr.avx512);
  });
  run_tasks(static_cast<int64_t>(big.size()), in.seg.total, [&](int64_t t) {
    const int64_t k = big[t];
    SumPartial<acc_t> sum;
    for (int64_t i = plan.first[k]; i < num_blocks && plan.blocks[i].k == k; ++i) {
      const SumPartial<acc_t>& pb = part[i];
      sum.s1 += pb.s1;
      sum.s2 += pb.s2;
      sum.loss += pb.loss;
      if (sum.median_pos < 0 && pb.median_pos >= 0) {
        sum.median_pos = plan.blocks[i].start - in.seg.off[k] + pb.median_pos;
      }
    }
    TORCH_CHECK(sum.median_pos >= 0, "sa_hdn_forward: internal error, median element not found");
    cs.set_sums(k, sum, in.median_of(k, sum.median_pos));
  });
}

// ------------------------------------------------------------------------ the forward

// build with -DWESTAR_PROFILE_PHASES: CPU time per phase on stderr.
class PhaseClock {
 public:
#ifdef WESTAR_PROFILE_PHASES
  PhaseClock() : last_(now()) {}
  void tick(const char* what) {
    const double t = now();
    fprintf(stderr, "%s %.3f ms\n", what, t - last_);
    last_ = t;
  }

 private:
  static double now() {
    timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
  }
  double last_;
#else
  void tick(const char*) {}
#endif
};

template <typename acc_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sa_hdn_forward_impl(
    const at::Tensor& pred_in, const at::Tensor& pred, const at::Tensor& target, const at::Tensor& instances,
    const at::Tensor& valid, bool include_global, double eps, int64_t min_pixels, int64_t max_contexts) {
  Problem<acc_t> pr;
  pr.B = pred.size(0);
  pr.H = pred.size(1);
  pr.W = pred.size(2);
  pr.hw = pr.H * pr.W;
  pr.L = instances.defined() ? instances.size(1) : 0;
  pr.G = include_global ? 1 : 0;
  pr.C = pr.G + pr.L;
  pr.num_planes = pr.C * pr.B;
  pr.pred = pred.data_ptr<acc_t>();
  pr.target = target.data_ptr<acc_t>();
  pr.valid = valid.defined() ? valid.data_ptr<bool>() : nullptr;
  // One ISA decision per call: the id scan is ISA-only, the value loops are float32-only.
  pr.cpu_avx512 = cpu::use_avx512();
  pr.avx512 = std::is_same_v<acc_t, float> && pr.cpu_avx512;
  const at::ScalarType stats_dtype = acc_dtype(pred.scalar_type());
  PhaseClock clock;

  at::Tensor seg_out = cpu::pooled_empty({pr.C, pr.B, pr.H, pr.W}, pred.options().dtype(at::kInt));
  Scratch<acc_t> sc = scratch_bounds(pr);
  cpu::Workspace ws(scratch_bytes(pr, sc));
  sc.usable = ws.take<uint8_t>(pr.B * pr.hw + 64);

  const std::vector<int64_t> usable_count = mark_usable_pixels(pr, sc.usable);
  std::vector<Plane> planes = label_planes(pr, instances, sc.usable, usable_count);
  clock.tick("label");
  const Segments seg = number_contexts(planes, std::max<int64_t>(min_pixels, 1));
  const int64_t K = seg.count();
  if (max_contexts > 0 && K > max_contexts) raise_too_many_contexts(K, max_contexts);
  clock.tick("number");

  std::vector<int64_t> sample_off;
  const int64_t total_samples = sample_offsets(seg, sample_off);
  TORCH_CHECK(total_samples <= sc.sample_bound, "sa_hdn_forward: internal error, sample bound");
  // The segment arrays have one more (sink) element, written by pixels of no context.
  sc.sp = ws.take<acc_t>(sc.max_total + 1);
  sc.sq = ws.take<acc_t>(sc.max_total + 1);
  using key_t = typename KeyTraits<acc_t>::key_t;
  sc.cand_p = ws.take<key_t>(sc.cand_bound);
  sc.cand_q = ws.take<key_t>(sc.cand_bound);
  sc.sample_p = ws.take<key_t>(sc.sample_bound);
  sc.sample_q = ws.take<key_t>(sc.sample_bound);
  int32_t* S0 = seg_out.data_ptr<int32_t>();
  run_tasks(pr.num_planes, pr.num_planes * pr.hw,
            [&](int64_t pi) { scatter_plane(pr, pi, planes[pi], seg, sample_off, sc, S0); });
  clock.tick("scatter");

  at::Tensor stats = at::empty({K, kNumStats}, pred.options().dtype(stats_dtype));
  at::Tensor median_index = at::empty({K}, pred.options().dtype(at::kLong));
  ContextStats<acc_t> cs(stats.data_ptr<acc_t>(), median_index.data_ptr<int64_t>(), K, static_cast<acc_t>(eps));
  const StatsInput<acc_t> in{pr, planes, seg, sc, sample_off};
  // Big segments first, so that uneven tasks balance across threads.
  std::vector<int64_t> by_size(K);
  std::iota(by_size.begin(), by_size.end(), 0);
  std::stable_sort(by_size.begin(), by_size.end(), [&](int64_t a, int64_t b) { return seg.len[a] > seg.len[b]; });
  std::vector<int64_t> big;
  for (int64_t k : by_size)
    if (seg.len[k] > kSmallSegment) big.push_back(k);

  small_segments_and_pivots(in, by_size, cs);
  clock.tick("4a");
  const BlockPlan plan = plan_blocks(seg, big);
  TORCH_CHECK(plan.cand_total <= sc.cand_bound, "sa_hdn_forward: internal error, candidate bound");
  const BlockSelect<acc_t> part = select_big_blocks(in, plan, cs);
  clock.tick("4b");
  finish_big_selection(in, big, plan, part, cs);
  clock.tick("4c");
  sum_big_blocks(in, big, plan, cs);
  clock.tick("5");

  double loss_sum = 0;
  for (int64_t k = 0; k < K; ++k) loss_sum += cs.loss[k];
  at::Tensor loss = at::zeros({}, pred.options().dtype(stats_dtype));
  if (seg.total > 0) {
    loss.data_ptr<acc_t>()[0] = static_cast<acc_t>(static_cast<acc_t>(loss_sum) / static_cast<acc_t>(seg.total));
  }
  // info = {K, N, no negative id, no id >= 2^31} (bad ids raised above).
  at::Tensor info = at::empty({4}, pred.options().dtype(at::kLong));
  int64_t* inf = info.data_ptr<int64_t>();
  inf[0] = K;
  inf[1] = seg.total;
  inf[2] = -1;
  inf[3] = -1;
  return {loss.to(pred_in.scalar_type()), seg_out, stats, median_index, info};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sa_hdn_forward_cpu(
    const at::Tensor& pred, const at::Tensor& target, const std::optional<at::Tensor>& instances,
    const std::optional<at::Tensor>& valid, bool include_global, double eps, int64_t min_pixels,
    int64_t stats_grad, int64_t max_contexts) {
  const SaHdnMasks masks = check_sa_hdn_forward(pred, target, instances, valid, include_global, eps, min_pixels,
                                                stats_grad, max_contexts);
  const at::ScalarType acc = acc_dtype(pred.scalar_type());
  const at::Tensor p = pred.to(acc).contiguous(), q = target.to(acc).contiguous();
  if (acc == at::kDouble) {
    return sa_hdn_forward_impl<double>(pred, p, q, masks.instances, masks.valid, include_global, eps, min_pixels,
                                       max_contexts);
  }
  return sa_hdn_forward_impl<float>(pred, p, q, masks.instances, masks.valid, include_global, eps, min_pixels,
                                       max_contexts);
}

}  // namespace

TORCH_LIBRARY_IMPL(westar_ops, CPU, m) { m.impl("sa_hdn_forward", &sa_hdn_forward_cpu); }

}  // namespace westar
