"""One forward + backward of the fused dense op per activation and dtype on CUDA,
small enough to run under compute-sanitizer:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python tests/cuda_smoke.py
    compute-sanitizer --tool racecheck python tests/cuda_smoke.py

(without the caching allocator every tensor is its own allocation, so memcheck
sees an access just past a tensor's end).

Shapes cover the 16-byte vector body, the scalar tails, misaligned pointers and
both the cuBLASLt epilogue and the generic path. Exits non-zero if any result
is off from plain PyTorch; compute-sanitizer reports memory errors itself.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

from densepipe.nn.activations import ACTIVATIONS, FUSED

TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}  # relative to rms + |ref|
SHAPES = [(65, 33, 64), (9, 7, 63), (1, 8, 9)]  # (rows, in_features, out_features)


def max_error(ours: torch.Tensor, ref: torch.Tensor, tol: float) -> float:
    """max |ours - ref| / (tol * (rms(ref) + |ref|)): above 1 is a failure."""
    ours, ref = ours.float(), ref.float()
    scale = ref.pow(2).mean().sqrt().clamp_min(1e-6)
    return ((ours - ref).abs() / (tol * (scale + ref.abs()))).max().item()


def check(activation: str, dtype: torch.dtype, shape, offset: int) -> float:
    m, k, n = shape
    g = torch.Generator(device="cuda").manual_seed(m + k + n)

    def make(*size, scale=1.0):
        # `offset` elements into a fresh buffer: offset 1 defeats 16-byte alignment.
        count = torch.Size(size).numel()
        buf = torch.empty(count + offset, dtype=dtype, device="cuda")
        t = buf[offset:].view(size)
        t.copy_(torch.randn(size, generator=g, device="cuda") * scale)
        return t

    x, w, b, gy = make(m, k), make(n, k, scale=k**-0.5), make(n, scale=0.5), make(m, n)
    alpha = ACTIVATIONS[activation].default_alpha
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    y, _ = torch.ops.densepipe.dense_forward(*leaves, activation, alpha)
    y.backward(gy)
    refs = [t.detach().float().requires_grad_() for t in (x, w, b)]
    ry = ACTIVATIONS[activation].reference(F.linear(*refs), alpha)
    ry.backward(gy.float())
    pairs = [(y, ry)] + [(t.grad, r.grad) for t, r in zip(leaves, refs, strict=True)]
    return max(max_error(o, r, TOL[dtype]) for o, r in pairs)


def main() -> int:
    if not torch.cuda.is_available():
        print("CUDA device not available")
        return 1
    failures = 0
    for generic in (False, True):
        if generic:
            os.environ["DENSEPIPE_DISABLE_CUBLASLT"] = "1"
        for dtype in TOL:
            for activation in FUSED:
                for shape in SHAPES:
                    for offset in (0, 1):
                        err = check(activation, dtype, shape, offset)
                        torch.cuda.synchronize()
                        if not err <= 1.0:
                            failures += 1
                            path = "generic" if generic else "cuBLASLt"
                            print(f"FAIL {path} {activation} {dtype} {shape} offset={offset}: {err:.3g}")
    print("cuda smoke:", "ok" if failures == 0 else f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
