"""densepipe.optim.clip_grad_norm_ / clip_grad_value_ against torch.nn.utils."""

from __future__ import annotations

import math

import pytest
import torch

import densepipe.optim as dopt
from optim_probe import DEVICES, SIZES

NORMS = [2.0, 1.0, 3.0, math.inf, -math.inf, "inf"]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-7), torch.float64: dict(rtol=1e-12, atol=1e-15)}


def params_with_grads(dtype=torch.float32, device="cpu", scale=1.0, seed=0):
    """Two identical parameter lists (SIZES plus a transposed matrix), gradients set."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(n,) for n in SIZES] + [(9, 7)]
    grads = [torch.randn(s, generator=g, dtype=torch.float64) * scale for s in shapes]
    grads[-1] = grads[-1].t()  # dense, not contiguous
    out = []
    for _ in range(2):
        ps = [torch.nn.Parameter(torch.zeros_like(gr, dtype=dtype, device=device)) for gr in grads]
        for p, gr in zip(ps, grads, strict=True):
            p.grad = gr.to(device, dtype).clone()
        out.append(ps)
    return out


def assert_grads_close(a, b, **tol):
    for pa, pb in zip(a, b, strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, equal_nan=True, **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("max_norm", [0.5, 1e6], ids=["clips", "no-clip"])
@pytest.mark.parametrize("norm_type", NORMS, ids=str)
def test_clip_grad_norm_matches_torch(norm_type, max_norm, dtype, device):
    theirs, ours = params_with_grads(dtype, device)
    total_t = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    total_o = dopt.clip_grad_norm_(ours, max_norm, norm_type)
    assert total_o.dtype == total_t.dtype and total_o.device == total_t.device and total_o.dim() == 0
    torch.testing.assert_close(total_o, total_t, **TOL[dtype])
    assert_grads_close(theirs, ours, **TOL[dtype])


def test_get_total_norm_matches_torch_across_dtypes():
    (a, _), (b, _) = params_with_grads(torch.float32), params_with_grads(torch.float64, seed=1)
    grads = [p.grad for p in a + b]
    for norm_type in (2.0, math.inf):
        torch.testing.assert_close(dopt.get_total_norm(grads, norm_type),
                                   torch.nn.utils.get_total_norm(grads, norm_type), rtol=1e-5, atol=0)


def test_mixed_dtypes_and_skipped_params():
    (ta, oa), (tb, ob) = params_with_grads(torch.float32), params_with_grads(torch.float64, seed=1)
    ta[2].grad = oa[2].grad = None
    total_t = torch.nn.utils.clip_grad_norm_(ta + tb, 1.0)
    total_o = dopt.clip_grad_norm_(oa + ob, 1.0)
    torch.testing.assert_close(total_o, total_t, rtol=1e-5, atol=0)
    assert oa[2].grad is None
    assert_grads_close(ta + tb, oa + ob, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_norm(bad):
    theirs, ours = params_with_grads()
    for ps in (theirs, ours):
        ps[4].grad[3] = bad
    for clip in (torch.nn.utils.clip_grad_norm_, dopt.clip_grad_norm_):
        with pytest.raises(RuntimeError, match="is non-finite, so it cannot be clipped"):
            clip(theirs if clip is torch.nn.utils.clip_grad_norm_ else ours, 1.0, error_if_nonfinite=True)
    # without the check both scale by the non-finite norm alike
    total_t = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    total_o = dopt.clip_grad_norm_(ours, 1.0)
    torch.testing.assert_close(total_o, total_t, equal_nan=True)
    assert_grads_close(theirs, ours)


def test_empty_and_single_tensor():
    assert torch.equal(dopt.clip_grad_norm_([], 1.0), torch.nn.utils.clip_grad_norm_([], 1.0))
    theirs, ours = params_with_grads()
    total = torch.nn.utils.clip_grad_norm_(theirs[-1], 0.1)
    torch.testing.assert_close(dopt.clip_grad_norm_(ours[-1], 0.1), total)
    torch.testing.assert_close(ours[-1].grad, theirs[-1].grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("clip_value", [0.5, 3.0, -0.25])
def test_clip_grad_value_matches_torch(clip_value, device):
    theirs, ours = params_with_grads(device=device)
    for ps in (theirs, ours):
        ps[5].grad[0] = math.nan
    torch.nn.utils.clip_grad_value_(theirs, clip_value)
    dopt.clip_grad_value_(ours, clip_value)
    assert_grads_close(theirs, ours, rtol=0, atol=0)


def test_norm_type_must_be_positive_or_infinite():
    _, ours = params_with_grads()
    for norm_type in (0.0, -2.0):
        with pytest.raises(RuntimeError, match="norm_type .* is not supported; allowed: a positive number"):
            dopt.clip_grad_norm_(ours, 1.0, norm_type)


def test_sparse_grads_are_refused():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.zeros(4).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        dopt.clip_grad_norm_([p], 1.0)
