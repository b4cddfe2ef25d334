"""Converters between our checkpoints and Hugging Face transformers BLOOM."""
