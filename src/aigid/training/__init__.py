"""Training the detector: the Hugging Face Trainer on typed settings and rows, checkpoints and resume."""
