// Per-pair math of ordinal_ranking_loss shared by the CPU and CUDA kernels.
#pragma once

#include <cmath>

#include "westar/common.h"

namespace westar {

enum OrdinalKind : int { kOrdinalMargin = 0, kOrdinalLogistic = 1 };

// Labels +1, -1 and 0 take part; any other value marks an ignored (padding) pair.
WESTAR_HD bool ordinal_label_used(int64_t label) { return label >= -1 && label <= 1; }

// softplus(z) = log(1 + exp(z)), without overflow for large z.
template <typename acc_t>
WESTAR_HD acc_t softplus(acc_t z) {
  return z > acc_t(0) ? z + log1p(exp(-z)) : log1p(exp(z));
}

template <typename acc_t>
WESTAR_HD acc_t sigmoid(acc_t z) {
  return z >= acc_t(0) ? acc_t(1) / (acc_t(1) + exp(-z)) : exp(z) / (acc_t(1) + exp(z));
}

// Loss of one pair with d = pred[a] - pred[b] and label l in {-1, 0, +1}.
template <typename acc_t>
WESTAR_HD acc_t ordinal_pair_loss(acc_t d, int64_t label, acc_t margin, int kind, acc_t equal_weight) {
  if (label == 0) return equal_weight * d * d;
  const acc_t l = acc_t(label);
  if (kind == kOrdinalMargin) {
    const acc_t z = margin - l * d;
    return z < acc_t(0) ? acc_t(0) : z;  // NaN propagates, as in torch.clamp_min
  }
  return softplus(-l * d);
}

// d(pair loss) / d d. For the margin kind the gradient at the hinge (z == 0) is -l,
// as torch.clamp_min's backward passes the gradient where input >= min.
template <typename acc_t>
WESTAR_HD acc_t ordinal_pair_grad(acc_t d, int64_t label, acc_t margin, int kind, acc_t equal_weight) {
  if (label == 0) return acc_t(2) * equal_weight * d;
  const acc_t l = acc_t(label);
  if (kind == kOrdinalMargin) return (margin - l * d >= acc_t(0)) ? -l : acc_t(0);
  return -l * sigmoid(-l * d);
}

}  // namespace westar
