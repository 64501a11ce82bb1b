"""Fine-tuning and evaluation: the model to train, its data, checkpoints and what a run reports."""
