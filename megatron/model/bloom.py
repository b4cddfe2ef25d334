"""The BLOOM decoder in plain PyTorch, shaped like Megatron-DeepSpeed's layers.

    tokens -> word embedding -> embedding LayerNorm -> N x [pre-LN ALiBi attention, pre-LN GeLU MLP]
           -> final LayerNorm -> logits through the (tied) embedding matrix

Module and parameter names are Megatron-DeepSpeed's (``word_embeddings.norm``,
``self_attention.query_key_value``, ``mlp.dense_h_to_4h``...), so each module can become one
pipeline layer and its state dict one ``layer_XX-model_YY-model_states.pt`` file. The fused QKV
projection is laid out [head, (q, k, v), head_dim] along its output rows, which lets tensor
parallelism split it by whole heads.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron.config import ModelConfig
from megatron.model.alibi import alibi_slopes
from megatron.model.kernels import get_kernel


class WordEmbedding(nn.Module):
    """Token embedding matrix (padded vocabulary) with BLOOM's embedding LayerNorm as ``norm``."""

    def __init__(self, cfg: ModelConfig, padded_vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(padded_vocab_size, cfg.hidden_size))
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon) if cfg.embed_layernorm else None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = F.embedding(input_ids, self.weight)
        return self.norm(hidden) if self.norm is not None else hidden


class BloomEmbedding(nn.Module):
    """First pipeline layer: embedding, embedding LayerNorm, embedding dropout."""

    def __init__(self, cfg: ModelConfig, padded_vocab_size: int):
        super().__init__()
        self.word_embeddings = WordEmbedding(cfg, padded_vocab_size)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.word_embeddings(input_ids))


class BloomAttention(nn.Module):
    """Causal self-attention with ALiBi (see megatron/model/kernels/attention.py for the kernel)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout_p = cfg.attention_dropout
        self.attention = get_kernel("attention", cfg.use_fused_kernels)
        self.register_buffer("alibi_slopes", alibi_slopes(cfg.num_attention_heads), persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = hidden.shape
        qkv = self.query_key_value(hidden).view(batch, seq, self.num_heads, 3, self.head_dim)
        query, key, value = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))  # [b, heads, s, d]
        context = self.attention(query, key, value, self.alibi_slopes, self.dropout_p if self.training else 0.0)
        context = context.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
        return self.dense(context)


class BloomMLP(nn.Module):
    """h -> 4h, tanh-approximated GeLU, 4h -> h."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.ffn_size)
        self.dense_4h_to_h = nn.Linear(cfg.ffn_size, cfg.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(hidden), approximate="tanh"))


class BloomBlock(nn.Module):
    """Pre-LayerNorm transformer block; residuals come from the block's input (not the LN output)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.self_attention = BloomAttention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.mlp = BloomMLP(cfg)
        self.hidden_dropout = cfg.hidden_dropout

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        attention = self.self_attention(self.input_layernorm(hidden))
        hidden = hidden + F.dropout(attention, self.hidden_dropout, self.training)
        mlp = self.mlp(self.post_attention_layernorm(hidden))
        return hidden + F.dropout(mlp, self.hidden_dropout, self.training)


class BloomForCausalLM(nn.Module):
    """The whole model on one device: ``forward(input_ids) -> logits [b, s, padded_vocab]``."""

    def __init__(self, cfg: ModelConfig, padded_vocab_size: Optional[int] = None):
        super().__init__()
        self.cfg = cfg
        self.padded_vocab_size = padded_vocab_size or cfg.padded_vocab_size()
        self.embedding = BloomEmbedding(cfg, self.padded_vocab_size)
        self.layers = nn.ModuleList(BloomBlock(cfg) for _ in range(cfg.num_layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        if self.embedding.word_embeddings.weight.device.type != "meta":
            init_weights(self, cfg)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embedding(input_ids)
        for layer in self.layers:
            hidden = layer(hidden)
        hidden = self.final_layernorm(hidden)
        return F.linear(hidden, self.embedding.word_embeddings.weight)  # tied LM head

    @torch.no_grad()
    def generate_greedy(self, input_ids: torch.Tensor, max_new_tokens: int, eos_id: Optional[int] = None) -> torch.Tensor:
        """Greedy continuation (no KV cache: for small models, demos and tests)."""
        tokens = input_ids
        for _ in range(max_new_tokens):
            window = tokens[:, -self.cfg.seq_length :]
            next_token = self(window)[:, -1, : self.cfg.vocab_size].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
            if eos_id is not None and bool((next_token == eos_id).all()):
                break
        return tokens


def init_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """BLOOM's (Megatron's) initialisation: N(0, std) weights, output projections scaled by
    1/sqrt(2 x num_layers) so the residual stream's variance does not grow with depth, zero
    biases, unit LayerNorms."""
    scaled_std = cfg.init_method_std / math.sqrt(2.0 * cfg.num_layers)
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            is_output = name.endswith("self_attention.dense") or name.endswith("mlp.dense_4h_to_h")
            nn.init.normal_(module.weight, mean=0.0, std=scaled_std if is_output else cfg.init_method_std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, WordEmbedding):
            nn.init.normal_(module.weight, mean=0.0, std=cfg.init_method_std)


def language_model_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: Optional[torch.Tensor] = None,
                        fused: bool = True) -> torch.Tensor:
    """Mean next-token cross entropy in fp32 over the positions where ``loss_mask`` is 1."""
    losses = get_kernel("cross_entropy", fused)(logits.flatten(0, 1), labels.flatten())
    if loss_mask is None:
        return losses.mean()
    mask = loss_mask.flatten().float()
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total, embedding and non-embedding parameter counts (a tied matrix counts once)."""
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for n, p in model.named_parameters() if n.endswith("word_embeddings.weight"))
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def build_model(cfg: ModelConfig, padded_vocab_size: Optional[int] = None, device: str | torch.device = "cpu") -> BloomForCausalLM:
    """Build the single-device model; ``device="meta"`` allocates nothing (for dry runs)."""
    with torch.device(device):
        return BloomForCausalLM(cfg, padded_vocab_size)
