"""The BLOOM decoder, shaped like Megatron-DeepSpeed's layers and tensor-parallel throughout.

    tokens -> word embedding -> embedding LayerNorm -> N x [pre-LN ALiBi attention, pre-LN GeLU MLP]
           -> final LayerNorm -> logits through the (tied) embedding matrix, or given labels the
              loss, through the fused LM head + cross entropy that never forms the logits

Module and parameter names are Megatron-DeepSpeed's (``word_embeddings.norm``,
``self_attention.query_key_value``, ``mlp.dense_h_to_4h``...), so each module is one pipeline
layer and its state dict one ``layer_XX-model_YY-model_states.pt`` file. With no tensor-parallel
group every layer is a plain single-device layer; with one, QKV and dense_h_to_4h are
column-parallel, the attention output and dense_4h_to_h row-parallel, the embedding
vocab-parallel. The fused QKV rows are laid out [head, (q, k, v), head_dim], so the contiguous
column split gives each rank whole heads, whose ALiBi slopes it takes.

Initialisation draws every layer's weights from its own generator seeded by (seed, pipeline
layer index), full-size on every rank before slicing, so any TP x PP layout starts from the
same weights as one device.

Dropout draws its masks as Megatron does (megatron/core/tensor_parallel/random.py): attention
dropout, and hidden dropout under sequence parallelism, from the ``rng_tracker``'s
model-parallel stream (different on each TP rank: the activations differ); hidden dropout on
activations duplicated across TP ranks from the default stream (the same on each TP rank, so
the copies stay equal). Activation recompute replays the tracker's draws too.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron.config import ModelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RNGStatesTracker,
    RowParallelLinear,
    SequenceParallelLayerNorm,
    VocabParallelEmbedding,
    copy_to_tensor_model_parallel_region,
    dropout,
    gather_from_sequence_parallel_region,
    model_parallel_region,
    vocab_parallel_cross_entropy,
)
from megatron.model.alibi import alibi_slopes_for_rank
from megatron.model.kernels import Kernels, select_kernels
from megatron.model.kernels.cross_entropy import fused_cross_entropy, reference_cross_entropy
from megatron.model.layout import EMBEDDING_INDEX, block_index


def layer_generator(seed: int, layer_index: int) -> torch.Generator:
    """The generator that initialises pipeline layer ``layer_index``: the same on every layout."""
    return torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + layer_index)


def normal_init(std: float, generator: Optional[torch.Generator]):
    """An init method drawing N(0, std) on the CPU from ``generator`` (layout-independent draws)."""

    def init(tensor: torch.Tensor) -> None:
        with torch.no_grad():
            values = torch.empty(tensor.shape, dtype=torch.float32, device="cpu").normal_(0.0, std, generator=generator)
            tensor.copy_(values)

    return init


class StableEmbedding(VocabParallelEmbedding):
    """BLOOM's StableEmbedding: the vocab-parallel embedding, then a LayerNorm computed in fp32.

    The name is bitsandbytes' (Dettmers et al., 2022), whose ``StableEmbedding`` BLOOM adopted
    to keep bf16 training of a 250k-row embedding stable. Megatron-DeepSpeed switches it with
    ``--embed-layernorm`` (here ``model.embed_layernorm``) and stores the LayerNorm as
    ``word_embeddings.norm.*``, as this module does; the LayerNorm follows the TP all-reduce
    (or reduce-scatter under sequence parallelism), so every rank normalises whole vectors.
    """

    def __init__(self, cfg: ModelConfig, padded_vocab_size: int, tp_group=None, sequence_parallel: bool = False,
                 generator: Optional[torch.Generator] = None):
        super().__init__(padded_vocab_size, cfg.hidden_size, tp_group, sequence_parallel=sequence_parallel,
                         init_method=normal_init(cfg.init_method_std, generator))
        self.norm = (SequenceParallelLayerNorm(cfg.hidden_size, cfg.layernorm_epsilon, tp_group, sequence_parallel,
                                               compute_in_fp32=True)
                     if cfg.embed_layernorm else None)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = super().forward(input_ids)
        return self.norm(hidden) if self.norm is not None else hidden


class BloomEmbedding(nn.Module):
    """First pipeline layer: embedding, embedding LayerNorm, embedding dropout."""

    def __init__(self, cfg: ModelConfig, padded_vocab_size: int, tp_group=None, sequence_parallel: bool = False,
                 seed: int = 0, rng_tracker: Optional[RNGStatesTracker] = None):
        super().__init__()
        self.word_embeddings = StableEmbedding(cfg, padded_vocab_size, tp_group, sequence_parallel,
                                             layer_generator(seed, EMBEDDING_INDEX))
        self.dropout_p = cfg.hidden_dropout
        self.rng_tracker = rng_tracker
        # Under sequence parallelism each TP rank holds its own tokens of the output.
        self.split_across_tp = sequence_parallel and self.word_embeddings.tp_size > 1

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return dropout(self.word_embeddings(input_ids), self.dropout_p, self.training, self.rng_tracker,
                       model_parallel=self.split_across_tp)


class BloomAttention(nn.Module):
    """Causal self-attention with ALiBi over this rank's heads (kernel: megatron/model/kernels)."""

    def __init__(self, cfg: ModelConfig, kernels: Kernels, tp_group=None, sequence_parallel: bool = False,
                 generator: Optional[torch.Generator] = None, rng_tracker: Optional[RNGStatesTracker] = None):
        super().__init__()
        self.rng_tracker = rng_tracker
        std, out_std = cfg.init_method_std, cfg.init_method_std / math.sqrt(2.0 * cfg.num_layers)
        self.query_key_value = ColumnParallelLinear(cfg.hidden_size, 3 * cfg.hidden_size, tp_group,
                                                    sequence_parallel=sequence_parallel,
                                                    init_method=normal_init(std, generator))
        # With a fused bias-dropout-add the block adds the output bias (forward returns it apart).
        self.dense = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, tp_group, sequence_parallel=sequence_parallel,
                                       init_method=normal_init(out_std, generator),
                                       skip_bias_add=kernels.bias_dropout_add.name != "reference")
        tp_rank, tp_size = self.query_key_value.tp_rank, self.query_key_value.tp_size
        self.num_heads = cfg.num_attention_heads // tp_size
        self.head_dim = cfg.head_dim
        self.dropout_p = cfg.attention_dropout
        self.attention = kernels.attention.fn
        self.register_buffer("alibi_slopes", alibi_slopes_for_rank(cfg.num_attention_heads, tp_rank, tp_size),
                             persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, Optional[torch.Tensor]]:
        qkv = self.query_key_value(hidden)
        batch, seq, _ = qkv.shape
        qkv = qkv.view(batch, seq, self.num_heads, 3, self.head_dim)
        # unbind, not three selects: its backward stacks the three gradients into one new tensor,
        # where each select's backward zero-fills a tensor of qkv's size and two adds sum them.
        query, key, value = (t.transpose(1, 2) for t in qkv.unbind(3))  # [b, heads, s, d]
        dropout_p = self.dropout_p if self.training else 0.0
        # This rank's heads only: their dropout masks come from the model-parallel stream.
        with model_parallel_region(self.rng_tracker, active=dropout_p > 0.0):
            context = self.attention(query, key, value, self.alibi_slopes, dropout_p)
        return self.dense(context.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim))


class BloomMLP(nn.Module):
    """h -> 4h (column-parallel), tanh-approximated GeLU, 4h -> h (row-parallel)."""

    def __init__(self, cfg: ModelConfig, kernels: Kernels, tp_group=None, sequence_parallel: bool = False,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        std, out_std = cfg.init_method_std, cfg.init_method_std / math.sqrt(2.0 * cfg.num_layers)
        # Fused kernels take the biases apart from the matmuls; the references keep them inside.
        self.fused_bias_gelu = kernels.bias_gelu.name != "reference"
        self.bias_gelu = kernels.bias_gelu.fn
        self.dense_h_to_4h = ColumnParallelLinear(cfg.hidden_size, cfg.ffn_size, tp_group,
                                                  sequence_parallel=sequence_parallel,
                                                  init_method=normal_init(std, generator),
                                                  skip_bias_add=self.fused_bias_gelu)
        self.dense_4h_to_h = RowParallelLinear(cfg.ffn_size, cfg.hidden_size, tp_group,
                                               sequence_parallel=sequence_parallel,
                                               init_method=normal_init(out_std, generator),
                                               skip_bias_add=kernels.bias_dropout_add.name != "reference")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The output; ``(output without bias, bias)`` when the block adds the bias (fused)."""
        if self.fused_bias_gelu:
            return self.dense_4h_to_h(self.bias_gelu(*self.dense_h_to_4h(hidden)))
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(hidden), approximate="tanh"))


class BloomBlock(nn.Module):
    """Pre-LayerNorm transformer block; residuals come from the block's input (not the LN output).

    Output projections are initialised with std / sqrt(2 x num_layers) (BLOOM's, Megatron's
    rule) so the residual stream's variance does not grow with depth.
    """

    def __init__(self, cfg: ModelConfig, layer_number: int, tp_group=None, sequence_parallel: bool = False,
                 seed: int = 0, rng_tracker: Optional[RNGStatesTracker] = None, kernels: Optional[Kernels] = None):
        super().__init__()
        kernels = kernels or select_kernels(cfg, "cpu")
        generator = layer_generator(seed, block_index(layer_number))
        eps = cfg.layernorm_epsilon
        self.input_layernorm = SequenceParallelLayerNorm(cfg.hidden_size, eps, tp_group, sequence_parallel)
        self.self_attention = BloomAttention(cfg, kernels, tp_group, sequence_parallel, generator, rng_tracker)
        self.post_attention_layernorm = SequenceParallelLayerNorm(cfg.hidden_size, eps, tp_group, sequence_parallel)
        self.mlp = BloomMLP(cfg, kernels, tp_group, sequence_parallel, generator)
        self.fused_bias_dropout_add = kernels.bias_dropout_add.name != "reference"
        self.bias_dropout_add = kernels.bias_dropout_add.fn
        # The first residual add and the post-attention LayerNorm in one kernel (no dropout).
        self.fused_add_layer_norm = kernels.add_layer_norm.name != "reference"
        self.add_layer_norm = kernels.add_layer_norm.fn
        self.hidden_dropout = cfg.hidden_dropout
        self.rng_tracker = rng_tracker
        # The residual stream is duplicated across TP ranks, or split over them by sequence.
        self.split_across_tp = sequence_parallel and self.mlp.dense_h_to_4h.tp_size > 1

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.hidden_dropout, self.training, self.rng_tracker, model_parallel=self.split_across_tp)

    def _residual(self, branch, residual: torch.Tensor) -> torch.Tensor:
        if not self.fused_bias_dropout_add:
            return residual + self._dropout(branch)
        output, bias = branch
        p = self.hidden_dropout if self.training else 0.0
        with model_parallel_region(self.rng_tracker, active=p > 0.0 and self.split_across_tp):
            return self.bias_dropout_add(output, bias, residual, p, self.training)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        branch = self.self_attention(self.input_layernorm(hidden))
        if self.fused_add_layer_norm and not (self.training and self.hidden_dropout > 0.0):
            output, bias = branch if self.fused_bias_dropout_add else (branch, None)
            weight, ln_bias = self.post_attention_layernorm.affine()
            hidden, normed = self.add_layer_norm(output, bias, hidden, weight, ln_bias,
                                                 self.post_attention_layernorm.eps)
        else:
            hidden = self._residual(branch, hidden)
            normed = self.post_attention_layernorm(hidden)
        return self._residual(self.mlp(normed), hidden)


def lm_head_input(hidden: torch.Tensor, embedding: StableEmbedding) -> torch.Tensor:
    """The LM head's input, brought into the tensor-parallel region.

    The hidden state is duplicated across TP (or split over the sequence), while the matrix is
    split over the vocabulary, so f (or a sequence all-gather) brings the input in and makes
    the backward sum (all-reduce, or reduce-scatter) the partial input gradients of every
    vocabulary slice.
    """
    if embedding.sequence_parallel:
        return gather_from_sequence_parallel_region(hidden, embedding.tp_group, tensor_parallel_output_grad=True)
    return copy_to_tensor_model_parallel_region(hidden, embedding.tp_group)


def lm_head_logits(hidden: torch.Tensor, embedding: StableEmbedding) -> torch.Tensor:
    """Logits through the tied embedding: this rank's vocabulary slice when tensor-parallel
    (collectives: those of :func:`lm_head_input`)."""
    return F.linear(lm_head_input(hidden, embedding), embedding.weight)


def lm_head_loss(hidden: torch.Tensor, embedding: StableEmbedding, labels: torch.Tensor, head: Callable,
                 loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`language_model_loss` of :func:`lm_head_logits`, through ``head``, the registry's
    ``cross_entropy`` implementation (``fused_linear`` never forms the logits).

    Collectives: those of :func:`lm_head_input`, then, with TP, the three [tokens] all-reduces
    of the vocabulary-parallel cross entropy (megatron/model/kernels/linear_cross_entropy.py).
    """
    losses = head(lm_head_input(hidden, embedding).flatten(0, 1), embedding.weight, labels.flatten(),
                  embedding.tp_group)
    return masked_mean(losses, loss_mask)


class BloomForCausalLM(nn.Module):
    """The whole model on one pipeline stage: ``forward(input_ids) -> logits [b, s, vocab(/TP)]``,
    or ``forward(input_ids, labels, loss_mask) -> mean loss`` (see :meth:`forward`)."""

    def __init__(self, cfg: ModelConfig, padded_vocab_size: Optional[int] = None, tp_group=None,
                 sequence_parallel: bool = False, seed: int = 0, checkpoint_num_layers: int = 0,
                 rng_tracker: Optional[RNGStatesTracker] = None, kernels: Optional[Kernels] = None):
        super().__init__()
        kernels = kernels or select_kernels(cfg, "cpu")
        self.cfg = cfg
        self.padded_vocab_size = padded_vocab_size or cfg.padded_vocab_size()
        self.rng_tracker = rng_tracker
        self.embedding = BloomEmbedding(cfg, self.padded_vocab_size, tp_group, sequence_parallel, seed, rng_tracker)
        self.layers = nn.ModuleList(BloomBlock(cfg, i, tp_group, sequence_parallel, seed, rng_tracker, kernels)
                                    for i in range(cfg.num_layers))
        self.final_layernorm = SequenceParallelLayerNorm(cfg.hidden_size, cfg.layernorm_epsilon, tp_group,
                                                         sequence_parallel)
        self.checkpoint_num_layers = checkpoint_num_layers  # 0: no activation recompute
        self.head_loss = kernels.cross_entropy.fn

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits without ``labels``; with them, :func:`language_model_loss`'s mean loss over the
        ``loss_mask`` positions, through the registry's LM head + loss (``fused_linear`` forms no
        [tokens, vocab] logits)."""
        hidden = self.embedding(input_ids)
        hidden = run_blocks(self.layers, hidden, self.checkpoint_num_layers if self.training else 0, self.rng_tracker)
        hidden = self.final_layernorm(hidden)
        if labels is None:
            return lm_head_logits(hidden, self.embedding.word_embeddings)
        return lm_head_loss(hidden, self.embedding.word_embeddings, labels, self.head_loss, loss_mask)

    @torch.no_grad()
    def generate_greedy(self, input_ids: torch.Tensor, max_new_tokens: int,
                        eos_id: Optional[int] = None) -> torch.Tensor:
        """Greedy continuation on a single device (no KV cache: for small models, demos and tests)."""
        tokens = input_ids
        for _ in range(max_new_tokens):
            window = tokens[:, -self.cfg.seq_length :]
            next_token = self(window)[:, -1, : self.cfg.vocab_size].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
            if eos_id is not None and bool((next_token == eos_id).all()):
                break
        return tokens


def run_blocks(blocks: nn.ModuleList, hidden: torch.Tensor, checkpoint_num_layers: int,
               rng_tracker: Optional[RNGStatesTracker] = None) -> torch.Tensor:
    """Apply ``blocks``; with ``checkpoint_num_layers`` = k > 0, keep only every k-th block's
    input and recompute the rest in the backward (activation checkpointing). The recompute
    replays the default generator's draws (torch's checkpoint) and the tracker's (its own
    checkpoint), so it sees exactly the dropout masks of the first pass."""
    if checkpoint_num_layers <= 0:
        for block in blocks:
            hidden = block(hidden)
        return hidden
    for start in range(0, len(blocks), checkpoint_num_layers):
        chunk = blocks[start : start + checkpoint_num_layers]
        if rng_tracker is not None:
            hidden = rng_tracker.checkpoint(run_blocks, chunk, hidden, 0)
        else:
            hidden = checkpoint(run_blocks, chunk, hidden, 0, use_reentrant=False)
    return hidden


def language_model_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: Optional[torch.Tensor] = None,
                        fused: bool = True, tp_group=None) -> torch.Tensor:
    """Mean next-token cross entropy in fp32 over the positions where ``loss_mask`` is 1.

    With a tensor-parallel group the logits are this rank's vocabulary slice and the loss is
    computed without gathering the vocabulary (megatron/core/tensor_parallel/cross_entropy.py).
    """
    flat_logits, flat_labels = logits.flatten(0, 1), labels.flatten()
    if tp_group is not None and torch.distributed.get_world_size(tp_group) > 1:
        losses = vocab_parallel_cross_entropy(flat_logits, flat_labels, tp_group)
    else:
        losses = (fused_cross_entropy if fused else reference_cross_entropy)(flat_logits, flat_labels)
    return masked_mean(losses, loss_mask)


def masked_mean(losses: torch.Tensor, loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean of per-token ``losses`` over the positions where ``loss_mask`` is 1 (all without one)."""
    if loss_mask is None:
        return losses.mean()
    mask = loss_mask.flatten().float()
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total, embedding and non-embedding parameter counts (a tied matrix counts once)."""
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for n, p in model.named_parameters() if n.endswith("word_embeddings.weight"))
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def build_model(cfg: ModelConfig, padded_vocab_size: Optional[int] = None, device: str | torch.device = "cpu",
                tp_group=None, sequence_parallel: bool = False, seed: int = 0,
                checkpoint_num_layers: int = 0, rng_tracker: Optional[RNGStatesTracker] = None,
                kernels: Optional[Kernels] = None) -> BloomForCausalLM:
    """Build the model; ``device="meta"`` allocates nothing (for dry runs). ``rng_tracker``: the
    rank's tensor-parallel random streams, for dropout (none needed without dropout).
    ``kernels``: the implementations to run (default: the registry's choice for ``device``)."""
    kernels = kernels or select_kernels(cfg, torch.device(device).type)
    with torch.device(device):
        return BloomForCausalLM(cfg, padded_vocab_size, tp_group, sequence_parallel, seed, checkpoint_num_layers,
                                rng_tracker, kernels)
