"""Fixtures for the op tests."""

import pytest


@pytest.fixture(params=["native", "generic"])
def cpu_isa(request, monkeypatch):
    """Run a test with the CPU kernels' AVX-512 loops (where the CPU has them) and with
    the portable loops (WESTAR_CPU_ISA=generic, read at every call)."""
    if request.param == "generic":
        monkeypatch.setenv("WESTAR_CPU_ISA", "generic")
    else:
        monkeypatch.delenv("WESTAR_CPU_ISA", raising=False)
    return request.param
