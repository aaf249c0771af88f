"""How the CPU kernels are built and run: the two sets of loops (AVX-512 and portable)
against each other, the switch between them, and the parallel loops."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import westar_ops
from tests.ops.helpers import assert_close


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_generic_switch(monkeypatch):
    monkeypatch.setenv("WESTAR_CPU_ISA", "generic")
    assert torch.ops.westar_ops.cpu_isa() == "generic"
    assert westar_ops.build_info()["cpu_isa"] == "generic"


def test_avx512_used_where_available(monkeypatch):
    monkeypatch.delenv("WESTAR_CPU_ISA", raising=False)
    needed = {"avx512f", "avx512vl", "avx512bw", "avx512dq", "bmi2", "popcnt"}
    if not needed <= _cpu_flags():
        pytest.skip("this CPU has no AVX-512")
    assert torch.ops.westar_ops.cpu_isa() == "avx512"


def test_parallel_loops_compiled_for_torchs_backend():
    """With torch's OpenMP backend, at::parallel_for only runs in parallel in code built
    with -fopenmp; without it every 'parallel' loop of the kernels ran on one thread."""
    if "backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch's intra-op backend is not OpenMP")
    assert westar_ops.build_info()["cpu_threading"] == "openmp"


def _loss_and_grad(pred, target, instances, valid, stats_grad):
    leaf = pred.clone().requires_grad_()
    loss = westar_ops.sa_hdn_loss(leaf, target, instances, valid, stats_grad=stats_grad)
    loss.backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("stats_grad", ["full", "scale", "none"])
def test_paths_agree(monkeypatch, stats_grad):
    """Big and small contexts, runs that end mid-vector, NaN targets, odd width: the
    AVX-512 loops (compaction, selection, sums, backward) against the portable ones."""
    g = torch.Generator().manual_seed(7)
    b, h, w = 3, 97, 131  # odd sizes: vector tails everywhere
    pred = torch.randn(b, h, w, generator=g)
    target = torch.rand(b, h, w, generator=g) * 3 + 0.1
    target[0, 5, 7:40] = float("nan")
    coarse = torch.randint(1, 5, (b, 1, 4, 4), generator=g)
    coarse = coarse.repeat_interleave(25, 2).repeat_interleave(33, 3)[:, :, :h, :w]
    fine = torch.randint(0, 200, (b, 1, h, w), generator=g)  # many tiny contexts
    instances = torch.cat([coarse, fine], 1).to(torch.int32)
    valid = torch.rand(b, h, w, generator=g) > 0.15
    monkeypatch.setenv("WESTAR_CPU_ISA", "generic")
    loss_g, grad_g = _loss_and_grad(pred, target, instances, valid, stats_grad)
    monkeypatch.delenv("WESTAR_CPU_ISA")
    loss_n, grad_n = _loss_and_grad(pred, target, instances, valid, stats_grad)
    assert torch.isfinite(loss_n)
    assert_close(loss_n, loss_g, "loss")
    assert_close(grad_n, grad_g, "grad")
    # Repeatable bit for bit on the same path.
    loss_n2, grad_n2 = _loss_and_grad(pred, target, instances, valid, stats_grad)
    assert torch.equal(loss_n, loss_n2) and torch.equal(grad_n, grad_n2)
