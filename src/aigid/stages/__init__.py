"""The pipeline: one module per dvc.yaml stage, each declaring ``PARAMS``, ``Paths``, ``run`` and ``command``
(see :mod:`aigid.core.stage`)."""
