"""BLOOM pretraining: Megatron-style model parallelism on DeepSpeed."""
