"""The retrained detector as an MLflow model: logged with a signature and an input example, registered by name.

``mlflow.pyfunc.load_model("models:/aigid-detector/latest").predict(df)`` takes a DataFrame with columns
``image`` (the encoded image file, base64) and ``caption`` (may be empty) and returns one row per image:
``prob_ai``, ``label`` (at the operating-point threshold evaluate chose), ``generator``, ``threshold``,
``caption`` and ``p_<class>`` for every class. The model directory travels as an artifact and is loaded
with :func:`aigid.model.load_detector` (safetensors only); the aigid package travels as code.
"""

from __future__ import annotations

import base64
import binascii
from importlib.metadata import version
from pathlib import Path

import mlflow
import pandas as pd

from .data import DataError, decode_rgb

REQUIREMENTS = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "datasets", "pillow", "numpy",
                "pandas", "scikit-learn", "pyyaml")


class DetectorModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from .model import load_detector

        self.detector = load_detector(context.artifacts["model_dir"])
        self.threshold = float((context.model_config or {}).get("threshold", 0.5))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from .infer import score_images

        images = [image_bytes(v, i) for i, v in enumerate(model_input["image"])]
        captions = [c or "" for c in model_input["caption"]] if "caption" in model_input else [""] * len(images)
        rows = score_images(self.detector, images, captions, self.threshold)
        return pd.DataFrame(rows)


def image_bytes(value, row: int) -> bytes:
    """Raw bytes or a base64 string, checked to decode as an image (the error names the row)."""
    try:
        data = value if isinstance(value, bytes) else base64.b64decode(value, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise DataError(f"row {row}: image is neither bytes nor a base64 string") from None
    decode_rgb({"bytes": data}, f"row {row}")
    return data


def log_detector(model_dir: Path, registered_name: str, threshold: float, example_image: bytes,
                 example_caption: str = ""):
    """Log ``model_dir`` to the active run as a pyfunc model and register it as a new version of the name."""
    from mlflow.models import infer_signature

    from .infer import score_images
    from .model import load_detector

    example = pd.DataFrame({"image": [base64.b64encode(example_image).decode()], "caption": [example_caption]})
    output = pd.DataFrame(score_images(load_detector(model_dir), [example_image], [example_caption], threshold))
    return mlflow.pyfunc.log_model(
        name="model", python_model=DetectorModel(), artifacts={"model_dir": str(model_dir)},
        code_paths=[str(Path(__file__).parent)], model_config={"threshold": threshold},
        signature=infer_signature(example, output), input_example=example, registered_model_name=registered_name,
        # Explicit pins: inferring requirements would load and run the model once more, slowly.
        pip_requirements=[f"{name}=={version(name)}" for name in REQUIREMENTS])
