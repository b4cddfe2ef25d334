"""Import a transformers BLOOM folder as one of our checkpoints, at any tensor-parallel size.

    summary = import_from_hf("bloom-560m", "checkpoints/bloom-560m-import", tp=2, pp=1)

reads ``config.json`` and the weights (``model.safetensors`` or ``pytorch_model.bin``, either
one file or shards listed in a ``*.index.json``; ``.bin`` files are loaded with
``weights_only=True``) and writes

    OUTPUT/global_step{step}/layer_XX-model_YY-model_states.pt   every layer, every TP rank
    OUTPUT/latest                                                 naming global_step{step}
    OUTPUT/config.yaml                                            our config: model + parallel sections
    OUTPUT/tokenizer.json                                         when the folder has one

Layer files are all a pipeline checkpoint is made of per stage, so PP changes no file; it is
recorded in config.yaml. Training continues from these files with
``megatron.checkpoint.layer_files.load_layer_files_into`` (module weights only, fresh optimizer).
Tensors are read lazily (one at a time from safetensors, memory-mapped from .bin), each layer
is cast, split and written, then freed. Output goes to ``OUTPUT.tmp`` first and is renamed at
the end.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from megatron.checkpoint.layer_files import load_tensor_file, write_layer_file
from megatron.checkpoint.layout import checkpoint_tag
from megatron.checkpoint.resharding import split_full
from megatron.checkpoint.store import write_latest
from megatron.config import Config, ConfigError, load_config, save_config
from megatron.convert.hf_files import model_shape_from_hf, parse_dtype, read_hf_config
from megatron.convert.output import prepare_output, publish
from megatron.convert.safetensors_stream import SafetensorsReader
from megatron.core.parallel_state import validate_layout
from megatron.errors import ConversionError
from megatron.model.layout import (
    EMBEDDING_INDEX,
    HF_PREFIX,
    HF_TIED_HEAD,
    VOCABULARY_KEY,
    full_shapes,
    is_tied_head,
    layer_indices,
    layer_key_to_hf_name,
)

_WEIGHT_FILES = (("model.safetensors.index.json", True), ("model.safetensors", False),
                 ("pytorch_model.bin.index.json", True), ("pytorch_model.bin", False))


class HFWeights:
    """Lazy, read-only access to the weights of a transformers folder, by normalised name
    (without the ``transformer.`` prefix; ``lm_head.weight`` kept as is)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.locations: dict[str, tuple[Path, str]] = {}  # normalised name -> (file, name in file)
        self._open: dict[Path, object] = {}
        found = next(((name, indexed) for name, indexed in _WEIGHT_FILES if (self.folder / name).is_file()), None)
        if found is None:
            present = sorted(p.name for p in self.folder.iterdir()) if self.folder.is_dir() else []
            raise ConversionError(f"{self.folder} has none of {[n for n, _ in _WEIGHT_FILES]} (it holds "
                                  f"{present[:10]}): point --hf at a transformers BLOOM folder")
        name, indexed = found
        self.safetensors = name.startswith("model.safetensors")
        if indexed:
            index_path = self.folder / name
            try:
                weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ConversionError(f"{index_path} is not a valid weight index ({err})") from None
            shard_names = sorted(set(weight_map.values()))
            missing = [s for s in shard_names if not (self.folder / s).is_file()]
            if missing:
                raise ConversionError(f"{index_path} lists {len(shard_names)} weight files but {missing} "
                                      f"{'is' if len(missing) == 1 else 'are'} missing from {self.folder}: "
                                      "download or copy every shard")
            for tensor_name, shard in weight_map.items():
                self.locations[tensor_name.removeprefix(HF_PREFIX)] = (self.folder / shard, tensor_name)
        else:
            path = self.folder / name
            for tensor_name in self._names_in(path):
                self.locations[tensor_name.removeprefix(HF_PREFIX)] = (path, tensor_name)

    def _handle(self, path: Path):
        if path not in self._open:
            if self.safetensors:
                self._open[path] = SafetensorsReader(path)  # plain reads: no mapped pages pile up
            else:
                # Memory-mapped where possible; one .bin file open at a time, so the pages read
                # stay bounded by one shard file however many there are.
                self._open.clear()
                self._open[path] = load_tensor_file(path)
        return self._open[path]

    def _names_in(self, path: Path) -> list[str]:
        handle = self._handle(path)
        return list(handle.keys())

    def names(self) -> list[str]:
        """Every normalised tensor name."""
        return list(self.locations)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name`` without reading its data."""
        path, stored = self.locations[name]
        handle = self._handle(path)
        if self.safetensors:
            return handle.shape(stored)
        return tuple(handle[stored].shape)

    def dtype(self, name: str) -> torch.dtype:
        """dtype of tensor ``name`` without reading its data."""
        path, stored = self.locations[name]
        handle = self._handle(path)
        return handle.dtype(stored) if self.safetensors else handle[stored].dtype

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` (read now)."""
        path, stored = self.locations[name]
        handle = self._handle(path)
        try:
            return handle.get_tensor(stored) if self.safetensors else handle[stored]
        except KeyError:
            raise ConversionError(f"{path} does not hold {stored}, although the index says so") from None

    def where(self, name: str) -> str:
        """The file holding ``name``, for messages."""
        return self.locations[name][0].name


@dataclass
class ImportSummary:
    """What an import wrote."""

    output: Path
    checkpoint_dir: Path
    tp_size: int
    pp_size: int
    num_layers: int
    dtype: torch.dtype
    num_parameters: int
    seconds: float
    config: Config


def _check_weights(weights: HFWeights, shape: dict, where: str) -> None:
    """Every expected tensor is present with the shape config.json implies; nothing unknown is left."""
    from megatron.config import ModelConfig

    model = ModelConfig(**{k: v for k, v in shape.items()})
    layers = model.num_layers
    expected = {layer_key_to_hf_name(i, k, layers).removeprefix(HF_PREFIX): s
                for i in layer_indices(layers) for k, s in full_shapes(model, shape["pad_vocab_size_to"], i).items()}
    names = set(weights.names())
    missing = sorted(set(expected) - names)
    if missing:
        raise ConversionError(f"{weights.folder} lacks {len(missing)} BLOOM weight(s), e.g. {missing[:4]}: the "
                              f"weights are incomplete or {where} (n_layer={layers}) does not belong to them")
    unknown = sorted(n for n in names - set(expected) if not is_tied_head(n))
    if unknown:
        raise ConversionError(f"{weights.folder} holds tensors that are not BLOOM weights: {unknown[:6]}; "
                              "this converter handles BloomForCausalLM / BloomModel folders")
    for name, full in expected.items():
        actual = weights.shape(name)
        if actual != full:
            raise ConversionError(
                f"{name} in {weights.where(name)} has shape {actual} but {where} (hidden_size="
                f"{model.hidden_size}, n_layer={layers}, vocab_size={shape['vocab_size']}) implies {full}: check "
                "that config.json belongs to these weights")
    if "lm_head.weight" in names and weights.shape("lm_head.weight") != expected["word_embeddings.weight"]:
        raise ConversionError(f"lm_head.weight has shape {weights.shape('lm_head.weight')}, not the word "
                              "embeddings' shape: BLOOM ties its head to the embedding")


def training_config(shape: dict, tp: int, pp: int, output: Path, base_config: Optional[str | os.PathLike],
                    tokenizer_file: Optional[Path], tokenizer_vocab: Optional[int]) -> Config:
    """Our Config to continue training from the import: ``base_config``'s sections (or defaults)
    with the model shape of the HF folder, the requested TP/PP, and ``checkpoint.load`` = the import."""
    if base_config is not None:
        cfg = load_config(base_config)
    else:
        cfg = Config()
        cfg.training.train_iters = 1000  # a placeholder: set the schedule and data for the real run
    m = cfg.model
    for key, value in shape.items():
        setattr(m, key, value)
    if tokenizer_vocab is not None:
        m.vocab_size = tokenizer_vocab
    m.ffn_hidden_size = None
    padded = shape["pad_vocab_size_to"]
    # pad_vocab_size_to must be a multiple of make_vocab_size_divisible_by x TP.
    m.make_vocab_size_divisible_by = math.gcd(padded // tp, m.make_vocab_size_divisible_by)
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = tp, pp
    if pp > 1 and cfg.parallel.zero_stage > 1:
        cfg.parallel.zero_stage = 1
    cfg.checkpoint.load = str(output)
    cfg.checkpoint.save = cfg.checkpoint.save or str(output)
    if tokenizer_file is not None:
        cfg.data.tokenizer = str(tokenizer_file)
    try:
        return cfg.validate()
    except ConfigError as err:
        raise ConversionError(f"the config for the imported model is invalid: {err}") from None


def import_from_hf(hf_dir: str | os.PathLike, output: str | os.PathLike, *, tp: int = 1, pp: int = 1,
                   step: int = 0, dtype: Optional[str] = None, base_config: Optional[str | os.PathLike] = None,
                   overwrite: bool = False, progress: bool = True) -> ImportSummary:
    """Convert the transformers BLOOM folder ``hf_dir`` into our checkpoint folder ``output``.

    Args:
        hf_dir: folder with config.json and safetensors / pytorch_model*.bin weights.
        output: checkpoint root to create (see the module docstring for its contents).
        tp, pp: the tensor- and pipeline-parallel sizes to continue training with.
        step: the iteration the checkpoint is tagged with (``global_step{step}``).
        dtype: ``fp32``, ``bf16``, ``fp16`` or None/``auto`` (the folder's dtype).
        base_config: our YAML whose training/optimizer/data sections the written config.yaml keeps.
        overwrite: replace an existing ``output`` once the new one is complete.
        progress: show a tqdm bar over layers.
    """
    start = time.perf_counter()
    hf_dir, output = Path(hf_dir), Path(output)
    values = read_hf_config(hf_dir)
    where = str(hf_dir / "config.json")
    shape = model_shape_from_hf(values, where)
    layers, padded = shape["num_layers"], shape["pad_vocab_size_to"]
    try:
        validate_layout(layers, shape["num_attention_heads"], padded, tp, pp)
    except ValueError as err:
        raise ConversionError(f"cannot split {hf_dir.name} as TP={tp}, PP={pp}: {err}") from None
    weights = HFWeights(hf_dir)
    _check_weights(weights, shape, where)
    target = parse_dtype(dtype) or weights.dtype("word_embeddings.weight")

    tokenizer_source = hf_dir / "tokenizer.json"
    tokenizer_vocab = None
    if tokenizer_source.is_file():
        from megatron.data.tokenizer import load_tokenizer

        tokenizer_vocab = load_tokenizer(tokenizer_source).vocab_size
        if tokenizer_vocab > padded:
            raise ConversionError(f"{tokenizer_source} has {tokenizer_vocab} tokens but the embedding only "
                                  f"{padded} rows: the tokenizer does not belong to this model")
    cfg = training_config(shape, tp, pp, output, base_config,
                          output / "tokenizer.json" if tokenizer_vocab is not None else None, tokenizer_vocab)

    tmp = prepare_output(output, overwrite)
    tag = checkpoint_tag(step)
    ckpt_dir = tmp / tag
    ckpt_dir.mkdir()
    count = 0
    try:
        for index in tqdm(layer_indices(layers), desc="import layers", unit="layer", disable=not progress,
                          dynamic_ncols=True):
            layer: dict[str, torch.Tensor] = {}
            for key in full_shapes(cfg.model, padded, index):
                name = layer_key_to_hf_name(index, key, layers).removeprefix(HF_PREFIX)
                full = weights.get(name)
                tied_head = index == EMBEDDING_INDEX and key == VOCABULARY_KEY
                if tied_head and HF_TIED_HEAD in weights.locations:
                    if not torch.equal(weights.get(HF_TIED_HEAD), full):
                        head_file = weights.locations[HF_TIED_HEAD][0]
                        raise ConversionError(f"{head_file}: lm_head.weight differs from word_embeddings.weight, but "
                                              "BLOOM ties them and our model has no separate head: this folder "
                                              "holds another architecture, or a fine-tune that untied the head")
                layer[key] = full.to(target)
                count += full.numel()
                del full
            # One rank's shards at a time: memory is the layer plus 1/tp of it.
            for rank in range(tp):
                write_layer_file(ckpt_dir, index, rank, {key: split_full(key, full, rank, tp)
                                                         for key, full in layer.items()})
            del layer
        write_latest(tmp, tag)
        save_config(cfg, tmp / "config.yaml")
        if tokenizer_vocab is not None:
            shutil.copyfile(tokenizer_source, tmp / "tokenizer.json")
        publish(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ImportSummary(output=output, checkpoint_dir=output / tag, tp_size=tp, pp_size=pp, num_layers=layers,
                         dtype=target, num_parameters=count, seconds=time.perf_counter() - start, config=cfg)
