"""`densepipe sweep`: hyperparameter search over params.yaml keys, every trial a DVC
experiment and an MLflow run nested under one parent run.

grid and random trials are queued (`dvc exp run --queue`) and run by DVC's queue
workers in parallel (`dvc queue start -j N`); optuna (TPE) asks for one trial at
a time, since each suggestion depends on the results so far, and keeps its study
in SQLite beside the MLflow store. The summary ranks trials by the chosen metric
(a table and a figure), logged to the parent run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import subprocess
import time
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from densepipe.config import ConfigError, format_errors, read_yaml
from densepipe.io import write_bytes, write_text
from densepipe.registry import Registry
from densepipe.threads import share_cores

SAMPLERS: Registry = Registry("sweep method")


class Range(BaseModel):
    model_config = ConfigDict(extra="forbid")
    low: float
    high: float
    log: bool = False          # sample the exponent uniformly (learning rates)
    integer: bool = False

    @model_validator(mode="after")
    def _order(self):
        if self.high <= self.low or (self.log and self.low <= 0):
            raise ValueError(f"need low < high (and low > 0 with log), got low={self.low}, high={self.high}")
        return self


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal["grid", "random", "optuna"] = "grid"
    parameters: dict[str, list[Any] | Range] = Field(min_length=1)  # params key -> values or range
    metric: str = "test_accuracy"     # an MLflow metric of the trial runs
    mode: Literal["min", "max"] = "max"
    trials: int = Field(8, ge=1)      # random / optuna
    jobs: int = Field(2, ge=1)        # parallel queue workers (grid / random)
    seed: int = 0
    name: str = "sweep"

    @model_validator(mode="after")
    def _grid_needs_lists(self):
        if self.method == "grid":
            ranges = [k for k, v in self.parameters.items() if isinstance(v, Range)]
            if ranges:
                raise ValueError(f"grid search needs a list of values for {ranges}; ranges need random or optuna")
        return self


def load_spec(path: str | Path) -> SweepSpec:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        return SweepSpec.model_validate(read_yaml(path, "sweep file") or {})
    except ValidationError as err:
        raise ConfigError(format_errors(err, SweepSpec).replace("invalid params", f"invalid sweep {path}")) from None


def _sample(value, rng: random.Random):
    if isinstance(value, list):
        return rng.choice(value)
    if value.log:
        x = math.exp(rng.uniform(math.log(value.low), math.log(value.high)))
    else:
        x = rng.uniform(value.low, value.high)
    return int(round(x)) if value.integer else float(f"{x:.6g}")


@SAMPLERS.register("grid")
def grid_trials(spec: SweepSpec) -> list[dict]:
    keys = list(spec.parameters)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(spec.parameters[k] for k in keys))]


@SAMPLERS.register("random")
def random_trials(spec: SweepSpec) -> list[dict]:
    rng = random.Random(spec.seed)
    return [{k: _sample(v, rng) for k, v in spec.parameters.items()} for _ in range(spec.trials)]


class Sweep:
    def __init__(self, spec: SweepSpec, pipeline: Path, params_file: str = "params.yaml"):
        from densepipe.config import load
        self.spec, self.pipeline = spec, pipeline.resolve()
        self.cfg = load(self.pipeline / params_file)
        from densepipe.tracking import project_root
        self.root = project_root(self.pipeline)
        self.stamp = time.strftime("%Y%m%d-%H%M%S")
        self.assignments: dict[str, dict] = {}  # trial run name -> the params it set

    # ------------------------------------------------------------------ commands
    def _dvc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(["dvc", *args], cwd=self.pipeline, capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise RuntimeError(f"dvc {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def _set_args(self, trial: dict, parent: str, i: int) -> list[str]:
        self.assignments[self._run_name(i)] = trial
        from densepipe.tracking import param_key
        sets = [f"{param_key(k)}={json.dumps(v)}" for k, v in trial.items()]  # DVC's -S: layers.0.units
        # "++": set or add (Hydra's override grammar) — params files need not name these keys.
        sets += [f"++mlflow.parent_run_id={parent}", f"++mlflow.run_name={self._run_name(i)}"]
        return [a for s in sets for a in ("-S", s)]

    def _run_name(self, i: int) -> str:
        return f"{self.spec.name}-{i + 1}"

    def _exp_name(self, i: int) -> str:
        return f"{self.spec.name}-{self.stamp}-{i + 1}"

    # --------------------------------------------------------------------- runs
    def run(self) -> pd.DataFrame:
        from densepipe.tracking import Tracker, param_key, start_parent_run
        space = {f"sweep.space.{param_key(k)}": json.dumps(v if isinstance(v, list) else v.model_dump())
                 for k, v in self.spec.parameters.items()}
        parent: Tracker = start_parent_run(self.cfg.mlflow, f"{self.spec.name}-{self.stamp}",
                                           {"sweep.method": self.spec.method, "sweep.metric": self.spec.metric,
                                            **space})
        try:
            if self.spec.method == "optuna":
                self._optuna(parent)
            else:
                trials = SAMPLERS[self.spec.method](self.spec)
                for i, trial in enumerate(trials):
                    self._dvc("exp", "run", "dvc.yaml", "--queue", "-n", self._exp_name(i),
                              *self._set_args(trial, parent.run_id, i))
                self._start_workers()
                self._wait_for_queue()
            table = self.results(parent)
        except BaseException:
            parent.finish("FAILED")
            raise
        self._summarize(parent, table)
        parent.finish()
        return table

    def _start_workers(self) -> None:
        # The workers outlive `dvc queue start` and inherit its output: a captured pipe would
        # stay open until they exit, so their output goes to a log file instead.
        log = self.root / ".dvc" / "tmp" / "densepipe-queue-workers.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        share_cores(env, self.spec.jobs)  # the workers' trials train side by side
        with open(log, "ab") as out:
            code = subprocess.run(["dvc", "queue", "start", "-j", str(self.spec.jobs)], cwd=self.pipeline,
                                  stdout=out, stderr=subprocess.STDOUT, env=env).returncode
        if code != 0:
            raise RuntimeError(f"dvc queue start failed; see {log}")

    def _wait_for_queue(self, poll: float = 2.0, restarts: int = 3) -> None:
        orphaned = 0  # consecutive polls with work left and no worker
        while True:
            status = self._dvc("queue", "status").stdout
            active = [line for line in status.splitlines() if " Queued " in f" {line} " or " Running " in f" {line} "]
            if not active:
                break
            orphaned = orphaned + 1 if "0 active, 0 idle" in status else 0
            if orphaned >= 5 and restarts > 0:  # the workers are gone with work left: start new ones
                restarts, orphaned = restarts - 1, 0
                self._start_workers()
            time.sleep(poll)
        failed = [line for line in status.splitlines() if " Failed " in f" {line} "]
        subprocess.run(["dvc", "queue", "stop"], cwd=self.pipeline, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        if failed:
            logs = [self._dvc("queue", "logs", line.split()[0], check=False).stdout[-2000:] for line in failed]
            raise RuntimeError("sweep trials failed:\n" + "\n".join(failed) + "\n\nlast log lines:\n"
                               + "\n---\n".join(logs))

    def _optuna(self, parent) -> None:
        import optuna
        storage = f"sqlite:///{self.root / 'optuna.db'}"  # the study lives beside the MLflow store
        study = optuna.create_study(study_name=f"{self.spec.name}-{self.stamp}", storage=storage,
                                    direction="maximize" if self.spec.mode == "max" else "minimize",
                                    sampler=optuna.samplers.TPESampler(seed=self.spec.seed))
        for i in range(self.spec.trials):
            trial = study.ask()
            values = {k: self._suggest(trial, k, v) for k, v in self.spec.parameters.items()}
            self._dvc("exp", "run", "dvc.yaml", "-n", self._exp_name(i), *self._set_args(values, parent.run_id, i))
            study.tell(trial, self._metric_of(parent, self._run_name(i)))

    @staticmethod
    def _suggest(trial, key: str, value):
        if isinstance(value, list):
            return trial.suggest_categorical(key, value)
        if value.integer:
            return trial.suggest_int(key, int(value.low), int(value.high), log=value.log)
        return trial.suggest_float(key, value.low, value.high, log=value.log)

    def _children(self, parent):
        from mlflow.tracking import MlflowClient
        client = MlflowClient(parent.uri)
        exp = client.get_run(parent.run_id).info.experiment_id
        return client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'")

    def _metric_of(self, parent, run_name: str) -> float:
        runs = [r for r in self._children(parent) if r.info.run_name == run_name]
        if not runs or self.spec.metric not in runs[0].data.metrics:
            raise RuntimeError(f"trial {run_name} logged no metric '{self.spec.metric}'")
        return runs[0].data.metrics[self.spec.metric]

    def results(self, parent) -> pd.DataFrame:
        rows = []
        for r in self._children(parent):
            row = {"trial": r.info.run_name, "run_id": r.info.run_id,
                   self.spec.metric: r.data.metrics.get(self.spec.metric)}
            row.update(self.assignments.get(r.info.run_name, {}))
            rows.append(row)
        table = pd.DataFrame(rows)
        if table.empty:
            raise RuntimeError("the sweep produced no trial runs")
        return table.sort_values(self.spec.metric, ascending=self.spec.mode == "min", na_position="last")

    def _summarize(self, parent, table: pd.DataFrame) -> None:
        from densepipe.report.figures import plt, to_png
        out = self.pipeline / "reports" / "sweeps" / f"{self.spec.name}-{self.stamp}"
        write_text(out / "trials.csv", table.to_csv(index=False))
        write_text(out / "trials.md", _markdown(table))
        fig, ax = plt.subplots(figsize=(7, 0.4 * len(table) + 1.5))
        labels = [", ".join(f"{k.split('.')[-1]}={row[k]}" for k in self.spec.parameters)
                  for _, row in table.iterrows()]
        ax.barh(range(len(table)), table[self.spec.metric], color="#4c72b0")
        ax.set_yticks(range(len(table)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(self.spec.metric)
        ax.set_title(f"{self.spec.name}: trials sorted by {self.spec.metric} ({self.spec.mode})")
        write_bytes(out / "trials.png", to_png(fig))
        for f in ("trials.csv", "trials.md", "trials.png"):
            parent.log_artifact(out / f, "sweep")
        best = table.iloc[0]
        parent.log_metrics({f"best_{self.spec.metric}": float(best[self.spec.metric])})
        parent.set_tags({"best_trial": str(best["trial"])})
        print(_markdown(table))
        print(f"sweep: {len(table)} trials; best {best['trial']} ({self.spec.metric} = {best[self.spec.metric]:.4g}); "
              f"summary in {out}")


def _markdown(table: pd.DataFrame) -> str:
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row) + " |"
              for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="densepipe sweep", description=__doc__)
    p.add_argument("spec", nargs="?", default="sweep.yaml", help="the sweep's YAML file")
    p.add_argument("--pipeline", default=".", help="folder with the dvc.yaml and params.yaml to sweep")
    args = p.parse_args(argv)
    Sweep(load_spec(args.spec), Path(args.pipeline)).run()
