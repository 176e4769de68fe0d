"""Training the detector: the Hugging Face Trainer on typed settings and rows, checkpoints and resume
(:mod:`~aigid.training.trainer`), and what the `train` and `retrain` stages share around it
(:mod:`~aigid.training.fit`)."""
