"""Assembles the report as one self-contained HTML file (figures inlined)."""

from __future__ import annotations

import html
import json

import yaml

from densepipe.report.figures import data_uri

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222;padding:0 1em}
h1{font-size:1.6em} h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.9em} td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}
th{background:#f4f4f4} .flag{background:#fff4e5;border-left:4px solid #f0a030;padding:.5em 1em;margin:.5em 0}
.ok{background:#eef8ee;border-left:4px solid #4a4;padding:.5em 1em} figure{display:inline-block;margin:.5em}
pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:.85em}
"""


def _table(rows: list[dict]) -> str:
    if not rows:
        return "<p>(none)</p>"
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    if isinstance(v, bool):  # before int, which it is too
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return "" if v is None else str(v)


def _metric_rows(metrics: dict, prefix: str = "") -> list[dict]:
    rows = []
    for k, v in metrics.items():
        if isinstance(v, dict):
            if k != "per_class":
                rows += _metric_rows(v, f"{prefix}{k}.")
        elif isinstance(v, int | float):
            rows.append({"metric": f"{prefix}{k}", "value": v})
    return rows


def render(title: str, figures: list[tuple[str, bytes]], flags: list[tuple[str, str]], summary: list[dict],
           test_metrics: dict, train_metrics: dict, params: dict, per_class: dict | None = None) -> str:
    """per_class: output name ("" for a model with one output) -> class -> precision, recall, ..."""
    flag_html = ("".join(f'<div class="flag"><b>{html.escape(n.replace("_", " "))}</b>: {html.escape(m)}</div>'
                         for n, m in flags)
                 or '<div class="ok">No warning signs in the training history.</div>')
    figs = "".join(f'<figure><img alt="{html.escape(n)}" src="{data_uri(png)}"><figcaption>'
                   f'{html.escape(n.replace("_", " "))}</figcaption></figure>' for n, png in figures)
    per_class_html = "".join(
        f"<h3>Per class{f' ({html.escape(name)})' if name else ''}</h3>"
        f"{_table([{'class': c, **v} for c, v in table.items()])}" for name, table in (per_class or {}).items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
<h2>Diagnostics</h2>{flag_html}
<h2>Test metrics</h2>{_table(_metric_rows(test_metrics))}{per_class_html}
<h2>Training (the epoch the model holds)</h2>{_table(_metric_rows(train_metrics))}
<h2>Figures</h2>{figs}
<h2>Model</h2>{_table(summary)}
<h2>Parameters (resolved)</h2><pre>{html.escape(yaml.safe_dump(params, sort_keys=False))}</pre>
<script type="application/json" id="densepipe-metrics">{html.escape(json.dumps(test_metrics))}</script>
</body></html>
"""
