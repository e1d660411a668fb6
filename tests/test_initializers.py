"""Each initializer's draws against its formula (Keras' definitions), on a large
matrix so sample moments are within a tight statistical tolerance."""

import math

import pytest
import torch

from densepipe import config
from densepipe.nn.initializers import INITIALIZERS, initialize
from densepipe.nn.model import DataSpec, TargetSpec, build_model

OUT, IN = 300, 500                 # weight (out, in): fan_in 500, fan_out 300, 150k draws
FAN_IN, FAN_OUT, FAN_AVG = IN, OUT, (IN + OUT) / 2
TRUNC_STD = 0.87962566103423978    # std of N(0, 1) truncated to [-2, 2]
REL = 0.03                         # variance tolerance (the estimate's own error is ~0.4% here)


def draw(spec, shape=(OUT, IN), seed=0):
    return initialize(torch.empty(shape), spec, torch.Generator().manual_seed(seed))


def assert_var(w, var, mean=0.0):
    assert abs(w.mean().item() - mean) < 4 * math.sqrt(var / w.numel()) + 1e-12
    assert abs(w.var().item() / var - 1) < REL


@pytest.mark.parametrize("name,var", [
    ("glorot_uniform", 1 / FAN_AVG), ("he_uniform", 2 / FAN_IN), ("lecun_uniform", 1 / FAN_IN),
    ("xavier_uniform", 1 / FAN_AVG), ("kaiming_uniform", 2 / FAN_IN),
])
def test_uniform_variance_scaling(name, var):
    w = draw(name)
    limit = math.sqrt(3 * var)                     # U(-l, l) has variance l^2 / 3
    assert w.abs().max().item() <= limit
    assert w.abs().max().item() > 0.99 * limit
    assert_var(w, var)


@pytest.mark.parametrize("name,var", [
    ("glorot_normal", 1 / FAN_AVG), ("he_normal", 2 / FAN_IN), ("lecun_normal", 1 / FAN_IN),
])
def test_keras_normals_are_truncated_and_rescaled(name, var):
    w = draw(name)
    bound = 2 * math.sqrt(var) / TRUNC_STD         # truncated at 2 std of the widened normal
    assert w.abs().max().item() <= bound
    assert w.abs().max().item() > 0.98 * bound
    assert_var(w, var)                             # the rescaling keeps the formula's variance


@pytest.mark.parametrize("name,var", [("xavier_normal", 1 / FAN_AVG), ("kaiming_normal", 2 / FAN_IN)])
def test_torch_normals_are_plain_normals(name, var):
    w = draw(name)
    assert_var(w, var)
    beyond = (w.abs() > 2 * math.sqrt(var)).float().mean().item()
    assert abs(beyond - 0.0455) < 0.005            # P(|Z| > 2) of a normal: not truncated


def test_variance_scaling_arguments():
    w = draw({"name": "variance_scaling", "scale": 3.0, "mode": "fan_out", "distribution": "uniform"})
    assert_var(w, 3.0 / FAN_OUT)
    assert w.abs().max().item() <= math.sqrt(3 * 3.0 / FAN_OUT)


@pytest.mark.parametrize("distribution,truncated", [
    ("truncated_normal", True), ("normal", True),  # Keras: "normal" is the truncated normal's older name
    ("untruncated_normal", False),
])
def test_variance_scaling_normal_distributions(distribution, truncated):
    var = 2.0 / FAN_AVG
    w = draw({"name": "variance_scaling", "scale": 2.0, "mode": "fan_avg", "distribution": distribution})
    assert_var(w, var)
    widest = w.abs().max().item() / math.sqrt(var)
    assert widest <= 2 / TRUNC_STD if truncated else widest > 3.5


def test_bias_fans_are_its_length():
    b = draw("he_uniform", shape=(20000,))
    assert_var(b, 2 / 20000)                       # Keras: fan_in = fan_out = len for 1-D shapes


def test_random_normal_and_uniform():
    assert_var(draw("random_normal"), 0.05 ** 2)   # Keras' default stddev
    assert_var(draw({"name": "random_normal", "mean": 1.0, "stddev": 0.2}), 0.04, mean=1.0)
    w = draw({"name": "random_uniform", "minval": -0.3, "maxval": 0.5})
    assert w.min().item() >= -0.3 and w.max().item() <= 0.5
    assert_var(w, 0.8 ** 2 / 12, mean=0.1)


def test_truncated_normal_redraws_beyond_two_std():
    mean, std = 0.5, 0.1
    w = draw({"name": "truncated_normal", "mean": mean, "stddev": std})
    assert (w - mean).abs().max().item() <= 2 * std
    assert_var(w, (std * TRUNC_STD) ** 2, mean=mean)   # no rescaling: truncation narrows it


@pytest.mark.parametrize("shape", [(64, 256), (256, 64)])
def test_orthogonal(shape):
    gain = 1.5
    w = draw({"name": "orthogonal", "gain": gain}, shape=shape)
    small = w @ w.T if shape[0] <= shape[1] else w.T @ w   # the smaller Gram matrix is gain^2 I
    torch.testing.assert_close(small, gain ** 2 * torch.eye(min(shape)), atol=1e-4, rtol=0)


def test_sparse_zeros_per_column():
    rows, sparsity, std = 200, 0.25, 0.03
    w = draw({"name": "sparse", "sparsity": sparsity, "stddev": std}, shape=(rows, 400))
    zeros_per_column = (w == 0).sum(dim=0)
    assert torch.all(zeros_per_column == math.ceil(sparsity * rows))
    assert abs(w[w != 0].std().item() / std - 1) < REL


@pytest.mark.parametrize("spec,value", [("zeros", 0.0), ("ones", 1.0),
                                        ({"name": "constant", "value": 0.7}, 0.7)])
def test_constant_initializers_are_exact(spec, value):
    w = draw(spec, shape=(7, 9))
    assert torch.equal(w, torch.full((7, 9), value))


@pytest.mark.parametrize("name", [n for n in INITIALIZERS.names() if n not in ("zeros", "ones", "constant")])
def test_seeded_draws_are_deterministic(name):
    a, b, c = draw(name, (40, 30), seed=5), draw(name, (40, 30), seed=5), draw(name, (40, 30), seed=6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_model_initialization_follows_config_and_seed():
    cfg = config.parse({"model": {"layers": [
        {"type": "dense", "units": 400, "initializer": "he_normal", "bias_initializer": {"name": "constant",
                                                                                         "value": 0.1}},
        {"type": "dense", "units": "auto", "initializer": "zeros"}]}})
    spec = DataSpec({"features": 300}, {"target": TargetSpec("regression", 2)})
    m1, m2, m3 = (build_model(cfg.model, cfg.train, spec, seed=s) for s in (0, 0, 1))
    w = m1.layers["dense_1"].weight
    assert_var(w.detach(), 2 / 300)
    assert w.abs().max().item() <= 2 * math.sqrt(2 / 300) / TRUNC_STD
    assert torch.equal(m1.layers["dense_1"].bias, torch.full((400,), 0.1))
    assert torch.equal(m1.layers["dense_2"].weight, torch.zeros(2, 400))
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not torch.equal(s1["layers.dense_1.weight"], s3["layers.dense_1.weight"])
