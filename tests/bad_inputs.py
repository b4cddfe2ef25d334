"""The catalogue of bad inputs: every kind of broken config, data file, checkpoint, Hugging Face
folder or launch a user can hand the entry points, and what each must answer.

Each :class:`Case` builds its bad input in a fresh directory and names the entry point and its
arguments. ``tests/test_bad_inputs.py`` runs every case (in this process, calling the entry
point's ``main``) and checks the promise: a clear message (``expect`` is part of it) or a counted
skip, a non-zero exit for errors, no traceback, and every file that was there before still there,
byte for byte. The table in ``docs/bad-inputs.md`` is rendered from the same cases and the
messages they printed (:func:`render_doc`); the test fails when the file differs, and
``BAD_INPUTS_DOC=write`` rewrites it.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "tests" / "fixtures" / "bloom-bpe-4k" / "tokenizer.json"  # 4,096 ids, </s> = 2
LEGACY = REPO / "tests" / "fixtures" / "legacy_checkpoint"
EOD = 2
DOC_PATH = REPO / "docs" / "bad-inputs.md"
ENTRY_POINTS = {
    "pretrain_bloom": REPO / "pretrain_bloom.py",
    "preprocess_data": REPO / "tools" / "preprocess_data.py",
    "convert_to_hf": REPO / "tools" / "convert_to_hf.py",
    "convert_from_hf": REPO / "tools" / "convert_from_hf.py",
    "train_tokenizer": REPO / "tools" / "train_tokenizer.py",
}
AREAS = {"config": "Configs", "data": "Data", "checkpoint": "Checkpoints", "hf": "Hugging Face folders",
         "launch": "Launch"}


# -- building inputs -----------------------------------------------------------------------------


class Workspace:
    """A user's directory with good inputs in it, for a case to break one of them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.readonly: Optional[Path] = None  # a directory the test mounts read-only for the run
        self.held: list[Any] = []  # what the case holds during the run (another job's lock)

    def path(self, name: str) -> Path:
        """``root/name``, its parent created."""
        p = self.root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def dataset(self, name: str = "en", num_docs: int = 40, high: int = 4000, dtype=np.uint16) -> str:
        """A ``.bin/.idx`` pair of random documents ending in ``</s>``, as the tokenizer's
        preprocessing writes them; returns its prefix."""
        from megatron.data.indexed_dataset import IndexedDatasetBuilder

        prefix = self.path(f"data/{name}_text_document")
        rng = np.random.default_rng(len(name) + num_docs)
        with IndexedDatasetBuilder(f"{prefix}.bin", dtype) as builder:
            for _ in range(num_docs):
                doc = rng.integers(4, high, int(rng.integers(20, 80)))
                builder.add_document(np.append(doc, EOD))
            builder.finalize(f"{prefix}.idx")
        return str(prefix)

    def run_body(self, **sections: dict[str, Any]) -> dict[str, Any]:
        """A config for a 2-layer model on one good dataset, sections updated by ``sections``."""
        body: dict[str, Any] = {
            "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32,
                      "vocab_size": 4096},
            "parallel": {"zero_stage": 1},
            "training": {"micro_batch_size": 2, "global_batch_size": 4, "train_iters": 2, "bf16": False},
            "optimizer": {"lr": 1e-3, "min_lr": 1e-4},
            "data": {"tokenizer": str(TOKENIZER), "datasets": [{"name": "en", "prefix": self.dataset()}],
                     "alpha": 0.5, "split": "0.8,0.2,0", "num_workers": 0, "cache_dir": str(self.path("cache"))},
            "checkpoint": {},
            "logging": {"run_dir": str(self.path("run")), "eval_iters": 1},
        }
        for section, values in sections.items():
            body[section].update(values)
        return body

    def config(self, body: Optional[dict[str, Any]] = None, text: Optional[str] = None) -> str:
        """Write a YAML config (``body`` or raw ``text``); returns its path."""
        p = self.path("config.yaml")
        p.write_text(text if text is not None else yaml.safe_dump(body if body is not None else self.run_body()))
        return str(p)

    def pretrain(self, *overrides: str, body: Optional[dict[str, Any]] = None) -> list[str]:
        """``pretrain_bloom.py`` arguments for ``body`` (default: the good run) and overrides."""
        args = ["--config", self.config(body)]
        for item in overrides:
            args += ["--set", item]
        return args

    def checkpoint_run(self) -> tuple[list[str], Path]:
        """A copy of the legacy fixture's step-3 checkpoint and a config that resumes from it;
        returns the arguments and the copy's ``global_step3`` directory."""
        saved = self.root / "ckpt"
        shutil.copytree(LEGACY / "checkpoints", saved)
        body = self.run_body(
            model={"hidden_size": 32, "vocab_size": 256, "hidden_dropout": 0.1, "attention_dropout": 0.1},
            data={"tokenizer": None, "datasets": [{"name": "fr", "prefix": self.dataset("fr", high=250)}]},
            checkpoint={"save": str(saved), "load": str(saved), "save_interval": 3},
            training={"train_iters": 6, "micro_batch_size": 2, "global_batch_size": 4},
        )
        return self.pretrain(body=body), saved / "global_step3"

    def jsonl(self, name: str, data: bytes) -> Path:
        """A JSON-lines input holding ``data`` (gzip'd when ``name`` ends in .gz)."""
        p = self.path(f"raw/{name}")
        p.write_bytes(gzip.compress(data, mtime=0) if name.endswith(".gz") else data)
        return p

    def preprocess(self, *inputs: Path | str, extra: tuple[str, ...] = ()) -> list[str]:
        """``tools/preprocess_data.py`` arguments for ``inputs``."""
        return ["--input", *map(str, inputs), "--output-prefix", str(self.root / "out" / "en"),
                "--tokenizer", str(TOKENIZER), "--append-eod", "--quiet", *extra]

    def hf_folder(self, shards: bool = False) -> Path:
        """A tiny ``transformers`` BLOOM folder, as ``save_pretrained`` writes it (two shards and
        an index when ``shards``); written directly, importing transformers would cost seconds."""
        import torch
        from safetensors.torch import save_file

        g = torch.Generator().manual_seed(0)
        hidden, layers, vocab = 32, 2, 256

        def t(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g) * 0.02

        tensors = {"transformer.word_embeddings.weight": t(vocab, hidden),
                   "transformer.word_embeddings_layernorm.weight": torch.ones(hidden),
                   "transformer.word_embeddings_layernorm.bias": torch.zeros(hidden),
                   "transformer.ln_f.weight": torch.ones(hidden), "transformer.ln_f.bias": torch.zeros(hidden)}
        for i in range(layers):
            h = f"transformer.h.{i}."
            for name, shape in (("input_layernorm", (hidden,)), ("post_attention_layernorm", (hidden,)),
                                ("self_attention.query_key_value", (3 * hidden, hidden)),
                                ("self_attention.dense", (hidden, hidden)), ("mlp.dense_h_to_4h", (4 * hidden, hidden)),
                                ("mlp.dense_4h_to_h", (hidden, 4 * hidden))):
                tensors[h + name + ".weight"] = torch.ones(shape) if len(shape) == 1 else t(*shape)
                tensors[h + name + ".bias"] = torch.zeros(shape[0])
        folder = self.root / "hf"
        folder.mkdir(parents=True)
        config = {"architectures": ["BloomForCausalLM"], "model_type": "bloom", "vocab_size": vocab,
                  "hidden_size": hidden, "n_layer": layers, "n_head": 4, "layer_norm_epsilon": 1e-5,
                  "initializer_range": 0.02, "apply_residual_connection_post_layernorm": False,
                  "hidden_dropout": 0.0, "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
                  "pad_token_id": 3, "tie_word_embeddings": True, "torch_dtype": "float32"}
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        if not shards:
            save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
            return folder
        names = sorted(tensors)
        parts = [names[: len(names) // 2], names[len(names) // 2:]]
        weight_map = {}
        for k, part in enumerate(parts, 1):
            file = f"model-{k:05d}-of-{len(parts):05d}.safetensors"
            save_file({n: tensors[n] for n in part}, folder / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, file))
        total = sum(v.numel() * v.element_size() for v in tensors.values())
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        return folder

    def export(self, *extra: str) -> list[str]:
        """``tools/convert_to_hf.py`` arguments for the checkpoint copy."""
        return ["--checkpoint", str(self.root / "ckpt"), "--output", str(self.root / "exported"), "--quiet", *extra]

    def legacy_copy(self) -> Path:
        """A copy of the legacy checkpoint root; returns its ``global_step3`` directory."""
        shutil.copytree(LEGACY / "checkpoints", self.root / "ckpt")
        return self.root / "ckpt" / "global_step3"


def truncate(path: Path | str, keep: float = 0.5) -> None:
    """Cut ``path`` to ``keep`` of its size."""
    p = Path(path)
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * keep)])


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    """Apply ``change`` to a JSON file in place."""
    values = json.loads(path.read_text())
    change(values)
    path.write_text(json.dumps(values, indent=1))


def patch_bytes(path: str, offset: int, data: bytes) -> None:
    """Overwrite ``data`` at ``offset`` of ``path``."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


# -- the cases -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One kind of bad input: ``build`` makes it in a workspace and returns the entry point's
    arguments; ``expect`` must appear in what the user sees."""

    id: str
    area: str
    kind: str
    tool: str
    build: Callable[[Workspace], list[str]]
    expect: str
    skip: bool = False  # a counted skip: exit 0, the summary counts it
    needs_root: bool = False  # the test bind-mounts ``ws.readonly`` read-only around the run


def _yaml_text(text: str) -> Callable[[Workspace], list[str]]:
    return lambda ws: ["--config", ws.config(text=text)]


def _overrides(*items: str) -> Callable[[Workspace], list[str]]:
    return lambda ws: ws.pretrain(*items)


def _with_dataset(change: Callable[[Workspace, str], None], **body) -> Callable[[Workspace], list[str]]:
    """The good run, its dataset changed by ``change(ws, prefix)``."""

    def build(ws: Workspace) -> list[str]:
        b = ws.run_body(**body)
        change(ws, b["data"]["datasets"][0]["prefix"])
        return ws.pretrain(body=b)

    return build


def _bad_idx_sizes(ws: Workspace, prefix: str) -> None:
    # sizes[0] (the first int32 after the 34-byte header) made negative: the full check catches it
    patch_bytes(prefix + ".idx", 34, struct.pack("<i", -5))


def _wrong_dtype(ws: Workspace, prefix: str) -> None:
    patch_bytes(prefix + ".idx", 17, bytes([5]))  # the dtype code says int64; the .bin holds uint16


def _mixed_vocabularies(ws: Workspace) -> list[str]:
    b = ws.run_body()
    b["data"]["datasets"].append({"name": "zh", "prefix": ws.dataset("zh", high=60000)})
    return ws.pretrain(body=b)


def _checkpoint(change: Callable[[Path], None]) -> Callable[[Workspace], list[str]]:
    def build(ws: Workspace) -> list[str]:
        args, step = ws.checkpoint_run()
        change(step)
        return args

    return build


def _export(change: Callable[[Path], None], *extra: str) -> Callable[[Workspace], list[str]]:
    def build(ws: Workspace) -> list[str]:
        change(ws.legacy_copy())
        return ws.export(*extra)

    return build


def _refused_pickle(step: Path) -> None:
    import argparse

    import torch

    # An object outside torch's weights_only allow-list, where tensors should be.
    torch.save({"word_embeddings.weight": argparse.Namespace(payload="not a tensor")},
               step / "layer_01-model_00-model_states.pt")


def _wrong_tp_files(step: Path) -> None:
    for f in step.glob("layer_*-model_00-model_states.pt"):
        if not f.name.startswith("layer_01"):
            f.rename(f.with_name(f.name.replace("model_00", "model_01")))


def _hf(change: Callable[[Path], None], shards: bool = False) -> Callable[[Workspace], list[str]]:
    def build(ws: Workspace) -> list[str]:
        folder = ws.hf_folder(shards)
        change(folder)
        return ["--hf", str(folder), "--output", str(ws.root / "imported"), "--quiet"]

    return build


def _drop_first_shard(folder: Path) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (folder / first).unlink()


def _untie(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    emb = next(v for k, v in tensors.items() if k.endswith("word_embeddings.weight"))
    tensors["lm_head.weight"] = emb.clone() + 1.0
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    edit_json(folder / "config.json", lambda c: c.update(tie_word_embeddings=False))


def _jsonl_docs(n: int = 30) -> bytes:
    return b"".join(json.dumps({"text": f"document {i}: hello world, bonjour le monde"}).encode() + b"\n"
                    for i in range(n))


def _readonly_run_dir(ws: Workspace) -> list[str]:
    run = ws.path("run")
    run.mkdir(exist_ok=True)
    (run / "notes.txt").write_text("the user's file\n")
    ws.readonly = run
    return ws.pretrain()


def _second_run_on_a_live_checkpoint_directory(ws: Workspace) -> list[str]:
    from megatron.checkpoint.lock import CheckpointLock

    save = ws.path("checkpoints")
    first_job = CheckpointLock(save)
    first_job.acquire()  # a live job holds the directory while this one starts
    # What the first job recorded about itself, fixed so the catalogue's text does not change.
    first_job.path.write_text(json.dumps({"host": "node-017", "pid": 4242, "started": "2026-12-01T09:00:00+0000"})
                              + "\n")
    ws.held.append(first_job)
    return ws.pretrain(f"checkpoint.save={save}", "checkpoint.save_interval=1")


def _empty_dataset(ws: Workspace, prefix: str) -> None:
    from megatron.data.indexed_dataset import IndexedDatasetBuilder

    with IndexedDatasetBuilder(prefix + ".bin", np.uint16) as builder:
        builder.finalize(prefix + ".idx")


def _parquet(ws: Workspace) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = ws.path("raw/en.parquet")
    pq.write_table(pa.table({"content": ["hello world", "bonjour"]}), p)
    return ws.preprocess(p)


CASES: list[Case] = [
    # ---- configs
    Case("config-missing", "config", "config file does not exist", "pretrain_bloom",
         lambda ws: ["--config", str(ws.root / "nope.yaml")], "cannot read config file"),
    Case("config-not-yaml", "config", "config is not valid YAML", "pretrain_bloom",
         _yaml_text("model: {num_layers: 2\n"), "is not valid YAML"),
    Case("config-not-mapping", "config", "config's top level is a list", "pretrain_bloom",
         _yaml_text("- model\n- data\n"), "the top level must be a mapping"),
    Case("config-unknown-section", "config", "unknown section", "pretrain_bloom",
         _yaml_text("modle: {num_layers: 2}\n"), "unknown section 'modle'"),
    Case("config-unknown-field", "config", "unknown field (a Megatron-LM/HF name)", "pretrain_bloom",
         _yaml_text("model: {n_layer: 2}\n"), "unknown field 'model.n_layer'"),
    Case("config-wrong-type", "config", "wrong type (text for a number)", "pretrain_bloom",
         _yaml_text("model: {num_layers: two}\n"), "model.num_layers must be int"),
    Case("config-override-syntax", "config", "--set without '='", "pretrain_bloom",
         _overrides("model.num_layers"), "must look like section.field=value"),
    Case("config-override-unknown", "config", "--set of an unknown field", "pretrain_bloom",
         _overrides("model.num_layer=4"), "unknown field 'model.num_layer'"),
    Case("config-override-type", "config", "--set with a value of the wrong type", "pretrain_bloom",
         _overrides("training.micro_batch_size=1.5"), "training.micro_batch_size"),
    Case("config-override-yaml", "config", "--set with a value that is not YAML", "pretrain_bloom",
         _overrides("training.skip_train_iteration_range=[1-2"), "the value is not valid YAML"),
    Case("config-not-utf8", "config", "config file that is not UTF-8 text", "pretrain_bloom",
         lambda ws: (ws.path("config.yaml").write_bytes(b"model:\n  num_layers: 2 # caf\xe9\n"),
                     ["--config", str(ws.root / "config.yaml")])[1], "is not UTF-8 text"),
    Case("config-heads", "config", "hidden size not divisible by the heads", "pretrain_bloom",
         _overrides("model.num_attention_heads=5"), "num_attention_heads"),
    Case("config-tp-heads", "config", "impossible layout: heads not divisible by TP", "pretrain_bloom",
         _overrides("model.num_attention_heads=2", "parallel.tensor_model_parallel_size=4"),
         "tensor_model_parallel_size"),
    Case("config-batch", "config", "global batch not a multiple of micro batch x DP", "pretrain_bloom",
         _overrides("training.global_batch_size=5"), "global_batch_size"),
    Case("config-no-datasets", "config", "missing data: no datasets listed", "pretrain_bloom",
         lambda ws: ws.pretrain(body=ws.run_body(data={"datasets": []})), "data.datasets is empty"),
    Case("config-datasets-file", "config", "data.datasets_file does not exist", "pretrain_bloom",
         lambda ws: ws.pretrain(body=ws.run_body(data={"datasets": [], "datasets_file": "blend.yaml"})),
         "data.datasets_file blend.yaml: no such file"),
    Case("config-tokenizer-missing", "config", "data.tokenizer does not exist", "pretrain_bloom",
         lambda ws: ws.pretrain(f"data.tokenizer={ws.root / 'tok.json'}"), "data.tokenizer"),
    Case("config-wrong-tokenizer", "config", "wrong tokenizer for the data (ids beyond its vocabulary)",
         "pretrain_bloom",
         lambda ws: ws.pretrain(body=ws.run_body(
             data={"datasets": [{"name": "en", "prefix": ws.dataset("big", high=30000)}]})),
         "preprocessed with another tokenizer"),
    Case("config-vocab-small", "config", "model vocabulary smaller than the tokenizer's", "pretrain_bloom",
         _overrides("model.vocab_size=1000", "model.pad_vocab_size_to=1024"), "set model.vocab_size to 4096"),
    # ---- data: preprocessing
    Case("jsonl-malformed", "data", "malformed JSON lines", "preprocess_data",
         lambda ws: ws.preprocess(ws.jsonl("en.jsonl", _jsonl_docs() + b'{"text": "unterminated\n{oops}\n')),
         "malformed_json 2", skip=True),
    Case("jsonl-malformed-strict", "data", "malformed JSON line with --strict", "preprocess_data",
         lambda ws: ws.preprocess(ws.jsonl("en.jsonl", _jsonl_docs(3) + b"{oops}\n"), extra=("--strict",)),
         "en.jsonl:4"),
    Case("jsonl-utf8", "data", "invalid UTF-8 in a document", "preprocess_data",
         lambda ws: ws.preprocess(ws.jsonl("en.jsonl", _jsonl_docs() + b'{"text": "caf\xe9 \xff"}\n')),
         "invalid_utf8 1", skip=True),
    Case("jsonl-empty-docs", "data", "empty documents (whitespace only)", "preprocess_data",
         lambda ws: ws.preprocess(ws.jsonl("en.jsonl", _jsonl_docs() + b'{"text": ""}\n{"text": "  \\n "}\n')),
         "empty 2", skip=True),
    Case("jsonl-missing-key", "data", "records without the --json-keys field", "preprocess_data",
         lambda ws: ws.preprocess(ws.jsonl("en.jsonl", _jsonl_docs() + b'{"content": "x"}\n')),
         "missing_key 1", skip=True),
    Case("jsonl-huge-doc", "data", "one huge document (256 KiB on one line)", "preprocess_data",
         lambda ws: ws.preprocess(ws.jsonl("en.jsonl", json.dumps({"text": "word " * (1 << 16)}).encode())),
         "documents 1 ", skip=True),
    Case("jsonl-only-bad", "data", "no usable document at all", "preprocess_data",
         lambda ws: ws.preprocess(ws.jsonl("en.jsonl", b"{oops}\n[1, 2]\n")), "no usable document"),
    Case("jsonl-gz-truncated", "data", "truncated .jsonl.gz", "preprocess_data",
         lambda ws: (truncate(ws.jsonl("en.jsonl.gz", _jsonl_docs(2000))), ws.preprocess(ws.root / "raw/en.jsonl.gz"))[1],
         "the gzip stream is truncated or corrupt"),
    Case("jsonl-gz-not-gzip", "data", ".jsonl.gz that is not gzip", "preprocess_data",
         lambda ws: (ws.path("raw/en.jsonl.gz").write_bytes(_jsonl_docs()), ws.preprocess(ws.root / "raw/en.jsonl.gz"))[1],
         "the gzip stream is truncated or corrupt"),
    Case("tokenizer-gz-truncated", "data", "truncated .jsonl.gz given to the tokenizer trainer", "train_tokenizer",
         lambda ws: (truncate(ws.jsonl("en.jsonl.gz", _jsonl_docs(2000))),
                     ["--input", str(ws.root / "raw/en.jsonl.gz"), "--output-dir", str(ws.root / "tok"),
                      "--vocab-size", "300", "--quiet"])[1],
         "the gzip stream is truncated or corrupt"),
    Case("input-missing", "data", "input file does not exist", "preprocess_data",
         lambda ws: ws.preprocess(ws.root / "raw" / "nope.jsonl"), "does not exist"),
    Case("input-format", "data", "unknown input format", "preprocess_data",
         lambda ws: ws.preprocess(ws.jsonl("en.txt", b"hello\n")), "unknown input format"),
    Case("parquet-column", "data", "Parquet without the --json-keys column", "preprocess_data",
         _parquet, "no column 'text'"),
    Case("preprocess-tokenizer", "data", "tokenizer file is not a tokenizer", "preprocess_data",
         lambda ws: ws.preprocess(ws.jsonl("en.jsonl", _jsonl_docs()))[:-4]
         + ["--tokenizer", str(ws.jsonl("tok.json", b"{}")), "--append-eod", "--quiet"], "tok.json"),
    # ---- data: training
    Case("dataset-missing", "data", "dataset prefix has no .bin/.idx", "pretrain_bloom",
         lambda ws: ws.pretrain(body=ws.run_body(data={"datasets": [{"name": "en", "prefix": str(ws.root / "x")}]})),
         "x.idx"),
    Case("bin-missing", "data", ".bin deleted, .idx kept", "pretrain_bloom",
         _with_dataset(lambda ws, p: Path(p + ".bin").unlink()), ".bin"),
    Case("bin-truncated", "data", "truncated .bin", "pretrain_bloom",
         _with_dataset(lambda ws, p: truncate(p + ".bin")), "_text_document.bin"),
    Case("idx-truncated", "data", "truncated .idx", "pretrain_bloom",
         _with_dataset(lambda ws, p: truncate(p + ".idx")), "_text_document.idx"),
    Case("idx-magic", "data", ".idx with a bad magic (not an index)", "pretrain_bloom",
         _with_dataset(lambda ws, p: patch_bytes(p + ".idx", 0, b"GARBAGE!!")), "bad magic"),
    Case("idx-corrupt-sizes", "data", "corrupt .idx body (negative sequence length)", "pretrain_bloom",
         _with_dataset(_bad_idx_sizes), "is negative"),
    Case("idx-dtype", "data", "wrong dtype code in the .idx", "pretrain_bloom",
         _with_dataset(_wrong_dtype), "_text_document"),
    Case("dataset-empty", "data", "dataset with no documents", "pretrain_bloom",
         _with_dataset(_empty_dataset), "no training tokens"),
    Case("blend-mixed-vocab", "data", "mixed vocabularies in one blend", "pretrain_bloom",
         _mixed_vocabularies, "data.datasets['zh']"),
    # ---- checkpoints
    Case("ckpt-truncated-shard", "checkpoint", "truncated shard", "pretrain_bloom",
         _checkpoint(lambda s: truncate(s / "layer_03-model_00-model_states.pt")), "was truncated"),
    Case("ckpt-missing-shard", "checkpoint", "missing shard", "pretrain_bloom",
         _checkpoint(lambda s: (s / "mp_rank_00_model_states.pt").unlink()), "is missing"),
    Case("ckpt-manifest-edited", "checkpoint", "manifest edited (a file's size)", "pretrain_bloom",
         _checkpoint(lambda s: edit_json(s / "manifest.json",
                                         lambda m: m["files"].update({"layer_01-model_00-model_states.pt": 7}))),
         "the manifest records 7"),
    Case("ckpt-manifest-garbage", "checkpoint", "manifest is not JSON", "pretrain_bloom",
         _checkpoint(lambda s: (s / "manifest.json").write_text("{not json")), "manifest.json is unreadable"),
    Case("ckpt-model-shape", "checkpoint", "checkpoint of another model shape", "pretrain_bloom",
         lambda ws: ws.checkpoint_run()[0] + ["--set", "model.hidden_size=64"], "holds a different model"),
    Case("ckpt-latest-nowhere", "checkpoint", "`latest` names a missing tag", "convert_to_hf",
         _export(lambda s: (s.parent / "latest").write_text("global_step9")), "global_step9"),
    Case("ckpt-wrong-tp-files", "checkpoint", "layer files of another TP rank", "convert_to_hf",
         _export(_wrong_tp_files), "model_01"),
    Case("ckpt-pickle-refused", "checkpoint", "a pickle that weights_only refuses", "convert_to_hf",
         _export(_refused_pickle), "layer_01-model_00-model_states.pt"),
    # ---- Hugging Face folders
    Case("hf-missing-shard", "hf", "shard listed in the index is missing", "convert_from_hf",
         _hf(_drop_first_shard, shards=True), "model-00001"),
    Case("hf-model-type", "hf", "wrong model_type", "convert_from_hf",
         _hf(lambda f: edit_json(f / "config.json", lambda c: c.update(model_type="gpt2"))), "model_type"),
    Case("hf-untied", "hf", "untied LM head", "convert_from_hf", _hf(_untie), "lm_head"),
    Case("hf-shapes", "hf", "config.json shapes differ from the weights", "convert_from_hf",
         _hf(lambda f: edit_json(f / "config.json", lambda c: c.update(hidden_size=64, n_embed=64))), "shape"),
    Case("hf-no-config", "hf", "folder without config.json", "convert_from_hf",
         _hf(lambda f: (f / "config.json").unlink()), "config.json"),
    # ---- launch
    Case("launch-world-size", "launch", "world size not divisible by TP x PP", "pretrain_bloom",
         _overrides("parallel.tensor_model_parallel_size=2", "model.num_attention_heads=4"), "world size"),
    Case("launch-readonly-run-dir", "launch", "run directory on a read-only mount", "pretrain_bloom",
         _readonly_run_dir, "logging.run_dir", needs_root=True),
    Case("launch-two-runs", "launch", "two runs writing one checkpoint directory", "pretrain_bloom",
         _second_run_on_a_live_checkpoint_directory, "is in use by another run (pid 4242 on host node-017"),
]


# -- running a case ------------------------------------------------------------------------------


def load_entry_point(tool: str):
    """The ``main`` of ``pretrain_bloom.py`` or ``tools/NAME.py``, imported from its file."""
    name = f"_entry_{tool}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ENTRY_POINTS[tool])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name].main


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` and its bytes (the inputs are small)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def shown(case: Case, output: str, root: Path) -> str:
    """What the user sees, as the doc shows it: the error block (or, for a skip, the summary's
    skip lines), with the case's directory written as ``DIR`` and the repository as ``REPO``."""
    text = output.replace(str(root), "DIR").replace(str(REPO), "REPO")
    lines = text.splitlines()
    if case.skip:
        # The summary's counts, without its timings (they differ from run to run).
        keep = [re.sub(r"\s+in [\d.]+ s\s+\(.*\)$", "", ln) for ln in lines
                if re.match(r"(documents |skipped:|  \w+: )", ln)]
    else:
        prefix = "|".join(ENTRY_POINTS)
        start = next((i for i, ln in enumerate(lines) if re.match(rf"(({prefix}): )?(config )?error: ", ln)), 0)
        keep = [ln for ln in lines[:start] if ln.startswith("[rank 0] ")] + lines[start:]
    return "\n".join(ln.rstrip() for ln in keep if ln.strip())


# -- the document ----------------------------------------------------------------------------------

DOC_HEAD = """# Bad inputs: what the user sees

Every kind of broken input we know users hand the entry points, and the answer each gets. The
promise, for every row: a message that names the file and the field and says what to do (or, for
bad records in a corpus, a counted skip), a non-zero exit status on error, no Python traceback
(under `torchrun`, the launcher's own closing summary follows the worker's single message), and
nothing the user had overwritten or deleted.

This file is generated from the catalogue in `tests/bad_inputs.py` and the messages the cases
actually printed; `tests/test_bad_inputs.py` runs them all and fails when this file is out of
date (`BAD_INPUTS_DOC=write pytest tests/test_bad_inputs.py` rewrites it). `DIR` stands for the
directory of the inputs, `REPO` for the repository; `[rank 0]` lines are the log's warnings
(timestamps left out). Exit status: 2 for a config error, 1 for other errors, 0 for a counted skip.
"""


def _cell(text: str) -> str:
    """A table cell: each line as code, pipes escaped."""
    lines = [ln.replace("`", "'").replace("|", "\\|") for ln in text.splitlines()]
    return "<br>".join(f"`{ln}`" for ln in lines) or "(nothing)"


def render_doc(results: dict[str, tuple[int, str]]) -> str:
    """The document for ``results``: case id -> (exit status, what the user sees)."""
    out = [DOC_HEAD]
    for area, title in AREAS.items():
        rows = [c for c in CASES if c.area == area]
        out += [f"\n## {title} ({len(rows)})\n", "| # | Kind | Entry point | Exit | What the user sees |",
                "| --- | --- | --- | --- | --- |"]
        for c in rows:
            status, text = results.get(c.id, ("?", "(not run)"))
            out.append(f"| {CASES.index(c) + 1} | {c.kind} | `{c.tool}` | {status} | {_cell(text)} |")
    out.append(f"\n{len(CASES)} kinds in all.\n")
    return "\n".join(out)
