"""The trained detector as it is served: the portable ONNX detector (:mod:`.portable`), the scorer that picks it or
the torch one (:mod:`.scorer`), the MLflow model (:mod:`.pyfunc`), the registry (:mod:`.registry`) and the model card
(:mod:`.card`). A registered version carries this directory as its code."""
