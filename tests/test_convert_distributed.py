"""Conversions against real multi-rank runs (gloo, CPU, fp32).

* Train a tiny BLOOM at (TP, PP, DP) = (2, 2, 1) for a few steps; write its layer files with
  ``save_layer_files`` and with DeepSpeed's own ``engine.save_checkpoint`` (which writes them for
  pipelines); both are identical, and their export to transformers gives the logits of the
  trained weights (gathered independently from every rank's parameters).
* Train at TP=2 with ZeRO-2 and no pipeline, saving through the trainer's own checkpointing:
  the export (model shape from the checkpoint's manifest) gives the trained weights' logits.
* Import a transformers BLOOM at TP=2 and at TP=1; on 4 ranks fill the (2, 2) ``PipelineModule``
  and a TP=2 single-stage model (re-split from the TP=1 files) with ``load_layer_files_into``:
  one forward gives transformers' loss on the same batch.
"""

from __future__ import annotations

import pytest
import torch
from transformers import BloomForCausalLM

from launch import run_ranks
from megatron.checkpoint.layer_files import load_tensor_file
from megatron.checkpoint.layout import LAYER_FILE_PATTERN
from megatron.config import config_from_dict, save_config
from megatron.convert.from_hf import import_from_hf
from megatron.convert.to_hf import export_to_hf
from megatron.model.bloom import build_model
from megatron.model.layout import flat_name
from test_convert_hf import random_hf_model, safetensors_dict
from training_utils import VOCAB, synthetic_corpus, tiny_run

pytestmark = pytest.mark.distributed
STEPS = 3


def _train_worker(rank: int, body: dict, out: str) -> None:
    from megatron.checkpoint.layer_files import save_layer_files
    from megatron.training.pretrain import pretrain

    layers = body["model"]["num_layers"]

    def on_finish(engine, parallel):
        save_layer_files(engine.module, f"{out}/ours/global_step{STEPS}", parallel, layers)
        engine.save_checkpoint(f"{out}/deepspeed", tag=f"global_step{STEPS}", client_state={"config": body})
        # Every rank's parameters with their TP attributes, for an independent gather.
        local = {}
        for name, param in engine.module.named_parameters():
            if name.startswith("tied_modules.") and not parallel.is_pipeline_first_stage():
                continue
            local[flat_name(name, layers)] = (param.detach().clone(),
                                                           getattr(param, "tensor_model_parallel", False),
                                                           getattr(param, "partition_dim", -1))
        torch.save({"tp_rank": parallel.tp_rank, "weights": local}, f"{out}/rank{rank}.pt")

    pretrain(config_from_dict(body), on_finish=on_finish)


def _gather(out, world: int) -> dict[str, torch.Tensor]:
    shards: dict[str, dict[int, tuple]] = {}
    for rank in range(world):
        saved = torch.load(f"{out}/rank{rank}.pt", weights_only=False)
        for name, entry in saved["weights"].items():
            shards.setdefault(name, {})[saved["tp_rank"]] = entry
    merged = {}
    for name, by_tp in shards.items():
        tensor, parallel, dim = by_tp[0]
        merged[name] = torch.cat([by_tp[t][0] for t in sorted(by_tp)], dim) if parallel else tensor
    return merged


@pytest.mark.filterwarnings("ignore:no tokenizer given")
def test_export_of_a_tp2_pp2_training_run(tmp_path):
    corpus = synthetic_corpus(tmp_path / "corpus")
    body = tiny_run(tmp_path, corpus, parallel={"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2},
                    training={"train_iters": STEPS}, logging={"eval_interval": 0})
    run_ranks(_train_worker, 4, (body, str(tmp_path)), timeout=600)

    ours, ds = tmp_path / "ours" / f"global_step{STEPS}", tmp_path / "deepspeed" / f"global_step{STEPS}"
    ours_files = sorted(p.name for p in ours.iterdir())
    assert ours_files == sorted(p.name for p in ds.iterdir() if LAYER_FILE_PATTERN.match(p.name))
    assert len(ours_files) == (2 + 2) * 2
    for name in ours_files:
        a, b = load_tensor_file(ours / name), load_tensor_file(ds / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    cfg = config_from_dict(body)
    save_config(cfg, tmp_path / "run.yaml")
    export_to_hf(tmp_path / "ours", tmp_path / "hf-ours", config=tmp_path / "run.yaml", progress=False)
    # No --config: the model shape comes from the config DeepSpeed saved in mp_rank_00's client state.
    summary = export_to_hf(tmp_path / "deepspeed", tmp_path / "hf-ds", progress=False)
    assert "client state" in summary.config_source
    a, b = safetensors_dict(tmp_path / "hf-ours"), safetensors_dict(tmp_path / "hf-ds")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    reference = build_model(cfg.model, cfg.model.padded_vocab_size(1)).eval()
    reference.load_state_dict(_gather(tmp_path, 4))
    hf = BloomForCausalLM.from_pretrained(tmp_path / "hf-ds").eval()
    tokens = torch.randint(0, VOCAB, (2, cfg.model.seq_length))
    with torch.no_grad():
        diff = (hf(tokens).logits - reference(tokens)).abs().max().item()
    assert diff <= 1e-5, diff


def _checkpointing_worker(rank: int, body: dict, out: str) -> None:
    from megatron.training.pretrain import pretrain

    def on_finish(engine, parallel):
        local = {}
        for name, param in engine.module.named_parameters():
            local[name] = (param.detach().clone(), getattr(param, "tensor_model_parallel", False),
                           getattr(param, "partition_dim", -1))
        torch.save({"tp_rank": parallel.tp_rank, "weights": local}, f"{out}/rank{rank}.pt")

    pretrain(config_from_dict(body), on_finish=on_finish)


@pytest.mark.filterwarnings("ignore:no tokenizer given")
def test_export_of_a_trainer_checkpoint_without_pipeline(tmp_path):
    """TP=2, ZeRO-2: the trainer's own checkpoint (layer files cut from the single module)."""
    corpus = synthetic_corpus(tmp_path / "corpus")
    body = tiny_run(tmp_path, corpus, parallel={"tensor_model_parallel_size": 2, "zero_stage": 2},
                    training={"train_iters": STEPS}, logging={"eval_interval": 0},
                    checkpoint={"save": str(tmp_path / "ckpt"), "save_interval": STEPS})
    run_ranks(_checkpointing_worker, 2, (body, str(tmp_path)), timeout=600)
    summary = export_to_hf(tmp_path / "ckpt", tmp_path / "hf", progress=False)  # config found with the checkpoint
    assert summary.tp_size == 2 and summary.checkpoint_dir.name == f"global_step{STEPS}"
    cfg = config_from_dict(body)
    reference = build_model(cfg.model, cfg.model.padded_vocab_size(1)).eval()
    reference.load_state_dict(_gather(tmp_path, 2))
    hf = BloomForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, VOCAB, (2, cfg.model.seq_length))
    with torch.no_grad():
        diff = (hf(tokens).logits - reference(tokens)).abs().max().item()
    assert diff <= 1e-5, diff


def _forward_worker(rank: int, body: dict, tp2_dir: str, tp1_dir: str, tokens: torch.Tensor):
    import torch.distributed as dist

    from megatron.checkpoint.layer_files import load_layer_files_into
    from megatron.core.distributed import init_distributed, shutdown_distributed
    from megatron.core.parallel_state import ParallelState
    from megatron.model.bloom import language_model_loss
    from megatron.model.pipeline import build_pipeline_model

    init_distributed()
    cfg = config_from_dict(body)
    state = ParallelState(4, rank, tp=2, pp=2)
    layers = cfg.model.num_layers
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    try:
        # (TP, PP) = (2, 2): the PipelineModule of this stage, from TP=2 layer files.
        pipe = build_pipeline_model(cfg, state, seed=99).eval()
        report = load_layer_files_into(pipe, tp2_dir, state, layers)
        assert report["source_tp_size"] == 2
        with torch.no_grad():
            if state.is_pipeline_first_stage():
                dist.send(pipe(inputs).contiguous(), dst=state.pp_ranks[1])
                pipe_loss = None
            else:
                hidden = torch.empty(*inputs.shape, cfg.model.hidden_size)
                dist.recv(hidden, src=state.pp_ranks[0])
                # The last stage hands its hidden state to the loss, which applies the tied LM head.
                pipe_loss = pipe.loss_fn(pipe(hidden), labels).item()
            # TP=2 single-stage model filled from TP=1 files (merged and re-split on load).
            model = build_model(cfg.model, cfg.padded_vocab_size, tp_group=state.tp_group, seed=99).eval()
            report = load_layer_files_into(model, tp1_dir, state, layers)
            assert report["source_tp_size"] == 1
            tp_loss = language_model_loss(model(inputs), labels, tp_group=state.tp_group).item()
    finally:
        shutdown_distributed()
    return pipe_loss, tp_loss


def test_imported_checkpoint_gives_transformers_loss_at_tp2_pp2(tmp_path):
    hf = random_hf_model(vocab=VOCAB, hidden=64, layers=2, heads=4)
    hf.save_pretrained(tmp_path / "src")
    summary = import_from_hf(tmp_path / "src", tmp_path / "tp2", tp=2, pp=2, progress=False)
    import_from_hf(tmp_path / "src", tmp_path / "tp1", tp=1, progress=False)
    body = summary.config.to_dict()
    body["model"]["seq_length"] = 32
    tokens = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf(tokens, labels=tokens).loss.item()  # transformers shifts the labels itself
    results = run_ranks(_forward_worker, 4, (body, str(tmp_path / "tp2"), str(tmp_path / "tp1"), tokens),
                        timeout=300)
    pipe_losses = [r[0] for r in results if r[0] is not None]
    tp_losses = [r[1] for r in results]
    assert len(pipe_losses) == 2
    for loss in pipe_losses + tp_losses:
        assert abs(loss - expected) <= 1e-5, (loss, expected)
