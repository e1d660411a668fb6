"""The MLflow model: raw feature rows in, decoded predictions out (the fitted
preprocessor travels inside the model file), so `mlflow models serve` answers
requests on the same columns the user's data has.

Logged as "model from code": MLflow stores this file and runs it at load time,
so no pickled Python object is involved.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import mlflow.pyfunc
import pandas as pd


class DensepipeModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from densepipe.checkpoint import load_model
        self.loaded = load_model(context.artifacts["model"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from densepipe.predict import predict_frame
        return predict_frame(self.loaded, pd.DataFrame(model_input))


mlflow.models.set_model(DensepipeModel())


def as_float_example(frame: pd.DataFrame) -> pd.DataFrame:
    """Integer feature columns as float64, so served requests may hold missing values."""
    ints = frame.select_dtypes(include="integer").columns
    return frame.astype({c: "float64" for c in ints})


def log_model(tracker, model_path: str, input_example: pd.DataFrame, output_example: pd.DataFrame) -> None:
    from mlflow.models import infer_signature

    example = as_float_example(input_example.head(5))
    with tracker.active() as mlflow, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # schema hints about int columns and type hints
        signature = infer_signature(example, output_example)
        mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(__file__)),
            artifacts={"model": str(model_path)},
            signature=signature,
            input_example=example,
            pip_requirements=["densepipe", "torch", "pandas", "scikit-learn"],
        )
