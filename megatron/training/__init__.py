"""Training: DeepSpeed engine, the loop, schedules, metrics, logging and lifecycle."""
