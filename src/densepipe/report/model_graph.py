"""The model as a picture, as Keras' plot_model(show_shapes=True) draws it: one box per input,
layer and output, arrows along the data flow, each layer box with its output shape."""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # files only: no display on a build machine
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from densepipe.nn.model import DenseModel  # noqa: E402

# Box kinds and their colours: inputs and outputs stand out from the layers between them.
COLORS = {"input": "#dbe9f6", "layer": "#f4f4f4", "output": "#fde2c8"}


@dataclass(frozen=True)
class Box:
    name: str
    kind: str       # input | layer | output
    lines: tuple[str, ...]


def model_graph(model: DenseModel) -> tuple[list[Box], list[tuple[str, str]]]:
    """Boxes in data-flow order and the (source, destination) edges between them. Output boxes
    are named "output:<name>" so an output may share its name with the layer feeding it."""
    boxes = [Box(name, "input", (name, "input", f"(None, {width})")) for name, width in model.input_widths.items()]
    edges = []
    for row in model.summary():
        boxes.append(Box(row["layer"], "layer", (row["layer"], row["type"], row["output_shape"])))
        edges += [(src, row["layer"]) for src in row["inputs"].split(", ") if src]
    for name, head in model.heads.items():
        boxes.append(Box(f"output:{name}", "output", (name, f"output: {head.loss}", f"activation: {head.activation}")))
        edges.append((head.node, f"output:{name}"))
    return boxes, edges


def levels(boxes: list[Box], edges: list[tuple[str, str]]) -> dict[str, int]:
    """Each box's row in the picture: inputs at 0, anything else one below its lowest source.
    The boxes come in data-flow order, so one pass finds every source's row first."""
    sources: dict[str, list[str]] = {}
    for src, dst in edges:
        sources.setdefault(dst, []).append(src)
    row: dict[str, int] = {}
    for box in boxes:
        row[box.name] = 1 + max((row[s] for s in sources.get(box.name, [])), default=-1)
    return row


def model_graph_figure(model: DenseModel) -> Figure:
    boxes, edges = model_graph(model)
    row = levels(boxes, edges)
    rows: dict[int, list[Box]] = {}
    for box in boxes:
        rows.setdefault(row[box.name], []).append(box)
    width = max(len(r) for r in rows.values())
    fig, ax = plt.subplots(figsize=(max(3.2, 2.6 * width), 1.05 * len(rows) + 0.4))
    at: dict[str, tuple[float, float]] = {}
    for depth, members in rows.items():
        for i, box in enumerate(members):
            # Centred: a row of k boxes spreads over the widest row's width.
            at[box.name] = ((i + 0.5) * width / len(members), -depth)
    texts = {}
    for box in boxes:
        x, y = at[box.name]
        texts[box.name] = ax.text(x, y, "\n".join(box.lines), ha="center", va="center", fontsize=8,
                                  bbox=dict(boxstyle="round,pad=0.4", facecolor=COLORS[box.kind], edgecolor="#777777"))
    for src, dst in edges:
        # From the bottom of the source's label to the top of the destination's (fractions of each
        # label's extent), so every arrowhead ends at its box, whatever the angle; the few points
        # of shrink clear the box's padding.
        ax.annotate("", xy=(0.5, 1.0), xycoords=texts[dst], xytext=(0.5, 0.0), textcoords=texts[src],
                    arrowprops=dict(arrowstyle="-|>", color="#555555", shrinkA=4, shrinkB=4, lw=1))
    ax.set_xlim(0, width)
    ax.set_ylim(-len(rows) + 0.5, 0.5)
    ax.axis("off")
    ax.set_title("model graph", fontsize=10)
    return fig
