"""Per-epoch progress: a line per epoch, a rich progress bar, or nothing (CI)."""

from __future__ import annotations

from densepipe.registry import Registry

PROGRESS: Registry = Registry("progress mode")
_SKIP = ("epoch_seconds", "grad_norm/")


def format_logs(logs: dict) -> str:
    parts = []
    for k, v in logs.items():
        if k.startswith(_SKIP):
            continue
        if k == "samples_per_sec":
            parts.append(f"{v:,.0f} samples/s")
        elif k == "lr":
            parts.append(f"lr {v:.3g}")
        else:
            parts.append(f"{k} {v:.4f}")
    return "  ".join(parts)


@PROGRESS.register("quiet")
class Quiet:
    def __init__(self, epochs: int, log):
        self.epochs, self.log = epochs, log

    def epoch(self, epoch: int, logs: dict) -> None: ...

    def close(self) -> None: ...


@PROGRESS.register("epoch")
class EpochLines(Quiet):
    def epoch(self, epoch, logs):
        self.log(f"epoch {epoch + 1}/{self.epochs}  {format_logs(logs)}")


@PROGRESS.register("bar")
class Bar(Quiet):
    def __init__(self, epochs, log):
        super().__init__(epochs, log)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("epoch"), MofNCompleteColumn(), BarColumn(), TimeRemainingColumn(),
                            TextColumn("{task.description}"))
        self.task = self.bar.add_task("", total=epochs)
        self.bar.start()

    def epoch(self, epoch, logs):
        self.bar.update(self.task, completed=epoch + 1, description=format_logs(logs))

    def close(self):
        self.bar.stop()


def make_progress(mode: str, epochs: int, log):
    return PROGRESS[mode](epochs, log)
