"""MLflow: one parent run per pipeline execution and the stage runs under it (:mod:`.runs`), and the metrics the
stages compute and log (:mod:`.metrics`)."""
