"""Text continuation with our model at any tensor-parallel size: greedy, or sampling with a
temperature, top-k and top-p (nucleus), seeded.

Each step runs the whole sequence so far (at most ``seq_length`` tokens: no KV cache, which is
right for the small models and demos this serves, and slow for large ones), takes the last
position's logits, all-gathers the vocabulary slices across the TP group, drops the padding rows
and picks the next token. Every TP rank then holds the same logits and the same seeded
generator, so all ranks pick the same token without another collective.

The sampling filters follow transformers' ``TopKLogitsWarper`` / ``TopPLogitsWarper``
(temperature first, then top-k, then top-p keeping at least one token), so a sampled run reads
like ``generate(do_sample=True, ...)``; greedy decoding equals transformers' ``generate`` on the
exported model (tests/test_generate.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region
from megatron.errors import UsageError
from megatron.model.bloom import BloomForCausalLM


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. ``greedy``: the most likely one; else a sample."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    seed: int = 1234

    def validate(self) -> "SamplingConfig":
        """Raise ValueError naming the setting that is out of range."""
        if self.temperature <= 0:
            raise UsageError(f"temperature must be positive, got {self.temperature} (for greedy decoding use greedy)")
        if self.top_k < 0:
            raise UsageError(f"top-k must be >= 0 (0: off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"top-p must be in (0, 1] (1: off), got {self.top_p}")
        return self


def filter_logits(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """[batch, vocab] logits after temperature, top-k and top-p; removed entries are -inf."""
    logits = logits / sampling.temperature
    if sampling.top_k > 0:
        k = min(sampling.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= 1 - sampling.top_p
        remove_sorted[..., -1] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def next_token_logits(model: BloomForCausalLM, tokens: torch.Tensor) -> torch.Tensor:
    """[batch, vocab_size] logits of the next token (every TP slice gathered, padding dropped)."""
    window = tokens[:, -model.cfg.seq_length :]
    logits = model(window)[:, -1, :]
    tp_group = model.embedding.word_embeddings.tp_group
    if tp_group is not None and torch.distributed.get_world_size(tp_group) > 1:
        logits = gather_from_tensor_model_parallel_region(logits.contiguous(), tp_group)
    return logits[:, : model.cfg.vocab_size].float()


@torch.no_grad()
def generate(model: BloomForCausalLM, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig,
             eos_id: Optional[int] = None, device: str | torch.device = "cpu") -> list[int]:
    """The new token ids after ``prompt_ids`` (at most ``max_new_tokens``; stops after ``eos_id``)."""
    if not prompt_ids:
        raise UsageError("an empty prompt has nothing to continue: give at least one token")
    model.eval()
    generator = torch.Generator(device="cpu").manual_seed(sampling.seed)
    tokens = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = next_token_logits(model, tokens)
        if sampling.greedy:
            token = int(logits.argmax(dim=-1))
        else:
            probs = filter_logits(logits, sampling).softmax(dim=-1).cpu()
            token = int(torch.multinomial(probs, 1, generator=generator))
        new.append(token)
        tokens = torch.cat([tokens, torch.tensor([[token]], device=device)], dim=1)
        if eos_id is not None and token == eos_id:
            break
    return new
