"""Fused dense + activation against eager PyTorch, side by side in one process.

For every shape (M, K, N) and every fused activation:
  forward (no grad)  ours: densepipe.ops.dense     eager: F.linear + the activation
                     bounds: torch.mm (x @ W^T, BLAS) and torch.addmm (b + x @ W^T), and
                     "own GEMM": ops.dense with no bias and no activation, i.e. the GEMM
                     our op runs (oneDNN, our AVX-512 kernel or BLAS, see csrc/gemm_cpu.cpp)
                     and nothing else
  forward+backward   grads for x, W and b, both sides through autograd
                     bounds: the three GEMMs any dense layer runs (x W^T, g W, g^T x),
                     on BLAS (what eager runs) and on our GEMM
On CUDA (`--device cuda`) and with `--compile` on CPU, torch.compile of the eager
version runs too. Calls are interleaved round by round, so a load change on a shared
machine hits every side alike; each number is the median (or --stat min) over rounds.

    python benchmarks/bench_dense.py                  # CPU, float32
    python benchmarks/bench_dense.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from densepipe import ops
from densepipe.nn.activations import ACTIVATIONS, FUSED

SHAPES = [(256, 784, 512), (1024, 512, 512), (4096, 1024, 1024)]  # (M, K, N)
FWD_GEMM_GOAL = 1.10  # fused forward / GEMM alone (torch.mm and our own GEMM), at most
FWD_EAGER_GOAL = 1.00  # fused forward / eager forward, at most
FWDBWD_GOAL = 1.20  # eager / fused forward+backward, at least ...
FWDBWD_GOAL_ACTS = ("gelu", "silu", "sigmoid", "tanh", "elu")  # ... for these activations
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def keep_freed_memory() -> None:
    """Tells glibc's malloc to keep freed memory instead of returning it to the OS, so
    that a fresh output tensor does not fault its pages in again (on a VM each fault
    is expensive, and which side hits them depends on allocation order, not on code)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameters from <malloc.h>
    libc.mallopt(m_trim_threshold, 1 << 30)
    libc.mallopt(m_mmap_threshold, 1 << 30)


def _sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


STATS = {"median": statistics.median, "min": min}  # min: the least disturbed round on a busy machine


def time_interleaved(fns: dict[str, Callable[[], object]], device: str, budget_s: float, stat: str = "median",
                     min_rounds: int = 7, max_rounds: int = 200) -> dict[str, float]:
    """Seconds per call of each function (median or min over rounds); one call of each per round."""
    sync = _sync(device)
    for fn in fns.values():  # warm-up: allocator, MKL buffers, compiled graphs
        for _ in range(3):
            fn()
    sync()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    names = list(fns)
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < budget_s):
        order = names[rounds % len(names):] + names[:rounds % len(names)]  # no side always runs first
        for name in order:
            fn = fns[name]
            t0 = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: STATS[stat](s) for name, s in samples.items()}


def make_case(shape, activation: str, device: str, dtype: torch.dtype, compiled: bool):
    m, k, n = shape
    act = ACTIVATIONS[activation]
    alpha = act.default_alpha
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(m, k, generator=gen).to(device, dtype)  # (M, K)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(device, dtype)  # (N, K)
    b = torch.randn(n, generator=gen).to(device, dtype)  # (N,)
    gy = torch.randn(m, n, generator=gen).to(device, dtype)  # (M, N)
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))

    def eager(x_, w_, b_):
        return act.reference(F.linear(x_, w_, b_), alpha)

    def fused(x_, w_, b_):
        return ops.dense(x_, w_, b_, activation, alpha)

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn(x, w, b)
        return run

    def fwd_bwd(fn):
        def run():
            return torch.autograd.grad(fn(xg, wg, bg), (xg, wg, bg), gy)
        return run

    fwd = {"mm": no_grad(lambda x_, w_, b_: torch.mm(x_, w_.t())),
           "addmm": no_grad(lambda x_, w_, b_: torch.addmm(b_, x_, w_.t())),
           "own_gemm": no_grad(lambda x_, w_, b_: ops.dense(x_, w_)),
           "fused": no_grad(fused), "eager": no_grad(eager)}
    fb = {"fused": fwd_bwd(fused), "eager": fwd_bwd(eager)}
    if compiled:
        # Each case compiles a fresh closure, grad mode on and off: without a reset dynamo's
        # per-code-object recompile limit is reached after a few cases.
        torch._dynamo.reset()
        fwd["compiled"] = no_grad(torch.compile(eager, fullgraph=True))
        fb["compiled"] = fwd_bwd(torch.compile(eager, fullgraph=True))
    return fwd, fb


def gemm3(shape, device: str, dtype: torch.dtype):
    """The three GEMMs of a dense layer's forward and backward, nothing else: on BLAS
    (torch.mm) and on our op's GEMM (ops.dense without bias and activation)."""
    m, k, n = shape
    x, w, g = (torch.randn(*s, device=device, dtype=dtype) for s in ((m, k), (n, k), (m, n)))

    def blas():
        torch.mm(x, w.t())
        torch.mm(g, w)
        torch.mm(g.t(), x)

    def own():
        ops.dense(x, w)  # x W^T
        ops.dense(g, w.t())  # g W
        ops.dense(g.t(), x.t())  # g^T x
    return {"blas3": blas, "own3": own}


def flag(ok: bool) -> str:
    return "ok" if ok else "MISS"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--compile", action="store_true", help="also torch.compile the eager version "
                        "(always on with --device cuda)")
    parser.add_argument("--activations", nargs="*", default=list(FUSED), choices=list(FUSED))
    parser.add_argument("--shapes", nargs="*", type=int, default=None,
                        help="indices into SHAPES to run (default: all)")
    parser.add_argument("--budget", type=float, default=1.5, help="seconds of timing per case")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc malloc keeps freed memory (both sides): no page faults for new outputs")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: leave as it is)")
    parser.add_argument("--stat", default="median", choices=sorted(STATS),
                        help="statistic over rounds (min when other work shares the cores)")
    args = parser.parse_args()
    device, dtype = args.device, DTYPES[args.dtype]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        keep_freed_memory()
    compiled = args.compile or device == "cuda"
    goals = device == "cpu"

    print(f"torch {torch.__version__}  device {device}  dtype {args.dtype}  "
          f"threads {torch.get_num_threads()} ({'set by --threads' if args.threads else 'unchanged'})  "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}  statistic {args.stat} over rounds"
          f"{'  malloc keeps freed memory' if args.keep_freed_memory else ''}")
    if device == "cuda":
        print(f"gpu {torch.cuda.get_device_name()}")
    print(f"load average at start {os.getloadavg()[0]:.2f} (other work on this machine skews times)")
    cols = ["M,K,N", "act", "fwd ours/mm", "ours/addmm", "ours/owngemm", "ours/eager",
            "fb eager/ours", "ours/own3gemm", "eager/3mm"]
    if compiled:
        cols += ["fwd ours/compiled", "fb compiled/ours"]
    cols += ["load", "goals"]  # load: 1-min load average after the case, above ~1 it is skewed
    print("  ".join(f"{c:>13}" for c in cols))
    misses = []
    shapes = SHAPES if args.shapes is None else [SHAPES[i] for i in args.shapes]
    for shape in shapes:
        bounds = gemm3(shape, device, dtype)
        for activation in args.activations:
            fwd_fns, fb_fns = make_case(shape, activation, device, dtype, compiled)
            f = time_interleaved(fwd_fns, device, args.budget, args.stat)
            fb = time_interleaved({**fb_fns, **bounds}, device, args.budget, args.stat)
            row = [f["fused"] / f["mm"], f["fused"] / f["addmm"], f["fused"] / f["own_gemm"],
                   f["fused"] / f["eager"], fb["eager"] / fb["fused"], fb["fused"] / fb["own3"],
                   fb["eager"] / fb["blas3"]]
            if compiled:
                row += [f["fused"] / f["compiled"], fb["compiled"] / fb["fused"]]
            verdict = ""
            if goals:
                checks = {"fwd<=1.10gemm": max(row[0], row[2]) <= FWD_GEMM_GOAL,
                          "fwd<=eager": row[3] <= FWD_EAGER_GOAL}
                if activation in FWDBWD_GOAL_ACTS:
                    checks["fb>=1.2x"] = row[4] >= FWDBWD_GOAL
                verdict = " ".join(f"{k}:{flag(v)}" for k, v in checks.items())
                misses += [f"{shape} {activation} {k}" for k, v in checks.items() if not v]
            label = ",".join(map(str, shape))
            print(f"{label:>13}  {activation:>13}  " + "  ".join(f"{r:13.3f}" for r in row)
                  + f"  {os.getloadavg()[0]:13.2f}  {verdict}", flush=True)
        print(f"{'':>13}  {'3 GEMMs':>13}  BLAS {fb['blas3'] * 1e3:.3f} ms, own {fb['own3'] * 1e3:.3f} ms"
              f" (BLAS/own {fb['blas3'] / fb['own3']:.2f}); eager/3mm is what fusion alone could gain")
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    if goals:
        print(f"goals missed: {len(misses)}" + "".join(f"\n  {m}" for m in misses))


if __name__ == "__main__":
    main()
