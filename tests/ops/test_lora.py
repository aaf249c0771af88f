"""lora_delta_sq_norm against the explicit || scaling * B @ A ||_F^2."""

from __future__ import annotations

import pytest
import torch

import westar_ops
from westar_ops import reference


def explicit(A, B, scaling):
    return (scaling * (B.double() @ A.double())).pow(2).sum()


@pytest.mark.parametrize(
    "r,d_in,d_out", [(1, 1, 1), (1, 7, 13), (4, 16, 9), (8, 33, 5), (3, 2, 64)]
)
@pytest.mark.parametrize("scaling", [1.0, 0.25, -2.0])
def test_against_explicit(rng, r, d_in, d_out, scaling):
    A = torch.randn(r, d_in, generator=rng, dtype=torch.float64)
    B = torch.randn(d_out, r, generator=rng, dtype=torch.float64)
    a1, b1 = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    out = westar_ops.lora_delta_sq_norm(a1, b1, scaling)
    out.backward()
    a2, b2 = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    ref = reference.lora_delta_sq_norm(a2, b2, scaling)
    ref.backward()
    assert out.shape == () and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, explicit(A, B, scaling), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b1.grad, b2.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "dtype,rtol", [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 5e-2)]
)
def test_dtypes(rng, dtype, rtol):
    A = (torch.randn(4, 12, generator=rng) * 0.5).to(dtype)
    B = (torch.randn(10, 4, generator=rng) * 0.5).to(dtype)
    a1, b1 = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    out = westar_ops.lora_delta_sq_norm(a1, b1, 0.5)
    out.backward()
    assert out.dtype == dtype and a1.grad.dtype == dtype and b1.grad.dtype == dtype
    torch.testing.assert_close(out.double(), explicit(A, B, 0.5), rtol=rtol, atol=1e-3)
    a2, b2 = A.double().requires_grad_(True), B.double().requires_grad_(True)
    explicit(a2, b2, 0.5).backward()
    torch.testing.assert_close(a1.grad.double(), a2.grad, rtol=rtol, atol=rtol)
    torch.testing.assert_close(b1.grad.double(), b2.grad, rtol=rtol, atol=rtol)


def test_zero_scaling_and_zero_B(rng):
    A = torch.randn(2, 5, generator=rng, dtype=torch.float64, requires_grad=True)
    B = torch.zeros(3, 2, dtype=torch.float64, requires_grad=True)
    out = westar_ops.lora_delta_sq_norm(A, B, 1.0)
    out.backward()
    assert out.item() == 0.0 and not A.grad.any() and not B.grad.any()
    assert westar_ops.lora_delta_sq_norm(A, torch.randn(3, 2).double(), 0.0).item() == 0.0


def test_non_contiguous(rng):
    A = torch.randn(9, 3, generator=rng, dtype=torch.float64).t()  # (3, 9)
    B = torch.randn(8, 6, generator=rng, dtype=torch.float64)[:, ::2]  # (8, 3)
    torch.testing.assert_close(
        westar_ops.lora_delta_sq_norm(A, B, 1.5), explicit(A, B, 1.5), rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("r,d_in,d_out", [(1, 4, 3), (3, 5, 2)])
def test_gradcheck(rng, r, d_in, d_out):
    A = torch.randn(r, d_in, generator=rng, dtype=torch.float64, requires_grad=True)
    B = torch.randn(d_out, r, generator=rng, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: westar_ops.lora_delta_sq_norm(a, b, 0.7), (A, B), eps=1e-6, atol=1e-6
    )


def test_backward_op_formula(rng):
    """lora_delta_sq_norm_backward: dA = 2 s^2 g (B^T B) A, dB = 2 s^2 g B (A A^T)."""
    A = torch.randn(3, 7, generator=rng, dtype=torch.float64)
    B = torch.randn(5, 3, generator=rng, dtype=torch.float64)
    g = torch.tensor(1.3, dtype=torch.float64)
    da, db = torch.ops.westar_ops.lora_delta_sq_norm_backward(g, A, B, 0.6)
    s2 = 0.36
    torch.testing.assert_close(da, 2 * s2 * 1.3 * (B.T @ B) @ A)
    torch.testing.assert_close(db, 2 * s2 * 1.3 * B @ (A @ A.T))


def test_rank_zero():
    A = torch.zeros(0, 6, dtype=torch.float64, requires_grad=True)
    B = torch.zeros(4, 0, dtype=torch.float64, requires_grad=True)
    out = westar_ops.lora_delta_sq_norm(A, B, 2.0)
    out.backward()
    assert out.item() == 0.0 and A.grad.shape == A.shape and B.grad.shape == B.shape
