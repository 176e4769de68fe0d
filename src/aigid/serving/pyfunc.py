"""The registered model's code: an MLflow pyfunc model, logged from this file (models-from-code).

MLflow runs this file when it loads the model (``mlflow.pyfunc.load_model``, ``mlflow models serve``,
``mlflow.pyfunc.spark_udf``). The model comes as the artifacts ``model_dir`` (the torch detector) and
``portable_dir`` (its exported form, when registered with one): like `aigid detect`, the model scores with the
quicker of the two for the machine (:func:`aigid.serving.scorer.quickest`: the exported one on a CPU, the
torch one where a GPU is visible), by the model's own rule (its ``scoring.json``: calibrated P(AI), the verdict
with its unsure band). A version registered before models carried that rule labels at the model config's
``threshold``.

``predict`` takes a DataFrame with ``image`` (the encoded image file: base64 text or bytes) and ``caption``
(optional, may be empty) and returns one row per input row, with the columns of `aigid detect` but ``path``:
``error`` (empty when the image was scored), ``verdict``, ``prob_ai``, ``label``, ``generator``,
``threshold``, ``caption`` and ``p_<class>`` for every class. A row whose image does not decode gets its error
(naming the row) and empty scores; the other rows are still scored.

MLflow executes this file as a module of its own, hence the absolute imports; the package comes with the model
as code.
"""

from __future__ import annotations

import base64
import binascii
import logging
from pathlib import Path

import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

from aigid.core.data import DataError, decode_rgb

log = logging.getLogger(__name__)


class DetectorModel(PythonModel):
    def load_context(self, context):
        from aigid.detector.scores import Scoring
        from aigid.serving.scorer import quickest

        portable = context.artifacts.get("portable_dir")
        model_dir, why = quickest(
            Path(context.artifacts["model_dir"]),
            Path(portable) if portable else None,
            "auto",
            "registered without an exported form",
        )
        log.info("scoring with %s (%s)", model_dir, why)
        threshold = (
            None if Scoring.load(model_dir).fitted else float((context.model_config or {}).get("threshold", 0.5))
        )
        self.load(model_dir, threshold)

    def load(self, model_dir: Path, threshold: float | None = None) -> None:
        """Load the detector in ``model_dir``, scoring by its rule or at ``threshold``."""
        import json

        from aigid.detector.scores import Scoring
        from aigid.serving.portable import decode_side
        from aigid.serving.scorer import scorer

        self.score = scorer(model_dir, 64, False, "auto")
        self.side = decode_side(model_dir)  # images are decoded once, reduced to what the model needs
        self.threshold = threshold
        self.class_names = json.loads((Path(model_dir) / "config.json").read_text())["class_names"]
        for notice in Scoring.load(model_dir).notices("the registered model"):
            log.warning(notice)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
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
                images.append(decoded_image(value, i, self.side))
                texts.append(caption)
            except DataError as err:
                row["error"] = str(err)
            rows.append(row)
        good = [row for row in rows if not row["error"]]
        for row, scores in zip(good, self.score(images, texts, self.threshold) if images else []):
            row.update(scores)
        frame = pd.DataFrame(rows, columns=output_columns(self.class_names))
        return frame.astype(object).where(frame.notna(), None)  # an unscored row's scores are null, not NaN


def decoded_image(value, row: int, side: int):
    """Raw bytes or a base64 string, decoded reduced to ``side`` (the error names the row)."""
    try:
        data = value if isinstance(value, bytes) else base64.b64decode(value, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise DataError(f"row {row}: image is neither bytes nor a base64 string") from None
    return decode_rgb(data, f"row {row}", side=side)


set_model(DetectorModel())
