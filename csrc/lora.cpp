// lora_delta_sq_norm(A, B, s) = || s * B @ A ||_F^2 = s^2 * trace((B^T B)(A A^T)),
// computed through the r x r Gram matrices so the d_out x d_in product is never formed.
// Written with ATen matrix ops, so one registration serves every device (CompositeExplicitAutograd);
// the autograd formula is registered from Python.
#include <ATen/core/Tensor.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

namespace westar {
namespace {

at::Tensor lora_delta_sq_norm(const at::Tensor& A, const at::Tensor& B, double scaling) {
  // (B^T B) is (r, r), (A A^T) is (r, r); trace(X Y) = sum(X * Y^T) = sum(X * Y), Y symmetric.
  const at::Tensor gram_b = at::mm(B.t(), B);
  const at::Tensor gram_a = at::mm(A, A.t());
  return at::mul(at::sum(at::mul(gram_b, gram_a)), scaling * scaling);
}

std::tuple<at::Tensor, at::Tensor> lora_delta_sq_norm_backward(
    const at::Tensor& grad, const at::Tensor& A, const at::Tensor& B, double scaling) {
  // d/dA = 2 s^2 (B^T B) A;  d/dB = 2 s^2 B (A A^T).
  const at::Tensor factor = at::mul(grad, 2.0 * scaling * scaling);
  const at::Tensor grad_a = at::mul(at::mm(at::mm(B.t(), B), A), factor);
  const at::Tensor grad_b = at::mul(at::mm(B, at::mm(A, A.t())), factor);
  return {grad_a, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(westar_ops, CompositeExplicitAutograd, m) {
  m.impl("lora_delta_sq_norm", &lora_delta_sq_norm);
  m.impl("lora_delta_sq_norm_backward", &lora_delta_sq_norm_backward);
}

}  // namespace westar
