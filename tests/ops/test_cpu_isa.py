"""How the CPU kernels are built and run: the two sets of loops (AVX-512 and portable)
against each other, the switch between them, and the parallel loops."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import westar_ops
from tests.matrix import assert_close


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


def test_caches_off_same_result():
    """WESTAR_CPU_WORKSPACE_CACHE=0 (no scratch cache, no pooled output blocks; read once
    per process, hence a subprocess) gives the same bits; outputs big enough for the pool."""
    code = (
        "import torch, westar_ops\n"
        "g = torch.Generator().manual_seed(3)\n"
        "pred = torch.randn(2, 400, 400, generator=g)\n"
        "target = torch.rand(2, 400, 400, generator=g)\n"
        "inst = torch.randint(0, 9, (2, 1, 400, 400), generator=g, dtype=torch.int32)\n"
        "for _ in range(3):\n"
        "    x = pred.clone().requires_grad_()\n"
        "    loss = westar_ops.sa_hdn_loss(x, target, inst)\n"
        "    loss.backward()\n"
        "torch.save((loss.detach(), x.grad), __import__('sys').argv[1])\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for flag in ("1", "0"):
            path = os.path.join(tmp, f"out{flag}.pt")
            env = dict(os.environ, WESTAR_CPU_WORKSPACE_CACHE=flag)
            subprocess.run([sys.executable, "-c", code, path], check=True, env=env)
            results.append(torch.load(path))
    (loss_on, grad_on), (loss_off, grad_off) = results
    assert torch.equal(loss_on, loss_off) and torch.equal(grad_on, grad_off)
