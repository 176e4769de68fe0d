"""The `encoders` stage: put the two starting encoders into one local directory.

With a hub name or a local directory, the encoder is loaded with ``from_pretrained`` and written back with
``save_pretrained``, which pins the exact weights the pipeline trains from as a versioned DVC output. With
``demo``, the embedded demo's small encoders are built (:func:`aigid.sources.demo.build_demo_encoders`: random
weights, a WordPiece tokenizer trained on the training captions), so the whole pipeline runs offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, CLIPVisionModel

from aigid.core import stage
from aigid.core.data import open_dataset
from aigid.core.errors import DataError
from aigid.core.files import atomic_path
from aigid.detector.runtime import configure
from aigid.sources.demo import build_demo_encoders

PARAMS = ("seed", "encoders", "compute")


@dataclass(frozen=True)
class Paths:
    data: Path = stage.path(
        "data/prepared", "Prepared dataset; its train captions train the demo tokenizer.", exists=True
    )
    out: Path = stage.path("models/encoders", "Directory for the text/ and vision/ encoders.")


def run(params, paths: Paths) -> dict:
    """Write the starting text and vision encoders to OUT/text and OUT/vision.

    encoders.text / encoders.vision may be hub names or local directories (loaded with from_pretrained and
    saved again, pinning them), or `demo` (small encoders built from configs, for offline runs).
    """
    configure(params.compute)
    e = params.encoders
    with atomic_path(paths.out) as tmp:
        if e.text == "demo":  # both or neither (checked with the params)
            build_demo_encoders(open_dataset(paths.data)["train"]["Caption"], e, tmp, params.seed)
        else:
            snapshot_encoders(e, tmp)
    return {"text": e.text, "vision": e.vision}


command = stage.command("encoders", run, Paths, PARAMS)


def snapshot_encoders(params, out_dir: Path) -> None:
    """Copy pretrained encoders (hub names or local directories) into ``out_dir`` through from_pretrained."""
    for name, kind in ((params.text, "text"), (params.vision, "vision")):
        try:
            if kind == "text":
                model, pre = (
                    AutoModel.from_pretrained(name, add_pooling_layer=False),
                    AutoTokenizer.from_pretrained(name),
                )
            else:
                model, pre = (
                    CLIPVisionModel.from_pretrained(name),
                    AutoImageProcessor.from_pretrained(name),
                )  # settings only
        except OSError as err:
            raise DataError(
                f"encoders.{kind}={name!r} could not be loaded: it is neither a local directory nor a model in the "
                f"Hugging Face cache or hub reachable from here ({err})"
            ) from err
        except TypeError as err:  # a text model without a pooler option (DistilBERT): not BERT-like
            raise DataError(
                f"encoders.{kind}={name!r} is not an encoder the pipeline can read (a BERT-like text encoder, "
                f"a CLIP vision tower): {err}"
            ) from err
        model.save_pretrained(out_dir / kind)
        pre.save_pretrained(out_dir / kind)
