"""The fused dense + activation op against plain PyTorch (F.linear + the registry's
reference activation), on every device this machine has."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from densepipe import _C, _build, ops
from densepipe.nn import ACTIVATIONS, FUSED, FusedDense

_ops = torch.ops.densepipe
NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
DTYPES = {  # device -> dtypes the kernels accept there
    "cpu": [torch.float32, torch.float64],
    "cuda": [torch.float32, torch.float64, torch.bfloat16, torch.float16],
}
DEVICE_DTYPES = [pytest.param(device, dtype, id=f"{device}-{str(dtype)[6:]}",
                              marks=[pytest.mark.cuda, NO_CUDA] if device == "cuda" else [])
                 for device, dtypes in DTYPES.items() for dtype in dtypes]
TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}
# Reference precision: float64 for full-precision inputs, float32 for the half types.
REF_DTYPE = {torch.float64: torch.float64, torch.float32: torch.float64,
             torch.bfloat16: torch.float32, torch.float16: torch.float32}

# Every fused activation; leaky_relu and elu with a couple of alphas.
ACTS = [(name, ACTIVATIONS[name].default_alpha) for name in FUSED]
ACTS += [("leaky_relu", 0.2), ("leaky_relu", 0.0), ("elu", 0.5), ("elu", 2.0)]
ACT_IDS = [f"{name}-{alpha:g}" for name, alpha in ACTS]

# (leading shape of x, in_features K, out_features N, bias): the sizes 1, 7, 8, 9, 63,
# 64, 65, 4097 each appear as M, K and N (vector body and tail), not as a full product.
SHAPES = [
    ((1,), 1, 1, True),
    ((7,), 8, 9, False),
    ((8,), 9, 7, True),
    ((9,), 63, 64, True),
    ((63,), 64, 65, False),
    ((64,), 65, 63, True),
    ((65,), 7, 4097, True),
    ((7,), 4097, 9, False),
    ((4097,), 9, 8, True),
    ((2, 33), 65, 9, True),  # 3-D input
    ((3, 1, 5), 8, 64, False),  # 4-D input
    ((8, 128), 130, 129, True),  # M * K * N >= 2^24: oneDNN's GEMM where it is used
    ((0,), 5, 3, True),  # empty batch
    ((4,), 0, 3, True),  # no input features: y = act(bias)
]
SHAPE_IDS = ["x".join(map(str, (*lead, k, n))) + ("-bias" if b else "") for lead, k, n, b in SHAPES]


def _close(actual, expected, dtype):
    # Relative to the tensor's scale: grads summed over 4097 rows grow with sqrt(rows).
    tol = TOL[dtype]
    scale = expected.abs().max().clamp(min=1).item() if expected.numel() else 1.0
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=tol, atol=tol * scale)


def _inputs(device, dtype, lead, k, n, bias, x_layout="contiguous", seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    if x_layout == "transposed":  # (..., K) view of a (K, ...) tensor
        x = randn(k, *lead).movedim(0, -1)
    elif x_layout == "sliced":  # every other column of a wider tensor
        x = randn(*lead, 2 * k)[..., ::2]
    else:
        x = randn(*lead, k)
    w = randn(n, k) / max(k, 1) ** 0.5  # (N, K): keeps z = x W^T + b of order 1
    b = randn(n) if bias else None  # (N,)
    return x, w, b


def _check(device, dtype, activation, alpha, lead, k, n, bias,
           x_layout="contiguous", grad_layout="contiguous", seed=0):
    """Forward and backward of ops.dense against F.linear + the reference activation."""
    x, w, b = _inputs(device, dtype, lead, k, n, bias, x_layout, seed)
    if x_layout != "contiguous":
        assert not x.is_contiguous()
    ref_dtype = REF_DTYPE[dtype]
    ours = [t if t is None else t.detach().requires_grad_() for t in (x, w, b)]
    theirs = [t if t is None else t.detach().to(ref_dtype).requires_grad_() for t in (x, w, b)]

    y = ops.dense(*ours, activation, alpha)
    y_ref = ACTIVATIONS[activation].reference(F.linear(*theirs), alpha)
    assert y.shape == y_ref.shape and y.dtype == dtype and y.device.type == device
    _close(y, y_ref, dtype)

    gen = torch.Generator().manual_seed(seed + 1)
    if grad_layout == "expand":  # one row broadcast to all rows: stride 0
        gy = torch.randn(n, generator=gen).to(device, dtype).expand(y.shape)
    else:
        gy = torch.randn(y.shape, generator=gen).to(device, dtype)
    wanted = [t for t in ours if t is not None]
    grads = torch.autograd.grad(y, wanted, gy)
    grads_ref = torch.autograd.grad(y_ref, [t for t in theirs if t is not None], gy.to(ref_dtype))
    for name, g, g_ref in zip("xwb", grads, grads_ref, strict=False):  # "xw" when there is no bias
        assert g.shape == g_ref.shape, name
        _close(g, g_ref, dtype)


# ---------------------------------------------------------------- against plain PyTorch
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("activation,alpha", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("lead,k,n,bias", SHAPES, ids=SHAPE_IDS)
def test_matches_torch(device, dtype, activation, alpha, lead, k, n, bias):
    _check(device, dtype, activation, alpha, lead, k, n, bias)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("activation,alpha", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("x_layout,grad_layout", [("transposed", "contiguous"), ("sliced", "expand"),
                                                  ("contiguous", "expand")])
@pytest.mark.parametrize("lead,k,n", [((3, 23), 17, 33), ((320,), 130, 129)], ids=["small", "large"])
def test_strided_inputs(device, dtype, activation, alpha, x_layout, grad_layout, lead, k, n):
    _check(device, dtype, activation, alpha, lead, k, n, True, x_layout, grad_layout)


@pytest.mark.parametrize("enabled", [True, False], ids=["onednn-on", "onednn-off"])
def test_gemm_backend_switch(enabled):
    # Float32 products of at least 2^24 multiply-adds (all three here) may run on oneDNN; with it
    # switched off they run on BLAS.
    with torch.backends.mkldnn.flags(enabled=enabled):
        _check("cpu", torch.float32, "gelu", 0.0, (1024,), 130, 129, True, "transposed")


@pytest.mark.parametrize("count", [1, 2, 3])
@pytest.mark.parametrize("lead,k,n", [((128,), 256, 128), ((640,), 160, 200)], ids=["side-by-side", "in-turn"])
def test_backward_on_several_threads(threads, count, lead, k, n):
    # On two threads a small product's dx and dW run at once, one thread each; a large one's, or any
    # on one or three threads, run in turn on all of them. Either way each matches the reference.
    threads(count)
    _check("cpu", torch.float32, "relu", 0.0, lead, k, n, True)
    _check("cpu", torch.float64, "tanh", 0.0, lead, k, n, False, "transposed")


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 70), k=st.integers(1, 70), n=st.integers(1, 70), bias=st.booleans(),
       act=st.sampled_from(ACTS), seed=st.integers(0, 2**16))
def test_random_shapes(device, dtype, m, k, n, bias, act, seed):
    _check(device, dtype, *act, (m,), k, n, bias, seed=seed)


# ---------------------------------------------------------------- the CPU GEMM backends
def test_an_avx512_build_has_its_own_gemm():
    built_for = os.environ.get("DENSEPIPE_CPU_CAPABILITY") or _build.cpu_capability()
    assert _C.avx512_gemm == (built_for == "AVX512")


_SMALL = "avx512" if _C.avx512_gemm else "blas"  # where a small float32 product runs


@pytest.mark.parametrize("a,b,onednn,backend", [
    # a training step's products: x W^T (forward), g W (dx), g^T x (dW)
    ((64, 64), (256, 64, "T"), True, _SMALL),
    ((128, 256), (256, 128), True, _SMALL),
    ((256, 64, "T"), (64, 64), True, _SMALL),
    ((2048, 128), (128, 256), True, "onednn"),  # 2^26 multiply-adds
    ((2048, 128), (128, 256), False, _SMALL),  # ... with oneDNN switched off
    ((64, 128, "sliced"), (64, 10), True, "blas"),  # no unit stride in a
    ((8, 5000), (5000, 8), True, "blas"),  # deeper than the AVX-512 kernel's panels fit in L2
    ((64, 64, "double"), (64, 10, "double"), True, "blas"),
], ids=["forward", "dx", "dw", "large", "large-onednn-off", "strided", "deep", "float64"])
def test_which_backend_runs_a_product(a, b, onednn, backend):
    def operand(rows, cols, how=""):
        t = torch.randn(rows, cols * (2 if how == "sliced" else 1), dtype=torch.float64 if how == "double" else None)
        return t.T if how == "T" else t[:, ::2] if how == "sliced" else t

    if backend == "onednn" and not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    with torch.backends.mkldnn.flags(enabled=onednn):
        assert _C.gemm_backend(operand(*a), operand(*b)) == backend


# The threads fixture only puts the thread count back after the test: every example sets its own.
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=st.integers(1, 300), k=st.integers(1, 300), n=st.integers(1, 100), transposed=st.booleans(),
       two_threads=st.booleans(), seed=st.integers(0, 2**16))
def test_avx512_gemm_tiles_panels_and_tasks(threads, m, k, n, transposed, two_threads, seed):
    # Rows past a whole 8-row tile, columns past a whole 32-column panel or 16-lane vector, a W^T
    # packed in 16 x 16 blocks and its tails, and products split into tasks of rows and panels.
    layout = "transposed" if transposed and min(m, k) > 1 else "contiguous"  # a 1-row x is both
    threads(2 if two_threads else 1)
    _check("cpu", torch.float32, "linear", 0.0, (m,), k, n, True, layout, seed=seed)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("activation,alpha", ACTS, ids=ACT_IDS)
def test_extreme_preactivations(device, dtype, activation, alpha):
    # Saturated tails, the overflow edges of exp (about +-88 in float32) and NaN.
    z = [-1000.0, -100.0, -88.5, -87.0, -20.0, -5.0, -1e-3, 0.0, 1e-3, 5.0, 20.0, 87.0, 88.5, 100.0,
         1000.0, float("nan")]
    x = torch.tensor(z, device=device, dtype=dtype).unsqueeze(1).requires_grad_()  # (16, 1)
    w = torch.ones(1, 1, device=device, dtype=dtype, requires_grad=True)  # z = x exactly
    y = ops.dense(x, w, None, activation, alpha)
    xr = x.detach().to(REF_DTYPE[dtype]).requires_grad_()
    y_ref = ACTIVATIONS[activation].reference(xr, alpha)
    tol = TOL[dtype]
    torch.testing.assert_close(y.to(y_ref.dtype), y_ref, rtol=tol, atol=tol, equal_nan=True)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    (gx_ref,) = torch.autograd.grad(y_ref, xr, torch.ones_like(y_ref))
    torch.testing.assert_close(gx.to(gx_ref.dtype), gx_ref, rtol=tol, atol=tol, equal_nan=True)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_sum_backward_gets_expanded_grad(device, dtype):
    # y.sum() hands backward a grad_y of stride 0 everywhere.
    x, w, b = (t.requires_grad_() for t in _inputs(device, dtype, (20,), 12, 40, True))
    ops.dense(x, w, b, "tanh").sum().backward()
    xr, wr, br = (t.detach().to(REF_DTYPE[dtype]).requires_grad_() for t in (x, w, b))
    torch.tanh(F.linear(xr, wr, br)).sum().backward()
    for ours, ref in ((x, xr), (w, wr), (b, br)):
        _close(ours.grad, ref.grad, dtype)


# ---------------------------------------------------------------- autograd and op contracts
def _away_from_kinks(seed=0):
    """float64 inputs whose pre-activations keep clear of 0, where relu-like kinks are."""
    for s in range(seed, seed + 100):
        x, w, b = _inputs("cpu", torch.float64, (4,), 5, 6, True, seed=s)
        if F.linear(x, w, b).abs().min() > 0.05:
            return x, w, b
    raise AssertionError("no kink-free inputs found")


@pytest.mark.parametrize("activation,alpha", ACTS, ids=ACT_IDS)
def test_gradcheck(activation, alpha):
    x, w, b = (t.requires_grad_() for t in _away_from_kinks())
    assert torch.autograd.gradcheck(lambda *a: ops.dense(*a, activation, alpha), (x, w, b))
    assert torch.autograd.gradcheck(lambda *a: ops.dense(*a, None, activation, alpha), (x, w))


@pytest.mark.parametrize("activation,bias", [("linear", False), ("relu", True), ("gelu", True),
                                             ("silu", False), ("elu", True)])
def test_opcheck(activation, bias):
    x, w, b = _inputs("cpu", torch.float32, (3, 5), 7, 9, bias)
    args = (x.requires_grad_(), w.requires_grad_(), b if b is None else b.requires_grad_())
    torch.library.opcheck(_ops.dense_forward.default, (*args, activation, 0.1))
    y, preact = _ops.dense_forward(x.detach(), w.detach(), b if b is None else b.detach(), activation, 0.1)
    saved = preact if ACTIVATIONS[activation].needs_preact else y
    for mask in ([True, True, bias], [False, True, False], [True, False, bias]):
        torch.library.opcheck(_ops.dense_backward.default,
                              (torch.randn_like(y), x.detach(), w.detach(), saved, activation, 0.1, mask))


@pytest.mark.parametrize("activation", FUSED)
def test_preact_only_where_registry_needs_it(activation):
    # C++ (needs_preact in activation.h) and Python (the registry) must agree, or the
    # autograd formula would hand the backward the wrong saved tensor.
    x, w, b = _inputs("cpu", torch.float64, (6,), 5, 4, True)
    y, preact = _ops.dense_forward(x, w, b, activation, 0.1)
    if ACTIVATIONS[activation].needs_preact:
        _close(preact, F.linear(x, w, b), torch.float64)
    else:
        assert preact.numel() == 0
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fy, fpre = _ops.dense_forward(*(mode.from_tensor(t) for t in (x, w, b)), activation, 0.1)
    assert (fy.shape, fpre.shape) == (y.shape, preact.shape)


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("need_x,need_w,bias", [(False, True, True), (True, False, False),
                                                 (True, True, False), (False, False, True)])
def test_backward_skips_unneeded_grads(need_x, need_w, bias):
    x, w, b = _inputs("cpu", torch.float64, (5,), 4, 3, True)
    x.requires_grad_(need_x)
    w.requires_grad_(need_w)
    b.requires_grad_(bias)
    with _RecordOps() as rec:
        ops.dense(x, w, b, "sigmoid").sum().backward()
    (args,) = [a for f, a in rec.calls if f is _ops.dense_backward.default]
    assert list(args[-1]) == [need_x, need_w, bias]  # output_mask
    y_ref = torch.sigmoid(F.linear(x.detach(), w.detach(), b.detach()))
    g = y_ref * (1 - y_ref)  # grad of sum(sigmoid(z)) w.r.t. z
    for t, need, expected in ((x, need_x, g @ w.detach()), (w, need_w, g.t() @ x.detach()),
                              (b, bias, g.sum(0))):
        if need:
            _close(t.grad, expected, torch.float64)
        else:
            assert t.grad is None
    # Called directly, masked-off outputs come back empty.
    y, _ = _ops.dense_forward(x.detach(), w.detach(), b.detach(), "sigmoid", 0.0)
    dx, dw, db = _ops.dense_backward(torch.ones_like(y), x.detach(), w.detach(), y, "sigmoid", 0.0,
                                     [need_x, need_w, bias])
    assert [t.numel() > 0 for t in (dx, dw, db)] == [need_x, need_w, bias]


def test_double_backward_is_refused():
    x, w, b = (t.requires_grad_() for t in _inputs("cpu", torch.float64, (3,), 4, 2, True))
    (gx,) = torch.autograd.grad(ops.dense(x, w, b, "tanh").sum(), x, create_graph=True)
    with pytest.raises(ops.DoubleBackwardError, match="double backward"):
        gx.sum().backward()


def test_backward_gets_no_zero_filled_preact_grad():
    # preact is not differentiable: autograd must not build a zero (M, N) gradient for it.
    x, w, b = (t.requires_grad_() for t in _inputs("cpu", torch.float32, (64,), 8, 32, True))
    with _RecordOps() as rec:
        ops.dense(x, w, b, "gelu").sum().backward()
    zeros = (torch.ops.aten.zeros.default, torch.ops.aten.zeros_like.default)
    assert [f for f, _ in rec.calls if f in zeros] == []


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    torch.manual_seed(0)
    model = nn.Sequential(FusedDense(12, 32, activation="gelu"), FusedDense(32, 16, activation="leaky_relu"),
                          FusedDense(16, 5, activation="softmax"))
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, fullgraph=True, backend=backend)
    x = torch.randn(10, 12)
    runs = []
    for run, params in ((model, model), (compiled, twin)):
        y = run(x)
        (y * torch.arange(5.0)).sum().backward()
        runs.append((y.detach(), [p.grad for p in params.parameters()]))
    (y, grads), (y_c, grads_c) = runs
    _close(y_c, y, torch.float32)
    for g_c, g in zip(grads_c, grads, strict=True):
        _close(g_c, g, torch.float32)


# ---------------------------------------------------------------- the nn layer
@pytest.mark.parametrize("activation", ["relu", "gelu", "leaky_relu"])
def test_state_dict_round_trip_with_linear(activation):
    torch.manual_seed(0)
    fused = FusedDense(9, 4, activation=activation).double()
    linear = nn.Linear(9, 4).double()
    linear.load_state_dict(fused.state_dict())
    act = ACTIVATIONS[activation]
    x = torch.randn(3, 9, dtype=torch.float64)
    _close(fused(x), act.reference(linear(x), fused.alpha), torch.float64)
    back = FusedDense(9, 4, activation=activation).double()
    back.load_state_dict(linear.state_dict())
    assert torch.equal(back(x), fused(x))


@pytest.mark.parametrize("activation", [a.name for a in ACTIVATIONS.values() if not a.fused])
def test_non_fused_activations(activation):
    torch.manual_seed(0)
    layer = FusedDense(6, 5, activation=activation).double()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    y = layer(x)
    y_ref = ACTIVATIONS[activation].reference(F.linear(xr, layer.weight, layer.bias), 0.0)
    _close(y, y_ref, torch.float64)
    if y_ref.requires_grad:  # step has no gradient
        gy = torch.randn_like(y)
        _close(torch.autograd.grad(y, x, gy)[0], torch.autograd.grad(y_ref, xr, gy)[0], torch.float64)


# ---------------------------------------------------------------- errors a user can act on
def _args(**override):
    args = dict(x=torch.randn(4, 3), weight=torch.randn(5, 3), bias=torch.randn(5), activation="relu",
                alpha=0.0)
    args.update(override)
    return args


@pytest.mark.parametrize("override,message", [
    (dict(weight=torch.randn(5)), r"weight must be 2-D \(out_features, in_features\), got 1-D"),
    (dict(weight=torch.randn(2, 5, 3)), r"weight must be 2-D .* got 3-D"),
    (dict(x=torch.randn(4, 7)), r"x's last dimension is 7 but weight expects in_features = 3"),
    (dict(bias=torch.randn(6)), r"bias must have shape \(5,\) .* got \[6\]"),
    (dict(bias=torch.randn(1, 5)), r"bias must have shape \(5,\) .* got \[1, 5\]"),
    (dict(weight=torch.randn(5, 3, dtype=torch.float64)), r"weight has dtype Double but x has Float"),
    (dict(bias=torch.randn(5, dtype=torch.float64)), r"bias has dtype Double but x has Float"),
    (dict(x=torch.ones(4, 3, dtype=torch.int32), weight=torch.ones(5, 3, dtype=torch.int32),
          bias=None), r"x has dtype Int; on CPU allowed: float32, float64"),
    (dict(x=torch.randn(4, 3).half(), weight=torch.randn(5, 3).half(), bias=None),
     r"x has dtype Half; on CPU allowed: float32, float64"),
    (dict(activation="swishy"), r"unknown activation 'swishy'; allowed: " + ", ".join(FUSED)),
    (dict(activation="leaky_relu", alpha=-0.1), r"alpha must be >= 0 for activation 'leaky_relu', got -0.1"),
    (dict(activation="elu", alpha=-1.0), r"alpha must be >= 0 for activation 'elu', got -1"),
])
def test_clear_errors(override, message):
    with pytest.raises(RuntimeError, match=message):
        ops.dense(**_args(**override))


def test_backward_checks_grad_shape():
    a = _args()
    with pytest.raises(RuntimeError, match=r"grad_y has shape \[4, 6\], expected \[4, 5\]"):
        _ops.dense_backward(torch.randn(4, 6), a["x"], a["weight"], torch.randn(4, 5), "relu", 0.0,
                            [True, True, True])


def test_layer_rejects_unknown_activation():
    with pytest.raises(ValueError,
                       match=r"unknown activation 'gleu' \(did you mean 'gelu'\?\); allowed: .*\bgelu_tanh\b"):
        FusedDense(3, 2, activation="gleu")


@pytest.mark.cuda
@NO_CUDA
@pytest.mark.parametrize("moved", ["weight", "bias"])
def test_device_mismatch(moved):
    args = {k: v.cuda() if isinstance(v, torch.Tensor) and k != moved else v for k, v in _args().items()}
    with pytest.raises(RuntimeError, match=rf"{moved} is on cpu but x is on cuda:0"):
        ops.dense(**args)
