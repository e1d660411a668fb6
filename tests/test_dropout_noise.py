"""The dropout_noise op (dropout's multiplicative noise on the CPU): its values, statistics,
reproducibility, independence from the thread count, and its errors."""

from __future__ import annotations

import pytest
import torch

from densepipe import ops

_ops = torch.ops.densepipe
SIZES = [1, 7, 8, 9, 63, 64, 65, 4097]


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_values_and_drop_share(p):
    noise = ops.dropout_noise(torch.empty(1000, 1000), p)
    zero, kept = noise.unique().tolist()
    assert zero == 0.0 and kept == pytest.approx(1 / (1 - p))
    share = (noise == 0).double().mean().item()
    assert abs(share - p) < 5 * (p * (1 - p) / noise.numel()) ** 0.5  # five binomial standard deviations
    assert noise.mean().item() == pytest.approx(1.0, abs=0.01)      # dropout keeps the expected value


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_and_layout(size, dtype):
    x = torch.empty(3, size, dtype=dtype).t()  # a transposed input: the noise comes out contiguous
    noise = ops.dropout_noise(x, 0.5)
    assert noise.shape == x.shape and noise.dtype == dtype and noise.is_contiguous()


def test_neighbours_are_independent():
    kept = (ops.dropout_noise(torch.empty(2_000_000), 0.5) > 0).double()
    for lag in (1, 2, 31, 32, 33):
        corr = torch.corrcoef(torch.stack([kept[:-lag], kept[lag:]]))[0, 1].item()
        assert abs(corr) < 0.005, (lag, corr)


def test_reproducible_from_the_torch_generator():
    x = torch.empty(300, 200)
    torch.manual_seed(7)
    first, second = ops.dropout_noise(x, 0.3), ops.dropout_noise(x, 0.3)
    torch.manual_seed(7)
    assert torch.equal(ops.dropout_noise(x, 0.3), first)
    assert not torch.equal(first, second)  # each call draws anew
    gen = torch.Generator().manual_seed(7)
    own = ops.dropout_noise(x, 0.3, gen)
    assert torch.equal(own, ops.dropout_noise(x, 0.3, torch.Generator().manual_seed(7)))


def test_same_noise_at_any_thread_count(threads):
    x = torch.empty(1000, 300)  # several parallel chunks
    results = []
    for count in (1, 2):
        threads(count)
        results.append(ops.dropout_noise(x, 0.4, torch.Generator().manual_seed(3)))
    assert torch.equal(*results)


def test_rate_zero_keeps_everything():
    assert torch.equal(ops.dropout_noise(torch.empty(50, 9), 0.0), torch.ones(50, 9))


def test_a_constant_to_autograd():
    x = torch.randn(20, 5, requires_grad=True)
    noise = ops.dropout_noise(x, 0.5)
    assert not noise.requires_grad
    (grad,) = torch.autograd.grad((x * noise).sum(), x)
    assert torch.equal(grad, noise)


def test_opcheck():
    torch.library.opcheck(_ops.dropout_noise.default, (torch.empty(11, 7), 0.25),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize(("x", "p", "message"), [
    (torch.empty(4), 1.0, "p \\(the share dropped\\) must be in \\[0, 1\\), got 1"),
    (torch.empty(4), -0.1, "must be in \\[0, 1\\), got -0.1"),
    (torch.empty(4, dtype=torch.int64), 0.5, "x has dtype Long; on CPU allowed: float32, float64"),
])
def test_clear_errors(x, p, message):
    with pytest.raises(RuntimeError, match=message):
        ops.dropout_noise(x, p)
