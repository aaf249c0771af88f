"""CPU benchmarks: the C++ kernels against the plain-PyTorch reference.

Not part of the test run (pytest collects tests/ only). Run with

    python -m pytest benchmarks/test_bench_cpu.py --benchmark-only

Each case times forward + backward of one loss on a seeded workload from
``benchmarks/workloads.py``. ``benchmarks/cpu_table.py`` prints the same comparison as a
markdown table (medians, ratios, peak memory).
"""

from __future__ import annotations

import pytest
import torch
import workloads as W

import westar_ops
from westar_ops import reference

pytest.importorskip("pytest_benchmark")

SA_HDN_WORKLOADS = {
    "instances64": lambda: W.instance_workload(),
    "instances64-sparse-ids": lambda: W.instance_workload(sparse_ids=True),
    "grid-hdn": lambda: W.grid_workload(),
}
IMPLS = {
    "kernel": westar_ops.sa_hdn_loss,
    "reference": reference.sa_hdn_loss,
}


@pytest.fixture(scope="module", params=list(SA_HDN_WORKLOADS))
def sa_hdn_workload(request):
    return SA_HDN_WORKLOADS[request.param]()


def _sa_hdn_step(fn, wl):
    pred = wl.pred.clone().requires_grad_()
    fn(pred, wl.target, wl.instances, wl.valid).backward()
    return pred.grad


@pytest.mark.parametrize("impl", list(IMPLS))
def test_sa_hdn_forward_backward(benchmark, sa_hdn_workload, impl):
    fn = IMPLS[impl]
    benchmark.group = f"sa_hdn {sa_hdn_workload.name}"
    rounds = 15 if impl == "kernel" else 3
    grad = benchmark.pedantic(
        _sa_hdn_step, args=(fn, sa_hdn_workload), rounds=rounds, warmup_rounds=1
    )
    assert torch.isfinite(grad).all()


@pytest.fixture(scope="module")
def ordinal_workload():
    return W.ordinal_workload()


ORDINAL_IMPLS = {
    "kernel": westar_ops.ordinal_ranking_loss,
    "reference": reference.ordinal_ranking_loss,
}


@pytest.mark.parametrize("impl", list(ORDINAL_IMPLS))
def test_ordinal_forward_backward(benchmark, ordinal_workload, impl):
    fn = ORDINAL_IMPLS[impl]
    wl = ordinal_workload
    benchmark.group = f"ordinal {wl.name}"

    def step():
        pred = wl.pred.clone().requires_grad_()
        fn(pred, wl.pairs, wl.labels).backward()
        return pred.grad

    grad = benchmark.pedantic(step, rounds=20, warmup_rounds=2)
    assert torch.isfinite(grad).all()
