"""Training: config, data, the loop, checkpoints, evaluation and reports."""
