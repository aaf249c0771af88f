// Op schemas of westar_ops, declared once. Kernels register per dispatch key in
// csrc/cpu/*_cpu.cpp and csrc/cuda/*_cuda.cu; fake kernels and autograd formulas are
// registered from Python (westar_ops/ops.py). The layout of the tensors that pass
// between forward and backward is documented in docs/internals.md.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/cpu_avx512.h"

namespace {
// The instruction set of the CPU kernels' hot loops in this process: "avx512" or
// "generic" (set WESTAR_CPU_ISA=generic to force the portable loops).
std::string cpu_isa() { return westar::cpu::use_avx512() ? "avx512" : "generic"; }

// Whether at::parallel_for runs in parallel in this library: with torch's OpenMP backend
// it is a pragma compiled into our objects, so it needs -fopenmp (setup.py adds it).
std::string cpu_threading() {
#ifdef _OPENMP
  return "openmp";
#else
  return "no openmp";
#endif
}
}  // namespace

extern "C" {
// A Python module named _C with no methods: importing it loads this library, whose
// static initialisers register the ops below with the dispatcher.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(westar_ops, m) {
  // pred, target: (B, H, W) floating; instances: (B, L, H, W) integer or None;
  // valid: (B, H, W) bool or None. Returns (loss, seg, stats, median_index, info).
  // stats_grad is not used by the forward; it is recorded for the autograd formula.
  // max_contexts <= 0: the capacity of stats follows from the shapes (docs/internals.md).
  m.def(
      "sa_hdn_forward(Tensor pred, Tensor target, Tensor? instances, Tensor? valid, "
      "bool include_global, float eps, int min_pixels, int stats_grad, int max_contexts=0) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // stats_grad: 0 = none, 1 = scale, 2 = full. Returns d loss / d pred, (B, H, W).
  // info: the forward's info (its N is used); None: N is summed from stats.
  m.def(
      "sa_hdn_backward(Tensor grad, Tensor pred, Tensor target, Tensor seg, Tensor stats, "
      "Tensor median_index, int stats_grad, Tensor? info=None) -> Tensor");
  // pred: (B, H, W); pairs: (B, P, 2, 2) int64; labels: (B, P) int64.
  // kind: 0 = margin, 1 = logistic.
  // Returns (loss, count): count = the used pairs (0-dim int64), kept for the backward.
  m.def(
      "ordinal_ranking_forward(Tensor pred, Tensor pairs, Tensor labels, float margin, "
      "int kind, float equal_weight) -> (Tensor, Tensor)");
  // count: the forward's count; None: counted again.
  m.def(
      "ordinal_ranking_backward(Tensor grad, Tensor pred, Tensor pairs, Tensor labels, "
      "float margin, int kind, float equal_weight, Tensor? count=None) -> Tensor");
  // A: (r, d_in), B: (d_out, r).
  m.def("lora_delta_sq_norm(Tensor A, Tensor B, float scaling) -> Tensor");
  m.def(
      "lora_delta_sq_norm_backward(Tensor grad, Tensor A, Tensor B, float scaling) "
      "-> (Tensor, Tensor)");
  m.def("cpu_isa() -> str", &cpu_isa);
  m.def("cpu_threading() -> str", &cpu_threading);
}
