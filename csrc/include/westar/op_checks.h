// Argument checks of the C++ ops, shared by the CPU and the CUDA kernels (host code only:
// compiled by the host compiler, and by nvcc for the host side of the .cu files). Every
// message names the argument and what was expected; docs/ops.md states the limits.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "westar/ordinal_math.h"
#include "westar/sa_hdn_math.h"

namespace westar {

// The kernels number memberships (level, pixel) and contexts in int32 (seg, CUB counts,
// run arrays of M + 1 entries), so levels x B x H x W must stay at or below this.
constexpr int64_t kMaxMemberships = (int64_t(1) << 31) - 2;
// Instance ids must be below this: the GPU keys hold 31 id bits, and every backend
// raises the same error for a larger id.
constexpr int64_t kIdLimit = int64_t(1) << 31;

// float64 for float64 inputs, else float32: the dtype of stats and of every sum.
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Rows of stats / median_index that the GPU kernels allocate (docs/internals.md,
// "Capacity"): max_contexts when > 0, else a bound from the shapes alone: one global
// context per image, and per instance level and image at most min(H*W / max(min_pixels,
// 1), largest id of the dtype) contexts. The CPU kernel returns exactly K rows.
inline int64_t context_capacity(const at::Tensor& pred, const at::Tensor& instances, bool include_global,
                                int64_t min_pixels, int64_t max_contexts) {
  if (max_contexts > 0) return max_contexts;
  const int64_t B = pred.size(0), hw = pred.size(1) * pred.size(2);
  int64_t cap = include_global ? B : 0;
  if (instances.defined() && instances.size(1) > 0) {
    int64_t id_max = kIdLimit - 1;
    if (instances.scalar_type() == at::kByte) id_max = 255;
    if (instances.scalar_type() == at::kShort) id_max = 32767;
    if (instances.scalar_type() == at::kChar) id_max = 127;
    const int64_t per_plane = std::min<int64_t>(hw / std::max<int64_t>(min_pixels, 1), id_max);
    cap += instances.size(1) * B * per_plane;
  }
  return cap;
}

// A (B, H, W) tensor that must have pred's shape and device.
inline void check_image(const char* name, const at::Tensor& t, const at::Tensor& pred) {
  TORCH_CHECK_VALUE(t.dim() == 3 && t.sizes() == pred.sizes(), "sa_hdn: ", name,
                    " must have the shape of pred (B, H, W) = ", pred.sizes(), ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == pred.device(), "sa_hdn: ", name, " is on ", t.device(), " but pred is on ",
                    pred.device());
}

// Raises the error for a bad id found at instances[b, l, y, x].
inline void raise_bad_id(bool negative, int64_t b, int64_t l, int64_t y, int64_t x) {
  if (negative) {
    TORCH_CHECK_VALUE(false, "instances must hold ids >= 0 (0 = no instance); found a negative id at instances[",
                      b, ", ", l, ", ", y, ", ", x, "]");
  }
  TORCH_CHECK_VALUE(false, "instances must hold ids < 2^31; found a larger id at instances[", b, ", ", l, ", ", y,
                    ", ", x, "]");
}

// A batch with more contexts than the capacity that max_contexts asked for.
inline void raise_too_many_contexts(int64_t found, int64_t max_contexts) {
  TORCH_CHECK_VALUE(false, "sa_hdn: the batch has ", found, " contexts, more than max_contexts = ", max_contexts);
}

// instances / valid of sa_hdn_forward, checked and contiguous (undefined when absent).
struct SaHdnMasks {
  at::Tensor instances;  // (B, L, H, W) integer
  at::Tensor valid;      // (B, H, W) bool
};

inline SaHdnMasks check_sa_hdn_forward(const at::Tensor& pred, const at::Tensor& target,
                                       const std::optional<at::Tensor>& instances,
                                       const std::optional<at::Tensor>& valid, bool include_global, double eps,
                                       int64_t min_pixels, int64_t stats_grad, int64_t max_contexts = 0) {
  TORCH_CHECK_TYPE(at::isFloatingType(pred.scalar_type()), "sa_hdn: pred must be a floating tensor, got ",
                   pred.scalar_type());
  TORCH_CHECK_VALUE(pred.dim() == 3, "sa_hdn: pred must have shape (B, H, W), got ", pred.sizes());
  check_image("target", target, pred);
  TORCH_CHECK_TYPE(target.scalar_type() == pred.scalar_type(), "sa_hdn: target must have the dtype of pred (",
                   pred.scalar_type(), "), got ", target.scalar_type());
  TORCH_CHECK_VALUE(eps >= 0, "sa_hdn: eps must be >= 0, got ", eps);
  TORCH_CHECK_VALUE(min_pixels >= 0, "sa_hdn: min_pixels must be >= 0, got ", min_pixels);
  TORCH_CHECK_VALUE(max_contexts >= 0 && max_contexts <= kMaxMemberships,
                    "sa_hdn: max_contexts must be in [0, 2^31 - 2], got ", max_contexts);
  TORCH_CHECK_VALUE(stats_grad >= kStatsGradNone && stats_grad <= kStatsGradFull,
                    "sa_hdn: stats_grad must be 0, 1 or 2, got ", stats_grad);
  TORCH_CHECK_VALUE(pred.size(1) * pred.size(2) < (int64_t(1) << 31), "sa_hdn: images of ", pred.size(1), "x",
                    pred.size(2), " pixels are too large");
  SaHdnMasks out;
  if (instances.has_value() && instances->defined()) {
    const at::Tensor& inst = *instances;
    TORCH_CHECK_TYPE(at::isIntegralType(inst.scalar_type(), /*includeBool=*/false),
                     "sa_hdn: instances must be an integer tensor (uint8, int16, int32 or int64), got ",
                     inst.scalar_type());
    TORCH_CHECK_VALUE(inst.dim() == 4 && inst.size(0) == pred.size(0) && inst.size(2) == pred.size(1) &&
                          inst.size(3) == pred.size(2),
                      "sa_hdn: instances must have shape (B, L, H, W) with (B, H, W) = ", pred.sizes(), ", got ",
                      inst.sizes());
    TORCH_CHECK_VALUE(inst.device() == pred.device(), "sa_hdn: instances is on ", inst.device(),
                      " but pred is on ", pred.device());
  }
  const int64_t levels = (include_global ? 1 : 0) + (instances.has_value() && instances->defined()
                                                         ? instances->size(1)
                                                         : 0);
  const int64_t memberships = levels * pred.numel();
  TORCH_CHECK_VALUE(memberships <= kMaxMemberships, "sa_hdn: levels x B x H x W = ", memberships,
                    " memberships, more than the ops support (2^31 - 2)");
  if (instances.has_value() && instances->defined()) out.instances = instances->contiguous();
  if (valid.has_value() && valid->defined()) {
    const at::Tensor& val = *valid;
    TORCH_CHECK_TYPE(val.scalar_type() == at::kBool, "sa_hdn: valid must be a bool tensor, got ",
                     val.scalar_type());
    check_image("valid", val, pred);
    out.valid = val.contiguous();
  }
  return out;
}

inline void check_sa_hdn_backward(const at::Tensor& grad, const at::Tensor& pred, const at::Tensor& target,
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
  const at::ScalarType acc = acc_dtype(pred.scalar_type());
  TORCH_CHECK_TYPE(stats.scalar_type() == acc, "sa_hdn_backward: stats must be ", acc, ", got ",
                   stats.scalar_type());
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(1) == kNumStats, "sa_hdn_backward: stats must have shape (K, ",
                    int(kNumStats), "), got ", stats.sizes());
  TORCH_CHECK_TYPE(median_index.scalar_type() == at::kLong, "sa_hdn_backward: median_index must be int64, got ",
                   median_index.scalar_type());
  TORCH_CHECK_VALUE(median_index.dim() == 1 && median_index.size(0) == stats.size(0),
                    "sa_hdn_backward: median_index must have shape (K,) = (", stats.size(0), ",), got ",
                    median_index.sizes());
  TORCH_CHECK_VALUE(stats_grad >= kStatsGradNone && stats_grad <= kStatsGradFull,
                    "sa_hdn_backward: stats_grad must be 0, 1 or 2, got ", stats_grad);
  for (const at::Tensor* t : {&grad, &seg, &stats, &median_index}) {
    TORCH_CHECK_VALUE(t->device() == pred.device(), "sa_hdn_backward: all tensors must be on ", pred.device(),
                      ", got one on ", t->device());
  }
}

inline void check_ordinal(const at::Tensor& pred, const at::Tensor& pairs, const at::Tensor& labels, int64_t kind) {
  TORCH_CHECK_TYPE(at::isFloatingType(pred.scalar_type()),
                   "ordinal_ranking: pred must be a floating tensor, got ", pred.scalar_type());
  TORCH_CHECK_VALUE(pred.dim() == 3, "ordinal_ranking: pred must have shape (B, H, W), got ", pred.sizes());
  TORCH_CHECK_TYPE(at::isIntegralType(pairs.scalar_type(), /*includeBool=*/false),
                   "ordinal_ranking: pairs must be an integer tensor, got ", pairs.scalar_type());
  TORCH_CHECK_TYPE(at::isIntegralType(labels.scalar_type(), /*includeBool=*/false),
                   "ordinal_ranking: labels must be an integer tensor, got ", labels.scalar_type());
  TORCH_CHECK_VALUE(pairs.dim() == 4 && pairs.size(0) == pred.size(0) && pairs.size(2) == 2 && pairs.size(3) == 2,
                    "ordinal_ranking: pairs must have shape (B, P, 2, 2) with B = ", pred.size(0), ", got ",
                    pairs.sizes());
  TORCH_CHECK_VALUE(labels.dim() == 2 && labels.size(0) == pairs.size(0) && labels.size(1) == pairs.size(1),
                    "ordinal_ranking: labels must have shape (B, P) = (", pairs.size(0), ", ", pairs.size(1),
                    "), got ", labels.sizes());
  TORCH_CHECK_VALUE(kind == kOrdinalMargin || kind == kOrdinalLogistic,
                    "ordinal_ranking: kind must be 0 (margin) or 1 (logistic), got ", kind);
  TORCH_CHECK_VALUE(pairs.device() == pred.device() && labels.device() == pred.device(),
                    "ordinal_ranking: pairs and labels must be on ", pred.device(), ", got ", pairs.device(),
                    " and ", labels.device());
}

// The incoming gradient of a backward: one element, on pred's device.
inline void check_grad(const char* op, const at::Tensor& grad, const at::Tensor& pred) {
  TORCH_CHECK_VALUE(grad.numel() == 1, op, ": grad must hold one element, got ", grad.sizes());
  TORCH_CHECK_VALUE(grad.device() == pred.device(), op, ": grad must be on ", pred.device(), ", got ",
                    grad.device());
}

}  // namespace westar
