// CUDA kernels of ordinal_ranking_forward / ordinal_ranking_backward (docs/internals.md,
// docs/gpu_kernels.md).
//
// Forward, one kernel: one thread per pair (grid-stride), per-pair loss from
// westar/ordinal_math.h summed per block with cub::BlockReduce (fixed order); the last
// block to finish (an arrival counter zeroed by a 4-byte memset) adds the block
// partials in block order and writes the loss and M, the number of used pairs (an output:
// the backward reads it). Deterministic, no host sync, capturable in a CUDA graph.
// Backward: scale = grad / M on the device, from the forward's M (or, without it, from
// the partial kernels again).
//  - default: one kernel, float atomics at a and b (bits may vary where pairs share a pixel);
//  - under at::globalContext().deterministicAlgorithms(): every pair writes its two
//    contributions (+g at a, -g at b) with the flat pixel as key, a stable CUB radix sort
//    groups them by pixel keeping pair order, and the first contribution of every run
//    adds the run serially. Same order as the CPU kernel: bitwise repeatable (and equal
//    to the CPU result for float32/float64). We chose repeatable results over raising.
// A used pair outside the image cannot raise here without a host sync: it adds NaN to the
// loss (and is counted), and the backward skips it; nothing is read out of bounds. The
// public wrapper raises the error instead with debug checks (westar_ops.set_debug_checks).
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/cub.cuh>


#include "cuda_utils.cuh"
#include "westar/op_checks.h"
#include "westar/ordinal_math.h"

namespace westar {
namespace {

using cuda::acc_type;

constexpr int kThreads = 256;

struct PairGeom {
  int64_t batch, num_pairs, height, width;
};

// Flat pixel indices of pair i = b * P + p; false when a coordinate lies outside the image.
__device__ __forceinline__ bool pair_pixels(const int64_t* pairs, int64_t i, const PairGeom& g, int64_t* ja,
                                            int64_t* jb) {
  const int64_t* pr = pairs + 4 * i;
  const int64_t ya = pr[0], xa = pr[1], yb = pr[2], xb = pr[3];
  const bool inside = ya >= 0 && ya < g.height && xa >= 0 && xa < g.width && yb >= 0 && yb < g.height &&
                      xb >= 0 && xb < g.width;
  const int64_t base = (i / g.num_pairs) * g.height * g.width;
  *ja = base + ya * g.width + xa;
  *jb = base + yb * g.width + xb;
  return inside;
}

// Per block: sum of the used pairs' losses and their number.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    pair_partial_kernel(const scalar_t* __restrict__ pred, const int64_t* __restrict__ pairs,
                        const int64_t* __restrict__ labels, PairGeom g, acc_t margin, int kind, acc_t equal_weight,
                        acc_t* __restrict__ part_sum, int64_t* __restrict__ part_count) {
  using Reduce = cub::BlockReduce<acc_t, kThreads>;
  using ReduceCount = cub::BlockReduce<int64_t, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ typename ReduceCount::TempStorage tmp_count;
  const int64_t total = g.batch * g.num_pairs;
  acc_t sum = 0;
  int64_t count = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t label = labels[i];
    if (!ordinal_label_used(label)) continue;
    int64_t ja, jb;
    ++count;
    if (!pair_pixels(pairs, i, g, &ja, &jb)) {  // the device-side error: a NaN loss
      sum += static_cast<acc_t>(::nan(""));
      continue;
    }
    const acc_t d = static_cast<acc_t>(pred[ja]) - static_cast<acc_t>(pred[jb]);
    sum += ordinal_pair_loss<acc_t>(d, label, margin, kind, equal_weight);
  }
  const acc_t block_sum = Reduce(tmp).Sum(sum);
  const int64_t block_count = ReduceCount(tmp_count).Sum(count);
  if (threadIdx.x == 0) {
    part_sum[blockIdx.x] = block_sum;
    part_count[blockIdx.x] = block_count;
  }
}

// The forward in one kernel: the partials of pair_partial_kernel, then the last block to
// arrive (counter, zeroed before the launch) adds them in block order.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    pair_forward_kernel(const scalar_t* __restrict__ pred, const int64_t* __restrict__ pairs,
                        const int64_t* __restrict__ labels, PairGeom g, acc_t margin, int kind, acc_t equal_weight,
                        acc_t* __restrict__ part_sum, int64_t* __restrict__ part_count,
                        unsigned* __restrict__ counter, acc_t* __restrict__ loss, int64_t* __restrict__ used) {
  using Reduce = cub::BlockReduce<acc_t, kThreads>;
  using ReduceCount = cub::BlockReduce<int64_t, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ typename ReduceCount::TempStorage tmp_count;
  __shared__ bool last;
  const int64_t total = g.batch * g.num_pairs;
  acc_t sum = 0;
  int64_t count = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t label = labels[i];
    if (!ordinal_label_used(label)) continue;
    int64_t ja, jb;
    ++count;
    if (!pair_pixels(pairs, i, g, &ja, &jb)) {
      sum += static_cast<acc_t>(::nan(""));
      continue;
    }
    const acc_t d = static_cast<acc_t>(pred[ja]) - static_cast<acc_t>(pred[jb]);
    sum += ordinal_pair_loss<acc_t>(d, label, margin, kind, equal_weight);
  }
  const acc_t block_sum = Reduce(tmp).Sum(sum);
  const int64_t block_count = ReduceCount(tmp_count).Sum(count);
  if (threadIdx.x == 0) {
    part_sum[blockIdx.x] = block_sum;
    part_count[blockIdx.x] = block_count;
    __threadfence();  // the partials are visible before the counter says so
    last = atomicAdd(counter, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;  // block-uniform
  __threadfence();
  acc_t s = 0;
  int64_t c = 0;
  for (int i = threadIdx.x; i < static_cast<int>(gridDim.x); i += kThreads) {
    s += static_cast<volatile acc_t*>(part_sum)[i];
    c += static_cast<volatile int64_t*>(part_count)[i];
  }
  __syncthreads();  // the shared reduce storage is reused
  const acc_t all = Reduce(tmp).Sum(s);
  const int64_t m = ReduceCount(tmp_count).Sum(c);
  if (threadIdx.x == 0) {
    loss[0] = m > 0 ? all / static_cast<acc_t>(m) : acc_t(0);
    used[0] = m;
  }
}

// One block: combines the partials in block order. Writes loss = sum / M (0 if M == 0)
// and, when grad != nullptr, scale = grad / M (0 if M == 0), computed as the CPU kernel
// does (grad read as double, then divided in the accumulation dtype).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    pair_finish_kernel(const acc_t* __restrict__ part_sum, const int64_t* __restrict__ part_count, int parts,
                       const double* __restrict__ grad, acc_t* __restrict__ loss, acc_t* __restrict__ scale) {
  using Reduce = cub::BlockReduce<acc_t, kThreads>;
  using ReduceCount = cub::BlockReduce<int64_t, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ typename ReduceCount::TempStorage tmp_count;
  acc_t sum = 0;
  int64_t count = 0;
  for (int i = threadIdx.x; i < parts; i += kThreads) {
    sum += part_sum[i];
    count += part_count[i];
  }
  const acc_t total = Reduce(tmp).Sum(sum);
  const int64_t used = ReduceCount(tmp_count).Sum(count);
  if (threadIdx.x == 0) {
    if (loss != nullptr) loss[0] = used > 0 ? total / static_cast<acc_t>(used) : acc_t(0);
    if (scale != nullptr) {
      scale[0] = used > 0 ? static_cast<acc_t>(grad[0]) / static_cast<acc_t>(used) : acc_t(0);
    }
  }
}

// scale = grad / M (0 when M == 0), as the CPU kernel computes it.
template <typename acc_t>
__device__ __forceinline__ acc_t grad_scale(const double* grad, const int64_t* used) {
  const int64_t m = used[0];
  return m > 0 ? static_cast<acc_t>(grad[0]) / static_cast<acc_t>(m) : acc_t(0);
}

// scale from the forward's count (used != nullptr) or from a scale kernel (scale).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    pair_scatter_atomic_kernel(const scalar_t* __restrict__ pred, const int64_t* __restrict__ pairs,
                               const int64_t* __restrict__ labels, PairGeom g, acc_t margin, int kind,
                               acc_t equal_weight, const acc_t* __restrict__ scale, const double* __restrict__ grad,
                               const int64_t* __restrict__ used, acc_t* __restrict__ out) {
  const int64_t total = g.batch * g.num_pairs;
  const acc_t s = used != nullptr ? grad_scale<acc_t>(grad, used) : scale[0];
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t label = labels[i];
    if (!ordinal_label_used(label)) continue;
    int64_t ja, jb;
    if (!pair_pixels(pairs, i, g, &ja, &jb)) continue;
    const acc_t d = static_cast<acc_t>(pred[ja]) - static_cast<acc_t>(pred[jb]);
    const acc_t gr = s * ordinal_pair_grad<acc_t>(d, label, margin, kind, equal_weight);
    atomicAdd(out + ja, gr);
    atomicAdd(out + jb, -gr);
  }
}

// Deterministic path, step 1: contributions 2i (+g at a) and 2i + 1 (-g at b) of pair i,
// keyed by flat pixel; unused pairs get the sentinel key (number of pixels).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    pair_contrib_kernel(const scalar_t* __restrict__ pred, const int64_t* __restrict__ pairs,
                        const int64_t* __restrict__ labels, PairGeom g, acc_t margin, int kind, acc_t equal_weight,
                        const acc_t* __restrict__ scale, const double* __restrict__ grad,
                        const int64_t* __restrict__ used_count, uint64_t sentinel, uint64_t* __restrict__ keys,
                        acc_t* __restrict__ vals) {
  const int64_t total = g.batch * g.num_pairs;
  const acc_t s = used_count != nullptr ? grad_scale<acc_t>(grad, used_count) : scale[0];
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t label = labels[i];
    int64_t ja = 0, jb = 0;
    const bool used = ordinal_label_used(label) && pair_pixels(pairs, i, g, &ja, &jb);
    acc_t gr = 0;
    if (used) {
      const acc_t d = static_cast<acc_t>(pred[ja]) - static_cast<acc_t>(pred[jb]);
      gr = s * ordinal_pair_grad<acc_t>(d, label, margin, kind, equal_weight);
    }
    keys[2 * i] = used ? static_cast<uint64_t>(ja) : sentinel;
    keys[2 * i + 1] = used ? static_cast<uint64_t>(jb) : sentinel;
    vals[2 * i] = gr;
    vals[2 * i + 1] = -gr;
  }
}

// Deterministic path, step 2: the head of every run of equal keys adds the run in order.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    run_sum_kernel(const uint64_t* __restrict__ keys, const acc_t* __restrict__ vals, int64_t n, uint64_t sentinel,
                   acc_t* __restrict__ out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const uint64_t key = keys[i];
    if (key >= sentinel || (i > 0 && keys[i - 1] == key)) continue;
    acc_t sum = 0;
    for (int64_t m = i; m < n && keys[m] == key; ++m) sum += vals[m];
    out[key] = sum;
  }
}

struct OrdinalArgs {
  at::Tensor pred, pairs, labels;
  PairGeom geom;
};

OrdinalArgs prepare(const at::Tensor& pred, const at::Tensor& pairs, const at::Tensor& labels, int64_t kind) {
  check_ordinal(pred, pairs, labels, kind);
  OrdinalArgs a;
  a.pred = pred.contiguous();
  a.pairs = pairs.to(at::kLong).contiguous();
  a.labels = labels.to(at::kLong).contiguous();
  a.geom = {pred.size(0), pairs.size(1), pred.size(1), pred.size(2)};
  return a;
}

// Launches the partial and finish kernels; returns the (1,) loss and (1,) scale tensors.
template <typename scalar_t>
void loss_and_scale(const OrdinalArgs& a, double margin, int kind, double equal_weight, const double* grad,
                    at::Tensor* loss, at::Tensor* scale, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  const int64_t total = a.geom.batch * a.geom.num_pairs;
  const unsigned blocks = cuda::grid_for(total, kThreads, 4096);
  const auto opts = a.pred.options();
  at::Tensor part_sum = at::empty({blocks}, opts.dtype(acc_dtype(a.pred.scalar_type())));
  at::Tensor part_count = at::empty({blocks}, opts.dtype(at::kLong));
  pair_partial_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
      a.pred.data_ptr<scalar_t>(), a.pairs.data_ptr<int64_t>(), a.labels.data_ptr<int64_t>(), a.geom,
      static_cast<acc_t>(margin), kind, static_cast<acc_t>(equal_weight), part_sum.data_ptr<acc_t>(),
      part_count.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  pair_finish_kernel<acc_t><<<1, kThreads, 0, stream>>>(
      part_sum.data_ptr<acc_t>(), part_count.data_ptr<int64_t>(), static_cast<int>(blocks), grad,
      loss != nullptr ? loss->data_ptr<acc_t>() : nullptr, scale != nullptr ? scale->data_ptr<acc_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> ordinal_ranking_forward_cuda(const at::Tensor& pred, const at::Tensor& pairs,
                                                                const at::Tensor& labels, double margin,
                                                                int64_t kind, double equal_weight) {
  const OrdinalArgs a = prepare(pred, pairs, labels, kind);
  const c10::cuda::CUDAGuard guard(pred.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::ScalarType acc = acc_dtype(pred.scalar_type());
  const int64_t total = a.geom.batch * a.geom.num_pairs;
  if (total == 0) {
    return {at::zeros({}, pred.options()), at::zeros({}, pred.options().dtype(at::kLong))};
  }
  at::Tensor loss = at::empty({}, pred.options().dtype(acc));
  at::Tensor used = at::empty({}, pred.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.pred.scalar_type(), "ordinal_ranking_forward_cuda", [&] {
        using acc_t = acc_type<scalar_t>;
        const unsigned blocks = cuda::grid_for(total, kThreads, 4096);
        at::Tensor part_sum = at::empty({blocks}, loss.options());
        at::Tensor part_count = at::empty({blocks}, used.options());
        // The arrival counter: zeroed here (a 4-byte memset, captured with the kernel),
        // not kept between calls, so concurrent streams cannot share it.
        at::Tensor counter = at::empty({1}, used.options().dtype(at::kInt));
        C10_CUDA_CHECK(cudaMemsetAsync(counter.data_ptr<int32_t>(), 0, sizeof(int32_t), stream));
        pair_forward_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
            a.pred.data_ptr<scalar_t>(), a.pairs.data_ptr<int64_t>(), a.labels.data_ptr<int64_t>(), a.geom,
            static_cast<acc_t>(margin), static_cast<int>(kind), static_cast<acc_t>(equal_weight),
            part_sum.data_ptr<acc_t>(), part_count.data_ptr<int64_t>(),
            reinterpret_cast<unsigned*>(counter.data_ptr<int32_t>()),
            loss.data_ptr<acc_t>(), used.data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {loss.scalar_type() == pred.scalar_type() ? loss : loss.to(pred.scalar_type()), used};
}

at::Tensor ordinal_ranking_backward_cuda(const at::Tensor& grad, const at::Tensor& pred, const at::Tensor& pairs,
                                         const at::Tensor& labels, double margin, int64_t kind,
                                         double equal_weight, const std::optional<at::Tensor>& count) {
  const OrdinalArgs a = prepare(pred, pairs, labels, kind);
  check_grad("ordinal_ranking_backward", grad, pred);
  const c10::cuda::CUDAGuard guard(pred.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::ScalarType acc = acc_dtype(pred.scalar_type());
  at::Tensor out = at::zeros({a.geom.batch, a.geom.height, a.geom.width}, pred.options().dtype(acc));
  const int64_t total = a.geom.batch * a.geom.num_pairs;
  if (total > 0 && out.numel() > 0) {
    const at::Tensor g64 = grad.reshape({1}).to(at::kDouble).contiguous();
    const bool deterministic = at::globalContext().deterministicAlgorithms();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, a.pred.scalar_type(), "ordinal_ranking_backward_cuda", [&] {
          using acc_t = acc_type<scalar_t>;
          at::Tensor scale = at::empty({1}, out.options());
          const int64_t* used = nullptr;
          if (count.has_value() && count->defined()) {  // the forward's M: no recount
            TORCH_CHECK_VALUE(count->scalar_type() == at::kLong && count->numel() == 1 &&
                                  count->device() == pred.device(),
                              "ordinal_ranking_backward: count must be the forward's int64 count on ",
                              pred.device());
            used = count->data_ptr<int64_t>();
          } else {
            loss_and_scale<scalar_t>(a, margin, static_cast<int>(kind), equal_weight, g64.data_ptr<double>(),
                                     nullptr, &scale, stream);
          }
          const unsigned blocks = cuda::grid_for(total, kThreads);
          const acc_t m = static_cast<acc_t>(margin), ew = static_cast<acc_t>(equal_weight);
          if (!deterministic) {
            pair_scatter_atomic_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
                a.pred.data_ptr<scalar_t>(), a.pairs.data_ptr<int64_t>(), a.labels.data_ptr<int64_t>(), a.geom, m,
                static_cast<int>(kind), ew, scale.data_ptr<acc_t>(), g64.data_ptr<double>(), used,
                out.data_ptr<acc_t>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
            return;
          }
          const int64_t n = 2 * total;
          const uint64_t sentinel = static_cast<uint64_t>(out.numel());
          int end_bit = 1;
          while (end_bit < 64 && (sentinel >> end_bit) != 0) ++end_bit;
          const auto opts = a.pred.options();
          at::Tensor keys = at::empty({2, n}, opts.dtype(at::kLong));
          at::Tensor vals = at::empty({2, n}, opts.dtype(acc));
          uint64_t* keys_in = reinterpret_cast<uint64_t*>(keys.data_ptr<int64_t>());
          uint64_t* keys_out = keys_in + n;
          acc_t* vals_in = vals.data_ptr<acc_t>();
          acc_t* vals_out = vals_in + n;
          pair_contrib_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
              a.pred.data_ptr<scalar_t>(), a.pairs.data_ptr<int64_t>(), a.labels.data_ptr<int64_t>(), a.geom, m,
              static_cast<int>(kind), ew, scale.data_ptr<acc_t>(), g64.data_ptr<double>(), used, sentinel, keys_in,
              vals_in);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          size_t temp_bytes = 0;
          C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, keys_in, keys_out, vals_in, vals_out,
                                                         n, 0, end_bit, stream));
          at::Tensor temp = at::empty({static_cast<int64_t>(temp_bytes) + 1}, opts.dtype(at::kByte));
          C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.data_ptr<uint8_t>(), temp_bytes, keys_in, keys_out,
                                                         vals_in, vals_out, n, 0, end_bit, stream));
          run_sum_kernel<acc_t><<<cuda::grid_for(n, kThreads), kThreads, 0, stream>>>(keys_out, vals_out, n, sentinel,
                                                                                     out.data_ptr<acc_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  return out.scalar_type() == pred.scalar_type() ? out : out.to(pred.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(westar_ops, CUDA, m) {
  m.impl("ordinal_ranking_forward", &ordinal_ranking_forward_cuda);
  m.impl("ordinal_ranking_backward", &ordinal_ranking_backward_cuda);
}

}  // namespace westar
