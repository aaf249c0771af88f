// CPU kernels of ordinal_ranking_forward / ordinal_ranking_backward (docs/internals.md).
//
// Per pair: d = pred[b, a] - pred[b, b'], loss and d-gradient from westar/ordinal_math.h.
// Forward: per-image partial sums (serial order inside an image, images in parallel),
// combined in image order, so the result does not depend on the thread count.
// Backward: grad_pred is zero except +g at a and -g at b per used pair; every image is
// scattered serially in pair order (images in parallel), so shared pixels add up in a
// fixed order: deterministic.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "westar/op_checks.h"
#include "westar/ordinal_math.h"

namespace westar {
namespace {

struct OrdinalInputs {
  at::Tensor pred;  // (B, H, W) contiguous, float or double
  at::Tensor pairs;   // (B, P, 2, 2) int64 contiguous
  at::Tensor labels;  // (B, P) int64 contiguous
  int64_t batch, height, width, num_pairs;
};

OrdinalInputs prepare_ordinal(const at::Tensor& pred, const at::Tensor& pairs, const at::Tensor& labels,
                              int64_t kind) {
  check_ordinal(pred, pairs, labels, kind);
  OrdinalInputs in;
  const bool is_double = pred.scalar_type() == at::kDouble;
  in.pred = (is_double ? pred : pred.to(at::kFloat)).contiguous();
  in.pairs = pairs.to(at::kLong).contiguous();
  in.labels = labels.to(at::kLong).contiguous();
  in.batch = pred.size(0);
  in.height = pred.size(1);
  in.width = pred.size(2);
  in.num_pairs = pairs.size(1);
  return in;
}

// Images per parallel task: a thread gets at least ~64K pairs, so that small batches run
// on the calling thread (a parallel region costs more than a few thousand pairs).
int64_t images_per_task(const OrdinalInputs& in) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, in.num_pairs));
}

// Flat pixel indices of a used pair; raises ValueError naming the batch index and pair
// when a coordinate lies outside the image.
inline void pair_pixels(const OrdinalInputs& in, const int64_t* pr, int64_t b, int64_t p, int64_t* ja,
                        int64_t* jb) {
  const int64_t ya = pr[0], xa = pr[1], yb = pr[2], xb = pr[3];
  const bool inside = ya >= 0 && ya < in.height && xa >= 0 && xa < in.width && yb >= 0 && yb < in.height &&
                      xb >= 0 && xb < in.width;
  TORCH_CHECK_VALUE(inside, "pairs[", b, ", ", p, "] = [[", ya, ", ", xa, "], [", yb, ", ", xb,
                    "]] lies outside the ", in.height, "x", in.width, " image (batch index ", b, ", pair ", p,
                    "); coordinates are (y, x)");
  *ja = ya * in.width + xa;
  *jb = yb * in.width + xb;
}

// Checks every used pair (serially, so the first bad pair in (b, p) order is reported)
// and counts them.
int64_t check_and_count(const OrdinalInputs& in) {
  const int64_t* pairs = in.pairs.data_ptr<int64_t>();
  const int64_t* labels = in.labels.data_ptr<int64_t>();
  int64_t used = 0;
  for (int64_t b = 0; b < in.batch; ++b) {
    for (int64_t p = 0; p < in.num_pairs; ++p) {
      const int64_t i = b * in.num_pairs + p;
      if (!ordinal_label_used(labels[i])) continue;
      int64_t ja, jb;
      pair_pixels(in, pairs + 4 * i, b, p, &ja, &jb);
      ++used;
    }
  }
  return used;
}

template <typename acc_t>
acc_t ordinal_loss_sum(const OrdinalInputs& in, acc_t margin, int kind, acc_t equal_weight) {
  const acc_t* pred = in.pred.data_ptr<acc_t>();
  const int64_t* pairs = in.pairs.data_ptr<int64_t>();
  const int64_t* labels = in.labels.data_ptr<int64_t>();
  const int64_t hw = in.height * in.width;
  std::vector<acc_t> partial(in.batch, acc_t(0));
  at::parallel_for(0, in.batch, images_per_task(in), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const acc_t* img = pred + b * hw;
      acc_t sum = 0;
      for (int64_t p = 0; p < in.num_pairs; ++p) {
        const int64_t i = b * in.num_pairs + p;
        const int64_t label = labels[i];
        if (!ordinal_label_used(label)) continue;
        const int64_t* pr = pairs + 4 * i;
        const acc_t d = img[pr[0] * in.width + pr[1]] - img[pr[2] * in.width + pr[3]];
        sum += ordinal_pair_loss<acc_t>(d, label, margin, kind, equal_weight);
      }
      partial[b] = sum;
    }
  });
  acc_t total = 0;
  for (int64_t b = 0; b < in.batch; ++b) total += partial[b];
  return total;
}

std::tuple<at::Tensor, at::Tensor> ordinal_ranking_forward_cpu(const at::Tensor& pred, const at::Tensor& pairs,
                                                               const at::Tensor& labels, double margin, int64_t kind,
                                                               double equal_weight) {
  const OrdinalInputs in = prepare_ordinal(pred, pairs, labels, kind);
  const int64_t used = check_and_count(in);
  at::Tensor loss = at::zeros({}, in.pred.options());
  if (used > 0) {
    if (in.pred.scalar_type() == at::kDouble) {
      const double sum = ordinal_loss_sum<double>(in, margin, static_cast<int>(kind), equal_weight);
      loss.data_ptr<double>()[0] = sum / static_cast<double>(used);
    } else {
      const float sum = ordinal_loss_sum<float>(in, static_cast<float>(margin), static_cast<int>(kind),
                                                static_cast<float>(equal_weight));
      loss.data_ptr<float>()[0] = sum / static_cast<float>(used);
    }
  }
  return {loss.to(pred.scalar_type()), at::scalar_tensor(used, pred.options().dtype(at::kLong))};
}

template <typename acc_t>
void ordinal_scatter_grad(const OrdinalInputs& in, acc_t scale, acc_t margin, int kind, acc_t equal_weight,
                          acc_t* out) {
  const acc_t* pred = in.pred.data_ptr<acc_t>();
  const int64_t* pairs = in.pairs.data_ptr<int64_t>();
  const int64_t* labels = in.labels.data_ptr<int64_t>();
  const int64_t hw = in.height * in.width;
  at::parallel_for(0, in.batch, images_per_task(in), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const acc_t* img = pred + b * hw;
      acc_t* g_img = out + b * hw;
      for (int64_t p = 0; p < in.num_pairs; ++p) {
        const int64_t i = b * in.num_pairs + p;
        const int64_t label = labels[i];
        if (!ordinal_label_used(label)) continue;
        const int64_t* pr = pairs + 4 * i;
        const int64_t ja = pr[0] * in.width + pr[1];
        const int64_t jb = pr[2] * in.width + pr[3];
        const acc_t g = scale * ordinal_pair_grad<acc_t>(img[ja] - img[jb], label, margin, kind, equal_weight);
        g_img[ja] += g;
        g_img[jb] -= g;
      }
    }
  });
}

at::Tensor ordinal_ranking_backward_cpu(const at::Tensor& grad, const at::Tensor& pred, const at::Tensor& pairs,
                                        const at::Tensor& labels, double margin, int64_t kind,
                                        double equal_weight, const std::optional<at::Tensor>& /*count*/) {
  // The pairs are checked again (CPU errors are raised eagerly), which counts them too.
  const OrdinalInputs in = prepare_ordinal(pred, pairs, labels, kind);
  check_grad("ordinal_ranking_backward", grad, pred);
  const int64_t used = check_and_count(in);
  at::Tensor out = at::zeros({in.batch, in.height, in.width}, in.pred.options());
  if (used > 0) {
    const double g = grad.to(at::kDouble).contiguous().data_ptr<double>()[0];
    if (in.pred.scalar_type() == at::kDouble) {
      ordinal_scatter_grad<double>(in, g / static_cast<double>(used), margin, static_cast<int>(kind),
                                   equal_weight, out.data_ptr<double>());
    } else {
      ordinal_scatter_grad<float>(in, static_cast<float>(g) / static_cast<float>(used), static_cast<float>(margin),
                                  static_cast<int>(kind), static_cast<float>(equal_weight), out.data_ptr<float>());
    }
  }
  return out.scalar_type() == pred.scalar_type() ? out : out.to(pred.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(westar_ops, CPU, m) {
  m.impl("ordinal_ranking_forward", &ordinal_ranking_forward_cpu);
  m.impl("ordinal_ranking_backward", &ordinal_ranking_backward_cpu);
}

}  // namespace westar
