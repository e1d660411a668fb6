"""`densepipe summary` takes its params file as `--params`, as every stage does, or
positionally."""

from __future__ import annotations

import pytest
import yaml

from densepipe.cli import main

PARAMS = {"data": {"source": "breast_cancer"},
          "model": {"layers": [{"type": "dense", "units": 8, "activation": "relu", "name": "hidden"},
                               {"type": "dense", "units": "auto", "activation": "auto"}]},
          "mlflow": {"enabled": False}}


@pytest.fixture
def params_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(PARAMS))
    return path


def _summary(capsys, *argv) -> str:
    assert main(["summary", *argv]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("form", ["option", "positional", "both"])
def test_summary_reads_the_params_file_given(params_file, tmp_path, capsys, form):
    given = {"option": ["--params", str(params_file)], "positional": [str(params_file)],
             "both": [str(params_file), "--params", str(params_file)]}[form]
    out = _summary(capsys, *given, "--data", str(tmp_path / "no_processed_data"))
    assert "hidden (dense)" in out
    assert "Total params: 257" in out  # 30 features -> 8 (248) -> 1 (9)


def test_summary_refuses_two_different_params_files(params_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["summary", str(params_file), "--params", str(tmp_path / "other.yaml")])
    assert exit_info.value.code == 2
    assert (f"two params files given: {params_file} and --params {tmp_path / 'other.yaml'}; give one"
            in capsys.readouterr().err)
