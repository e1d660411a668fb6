"""The MLflow model: raw feature rows in, decoded predictions out (the fitted
preprocessor travels inside the model file), so `mlflow models serve` answers
requests on the same columns the user's data has."""

from __future__ import annotations

import mlflow.pyfunc


class DensepipeModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from densepipe.checkpoint import load_model
        self.loaded = load_model(context.artifacts["model"])

    def predict(self, context, model_input, params=None):
        from densepipe.predict import predict_frame
        return predict_frame(self.loaded, model_input)


def log_model(tracker, model_path: str, input_example, output_example) -> None:
    from mlflow.models import infer_signature

    signature = infer_signature(input_example, output_example)
    with tracker.active() as mlflow:
        mlflow.pyfunc.log_model(
            name="model",
            python_model=DensepipeModel(),
            artifacts={"model": str(model_path)},
            signature=signature,
            input_example=input_example.head(5),
            pip_requirements=["densepipe", "torch", "pandas", "scikit-learn"],
        )
