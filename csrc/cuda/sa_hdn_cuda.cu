// CUDA kernels of sa_hdn_forward / sa_hdn_backward (contract: docs/internals.md; design
// and byte/launch accounting: docs/gpu_kernels.md).
//
// Forward:
//  1. keys_kernel: one thread per pixel reads target/valid once and the id of every level,
//     and writes one 64-bit key per membership (level, image, pixel):
//     ((level * B + image) << 31) | id, or a sentinel (above every real key) for an
//     unusable pixel or id 0; the value is the pixel index inside the image.
//  2. CUB: stable radix sort of (key, pixel) on the 31 + log2(C*B + 1) key bits used, run
//     length encoding, exclusive scans: contexts come out in canonical order (level,
//     image, id ascending), each a contiguous run of its pixels in ascending order. Ids
//     are never used as array indices, so sparse ids up to 2^31-1 cost nothing more.
//  3. No host sync: K (contexts), N (memberships) and the bad-id positions stay on the
//     device (info); every array and launch grid is sized by bounds known from the
//     shapes (the capacity of stats, M memberships), and kernels read K from the device.
//     Bad ids or more contexts than the capacity make the loss NaN (the wrapper raises
//     from info only in debug mode).
//  4. Small contexts (n <= kSmall): one warp each, keys in shared memory, exact lower
//     median by bitwise radix select (warp-wide counts), MAD, S1, S2, S3, loss numerator,
//     median index, seg — one kernel.
//  5. Large contexts: tiles of kTile members; pass 0 gathers pred/target into ordered-key
//     arrays, writes seg and histograms digit 0 (top 8 bits); passes 1..D-1 filter by the
//     prefix chosen so far and histogram the next digit (filter fused with histogram);
//     after every pass a warp per (context, pred/target) scans the 256 bins and picks
//     the digit holding rank k. Then a MAD pass and a sums pass (S1, S2, loss, median
//     index), each with per-tile partials combined in tile order.
//  6. One block adds the loss numerators in context order and divides by N.
// Every float sum has a fixed order (per-thread strided loops, cub::BlockReduce, fixed
// butterfly warp sums, tile order, context order); histograms are integer atomics
// (exact). The forward is bitwise repeatable.
//
// Backward: one elementwise pass with westar::pixel_grad; the median term is added by
// the pixel that is its context's median: no atomics, deterministic.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/cub.cuh>

#include <cstdint>
#include <limits>

#include "cuda_utils.cuh"
#include "westar/op_checks.h"
#include "westar/sa_hdn_math.h"

namespace westar {
namespace {

using cuda::acc_type;
using cuda::kWarp;

constexpr int kSmall = 1024;       // contexts with at most this many members: one warp each
constexpr int kTile = 4096;        // members per tile of a large context
constexpr int kThreads = 256;      // threads of the elementwise and tile kernels
constexpr int kBins = 256;         // 8-bit digits
constexpr int64_t kIdBits = 31;    // ids < 2^31
constexpr int64_t kNoPos = std::numeric_limits<int64_t>::max();

// Warps per block of the small-context kernel: 2 x kSmall keys per warp in shared memory
// (32 KiB per block for float and double keys alike).
template <typename key_t>
constexpr int small_warps() {
  return sizeof(key_t) == 4 ? 4 : 2;
}

template <typename T>
struct MinOp {
  __device__ __forceinline__ T operator()(const T& a, const T& b) const { return b < a ? b : a; }
};

__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

// ------------------------------------------------------------------------ grouping

// bad[0]: smallest flat index into instances of a negative id; bad[1]: of an id >= 2^31.
template <typename id_t, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    keys_kernel(const scalar_t* __restrict__ target, const bool* __restrict__ valid,
                const id_t* __restrict__ instances, int64_t B, int64_t hw, int64_t G, int64_t L, uint64_t sentinel,
                uint64_t* __restrict__ keys, int32_t* __restrict__ pix, unsigned long long* __restrict__ bad) {
  const int64_t npix = B * hw;
  for (int64_t t = global_thread(); t < npix; t += grid_stride()) {
    const int64_t b = t / hw, j = t - b * hw;
    const acc_t q = static_cast<acc_t>(target[t]);
    const bool usable = (valid == nullptr || valid[t]) && ::isfinite(q);
    for (int64_t c = 0; c < G + L; ++c) {
      int64_t id = 1;
      if (c >= G) {
        const int64_t at = (b * L + (c - G)) * hw + j;
        id = static_cast<int64_t>(instances[at]);
        if (id < 0) atomicMin(bad, static_cast<unsigned long long>(at));
        if (id >= (int64_t(1) << kIdBits)) atomicMin(bad + 1, static_cast<unsigned long long>(at));
      }
      const uint64_t plane = static_cast<uint64_t>(c * B + b);
      const bool member = usable && id > 0 && id < (int64_t(1) << kIdBits);
      const int64_t m = (c * B + b) * hw + j;
      keys[m] = member ? ((plane << kIdBits) | static_cast<uint64_t>(id)) : sentinel;
      pix[m] = static_cast<int32_t>(j);
    }
  }
}

// Per run r < num_runs (runs of equal sorted keys): its length, whether it is a kept
// context, and its length if kept. Entries r in [num_runs, M] are zero.
__global__ void __launch_bounds__(kThreads)
    run_flags_kernel(const uint64_t* __restrict__ unique, const int64_t* __restrict__ counts,
                     const int64_t* __restrict__ num_runs, int64_t M, uint64_t sentinel, int64_t min_n,
                     int64_t* __restrict__ len, int64_t* __restrict__ keep, int64_t* __restrict__ kept_len) {
  const int64_t nr = *num_runs;
  for (int64_t r = global_thread(); r <= M; r += grid_stride()) {
    const bool is_run = r < nr;
    const int64_t n = is_run ? counts[r] : 0;
    const bool kept = is_run && unique[r] != sentinel && n >= min_n;
    len[r] = n;
    keep[r] = kept ? 1 : 0;
    kept_len[r] = kept ? n : 0;
  }
}

// info = {K found, N of the stored contexts (the first cap), first negative id position,
// first too-large id position} and *kst = min(K, cap), the contexts the kernels compute.
__global__ void summary_kernel(const int64_t* __restrict__ kidx, const int64_t* __restrict__ kept_off, int64_t M,
                               int64_t cap, const unsigned long long* __restrict__ bad, int64_t* __restrict__ info,
                               int64_t* __restrict__ kst) {
  if (threadIdx.x == 0 && blockIdx.x == 0) {
    const int64_t K = kidx[M];
    int64_t N = kept_off[M];
    if (K > cap) {  // the first run r with kidx[r] >= cap follows the cap-th kept context
      int64_t lo = 0, hi = M;
      while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (kidx[mid] >= cap) {
          hi = mid;
        } else {
          lo = mid + 1;
        }
      }
      N = kept_off[lo];
    }
    info[0] = K;
    info[1] = N;
    info[2] = static_cast<int64_t>(bad[0] == ~0ull ? -1 : static_cast<long long>(bad[0]));
    info[3] = static_cast<int64_t>(bad[1] == ~0ull ? -1 : static_cast<long long>(bad[1]));
    *kst = K < cap ? K : cap;
  }
}

struct CtxArrays {
  int64_t* off;    // offset of the context's run in the sorted arrays
  int64_t* len;    // n
  int64_t* plane;  // level * B + image
};

__global__ void __launch_bounds__(kThreads)
    ctx_info_kernel(const uint64_t* __restrict__ unique, const int64_t* __restrict__ num_runs,
                    const int64_t* __restrict__ keep, const int64_t* __restrict__ kidx,
                    const int64_t* __restrict__ run_off, const int64_t* __restrict__ len, int64_t cap,
                    CtxArrays ctx) {
  const int64_t nr = *num_runs;
  for (int64_t r = global_thread(); r < nr; r += grid_stride()) {
    if (!keep[r]) continue;
    const int64_t k = kidx[r];
    if (k >= cap) continue;  // past the capacity: not stored (the loss is NaN)
    ctx.off[k] = run_off[r];
    ctx.len[k] = len[r];
    ctx.plane[k] = static_cast<int64_t>(unique[r] >> kIdBits);
  }
}

// Entries k in [0, cap]: 1 / number of tiles for large contexts, 0 otherwise (and for
// k >= *kst, the contexts that do not exist).
__global__ void __launch_bounds__(kThreads)
    ctx_class_kernel(const int64_t* __restrict__ ctx_len, const int64_t* __restrict__ kst, int64_t cap,
                     int64_t* __restrict__ is_big, int64_t* __restrict__ ntiles) {
  const int64_t K = *kst;
  for (int64_t k = global_thread(); k <= cap; k += grid_stride()) {
    const int64_t n = k < K ? ctx_len[k] : 0;
    const bool big = n > kSmall;
    is_big[k] = big ? 1 : 0;
    ntiles[k] = big ? (n + kTile - 1) / kTile : 0;
  }
}

// Selection state of one (large context, channel): channel 0 = pred, 1 = target.
template <typename key_t>
struct SelectState {
  key_t* prefix;      // digits chosen so far
  int64_t* rank;      // rank still to find among the candidates
  int64_t* less;      // members known to be < t
  int64_t* greater;   // members known to be > t
};

template <typename key_t>
__global__ void __launch_bounds__(kThreads)
    big_init_kernel(const int64_t* __restrict__ ctx_len, const int64_t* __restrict__ kst,
                    const int64_t* __restrict__ big_rank, int64_t* __restrict__ big_k, SelectState<key_t> st) {
  const int64_t K = *kst;
  for (int64_t k = global_thread(); k < K; k += grid_stride()) {
    const int64_t n = ctx_len[k];
    if (n <= kSmall) continue;
    const int64_t bi = big_rank[k];
    big_k[bi] = k;
    for (int ch = 0; ch < 2; ++ch) {
      st.prefix[2 * bi + ch] = 0;
      st.rank[2 * bi + ch] = lower_median_rank(n);
      st.less[2 * bi + ch] = 0;
      st.greater[2 * bi + ch] = 0;
    }
  }
}

// ------------------------------------------------------------------- small contexts

struct Problem {
  int64_t B, hw;
  const int64_t* K;  // contexts (on the device)
  double eps;
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kWarp * small_warps<typename cuda::KeyOf<acc_t>::type>())
    small_kernel(const scalar_t* __restrict__ pred, const scalar_t* __restrict__ target,
                 const int32_t* __restrict__ pix, CtxArrays ctx, Problem pr, int32_t* __restrict__ seg,
                 acc_t* __restrict__ stats, int64_t* __restrict__ median_index, double* __restrict__ loss_k) {
  using key_t = typename cuda::KeyOf<acc_t>::type;
  constexpr int kWarps = small_warps<key_t>();
  constexpr int kKeyBits = 8 * sizeof(key_t);
  __shared__ key_t keys_sh[kWarps][2][kSmall];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  // Warps loop over the contexts (a grid sized by the device count would need a host
  // sync); warp-uniform control flow, no block-wide barrier.
  const int64_t K = *pr.K;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * kWarps + warp; k < K;
       k += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t n = ctx.len[k];
    if (n > kSmall) continue;
    const int64_t off = ctx.off[k], plane = ctx.plane[k];
    const int64_t base = (plane % pr.B) * pr.hw;
    key_t* kp = keys_sh[warp][0];
    key_t* kq = keys_sh[warp][1];
    for (int64_t i = lane; i < n; i += kWarp) {
      const int64_t j = pix[off + i];
      kp[i] = ordered_key(static_cast<acc_t>(pred[base + j]));
      kq[i] = ordered_key(static_cast<acc_t>(target[base + j]));
      seg[plane * pr.hw + j] = static_cast<int32_t>(k);
    }
    __syncwarp();
    const int64_t rank = lower_median_rank(n);
    key_t tkey[2];
    int64_t less[2], greater[2];
    double abs_sum[2];
    for (int ch = 0; ch < 2; ++ch) {
      const key_t* keys = keys_sh[warp][ch];
      key_t prefix = 0;
      int64_t kr = rank;
      for (int bit = kKeyBits - 1; bit >= 0; --bit) {
        const key_t hmask = bit == kKeyBits - 1 ? key_t(0) : static_cast<key_t>(~key_t(0) << (bit + 1));
        int zeros = 0;
        for (int64_t i = lane; i < n; i += kWarp) {
          const key_t key = keys[i];
          zeros += (((key ^ prefix) & hmask) == 0 && ((key >> bit) & 1) == 0) ? 1 : 0;
        }
        const int64_t z = cuda::warp_sum(zeros);
        if (kr >= z) {
          prefix |= key_t(1) << bit;
          kr -= z;
        }
      }
      const acc_t t = cuda::KeyOf<acc_t>::value(prefix);
      int lt = 0, gt = 0;
      acc_t s = 0;
      for (int64_t i = lane; i < n; i += kWarp) {
        const key_t key = keys[i];
        lt += key < prefix ? 1 : 0;
        gt += key > prefix ? 1 : 0;
        const acc_t d = cuda::KeyOf<acc_t>::value(key) - t;
        s += d < acc_t(0) ? -d : d;
      }
      tkey[ch] = prefix;
      less[ch] = cuda::warp_sum(lt);
      greater[ch] = cuda::warp_sum(gt);
      abs_sum[ch] = cuda::warp_sum(static_cast<double>(s));
    }
    const acc_t eps = static_cast<acc_t>(pr.eps);
    const double nd = static_cast<double>(n);
    acc_t st[kNumStats];
    st[kMedianPred] = cuda::KeyOf<acc_t>::value(tkey[0]);
    st[kScalePred] = static_cast<acc_t>(abs_sum[0] / nd) + eps;
    st[kMedianTarget] = cuda::KeyOf<acc_t>::value(tkey[1]);
    st[kScaleTarget] = static_cast<acc_t>(abs_sum[1] / nd) + eps;
    st[kSumSignPred] = static_cast<acc_t>(greater[0] - less[0]);
    st[kCount] = static_cast<acc_t>(n);
    acc_t s1 = 0, s2 = 0, ls = 0;
    int64_t mpos = kNoPos;
    for (int64_t i = lane; i < n; i += kWarp) {
      const acc_t p = cuda::KeyOf<acc_t>::value(kp[i]);
      const acc_t q = cuda::KeyOf<acc_t>::value(kq[i]);
      const acc_t ph = normalize(p, st[kMedianPred], st[kScalePred]);
      const acc_t d = ph - normalize(q, st[kMedianTarget], st[kScaleTarget]);
      const acc_t sg = sign(d);
      s1 += sg;
      s2 += sg * ph;
      ls += d < acc_t(0) ? -d : d;
      if (kp[i] == tkey[0] && i < mpos) mpos = i;
    }
    const double S1 = cuda::warp_sum(static_cast<double>(s1));
    const double S2 = cuda::warp_sum(static_cast<double>(s2));
    const double LS = cuda::warp_sum(static_cast<double>(ls));
    mpos = cuda::warp_min(mpos);
    if (lane == 0) {
      st[kSumSign] = static_cast<acc_t>(S1);
      st[kSumSignHat] = static_cast<acc_t>(S2);
      acc_t* row = stats + k * kNumStats;
      for (int c = 0; c < kNumStats; ++c) row[c] = st[c];
      loss_k[k] = LS;
      median_index[k] = mpos < n ? base + pix[off + mpos] : -1;
    }
    __syncwarp();  // the next context reuses this warp's keys
  }
}

// ------------------------------------------------------------------- large contexts

struct Tiles {
  const int64_t* first;  // (K + 1): first tile of context k (exclusive scan of tile counts)
  const int64_t* big_rank;
  int64_t K;
};

struct TileRange {
  int64_t k, bi, begin, end;  // context, its large-context index, sorted positions [begin, end)
};

// Context of tile t (largest k with first[k] <= t); false when t is past the last tile.
__device__ __forceinline__ bool tile_range(const Tiles& tl, const CtxArrays& ctx, int64_t t, TileRange* r) {
  if (t >= tl.first[tl.K]) return false;
  int64_t lo = 0, hi = tl.K;
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (tl.first[mid] <= t) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  r->k = lo;
  r->bi = tl.big_rank[lo];
  const int64_t start = ctx.off[lo] + (t - tl.first[lo]) * kTile;
  const int64_t stop = ctx.off[lo] + ctx.len[lo];
  r->begin = start;
  r->end = start + kTile < stop ? start + kTile : stop;
  return true;
}

__device__ __forceinline__ void flush_hist(const unsigned* sh, unsigned* __restrict__ hist, int64_t bi) {
  for (int i = threadIdx.x; i < 2 * kBins; i += blockDim.x) {
    if (sh[i] != 0) atomicAdd(hist + bi * 2 * kBins + i, sh[i]);
  }
}

// Pass 0: gather pred/target of the tile into key arrays, write seg, histogram digit 0.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    big_pass0_kernel(const scalar_t* __restrict__ pred, const scalar_t* __restrict__ target,
                     const int32_t* __restrict__ pix, CtxArrays ctx, Tiles tl, int64_t hw, int64_t B,
                     int32_t* __restrict__ seg, typename cuda::KeyOf<acc_t>::type* __restrict__ keys_p,
                     typename cuda::KeyOf<acc_t>::type* __restrict__ keys_q, unsigned* __restrict__ hist) {
  using key_t = typename cuda::KeyOf<acc_t>::type;
  constexpr int kShift = 8 * sizeof(key_t) - 8;
  __shared__ unsigned sh[2 * kBins];
  TileRange r;
  if (!tile_range(tl, ctx, blockIdx.x, &r)) return;  // block-uniform
  for (int i = threadIdx.x; i < 2 * kBins; i += blockDim.x) sh[i] = 0;
  __syncthreads();
  const int64_t plane = ctx.plane[r.k];
  const int64_t base = (plane % B) * hw;
  for (int64_t i = r.begin + threadIdx.x; i < r.end; i += blockDim.x) {
    const int64_t j = pix[i];
    const key_t kp = ordered_key(static_cast<acc_t>(pred[base + j]));
    const key_t kq = ordered_key(static_cast<acc_t>(target[base + j]));
    keys_p[i] = kp;
    keys_q[i] = kq;
    seg[plane * hw + j] = static_cast<int32_t>(r.k);
    atomicAdd(&sh[static_cast<int>(kp >> kShift)], 1u);
    atomicAdd(&sh[kBins + static_cast<int>(kq >> kShift)], 1u);
  }
  __syncthreads();
  flush_hist(sh, hist, r.bi);
}

// Pass d >= 1: members whose top 8d bits equal the prefix chosen so far; histogram digit d.
template <typename key_t>
__global__ void __launch_bounds__(kThreads)
    big_hist_kernel(const key_t* __restrict__ keys_p, const key_t* __restrict__ keys_q, CtxArrays ctx, Tiles tl,
                    SelectState<key_t> st, int digit, unsigned* __restrict__ hist) {
  constexpr int kKeyBits = 8 * sizeof(key_t);
  __shared__ unsigned sh[2 * kBins];
  TileRange r;
  if (!tile_range(tl, ctx, blockIdx.x, &r)) return;
  for (int i = threadIdx.x; i < 2 * kBins; i += blockDim.x) sh[i] = 0;
  __syncthreads();
  const int hi_shift = kKeyBits - 8 * digit;  // bits below the chosen prefix
  const int shift = hi_shift - 8;
  const key_t pp = st.prefix[2 * r.bi] >> hi_shift;
  const key_t pq = st.prefix[2 * r.bi + 1] >> hi_shift;
  for (int64_t i = r.begin + threadIdx.x; i < r.end; i += blockDim.x) {
    const key_t kp = keys_p[i], kq = keys_q[i];
    if ((kp >> hi_shift) == pp) atomicAdd(&sh[static_cast<int>((kp >> shift) & 0xFF)], 1u);
    if ((kq >> hi_shift) == pq) atomicAdd(&sh[kBins + static_cast<int>((kq >> shift) & 0xFF)], 1u);
  }
  __syncthreads();
  flush_hist(sh, hist, r.bi);
}

// One warp per (large context, channel): picks the digit that holds the remaining rank,
// updates the state and zeroes the 256 bins for the next pass.
template <typename key_t>
__global__ void __launch_bounds__(kThreads)
    big_scan_kernel(const int64_t* __restrict__ num_big, int64_t max_big, SelectState<key_t> st, int digit,
                    unsigned* __restrict__ hist) {
  constexpr int kKeyBits = 8 * sizeof(key_t);
  const int64_t w = global_thread() / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (w >= 2 * max_big || w >= 2 * (*num_big)) return;  // warp-uniform
  unsigned* h = hist + w * kBins;
  long long c[8];
  long long mine = 0;
#pragma unroll
  for (int b = 0; b < 8; ++b) {
    c[b] = h[8 * lane + b];
    mine += c[b];
  }
  long long inc = mine;
#pragma unroll
  for (int o = 1; o < kWarp; o <<= 1) {
    const long long v = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += v;
  }
  const long long excl = inc - mine;
  const long long total = __shfl_sync(0xffffffffu, inc, kWarp - 1);
  const long long kr = st.rank[w];
  const bool found = excl <= kr && kr < inc;
  int d = 0;
  long long before = 0, count = 0;
  if (found) {
    long long run = excl;
#pragma unroll
    for (int b = 0; b < 8; ++b) {
      if (count == 0 && kr < run + c[b]) {
        d = 8 * lane + b;
        before = run;
        count = c[b];
      }
      run += c[b];
    }
  }
  const unsigned ballot = __ballot_sync(0xffffffffu, found);
  const int src = ballot != 0 ? __ffs(ballot) - 1 : 0;
  d = __shfl_sync(0xffffffffu, d, src);
  before = __shfl_sync(0xffffffffu, before, src);
  count = __shfl_sync(0xffffffffu, count, src);
  if (lane == 0) {
    st.prefix[w] |= static_cast<key_t>(d) << (kKeyBits - 8 * (digit + 1));
    st.rank[w] = kr - before;
    st.less[w] += before;
    st.greater[w] += total - before - count;
  }
#pragma unroll
  for (int b = 0; b < 8; ++b) h[8 * lane + b] = 0;
}

// Per tile: sum |x - t| of pred and target (t final).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    big_mad_kernel(const typename cuda::KeyOf<acc_t>::type* __restrict__ keys_p,
                   const typename cuda::KeyOf<acc_t>::type* __restrict__ keys_q, CtxArrays ctx, Tiles tl,
                   SelectState<typename cuda::KeyOf<acc_t>::type> st, double* __restrict__ part) {
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  TileRange r;
  if (!tile_range(tl, ctx, blockIdx.x, &r)) return;
  const acc_t tp = cuda::KeyOf<acc_t>::value(st.prefix[2 * r.bi]);
  const acc_t tq = cuda::KeyOf<acc_t>::value(st.prefix[2 * r.bi + 1]);
  acc_t sp = 0, sq = 0;
  for (int64_t i = r.begin + threadIdx.x; i < r.end; i += blockDim.x) {
    const acc_t dp = cuda::KeyOf<acc_t>::value(keys_p[i]) - tp;
    const acc_t dq = cuda::KeyOf<acc_t>::value(keys_q[i]) - tq;
    sp += dp < acc_t(0) ? -dp : dp;
    sq += dq < acc_t(0) ? -dq : dq;
  }
  const double bp = Reduce(tmp).Sum(static_cast<double>(sp));
  __syncthreads();
  const double bq = Reduce(tmp).Sum(static_cast<double>(sq));
  if (threadIdx.x == 0) {
    part[2 * blockIdx.x] = bp;
    part[2 * blockIdx.x + 1] = bq;
  }
}

// One warp per large context: MAD from the tile partials (tile order), stats columns
// t_p, D_p, t_q, D_q, S3, n.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    big_mad_finish_kernel(const int64_t* __restrict__ num_big, int64_t max_big, const int64_t* __restrict__ big_k,
                          CtxArrays ctx, Tiles tl, SelectState<typename cuda::KeyOf<acc_t>::type> st,
                          const double* __restrict__ part, double eps, acc_t* __restrict__ stats) {
  const int64_t bi = global_thread() / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (bi >= max_big || bi >= *num_big) return;
  const int64_t k = big_k[bi];
  double sp = 0, sq = 0;
  for (int64_t t = tl.first[k] + lane; t < tl.first[k + 1]; t += kWarp) {
    sp += part[2 * t];
    sq += part[2 * t + 1];
  }
  sp = cuda::warp_sum(sp);
  sq = cuda::warp_sum(sq);
  if (lane == 0) {
    const double n = static_cast<double>(ctx.len[k]);
    acc_t* row = stats + k * kNumStats;
    row[kMedianPred] = cuda::KeyOf<acc_t>::value(st.prefix[2 * bi]);
    row[kScalePred] = static_cast<acc_t>(sp / n) + static_cast<acc_t>(eps);
    row[kMedianTarget] = cuda::KeyOf<acc_t>::value(st.prefix[2 * bi + 1]);
    row[kScaleTarget] = static_cast<acc_t>(sq / n) + static_cast<acc_t>(eps);
    row[kSumSignPred] = static_cast<acc_t>(st.greater[2 * bi] - st.less[2 * bi]);
    row[kCount] = static_cast<acc_t>(ctx.len[k]);
  }
}

// Per tile: S1, S2, loss numerator, first sorted position whose pred key equals t_p.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    big_sums_kernel(const typename cuda::KeyOf<acc_t>::type* __restrict__ keys_p,
                    const typename cuda::KeyOf<acc_t>::type* __restrict__ keys_q, CtxArrays ctx, Tiles tl,
                    const acc_t* __restrict__ stats, double* __restrict__ part, int64_t* __restrict__ part_pos) {
  using key_t = typename cuda::KeyOf<acc_t>::type;
  using Reduce = cub::BlockReduce<double, kThreads>;
  using ReducePos = cub::BlockReduce<int64_t, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ typename ReducePos::TempStorage tmp_pos;
  TileRange r;
  if (!tile_range(tl, ctx, blockIdx.x, &r)) return;
  const acc_t* row = stats + r.k * kNumStats;
  const acc_t tp = row[kMedianPred], dp = row[kScalePred], tq = row[kMedianTarget], dq = row[kScaleTarget];
  const key_t tkey = ordered_key(tp);
  acc_t s1 = 0, s2 = 0, ls = 0;
  int64_t mpos = kNoPos;
  for (int64_t i = r.begin + threadIdx.x; i < r.end; i += blockDim.x) {
    const key_t kp = keys_p[i];
    const acc_t ph = normalize(cuda::KeyOf<acc_t>::value(kp), tp, dp);
    const acc_t d = ph - normalize(cuda::KeyOf<acc_t>::value(keys_q[i]), tq, dq);
    const acc_t sg = sign(d);
    s1 += sg;
    s2 += sg * ph;
    ls += d < acc_t(0) ? -d : d;
    if (kp == tkey && i < mpos) mpos = i;
  }
  const double b1 = Reduce(tmp).Sum(static_cast<double>(s1));
  __syncthreads();
  const double b2 = Reduce(tmp).Sum(static_cast<double>(s2));
  __syncthreads();
  const double bl = Reduce(tmp).Sum(static_cast<double>(ls));
  const int64_t bpos = ReducePos(tmp_pos).Reduce(mpos, MinOp<int64_t>());
  if (threadIdx.x == 0) {
    part[3 * blockIdx.x] = b1;
    part[3 * blockIdx.x + 1] = b2;
    part[3 * blockIdx.x + 2] = bl;
    part_pos[blockIdx.x] = bpos;
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    big_sums_finish_kernel(const int64_t* __restrict__ num_big, int64_t max_big, const int64_t* __restrict__ big_k,
                           CtxArrays ctx, Tiles tl, const int32_t* __restrict__ pix, int64_t B, int64_t hw,
                           const double* __restrict__ part, const int64_t* __restrict__ part_pos,
                           acc_t* __restrict__ stats, int64_t* __restrict__ median_index,
                           double* __restrict__ loss_k) {
  const int64_t bi = global_thread() / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (bi >= max_big || bi >= *num_big) return;
  const int64_t k = big_k[bi];
  double s1 = 0, s2 = 0, ls = 0;
  int64_t mpos = kNoPos;
  for (int64_t t = tl.first[k] + lane; t < tl.first[k + 1]; t += kWarp) {
    s1 += part[3 * t];
    s2 += part[3 * t + 1];
    ls += part[3 * t + 2];
    mpos = part_pos[t] < mpos ? part_pos[t] : mpos;
  }
  s1 = cuda::warp_sum(s1);
  s2 = cuda::warp_sum(s2);
  ls = cuda::warp_sum(ls);
  mpos = cuda::warp_min(mpos);
  if (lane == 0) {
    acc_t* row = stats + k * kNumStats;
    row[kSumSign] = static_cast<acc_t>(s1);
    row[kSumSignHat] = static_cast<acc_t>(s2);
    loss_k[k] = ls;
    median_index[k] = mpos != kNoPos ? (ctx.plane[k] % B) * hw + pix[mpos] : -1;
  }
}

// One block: loss = (sum of the loss numerators in context order) / N; NaN when info
// flags a bad id or more contexts than the capacity (the device-side error).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    loss_kernel(const double* __restrict__ loss_k, const int64_t* __restrict__ kst,
                const int64_t* __restrict__ info, int64_t cap, acc_t* __restrict__ loss) {
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const int64_t K = *kst, N = info[1];
  double s = 0;
  for (int64_t k = threadIdx.x; k < K; k += kThreads) s += loss_k[k];
  const double total = Reduce(tmp).Sum(s);
  if (threadIdx.x == 0) {
    acc_t value = N > 0 ? static_cast<acc_t>(static_cast<acc_t>(total) / static_cast<acc_t>(N)) : acc_t(0);
    if (info[0] > cap || info[2] >= 0 || info[3] >= 0) value = static_cast<acc_t>(::nan(""));
    loss[0] = value;
  }
}

// ------------------------------------------------------------------------- host side

// Runs a CUB device algorithm twice: size query, then with temp storage from the caching
// allocator.
template <typename F>
void cub_run(const at::TensorOptions& opts, F&& f) {
  size_t bytes = 0;
  C10_CUDA_CHECK(f(static_cast<void*>(nullptr), bytes));
  at::Tensor temp = at::empty({static_cast<int64_t>(bytes) + 1}, opts.dtype(at::kByte));
  C10_CUDA_CHECK(f(static_cast<void*>(temp.data_ptr<uint8_t>()), bytes));
}

template <typename data_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const at::Tensor& pred, const at::Tensor& target, const at::Tensor& inst, const at::Tensor& val,
    bool include_global, double eps, int64_t min_pixels, int64_t cap) {
  using acc_t = acc_type<data_t>;
  using key_t = typename cuda::KeyOf<acc_t>::type;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto opts = pred.options();
  const at::ScalarType acc = acc_dtype(pred.scalar_type());
  const int64_t B = pred.size(0), H = pred.size(1), W = pred.size(2), hw = H * W;
  const int64_t L = inst.defined() ? inst.size(1) : 0;
  const int64_t G = include_global ? 1 : 0;
  const int64_t C = G + L;
  const int64_t planes = C * B;
  const int64_t M = planes * hw;
  // check_sa_hdn_forward bounds M by kMaxMemberships: the int casts of M and M + 1 (CUB
  // counts) and of K + 1 <= M + 1 below cannot overflow.
  TORCH_CHECK(M <= kMaxMemberships, "sa_hdn_forward: internal error, membership bound");
  TORCH_CHECK(cap <= kMaxMemberships, "sa_hdn_forward: internal error, capacity bound");
  at::Tensor seg = at::empty({C, B, H, W}, opts.dtype(at::kInt));
  at::Tensor loss = at::empty({}, opts.dtype(acc));
  // Rows past the K contexts: zeros (n = 0) and median_index -1 (docs/internals.md).
  at::Tensor stats = at::zeros({cap, kNumStats}, opts.dtype(acc));
  at::Tensor median_index = at::empty({cap}, opts.dtype(at::kLong));
  // info (K, N, bad positions) and kst = min(K, cap): written by summary_kernel.
  at::Tensor info_t = at::empty({5}, opts.dtype(at::kLong));
  int64_t* info = info_t.data_ptr<int64_t>();
  int64_t* kst = info + 4;
  if (cap > 0) {
    C10_CUDA_CHECK(cudaMemsetAsync(median_index.data_ptr<int64_t>(), 0xFF, cap * sizeof(int64_t), stream));
  }
  if (M == 0) {
    info_t.fill_(-1);
    info_t.narrow(0, 0, 2).zero_();
    loss.zero_();
    return std::make_tuple(loss.to(pred.scalar_type()), seg, stats, median_index, info_t.narrow(0, 0, 4));
  }
  C10_CUDA_CHECK(cudaMemsetAsync(seg.data_ptr<int32_t>(), 0xFF, M * sizeof(int32_t), stream));

  // 1. Keys.
  int plane_bits = 1;
  while ((int64_t(1) << plane_bits) <= planes) ++plane_bits;  // planes (the sentinel) < 2^plane_bits
  const uint64_t sentinel = static_cast<uint64_t>(planes) << kIdBits;
  const int end_bit = static_cast<int>(kIdBits) + plane_bits;
  at::Tensor keys = at::empty({2, M}, opts.dtype(at::kLong));
  at::Tensor pixels = at::empty({2, M}, opts.dtype(at::kInt));
  uint64_t* keys_in = reinterpret_cast<uint64_t*>(keys.data_ptr<int64_t>());
  uint64_t* keys_sorted = keys_in + M;
  int32_t* pix_in = pixels.data_ptr<int32_t>();
  int32_t* pix_sorted = pix_in + M;
  at::Tensor bad = at::empty({2}, opts.dtype(at::kLong));
  C10_CUDA_CHECK(cudaMemsetAsync(bad.data_ptr<int64_t>(), 0xFF, 2 * sizeof(int64_t), stream));
  const bool* valid_ptr = val.defined() ? val.data_ptr<bool>() : nullptr;
  const unsigned pix_grid = cuda::grid_for(B * hw, kThreads);
  auto launch_keys = [&](auto id_tag, const void* ids) {
    using id_t = decltype(id_tag);
    keys_kernel<id_t, data_t, acc_t><<<pix_grid, kThreads, 0, stream>>>(
        target.data_ptr<data_t>(), valid_ptr, static_cast<const id_t*>(ids), B, hw, G, L, sentinel, keys_in,
        pix_in, reinterpret_cast<unsigned long long*>(bad.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (L > 0) {
    AT_DISPATCH_INTEGRAL_TYPES(inst.scalar_type(), "sa_hdn_forward_cuda_keys",
                               [&] { launch_keys(scalar_t(0), inst.const_data_ptr()); });
  } else {
    launch_keys(int32_t(0), nullptr);
  }

  // 2. Sort, runs, scans.
  const int m32 = static_cast<int>(M);
  cub_run(opts, [&](void* temp, size_t& bytes) {
    return cub::DeviceRadixSort::SortPairs(temp, bytes, keys_in, keys_sorted, pix_in, pix_sorted, m32, 0, end_bit,
                                           stream);
  });
  // Run arrays (M + 1 entries): unique keys, lengths, kept flags and their scans.
  at::Tensor runs = at::empty({8, M + 1}, opts.dtype(at::kLong));
  uint64_t* unique = reinterpret_cast<uint64_t*>(runs[0].data_ptr<int64_t>());
  int64_t* counts = runs[1].data_ptr<int64_t>();
  int64_t* len = runs[2].data_ptr<int64_t>();
  int64_t* keep = runs[3].data_ptr<int64_t>();
  int64_t* kept_len = runs[4].data_ptr<int64_t>();
  int64_t* run_off = runs[5].data_ptr<int64_t>();
  int64_t* kidx = runs[6].data_ptr<int64_t>();
  int64_t* kept_off = runs[7].data_ptr<int64_t>();
  at::Tensor scalars = at::empty({1}, opts.dtype(at::kLong));
  int64_t* num_runs = scalars.data_ptr<int64_t>();
  cub_run(opts, [&](void* temp, size_t& bytes) {
    return cub::DeviceRunLengthEncode::Encode(temp, bytes, keys_sorted, unique, counts, num_runs, m32, stream);
  });
  const int64_t min_n = min_pixels > 1 ? min_pixels : 1;
  run_flags_kernel<<<cuda::grid_for(M + 1, kThreads), kThreads, 0, stream>>>(unique, counts, num_runs, M, sentinel,
                                                                             min_n, len, keep, kept_len);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int m1 = static_cast<int>(M + 1);
  cub_run(opts, [&](void* temp, size_t& bytes) {
    return cub::DeviceScan::ExclusiveSum(temp, bytes, len, run_off, m1, stream);
  });
  cub_run(opts, [&](void* temp, size_t& bytes) {
    return cub::DeviceScan::ExclusiveSum(temp, bytes, keep, kidx, m1, stream);
  });
  cub_run(opts, [&](void* temp, size_t& bytes) {
    return cub::DeviceScan::ExclusiveSum(temp, bytes, kept_len, kept_off, m1, stream);
  });
  summary_kernel<<<1, 32, 0, stream>>>(kidx, kept_off, M, cap,
                                       reinterpret_cast<unsigned long long*>(bad.data_ptr<int64_t>()), info, kst);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // 3. No host sync: from here every size is a bound from the shapes (cap contexts at
  // most, M memberships); the kernels read K (kst) and the counts from the device.
  if (cap == 0) {  // no context can be stored (e.g. min_pixels above H * W)
    loss_kernel<acc_t><<<1, kThreads, 0, stream>>>(nullptr, kst, info, cap, loss.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return std::make_tuple(loss.to(pred.scalar_type()), seg, stats, median_index, info_t.narrow(0, 0, 4));
  }

  // 4. Context arrays.
  at::Tensor loss_k = at::empty({cap}, opts.dtype(at::kDouble));
  at::Tensor ctx_t = at::empty({5, cap + 1}, opts.dtype(at::kLong));
  CtxArrays ctx{ctx_t[0].data_ptr<int64_t>(), ctx_t[1].data_ptr<int64_t>(), ctx_t[2].data_ptr<int64_t>()};
  ctx_info_kernel<<<cuda::grid_for(M, kThreads), kThreads, 0, stream>>>(unique, num_runs, keep, kidx, run_off, len,
                                                                        cap, ctx);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const Problem pr{B, hw, kst, eps};
  constexpr int kWarps = small_warps<key_t>();
  // Warps loop over the contexts: enough blocks to fill the device, not one per context.
  small_kernel<data_t, acc_t><<<cuda::grid_for(cap, kWarps, 4096), kWarp * kWarps, 0, stream>>>(
      pred.data_ptr<data_t>(), target.data_ptr<data_t>(), pix_sorted, ctx, pr, seg.data_ptr<int32_t>(),
      stats.data_ptr<acc_t>(), median_index.data_ptr<int64_t>(), loss_k.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // 5. Large contexts (grids are bounds; dead tiles and warps return at once).
  const int64_t max_big = std::min<int64_t>(cap, M / (kSmall + 1));
  if (max_big > 0) {
    int64_t* is_big = ctx_t[3].data_ptr<int64_t>();
    int64_t* ntiles = ctx_t[4].data_ptr<int64_t>();
    ctx_class_kernel<<<cuda::grid_for(cap + 1, kThreads), kThreads, 0, stream>>>(ctx.len, kst, cap, is_big,
                                                                                 ntiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor scans = at::empty({3, cap + 1}, opts.dtype(at::kLong));
    int64_t* big_rank = scans[0].data_ptr<int64_t>();
    int64_t* tile_first = scans[1].data_ptr<int64_t>();
    int64_t* big_k = scans[2].data_ptr<int64_t>();
    const int k1 = static_cast<int>(cap + 1);
    cub_run(opts, [&](void* temp, size_t& bytes) {
      return cub::DeviceScan::ExclusiveSum(temp, bytes, is_big, big_rank, k1, stream);
    });
    cub_run(opts, [&](void* temp, size_t& bytes) {
      return cub::DeviceScan::ExclusiveSum(temp, bytes, ntiles, tile_first, k1, stream);
    });
    const int64_t* num_big = big_rank + cap;
    at::Tensor state = at::empty({4, 2 * max_big}, opts.dtype(at::kLong));
    SelectState<key_t> st{reinterpret_cast<key_t*>(state[0].data_ptr<int64_t>()), state[1].data_ptr<int64_t>(),
                          state[2].data_ptr<int64_t>(), state[3].data_ptr<int64_t>()};
    big_init_kernel<key_t><<<cuda::grid_for(cap, kThreads), kThreads, 0, stream>>>(ctx.len, kst, big_rank, big_k,
                                                                                    st);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor hist_t = at::zeros({max_big, 2, kBins}, opts.dtype(at::kInt));
    unsigned* hist = reinterpret_cast<unsigned*>(hist_t.data_ptr<int32_t>());
    at::Tensor big_keys = at::empty({2, M}, opts.dtype(sizeof(key_t) == 4 ? at::kInt : at::kLong));
    key_t* keys_p = reinterpret_cast<key_t*>(big_keys.data_ptr());
    key_t* keys_q = keys_p + M;
    const Tiles tl{tile_first, big_rank, cap};
    const int64_t max_tiles = M / kTile + max_big + 1;
    const unsigned tile_grid = static_cast<unsigned>(max_tiles);
    const unsigned scan_grid = cuda::grid_for(2 * max_big * kWarp, kThreads, int64_t(1) << 30);
    const unsigned fin_grid = cuda::grid_for(max_big * kWarp, kThreads, int64_t(1) << 30);
    constexpr int kDigits = static_cast<int>(sizeof(key_t));
    big_pass0_kernel<data_t, acc_t><<<tile_grid, kThreads, 0, stream>>>(
        pred.data_ptr<data_t>(), target.data_ptr<data_t>(), pix_sorted, ctx, tl, hw, B, seg.data_ptr<int32_t>(),
        keys_p, keys_q, hist);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    for (int d = 0; d < kDigits; ++d) {
      if (d > 0) {
        big_hist_kernel<key_t><<<tile_grid, kThreads, 0, stream>>>(keys_p, keys_q, ctx, tl, st, d, hist);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      big_scan_kernel<key_t><<<scan_grid, kThreads, 0, stream>>>(num_big, max_big, st, d, hist);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    at::Tensor part = at::empty({max_tiles, 3}, opts.dtype(at::kDouble));
    at::Tensor part_pos = at::empty({max_tiles}, opts.dtype(at::kLong));
    big_mad_kernel<acc_t><<<tile_grid, kThreads, 0, stream>>>(keys_p, keys_q, ctx, tl, st,
                                                               part.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    big_mad_finish_kernel<acc_t><<<fin_grid, kThreads, 0, stream>>>(num_big, max_big, big_k, ctx, tl, st,
                                                                     part.data_ptr<double>(), eps,
                                                                     stats.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    big_sums_kernel<acc_t><<<tile_grid, kThreads, 0, stream>>>(keys_p, keys_q, ctx, tl, stats.data_ptr<acc_t>(),
                                                                part.data_ptr<double>(),
                                                                part_pos.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    big_sums_finish_kernel<acc_t><<<fin_grid, kThreads, 0, stream>>>(
        num_big, max_big, big_k, ctx, tl, pix_sorted, B, hw, part.data_ptr<double>(), part_pos.data_ptr<int64_t>(),
        stats.data_ptr<acc_t>(), median_index.data_ptr<int64_t>(), loss_k.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // 6. Loss.
  loss_kernel<acc_t><<<1, kThreads, 0, stream>>>(loss_k.data_ptr<double>(), kst, info, cap, loss.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return std::make_tuple(loss.to(pred.scalar_type()), seg, stats, median_index, info_t.narrow(0, 0, 4));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sa_hdn_forward_cuda(
    const at::Tensor& pred, const at::Tensor& target, const std::optional<at::Tensor>& instances,
    const std::optional<at::Tensor>& valid, bool include_global, double eps, int64_t min_pixels,
    int64_t stats_grad, int64_t max_contexts) {
  const SaHdnMasks masks = check_sa_hdn_forward(pred, target, instances, valid, include_global, eps, min_pixels,
                                                stats_grad, max_contexts);
  const int64_t cap = context_capacity(pred, masks.instances, include_global, min_pixels, max_contexts);
  const c10::cuda::CUDAGuard guard(pred.device());
  const at::Tensor p = pred.contiguous(), q = target.contiguous();
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "sa_hdn_forward_cuda", [&] {
    out = forward_impl<scalar_t>(p, q, masks.instances, masks.valid, include_global, eps, min_pixels, cap);
  });
  return out;
}

// ----------------------------------------------------------------------- backward

// scale[0] = grad / N, scale[1] = N > 0; N = info[1] (the forward's), or without info
// the sum of stats[:, 7] in context order.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    grad_scale_kernel(const double* __restrict__ grad, const acc_t* __restrict__ stats, int64_t K,
                      const int64_t* __restrict__ info, acc_t* __restrict__ scale) {
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  double s = 0;
  if (info == nullptr) {
    for (int64_t k = threadIdx.x; k < K; k += kThreads) s += static_cast<double>(stats[k * kNumStats + kCount]);
  }
  const double count = info != nullptr ? static_cast<double>(info[1]) : Reduce(tmp).Sum(s);
  if (threadIdx.x == 0) {
    scale[0] = count > 0 ? static_cast<acc_t>(grad[0] / count) : acc_t(0);
    scale[1] = count > 0 ? acc_t(1) : acc_t(0);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* __restrict__ pred, const scalar_t* __restrict__ target,
                    const int32_t* __restrict__ seg, const acc_t* __restrict__ stats,
                    const int64_t* __restrict__ median_index, const acc_t* __restrict__ scale, int64_t C,
                    int64_t npix, int stats_grad, scalar_t* __restrict__ out) {
  const acc_t s = scale[0];
  const bool any = scale[1] != acc_t(0);
  for (int64_t j = global_thread(); j < npix; j += grid_stride()) {
    if (!any) {
      out[j] = static_cast<scalar_t>(acc_t(0));
      continue;
    }
    const acc_t p = static_cast<acc_t>(pred[j]), q = static_cast<acc_t>(target[j]);
    acc_t g = 0;
    for (int64_t c = 0; c < C; ++c) {
      const int32_t k = seg[c * npix + j];
      if (k < 0) continue;
      g += pixel_grad<acc_t>(p, q, stats + static_cast<int64_t>(k) * kNumStats, median_index[k] == j, stats_grad);
    }
    out[j] = static_cast<scalar_t>(g * s);
  }
}

at::Tensor sa_hdn_backward_cuda(const at::Tensor& grad, const at::Tensor& pred, const at::Tensor& target,
                                const at::Tensor& seg, const at::Tensor& stats, const at::Tensor& median_index,
                                int64_t stats_grad, const std::optional<at::Tensor>& info) {
  check_sa_hdn_backward(grad, pred, target, seg, stats, median_index, stats_grad);
  at::Tensor inf;
  if (info.has_value() && info->defined()) {
    TORCH_CHECK_VALUE(info->scalar_type() == at::kLong && info->numel() == 4 && info->device() == pred.device(),
                      "sa_hdn_backward: info must be the forward's (4,) int64 info on ", pred.device());
    inf = info->contiguous();
  }
  const at::ScalarType acc = acc_dtype(pred.scalar_type());
  const c10::cuda::CUDAGuard guard(pred.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor p = pred.contiguous(), q = target.to(pred.scalar_type()).contiguous();
  const at::Tensor s = seg.contiguous(), st = stats.contiguous(), mi = median_index.contiguous();
  const at::Tensor g64 = grad.reshape({1}).to(at::kDouble).contiguous();
  at::Tensor out = at::empty(pred.sizes(), p.options());
  const int64_t npix = p.numel();
  if (npix == 0) return out;
  const int64_t K = st.size(0), C = s.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "sa_hdn_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    at::Tensor scale = at::empty({2}, p.options().dtype(acc));
    grad_scale_kernel<acc_t><<<1, kThreads, 0, stream>>>(g64.data_ptr<double>(), st.data_ptr<acc_t>(), K,
                                                         inf.defined() ? inf.data_ptr<int64_t>() : nullptr,
                                                         scale.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    backward_kernel<scalar_t, acc_t><<<cuda::grid_for(npix, kThreads), kThreads, 0, stream>>>(
        p.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), s.data_ptr<int32_t>(), st.data_ptr<acc_t>(),
        mi.data_ptr<int64_t>(), scale.data_ptr<acc_t>(), C, npix, static_cast<int>(stats_grad),
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(westar_ops, CUDA, m) {
  m.impl("sa_hdn_forward", &sa_hdn_forward_cuda);
  m.impl("sa_hdn_backward", &sa_hdn_backward_cuda);
}

}  // namespace westar
