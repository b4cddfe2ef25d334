"""Data pipeline: tokenizers, Megatron .bin/.idx datasets, blends over languages."""
