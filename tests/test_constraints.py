"""Weight constraints: each one against Keras' formula written out in NumPy (on a Keras-layout
(in, out) kernel, so the axis convention is checked too), max_norm against torch.renorm, their
place in training (after every step, not at initialization) and the config's messages."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_iris
from sklearn.preprocessing import StandardScaler

from densepipe import config
from densepipe.nn.constraints import CONSTRAINTS, constraint
from densepipe.nn.model import DataSpec, TargetSpec, build_model
from densepipe.train.loop import Split, Trainer

EPS = 1e-7  # Keras' backend epsilon


def keras_norms(k: np.ndarray, axis: int) -> np.ndarray:
    return np.sqrt(np.sum(np.square(k), axis=axis, keepdims=True))


# Keras' constraint formulas (keras/src/constraints/constraints.py), on its own layout.
KERAS = {
    "max_norm": lambda k, max_value=2.0, axis=0: k * np.clip(keras_norms(k, axis), 0, max_value)
    / (EPS + keras_norms(k, axis)),
    "min_max_norm": lambda k, min_value=0.0, max_value=1.0, rate=1.0, axis=0: k * (
        rate * np.clip(keras_norms(k, axis), min_value, max_value) + (1 - rate) * keras_norms(k, axis))
    / (EPS + keras_norms(k, axis)),
    "unit_norm": lambda k, axis=0: k / (EPS + keras_norms(k, axis)),
    "non_neg": lambda k: k * (k >= 0),
}

CASES = [
    ("max_norm", {}), ("max_norm", {"max_value": 0.7}), ("max_norm", {"max_value": 0.7, "axis": 1}),
    ("min_max_norm", {}), ("min_max_norm", {"min_value": 0.5, "max_value": 0.9, "rate": 0.3}),
    ("min_max_norm", {"min_value": 1.5, "max_value": 3.0, "axis": 1}),
    ("unit_norm", {}), ("unit_norm", {"axis": 1}), ("non_neg", {}),
]


def test_every_constraint_has_a_keras_reference():
    assert sorted(KERAS) == CONSTRAINTS.names()


@pytest.mark.parametrize(("name", "args"), CASES)
@pytest.mark.parametrize("seed", range(4))
def test_constraint_is_keras_formula_on_random_shapes(name, args, seed):
    gen = torch.Generator().manual_seed(seed)
    out_w, in_w = torch.randint(1, 9, (2,), generator=gen).tolist()
    # Norms on both sides of the limits: some rows and columns get pushed, others left alone.
    w = torch.randn(out_w, in_w, generator=gen, dtype=torch.float64) * torch.rand(out_w, 1, generator=gen,
                                                                                 dtype=torch.float64) * 2
    expected = KERAS[name](w.numpy().T.copy(), **args).T      # Keras' kernel is ours transposed
    constraint({"name": name, **args})(w)
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(("name", "args"), [c for c in CASES if c[1].get("axis", 0) == 0])
def test_constraint_on_a_bias_takes_its_whole_length(name, args):
    b = torch.randn(6, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 3
    expected = KERAS[name](b.numpy().copy(), **args)
    constraint({"name": name, **args})(b)
    np.testing.assert_allclose(b.numpy(), expected, rtol=1e-12, atol=1e-15)


def test_max_norm_is_torch_renorm_of_each_units_weights():
    w = torch.randn(16, 9, generator=torch.Generator().manual_seed(1)) * 0.6   # (out, in)
    expected = torch.renorm(w, p=2, dim=0, maxnorm=1.5)   # per output unit: Keras' axis 0
    constraint({"name": "max_norm", "max_value": 1.5})(w)
    torch.testing.assert_close(w, expected, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------- in training
IRIS = DataSpec({"features": 4}, {"target": TargetSpec("multiclass", 3, [0, 1, 2])})


def iris() -> Split:
    X, y = load_iris(return_X_y=True)
    return Split({"features": torch.tensor(StandardScaler().fit_transform(X), dtype=torch.float32)},
                 {"target": torch.tensor(y)})


def trained(layers, epochs, batch_size=150, shuffle=False):
    cfg = config.parse({"model": {"layers": layers},
                        "train": {"progress": "quiet", "epochs": epochs, "batch_size": batch_size,
                                  "shuffle": shuffle, "optimizer": {"name": "sgd", "lr": 0.5}}})
    model = build_model(cfg.model, cfg.train, IRIS, seed=0)
    Trainer(model, cfg.train, seed=0).fit(iris())
    return model


def test_constraints_follow_every_step_and_not_initialization():
    free = [{"type": "dense", "units": 8, "activation": "relu", "initializer": {"name": "random_normal",
                                                                               "stddev": 1.0}},
            {"type": "dense", "units": "auto", "activation": "auto"}]
    bound = [{**free[0], "constraint": {"name": "max_norm", "max_value": 1.0}, "bias_constraint": "non_neg"},
             free[1]]
    # Initialization leaves the weights alone, norms above the limit included.
    starts = [build_model(c.model, c.train, IRIS, seed=0).layers["dense_1"].weight
              for c in (config.parse({"model": {"layers": layers}}) for layers in (free, bound))]
    assert torch.equal(starts[0], starts[1])
    assert torch.linalg.vector_norm(starts[1], dim=1).max() > 1.5
    # One full-batch step: the constrained run's weights are the free run's, projected.
    one_free, one_bound = trained(free, 1).layers["dense_1"], trained(bound, 1).layers["dense_1"]
    w, b = one_free.weight.detach().clone(), one_free.bias.detach().clone()
    assert (b < 0).any()
    constraint({"name": "max_norm", "max_value": 1.0})(w)
    constraint("non_neg")(b)
    torch.testing.assert_close(one_bound.weight.detach(), w, rtol=0, atol=0)
    torch.testing.assert_close(one_bound.bias.detach(), b, rtol=0, atol=0)
    # Many small steps: the weights end inside the set after the last one.
    last = trained(bound, 5, batch_size=16, shuffle=True).layers["dense_1"]
    norms = torch.linalg.vector_norm(last.weight.detach(), dim=1)
    assert norms.max() <= 1.0
    assert last.bias.min() == 0.0


def test_reference_kernels_take_the_same_constraints():
    layers = [{"type": "dense", "units": 8, "activation": "relu", "constraint": "unit_norm"},
              {"type": "dense", "units": "auto", "activation": "auto", "constraint": "non_neg"}]
    models = []
    for kernels in ("fused", "reference"):
        cfg = config.parse({"model": {"kernels": kernels, "layers": layers},
                            "train": {"progress": "quiet", "epochs": 1, "batch_size": 150, "shuffle": False}})
        model = build_model(cfg.model, cfg.train, IRIS, seed=0)
        Trainer(model, cfg.train, seed=0).fit(iris())
        models.append(model)
    for (k, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    unit = torch.linalg.vector_norm(models[0].layers["dense_1"].weight.detach(), dim=1)
    torch.testing.assert_close(unit, torch.ones(8), rtol=0, atol=1e-6)


# -------------------------------------------------------------------- config
def _error(layer: dict) -> str:
    with pytest.raises(config.ConfigError) as err:
        config.parse({"model": {"layers": [{"type": "dense", "units": "auto", **layer}]}})
    return str(err.value)


@pytest.mark.parametrize(("layer", "message"), [
    ({"constraint": "maxnorm3"}, "unknown constraint 'maxnorm3' (did you mean 'maxnorm'?); "
                                 "allowed: max_norm, min_max_norm, non_neg, unit_norm"),
    ({"constraint": {"name": "max_norm", "max_val": 3}},
     "constraint max_norm: unknown argument 'max_val' (did you mean 'max_value'?); max_norm takes max_value, axis"),
    ({"constraint": {"name": "max_norm", "max_value": -1}}, "max_value: Input should be greater than 0 (got -1)"),
    ({"constraint": {"name": "min_max_norm", "min_value": 2, "max_value": 1}},
     "cannot constrain a kernel: min_value must not exceed max_value, got 2.0 > 1.0"),
    ({"bias_constraint": {"name": "unit_norm", "axis": 1}},
     "cannot constrain a bias: axis must be 0 or 1 for a kernel and 0 for a bias, got 1"),
    ({"kernel_constraint": "max_norm"}, "kernel_constraint: unknown key (did you mean 'constraint'?"),
])
def test_bad_constraints_are_refused_with_what_is_allowed(layer, message):
    assert message in _error(layer)


def test_a_constraint_is_logged_as_a_named_mapping():
    cfg = config.parse({"model": {"layers": [{"type": "dense", "units": "auto", "constraint": "nonneg"}]}})
    assert cfg.model.layers[0].constraint == "non_neg"
    flat = config.with_named_mappings(config.resolved(cfg))
    assert flat["model"]["layers"][0]["constraint"] == {"name": "non_neg"}
    assert flat["model"]["layers"][0]["bias_constraint"] is None
