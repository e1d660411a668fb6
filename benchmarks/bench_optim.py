"""Fused optimizer steps: densepipe.optim against torch.optim, side by side in one run.

Two parameter sets: "few large" (the weights and biases of an MLP with ~8.4M
parameters) and "many small" (200 tensors of 1K-4K elements). For every
optimizer: one step of ours, of torch's for-loop (foreach=False, torch's CPU
default), foreach=True and fused=True (where torch has it on this device; RMSprop
has none anywhere, Adagrad none on CUDA).

The bound is memory bandwidth: an optimizer step must stream its state through
memory once, so each optimizer's bytes per parameter (e.g. Adam reads p, g, m, v
and writes p, m, v: 7 x 4 bytes) over the time gives its GB/s, compared with the
GB/s of an in-place streaming op (addcmul_: 3 reads + 1 write) over a large tensor.
"many small" fits in the last-level cache (0.5M params: 10-14 MB with state), so
its GB/s may pass the DRAM bound; what counts there is the per-tensor overhead.

    python benchmarks/bench_optim.py [--device cuda] [--rounds 30] [--only adam,sgd]
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time
from collections.abc import Callable

import torch

import densepipe.optim as dopt

# name -> (ours, torch's, constructor kwargs, state tensors read+written per param besides p and g)
OPTIMIZERS: dict[str, tuple[type, type, dict, int]] = {
    "sgd": (dopt.SGD, torch.optim.SGD, dict(lr=1e-3, momentum=0.9), 1),          # momentum_buffer
    "adagrad": (dopt.Adagrad, torch.optim.Adagrad, dict(lr=1e-2), 1),            # sum
    "rmsprop": (dopt.RMSprop, torch.optim.RMSprop, dict(lr=1e-3), 1),            # square_avg
    "adam": (dopt.Adam, torch.optim.Adam, dict(lr=1e-3), 2),                     # exp_avg, exp_avg_sq
    "adamw": (dopt.AdamW, torch.optim.AdamW, dict(lr=1e-3), 2),
    "nadam": (dopt.NAdam, torch.optim.NAdam, dict(lr=1e-3), 2),                  # exp_avg, exp_avg_sq
    "adamax": (dopt.Adamax, torch.optim.Adamax, dict(lr=1e-3), 2),               # exp_avg, exp_inf
}


def bytes_per_param(n_state: int, itemsize: int = 4) -> int:
    # reads: p, g and each state tensor; writes: p and each state tensor
    return (2 + n_state + 1 + n_state) * itemsize


def few_large(device: str) -> list[torch.Tensor]:
    widths = [1024, 2048, 2048, 1024]  # MLP layer widths: 3 Linear layers, ~8.4M params
    g = torch.Generator().manual_seed(0)
    shapes = [s for i, o in zip(widths, widths[1:], strict=False) for s in ((o, i), (o,))]
    return [torch.randn(s, generator=g).to(device) for s in shapes]


def many_small(device: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(1024, 4097, (200,), generator=g).tolist()  # 200 tensors of 1K-4K elements
    return [torch.randn(n, generator=g).to(device) for n in sizes]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


STATS = {"min": min, "median": statistics.median}


def interleaved_ms(fns: dict[str, Callable[[], object]], device: str, rounds: int, stat: str = "min",
                   warmup: int = 3) -> dict[str, float]:
    """Wall time of one call of each fn in ms: the best (or median) of `rounds`. The
    fns take turns round by round, so load that comes and goes on a shared machine
    hits them all alike; the best round is the one least disturbed by it."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: STATS[stat](v) * 1e3 for k, v in times.items()}


class StreamBound:
    """addcmul_ (3 reads + 1 write per element) over tensors far larger than cache."""

    def __init__(self, device: str, n: int = 1 << 24) -> None:  # 16M elements: 64 MB per tensor
        self.a, self.b, self.c = (torch.rand(n, device=device) for _ in range(3))
        self.nbytes = 4 * 4 * n

    def __call__(self) -> None:
        self.a.addcmul_(self.b, self.c, value=1e-3)


def make_optimizer(cls: type, kwargs: dict, tensors: list[torch.Tensor]) -> torch.optim.Optimizer | None:
    """The optimizer over copies of tensors with gradients set, stepped once (state
    allocated); None where torch has no such variant on this device (fused=True)."""
    params = [torch.nn.Parameter(t.clone()) for t in tensors]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2
    try:
        opt = cls(params, **kwargs)
        opt.step()
    except RuntimeError:
        if kwargs.get("fused"):
            return None
        raise
    return opt


def variants(name: str) -> dict[str, tuple[type, dict]]:
    ours, theirs, kw, _ = OPTIMIZERS[name]
    out = {"ours": (ours, kw), "for-loop": (theirs, {**kw, "foreach": False}),
           "foreach": (theirs, {**kw, "foreach": True})}
    if "fused" in inspect.signature(theirs).parameters:
        out["fused"] = (theirs, {**kw, "fused": True})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--rounds", type=int, default=30, help="timed steps per variant")
    ap.add_argument("--stat", default="min", choices=sorted(STATS), help="which of the rounds to report")
    ap.add_argument("--only", default=",".join(OPTIMIZERS), help="comma-separated optimizers")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    torch.manual_seed(0)
    bound = StreamBound(args.device)
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"times: ms of one step, {args.stat} of {args.rounds} interleaved rounds; "
          "bound: addcmul_ GB/s timed alongside each few-large row")
    cols = ["for-loop", "foreach", "fused"]
    head = (f"{'set':<10} {'optimizer':<8} {'B/param':>7} {'ours ms':>8} "
            + " ".join(f"{c + ' ms':>11}" for c in cols) + " "
            + " ".join(f"{'ours/' + c:>13}" for c in cols)
            + f" {'ours GB/s':>9} {'bound GB/s':>10} {'% bound':>7}")
    print(head)
    print("-" * len(head))
    best_bound = 0.0  # GB/s
    for set_name, make in (("few large", few_large), ("many small", many_small)):
        tensors = make(args.device)
        numel = sum(t.numel() for t in tensors)
        # The bound takes turns with the "few large" steps (all stream from DRAM); it would
        # evict "many small" (cache-resident) between its steps, so those use the best bound seen.
        timed_bound = {"bound": bound} if set_name == "few large" else {}
        for name in args.only.split(","):
            per_param = bytes_per_param(OPTIMIZERS[name][3])
            made = {v: make_optimizer(cls, kw, tensors) for v, (cls, kw) in variants(name).items()}
            opts = {v: o for v, o in made.items() if o is not None}
            ms = interleaved_ms({**{v: o.step for v, o in opts.items()}, **timed_bound},
                                args.device, args.rounds, args.stat)
            del made, opts
            if "bound" in ms:
                best_bound = max(best_bound, bound.nbytes / (ms["bound"] * 1e-3) / 1e9)
            bound_gbs = bound.nbytes / (ms["bound"] * 1e-3) / 1e9 if "bound" in ms else best_bound
            gbs = per_param * numel / (ms["ours"] * 1e-3) / 1e9
            times = " ".join(f"{ms[c]:>11.3f}" if c in ms else f"{'-':>11}" for c in cols)
            ratios = " ".join(f"{ms['ours'] / ms[c]:>13.2f}" if c in ms else f"{'-':>13}" for c in cols)
            print(f"{set_name:<10} {name:<8} {per_param:>7} {ms['ours']:>8.3f} {times} {ratios} "
                  f"{gbs:>9.1f} {bound_gbs:>10.1f} {100 * gbs / bound_gbs:>6.0f}%")
        print(f"{'':<10} ({numel / 1e6:.2f}M params in {len(tensors)} tensors)")


if __name__ == "__main__":
    main()
