"""Graph models as Keras' functional API runs them: every layer feeds an output, a layer
reading an output gets its activated value, and predict runs in inference mode."""

import pytest
import torch
import yaml

from densepipe import cli, config
from densepipe.nn.model import DataSpec, TargetSpec, build_model
from densepipe.train.loop import Split, Trainer

IRIS = DataSpec({"a": 2, "b": 2}, {"target": TargetSpec("multiclass", 3, [0, 1, 2])})
# iris split into two inputs, merged, normalized and concatenated, with one extra dense layer
# reading the merge ("unused") that no output depends on.
UNUSED_GRAPH = {
    "inputs": {"a": {"columns": ["sepal length (cm)", "sepal width (cm)"]}, "b": {"columns": "rest"}},
    "layers": [
        {"name": "da", "type": "dense", "units": 8, "activation": "relu", "inputs": ["a"]},
        {"name": "db", "type": "dense", "units": 8, "activation": "relu", "inputs": ["b"]},
        {"name": "sum", "type": "add", "inputs": ["da", "db"]},
        {"name": "bn", "type": "batchnorm", "inputs": ["sum"]},
        {"name": "c", "type": "concatenate", "inputs": ["bn", "sum"]},
        {"name": "unused", "type": "dense", "units": 50, "inputs": ["c"]},
        {"name": "out", "type": "dense", "units": "auto", "inputs": ["c"]},
    ],
    "outputs": {"out": {}},
}
UNUSED_MESSAGE = "model.layers[5] 'unused' feeds no output; remove it or list it under model.outputs"


def build(model, spec, seed=0):
    cfg = config.parse({"model": model})
    return build_model(cfg.model, cfg.train, spec, seed)


# ------------------------------------------------------------ layers feeding no output
def test_a_layer_feeding_no_output_is_refused_at_build():
    with pytest.raises(ValueError, match="^" + UNUSED_MESSAGE.replace("[", r"\[").replace("]", r"\]") + "$"):
        build(UNUSED_GRAPH, IRIS)


def test_a_layer_feeding_no_output_is_a_command_error(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"source": "iris"}, "model": UNUSED_GRAPH}))
    code = cli.main(["summary", str(params), "--data", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert code != 0
    assert err.startswith("densepipe summary: error: ") and UNUSED_MESSAGE in err
    assert "Traceback" not in err


def test_a_layer_listed_as_an_output_is_kept():
    spec = DataSpec({"a": 2, "b": 2}, {"species": TargetSpec("multiclass", 3, [0, 1, 2]),
                                        "extra": TargetSpec("regression", 50)})
    graph = {**UNUSED_GRAPH, "outputs": {"out": {"target": "species"}, "unused": {"target": "extra"}}}
    model = build(graph, spec)
    assert set(model.heads) == {"out", "unused"}


# ------------------------------------------------------- layers reading an output
def _softmax_feeds_regression():
    spec = DataSpec({"features": 4}, {"species": TargetSpec("multiclass", 3, [0, 1, 2]),
                                      "size": TargetSpec("regression", 1)})
    return build({"layers": [{"name": "h", "type": "dense", "units": 6, "activation": "tanh"},
                             {"name": "a", "type": "dense", "units": "auto", "activation": "softmax"},
                             {"name": "b", "type": "dense", "units": "auto", "inputs": ["a"]}],
                  "outputs": {"a": {"target": "species"}, "b": {"target": "size"}}}, spec)


def test_a_layer_reading_a_softmax_output_gets_probabilities():
    model = _softmax_feeds_regression()
    seen = []
    model.layers["b"].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    out = model({"features": x})
    (fed,) = seen
    assert (fed >= 0).all()
    torch.testing.assert_close(fed.sum(1), torch.ones(10))

    # The plain torch model: the loss reads a's logits, b reads a's softmax.
    L = model.layers
    logits = torch.tanh(x @ L["h"].weight.T + L["h"].bias) @ L["a"].weight.T + L["a"].bias
    torch.testing.assert_close(out["a"], logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fed, torch.softmax(logits, -1), rtol=1e-5, atol=1e-5)
    size = torch.softmax(logits, -1) @ L["b"].weight.T + L["b"].bias
    torch.testing.assert_close(out["b"], size, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.predict({"features": x})["a"], torch.softmax(logits, -1),
                               rtol=1e-5, atol=1e-5)


def test_gradients_flow_through_the_activated_output():
    model = _softmax_feeds_regression()
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    model({"features": x})["b"].sum().backward()
    L = model.layers
    ref = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    h = torch.tanh(x @ ref["layers.h.weight"].T + ref["layers.h.bias"])
    probs = torch.softmax(h @ ref["layers.a.weight"].T + ref["layers.a.bias"], -1)
    (probs @ ref["layers.b.weight"].T + ref["layers.b.bias"]).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n].grad, rtol=1e-5, atol=1e-6)
    assert L["a"].weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------ predict
def test_predict_runs_in_inference_mode_and_restores_the_mode():
    spec = DataSpec({"features": 8}, {"target": TargetSpec("regression", 2)})
    model = build({"layers": [{"type": "dense", "units": 32, "activation": "relu"},
                              {"type": "dropout", "rate": 0.5},
                              {"type": "gaussian_noise", "stddev": 1.0},
                              {"type": "dense", "units": "auto"}]}, spec)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=gen), torch.randn(64, 2, generator=gen)
    train = config.parse({"model": {"layers": [{"type": "dense", "units": "auto"}]},
                          "train": {"epochs": 1, "progress": "quiet"}}).train
    Trainer(model, train).fit(Split({"features": x}, {"target": y}))
    model.train()
    first, second = model.predict({"features": x}), model.predict({"features": x})
    assert model.training
    torch.testing.assert_close(first["target"], second["target"], rtol=0, atol=0)
    model.eval()
    torch.testing.assert_close(model({"features": x})["target"], first["target"], rtol=0, atol=0)
    model.predict({"features": x})
    assert not model.training
