"""The dense chain op (several fused dense layers as one autograd node) against plain
PyTorch layer by layer, its op contracts, and the model's use of it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from densepipe import config, ops
from densepipe.nn.activations import ACTIVATIONS
from densepipe.nn.model import DataSpec, TargetSpec, build_model
from test_dense import ACTS, DEVICE_DTYPES, REF_DTYPE, TOL, _RecordOps

_ops = torch.ops.densepipe


def _layers(widths, acts, biases, dtype, device="cpu", seed=0, grad=True):
    """Weights (out, in) scaled to keep pre-activations of order 1, biases or None."""
    gen = torch.Generator().manual_seed(seed)
    ws, bs = [], []
    for (k, n), has_bias in zip(zip(widths, widths[1:], strict=False), biases, strict=True):
        ws.append((torch.randn(n, k, generator=gen) / max(k, 1) ** 0.5).to(device, dtype))
        bs.append(torch.randn(n, generator=gen).to(device, dtype) if has_bias else None)
    if grad:
        for t in (*ws, *bs):
            if t is not None:
                t.requires_grad_()
    return ws, bs


def _stored(t, dtype):
    """t's values as a tensor of `dtype` holds them; the gradient passes through unrounded."""
    return t if dtype is None else t + (t.to(dtype).to(t.dtype) - t).detach()


def _reference(x, ws, bs, acts, store=None):
    """Layer by layer in x's precision; with `store`, each pre-activation and output is rounded
    to that dtype as the chain keeps them between layers (in bfloat16 a pre-activation near zero
    can change sign there, and relu's mask with it)."""
    h = x
    for w, b, (name, alpha) in zip(ws, bs, acts, strict=True):
        h = _stored(ACTIVATIONS[name].reference(_stored(F.linear(h, w, b), store), alpha), store)
    return h


def _close(actual, expected, dtype):
    tol = TOL[dtype]
    scale = expected.abs().max().clamp(min=1).item() if expected.numel() else 1.0
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=tol, atol=tol * scale)


def _check_chain(device, dtype, m, widths, acts, biases, seed):
    gen = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(m, widths[0], generator=gen).to(device, dtype).requires_grad_()
    ws, bs = _layers(widths, acts, biases, dtype, device, seed)
    ref_dtype = REF_DTYPE[dtype]
    xr = x.detach().to(ref_dtype).requires_grad_()
    wr = [w.detach().to(ref_dtype).requires_grad_() for w in ws]
    br = [b if b is None else b.detach().to(ref_dtype).requires_grad_() for b in bs]

    y = ops.dense_chain(x, ws, bs, [a for a, _ in acts], [al for _, al in acts])
    y_ref = _reference(xr, wr, br, acts, store=dtype if ref_dtype != dtype else None)
    assert y.shape == y_ref.shape and y.dtype == dtype
    _close(y, y_ref, dtype)

    gy = torch.randn(y.shape, generator=gen).to(device, dtype)
    ours = [x, *ws, *(b for b in bs if b is not None)]
    theirs = [xr, *wr, *(b for b in br if b is not None)]
    for g, g_ref in zip(torch.autograd.grad(y, ours, gy), torch.autograd.grad(y_ref, theirs, gy.to(ref_dtype)),
                        strict=True):
        assert g.shape == g_ref.shape
        _close(g, g_ref, dtype)


# ---------------------------------------------------------------- against plain PyTorch
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 70), widths=st.lists(st.integers(1, 70), min_size=2, max_size=5),
       data=st.data(), seed=st.integers(0, 2**16))
def test_random_chains_match_torch(device, dtype, m, widths, data, seed):
    layers = len(widths) - 1
    acts = data.draw(st.lists(st.sampled_from(ACTS), min_size=layers, max_size=layers))
    biases = data.draw(st.lists(st.booleans(), min_size=layers, max_size=layers))
    _check_chain(device, dtype, m, widths, acts, biases, seed)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("widths,acts", [
    ([64, 256, 128, 10], [("relu", 0.0), ("relu", 0.0), ("linear", 0.0)]),  # the benchmark's MLP
    ([9, 65, 7, 63, 8], [("gelu", 0.0), ("leaky_relu", 0.2), ("silu", 0.0), ("sigmoid", 0.0)]),
    ([5, 3], [("tanh", 0.0)]),  # a chain of one
])
def test_named_chains_match_torch(device, dtype, widths, acts):
    _check_chain(device, dtype, 33, widths, acts, [True] * (len(widths) - 1), seed=0)


def test_chain_equals_layer_by_layer_exactly():
    # The same kernels in the same order: not close, identical.
    ws, bs = _layers([12, 20, 16, 4], None, [True, False, True], torch.float32)
    acts = ["elu", "softplus", "linear"]
    x = torch.randn(17, 12, generator=torch.Generator().manual_seed(3))
    y = ops.dense_chain(x, ws, bs, acts, [1.0, 0.0, 0.0])
    h = x
    for w, b, a, al in zip(ws, bs, acts, [1.0, 0.0, 0.0], strict=True):
        h = ops.dense(h, w, b, a, al)
    assert torch.equal(y, h)
    params = [*ws, bs[0], bs[2]]
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(y.sum(), params),
                                                 torch.autograd.grad(h.sum(), params), strict=True))


# ---------------------------------------------------------------- autograd and op contracts
def _kink_free(widths, acts):
    for s in range(100):
        ws, bs = _layers(widths, acts, [True] * (len(widths) - 1), torch.float64, seed=s)
        x = torch.randn(4, widths[0], generator=torch.Generator().manual_seed(s), dtype=torch.float64)
        h, ok = x, True
        for w, b, a in zip(ws, bs, acts, strict=True):
            z = F.linear(h, w.detach(), b.detach())
            ok &= bool(z.abs().min() > 0.05)
            h = ACTIVATIONS[a].reference(z, 0.1)
        if ok:
            return x.requires_grad_(), ws, bs
    raise AssertionError("no kink-free inputs found")


@pytest.mark.parametrize("acts", [["relu", "gelu", "sigmoid"], ["leaky_relu", "linear"], ["tanh"]])
def test_gradcheck(acts):
    x, ws, bs = _kink_free([5, 6, 4, 3][:len(acts) + 1], acts)
    n = len(acts)

    def through_wrapper(x, *p):
        return ops.dense_chain(x, list(p[:n]), list(p[n:]), acts, [0.1] * n)

    def through_op(x, *p):  # the op's own autograd registration (lists of tensors)
        return _ops.dense_chain_forward(x, list(p[:n]), list(p[n:]), acts, [0.1] * n)[0]

    assert torch.autograd.gradcheck(through_wrapper, (x, *ws, *bs))
    assert torch.autograd.gradcheck(through_op, (x, *ws, *bs))


def test_opcheck():
    ws, bs = _layers([6, 9, 5], None, [True, False], torch.float32)
    x = torch.randn(7, 6, requires_grad=True)
    biases = [bs[0], x.new_empty(0)]  # an empty bias stands for none
    acts, alphas = ["gelu", "relu"], [0.0, 0.0]
    torch.library.opcheck(_ops.dense_chain_forward.default, (x, ws, biases, acts, alphas))
    y, hidden, preacts = _ops.dense_chain_forward(x.detach(), [w.detach() for w in ws],
                                                  [b.detach() for b in biases], acts, alphas)
    for need in ([True, True], [False, True]):
        torch.library.opcheck(_ops.dense_chain_backward.default,
                              (torch.randn_like(y), x.detach(), hidden, y, [w.detach() for w in ws], preacts,
                               acts, alphas, need, [True, False], need[0]))


def test_fake_shapes_match_the_kernel():
    ws, bs = _layers([6, 9, 5, 2], None, [True, True, False], torch.float32, grad=False)
    x = torch.randn(3, 4, 6)
    args = (x, ws, [bs[0], bs[1], x.new_empty(0)], ["silu", "relu", "linear"], [0.0] * 3)
    y, hidden, preacts = _ops.dense_chain_forward(*args)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = _ops.dense_chain_forward(*(mode.from_tensor(a) if torch.is_tensor(a) else
                                          [mode.from_tensor(t) for t in a] if a and torch.is_tensor(a[0]) else a
                                          for a in args))
    assert fake[0].shape == y.shape == (3, 4, 2)
    assert [t.shape for t in fake[1]] == [t.shape for t in hidden] == [(3, 4, 9), (3, 4, 5)]
    assert [t.shape for t in fake[2]] == [t.shape for t in preacts] == [(3, 4, 9), (0,), (0,)]


@pytest.mark.parametrize("need_x", [True, False])
def test_backward_computes_only_what_is_needed(need_x):
    ws, bs = _layers([5, 8, 3], None, [True, True], torch.float64)
    ws[0].requires_grad_(False)  # a frozen first kernel
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=need_x)
    with _RecordOps() as rec:
        ops.dense_chain(x, ws, bs, ["tanh", "linear"], [0.0, 0.0]).sum().backward()
    (args,) = [a for f, a in rec.calls if f is _ops.dense_chain_backward.default]
    assert list(args[8]) == [False, True] and list(args[9]) == [True, True] and args[10] is need_x
    assert ws[0].grad is None and ws[1].grad is not None and bs[0].grad is not None
    assert (x.grad is not None) is need_x


def test_double_backward_is_refused():
    x, ws, bs = _kink_free([4, 3, 2], ["tanh", "tanh"])
    (gx,) = torch.autograd.grad(ops.dense_chain(x, ws, bs, ["tanh", "tanh"], [0.0, 0.0]).sum(), x,
                                create_graph=True)
    with pytest.raises(ops.DoubleBackwardError, match="double backward"):
        gx.sum().backward()


def test_errors_name_the_list_and_the_layer():
    ws, bs = _layers([4, 3, 2], None, [True, True], torch.float32, grad=False)
    x = torch.randn(5, 4)
    with pytest.raises(RuntimeError, match="activations has 1 entries but weights has 2"):
        _ops.dense_chain_forward(x, ws, bs, ["relu"], [0.0, 0.0])
    with pytest.raises(RuntimeError, match="weights is empty"):
        _ops.dense_chain_forward(x, [], [], [], [])
    bad = [ws[0], torch.randn(2, 7)]  # layer 1 expects 3 inputs, not 7
    with pytest.raises(RuntimeError, match=r"layer 1: .*last dimension is 3 but weight expects in_features = 7"):
        _ops.dense_chain_forward(x, bad, bs, ["relu", "relu"], [0.0, 0.0])
    with pytest.raises(RuntimeError, match="layer 0: .*activation"):
        _ops.dense_chain_forward(x, ws, bs, ["nope", "relu"], [0.0, 0.0])


def test_torch_compile_fullgraph():
    ws, bs = _layers([12, 32, 5], None, [True, True], torch.float32)
    acts = ["gelu", "linear"]

    def f(x, w0, w1, b0, b1):
        return ops.dense_chain(x, [w0, w1], [b0, b1], acts, [0.0, 0.0]) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(10, 12)
    y, y_c = f(x, *ws, *bs), compiled(x, *ws, *bs)
    _close(y_c, y, torch.float32)
    for g_c, g in zip(torch.autograd.grad(y_c.sum(), [*ws, *bs]), torch.autograd.grad(y.sum(), [*ws, *bs]),
                      strict=True):
        _close(g_c, g, torch.float32)


# ---------------------------------------------------------------- the model's runs
def _model(layers, spec=None, kernels="fused", **model):
    spec = spec or DataSpec({"features": 8}, {"target": TargetSpec("regression", 2)})
    cfg = config.parse({"model": {"kernels": kernels, "layers": layers, **model}})
    return build_model(cfg.model, cfg.train, spec, 0)


THREE_DENSE = [{"type": "dense", "units": 16, "activation": "relu"},
               {"type": "dense", "units": 8, "activation": "tanh"},
               {"type": "dense", "units": "auto"}]


def _chained(rec) -> bool:
    """Whether a _RecordOps recording holds a dense chain call."""
    return any(f is _ops.dense_chain_forward.default for f, _ in rec.calls)


def _runs(model):
    return [[n.name for n in run] for run in model._runs]


def test_runs_chain_only_layers_read_by_their_successor_alone():
    dense = {"type": "dense", "units": 6, "activation": "relu"}
    seq = _model([dense, dense, {"type": "dropout", "rate": 0.1}, dense, dense,
                  {"type": "dense", "units": 2},
                  {"type": "activation", "activation": "tanh"}])
    assert _runs(seq) == [["dense_1", "dense_2"], ["dropout_3"], ["dense_4", "dense_5", "dense_6"],
                          ["activation_7"]]
    # A graph: trunk's output feeds two branches, so it ends its run; outputs end runs too.
    graph = _model([
        {"type": "dense", "name": "a", "units": 6, "inputs": ["features"]},
        {"type": "dense", "name": "trunk", "units": 6},
        {"type": "dense", "name": "left", "units": 4},
        {"type": "dense", "name": "head1", "units": 2, "inputs": ["left"]},
        {"type": "dense", "name": "right", "units": 4, "inputs": ["trunk"]},
        {"type": "dense", "name": "head2", "units": 1, "inputs": ["right"]},
        {"type": "dense", "name": "after", "units": 1, "inputs": ["head2"]},
    ], spec=DataSpec({"features": 8}, {"y1": TargetSpec("regression", 2), "y2": TargetSpec("regression", 1),
                                       "y3": TargetSpec("regression", 1)}),
        outputs={"head1": {"target": "y1"}, "head2": {"target": "y2"}, "after": {"target": "y3"}})
    assert _runs(graph) == [["a", "trunk"], ["left", "head1"], ["right", "head2"], ["after"]]
    ref = _model([dense, dense, {"type": "dense", "units": "auto"}], kernels="reference")
    assert _runs(ref) == [["dense_1"], ["dense_2"], ["dense_3"]]  # plain torch layers are not chained


def test_model_output_and_grads_are_those_of_the_layers_one_by_one():
    model = _model([{"type": "dense", "units": 16, "activation": "gelu"},
                    {"type": "dense", "units": 8, "activation": "elu", "alpha": 0.5},
                    {"type": "dense", "units": "auto"}])
    x = {"features": torch.randn(20, 8, generator=torch.Generator().manual_seed(0))}
    with _RecordOps() as rec:
        y = model(x)["target"]
    assert _chained(rec)  # ran as one chain
    grads = torch.autograd.grad(y.sum(), list(model.parameters()))
    h = x["features"]
    for layer in model.layers.values():  # each layer's own forward: the unchained path
        h = layer(h)
    assert torch.equal(y, h)
    for g, g_ref in zip(grads, torch.autograd.grad(h.sum(), list(model.parameters())), strict=True):
        assert torch.equal(g, g_ref)


def test_a_hooked_layer_runs_on_its_own_and_its_hook_sees_its_output():
    model = _model(THREE_DENSE)
    x = {"features": torch.randn(5, 8)}
    unhooked = model(x)["target"]
    seen = {}
    handle = model.layers["dense_2"].register_forward_hook(lambda m, i, out: seen.update(out=out))
    with _RecordOps() as rec:
        hooked = model(x)["target"]
    handle.remove()
    assert not _chained(rec)
    l1, l2 = model.layers["dense_1"], model.layers["dense_2"]
    assert torch.equal(seen["out"], l2(l1(x["features"])))
    assert torch.equal(hooked, unhooked)


def test_every_kind_of_hook_or_a_compiled_layer_runs_the_layers_on_their_own():
    model = _model(THREE_DENSE)
    x = {"features": torch.randn(5, 8)}
    layer = model.layers["dense_2"]
    fired = []
    watchers = {
        "backward hook": lambda: layer.register_full_backward_hook(lambda m, gi, go: fired.append(1)),
        "global forward hook": lambda: torch.nn.modules.module.register_module_forward_hook(
            lambda m, i, o: fired.append(1) if m is layer else None),
        "global backward hook": lambda: torch.nn.modules.module.register_module_full_backward_hook(
            lambda m, gi, go: fired.append(1) if m is layer else None),
    }
    for name, register in watchers.items():
        fired.clear()
        handle = register()
        try:
            with _RecordOps() as rec:
                model(x)["target"].sum().backward()
        finally:
            handle.remove()
        assert fired == [1], name
        assert not _chained(rec), name
    layer._compiled_call_impl = layer._call_impl  # what Module.compile() sets, without compiling
    try:
        assert not layer.chainable()
    finally:
        layer._compiled_call_impl = None
    assert layer.chainable()


def test_a_layer_swapped_for_plain_torch_after_building_runs_as_itself():
    model = _model([{"type": "dense", "units": 6, "activation": "relu"},
                    {"type": "dense", "units": 6, "activation": "relu"},
                    {"type": "dense", "units": "auto"}])
    model.layers["dense_2"] = torch.nn.Linear(6, 6)
    x = torch.randn(4, 8)
    h = model.layers["dense_3"](model.layers["dense_2"](model.layers["dense_1"](x)))
    assert torch.equal(model({"features": x})["target"], h)


def test_frozen_lower_layers_and_zero_width_layers():
    # Backpropagation stops below the lowest layer that trains; a layer of width 0 still gets
    # (empty) gradients for its parameters, as dense() gives them.
    ws, bs = _layers([5, 7, 4, 3], None, [True, True, True], torch.float64)
    for t in (ws[0], bs[0], ws[1]):
        t.requires_grad_(False)
    x = torch.randn(6, 5, dtype=torch.float64)
    acts = ["tanh", "sigmoid", "linear"]
    y = ops.dense_chain(x, ws, bs, acts, [0.0] * 3)
    grads = torch.autograd.grad(y.sum(), [bs[1], ws[2], bs[2]])
    ref = [t.detach().requires_grad_(t.requires_grad) for t in (*ws, *bs)]
    y_ref = _reference(x, ref[:3], ref[3:], [(a, 0.0) for a in acts])
    for g, g_ref in zip(grads, torch.autograd.grad(y_ref.sum(), [ref[4], ref[2], ref[5]]), strict=True):
        _close(g, g_ref, torch.float64)
    zw, zb = _layers([4, 0, 3], None, [True, True], torch.float64)
    out = ops.dense_chain(torch.randn(2, 4, dtype=torch.float64), zw, zb, ["relu", "linear"], [0.0, 0.0])
    out.sum().backward()
    assert zb[0].grad is not None and zb[0].grad.shape == (0,) and zw[0].grad.shape == (0, 4)
    torch.testing.assert_close(zb[1].grad, torch.full((3,), 2.0, dtype=torch.float64))  # y = b: d sum / db = rows
