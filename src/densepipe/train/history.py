"""Per-epoch training history: one record per epoch, written as CSV for `dvc plots`."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from densepipe.io import write_text


class History:
    def __init__(self, records: list[dict] | None = None):
        self.records: list[dict] = list(records or [])

    def append(self, epoch: int, logs: dict) -> None:
        self.records.append({"epoch": epoch + 1, **logs})

    def columns(self) -> list[str]:
        cols: dict[str, None] = {}
        for r in self.records:
            cols.update(dict.fromkeys(r))
        return list(cols)

    def series(self, key: str) -> list[float]:
        return [r[key] for r in self.records if key in r]

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns())
        writer.writeheader()
        writer.writerows(self.records)
        return buf.getvalue()

    def save_csv(self, path: str | Path) -> None:
        write_text(path, self.to_csv())

    @classmethod
    def from_csv(cls, path: str | Path) -> History:
        with open(path, newline="") as f:
            rows = [{k: (int(v) if k == "epoch" else float(v)) for k, v in r.items() if v != ""}
                    for r in csv.DictReader(f)]
        return cls(rows)

    def __len__(self) -> int:
        return len(self.records)
