"""Training: the Trainer and what it drives (DeepSpeed engine, gradient cache, checkpoints,
optimizer and schedule). Importing it does nothing."""
