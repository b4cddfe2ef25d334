"""The pre-launch data check: every problem with the dataset prefixes and the tokenizer, in one
message, before any rank starts; blends kept in their own files (configs/data/)."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

import pretrain_bloom
from conftest import CONFIGS, REPO
from megatron.config import ConfigError, DataConfig, DatasetSpec, load_config
from megatron.data.check import check_data
from megatron.data.indexed_dataset import IndexedDatasetBuilder
from megatron.data.tokenizer import load_tokenizer

BPE_4K = REPO / "tests" / "fixtures" / "bloom-bpe-4k" / "tokenizer.json"
QWEN = REPO / "tests" / "fixtures" / "qwen3-byte-bpe" / "tokenizer.json.gz"


def write(prefix, docs, dtype=np.uint16) -> str:
    with IndexedDatasetBuilder(f"{prefix}.bin", dtype) as builder:
        for doc in docs:
            builder.add_document(np.asarray(doc))
        builder.finalize(f"{prefix}.idx")
    return str(prefix)


def test_matching_data_passes(tmp_path):
    eod = load_tokenizer(BPE_4K).eod_id
    good = write(tmp_path / "fr", [[5, 6, 7, eod], [8, 9, eod]])
    assert check_data(DataConfig(tokenizer=str(BPE_4K), datasets=[DatasetSpec("fr", good, 1.0)])) == []


def test_every_problem_is_listed_at_once(tmp_path):
    tok = load_tokenizer(BPE_4K)
    other_special = next(i for i in range(tok.vocab_size) if i != tok.eod_id and
                         tok.backend.id_to_token(i) in {"<pad>", "<unk>", "<s>"})
    datasets = [
        DatasetSpec("missing", str(tmp_path / "nowhere"), 1.0),
        DatasetSpec("foreign", write(tmp_path / "foreign", [[5, 9000, tok.eod_id], [6, tok.eod_id]]), 1.0),
        DatasetSpec("other-eod", write(tmp_path / "other", [[5, other_special], [6, other_special]]), 1.0),
    ]
    problems = check_data(DataConfig(tokenizer=str(BPE_4K), datasets=datasets))
    assert len(problems) == 3, problems
    assert "data.datasets['missing']" in problems[0] and "no such file" in problems[0]
    assert "token id 9,000 but the tokenizer has" in problems[1]
    assert f"end with token id {other_special}" in problems[2] and f"id is {tok.eod_id}" in problems[2]


def test_ids_too_wide_for_the_stored_dtype(tmp_path):
    qwen = load_tokenizer(QWEN)  # 151k ids do not fit uint16
    prefix = write(tmp_path / "zh", [[5, 6, qwen.eod_id % 65535]])
    (problem,) = check_data(DataConfig(tokenizer=str(QWEN), datasets=[DatasetSpec("zh", prefix, 1.0)]))
    assert "stored as uint16, which cannot hold the tokenizer's 151" in problem


def test_dry_run_says_the_check_was_skipped_or_fails_when_asked(capsys):
    config = str(CONFIGS / "bloom-560m.yaml")  # points at data/roots/, absent here
    assert pretrain_bloom.main(["--config", config, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 559,214,592" in out and "data: not checked (59 dataset prefixes" in out
    assert pretrain_bloom.main(["--config", config, "--dry-run", "--check-data"]) == 2
    err = capsys.readouterr().err
    assert "data check: 60 problem(s)" in err  # 59 prefixes and the tokenizer, all listed
    assert "data.datasets['tum'] (data/roots/tum_text_document)" in err


def test_a_blend_file_fills_the_datasets_and_conflicts_are_refused(tmp_path):
    cfg = load_config(CONFIGS / "bloom-176b.yaml")
    names = [d.name for d in cfg.data.datasets]
    assert len(names) == 59 and {"en", "zh-Hans", "tum", "python", "rust"} <= set(names)
    assert cfg.data.datasets_file is None  # expanded: a saved config.yaml lists the datasets
    assert sum(d.weight for d in cfg.data.datasets) == pytest.approx(1.0, abs=1e-6)
    body = yaml.safe_load((CONFIGS / "bloom-560m.yaml").read_text())
    body["data"]["datasets"] = [{"name": "fr", "prefix": "p", "weight": 1.0}]
    path = tmp_path / "both.yaml"
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(ConfigError, match="data.datasets and data.datasets_file .* are both set"):
        load_config(path)


def test_roots_blend_file_is_the_registrys_mixture():
    from megatron.data.languages import bloom_mixture_weights

    body = yaml.safe_load((CONFIGS / "data" / "roots.yaml").read_text())
    weights = {d["name"]: d["weight"] for d in body["datasets"]}
    expected = bloom_mixture_weights()
    assert weights.keys() == expected.keys()
    assert all(weights[k] == pytest.approx(expected[k], rel=1e-8) for k in expected)
    # The published figures it rests on: English 30.04% of bytes on the card; code 10.8%.
    code = sum(w for k, w in weights.items() if k in {"java", "php", "cpp", "python", "javascript", "csharp", "ruby",
                                                      "lua", "go", "typescript", "c", "scala", "rust"})
    assert code == pytest.approx(0.108, abs=0.002)
