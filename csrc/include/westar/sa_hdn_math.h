// Per-pixel math of sa_hdn_loss shared by the CPU and CUDA kernels, so that the
// backends cannot drift. See docs/internals.md for the derivation and the layout of
// the saved tensors.
#pragma once

#include "westar/common.h"

namespace westar {

// Columns of the (K, 8) stats tensor saved by sa_hdn_forward, one row per context.
enum SaHdnStat : int {
  kMedianPred = 0,     // t_p: lower median of pred in the context
  kScalePred = 1,      // D_p = s_p + eps, s_p = mean |pred - t_p|
  kMedianTarget = 2,   // t_q
  kScaleTarget = 3,    // D_q = s_q + eps
  kSumSign = 4,        // S1 = sum_i r_i, r_i = sign(pred_hat_i - target_hat_i)
  kSumSignHat = 5,     // S2 = sum_i r_i * pred_hat_i
  kSumSignPred = 6,    // S3 = sum_i sign(pred_i - t_p)
  kCount = 7,          // n, the context's number of valid pixels
  kNumStats = 8,
};

// stats_grad modes, as passed to sa_hdn_backward.
enum SaHdnStatsGrad : int { kStatsGradNone = 0, kStatsGradScale = 1, kStatsGradFull = 2 };

// x_hat = (x - t) / D, with D = s + eps.
template <typename acc_t>
WESTAR_HD acc_t normalize(acc_t x, acc_t median, acc_t scale) {
  return (x - median) / scale;
}

// One pixel's term of the loss numerator in one context: |pred_hat - target_hat|.
template <typename acc_t>
WESTAR_HD acc_t abs_normalized_diff(acc_t p, acc_t q, const acc_t* stat) {
  const acc_t d = normalize(p, stat[kMedianPred], stat[kScalePred]) -
                  normalize(q, stat[kMedianTarget], stat[kScaleTarget]);
  return d < acc_t(0) ? -d : d;
}

// r = sign(pred_hat - target_hat), computed exactly as in abs_normalized_diff.
template <typename acc_t>
WESTAR_HD acc_t normalized_diff_sign(acc_t p, acc_t q, const acc_t* stat) {
  return sign(normalize(p, stat[kMedianPred], stat[kScalePred]) -
              normalize(q, stat[kMedianTarget], stat[kScaleTarget]));
}

// d(sum over the context of |pred_hat - target_hat|) / d pred_j for pixel j of the
// context with row `stat`; is_median says whether j is the context's median element
// (saved as median_index). The caller scales by grad / N and sums over the contexts
// that hold the pixel.
template <typename acc_t>
WESTAR_HD acc_t pixel_grad(acc_t p, acc_t q, const acc_t* stat, bool is_median, int stats_grad) {
  const acc_t scale = stat[kScalePred];
  acc_t g = normalized_diff_sign(p, q, stat) / scale;
  if (stats_grad >= kStatsGradScale) {
    const acc_t scale_term = stat[kSumSignHat] / (scale * stat[kCount]);
    g -= scale_term * sign(p - stat[kMedianPred]);
    if (stats_grad == kStatsGradFull && is_median) {
      g += -stat[kSumSign] / scale + scale_term * stat[kSumSignPred];
    }
  }
  return g;
}

}  // namespace westar
