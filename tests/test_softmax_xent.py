"""The softmax cross-entropy op (loss and gradient in one pass) against torch's cross_entropy
and its autograd gradient, its op contracts and its error messages."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from densepipe import ops
from densepipe.ops import DoubleBackwardError
from test_dense import NO_CUDA

_ops = torch.ops.densepipe
DEVICE_DTYPES = [pytest.param("cpu", torch.float32, id="cpu-float32"),
                 pytest.param("cpu", torch.float64, id="cpu-float64"),
                 pytest.param("cuda", torch.float32, id="cuda-float32", marks=[pytest.mark.cuda, NO_CUDA])]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
CLASSES = [1, 2, 7, 8, 9, 63, 64, 65, 4097]  # vector body and tail of a row


def _inputs(rows, classes, dtype, device, seed=0, spread=3.0):
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(rows, classes, generator=gen, dtype=torch.float64) * spread).to(device, dtype)
    t = torch.randint(0, classes, (rows,), generator=gen).to(device)
    return z, t


def _check(z, t):
    """Loss and gradient against torch's cross_entropy and autograd, computed in float64."""
    loss, grad = ops.softmax_cross_entropy(z, t)
    ref = z.detach().double().requires_grad_()
    ref_loss = F.cross_entropy(ref, t, reduction="none")
    (ref_grad,) = torch.autograd.grad(ref_loss.sum(), ref)
    tol = TOL[z.dtype]
    assert loss.dtype == grad.dtype == z.dtype
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("classes", CLASSES)
@pytest.mark.parametrize(("device", "dtype"), DEVICE_DTYPES)
def test_matches_torch(device, dtype, classes):
    _check(*_inputs(37, classes, dtype, device))


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(0, 300), classes=st.integers(1, 130), seed=st.integers(0, 2**16),
       spread=st.sampled_from([0.01, 1.0, 30.0]))
def test_random_shapes(rows, classes, seed, spread):
    _check(*_inputs(rows, classes, torch.float32, "cpu", seed, spread))


@pytest.mark.parametrize(("device", "dtype"), DEVICE_DTYPES)
def test_extreme_logits_stay_finite(device, dtype):
    z = torch.tensor([[1e4, -1e4, 0.0], [-3e4, -3e4, -3e4], [88.0, 89.0, 90.0]], dtype=dtype, device=device)
    t = torch.tensor([1, 0, 2], device=device)
    loss, grad = ops.softmax_cross_entropy(z, t)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert loss[0].item() == pytest.approx(2e4)  # a confident miss costs its margin
    _check(z, t)


def test_gradient_is_the_loss_derivative_scaled_by_the_incoming_gradient():
    z, t = _inputs(9, 5, torch.float64, "cpu")
    z.requires_grad_()
    weights = torch.rand(9, dtype=torch.float64)
    (grad,) = torch.autograd.grad((ops.softmax_cross_entropy(z, t)[0] * weights).sum(), z)
    torch.testing.assert_close(grad, ops.softmax_cross_entropy(z.detach(), t)[1] * weights[:, None])


def test_gradcheck():
    z, t = _inputs(6, 5, torch.float64, "cpu")
    assert torch.autograd.gradcheck(lambda z: ops.softmax_cross_entropy(z, t)[0], (z.requires_grad_(),))


def test_opcheck():
    z, t = _inputs(11, 7, torch.float32, "cpu")
    torch.library.opcheck(_ops.softmax_cross_entropy.default, (z.requires_grad_(), t))


def test_double_backward_is_refused():
    z, t = _inputs(4, 3, torch.float64, "cpu")
    z.requires_grad_()
    (grad,) = torch.autograd.grad(ops.softmax_cross_entropy(z, t)[0].sum(), z, create_graph=False)
    assert grad.shape == z.shape
    with pytest.raises(DoubleBackwardError, match="double backward"):
        torch.autograd.grad(ops.softmax_cross_entropy(z, t)[0].sum(), z, create_graph=True)


@pytest.mark.parametrize(("logits", "target", "message"), [
    (torch.zeros(3, 4), torch.tensor([0, 4, 1]), "row 1 has class id 4, outside 0..3 \\(4 classes\\)"),
    (torch.zeros(3, 4), torch.tensor([0, -1, 1]), "row 1 has class id -1"),
    (torch.zeros(4), torch.tensor([0, 1, 2, 3]), "logits must be 2-D \\(rows, classes\\), got 1-D"),
    (torch.zeros(3, 0), torch.tensor([0, 0, 0]), "logits have no classes"),
    (torch.zeros(3, 4), torch.tensor([0, 1]), "one class id per row \\(3\\), got shape \\[2\\]"),
    (torch.zeros(3, 4), torch.tensor([0.0, 1.0, 2.0]), "target must be int64 class ids, got Float"),
    (torch.zeros(3, 4, dtype=torch.float16), torch.tensor([0, 1, 2]), "on CPU allowed: float32, float64"),
])
def test_clear_errors(logits, target, message):
    with pytest.raises(RuntimeError, match=message):
        ops.softmax_cross_entropy(logits, target)
