"""The failures a user can fix. A command reports each as one line naming the file, row or key."""


class DataError(ValueError):
    """Input data that cannot be used; the message names the split, the row and the file where known."""


class ParamsError(ValueError):
    """A params.yaml value is missing or invalid, or a stage reads a key it does not declare; the message
    names the key."""


class TrackingError(RuntimeError):
    """The MLflow store cannot be used: before any work starts, or when a tracking server stops answering
    during a stage (the stage then ends without writing its outputs)."""
