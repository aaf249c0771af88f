"""Helpers shared by the Triton kernels of westar_ops (math of csrc/include/westar/*.h)."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

__all__ = ["device_guard", "sign", "skey", "from_skey"]


def device_guard(t: torch.Tensor):
    """Launch on the tensor's CUDA device (multi-GPU); nothing on the CPU (interpreter)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


@triton.jit
def sign(x):
    """torch.sign / westar::sign: -1, 0 or +1, NaN stays NaN."""
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, tl.where(x == 0, 0.0, x))).to(x.dtype)


@triton.jit
def skey(x, BITS: tl.constexpr):
    """Signed order-preserving key of a float: a < b (floats, -0 < +0, NaN on top) iff
    skey(a) < skey(b) as signed integers. It is westar::ordered_key with the top bit
    flipped (ordered_key = skey ^ sign bit), so the digits below the top one agree."""
    if BITS == 64:
        i = x.to(tl.int64, bitcast=True)
        return i ^ ((i >> 63) & 0x7FFFFFFFFFFFFFFF)
    else:
        i = x.to(tl.int32, bitcast=True)
        return i ^ ((i >> 31) & 0x7FFFFFFF)


@triton.jit
def from_skey(k, BITS: tl.constexpr):
    """Inverse of skey (the map is an involution on the bits)."""
    if BITS == 64:
        i = k ^ ((k >> 63) & 0x7FFFFFFFFFFFFFFF)
        return i.to(tl.float64, bitcast=True)
    else:
        i = k ^ ((k >> 31) & 0x7FFFFFFF)
        return i.to(tl.float32, bitcast=True)
