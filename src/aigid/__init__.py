"""aigid: detect AI-generated images and name the generator (a BERT + CLIP multi-task detector).

The packages are layers; a module imports only from its own layer or the ones below it:

- :mod:`aigid.cli` -- the `aigid` command: imports a command's module when it is called.
- :mod:`aigid.stages` -- one module per dvc.yaml stage (prepare ... export), nothing else.
- :mod:`aigid.tools` -- the commands that are not stages, run on a trained detector: `aigid detect`, `aigid app`,
  `aigid score-table`, `aigid register` and `aigid promote`.
- :mod:`aigid.serving` -- the trained detector as it is served: the portable (ONNX) detector, the scorer, the
  MLflow model, the registry and the model card.
- :mod:`aigid.training` -- what `train` and `retrain` share: the Trainer, the rows, the stage's MLflow run, the
  scoring rule and the saved model.
- :mod:`aigid.sources` -- dataset readers: the layouts of raw data, tables, the embedded demo (data and encoders).
- :mod:`aigid.tracking` -- MLflow runs and the metrics they log.
- :mod:`aigid.detector` -- the model, its runtime, inference, the decision rule, the feature cache.
- :mod:`aigid.core` -- params and the compute profile, errors, files, the prepared-data schema, stage commands.

Package ``__init__`` modules hold only a docstring (a test checks it), so importing a package runs nothing and
dvc.yaml's code dependencies are exactly the modules a stage imports.
"""
