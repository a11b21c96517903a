"""The MLflow pyfunc model of a serving bundle (see ``recmem/registry.py``).

MLflow logs this file with the model ("models from code") and runs it to load the model, so nothing is
pickled: :meth:`BundleModel.load_context` loads the bundle from the model's ``bundle`` artifact with
``recmem.serving.load_bundle``, which verifies every file.
"""

import math
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from recmem.serving.inputs import InputError


class BundleModel(PythonModel):
    """Click probabilities of raw feature rows, answered by the bundle in the ``bundle`` artifact."""

    def load_context(self, context: Any) -> None:
        """Load and verify the bundle (``context.artifacts["bundle"]``)."""
        from recmem.serving.bundle import load_bundle

        self.bundle = load_bundle(context.artifacts["bundle"])

    # A DataFrame hint is one MLflow infers no schema from (the logged signature is recmem's own);
    # MLflow turns a list of row dicts into a DataFrame by that signature before calling this.
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
        """Probabilities [B] (float64) of ``model_input``: a pandas DataFrame with a column per schema
        field or a list of row dicts. A missing dense value is NaN or None; a missing sparse value is
        ``""`` (None among integer IDs would reach here as a float column, which is refused).

        Raises:
            recmem.serving.InputError: naming the row and field that cannot be scored.
        """
        if isinstance(model_input, pd.DataFrame):
            for name in self.bundle.feature_names:
                if name in model_input and model_input[name].dtype.kind == "f":
                    raise InputError(f"column {name!r}: floats are not IDs (pandas and MLflow turn integer IDs "
                                     "with a null among them into floats, which cannot hold every int64 ID): "
                                     "send a missing ID as \"\"")
            model_input = model_input.to_dict("records")
        rows = model_input
        if isinstance(rows, list):
            rows = [{k: _plain(v) for k, v in row.items()} if isinstance(row, dict) else row for row in rows]
        return np.asarray(self.bundle.predict(rows), dtype=np.float64)


def _plain(value: Any) -> Any:
    """A DataFrame cell as the bundle takes it: numpy scalars as Python numbers, NaN as missing."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return None
    return value


mlflow.models.set_model(BundleModel())
