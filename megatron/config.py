"""The one typed configuration of a run: dataclasses, YAML in and out, command-line overrides.

Field names are Megatron-DeepSpeed's argument names in snake_case (``--num-layers`` becomes
``model.num_layers``), grouped in sections, so a BLOOM launch script translates line by line.
Every module receives the section it needs as an argument; nothing reads a global.

Validation runs on the plain config, before any process group or tensor exists, and every
error names the field and the fix::

    cfg = load_config("configs/bloom-560m.yaml", overrides=["parallel.tensor_model_parallel_size=2"])
    cfg.validate(world_size=8)
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from megatron.errors import ConfigError  # defined with the other errors; importable from here too
from megatron.utils.atomic import atomic_write_text

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass
class ModelConfig:
    """Shape of the network (Megatron: ``--num-layers``, ``--hidden-size``, ...)."""

    num_layers: int = 24
    hidden_size: int = 1024
    num_attention_heads: int = 16
    ffn_hidden_size: Optional[int] = None  # None: 4 x hidden_size, as BLOOM
    seq_length: int = 2048
    vocab_size: int = 250680  # the tokenizer's vocabulary, before padding
    # Padded size of the embedding matrix. None: round vocab_size up to a multiple of
    # make_vocab_size_divisible_by x TP (Megatron's rule). BLOOM fixes it at 250,880 so the
    # checkpoint shape does not depend on the parallel layout.
    pad_vocab_size_to: Optional[int] = None
    make_vocab_size_divisible_by: int = 128
    embed_layernorm: bool = True
    layernorm_epsilon: float = 1e-5
    init_method_std: float = 0.0048
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    # Kernels (megatron/model/kernels chooses per device and logs the choice). False here runs
    # every plain PyTorch reference, for debugging and kernel tests.
    use_fused_kernels: bool = True
    # Megatron's switches: bias + GeLU, bias + dropout + residual add, fused masked softmax (for
    # us: any fused attention under attention_implementation: auto), and Megatron-core's fused
    # cross entropy.
    bias_gelu_fusion: bool = True
    bias_dropout_fusion: bool = True
    masked_softmax_fusion: bool = True
    cross_entropy_loss_fusion: bool = True
    # The residual add and the LayerNorm after it in one region (Megatron-DeepSpeed ran apex's
    # fused LayerNorm kernel unconditionally; torch's native layer_norm is that kernel now).
    layernorm_fusion: bool = True
    # auto (per device) or an implementation's name from megatron/model/kernels.
    attention_implementation: str = "auto"

    @property
    def ffn_size(self) -> int:
        """Width of the MLP's inner layer."""
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tensor_model_parallel_size: int = 1) -> int:
        """Rows of the embedding matrix: ``pad_vocab_size_to`` or Megatron's rounding rule."""
        if self.pad_vocab_size_to is not None:
            return self.pad_vocab_size_to
        multiple = self.make_vocab_size_divisible_by * tensor_model_parallel_size
        return int(math.ceil(self.vocab_size / multiple) * multiple)


@dataclass
class ParallelConfig:
    """Parallel layout. The data-parallel size is derived: world size / (TP x PP)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    zero_stage: int = 1
    sequence_parallel: bool = False
    pp_partition_method: str = "type:transformer|embedding"
    # Every N steps (and at each save) check that TP-duplicated parameters agree across TP ranks.
    tp_sync_check_interval: Optional[int] = 100
    # Megatron's --distributed-timeout-minutes (default 10): the process groups' timeout, and how
    # long any rank may go without progress once start-up is over before the job stops and names the
    # rank that is stuck (megatron/core/watchdog.py). Fractions are allowed (0.5: thirty seconds).
    distributed_timeout_minutes: float = 10.0


@dataclass
class TrainingConfig:
    """Batch sizes, length of the run, precision, recompute and the run's lifecycle."""

    micro_batch_size: int = 1
    global_batch_size: int = 8
    # [start, increment, ramp samples]: BLOOM-176B used [192, 16, 9765625].
    rampup_batch_size: Optional[list[int]] = None
    train_samples: Optional[int] = None
    train_iters: Optional[int] = None
    # true, false, or "auto": bf16 where the device computes it natively, else fp32
    # (megatron/training/precision.py resolves it at start-up and says why).
    bf16: bool | str = False
    fp16: bool = False
    checkpoint_activations: bool = False
    checkpoint_num_layers: int = 1
    seed: int = 42
    # Save and exit cleanly (megatron/training/lifecycle.py): after this many minutes since the job
    # started, every N iterations, or when this file exists. SIGTERM/SIGUSR1 do the same.
    exit_duration_in_mins: Optional[float] = None
    exit_interval: Optional[int] = None
    kill_switch_path: Optional[str] = None
    # Iterations ("START-END", inclusive, counted from 1) whose data is consumed without training.
    skip_train_iteration_range: list[str] = field(default_factory=list)
    max_consecutive_skipped_steps: int = 10
    # Megatron-DeepSpeed's --eval-only: load the checkpoint, evaluate the run's validation sets (the
    # blend and every language), log them at the checkpoint's iteration, and exit without training
    # or saving. tools/evaluate.py does the same on any held-out data.
    eval_only: bool = False


@dataclass
class OptimizerConfig:
    """AdamW and the learning-rate schedule, counted in samples as BLOOM did."""

    lr: float = 6.0e-5
    min_lr: float = 6.0e-6
    lr_decay_style: str = "cosine"
    lr_warmup_samples: int = 0
    lr_decay_samples: Optional[int] = None
    lr_decay_tokens: Optional[int] = None
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1.0e-8
    # auto (per device), torch_fused, torch_foreach, torch_for_loop or deepspeed_fused: the
    # registry in megatron/model/kernels chooses and logs it.
    adam_implementation: str = "auto"
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    # Megatron-DeepSpeed's --use-bnb-optimizer (bitsandbytes 8-bit Adam, 32-bit state for the
    # StableEmbedding). Refused: see the validation message.
    use_bnb_optimizer: bool = False


@dataclass
class DatasetSpec:
    """One language's preprocessed data: ``prefix`` of a ``.bin/.idx`` pair and its weight."""

    name: str = ""
    prefix: str = ""
    weight: Optional[float] = None


@dataclass
class DataConfig:
    """Tokenizer and the blend of per-language datasets."""

    tokenizer: Optional[str] = None
    datasets: list[DatasetSpec] = field(default_factory=list)
    # A YAML file whose ``datasets:`` list is used as ``datasets`` (configs/data/ holds BLOOM's
    # ROOTS blend and the demo corpus's); relative to the config file's directory, else to the
    # current one. Read when the config is loaded: a saved config.yaml lists the datasets.
    datasets_file: Optional[str] = None
    alpha: Optional[float] = None  # weights from token counts as p_i^alpha when set
    split: str = "969,30,1"
    num_workers: int = 2
    cache_dir: Optional[str] = None


@dataclass
class CheckpointConfig:
    """Where and how often to save, and how many checkpoints to keep."""

    save: Optional[str] = None
    load: Optional[str] = None  # resumes from the newest complete checkpoint here (megatron/checkpoint)
    save_interval: Optional[int] = None
    keep_last: Optional[int] = 3  # newest complete checkpoints kept; None keeps all
    keep_every: Optional[int] = None  # also keep forever those whose iteration is a multiple of this
    # Worker processes of rank 0's in-job universal conversion (resume on another layout); the
    # offline tool tools/convert_checkpoint.py takes --workers.
    universal_conversion_workers: int = 1
    # What resuming checks: fast, sizes and each torch file's zip directory (kilobytes per file);
    # full, also every file's CRC32 against the manifest (reads every byte: see bench/README.md).
    verify: str = "fast"
    # A save that fails on a full disk (ENOSPC, EFBIG): stop the run (non-zero exit, naming the
    # directory and the bytes needed), or continue training and try again at the next interval.
    on_save_failure: str = "stop"


@dataclass
class LoggingConfig:
    """Console, TensorBoard and evaluation cadence."""

    log_interval: int = 1
    eval_interval: int = 1000
    eval_iters: int = 1  # micro-batches per data-parallel rank, per validation set
    # Languages evaluated at each evaluation besides the blend, taken in turn so that every
    # language comes round; None: all of them every time. The last evaluation of a run always
    # covers every language. With 59 languages and a small model, per-language validation can
    # cost more than the training between evaluations.
    eval_languages_per_interval: Optional[int] = None
    run_dir: Optional[str] = None  # metrics.jsonl and the resolved config.yaml go here
    tensorboard_dir: Optional[str] = None
    # Weights & Biases (pip install -e ".[wandb]"), off unless a project is named; the same tags as
    # TensorBoard. WANDB_MODE=offline writes the run under wandb_save_dir (default: run_dir) for
    # `wandb sync`. Megatron-LM's --wandb-project, --wandb-exp-name, --wandb-save-dir.
    wandb_project: Optional[str] = None
    wandb_exp_name: Optional[str] = None
    wandb_save_dir: Optional[str] = None
    # The prompts tools/generate.py continues when given none (scripts/demo.sh runs it after training),
    # and how many tokens it generates by default.
    sample_prompts: list[str] = field(default_factory=list)
    sample_tokens: int = 24
    # Peak dense bf16 FLOP/s of one device, for MFU (A100: 312e12).
    peak_flops_per_device: Optional[float] = None
    # Our own console messages (checkpoints, data, precision) on rank 0: info or debug
    # (debug adds the per-language table of the blend).
    log_level: str = "info"
    # DeepSpeed's logger. Its info level prints memory reports and group set-up on every
    # engine build; set info or debug to see them.
    deepspeed_log_level: str = "warning"


@dataclass
class Config:
    """A whole run. Sections mirror the YAML file."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def padded_vocab_size(self) -> int:
        """Embedding rows for this run's tensor-parallel size."""
        return self.model.padded_vocab_size(self.parallel.tensor_model_parallel_size)

    def data_parallel_size(self, world_size: int) -> int:
        """World size / (TP x PP); raises when the world does not divide."""
        model_parallel = self.parallel.tensor_model_parallel_size * self.parallel.pipeline_model_parallel_size
        if world_size % model_parallel:
            raise ConfigError(
                f"world size {world_size} is not a multiple of tensor_model_parallel_size x "
                f"pipeline_model_parallel_size = {model_parallel}: launch a multiple of {model_parallel} "
                "processes or change parallel.tensor_model_parallel_size / pipeline_model_parallel_size"
            )
        return world_size // model_parallel

    def validate(self, world_size: Optional[int] = None) -> "Config":
        """Check every cross-field rule; with ``world_size`` also the batch/layout arithmetic."""
        _validate(self, world_size)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict, as written to YAML."""
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Validation


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _validate(cfg: Config, world_size: Optional[int]) -> None:
    m, p, t, o = cfg.model, cfg.parallel, cfg.training, cfg.optimizer
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "vocab_size"):
        _require(getattr(m, name) > 0, f"model.{name} must be positive, got {getattr(m, name)}")
    _require(
        m.hidden_size % m.num_attention_heads == 0,
        f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_attention_heads "
        f"({m.num_attention_heads}): pick a head count that divides it (e.g. "
        f"{_divisors_near(m.hidden_size, m.num_attention_heads)})",
    )
    for name in ("hidden_dropout", "attention_dropout"):
        value = getattr(m, name)
        _require(0.0 <= value < 1.0, f"model.{name} must be in [0, 1), got {value}")
    _require(m.init_method_std > 0, f"model.init_method_std must be positive, got {m.init_method_std}")

    _require(p.distributed_timeout_minutes > 0,
             f"parallel.distributed_timeout_minutes must be positive, got {p.distributed_timeout_minutes}: "
             "Megatron's default is 10; a rank that makes no progress for that long stops the job")
    _require(tp >= 1 and pp >= 1, "parallel.tensor_model_parallel_size and pipeline_model_parallel_size must be >= 1")
    _require(
        m.num_attention_heads % tp == 0,
        f"model.num_attention_heads ({m.num_attention_heads}) must be divisible by "
        f"parallel.tensor_model_parallel_size ({tp}): tensor parallelism splits whole heads",
    )
    multiple = m.make_vocab_size_divisible_by * tp
    padded = cfg.padded_vocab_size
    _require(
        padded % multiple == 0,
        f"model.pad_vocab_size_to ({padded}) must be a multiple of make_vocab_size_divisible_by x "
        f"tensor_model_parallel_size = {m.make_vocab_size_divisible_by} x {tp} = {multiple}: "
        f"use {int(math.ceil(padded / multiple) * multiple)}",
    )
    _require(
        padded >= m.vocab_size,
        f"model.pad_vocab_size_to ({padded}) is smaller than model.vocab_size ({m.vocab_size}): "
        f"use {int(math.ceil(m.vocab_size / multiple) * multiple)}",
    )
    _require(m.num_layers >= pp, f"model.num_layers ({m.num_layers}) cannot be split over {pp} pipeline stages")
    _require(
        p.zero_stage in (1, 2, 3),
        f"parallel.zero_stage must be 1, 2 or 3, got {p.zero_stage}: stage 0 neither skips steps with "
        "non-finite gradients nor computes the gradient norm right under pipeline parallelism; use 1 (BLOOM's)",
    )
    _require(
        pp == 1 or p.zero_stage <= 1,
        f"parallel.zero_stage={p.zero_stage} does not work with pipeline parallelism "
        f"(pipeline_model_parallel_size={pp}): use zero_stage: 1, as BLOOM did",
    )

    _require(t.bf16 in (True, False, "auto"),
             f"training.bf16 must be true, false or auto (bf16 where the device computes it natively), got {t.bf16!r}")
    _require(not (t.bf16 and t.fp16), "training.bf16 and training.fp16 are both set: choose one")
    _require(cfg.checkpoint.universal_conversion_workers >= 1,
             f"checkpoint.universal_conversion_workers must be >= 1, got {cfg.checkpoint.universal_conversion_workers}")
    _require(t.micro_batch_size >= 1, f"training.micro_batch_size must be >= 1, got {t.micro_batch_size}")
    _require(
        t.global_batch_size % t.micro_batch_size == 0,
        f"training.global_batch_size ({t.global_batch_size}) must be a multiple of "
        f"training.micro_batch_size ({t.micro_batch_size})",
    )
    _require(
        (t.train_samples is None) != (t.train_iters is None),
        "set exactly one of training.train_samples and training.train_iters",
    )
    if t.rampup_batch_size is not None:
        _validate_rampup(t)
    for span in t.skip_train_iteration_range:
        parse_iteration_range(span)

    _require(
        o.lr_decay_style in ("constant", "linear", "cosine"),
        f"optimizer.lr_decay_style must be constant, linear or cosine, got {o.lr_decay_style!r}",
    )
    _require(0 <= o.min_lr <= o.lr, f"optimizer.min_lr ({o.min_lr}) must be between 0 and optimizer.lr ({o.lr})")
    _require(
        o.lr_decay_samples is None or o.lr_decay_tokens is None,
        "set at most one of optimizer.lr_decay_samples and optimizer.lr_decay_tokens",
    )
    _require(not o.use_bnb_optimizer,
             "optimizer.use_bnb_optimizer is not supported: bitsandbytes' 8-bit Adam keeps the embedding's state "
             "in 32 bits through a per-parameter override, and ZeRO (and DeepSpeed's BF16_Optimizer) hand the "
             "optimizer flat partitions of many parameters, which loses that override; the run would silently "
             "train something else. Use the default AdamW")
    for name in ("adam_beta1", "adam_beta2"):
        _require(0.0 <= getattr(o, name) < 1.0, f"optimizer.{name} must be in [0, 1), got {getattr(o, name)}")

    c = cfg.checkpoint
    _require(c.verify in ("fast", "full"), f"checkpoint.verify must be fast or full, got {c.verify!r}")
    _require(c.on_save_failure in ("stop", "continue"),
             f"checkpoint.on_save_failure must be stop or continue, got {c.on_save_failure!r}")

    n = cfg.logging.eval_languages_per_interval
    _require(n is None or n >= 0, f"logging.eval_languages_per_interval must be >= 0 or null, got {n}")
    for name in ("log_level", "deepspeed_log_level"):
        level = getattr(cfg.logging, name)
        _require(level in LOG_LEVELS, f"logging.{name} must be one of {', '.join(LOG_LEVELS)}, got {level!r}")

    _require(not cfg.logging.wandb_project or importlib.util.find_spec("wandb") is not None,
             f"logging.wandb_project is {cfg.logging.wandb_project!r} but wandb is not installed: "
             'pip install -e ".[wandb]", or set logging.wandb_project: null')
    _validate_data(cfg.data)
    if world_size is not None:
        dp = cfg.data_parallel_size(world_size)
        unit = t.micro_batch_size * dp
        _require(
            t.global_batch_size % unit == 0,
            f"training.global_batch_size ({t.global_batch_size}) must be a multiple of "
            f"micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp} = {unit}",
        )
        if t.rampup_batch_size is not None:
            start, increment, _ = t.rampup_batch_size
            _require(
                start % unit == 0 and increment % unit == 0,
                f"training.rampup_batch_size start ({start}) and increment ({increment}) must be "
                f"multiples of micro_batch_size x data-parallel size = {unit}",
            )


def _validate_rampup(t: TrainingConfig) -> None:
    ramp = t.rampup_batch_size
    _require(
        len(ramp) == 3 and all(v > 0 for v in ramp),
        f"training.rampup_batch_size must be [start, increment, ramp_samples] of positive integers, got {ramp}",
    )
    start, increment, _ = ramp
    _require(
        start <= t.global_batch_size and (t.global_batch_size - start) % increment == 0,
        f"training.rampup_batch_size: global_batch_size ({t.global_batch_size}) minus start ({start}) "
        f"must be a non-negative multiple of the increment ({increment})",
    )


def _validate_data(d: DataConfig) -> None:
    names = [s.name for s in d.datasets]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    _require(not duplicates, f"data.datasets has duplicate names: {duplicates}")
    for i, spec in enumerate(d.datasets):
        _require(bool(spec.name) and bool(spec.prefix), f"data.datasets[{i}] needs both name and prefix")
        _require(spec.weight is None or spec.weight >= 0, f"data.datasets[{i}] ({spec.name}): weight must be >= 0")
    weighted = [s.weight is not None for s in d.datasets]
    if d.datasets:
        if d.alpha is None:
            _require(all(weighted), "data.datasets: give every dataset a weight, or set data.alpha to derive them")
        else:
            _require(not any(weighted), "data.alpha and per-dataset weights are both set: keep one")
            _require(0.0 <= d.alpha <= 1.0, f"data.alpha must be in [0, 1], got {d.alpha}")
    parts = d.split.replace("/", ",").split(",")
    try:
        values = [float(x) for x in parts]
    except ValueError:
        raise ConfigError(f"data.split must be comma-separated numbers like '969,30,1', got {d.split!r}") from None
    _require(len(values) <= 3 and all(v >= 0 for v in values) and sum(values) > 0,
             f"data.split must be up to three non-negative numbers with a positive sum, got {d.split!r}")


def parse_iteration_range(span: str) -> tuple[int, int]:
    """``"10-20"`` -> ``(10, 20)``: one ``training.skip_train_iteration_range`` entry, inclusive and
    1-based; raise ConfigError naming the entry when it is malformed or not ``0 < START <= END``."""
    try:
        start, end = (int(x) for x in span.split("-"))
    except ValueError:
        raise ConfigError(
            f"training.skip_train_iteration_range entry {span!r} must look like 'START-END'"
        ) from None
    _require(0 < start <= end, f"training.skip_train_iteration_range entry {span!r} needs 0 < START <= END")
    return start, end


def _divisors_near(n: int, near: int) -> str:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return ", ".join(str(d) for d in sorted(divisors, key=lambda d: abs(d - near))[:3])


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with type checks

# Names users bring from transformers / nanoGPT configs, for "did you mean" hints.
_ALIASES = {
    "n_layer": "num_layers", "n_layers": "num_layers", "num_hidden_layers": "num_layers",
    "n_head": "num_attention_heads", "num_heads": "num_attention_heads",
    "n_embed": "hidden_size", "n_embd": "hidden_size", "d_model": "hidden_size",
    "max_position_embeddings": "seq_length", "seq_len": "seq_length",
    "tp": "tensor_model_parallel_size", "pp": "pipeline_model_parallel_size",
    "batch_size": "micro_batch_size", "learning_rate": "lr", "layer_norm_epsilon": "layernorm_epsilon",
}


def _suggest(key: str, known: list[str]) -> str:
    if key in _ALIASES and _ALIASES[key] in known:
        return f" (did you mean '{_ALIASES[key]}'?)"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else f" (known fields: {', '.join(known)})"


def _check_type(value: Any, hint: Any, where: str) -> Any:
    """Return ``value`` coerced to ``hint`` where that is lossless, else raise ConfigError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for hint_i in inner[:-1]:  # e.g. bool | str: the first type that takes the value wins
            try:
                return _check_type(value, hint_i, where)
            except ConfigError:
                pass
        return _check_type(value, inner[-1], where)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of {hint.__name__} fields, got {type(value).__name__}")
        return _build(hint, value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(hint)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "6e-5" (no dot) as a string; accept what is plainly a number.
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"{where} must be {hint.__name__}, got {type(value).__name__} {value!r}")


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown field '{where}.{key}'{_suggest(key, known)}")
        kwargs[key] = _check_type(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any], source: str = "config") -> Config:
    """Build a Config from nested plain values, checking names and types (not cross-field rules)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(values).__name__}")
    hints = typing.get_type_hints(Config)
    sections = {}
    for name, body in values.items():
        if name not in hints:
            raise ConfigError(f"{source}: unknown section '{name}'{_suggest(name, list(hints))}")
        sections[name] = _check_type(body or {}, hints[name], name)
    return Config(**sections)


# ---------------------------------------------------------------------------------------------
# YAML and overrides


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.field=value`` strings; values are parsed as YAML (``[1, 2]``, ``true``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        if len(keys) < 2:
            raise ConfigError(f"override {item!r}: name the section too, e.g. model.num_layers=4")
        node = values
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {key} is not a section")
        try:
            node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem}); quote it, e.g. "
                              f"{path.strip()}=\"...\"") from None
    return values


def load_config(path: Optional[str | os.PathLike] = None, overrides: Optional[list[str]] = None) -> Config:
    """Read a YAML config (``yaml.safe_load``), apply overrides, check names, types and rules."""
    values: dict[str, Any] = {}
    source = "overrides"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}): save the config as "
                              "UTF-8") from None
        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, ...), got "
                              f"{type(values).__name__}")
    values = apply_overrides(values, overrides or [])
    try:
        _expand_datasets_file(values, Path(path).parent if path is not None else Path("."))
        return config_from_dict(values, source).validate()
    except ConfigError as exc:
        if str(exc).startswith(source):
            raise
        raise ConfigError(f"{source}: {exc}") from None


def _expand_datasets_file(values: dict[str, Any], base: Path) -> None:
    """Replace ``data.datasets_file`` by the ``datasets`` list of that file, in place."""
    data = values.get("data")
    if not isinstance(data, dict) or not data.get("datasets_file"):
        return
    name = str(data["datasets_file"])
    if data.get("datasets"):
        raise ConfigError(f"data.datasets and data.datasets_file ({name}) are both set: keep one "
                          "(--set data.datasets_file=null to list datasets yourself)")
    candidates = [base / name, Path(name)] if not Path(name).is_absolute() else [Path(name)]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise ConfigError(f"data.datasets_file {name}: no such file (looked in {', '.join(map(str, candidates))})")
    try:
        body = yaml.safe_load(found.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"data.datasets_file {found}: cannot be read as YAML: {exc}") from None
    if not isinstance(body, dict) or not isinstance(body.get("datasets"), list):
        raise ConfigError(f"data.datasets_file {found}: expected a mapping with a 'datasets' list of "
                          "{name, prefix, weight} entries")
    data["datasets"], data["datasets_file"] = body["datasets"], None


def config_to_yaml(cfg: Config) -> str:
    """The config as YAML text; ``load_config`` of it gives back an equal Config."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the config as YAML atomically (temporary file, then rename), readable as the umask
    allows: colleagues and ``scripts/run_status.py`` read a run's config.yaml."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, config_to_yaml(cfg))
