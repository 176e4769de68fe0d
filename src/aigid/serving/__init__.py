"""Using a trained detector: `aigid detect` (:mod:`.detect`), the portable ONNX detector (:mod:`.portable`), the
MLflow model (:mod:`.pyfunc`), the registry (:mod:`.registry`), `aigid register` and `aigid promote`."""
