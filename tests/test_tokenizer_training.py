"""tools/train_tokenizer.py (BLOOM-style byte-level BPE, alpha sampling) and
megatron/data/tokenizer.py (loading, EOD/pad ids, vocabulary padding)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from megatron.config import ModelConfig
from megatron.data import tokenizer_training as tt
from megatron.data.tokenizer import load_tokenizer
from tools import train_tokenizer as cli

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "corpus"
FIXTURES = ROOT / "tests" / "fixtures"
LANGS = {"en": "natural/en", "zh-Hans": "natural/zh-Hans", "hi": "natural/hi", "ar": "natural/ar", "python": "code/python"}
INPUTS = [str(CORPUS / f"{p}.jsonl.gz") for p in LANGS.values()]

SAMPLES = {
    "en": "The quick brown fox, isn't it?  Two spaces.\nNew line\ttab.",
    "fr": "L'été à Montréal — déjà vu… « très » bien !",
    "zh": "人人生而自由，在尊严和权利上一律平等。他们赋有理性和良心。",
    "hi": "सभी मनुष्यों को गौरव और अधिकारों के मामले में जन्मजात स्वतन्त्रता प्राप्त है।",
    "ar": "يولد جميع الناس أحرارًا متساوين في الكرامة والحقوق، وهم قد وهبوا عقلاً وضميرًا؟",
    "code": "def f(x: int) -> int:\n    \"\"\"Doc.\"\"\"\n    return {'a': [x ** 2, x // 3]}\n\n\tif (a && b) { c++; }\r\n",
    "mixed": "emoji 🚀🌍 e\u0301 (not NFC) \u00a0nbsp \u200bzwsp </s> <pad> literal",
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1,000-token tokenizer trained on five languages, 600 KB fed, via the CLI."""
    out = tmp_path_factory.mktemp("tok")
    args = ["--input", *INPUTS, "--vocab-size", "1000", "--alpha", "0.5", "--max-bytes", "600000",
            "--seed", "7", "--output-dir", str(out), "--quiet"]
    assert cli.main(args) == 0
    return out


def test_outputs_written_atomically(trained):
    assert sorted(p.name for p in trained.iterdir()) == ["tokenizer.json", "tokenizer_report.json"]


def test_special_token_ids_and_structure(trained):
    tok = load_tokenizer(trained / "tokenizer.json")
    assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "<pad>")] == [0, 1, 2, 3]
    assert tok.eod_id == 2 and tok.pad_id == 3 and tok.vocab_size == 1000
    spec = json.loads((trained / "tokenizer.json").read_text())
    assert spec["normalizer"] is None and spec["post_processor"] is None
    assert spec["decoder"]["type"] == "ByteLevel" and spec["model"]["type"] == "BPE"
    split, byte_level = spec["pre_tokenizer"]["pretokenizers"]
    assert split["type"] == "Split" and split["behavior"] == "Isolated" and split["pattern"]["Regex"] == tt.SPLIT_PATTERN
    assert byte_level == {**byte_level, "type": "ByteLevel", "add_prefix_space": False, "use_regex": False}
    # All 256 bytes are in the vocabulary: nothing is ever unknown.
    assert all(tok.token_to_id(ch) is not None for ch in _byte_level_alphabet())


def _byte_level_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel.alphabet()


@pytest.mark.parametrize("name", list(SAMPLES))
def test_round_trip_exact(trained, name):
    tok = load_tokenizer(trained / "tokenizer.json")
    text = SAMPLES[name]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert 0 not in ids  # no <unk>
    assert tok.encode_batch([text, text]) == [ids, ids]


def test_special_token_text_is_not_a_control_token(trained):
    tok = load_tokenizer(trained / "tokenizer.json")
    assert tok.eod_id not in tok.encode("a </s> b") and tok.decode(tok.encode("a </s> b")) == "a </s> b"
    literal = load_tokenizer(trained / "tokenizer.json", split_special_tokens=False)
    assert literal.eod_id in literal.encode("a </s> b")


def test_split_pattern_pieces():
    pieces = [p for p, _ in tt.build_bpe_tokenizer().pre_tokenizer.pre_tokenize_str("Hi, you.  Ok?\n    x")]
    assert pieces == ["Hi", ",", "Ġyou", ".Ġ", "ĠOk", "?ĊĠĠĠ", "Ġx"]
    zh = [p for p, _ in tt.build_bpe_tokenizer().pre_tokenizer.pre_tokenize_str("你好，世界。")]
    assert len(zh) == 4  # two words, two full-width marks


def test_report(trained):
    report = json.loads((trained / "tokenizer_report.json").read_text())
    assert set(report["languages"]) == set(LANGS)
    for lang, v in report["languages"].items():
        assert v["bytes_per_token"] > 1.0 and v["roundtrip_failures"] == 0, lang
        assert abs(v["fed_bytes"] - v["budget_bytes"]) <= 3, lang
    assert report["special_tokens"] == {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    assert abs(report["fed_bytes_total"] - 600_000) <= 3 * len(LANGS)


def test_alpha_budgets_follow_the_formula():
    sizes = {"big": 9_000_000, "mid": 900_000, "small": 100_000}
    total = sum(sizes.values())
    for alpha in (1.0, 0.5, 0.3):
        w = {k: (v / total) ** alpha for k, v in sizes.items()}
        q = {k: x / sum(w.values()) for k, x in w.items()}
        assert tt.sampling_probabilities(sizes, alpha) == pytest.approx(q)
        budgets = tt.byte_budgets(sizes, alpha, max_bytes=1_000_000)
        assert budgets == {k: round(q[k] * 1_000_000) for k in sizes}
    assert tt.byte_budgets(sizes, 1.0) == sizes  # default budget: the input as it is
    capped = tt.byte_budgets(sizes, 0.3, max_repeat=1.0)
    assert capped["small"] == sizes["small"] and capped["big"] < sizes["big"]
    with pytest.raises(ValueError, match="alpha"):
        tt.sampling_probabilities(sizes, 0)


def test_fed_bytes_reproduce_the_budgets():
    result = tt.train(INPUTS[:3], 600, alpha=0.3, max_bytes=300_000, seed=1, progress=False)
    sizes = {lang: d.total_bytes for lang, d in result.languages.items()}
    assert result.budgets == tt.byte_budgets(sizes, 0.3, 300_000)
    for lang, budget in result.budgets.items():
        assert budget - 3 <= result.fed_bytes[lang] <= budget, lang


@pytest.mark.parametrize("budget", [0, 1, 999, 5_000, 12_345, 40_000])
def test_plan_takes_is_exact_and_seeded(budget):
    doc_bytes = np.array([100, 2_000, 7, 512, 1_500, 33])  # 4,152 bytes
    takes, cut, cut_bytes = tt.plan_takes(doc_bytes, budget, np.random.default_rng(3))
    fed = int((takes * doc_bytes).sum()) + cut_bytes
    assert fed == budget
    assert cut == -1 or 0 < cut_bytes < doc_bytes[cut]
    again = tt.plan_takes(doc_bytes, budget, np.random.default_rng(3))
    assert np.array_equal(again[0], takes) and again[1:] == (cut, cut_bytes)


def test_training_is_deterministic(tmp_path):
    a = tt.train(INPUTS[:2], 500, alpha=0.3, max_bytes=200_000, seed=5, progress=False)
    b = tt.train(INPUTS[:2], 500, alpha=0.3, max_bytes=200_000, seed=5, progress=False)
    assert a.tokenizer.to_str() == b.tokenizer.to_str()


def test_language_from_file_name_and_explicit(tmp_path):
    found = tt.discover_inputs([str(CORPUS / "code"), f"xx={CORPUS / 'natural' / 'en.jsonl.gz'}"])
    assert len(found) == 14 and "python" in found and found["xx"] == [CORPUS / "natural" / "en.jsonl.gz"]
    assert "languages" not in tt.discover_inputs([str(CORPUS)])  # languages.json is metadata
    with pytest.raises(FileNotFoundError):
        tt.discover_inputs([str(tmp_path / "missing.jsonl")])


def test_cli_errors(tmp_path, capsys):
    assert cli.main(["--input", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "o"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    assert cli.main(["--input", INPUTS[0], "--vocab-size", "100", "--output-dir", str(tmp_path / "o"), "--quiet"]) == 2


# -- megatron.data.tokenizer ----------------------------------------------------------------
def test_qwen3_fixture_loads_from_gzip():
    tok = load_tokenizer(FIXTURES / "qwen3-byte-bpe" / "tokenizer.json.gz")
    assert tok.vocab_size == 151_669
    assert tok.encode("Hello world") == [9707, 1879]
    # "</s>" is an ordinary BPE token there; the end-of-text token is the added one.
    assert tok.eod_token == "<|endoftext|>" and tok.eod_id == 151_643 and tok.pad_id == tok.eod_id
    flat, lengths = tok.encode_batch_flat(["Hello world", "Hi"], np.int32, append_eod=True)
    assert lengths.tolist() == [3, len(tok.encode("Hi")) + 1] and flat[2] == 151_643


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "tokenizer.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not a valid"):
        load_tokenizer(bad)
    # A vocabulary without any end-of-document token.
    spec = json.loads((FIXTURES / "bloom-bpe-4k" / "tokenizer.json").read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "</s>"]
    del spec["model"]["vocab"]["</s>"]
    (tmp_path / "noeod.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="has no eod token"):
        load_tokenizer(tmp_path / "noeod.json")
    assert load_tokenizer(tmp_path / "noeod.json", eod_token="<s>").eod_id == 1
    with gzip.open(tmp_path / "tokenizer.json.gz", "wt") as f:
        f.write((FIXTURES / "bloom-bpe-4k" / "tokenizer.json").read_text())
    assert load_tokenizer(tmp_path).eod_id == 2  # a directory holding tokenizer.json.gz


def test_padded_vocab_size():
    """Megatron's rounding rule (the invalid cases are tests/test_config.py's)."""
    def padded(vocab, multiple=128, tp=1, pad_to=None):
        return ModelConfig(vocab_size=vocab, make_vocab_size_divisible_by=multiple,
                           pad_vocab_size_to=pad_to).padded_vocab_size(tp)

    assert padded(250_680, 128, 4) == 250_880
    assert padded(250_680, 128, 1) == 250_752  # 1,959 x 128
    assert padded(250_680, 128, 1, pad_to=250_880) == 250_880  # BLOOM's small models
    assert padded(151_669) == 151_680 and padded(256, 128, 2) == 256
