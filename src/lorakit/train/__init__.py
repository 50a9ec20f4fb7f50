"""Fine-tuning: the training loop, its configuration, checkpoints and resume, metrics and plots."""
