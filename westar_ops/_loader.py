"""Loads the compiled library with a clear message when it is missing or mismatched."""

from __future__ import annotations

import importlib
import warnings

import torch


def _load():
    try:
        info = importlib.import_module("westar_ops._build_info")
    except ImportError as err:
        raise ImportError(
            "westar_ops is not built: run `pip install --no-build-isolation .` "
            "(or `python setup.py build_ext --inplace` in a checkout)"
        ) from err
    try:
        importlib.import_module("westar_ops._C")
    except ImportError as err:
        raise ImportError(
            f"westar_ops._C failed to load ({err}). It was built against torch "
            f"{info.TORCH_VERSION}; this is torch {torch.__version__}. Rebuild with "
            "`pip install --no-build-isolation .`"
        ) from err
    if info.TORCH_VERSION.split("+")[0] != torch.__version__.split("+")[0]:
        warnings.warn(
            f"westar_ops was built against torch {info.TORCH_VERSION} but torch "
            f"{torch.__version__} is installed; rebuild if the ops misbehave",
            stacklevel=3,
        )
    if info.WITH_CUDA and torch.version.cuda and info.CUDA_VERSION:
        if info.CUDA_VERSION.split(".")[0] != torch.version.cuda.split(".")[0]:
            raise RuntimeError(
                f"westar_ops was built with CUDA {info.CUDA_VERSION} but torch uses CUDA "
                f"{torch.version.cuda}; rebuild with `pip install --no-build-isolation .`"
            )
    return info


_INFO = _load()


def build_info() -> dict:
    """What the installed extension was built with (and which CPU loops run here:
    "avx512" or "generic"; WESTAR_CPU_ISA=generic forces the portable ones)."""
    import importlib.util

    return {
        "torch_version": _INFO.TORCH_VERSION,
        "with_cuda": _INFO.WITH_CUDA,
        "cuda_version": _INFO.CUDA_VERSION,
        "cuda_arch_list": _INFO.CUDA_ARCH_LIST,
        "triton_available": importlib.util.find_spec("triton") is not None,
        "cpu_isa": torch.ops.westar_ops.cpu_isa(),
        "cpu_threading": torch.ops.westar_ops.cpu_threading(),
    }
