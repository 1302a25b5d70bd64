"""Training: the Ray Train loop and driver, the optimiser, and the detection and distillation tasks."""
