"""The registered model's code: an MLflow pyfunc model, logged from this file (models-from-code).

MLflow runs this file when it loads the model (``mlflow.pyfunc.load_model``, ``mlflow models serve``); the
model directory comes as the artifact ``model_dir`` and is loaded with :func:`aigid.detector.model.load_detector`
(safetensors only), the operating-point threshold as the model config's ``threshold``.

``predict`` takes a DataFrame with ``image`` (the encoded image file: base64 text or bytes) and ``caption``
(optional, may be empty) and returns one row per input row, with the columns of `aigid detect` but ``path``:
``error`` (empty when the image was scored), ``prob_ai``, ``label``, ``generator``, ``threshold``,
``caption`` and ``p_<class>`` for every class. A row whose image does not decode gets its error (naming the
row) and empty scores; the other rows are still scored.

MLflow executes this file as a module of its own, hence the absolute imports; the package comes with the model
as code.
"""

from __future__ import annotations

import base64
import binascii

import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

from aigid.core.data import DataError, decode_rgb


class DetectorModel(PythonModel):
    def load_context(self, context):
        from aigid.detector.model import load_detector

        self.detector = load_detector(context.artifacts["model_dir"])
        self.threshold = float((context.model_config or {}).get("threshold", 0.5))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from aigid.detector.infer import score_images
        from aigid.detector.scores import output_columns

        captions = (
            model_input["caption"].fillna("").astype(str).tolist()
            if "caption" in model_input
            else [""] * len(model_input)
        )
        rows, images, texts = [], [], []
        for i, (value, caption) in enumerate(zip(model_input["image"], captions)):
            row = {"error": "", "caption": caption}
            try:
                images.append(image_bytes(value, i))
                texts.append(caption)
            except DataError as err:
                row["error"] = str(err)
            rows.append(row)
        good = [row for row in rows if not row["error"]]
        for row, scores in zip(good, score_images(self.detector, images, texts, self.threshold) if images else []):
            row.update(scores)
        frame = pd.DataFrame(rows, columns=output_columns(self.detector.model.config.class_names))
        return frame.astype(object).where(frame.notna(), None)  # an unscored row's scores are null, not NaN


def image_bytes(value, row: int) -> bytes:
    """Raw bytes or a base64 string, checked to decode as an image (the error names the row)."""
    try:
        data = value if isinstance(value, bytes) else base64.b64decode(value, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise DataError(f"row {row}: image is neither bytes nor a base64 string") from None
    decode_rgb({"bytes": data}, f"row {row}")
    return data


set_model(DetectorModel())
