"""The fused dense + activation op on CUDA, against plain PyTorch.

The reference is F.linear + the activation in float32 on the same (upcast)
inputs; gradients come from torch.autograd on that reference. Every test needs a
CUDA device and skips without one.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from densepipe import ops
from densepipe.nn.activations import ACTIVATIONS, FUSED

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA device not available"),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Error allowed relative to the reference's rms (absolute part) and to each element
# (relative part): a few roundings to the storage type, plus float32 GEMM reordering.
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
ALPHA = {"leaky_relu": 0.1, "elu": 1.3}  # non-default values, so alpha is really passed through
SHAPES = [  # (rows M, in_features K, out_features N): vector body and scalar tails of each size
    (1, 1, 1), (7, 9, 7), (8, 8, 8), (9, 7, 9), (63, 65, 63), (64, 64, 64), (65, 63, 65),
    (4097, 33, 64), (5, 17, 4097), (300, 96, 200),
]
DEV = "cuda"


def _id(v):
    return str(v).replace("torch.", "") if isinstance(v, torch.dtype) else None


def assert_close(actual, expected, dtype, what=""):
    """Elementwise |a - e| <= tol * (rms(e) + |e|), NaN never passes."""
    a, e = actual.detach().float(), expected.detach().float()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values in the output"
    tol = TOL[dtype]
    scale = e.pow(2).mean().sqrt().item() if e.numel() else 0.0
    torch.testing.assert_close(a, e, rtol=tol, atol=tol * max(scale, 1e-6), msg=lambda m: f"{what}: {m}")


def make_inputs(m, k, n, dtype, bias=True, seed=0, lead=None):
    """x ~ N(0, 1) and weight ~ N(0, 1/k), so the pre-activation is O(1) at any k."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    shape = (*lead, k) if lead is not None else (m, k)
    x = torch.randn(shape, generator=g, device=DEV).to(dtype)
    w = (torch.randn(n, k, generator=g, device=DEV) / max(k, 1) ** 0.5).to(dtype)
    b = (torch.randn(n, generator=g, device=DEV) * 0.5).to(dtype) if bias else None
    gy = torch.randn((*shape[:-1], n), generator=g, device=DEV).to(dtype)
    return x, w, b, gy


def poison_allocator(*tensors_like):
    """Hands NaN-filled blocks back to the caching allocator, so an output the
    kernels fail to write comes out as NaN rather than as stale correct data."""
    blocks = [torch.full(t.shape, float("nan"), dtype=t.dtype, device=DEV) for t in tensors_like]
    del blocks


def reference(x, w, b, gy, activation, alpha):
    """y, z and the gradients of (y * gy).sum() in float32."""
    xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    br = b.detach().float().requires_grad_() if b is not None else None
    z = F.linear(xr, wr, br)
    y = ACTIVATIONS[activation].reference(z, alpha)
    y.backward(gy.float())
    return y, z, xr.grad, wr.grad, (br.grad if br is not None else None)


def run_ours(x, w, b, gy, activation, alpha):
    """y, preact and the gradients through autograd (dense_forward + dense_backward)."""
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    b = b.detach().requires_grad_() if b is not None else None
    poison_allocator(gy, gy)
    y, preact = torch.ops.densepipe.dense_forward(x, w, b, activation, alpha)
    poison_allocator(x, w, gy)
    y.backward(gy)
    return y, preact, x.grad, w.grad, (b.grad if b is not None else None)


def check_against_reference(x, w, b, gy, activation, dtype):
    alpha = ALPHA.get(activation, 0.0)
    y, preact, dx, dw, db = run_ours(x, w, b, gy, activation, alpha)
    ry, rz, rdx, rdw, rdb = reference(x, w, b, gy, activation, alpha)
    assert y.dtype == dtype and y.device == x.device
    assert_close(y, ry, dtype, "y")
    if ACTIVATIONS[activation].needs_preact:
        assert_close(preact, rz, dtype, "preact")
    else:
        assert preact.numel() == 0
    assert_close(dx, rdx, dtype, "dx")
    assert_close(dw, rdw, dtype, "dweight")
    if b is not None:
        assert_close(db, rdb, dtype, "dbias")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("activation", FUSED)
def test_matches_torch(activation, dtype, shape):
    m, k, n = shape
    x, w, b, gy = make_inputs(m, k, n, dtype, seed=m * 7919 + n)
    check_against_reference(x, w, b, gy, activation, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("activation", FUSED)
def test_without_bias(activation, dtype):
    x, w, b, gy = make_inputs(65, 40, 72, dtype, bias=False)
    check_against_reference(x, w, None, gy, activation, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("activation", ["relu", "gelu_tanh", "silu", "tanh"])
def test_leading_dims(activation, dtype):
    x, w, b, gy = make_inputs(0, 24, 40, dtype, lead=(3, 5))
    check_against_reference(x, w, b, gy, activation, dtype)
    y = ops.dense(x, w, b, activation, ALPHA.get(activation, 0.0))
    assert y.shape == (3, 5, 40)


def test_one_dimensional_input():
    x, w, b, gy = make_inputs(0, 16, 24, torch.float32, lead=())
    check_against_reference(x, w, b, gy, "gelu", torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("activation", ["linear", "relu", "gelu_tanh", "elu"])
def test_non_contiguous_inputs(activation, dtype):
    x, w, b, gy = make_inputs(48, 64, 40, dtype)
    xt = x.t().contiguous().t()            # (48, 64) column-major
    wt = w.t().contiguous().t()            # (40, 64) column-major
    bs = torch.stack([b, b], dim=1)[:, 0]  # (40,) with stride 2
    gyt = gy.t().contiguous().t()          # (48, 40) column-major
    assert not (xt.is_contiguous() or wt.is_contiguous() or bs.is_contiguous() or gyt.is_contiguous())
    check_against_reference(xt, wt, bs, gyt, activation, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("activation", ["relu", "gelu_tanh", "gelu", "softplus"])
def test_misaligned_storage(activation, dtype):
    """Tensors starting one element into their storage: no 16-byte vectors, and
    cuBLASLt must be told the real alignment (or decline)."""
    x, w, b, gy = make_inputs(33, 24, 64, dtype)

    def shifted(t):
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=DEV)
        out = buf[1:].view(t.shape)
        out.copy_(t)
        return out

    xs, ws, bs, gys = (shifted(t) for t in (x, w, b, gy))
    assert xs.data_ptr() % 16 != 0
    check_against_reference(xs, ws, bs, gys, activation, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("activation", ["linear", "relu", "gelu_tanh", "silu", "sigmoid"])
@pytest.mark.parametrize("n", [64, 63])  # 64: the cuBLASLt epilogues apply; 63: gelu_tanh's aux cannot
@pytest.mark.parametrize("bias", [True, False])
def test_cublaslt_and_generic_paths_agree(monkeypatch, activation, dtype, n, bias):
    x, w, b, _ = make_inputs(130, 72, n, dtype, bias=bias)
    alpha = ALPHA.get(activation, 0.0)
    fused = torch.ops.densepipe.dense_forward(x, w, b, activation, alpha)
    monkeypatch.setenv("DENSEPIPE_DISABLE_CUBLASLT", "1")
    generic = torch.ops.densepipe.dense_forward(x, w, b, activation, alpha)
    ry, rz, *_ = reference(x, w, b, torch.zeros_like(fused[0]), activation, alpha)
    for ours, name in ((fused, "cuBLASLt"), (generic, "generic")):
        assert_close(ours[0], ry, dtype, f"{name} y")
        if ACTIVATIONS[activation].needs_preact:
            assert_close(ours[1], rz, dtype, f"{name} preact")
    assert_close(fused[0], generic[0], dtype, "cuBLASLt vs generic")


def _launches_activation_kernel(fn) -> bool:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return any("act_kernel" in e.key for e in prof.key_averages())  # not in act_grad_kernel


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 0),
                    reason="cuBLASLt epilogues checked on compute capability 8.0 and newer")
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("activation,in_gemm", [("linear", True), ("gelu_tanh", True), ("relu", False)])
def test_which_activations_run_inside_the_gemm(monkeypatch, activation, in_gemm, dtype):
    """The bias and gelu_tanh run inside the GEMM's epilogue: no separate pass. relu does not:
    cuBLASLt's RELU epilogue turns a NaN into 0, where torch.relu keeps it."""
    x, w, b, _ = make_inputs(256, 128, 64, dtype)
    call = lambda: torch.ops.densepipe.dense_forward(x, w, b, activation, 0.0)  # noqa: E731
    call()  # warm-up: handle creation and heuristics outside the profile
    assert _launches_activation_kernel(call) != in_gemm
    monkeypatch.setenv("DENSEPIPE_DISABLE_CUBLASLT", "1")
    # Without cuBLASLt the bias still goes in with the product (addmm); an activation is our pass.
    assert _launches_activation_kernel(call) == (activation != "linear")


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_bias_gradient_is_deterministic(dtype):
    x, w, b, gy = make_inputs(4097, 32, 200, dtype)
    y = torch.ops.densepipe.dense_forward(x, w, b, "tanh", 0.0)[0]
    runs = [torch.ops.densepipe.dense_backward(gy, x, w, y, "tanh", 0.0, [False, False, True])[2]
            for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


@pytest.mark.parametrize("mask", [[True, False, False], [False, True, False], [False, False, True],
                                  [False, False, False], [True, True, True]], ids=str)
@pytest.mark.parametrize("activation", ["linear", "silu"])
def test_output_mask(activation, mask):
    x, w, b, gy = make_inputs(40, 24, 56, torch.float32)
    _, z, rdx, rdw, rdb = reference(x, w, b, gy, activation, 0.0)
    y, preact = torch.ops.densepipe.dense_forward(x, w, b, activation, 0.0)
    saved = preact if ACTIVATIONS[activation].needs_preact else y
    outs = torch.ops.densepipe.dense_backward(gy, x, w, saved, activation, 0.0, mask)
    for want, out, ref, name in zip(mask, outs, (rdx, rdw, rdb), ("dx", "dweight", "dbias"), strict=True):
        if want:
            assert_close(out, ref, torch.float32, name)
        else:
            assert out.numel() == 0, name


@pytest.mark.parametrize("activation", ["relu", "gelu_tanh", "softplus"])
@pytest.mark.parametrize("shape", [(0, 5, 8), (4, 0, 8), (4, 5, 0)], ids=lambda s: "x".join(map(str, s)))
def test_empty_dimensions(activation, shape):
    m, k, n = shape
    x, w, b, gy = make_inputs(m, k, n, torch.float32)
    check_against_reference(x, w, b, gy, activation, torch.float32)


@pytest.mark.parametrize("activation", FUSED)
def test_gradcheck_float64(activation):
    g = torch.Generator(device=DEV).manual_seed(3)
    x = torch.randn(5, 7, dtype=torch.float64, device=DEV, generator=g, requires_grad=True)
    w = torch.randn(9, 7, dtype=torch.float64, device=DEV, generator=g, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, device=DEV, generator=g, requires_grad=True)
    alpha = ALPHA.get(activation, 0.0)
    assert torch.autograd.gradcheck(lambda x, w, b: ops.dense(x, w, b, activation, alpha), (x, w, b))


@pytest.mark.parametrize("activation", ["linear", "relu", "gelu", "gelu_tanh", "elu"])
@pytest.mark.parametrize("contiguous", [True, False])
def test_opcheck(activation, contiguous):
    x, w, b, gy = make_inputs(12, 10, 16, torch.float32)
    if not contiguous:
        x, gy = x.t().contiguous().t(), gy.t().contiguous().t()
    alpha = ALPHA.get(activation, 0.0)
    torch.library.opcheck(torch.ops.densepipe.dense_forward.default,
                          (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), activation, alpha))
    y, preact = torch.ops.densepipe.dense_forward(x.detach(), w.detach(), b.detach(), activation, alpha)
    saved = preact if ACTIVATIONS[activation].needs_preact else y
    torch.library.opcheck(torch.ops.densepipe.dense_backward.default,
                          (gy, x.detach(), w.detach(), saved, activation, alpha, [True, True, True]))


@pytest.mark.parametrize("which", ["weight", "bias"])
def test_cpu_tensor_with_cuda_x_is_rejected(which):
    x, w, b, _ = make_inputs(4, 3, 2, torch.float32)
    args = {"weight": w, "bias": b}
    args[which] = args[which].cpu()
    with pytest.raises(RuntimeError, match=rf"{which} is on cpu but x is on cuda"):
        ops.dense(x, args["weight"], args["bias"], "relu")


def test_cuda_tensor_with_cpu_x_is_rejected():
    x, w, b, _ = make_inputs(4, 3, 2, torch.float32)
    with pytest.raises(RuntimeError, match=r"weight is on cuda:\d+ but x is on cpu"):
        ops.dense(x.cpu(), w, b, "relu")


def test_cpu_grad_is_rejected_in_backward():
    x, w, b, gy = make_inputs(4, 3, 2, torch.float32)
    y, _ = torch.ops.densepipe.dense_forward(x, w, b, "tanh", 0.0)
    with pytest.raises(RuntimeError, match=r"grad_y is on cpu but x is on cuda"):
        torch.ops.densepipe.dense_backward(gy.cpu(), x, w, y, "tanh", 0.0, [True, True, True])


def test_bad_dtypes_are_rejected():
    x, w, b, _ = make_inputs(4, 3, 2, torch.float32)
    with pytest.raises(RuntimeError, match=r"weight has dtype .*Half but x has .*Float"):
        ops.dense(x, w.half(), b, "relu")
    with pytest.raises(RuntimeError, match=r"allowed: float32, float16, bfloat16, float64"):
        ops.dense(x.int(), w.int(), b.int(), "relu")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
def test_second_device(activation):
    """Tensors on cuda:1 while cuda:0 is current: kernels and handles follow the input."""
    x, w, b, gy = (t.to("cuda:1") for t in make_inputs(65, 24, 72, torch.float32))
    with torch.cuda.device(0):
        y, preact, dx, dw, db = run_ours(x, w, b, gy, activation, 0.0)
    ry, _, rdx, rdw, rdb = reference(x, w, b, gy, activation, 0.0)
    assert y.device == torch.device("cuda:1")
    for ours, ref, name in ((y, ry, "y"), (dx, rdx, "dx"), (dw, rdw, "dw"), (db, rdb, "db")):
        assert_close(ours, ref, torch.float32, name)
