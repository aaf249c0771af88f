// CPU kernel of sa_hdn_backward (contract: docs/internals.md): one elementwise pass with
// westar::pixel_grad over the pixels, looping over the levels; the median term is added
// by the pixel that is its context's median, so there is no scatter and no atomics. The
// float32 loop has an AVX-512 version (cpu_avx512.h), chosen at run time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_avx512.h"
#include "cpu_simd.h"
#include "cpu_workspace.h"
#include "westar/op_checks.h"
#include "westar/sa_hdn_math.h"

namespace westar {
namespace {

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

// float32 (float64 for float64) contiguous: the dtype every CPU kernel computes in.
at::Tensor to_acc(const at::Tensor& t) { return t.to(acc_dtype(t.scalar_type())).contiguous(); }

at::Tensor sa_hdn_backward_cpu(const at::Tensor& grad, const at::Tensor& pred, const at::Tensor& target,
                               const at::Tensor& seg, const at::Tensor& stats, const at::Tensor& median_index,
                               int64_t stats_grad, const std::optional<at::Tensor>& /*info*/) {
  // N is summed from stats (exactly K rows on the CPU), so the forward's info is not needed.
  check_sa_hdn_backward(grad, pred, target, seg, stats, median_index, stats_grad);
  const bool is_double = pred.scalar_type() == at::kDouble;
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

TORCH_LIBRARY_IMPL(westar_ops, CPU, m) { m.impl("sa_hdn_backward", &sa_hdn_backward_cpu); }

}  // namespace westar
