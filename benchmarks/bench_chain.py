"""Stacks of dense layers, forward + backward: the dense chain op (one autograd node for the
stack) against the same fused layers called one by one and against eager nn.Linear +
activation, side by side in one process.

The stacks are tabular-model sizes, where per-layer autograd bookkeeping is a visible share
of a step: the training benchmark's MLP (64 -> 256 -> 128 -> 10, batch 128), a deep narrow
stack and a wider one. Rounds are interleaved (one call of each side per round) and the
minimum over rounds is reported; ratios are time / chain's time.

    python benchmarks/bench_chain.py [--threads 1] [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from densepipe import ops
from densepipe.nn.activations import ACTIVATIONS

STACKS = {  # name -> (batch rows, widths from input to output, hidden activation)
    "bench MLP": (128, [64, 256, 128, 10], "relu"),
    "deep narrow": (256, [32] + [64] * 8 + [1], "gelu"),
    "wide": (512, [128, 1024, 1024, 10], "silu"),
}


def build(rows: int, widths: list[int], act: str, device: str):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, widths[0], generator=gen).to(device)
    pairs = list(zip(widths, widths[1:], strict=False))
    acts = [act] * (len(pairs) - 1) + ["linear"]
    linears = [nn.Linear(i, o).to(device) for i, o in pairs]
    ws = [lin.weight.detach().clone().requires_grad_() for lin in linears]
    bs = [lin.bias.detach().clone().requires_grad_() for lin in linears]

    def chain():
        ops.dense_chain(x, ws, bs, acts, [0.0] * len(ws)).sum().backward()

    def per_layer():
        h = x
        for w, b, a in zip(ws, bs, acts, strict=True):
            h = ops.dense(h, w, b, a)
        h.sum().backward()

    def eager():
        h = x
        for lin, a in zip(linears, acts, strict=True):
            h = ACTIVATIONS[a].reference(lin(h), 0.0)
        h.sum().backward()

    return {"chain": chain, "per layer": per_layer, "eager": eager}


def timed(fns: dict, device: str, rounds: int, calls: int) -> dict[str, float]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    best = dict.fromkeys(fns, float("inf"))
    for fn in fns.values():  # warm-up: allocator, kernels, autograd graph caches
        for _ in range(10):
            fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            best[name] = min(best[name], (time.perf_counter() - t0) / calls)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=50, help="calls per side per round")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} thread(s); "
          f"forward+backward, min over {args.rounds} interleaved rounds")
    print(f"{'stack':<12} {'layers':>6} {'chain us':>9} {'per layer us':>13} {'eager us':>9} "
          f"{'per layer/chain':>16} {'eager/chain':>12}")
    for name, (rows, widths, act) in STACKS.items():
        t = timed(build(rows, widths, act, args.device), args.device, args.rounds, args.calls)
        us = {k: v * 1e6 for k, v in t.items()}
        print(f"{name:<12} {len(widths) - 1:>6} {us['chain']:>9.1f} {us['per layer']:>13.1f} {us['eager']:>9.1f} "
              f"{t['per layer'] / t['chain']:>15.2f}x {t['eager'] / t['chain']:>11.2f}x")


if __name__ == "__main__":
    main()
