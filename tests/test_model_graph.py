"""The model graph picture (Keras' plot_model with show_shapes): its boxes, arrows and rows for
sequential and functional models, the PNG in the report's figures and from `densepipe summary --plot`."""

from __future__ import annotations

from densepipe import config
from densepipe.cli import main
from densepipe.nn.model import DataSpec, TargetSpec, build_model
from densepipe.report.figures import FIGURES, to_png
from densepipe.report.model_graph import levels, model_graph, model_graph_figure
from test_summary_command import PARAMS

PNG = b"\x89PNG\r\n\x1a\n"
# Two inputs merged, one trunk, a regression head and a classification head.
TWO_HEADS = {
    "inputs": {"a": {"columns": ["sepal length (cm)", "sepal width (cm)"]}, "b": {"columns": "rest"}},
    "layers": [
        {"name": "da", "type": "dense", "units": 8, "activation": "relu", "inputs": ["a"]},
        {"name": "db", "type": "dense", "units": 4, "activation": "relu", "inputs": ["b"]},
        {"name": "c", "type": "concatenate", "inputs": ["da", "db"]},
        {"name": "trunk", "type": "dense", "units": 6, "activation": "tanh", "inputs": ["c"]},
        {"name": "width", "type": "dense", "units": "auto", "inputs": ["trunk"]},
        {"name": "kind", "type": "dense", "units": "auto", "inputs": ["trunk"]},
    ],
    "outputs": {"width": {"target": "petal_width"}, "kind": {"target": "species"}},
}
TWO_HEADS_SPEC = DataSpec({"a": 2, "b": 2}, {"petal_width": TargetSpec("regression", 1),
                                              "species": TargetSpec("multiclass", 3, [0, 1, 2])})


def build(model: dict, spec: DataSpec):
    cfg = config.parse({"model": model})
    return build_model(cfg.model, cfg.train, spec, 0)


def test_sequential_model_is_one_column():
    model = build({"layers": [{"type": "dense", "units": 5, "activation": "relu", "name": "hidden"},
                              {"type": "dropout", "rate": 0.1, "name": "drop"},
                              {"type": "dense", "units": "auto", "activation": "auto", "name": "out"}]},
                  DataSpec({"features": 3}, {"y": TargetSpec("binary", 1, [0, 1])}))
    boxes, edges = model_graph(model)
    assert [(b.name, b.kind) for b in boxes] == [("features", "input"), ("hidden", "layer"), ("drop", "layer"),
                                                 ("out", "layer"), ("output:y", "output")]
    assert edges == [("features", "hidden"), ("hidden", "drop"), ("drop", "out"), ("out", "output:y")]
    assert boxes[1].lines == ("hidden", "dense", "(None, 5)")
    assert boxes[-1].lines == ("y", "output: binary_crossentropy", "activation: sigmoid")
    assert levels(boxes, edges) == {"features": 0, "hidden": 1, "drop": 2, "out": 3, "output:y": 4}


def test_functional_model_with_two_inputs_and_two_heads():
    boxes, edges = model_graph(build(TWO_HEADS, TWO_HEADS_SPEC))
    assert set(edges) == {("a", "da"), ("b", "db"), ("da", "c"), ("db", "c"), ("c", "trunk"),
                          ("trunk", "width"), ("trunk", "kind"), ("width", "output:width"),
                          ("kind", "output:kind")}
    rows = levels(boxes, edges)
    assert rows == {"a": 0, "b": 0, "da": 1, "db": 1, "c": 2, "trunk": 3, "width": 4, "kind": 4,
                    "output:width": 5, "output:kind": 5}
    assert {b.name: b.lines[2] for b in boxes if b.kind == "layer"} == {
        "da": "(None, 8)", "db": "(None, 4)", "c": "(None, 12)", "trunk": "(None, 6)", "width": "(None, 1)",
        "kind": "(None, 3)"}


def test_a_box_sits_below_its_lowest_source():
    # A skip connection: "c" reads the input directly and a deeper layer, so it goes below the deeper one.
    model = build({"layers": [{"name": "h1", "type": "dense", "units": 4, "inputs": ["features"]},
                              {"name": "h2", "type": "dense", "units": 4, "inputs": ["h1"]},
                              {"name": "c", "type": "concatenate", "inputs": ["features", "h2"]},
                              {"name": "out", "type": "dense", "units": "auto", "inputs": ["c"]}],
                   "outputs": {"out": {}}},
                  DataSpec({"features": 3}, {"y": TargetSpec("regression", 1)}))
    assert levels(*model_graph(model))["c"] == 3


def test_figure_draws_every_box_and_arrow():
    model = build(TWO_HEADS, TWO_HEADS_SPEC)
    fig = model_graph_figure(model)
    labels = [t.get_text() for t in fig.axes[0].texts if t.get_text()]  # arrows are text-less annotations
    arrows = [t for t in fig.axes[0].texts if not t.get_text()]
    assert sorted(label.split("\n")[0] for label in labels) == sorted(
        ["a", "b", "da", "db", "c", "trunk", "width", "kind", "width", "kind"])
    assert "trunk\ndense\n(None, 6)" in labels
    assert len(arrows) == 9
    # Each arrow runs from its source's box to its destination's, anchored to the two labels (so its
    # head ends at the destination box, at any angle): the pairs are the graph's edges.
    name = {id(t): t.get_text().split("\n")[0] for t in fig.axes[0].texts if t.get_text()}
    drawn = sorted((name[id(a.anncoords)], name[id(a.xycoords)]) for a in arrows)
    boxes, edges = model_graph(model)
    label = {b.name: b.lines[0] for b in boxes}
    assert drawn == sorted((label[src], label[dst]) for src, dst in edges)
    assert to_png(fig).startswith(PNG)
    assert to_png(FIGURES["model_graph"]({"model": model})).startswith(PNG)
    assert FIGURES["model_graph"]({}) is None


def test_summary_command_writes_the_graph(tmp_path, capsys):
    import yaml

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(PARAMS))
    out = tmp_path / "graphs" / "model.png"
    assert main(["summary", str(params), "--data", str(tmp_path / "none"), "--plot", str(out)]) == 0
    assert f"model graph: {out}" in capsys.readouterr().out
    assert out.read_bytes().startswith(PNG)
