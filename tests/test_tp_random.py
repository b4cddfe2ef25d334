"""Dropout randomness under tensor parallelism, as Megatron draws it.

Masks on activations that differ across TP ranks (this rank's attention heads; hidden states
under sequence parallelism) come from the tracker's model-parallel stream, seeded per TP rank;
masks on activations duplicated across TP ranks come from the default stream, seeded alike on
every TP rank, so the copies stay identical. Activation recompute replays both streams.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from launch import run_ranks
from megatron.config import ModelConfig
from megatron.core.tensor_parallel import MODEL_PARALLEL_RNG, dropout, initialize_rng, model_parallel_seed
from megatron.model.bloom import build_model, language_model_loss

CFG = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=128,
                  init_method_std=0.02, hidden_dropout=0.1, attention_dropout=0.1)


def test_seeds_differ_per_pipeline_stage_and_tp_rank_as_megatron_derives_them():
    assert model_parallel_seed(1234, tp_rank=0, pp_rank=0) == (1234, 1234 + 2718)
    assert model_parallel_seed(1234, tp_rank=1, pp_rank=0) == (1234, 1234 + 2719)  # same default stream
    assert model_parallel_seed(1234, tp_rank=0, pp_rank=2) == (1434, 1434 + 2718)  # stage: +100 x pp_rank


def test_dropout_draws_from_the_stream_it_is_told():
    tracker = initialize_rng(7)
    x = torch.ones(256)
    default_before, tracker_before = torch.get_rng_state(), tracker.get_states()[MODEL_PARALLEL_RNG]
    dropout(x, 0.5, True, tracker, model_parallel=True)
    assert torch.equal(torch.get_rng_state(), default_before)
    assert not torch.equal(tracker.get_states()[MODEL_PARALLEL_RNG], tracker_before)
    tracker_before = tracker.get_states()[MODEL_PARALLEL_RNG]
    dropout(x, 0.5, True, tracker, model_parallel=False)
    assert not torch.equal(torch.get_rng_state(), default_before)
    assert torch.equal(tracker.get_states()[MODEL_PARALLEL_RNG], tracker_before)


def _same_on_both_ranks(tensor: torch.Tensor, group) -> bool:
    gathered = [torch.empty_like(tensor) for _ in range(2)]
    dist.all_gather(gathered, tensor.contiguous(), group=group)
    return torch.equal(gathered[0], gathered[1])


def _tp2_worker(rank: int, sequence_parallel: bool) -> dict:
    dist.init_process_group("gloo")
    try:
        group = dist.new_group([0, 1])
        torch.manual_seed(model_parallel_seed(11, rank, 0)[0])
        tracker = initialize_rng(11, tp_rank=rank)
        ones = torch.ones(4096)
        mp_mask = dropout(ones, 0.5, True, tracker, model_parallel=True)
        default_mask = dropout(ones, 0.5, True, tracker, model_parallel=False)
        # The whole model with attention and hidden dropout: which streams did its forward use?
        model = build_model(CFG, tp_group=group, sequence_parallel=sequence_parallel, seed=3, rng_tracker=tracker)
        model.train()
        tokens = torch.randint(0, CFG.vocab_size, (2, CFG.seq_length), generator=torch.Generator().manual_seed(5))
        default_before, tracker_before = torch.get_rng_state(), tracker.get_states()[MODEL_PARALLEL_RNG]
        model(tokens)
        return {"model-parallel masks agree": _same_on_both_ranks(mp_mask, group),
                "default masks agree": _same_on_both_ranks(default_mask, group),
                "default moved": not torch.equal(torch.get_rng_state(), default_before),
                "tracker moved": not torch.equal(tracker.get_states()[MODEL_PARALLEL_RNG], tracker_before),
                "default states agree": _same_on_both_ranks(torch.get_rng_state(), group)}
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_tp2_masks_differ_where_activations_differ_and_agree_where_they_are_duplicated():
    r0, r1 = run_ranks(_tp2_worker, 2, (False,))
    assert not r0["model-parallel masks agree"] and r0["default masks agree"]
    # Attention dropout (this rank's heads) drew from the per-rank stream; hidden dropout on the
    # duplicated residual stream drew from the default one, in step on both ranks.
    assert r0["tracker moved"] and r1["tracker moved"]
    assert r0["default moved"] and r0["default states agree"]


def test_tp2_sequence_parallel_hidden_dropout_draws_per_rank():
    r0, r1 = run_ranks(_tp2_worker, 2, (True,))
    # Every dropout (attention, and hidden on this rank's tokens) used the per-rank stream.
    assert r0["tracker moved"] and not r0["default moved"] and not r1["default moved"]


def _loss_and_grads(checkpoint_num_layers: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(21)
    tracker = initialize_rng(21)
    model = build_model(CFG, seed=3, checkpoint_num_layers=checkpoint_num_layers, rng_tracker=tracker)
    model.train()
    tokens = torch.randint(0, CFG.vocab_size, (2, CFG.seq_length + 1), generator=torch.Generator().manual_seed(5))
    loss = language_model_loss(model(tokens[:, :-1]), tokens[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_recompute_replays_the_dropout_masks_of_the_first_pass():
    loss, grads = _loss_and_grads(checkpoint_num_layers=0)
    recomputed_loss, recomputed_grads = _loss_and_grads(checkpoint_num_layers=1)
    assert torch.equal(loss, recomputed_loss)
    differing = [n for n in grads if not torch.equal(grads[n], recomputed_grads[n])]
    assert not differing, f"gradients differ after recompute (new dropout masks?): {differing}"
