"""Every layer type against plain PyTorch: fused vs reference dense, dropout,
batchnorm (Keras moving statistics, batches of one row), layer normalization, activation, gaussian
noise, the merge layers and concatenate in a graph model, L1/L2 penalties on weights and on layer
outputs (activity), and the model summary table."""

import re

import pytest
import torch
import torch.nn.functional as F

from densepipe import cli, config
from densepipe.nn.activations import ACTIVATIONS, softmax_rows
from densepipe.nn.dense import FusedDense
from densepipe.nn.layers import LAYERS, ReferenceDense
from densepipe.nn.model import DataSpec, TargetSpec, build_model
from densepipe.summary import render_summary
from densepipe.train.loop import Split, Trainer

REG3 = DataSpec({"features": 8}, {"target": TargetSpec("regression", 3)})


def build(layers, spec=REG3, *, kernels="fused", seed=0, **model):
    cfg = config.parse({"model": {"kernels": kernels, "layers": layers, **model}})
    return build_model(cfg.model, cfg.train, spec, seed)


def inputs(n=32, width=8, seed=1):
    return {"features": torch.randn(n, width, generator=torch.Generator().manual_seed(seed))}


# ------------------------------------------------------------------------ dense
@pytest.mark.parametrize("activation", ACTIVATIONS.names())
def test_fused_dense_matches_reference_kernels(activation):
    layers = [{"type": "dense", "units": 16, "activation": activation, "alpha": 0.2 if activation in
               ("leaky_relu", "elu") else None},
              {"type": "dense", "units": "auto", "activation": "linear"}]
    fused, ref = build(layers, kernels="fused"), build(layers, kernels="reference")
    assert isinstance(fused.layers["dense_1"], FusedDense)
    assert type(ref.layers["dense_1"]) is ReferenceDense
    # Same seed -> the same initial weights, under the same state_dict keys.
    ref_state = ref.state_dict()
    for k, v in fused.state_dict().items():
        torch.testing.assert_close(v, ref_state[k], rtol=0, atol=0)
    assert fused.state_dict().keys() == ref_state.keys()

    x = inputs()["features"]
    outs, grads = [], []
    for model in (fused, ref):
        xi = x.clone().requires_grad_(True)
        y = model({"features": xi})["target"]
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
        (y * g).sum().backward()
        outs.append(y.detach())
        grads.append([xi.grad, *(p.grad for p in model.parameters())])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_dense_output_is_the_formula():
    model = build([{"type": "dense", "units": 5, "activation": "tanh"},
                   {"type": "dense", "units": "auto"}])
    x = inputs()["features"]
    d1, d2 = model.layers["dense_1"], model.layers["dense_2"]
    expected = torch.tanh(x @ d1.weight.T + d1.bias) @ d2.weight.T + d2.bias
    torch.testing.assert_close(model({"features": x})["target"], expected, rtol=1e-5, atol=1e-5)


def test_dense_without_bias():
    model = build([{"type": "dense", "units": "auto", "use_bias": False}])
    assert model.layers["dense_1"].bias is None
    x = inputs()["features"]
    torch.testing.assert_close(model({"features": x})["target"], x @ model.layers["dense_1"].weight.T)


# ---------------------------------------------------------------------- dropout
def test_dropout_scales_kept_units_in_training_and_is_identity_in_eval():
    rate = 0.3
    model = build([{"type": "dropout", "rate": rate}, {"type": "dense", "units": "auto"}])
    drop = model.layers["dropout_1"]
    x = torch.rand(2000, 8) + 1.0                    # (N, 8), nowhere zero
    torch.manual_seed(0)
    drop.train()
    y = drop(x)
    zeros = (y == 0).float().mean().item()
    assert abs(zeros - rate) < 0.02
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / (1 - rate))
    drop.eval()
    assert torch.equal(drop(x), x)
    model.eval()
    ref = model.layers["dense_2"]
    torch.testing.assert_close(model({"features": x})["target"], x @ ref.weight.T + ref.bias)


def test_alpha_dropout_is_keras_formula_and_keeps_selu_statistics():
    rate = 0.2
    drop = build([{"type": "alpha_dropout", "rate": rate}, {"type": "dense", "units": "auto"}]
                 ).layers["alpha_dropout_1"]
    x = torch.randn(20000, 8, generator=torch.Generator().manual_seed(0))   # a selu network's units: N(0, 1)
    torch.manual_seed(0)
    y = drop(x)
    # Keras' AlphaDropout: dropped units go to alpha', then a * x + b restores mean 0 and variance 1.
    alpha_p = -1.6732632423543772 * 1.0507009873554805
    a = ((1 - rate) * (1 + rate * alpha_p ** 2)) ** -0.5
    b = -a * alpha_p * rate
    kept = torch.isclose(y, a * x + b)
    torch.testing.assert_close(y[~kept], torch.full_like(y[~kept], a * alpha_p + b))
    assert abs((~kept).float().mean().item() - rate) < 0.01
    assert abs(y.mean().item()) < 0.02 and abs(y.var().item() - 1) < 0.03
    drop.eval()
    assert torch.equal(drop(x), x)


def test_gaussian_dropout_multiplies_by_keras_noise_in_training_only():
    rate = 0.3
    drop = build([{"type": "gaussian_dropout", "rate": rate}, {"type": "dense", "units": "auto"}]
                 ).layers["gaussian_dropout_1"]
    x = torch.rand(20000, 8) + 1.0
    torch.manual_seed(0)
    noise = drop(x) / x
    assert abs(noise.mean().item() - 1) < 0.01
    assert abs(noise.std().item() - (rate / (1 - rate)) ** 0.5) < 0.01
    drop.eval()
    assert torch.equal(drop(x), x)


# -------------------------------------------------------------------- batchnorm
def _batchnorm(momentum=0.99, eps=1e-3, width=8):
    model = build([{"type": "batchnorm", "momentum": momentum, "epsilon": eps},
                   {"type": "dense", "units": "auto"}], DataSpec({"features": width}, REG3.targets))
    return model.layers["batchnorm_1"]


def test_batchnorm_matches_torch_with_keras_moving_statistics():
    momentum, eps = 0.9, 1e-3          # Keras: moving = 0.9 * moving + 0.1 * batch statistic
    bn = _batchnorm(momentum, eps)
    ref = torch.nn.BatchNorm1d(8, eps=eps, momentum=1 - momentum)
    gen = torch.Generator().manual_seed(0)
    mean, var = torch.zeros(8), torch.ones(8)
    bn.train()
    ref.train()
    for _ in range(4):
        x = torch.randn(64, 8, generator=gen) * 3 + 2
        torch.testing.assert_close(bn(x), ref(x))                      # normalised as torch does
        mean = momentum * mean + (1 - momentum) * x.mean(0)            # the Keras formulas: the
        var = momentum * var + (1 - momentum) * x.var(0, unbiased=False)  # biased batch variance
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_mean, mean)
    torch.testing.assert_close(bn.running_var, var)
    assert bn.num_batches_tracked.item() == 4
    assert bn.state_dict().keys() == ref.state_dict().keys()           # checkpoints keep their layout
    bn.eval()
    x = torch.randn(16, 8, generator=gen)
    expected = (x - mean) / torch.sqrt(var + eps) * bn.weight + bn.bias
    torch.testing.assert_close(bn(x), expected)


def test_batchnorm_moving_variance_is_the_biased_batch_variance():
    bn = _batchnorm(momentum=0.5, width=1)
    bn.train()
    bn(torch.tensor([[0.0], [2.0], [4.0], [6.0]]))                    # mean 3, biased variance 5
    torch.testing.assert_close(bn.running_mean, torch.tensor([0.5 * 0 + 0.5 * 3.0]))
    torch.testing.assert_close(bn.running_var, torch.tensor([0.5 * 1 + 0.5 * 5.0]))  # 3.0, not 3.833


def test_batchnorm_trains_on_a_batch_of_one_row():
    momentum, eps = 0.9, 1e-3
    bn = _batchnorm(momentum, eps, width=3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([2.0, -1.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
    bn.train()
    x = torch.tensor([[1.5, -2.0, 4.0]], requires_grad=True)           # (1, 3)
    y = bn(x)
    # Keras: the batch mean is the row and its variance 0, so the row normalises to 0 -> beta.
    torch.testing.assert_close(y, bn.bias.detach().unsqueeze(0), rtol=0, atol=1e-5)
    torch.testing.assert_close(bn.running_mean, (1 - momentum) * x.detach()[0])
    torch.testing.assert_close(bn.running_var, torch.full((3,), momentum * 1.0))
    y.sum().backward()
    torch.testing.assert_close(bn.bias.grad, torch.ones(3))
    torch.testing.assert_close(bn.weight.grad, torch.zeros(3), rtol=0, atol=1e-4)
    torch.testing.assert_close(x.grad, torch.zeros(1, 3), rtol=0, atol=1e-4)


def test_a_batchnorm_model_trains_through_a_last_batch_of_one_row():
    model = build([{"type": "dense", "units": 8, "activation": "relu"}, {"type": "batchnorm"},
                   {"type": "dense", "units": "auto"}])
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(9, 8, generator=gen), torch.randn(9, 3, generator=gen)  # batches of 8 and 1
    train = config.parse({"model": {"layers": [{"type": "dense", "units": "auto"}]},
                          "train": {"epochs": 2, "batch_size": 8, "progress": "quiet"}}).train
    history = Trainer(model, train).fit(Split({"features": x}, {"target": y}))
    assert model.layers["batchnorm_2"].num_batches_tracked.item() == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert history is not None


# ------------------------------------------------------------------- activation
@pytest.mark.parametrize("name,alpha,reference", [
    ("relu", None, F.relu),
    ("leaky_relu", 0.2, lambda z: F.leaky_relu(z, 0.2)),
    ("leaky_relu", None, lambda z: F.leaky_relu(z, 0.2)),    # Keras 3's default slope
    ("leaky_relu", 0.01, lambda z: F.leaky_relu(z, 0.01)),   # torch's, when asked for
    ("elu", 0.5, lambda z: F.elu(z, 0.5)),
    ("softmax", None, lambda z: torch.softmax(z, -1)),
    ("swish", None, F.silu),
    ("gelu_approx", None, lambda z: F.gelu(z, approximate="tanh")),
])
def test_activation_layer(name, alpha, reference):
    model = build([{"type": "dense", "units": 6},
                   {"type": "activation", "activation": name, "alpha": alpha},
                   {"type": "dense", "units": "auto"}])
    z = torch.randn(10, 6)
    torch.testing.assert_close(model.layers["activation_2"](z), reference(z))


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("shape", [(7, 1), (128, 10), (5, 15), (33, 16), (9, 40), (2, 3, 10), (0, 4)])
def test_softmax_rows_is_torch_softmax_on_every_width(shape, log):
    # Narrow rows take a transposed path (see softmax_rows); values and gradients must not change.
    z = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    ours = softmax_rows(z, log=log)
    theirs = (torch.log_softmax if log else torch.softmax)(z, -1)
    assert ours.shape == theirs.shape and ours.is_contiguous()
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    g = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(torch.autograd.grad(ours, z, g)[0], torch.autograd.grad(theirs, z, g)[0],
                               rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------ prelu
def test_prelu_starts_as_relu_and_is_torchs_prelu_with_its_alphas():
    model = build([{"type": "dense", "units": 6, "bias_initializer": "random_normal"},
                   {"type": "prelu", "name": "act"},
                   {"type": "dense", "units": "auto"}])
    prelu, x = model.layers["act"], inputs()["features"]
    h = model.layers["dense_1"](x).detach()
    assert (h < 0).any() and (h > 0).any()
    torch.testing.assert_close(prelu(h), torch.relu(h), rtol=0, atol=0)   # Keras' zeros alpha
    with torch.no_grad():
        prelu.weight.copy_(torch.linspace(-0.5, 1.0, 6))
    reference = torch.nn.PReLU(6)
    reference.load_state_dict(prelu.state_dict())                          # same key and layout
    torch.testing.assert_close(prelu(h), reference(h), rtol=0, atol=0)
    keras = h.clamp(min=0) + prelu.weight.detach() * h.clamp(max=0)         # Keras' formula
    torch.testing.assert_close(prelu(h), keras)
    # alpha learns: its gradient is the upstream gradient times min(0, x), summed over rows.
    g = torch.randn(h.shape, generator=torch.Generator().manual_seed(2))
    (prelu(h) * g).sum().backward()
    torch.testing.assert_close(prelu.weight.grad, (g * h.clamp(max=0)).sum(0))


def test_shared_prelu_has_one_alpha_from_its_initializer():
    model = build([{"type": "dense", "units": 5},
                   {"type": "prelu", "name": "act", "shared": True,
                    "alpha_initializer": {"name": "constant", "value": 0.25}},
                   {"type": "dense", "units": "auto"}])
    prelu = model.layers["act"]
    assert prelu.weight.tolist() == [0.25]                                   # torch's nn.PReLU()
    h = torch.linspace(-2, 2, 10).reshape(2, 5)
    torch.testing.assert_close(prelu(h), torch.nn.PReLU()(h).detach())
    rows = {r["layer"]: r["params"] for r in model.summary()}
    assert rows["act"] == 1
    # Training reaches it: the optimizer holds it with the dense weights.
    cfg = config.parse({"model": {"layers": [{"type": "dense", "units": 5}, {"type": "prelu", "name": "act"},
                                             {"type": "dense", "units": "auto"}]},
                        "train": {"progress": "quiet", "epochs": 2, "optimizer": {"name": "sgd", "lr": 0.1}}})
    model = build_model(cfg.model, cfg.train, REG3, 0)
    gen = torch.Generator().manual_seed(4)
    data = Split({"features": torch.randn(64, 8, generator=gen)}, {"target": torch.randn(64, 3, generator=gen)})
    Trainer(model, cfg.train, seed=0).fit(data)
    assert torch.count_nonzero(model.layers["act"].weight) == 5


def test_prelu_alpha_initializer_that_cannot_fill_a_vector_is_refused():
    with pytest.raises(config.ConfigError) as err:
        build([{"type": "dense", "units": 4}, {"type": "prelu", "alpha_initializer": "orthogonal"},
               {"type": "dense", "units": "auto"}])
    assert ("model.layers[1].alpha_initializer: initializer orthogonal cannot fill a prelu alpha (1-D)"
            in str(err.value))


# --------------------------------------------------------------- gaussian noise
def test_gaussian_noise_only_in_training():
    stddev = 0.5
    model = build([{"type": "gaussian_noise", "stddev": stddev}, {"type": "dense", "units": "auto"}])
    noise = model.layers["gaussian_noise_1"]
    x = torch.randn(4000, 8)
    torch.manual_seed(0)
    noise.train()
    delta = noise(x) - x
    assert abs(delta.mean().item()) < 0.01
    assert abs(delta.std().item() - stddev) < 0.01
    noise.eval()
    assert torch.equal(noise(x), x)



# Models that, between them, hold every layer type: what each one's training step draws from
# torch's global generator decides whether the trainer seeds it every epoch (model.draws_noise).
_NOISE_MODELS = [([{"type": kind, **args}, {"type": "dense", "units": "auto"}], REG3, {})
                 for kind, args in [("dropout", {"rate": 0.3}), ("alpha_dropout", {"rate": 0.3}),
                                    ("gaussian_dropout", {"rate": 0.3}), ("gaussian_noise", {"stddev": 0.5})]]
_QUIET_MODELS = [
    ([{"type": "dense", "units": 6, "activation": "relu"}, {"type": "batchnorm"}, {"type": "layernorm"},
      {"type": "activation", "activation": "tanh"}, {"type": "prelu"},
      {"type": "activity_regularization", "l2": 0.1}, {"type": "dense", "units": "auto"}], REG3, {}),
    ([{"type": "dense", "name": "da", "inputs": ["a"], "units": 4},
      {"type": "dense", "name": "db", "inputs": ["b"], "units": 4},
      *({"type": kind, "name": kind, "inputs": ["da", "db"]}
        for kind in ("add", "subtract", "multiply", "average", "maximum", "minimum", "dot")),
      {"type": "concatenate", "name": "cat",
       "inputs": ["add", "subtract", "multiply", "average", "maximum", "minimum", "dot"]},
      {"type": "dense", "name": "out", "inputs": ["cat"], "units": "auto"}],
     DataSpec({"a": 3, "b": 5}, {"target": TargetSpec("regression", 3)}),
     {"inputs": {"a": {"columns": ["x0"]}, "b": {"columns": "rest"}}}),
]


def _draws(layers, spec, model_args) -> tuple[bool, bool]:
    """(model.draws_noise, whether a training step's forward and backward moved the global generator)."""
    model = build(layers, spec, **model_args)
    gen = torch.Generator().manual_seed(3)
    x = {name: torch.randn(16, width, generator=gen) for name, width in spec.inputs.items()}
    torch.manual_seed(0)
    before = torch.get_rng_state()
    model.train()
    model(x)["target"].square().sum().backward()
    return model.draws_noise, not torch.equal(torch.get_rng_state(), before)


def test_draws_noise_names_exactly_the_layers_that_draw_from_the_global_generator():
    covered = {layer["type"] for layers, _, _ in _NOISE_MODELS + _QUIET_MODELS for layer in layers}
    assert covered == set(LAYERS.names())  # a new layer type joins one of the lists
    for case in _NOISE_MODELS:
        assert _draws(*case) == (True, True), case[0][0]
    for case in _QUIET_MODELS:
        assert _draws(*case) == (False, False)


# ------------------------------------------------------------------ graph model
def test_add_and_concatenate_in_a_graph_model():
    spec = DataSpec({"a": 3, "b": 5}, {"target": TargetSpec("regression", 2)})
    model = build([
        {"type": "dense", "name": "da", "inputs": ["a"], "units": 4, "activation": "relu"},
        {"type": "dense", "name": "db", "inputs": ["b"], "units": 4, "activation": "tanh"},
        {"type": "add", "name": "sum", "inputs": ["da", "db"]},
        {"type": "concatenate", "name": "cat", "inputs": ["sum", "a"]},
        {"type": "dense", "name": "out", "inputs": ["cat"], "units": "auto"},
    ], spec, inputs={"a": {"columns": ["x0"]}, "b": {"columns": "rest"}})
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 3, generator=gen), torch.randn(7, 5, generator=gen)
    L = model.layers
    da = F.relu(a @ L["da"].weight.T + L["da"].bias)
    db = torch.tanh(b @ L["db"].weight.T + L["db"].bias)
    cat = torch.cat([da + db, a], dim=1)                       # (7, 4 + 3)
    expected = cat @ L["out"].weight.T + L["out"].bias
    torch.testing.assert_close(model({"a": a, "b": b})["target"], expected, rtol=1e-5, atol=1e-5)
    widths = {r["layer"]: r["output_shape"] for r in model.summary()}
    assert widths == {"da": "(None, 4)", "db": "(None, 4)", "sum": "(None, 4)", "cat": "(None, 7)",
                      "out": "(None, 2)"}


@pytest.mark.parametrize("kind, formula", [
    ("add", lambda a, b, c: a + b + c),
    ("multiply", lambda a, b, c: a * b * c),
    ("average", lambda a, b, c: (a + b + c) / 3),
    ("maximum", lambda a, b, c: torch.maximum(torch.maximum(a, b), c)),
    ("minimum", lambda a, b, c: torch.minimum(torch.minimum(a, b), c)),
])
def test_merge_layers_are_the_element_wise_formula(kind, formula):
    spec = DataSpec({"a": 4, "b": 4, "c": 4}, {"target": TargetSpec("regression", 2)})
    model = build([{"type": kind, "name": "m", "inputs": ["a", "b", "c"]},
                   {"type": "dense", "name": "out", "units": "auto"}],
                  spec, inputs={"a": {"columns": ["x0"]}, "b": {"columns": ["x1"]}, "c": {"columns": "rest"}})
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(9, 4, generator=gen, requires_grad=True) for _ in range(3))
    merged = model.layers["m"](a, b, c)
    expected = formula(a, b, c)
    torch.testing.assert_close(merged, expected)
    # Gradients reach every input as the formula's do (maximum / minimum: the winning one).
    g = torch.randn(9, 4, generator=gen)
    ours = torch.autograd.grad(merged, (a, b, c), g)
    ref = torch.autograd.grad(expected, (a, b, c), g)
    for got, want in zip(ours, ref, strict=True):
        torch.testing.assert_close(got, want)
    assert model.summary()[0]["output_shape"] == "(None, 4)"


def test_subtract_is_the_first_input_minus_the_second():
    spec = DataSpec({"a": 3, "b": 3}, {"target": TargetSpec("regression", 1)})
    model = build([{"type": "subtract", "name": "diff", "inputs": ["b", "a"]},
                   {"type": "dense", "name": "out", "units": "auto"}],
                  spec, inputs={"a": {"columns": ["x0"]}, "b": {"columns": "rest"}})
    a, b = torch.randn(5, 3), torch.randn(5, 3)
    L = model.layers
    expected = (b - a) @ L["out"].weight.T + L["out"].bias
    torch.testing.assert_close(model({"a": a, "b": b})["target"], expected)


@pytest.mark.parametrize("kind, inputs, widths, message", [
    ("subtract", ["a", "b", "c"], (3, 3, 3), "a subtract layer takes exactly 2 inputs, got 3"),
    ("average", ["a", "b"], (3, 5, 3), "an average layer needs inputs of one width, got [3, 5]"),
    ("maximum", ["a", "c"], (3, 3, 2), "a maximum layer needs inputs of one width, got [3, 2]"),
])
def test_merge_layers_refuse_inputs_that_do_not_fit(kind, inputs, widths, message):
    spec = DataSpec(dict(zip("abc", widths, strict=True)), {"target": TargetSpec("regression", 1)})
    with pytest.raises(ValueError) as err:
        build([{"type": kind, "name": "m", "inputs": inputs}, {"type": "dense", "units": "auto"}], spec,
              inputs={"a": {"columns": ["x0"]}, "b": {"columns": ["x1"]}, "c": {"columns": "rest"}})
    assert str(err.value) == f"model.layers[0] (m): {message}"


@pytest.mark.parametrize("normalize", [False, True])
def test_dot_is_each_rows_dot_product_or_cosine_similarity(normalize):
    spec = DataSpec({"a": 4, "b": 4}, {"target": TargetSpec("binary", 1)})
    model = build([{"type": "dense", "name": "ea", "inputs": ["a"], "units": 3},
                   {"type": "dense", "name": "eb", "inputs": ["b"], "units": 3},
                   {"type": "dot", "name": "sim", "inputs": ["ea", "eb"], "normalize": normalize},
                   {"type": "dense", "name": "out", "units": "auto", "activation": "auto"}],
                  spec, inputs={"a": {"columns": ["x0"]}, "b": {"columns": "rest"}})
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 3, generator=gen), torch.randn(6, 3, generator=gen)
    a[0] = 0.0                                            # a zero row: 0, not NaN, as Keras gives
    expected = (F.cosine_similarity(a, b, dim=1) if normalize else (a * b).sum(1)).reshape(6, 1)
    torch.testing.assert_close(model.layers["sim"](a, b), expected)
    assert model.summary()[2]["output_shape"] == "(None, 1)"
    with pytest.raises(ValueError, match=r"model.layers\[2\] \(sim\): a dot layer needs inputs of one width, "
                                         r"got \[3, 2\]"):
        build([{"type": "dense", "name": "ea", "inputs": ["a"], "units": 3},
               {"type": "dense", "name": "eb", "inputs": ["b"], "units": 2},
               {"type": "dot", "name": "sim", "inputs": ["ea", "eb"]},
               {"type": "dense", "units": "auto"}], spec, inputs={"a": {"columns": ["x0"]}, "b": {"columns": "rest"}})


# ------------------------------------------------------------ layer normalization
def test_layernorm_is_keras_formula_with_its_defaults():
    model = build([{"type": "dense", "units": 6, "activation": "relu"},
                   {"type": "layernorm", "gamma_initializer": "random_normal", "beta_initializer": "random_uniform"},
                   {"type": "dense", "units": "auto"}])
    ln = model.layers["layernorm_2"]
    assert ln.eps == 1e-3                                             # Keras' default epsilon
    assert {n: tuple(p.shape) for n, p in ln.named_parameters()} == {"weight": (6,), "bias": (6,)}
    x = torch.randn(10, 6, requires_grad=True)
    mean = x.mean(1, keepdim=True)
    var = ((x - mean) ** 2).mean(1, keepdim=True)                     # biased, as Keras'
    expected = (x - mean) / torch.sqrt(var + 1e-3) * ln.weight + ln.bias
    torch.testing.assert_close(ln(x), expected)
    g = torch.randn(10, 6)
    ours = torch.autograd.grad(ln(x), (x, ln.weight, ln.bias), g)
    ref = torch.autograd.grad(expected, (x, ln.weight, ln.bias), g)
    for got, want in zip(ours, ref, strict=True):
        torch.testing.assert_close(got, want)
    rows = {r["layer"]: r["params"] for r in model.summary()}
    assert rows["layernorm_2"] == 12                                  # gamma and beta, as Keras counts


def test_layernorm_defaults_start_as_plain_standardization():
    ln = build([{"type": "layernorm"}, {"type": "dense", "units": "auto"}]).layers["layernorm_1"]
    assert torch.equal(ln.weight, torch.ones(8)) and torch.equal(ln.bias, torch.zeros(8))
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0)) * 5 + 3
    out = ln(x)
    torch.testing.assert_close(out.mean(1), torch.zeros(200), atol=1e-5, rtol=0)
    var = x.var(1, correction=0)  # a row's variance shrinks by var / (var + eps), Keras' formula
    torch.testing.assert_close(out.var(1, correction=0), var / (var + ln.eps), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("center, scale, names", [(False, True, ["weight"]), (True, False, ["bias"]),
                                                  (False, False, [])])
def test_layernorm_without_center_or_scale_has_no_such_parameter(center, scale, names):
    ln = build([{"type": "layernorm", "center": center, "scale": scale, "epsilon": 1e-5},
                {"type": "dense", "units": "auto"}]).layers["layernorm_1"]
    assert [n for n, _ in ln.named_parameters()] == names
    x = torch.randn(7, 8)
    torch.testing.assert_close(ln(x), F.layer_norm(x, (8,), ln.weight, ln.bias, 1e-5))


# ------------------------------------------------------------------- penalties
def test_l1_l2_penalty_is_the_formula():
    model = build([{"type": "dense", "units": 6, "l1": 0.01, "l2": 0.002, "bias_initializer": "random_normal"},
                   {"type": "dense", "units": 4, "l2": 0.05, "bias_l1": 0.3, "bias_l2": 0.7,
                    "bias_initializer": "random_normal"},
                   {"type": "dense", "units": "auto"}])
    w1, w2, b2 = model.layers["dense_1"].weight, model.layers["dense_2"].weight, model.layers["dense_2"].bias
    expected = (0.01 * w1.abs().sum() + 0.002 * (w1 ** 2).sum() + 0.05 * (w2 ** 2).sum()
                + 0.3 * b2.abs().sum() + 0.7 * (b2 ** 2).sum())
    torch.testing.assert_close(model.penalty(), expected)
    model.penalty().backward()
    torch.testing.assert_close(w1.grad, 0.01 * w1.sign() + 2 * 0.002 * w1.detach())
    torch.testing.assert_close(b2.grad, 0.3 * b2.sign() + 2 * 0.7 * b2.detach())
    assert model.layers["dense_1"].bias.grad is None      # no bias penalty on that layer
    assert model.layers["dense_3"].weight.grad is None
    assert build([{"type": "dense", "units": "auto"}]).penalty() is None


def test_keras_activity_regularizer_example():
    # keras.regularizers' own example: Dense(5, kernel_initializer="ones", kernel_regularizer=L1(0.01),
    # activity_regularizer=L2(0.01)) on a batch of five rows of 2s adds 0.25 + 5.0 = 5.25 to the loss.
    spec = DataSpec({"features": 5}, {"target": TargetSpec("regression", 5)})
    model = build([{"type": "dense", "units": 5, "initializer": "ones", "l1": 0.01, "activity_l2": 0.01}], spec)
    x = torch.full((5, 5), 2.0)
    model({"features": x})
    rows = x.shape[0]
    # The activity penalty is summed over the rows, as the losses are; per batch it is Keras' value.
    torch.testing.assert_close(model.penalty(), torch.tensor(0.25))
    torch.testing.assert_close(model.activity / rows, torch.tensor(5.0))


def test_activity_penalties_are_the_formula_on_each_layer_output():
    layers = [{"type": "dense", "units": 6, "activation": "relu", "activity_l1": 0.03},
              {"type": "dense", "units": 5, "activation": "tanh"},
              {"type": "activity_regularization", "l1": 0.02, "l2": 0.5},
              {"type": "dense", "units": 4, "activation": "sigmoid", "activity_l2": 0.1},
              {"type": "dense", "units": "auto", "activation": "softmax", "activity_l1": 0.2, "activity_l2": 0.3}]
    spec = DataSpec({"features": 8}, {"target": TargetSpec("multiclass", 3)})
    for kernels in ("fused", "reference"):
        model = build(layers, spec, kernels=kernels)
        L = model.layers
        x = inputs()["features"]
        h1 = F.relu(F.linear(x, L["dense_1"].weight, L["dense_1"].bias))
        h2 = torch.tanh(F.linear(h1, L["dense_2"].weight, L["dense_2"].bias))
        h4 = torch.sigmoid(F.linear(h2, L["dense_4"].weight, L["dense_4"].bias))
        logits = F.linear(h4, L["dense_5"].weight, L["dense_5"].bias)
        probs = torch.softmax(logits, 1)   # an output's penalty reads what Keras' layer returns
        expected = (0.03 * h1.abs().sum() + 0.02 * h2.abs().sum() + 0.5 * (h2 ** 2).sum() + 0.1 * (h4 ** 2).sum()
                    + 0.2 * probs.abs().sum() + 0.3 * (probs ** 2).sum())
        raw = model({"features": x})["target"]
        torch.testing.assert_close(raw, logits, rtol=1e-5, atol=1e-5)   # the regularization layer passes on
        torch.testing.assert_close(model.activity, expected, rtol=1e-5, atol=1e-6)
        ours = torch.autograd.grad(model.activity, list(model.parameters()))
        ref = torch.autograd.grad(expected, list(model.parameters()))
        for got, want in zip(ours, ref, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert build([{"type": "dense", "units": "auto"}]).activity is None


def test_an_activity_penalty_breaks_the_fused_chain_only_where_it_must():
    model = build([{"type": "dense", "units": 6, "activation": "relu"},
                   {"type": "dense", "units": 5, "activation": "relu", "activity_l1": 0.1},
                   {"type": "dense", "units": 4, "activation": "relu"},
                   {"type": "dense", "units": "auto"}])
    assert [[n.name for n in run] for run in model._runs] == [["dense_1", "dense_2"], ["dense_3", "dense_4"]]


@pytest.mark.parametrize("key", ["bias_l1", "bias_l2", "bias_constraint", "bias_initializer"])
def test_bias_settings_on_a_layer_without_bias_are_refused(key):
    value = {"bias_constraint": "non_neg", "bias_initializer": "ones"}.get(key, 0.1)
    with pytest.raises(config.ConfigError) as err:
        build([{"type": "dense", "units": "auto", "use_bias": False, key: value}])
    assert f"model.layers[0]: {key} set, but use_bias is false: the layer has no bias" in str(err.value)


@pytest.mark.parametrize("keras, ours", [("bias_regularizer", "bias_l2"), ("activity_regularizer", "activity_l2")])
def test_keras_regularizer_keys_lead_to_ours(keras, ours):
    with pytest.raises(config.ConfigError) as err:
        build([{"type": "dense", "units": "auto", keras: 0.1}])
    assert f"{keras}: unknown key (did you mean '{ours}'?" in str(err.value)


# ---------------------------------------------------------------------- summary
def _model_with_every_parametric_layer():
    return build([{"type": "dense", "units": 32, "activation": "relu"},
                  {"type": "batchnorm"},
                  {"type": "dropout", "rate": 0.1},
                  {"type": "dense", "units": 16, "use_bias": False},
                  {"type": "dense", "units": "auto"}])


def test_summary_rows_count_parameters_and_state():
    model = _model_with_every_parametric_layer()
    rows = model.summary()
    for row in rows:
        layer = model.layers[row["layer"]]
        state = [v for k, v in layer.state_dict().items() if not k.endswith("num_batches_tracked")]
        assert row["params"] == sum(v.numel() for v in state)
    assert [r["output_shape"] for r in rows] == ["(None, 32)", "(None, 32)", "(None, 32)", "(None, 16)",
                                                 "(None, 3)"]
    assert rows[0]["params"] == 8 * 32 + 32 and rows[1]["params"] == 4 * 32 and rows[3]["params"] == 32 * 16
    text = render_summary(model)
    trainable = sum(p.numel() for p in model.parameters())
    assert f"Trainable params: {trainable:,}" in text
    assert f"Total params: {sum(r['params'] for r in rows):,}" in text
    assert f"Non-trainable params: {2 * 32:,}" in text      # batchnorm's moving mean and variance


def test_summary_command(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("data: {source: iris}\n"
                      "model:\n  layers:\n"
                      "    - {type: dense, units: 10, activation: relu}\n"
                      "    - {type: dense, units: auto, activation: auto}\n")
    assert cli.main(["summary", str(params), "--data", str(tmp_path / "none")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"dense_1 \(dense\)\s+\(None, 10\)\s+50\s", out)     # 4 features * 10 + 10
    assert re.search(r"dense_2 \(dense\)\s+\(None, 3\)\s+33\s", out)      # 10 * 3 classes + 3
    assert "Total params: 83" in out
    assert "softmax" in out and "sparse_categorical_crossentropy" in out
