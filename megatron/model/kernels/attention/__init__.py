"""Causal self-attention with ALiBi.

Every implementation has the signature ``(query, key, value, slopes, dropout_p=0.0) -> out`` on
tensors [batch, heads, seq, head_dim] (``slopes``: this tensor-parallel rank's heads) and equals
``reference_alibi_attention``:

    reference     plain PyTorch in fp32, scores and probabilities materialised: the specification
    sdpa_mask     SDPA with the full [1, heads, s, s] ALiBi + causal float mask (reference.py)
    sdpa_chunked  SDPA per query block with that block's bias only; any device, dropout (chunked.py)

The model's fused kernel (``fused_alibi_attention``, what ``get_kernel("attention")`` returns)
is ``sdpa_chunked``.
"""

from __future__ import annotations

from megatron.model.kernels.attention.chunked import sdpa_chunked_attention
from megatron.model.kernels.attention.reference import reference_alibi_attention, sdpa_mask_attention

__all__ = ["fused_alibi_attention", "reference_alibi_attention", "sdpa_chunked_attention", "sdpa_mask_attention"]

fused_alibi_attention = sdpa_chunked_attention
