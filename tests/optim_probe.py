"""Shared pieces of the optimizer tests: a small seeded model whose parameter sizes
hit the kernels' vector body and tail, a training loop, and state comparison."""

from __future__ import annotations

import pytest
import torch
from torch import nn

# 1..65: tails and bodies of 8- and 16-lane vectors; 4097: many vectors plus a tail.
SIZES = (1, 7, 8, 9, 63, 64, 65, 4097)

# assert_close tolerances after 50+ steps of both optimizers on their own trajectories:
# the kernels round like torch's single-tensor code op by op, except where torch's
# CPU kernels fuse a multiply-add, so float32 runs drift apart by a few ulps per step.
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-11, atol=1e-13)}

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA device")),
]


class Probe(nn.Module):
    """One weight vector per size in SIZES, each a tanh unit on fixed inputs, plus a
    7x9 matrix stored transposed (dense but not contiguous). The loss is the units'
    squared errors plus a pull of every weight towards a fixed target, so each
    gradient depends on the parameters and no coordinate sits at a zero gradient
    (where sign-like updates would turn rounding into chaos)."""

    def __init__(self, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.ws = nn.ParameterList(
            [nn.Parameter((torch.randn(n, generator=g, dtype=torch.float64) * 0.5).to(device, dtype))
             for n in SIZES])
        self.m = nn.Parameter(torch.randn(9, 7, generator=g, dtype=torch.float64).to(device, dtype).t())
        xs = [torch.randn(4, n, generator=g, dtype=torch.float64) / n**0.5 for n in SIZES]  # 4 samples each
        for i, x in enumerate(xs):
            self.register_buffer(f"x{i}", x.to(device, dtype))
            target = torch.randn(SIZES[i], generator=g, dtype=torch.float64)
            self.register_buffer(f"t{i}", target.to(device, dtype))
        self.register_buffer("xm", torch.randn(4, 9, generator=g, dtype=torch.float64).to(device, dtype))

    def loss(self) -> torch.Tensor:
        total = sum(((getattr(self, f"x{i}") @ w).tanh() - 0.5).pow(2).sum()
                    + (w - getattr(self, f"t{i}")).pow(2).sum() for i, w in enumerate(self.ws))
        return total + (self.xm @ self.m.t()).tanh().pow(2).sum() + (self.m - 1).pow(2).sum()


def train(model: Probe, opt: torch.optim.Optimizer, steps: int, sched=None, skip=None) -> None:
    """steps of zero_grad / backward / step; skip(i) names parameters whose grad is
    set to None at step i (they must then be left alone)."""
    for i in range(steps):
        opt.zero_grad()
        model.loss().backward()
        for p in (skip(i) if skip else ()):
            p.grad = None
        opt.step()
        if sched is not None:
            sched.step()


def state_tol(tol: dict, reference: torch.Tensor) -> dict:
    """State tensors are running sums (momentum, averages): an entry near zero carries
    the rounding of the whole sum, so the absolute tolerance scales with the largest
    entry (10 x rtol of it)."""
    scale = reference.abs().max().item() if reference.numel() else 0.0
    return dict(rtol=tol["rtol"], atol=tol["atol"] + 10 * tol["rtol"] * scale)


def assert_same(model_a: Probe, opt_a, model_b: Probe, opt_b, tol: dict) -> None:
    """Parameters and every state tensor agree; state keys agree exactly."""
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, **tol)
        sa, sb = opt_a.state.get(pa, {}), opt_b.state.get(pb, {})
        assert sorted(sa) == sorted(sb), (sorted(sa), sorted(sb))
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key], **state_tol(tol, sa[key]),
                                       msg=lambda m, k=key: f"state {k}: {m}")
