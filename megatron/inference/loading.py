"""Load any checkpoint into our model for inference, at the tensor-parallel size of this run.

    loaded = load_for_inference("runs/tiny/checkpoints", parallel=ParallelState.single())
    logits = loaded.model(input_ids)

Accepted checkpoints, recognised by what the directory holds:

- one of ours: a save root (``latest``, or ``step``, picks the tag) or a ``global_stepN`` folder,
  saved at any TP x PP x DP layout and ZeRO stage; only its layer files are read
  (megatron.checkpoint.layer_files), merged and re-split for this run's TP size;
- bare layer files (a ``global_stepN`` folder without engine state: an import, or one of BLOOM's
  published training checkpoints);
- a transformers BLOOM folder (``config.json`` + weights): imported at TP=1 into a temporary
  directory with megatron.convert.from_hf (one layer at a time), then loaded as above.

The model's shape comes from ``config`` (our YAML), else from the config found with the
checkpoint (megatron.convert.to_hf.resolve_config); the padded vocabulary from the embedding
file itself, so a checkpoint trained at another TP size (another padding) still loads.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from megatron.checkpoint.layer_files import LayerFileSet, load_layer_files_into, resolve_checkpoint_dir
from megatron.checkpoint.layout import iteration_of
from megatron.config import Config
from megatron.convert.to_hf import _check_against_files, resolve_config
from megatron.core.parallel_state import ParallelState
from megatron.errors import ConversionError, UsageError
from megatron.model.bloom import BloomForCausalLM, build_model
from megatron.model.kernels import select_kernels


@dataclass
class LoadedModel:
    """A model ready for inference, and where it came from."""

    model: BloomForCausalLM
    cfg: Config
    checkpoint_dir: Path  # the global_stepN folder read, or the transformers folder
    step: Optional[int]  # N of global_stepN; None for a transformers folder
    source: str  # "ours" or "transformers"
    config_source: str
    tokenizer: Optional[str]  # a tokenizer.json found with the checkpoint, or the config's


def is_transformers_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a transformers folder (``config.json`` and no layer files)."""
    path = Path(path)
    return (path / "config.json").is_file() and not any(path.glob("layer_*-model_*-model_states.pt"))


def _tokenizer_near(cfg: Config, *places: Path) -> Optional[str]:
    for place in places:
        if (place / "tokenizer.json").is_file():
            return str(place / "tokenizer.json")
    tokenizer = cfg.data.tokenizer
    return tokenizer if tokenizer and Path(tokenizer).exists() else None


def load_for_inference(checkpoint: str | os.PathLike, parallel: ParallelState, *, config: Optional[str] = None,
                       step: Optional[int] = None, device: str | torch.device = "cpu",
                       progress: bool = False) -> LoadedModel:
    """Build our model for this rank (TP from ``parallel``; no pipeline) and fill it from
    ``checkpoint`` (see the module docstring for what may be given). Raises ConversionError or
    ConfigError naming the file or field to fix."""
    path = Path(checkpoint)
    if not path.exists():
        raise ConversionError(f"checkpoint {path} does not exist: pass a save root, a global_stepN folder or a "
                              "transformers BLOOM folder")
    if is_transformers_folder(path):
        from megatron.convert.from_hf import import_from_hf

        # Each rank imports for itself (at TP=1, re-split below): ranks on other nodes do not see
        # this node's temporary files. Deleted once the weights are in the model.
        with tempfile.TemporaryDirectory(prefix="bloom-import-") as scratch:
            summary = import_from_hf(path, Path(scratch) / "import", tp=1, pp=1, dtype="fp32", progress=progress)
            model = _build_and_load(summary.config, summary.checkpoint_dir, str(path / "config.json"), parallel,
                                    device)
        return LoadedModel(model, summary.config, path, None, "transformers", str(path / "config.json"),
                           _tokenizer_near(summary.config, path))
    directory = resolve_checkpoint_dir(path, step)
    cfg, config_source = resolve_config(config, directory)
    model = _build_and_load(cfg, directory, config_source, parallel, device)
    return LoadedModel(model, cfg, directory, iteration_of(directory), "ours", config_source,
                       _tokenizer_near(cfg, directory, directory.parent))


def _build_and_load(cfg: Config, directory: Path, config_source: str, parallel: ParallelState,
                    device: str | torch.device) -> BloomForCausalLM:
    files = LayerFileSet.discover(directory)
    padded = _check_against_files(cfg, files, config_source)
    tp = parallel.tp_size
    if padded % tp or cfg.model.num_attention_heads % tp:
        raise ConversionError(f"{directory}: a padded vocabulary of {padded} rows and "
                              f"{cfg.model.num_attention_heads} heads cannot be split over tensor-parallel size {tp}: "
                              "run with a TP size that divides both")
    model = build_model(cfg.model, padded, device=device, tp_group=parallel.tp_group_or_none,
                        kernels=select_kernels(cfg.model, torch.device(device).type, torch.float32))
    load_layer_files_into(model, directory, parallel, cfg.model.num_layers)
    return model.eval()


def inference_parallel_state(tp: int, pp: int = 1) -> tuple[ParallelState, bool]:
    """This process's ParallelState for the inference tools, and whether a process group was
    started (the caller then ends it with ``shutdown_distributed``): a world of one without any
    process group, or the launcher's world (torchrun, srun) split as TP x PP x DP."""
    if int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))) == 1:
        if tp * pp != 1:
            raise UsageError(f"TP={tp} x PP={pp} needs {tp * pp} processes or a multiple: launch with "
                             f"torchrun --nproc-per-node {tp * pp}")
        return ParallelState.single(), False
    from megatron.core.distributed import init_distributed

    info = init_distributed()
    if info.world_size % (tp * pp):
        raise UsageError(f"{info.world_size} processes cannot be split into model replicas of TP={tp} x PP={pp}: "
                         f"launch a multiple of {tp * pp}")
    return ParallelState(info.world_size, info.rank, tp, pp), True


@dataclass
class LoadedPipeline:
    """A checkpoint loaded into DeepSpeed's pipeline engine for evaluation (PP > 1)."""

    engine: Any  # deepspeed.runtime.pipe.engine.PipelineEngine
    cfg: Config
    checkpoint_dir: Path
    step: Optional[int]
    source: str
    tokenizer: Optional[str]

    def loss(self, inputs: torch.Tensor, labels: torch.Tensor) -> float:
        """Mean loss of one micro-batch through every stage, on every rank of the pipeline."""
        return float(self.engine.eval_batch(iter([(inputs, labels)]), num_micro_batches=1, bcast_loss=True))


def inference_device() -> torch.device:
    """This process's GPU (``LOCAL_RANK``) when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def load_pipeline_for_evaluation(checkpoint: str | os.PathLike, parallel: ParallelState, micro_batch_size: int, *,
                                 config: Optional[str] = None, step: Optional[int] = None,
                                 device: str | torch.device = "cpu") -> LoadedPipeline:
    """Our checkpoint (any saved layout) as this rank's pipeline stage, TP-split, inside a
    DeepSpeed pipeline engine that evaluates one micro-batch of ``micro_batch_size`` windows at
    a time: the layer files are read straight into the stage's layers, as training resumes an
    imported model. A transformers folder: import it with tools/convert_from_hf.py first."""
    from megatron.model.pipeline import build_pipeline_model
    from megatron.training.engine import build_engine

    path = Path(checkpoint)
    if is_transformers_folder(path):
        raise ConversionError(f"{path} is a transformers folder: evaluate it without a pipeline, or import it first "
                              "(tools/convert_from_hf.py) and evaluate the import")
    directory = resolve_checkpoint_dir(path, step)
    cfg, config_source = resolve_config(config, directory)
    cfg = copy.deepcopy(cfg)
    padded = _check_against_files(cfg, LayerFileSet.discover(directory), config_source)
    m, p, t = cfg.model, cfg.parallel, cfg.training
    # The checkpoint's own padded vocabulary, split over this run's TP size.
    m.pad_vocab_size_to = padded
    m.make_vocab_size_divisible_by = math.gcd(padded // parallel.tp_size, m.make_vocab_size_divisible_by)
    m.hidden_dropout = m.attention_dropout = 0.0
    p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.zero_stage = parallel.tp_size, parallel.pp_size, 1
    t.micro_batch_size, t.global_batch_size = micro_batch_size, micro_batch_size * parallel.dp_size
    t.train_iters, t.train_samples, t.rampup_batch_size = 1, None, None
    t.bf16, t.fp16, t.checkpoint_activations = False, False, False
    cfg.validate(parallel.layout.world_size)
    kernels = select_kernels(m, torch.device(device).type, torch.float32)
    model = build_pipeline_model(cfg, parallel, t.seed, None, kernels).to(device)
    load_layer_files_into(model, directory, parallel, m.num_layers)
    engine = build_engine(cfg, model, parallel.dp_size, t.global_batch_size, mpu=None)
    return LoadedPipeline(engine, cfg, directory, iteration_of(directory), "ours",
                          _tokenizer_near(cfg, directory, directory.parent))
