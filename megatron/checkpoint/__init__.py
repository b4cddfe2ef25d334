"""Checkpoints in Megatron-DeepSpeed's layout: saving, finding the latest, resuming."""
