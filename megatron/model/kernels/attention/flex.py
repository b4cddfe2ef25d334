"""FlexAttention path (CUDA): ALiBi as a score modifier, causality as a block mask; no bias tensor.

``flex_attention`` adds ``slope[h] x (kv_idx - q_idx)`` to each score inside the kernel (the same
relative form as ``alibi_causal_bias``) and skips the key blocks the causal ``BlockMask`` rules
out. It is fast only compiled (Triton); uncompiled it runs a reference that materialises the
scores, which is all the CPU gets, and only forward: PyTorch refuses its backward on CPU. So the
registry selects it on CUDA only; the CPU runs it forward in tests to check the maths.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Callable, Optional

import torch

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError as error:  # older torch
    BlockMask = create_block_mask = flex_attention = None
    _IMPORT_ERROR: Optional[str] = str(error)
else:
    _IMPORT_ERROR = None

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unavailable_reason(device: torch.device | str, dtype: torch.dtype, dropout_p: float,
                       head_dim: Optional[int] = None) -> Optional[str]:
    """Why ``flex_alibi_attention`` cannot run training here, or None if it can."""
    device = torch.device(device)
    if dropout_p > 0.0:
        return f"flex has no attention dropout; it needs attention_dropout 0 (BLOOM's setting), got {dropout_p}"
    if _IMPORT_ERROR is not None:
        return f"torch.nn.attention.flex_attention is not importable in torch {torch.__version__}: {_IMPORT_ERROR}"
    if device.type != "cuda":
        return f"flex needs CUDA: on {device.type} FlexAttention runs only uncompiled and without a backward"
    if importlib.util.find_spec("triton") is None:
        return "flex needs triton to compile its kernel; install the triton that matches this CUDA build of torch"
    if dtype not in _DTYPES:
        return f"flex runs fp16, bf16 or fp32 inputs, got {dtype}"
    if head_dim is not None and head_dim < 16:
        return f"flex's compiled kernel needs head_dim >= 16 (hidden_size / num_attention_heads), got {head_dim}"
    return None


def _causal(batch, head, q_idx, kv_idx):
    return q_idx >= kv_idx


@functools.lru_cache(maxsize=8)
def causal_block_mask(seq_len: int, device: torch.device) -> "BlockMask":
    """The causal BlockMask for ``seq_len`` queries and keys on ``device``.

    A cache, not state: the mask depends only on its arguments, and building it costs a pass
    over the (seq/128)^2 blocks, which every layer of every step would otherwise repeat.
    """
    return create_block_mask(_causal, None, None, seq_len, seq_len, device=device)


@functools.cache
def compiled_flex_attention() -> Callable:
    """``flex_attention`` wrapped in ``torch.compile``, once per process (a cache of the wrapper;
    compiled graphs are cached by torch.compile itself, per shape and dtype)."""
    return torch.compile(flex_attention, dynamic=False)


def _alibi_score_mod(slopes: torch.Tensor) -> Callable:
    def score_mod(score, batch, head, q_idx, kv_idx):
        return score + slopes[head] * (kv_idx - q_idx)

    return score_mod


def flex_alibi_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slopes: torch.Tensor,
                         dropout_p: float = 0.0) -> torch.Tensor:
    """ALiBi causal attention through FlexAttention, [batch, heads, seq, head_dim]; compiled on CUDA,
    uncompiled (forward only, for tests) elsewhere."""
    if flex_attention is None:
        raise RuntimeError(f"attention implementation 'flex' cannot run: torch.nn.attention.flex_attention is "
                           f"not importable ({_IMPORT_ERROR}); use sdpa_chunked")
    if dropout_p > 0.0:
        raise ValueError(f"flex has no attention dropout: set attention_dropout to 0 or use sdpa_chunked "
                         f"(got dropout_p={dropout_p})")
    seq = query.shape[-2]
    score_mod = _alibi_score_mod(slopes.to(device=query.device, dtype=torch.float32))
    attend = compiled_flex_attention() if query.device.type == "cuda" else flex_attention
    return attend(query, key, value, score_mod=score_mod, block_mask=causal_block_mask(seq, query.device))
