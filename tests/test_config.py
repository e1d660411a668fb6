"""Invalid params produce one specific message naming the key path, the value and what
is allowed (with "did you mean"); `densepipe validate` and `densepipe config`."""

import re

import pytest
import yaml

from densepipe import cli, config
from densepipe.nn.model import DataSpec, TargetSpec, build_model
from densepipe.stages.common import as_config_error

OUT = [{"type": "dense", "units": "auto", "activation": "auto"}]


def error(raw) -> str:
    with pytest.raises(config.ConfigError) as err:
        config.parse(raw)
    return str(err.value)


def with_model(layers=None, **sections):
    return {"model": {"layers": layers or OUT}, **sections}


@pytest.mark.parametrize("raw,expected", [
    # unknown keys, with the closest allowed one
    (with_model(train={"epocs": 3}), r"train\.epocs: unknown key \(did you mean 'epochs'\?\); allowed keys "
                                     r"here: epochs, batch_size"),
    ({"model": {"layers": [{"type": "dense", "units": "auto", "kernal_initializer": "he_normal"}]}},
     r"model\.layers\[0\]\.kernal_initializer: unknown key \(did you mean 'initializer'\?.*"
     r"allowed keys here: name, inputs, type, units, activation"),
    ({"model": {"layers": [{"type": "batchnorm", "momentun": 0.9}, *OUT]}},
     r"model\.layers\[0\]\.momentun: unknown key \(did you mean 'momentum'\?\); allowed keys here: name, "
     r"inputs, type, momentum, epsilon"),
    (with_model(train={"optimizer": {"nme": "adam"}}),
     r"train\.optimizer\.nme: unknown key \(did you mean 'name'"),
    ({"modle": {}}, r"modle: unknown key \(did you mean 'model'\?\)"),
    ({"model": {"layers": OUT, "outputs": {"dense_1": {"lss": "mse"}}}},
     r"model\.outputs\.dense_1\.lss: unknown key \(did you mean 'loss'\?\); allowed keys here: target, loss"),
    # wrong types
    (with_model(train={"epochs": "many"}), r"train\.epochs: Input should be a valid integer.*\(got 'many'\)"),
    (with_model(train={"shuffle": "sometimes"}), r"train\.shuffle: Input should be a valid boolean.*"
                                                 r"\(got 'sometimes'\)"),
    ({"model": {"layers": [{"type": "dense", "units": "wide"}, *OUT]}},
     r"model\.layers\[0\]\.units: Input should be a valid integer.* -- or: Input should be 'auto' "
     r"\(got 'wide'\)"),
    # out of range
    ({"model": {"layers": [{"type": "dropout", "rate": 1.5}, *OUT]}},
     r"model\.layers\[0\]\.rate: Input should be less than 1 \(got 1\.5\)"),
    (with_model(train={"optimizer": {"lr": -0.1}}), r"train\.optimizer\.lr: Input should be greater than 0 "
                                                    r"\(got -0\.1\)"),
    (with_model(split={"test_size": 0.6, "val_size": 0.5}),
     r"split\.test_size \+ split\.val_size must be < 1"),
    ({"model": {"layers": [{"type": "dense", "units": 0}, *OUT]}}, r"units: Input should be greater than 0"),
    # unknown names from a vocabulary
    ({"model": {"layers": [{"type": "dense", "units": 4, "activation": "rleu"}, *OUT]}},
     r"model\.layers\[0\]\.activation: unknown activation 'rleu' \(did you mean 'relu'\?\); allowed: elu, "
     r"exponential, gelu.*\(got 'rleu'\)"),
    ({"model": {"layers": [{"type": "activation", "activation": "tanhh"}, *OUT]}},
     r"model\.layers\[0\]\.activation: unknown activation 'tanhh' \(did you mean 'tanh'\?\)"),
    ({"model": {"layers": [{"type": "dense", "units": 4, "initializer": "glorot_unifrom"}, *OUT]}},
     r"model\.layers\[0\]\.initializer: unknown initializer 'glorot_unifrom' "
     r"\(did you mean 'glorot_uniform'"),
    ({"model": {"layers": [{"type": "dense", "units": 4, "initializer": {"name": "he_normall"}}, *OUT]}},
     r"model\.layers\[0\]\.initializer: unknown initializer 'he_normall' \(did you mean 'he_normal'"),
    (with_model(train={"loss": "binary_crossentropi"}),
     r"train\.loss: unknown loss 'binary_crossentropi' \(did you mean 'binary_crossentropy'\?\); allowed: "),
    ({"model": {"layers": OUT, "outputs": {"dense_1": {"loss": {"name": "hubber", "delta": 2}}}}},
     r"model\.outputs\.dense_1\.loss: unknown loss 'hubber' \(did you mean 'huber'\?\)"),
    (with_model(train={"optimizer": {"name": "adamm"}}),
     r"train\.optimizer\.name: unknown optimizer 'adamm' \(did you mean 'adam'\?\); "
     r"allowed: adagrad, adam, "),
    (with_model(train={"metrics": ["accuracyy"]}),
     r"train\.metrics: unknown metric 'accuracyy' \(did you mean 'accuracy'\?\); allowed: accuracy, auc, f1"),
    (with_model(train={"callbacks": [{"type": "early_stoping"}]}),
     r"train\.callbacks\[0\]\.type: unknown callback 'early_stoping' \(did you mean 'early_stopping'\?\)"),
    (with_model(data={"source": "digit"}),
     r"data\.source: unknown data source 'digit' \(did you mean 'digits'"),
    # unknown layer type
    ({"model": {"layers": [{"type": "dence", "units": 3}, *OUT]}},
     r"model\.layers\[0\]: unknown layer type 'dence' \(did you mean 'dense'\?\); "
     r"allowed: 'dense', 'dropout'"),
    # callback arguments are checked by the callback
    (with_model(train={"callbacks": [{"type": "early_stopping", "patiense": 3}]}),
     r"train\.callbacks\[0\]: callback early_stopping: unknown argument 'patiense' \(did you mean "
     r"'patience'\?\); allowed: monitor, min_delta, patience"),
    (with_model(train={"callbacks": [{"type": "reduce_on_plateau", "factor": 2}]}),
     r"callback reduce_on_plateau: factor: Input should be less than 1 \(got 2\)"),
    (with_model(train={"callbacks": [{"type": "multistep", "milestones": [5, 3]}]}),
     r"train\.callbacks\[0\]: callback multistep: milestones: milestones must be increasing epochs of at "
     r"least 1 \(got \[5, 3\]\)$"),
    (with_model(train={"callbacks": [{"type": "piecewise_constant", "boundaries": [3], "values": [0.1, 0.2, 0.3]}]}),
     r"train\.callbacks\[0\]: callback piecewise_constant: values needs one entry more than boundaries \(2\), "
     r"got 3$"),
    (with_model(train={"callbacks": [{"type": "cosine_restarts", "t_mul": 0.5}]}),
     r"train\.callbacks\[0\]: callback cosine_restarts: t_mul: Input should be greater than or equal to 1 "
     r"\(got 0\.5\)$"),
    # wiring that needs no data
    ({"model": {"layers": [{"type": "dense", "units": "auto"}, *OUT]}},
     r"model\.layers\[0\] \(dense_1\): units: auto is only allowed on a model output \(dense_2\)"),
    ({"model": {"layers": [{"type": "dense", "units": 8, "activation": "auto"}, *OUT]}},
     r"model\.layers\[0\] \(dense_1\): activation: auto is only allowed on a model output"),
    ({"model": {"layers": [{"type": "dense", "name": "trunk", "units": 8}, *OUT], "outputs": {"head": {}}}},
     r"model\.outputs names \['head'\], which are not layers; layers: trunk, dense_2"),
    ({"model": {"layers": [{"type": "dense", "units": 8, "inputs": ["trunk"]}, *OUT]}},
     r"model\.layers\[0\] \(dense_1\): inputs \['trunk'\] are not defined before it; known: features"),
    ({"model": {"layers": [{"type": "dense", "units": 8, "name": "dense_2"}, *OUT]}},
     r"model\.layers\[1\]\.name 'dense_2' is used twice"),
    # missing
    ({}, r"model: required key is missing"),
    ({"model": {"layers": [{"type": "dropout"}, *OUT]}},
     r"model\.layers\[0\]\.rate: required key is missing"),
])
def test_invalid_params_message(raw, expected):
    msg = error(raw)
    assert msg.startswith("invalid params:\n")
    assert re.search(expected, msg), msg


def test_every_problem_is_reported_at_once():
    msg = error({"model": {"layers": [{"type": "dropout", "rate": 2}, *OUT]},
                 "train": {"epocs": 1, "batch_size": 0}})
    assert "model.layers[0].rate" in msg and "train.epocs" in msg and "train.batch_size" in msg


def test_aliases_are_canonicalized():
    cfg = config.parse({"model": {"layers": [{"type": "dense", "units": 4, "activation": "Swish",
                                              "initializer": "zero"}, *OUT]},
                        "train": {"loss": "bce", "metrics": ["acc"],
                                  "callbacks": [{"type": "EarlyStopping"}]}})
    layer = cfg.model.layers[0]
    assert (layer.activation, layer.initializer) == ("silu", "zeros")
    assert (cfg.train.loss, cfg.train.metrics, cfg.train.callbacks[0].type) == (
        "binary_crossentropy", ["accuracy"], "early_stopping")


def graph_error(layers, inputs):
    cfg = config.parse({"model": {"layers": layers, "inputs": {k: {"columns": "all"} for k in inputs}}})
    spec = DataSpec(inputs, {"target": TargetSpec("regression", 1)})
    with pytest.raises(config.ConfigError) as err:
        as_config_error(build_model, cfg.model, cfg.train, spec)
    return str(err.value)


def test_widths_that_do_not_fit():
    msg = graph_error([{"type": "dense", "name": "a1", "inputs": ["a"], "units": 4},
                       {"type": "dense", "name": "b1", "inputs": ["b"], "units": 6},
                       {"type": "add", "name": "sum", "inputs": ["a1", "b1"]},
                       {"type": "dense", "units": "auto"}], {"a": 3, "b": 5})
    assert msg == "model.layers[2] (sum): an add layer needs inputs of one width, got [4, 6]"
    msg = graph_error([{"type": "dense", "inputs": ["a", "b"], "units": 4},
                       {"type": "dense", "units": "auto"}], {"a": 3, "b": 5})
    assert msg == "model.layers[0] (dense_1): a dense layer takes exactly one input, got 2"
    msg = graph_error([{"type": "dense", "units": 4}, {"type": "dense", "units": "auto"}], {"a": 3, "b": 5})
    assert msg.startswith("model.layers[0] (dense_1): say which inputs feed it")


def test_output_width_must_match_the_target():
    cfg = config.parse({"model": {"layers": [{"type": "dense", "units": 4}]}})
    spec = DataSpec({"features": 3}, {"target": TargetSpec("multiclass", 3)})
    with pytest.raises(config.ConfigError, match=r"output 'dense_1' has 4 units but target 'target' needs 3 "
                                                 r"\(multiclass\); use units: auto"):
        as_config_error(build_model, cfg.model, cfg.train, spec)


# ----------------------------------------------------------------- the commands
def write(tmp_path, raw) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_validate_command(tmp_path, capsys):
    good = write(tmp_path, with_model())
    assert cli.main(["validate", good]) == 0
    assert capsys.readouterr().out.strip() == f"{good}: ok"
    bad = write(tmp_path, with_model(train={"epocs": 3}))
    assert cli.main(["validate", bad]) == 1
    err = capsys.readouterr().err
    assert "train.epocs: unknown key (did you mean 'epochs'?)" in err
    assert cli.main(["validate", str(tmp_path / "missing.yaml")]) == 1
    assert "params file not found" in capsys.readouterr().err
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    assert cli.main(["validate", str(tmp_path / "broken.yaml")]) == 1
    assert "not valid YAML" in capsys.readouterr().err


def test_config_resolved_shows_defaults(tmp_path, capsys):
    path = write(tmp_path, with_model(train={"epochs": 7}))
    assert cli.main(["config", path, "--resolved"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["train"]["epochs"] == 7                           # the file's value
    assert resolved["train"]["batch_size"] == 128                     # defaults filled in
    assert resolved["train"]["optimizer"] == {**resolved["train"]["optimizer"], "name": "adam", "lr": 0.001}
    assert resolved["model"]["layers"][0]["initializer"] == "glorot_uniform"
    assert resolved["split"] == {"test_size": 0.2, "val_size": 0.1, "stratify": True, "shuffle": True,
                                 "folds": None, "fold": 0}
    assert config.parse(resolved) == config.parse(yaml.safe_load(open(path)))   # round-trips


def test_named_values_are_logged_under_one_key_with_or_without_arguments():
    from densepipe.tracking import flatten

    def logged(loss, initializer):
        cfg = config.parse({"model": {"layers": [{"type": "dense", "units": 4, "initializer": initializer},
                                                 {"type": "dense", "units": "auto"}]},
                            "train": {"loss": loss}})
        return flatten(config.with_named_mappings(config.resolved(cfg)))

    plain, with_args = logged("mse", "he_normal"), logged({"name": "huber", "delta": 2.0},
                                                          {"name": "orthogonal", "gain": 2.0})
    assert plain["train.loss.name"] == "mse" and with_args["train.loss.name"] == "huber"
    assert with_args["train.loss.delta"] == "2.0" and "train.loss" not in plain
    assert plain["model.layers.0.initializer.name"] == "he_normal"
    assert with_args["model.layers.0.initializer.name"] == "orthogonal"


@pytest.mark.parametrize("text, message", [
    ("train:\n  epochs: 3\nmodel: {layers: [{type: dense, units: auto}]}\ntrain:\n  epochs: 1\n",
     "key 'train' appears twice (lines 1 and 4); the second would replace the first: merge them"),
    ("train: {epochs: 3, epochs: 4}\n", "key 'epochs' appears twice (lines 1 and 1)"),
])
def test_a_key_given_twice_is_refused(tmp_path, text, message):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert str(err.value).startswith(f"{path}: not valid YAML: {message}")


def test_a_params_file_that_is_not_text_or_is_a_folder(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\xff\xfe train")
    with pytest.raises(config.ConfigError, match="bad.yaml: not valid YAML: 'utf-8' codec can't decode"):
        config.load(bad)
    with pytest.raises(config.ConfigError, match="is a folder, not a params file"):
        config.load(tmp_path)
