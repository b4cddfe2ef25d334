"""The dry run's pipeline partition and per-rank memory estimate."""

from __future__ import annotations

import pytest

from conftest import CONFIGS
from megatron.config import load_config
from megatron.model.bloom import build_model, count_parameters
from megatron.model.pipeline import stage_partition
from megatron.training.memory import estimate_memory


def test_176b_partition_puts_six_weighted_layers_on_each_of_12_stages():
    cfg = load_config(CONFIGS / "bloom-176b.yaml")
    parts = stage_partition(cfg)
    assert len(parts) == 12 and parts[0][0] == 0 and parts[-1][1] == 70 + 6
    blocks = [sum(1 for i in range(a, b) if 3 <= i < 73) for a, b in parts]
    assert blocks == [5] + [6] * 10 + [5]  # the first and last stages also hold the embedding / head
    assert all(a < b for a, b in parts) and all(parts[i][1] == parts[i + 1][0] for i in range(11))


@pytest.mark.parametrize("size", ["560m", "1b7", "176b"])
def test_stage_parameters_add_up_to_the_model(size):
    cfg = load_config(CONFIGS / f"bloom-{size}.yaml", ["parallel.tensor_model_parallel_size=1"])
    stages = estimate_memory(cfg, world_size=cfg.parallel.pipeline_model_parallel_size)
    total = count_parameters(build_model(cfg.model, cfg.padded_vocab_size, device="meta"))["total"]
    tied_copy = cfg.padded_vocab_size * cfg.model.hidden_size + 2 * cfg.model.hidden_size
    expected = total + (tied_copy if cfg.parallel.pipeline_model_parallel_size > 1 else 0)
    assert sum(s.parameters for s in stages) == expected


def test_zero_shards_optimizer_state_and_recompute_saves_activations():
    cfg = load_config(CONFIGS / "bloom-176b.yaml")
    dp8 = estimate_memory(cfg, 384)[5]
    dp1 = estimate_memory(cfg, 48)[5]
    assert dp1.optimizer == pytest.approx(8 * dp8.optimizer)
    assert dp8.optimizer == pytest.approx(dp8.parameters * 12 / 8)
    assert dp8.weights == 2 * dp8.parameters and dp8.gradients == 4 * dp8.parameters
    no_recompute = estimate_memory(load_config(CONFIGS / "bloom-176b.yaml",
                                               ["training.checkpoint_activations=false"]), 384)[5]
    assert no_recompute.activations > 5 * dp8.activations


@pytest.mark.parametrize("bf16", [False, True])
def test_chunked_head_plan_counts_the_logits_buffers_the_kernel_makes(bf16):
    # fp32 at TP=1: one [tokens, vocab] buffer (logits, then log-probabilities, then gradient);
    # bf16: the logits and their gradient. Counted from what the kernel allocates in the
    # activations' dtype (bf16's fp32 chunk temporaries are bounded by the chunk, not planned).
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from megatron.model.kernels.linear_cross_entropy import chunked_logits_cross_entropy
    from megatron.training.memory import Kernels, _head_bytes

    cfg = load_config(CONFIGS / "tiny.yaml", ["model.seq_length=16", "training.micro_batch_size=2"])
    tokens, vocab, dtype = 32, cfg.padded_vocab_size, torch.bfloat16 if bf16 else torch.float32
    hidden = torch.randn(tokens, cfg.model.hidden_size, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, cfg.model.hidden_size, dtype=dtype, requires_grad=True)
    full = []

    class LogitsSized(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {t.untyped_storage().data_ptr() for t in args if isinstance(t, torch.Tensor)}
            if isinstance(out, torch.Tensor) and out.numel() == tokens * vocab and out.dtype == dtype and \
                    out.untyped_storage().data_ptr() not in inputs and func.overloadpacket is not torch.ops.aten.t:
                full.append(out.element_size())
            return out

    with LogitsSized():
        chunked_logits_cross_entropy(hidden, weight, torch.randint(0, vocab, (tokens,))).sum().backward()
    assert _head_bytes(cfg, Kernels(head="chunked"), 2 if bf16 else 4) == sum(full) * tokens * vocab


def measuring_worker(rank: int, body: dict) -> dict:
    """Train one bf16 step; report the bytes the engine really holds, by kind."""
    from megatron.config import config_from_dict
    from megatron.training.pretrain import pretrain

    measured = {}

    def measure(engine, parallel):
        nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
        optimizer = engine.optimizer
        states = [v for state in optimizer.optimizer.state.values() for v in state.values() if hasattr(v, "numel")
                  and v.dim() > 0]
        measured.update(weights=nbytes(engine.module.parameters()),
                        gradients=nbytes(optimizer.fp32_groups_gradients_flat),
                        optimizer=nbytes(optimizer.fp32_groups_flat_partition) + nbytes(states))

    pretrain(config_from_dict(body), on_finish=measure)
    return measured


@pytest.mark.distributed
def test_estimate_matches_the_bytes_a_bf16_zero1_engine_holds(corpus, tmp_path):
    """Weights (bf16), fp32 gradient accumulation, fp32 master weights + Adam moments: the
    formula's parts against the tensors DeepSpeed's BF16_Optimizer actually allocates."""
    from launch import run_ranks
    from megatron.config import config_from_dict
    from training_utils import tiny_run

    body = tiny_run(tmp_path, corpus, training={"train_iters": 1, "bf16": True}, logging={"eval_interval": 0})
    (measured,) = run_ranks(measuring_worker, 1, (body,))
    (estimate,) = estimate_memory(config_from_dict(body), world_size=1)
    for part in ("weights", "gradients", "optimizer"):
        # DeepSpeed pads its flat buffers for alignment: a few hundred bytes at most here.
        assert getattr(estimate, part) == pytest.approx(measured[part], rel=0.01), (part, estimate, measured)
