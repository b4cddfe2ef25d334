"""The BLOOM model, ALiBi, and fused kernels."""
