"""tools/preprocess_data.py: inputs of every kind, ordering, bad records, atomic outputs."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron.data import preprocess as pp
from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.data.tokenizer import load_tokenizer
from tools import preprocess_data as cli

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "fixtures" / "bloom-bpe-4k" / "tokenizer.json"
QWEN = ROOT / "tests" / "fixtures" / "qwen3-byte-bpe" / "tokenizer.json.gz"
CORPUS = ROOT / "data" / "corpus"

DOCS = [
    "Hello world, this is a document.",
    "人人生而自由，在尊严和权利上一律平等。",
    "सभी मनुष्यों को गौरव और अधिकारों के मामले में जन्मजात स्वतन्त्रता प्राप्त है।",
    "يولد جميع الناس أحرارًا متساوين في الكرامة والحقوق.",
    "def f(x):\n    return x + 1\n",
    "a literal </s> inside text",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER)


def write_jsonl(path: Path, lines, gz: bool = False) -> Path:
    """``lines``: dicts (dumped as JSON) or raw bytes (written as they are)."""
    data = b"".join((ln if isinstance(ln, bytes) else json.dumps(ln, ensure_ascii=False).encode()) + b"\n" for ln in lines)
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def run_cli(*args, summary: Path | None = None) -> int:
    argv = [str(a) for a in args] + ["--quiet"]
    if summary is not None:
        argv += ["--summary-json", str(summary)]
    return cli.main(argv)


def expected(tok, texts, eod=True):
    return [tok.encode(t) + ([tok.eod_id] if eod else []) for t in texts]


def read_back(prefix) -> list[list[int]]:
    ds = MMapIndexedDataset(prefix)
    assert ds.doc_idx.tolist() == list(range(len(ds) + 1))  # one sequence per document
    return [ds[i].tolist() for i in range(len(ds))]


@pytest.mark.parametrize("gz", [False, True])
def test_jsonl_round_trip(tmp_path, tok, gz):
    src = write_jsonl(tmp_path / ("in.jsonl.gz" if gz else "in.jsonl"), [{"text": t, "id": i} for i, t in enumerate(DOCS)], gz)
    assert run_cli("--input", src, "--tokenizer", TOKENIZER, "--output-prefix", tmp_path / "out", "--append-eod") == 0
    prefix = tmp_path / "out_text_document"
    assert read_back(prefix) == expected(tok, DOCS)
    assert MMapIndexedDataset(prefix).dtype == np.uint16  # 4,096-token vocabulary
    assert sorted(p.name for p in tmp_path.glob("out*")) == ["out_text_document.bin", "out_text_document.idx"]


def test_without_eod(tmp_path, tok):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in DOCS])
    assert run_cli("--input", src, "--tokenizer", TOKENIZER, "--output-prefix", tmp_path / "o") == 0
    assert read_back(tmp_path / "o_text_document") == expected(tok, DOCS, eod=False)


def test_large_vocabulary_uses_int32(tmp_path):
    qwen = load_tokenizer(QWEN)
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in DOCS])
    assert run_cli("--input", src, "--tokenizer", QWEN, "--output-prefix", tmp_path / "q", "--append-eod") == 0
    ds = MMapIndexedDataset(tmp_path / "q_text_document")
    assert ds.dtype == np.int32
    assert read_back(tmp_path / "q_text_document") == expected(qwen, DOCS)
    assert ds[0][-1] == 151_643 > 65_535  # the EOD id would not fit uint16


def test_parquet_input(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": DOCS + [None], "n": list(range(len(DOCS) + 1))})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=2)
    summary = tmp_path / "s.json"
    assert run_cli("--input", tmp_path / "in.parquet", "--tokenizer", TOKENIZER, "--output-prefix", tmp_path / "p",
                   "--append-eod", "--chunk-size", "3", summary=summary) == 0
    assert read_back(tmp_path / "p_text_document") == expected(tok, DOCS)
    s = json.loads(summary.read_text())
    assert s["skipped"]["missing_key"] == 1 and s["examples"][0]["location"].endswith(f"in.parquet:row {len(DOCS)}")


def test_saved_dataset_input(tmp_path, tok):
    import datasets

    datasets.Dataset.from_dict({"text": DOCS, "meta": ["m"] * len(DOCS)}).save_to_disk(str(tmp_path / "ds"))
    assert run_cli("--input", tmp_path / "ds", "--tokenizer", TOKENIZER, "--output-prefix", tmp_path / "d", "--append-eod") == 0
    assert read_back(tmp_path / "d_text_document") == expected(tok, DOCS)
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS[:2]}),
                               "validation": datasets.Dataset.from_dict({"text": DOCS[2:]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert run_cli("--input", tmp_path / "dd", "--split", "validation", "--tokenizer", TOKENIZER,
                   "--output-prefix", tmp_path / "v", "--append-eod") == 0
    assert read_back(tmp_path / "v_text_document") == expected(tok, DOCS[2:])


def test_several_inputs_and_keys(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "one", "title": "T1"}, {"text": "two"}, {"text": "three", "title": "T3"}])
    b = write_jsonl(tmp_path / "b.jsonl.gz", [{"text": "four", "title": "T4"}], gz=True)
    assert run_cli("--input", a, b, "--json-keys", "text", "title", "--tokenizer", TOKENIZER,
                   "--output-prefix", tmp_path / "k", "--append-eod") == 0
    # The record without a title is dropped from both outputs, keeping them aligned.
    assert read_back(tmp_path / "k_text_document") == expected(tok, ["one", "three", "four"])
    assert read_back(tmp_path / "k_title_document") == expected(tok, ["T1", "T3", "T4"])


def test_bad_records_are_skipped_counted_and_located(tmp_path, tok, capsys):
    lines = [
        {"text": "good one"},
        b'{"text": "unterminated',  # line 2: malformed JSON
        b'{"text": "caf\xe9"}',  # line 3: Latin-1 byte, not UTF-8
        {"body": "no text key"},  # line 4
        {"text": 42},  # line 5: not a string
        {"text": None},  # line 6: not a string
        ["text", "a list"],  # line 7: not an object
        {"text": ""},  # line 8: empty
        {"text": " \n\t "},  # line 9: whitespace only
        b"",  # line 10: blank line, ignored
        b'{"text": "lone \\ud800 surrogate"}',  # line 11
        {"text": "good two"},  # line 12
    ]
    src = write_jsonl(tmp_path / "bad.jsonl", lines)
    summary = tmp_path / "s.json"
    assert run_cli("--input", src, "--tokenizer", TOKENIZER, "--output-prefix", tmp_path / "b", "--append-eod",
                   summary=summary) == 0
    assert read_back(tmp_path / "b_text_document") == expected(tok, ["good one", "good two"])
    s = json.loads(summary.read_text())
    assert s["documents"] == 2 and s["blank_lines"] == 1
    assert s["skipped"] == {"malformed_json": 1, "invalid_utf8": 2, "not_an_object": 1, "missing_key": 1,
                            "non_string": 2, "empty": 2}
    where = {(e["reason"], e["location"]) for e in s["examples"]}
    for reason, line in [("malformed_json", 2), ("invalid_utf8", 3), ("missing_key", 4), ("non_string", 5),
                         ("non_string", 6), ("not_an_object", 7), ("empty", 8), ("invalid_utf8", 11)]:
        assert (reason, f"{src}:{line}") in where
    out = capsys.readouterr().out
    assert f"{src}:2" in out and "malformed_json 1" in out


def test_strict_fails_with_location_and_keeps_nothing(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "fine"}, {"text": "also fine"}, b"{oops"])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(src), "--tokenizer", str(TOKENIZER),
         "--output-prefix", str(tmp_path / "s"), "--strict", "--quiet"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert f"{src}:3: malformed json" in proc.stderr and "--strict" in proc.stderr
    assert not list(tmp_path.glob("s_*"))
    # Empty documents are not errors, even with --strict.
    empty = write_jsonl(tmp_path / "e.jsonl", [{"text": "x"}, {"text": ""}])
    assert run_cli("--input", empty, "--tokenizer", TOKENIZER, "--output-prefix", tmp_path / "e", "--strict") == 0


def test_workers_do_not_change_the_output(tmp_path):
    files = [CORPUS / "natural" / f"{lang}.jsonl.gz" for lang in ("sw", "yo", "ur", "ki")] + [CORPUS / "code" / "lua.jsonl.gz"]
    assert run_cli("--input", *files, "--tokenizer", TOKENIZER, "--output-prefix", tmp_path / "w1", "--append-eod",
                   "--workers", "1", "--chunk-size", "7") == 0
    # Through the script entry point, as users run it, with a pool of two processes.
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", *map(str, files), "--tokenizer",
         str(TOKENIZER), "--output-prefix", str(tmp_path / "w2"), "--append-eod", "--workers", "2", "--chunk-size", "5",
         "--quiet"],
        check=True, capture_output=True,
    )
    for ext in (".bin", ".idx"):
        one = (tmp_path / f"w1_text_document{ext}").read_bytes()
        assert one == (tmp_path / f"w2_text_document{ext}").read_bytes()
    assert len(MMapIndexedDataset(tmp_path / "w1_text_document")) == 18 + 18 + 16 + 1 + 38


def test_spawned_workers_match(tmp_path):
    """The start method used off Linux gives the same bytes."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in DOCS * 5])
    for name, kwargs in (("a", {"workers": 1}), ("b", {"workers": 2, "start_method": "spawn"})):
        pp.run([pp.Job([src], str(tmp_path / name))], str(TOKENIZER), ["text"], append_eod=True, chunk_size=4,
               progress=False, **kwargs)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"a_text_document{ext}").read_bytes() == (tmp_path / f"b_text_document{ext}").read_bytes()


def test_interrupted_run_leaves_no_final_files_and_the_same_command_continues(tmp_path, monkeypatch, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": f"document {i}"} for i in range(50)])
    real, calls = pp.encode_batch, []

    def dies_on_third_batch(batch):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(batch)

    monkeypatch.setattr(pp, "encode_batch", dies_on_third_batch)
    command = ("--input", src, "--tokenizer", TOKENIZER, "--chunk-size", "10", "--commit-interval", "0")
    code = run_cli(*command, "--output-prefix", tmp_path / "i")
    assert code == 130 and len(calls) == 3
    # No .bin/.idx: only the committed progress of the first two batches, under names no reader takes.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "i.partial.json", "i_text_document.bin.partial", "i_text_document.sizes.partial", "in.jsonl"]
    monkeypatch.setattr(pp, "encode_batch", real)
    capsys.readouterr()
    encoded = []
    monkeypatch.setattr(pp, "encode_batch", lambda batch: encoded.append(batch.first) or real(batch))
    assert run_cli(*command, "--output-prefix", tmp_path / "i") == 0
    assert "resuming" in capsys.readouterr().err and len(encoded) == 3  # batches 3-5 only
    assert run_cli(*command, "--output-prefix", tmp_path / "whole") == 0
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"i_text_document{ext}").read_bytes() == (tmp_path / f"whole_text_document{ext}").read_bytes()
    assert not [p.name for p in tmp_path.iterdir() if "partial" in p.name]


def test_failure_exit_codes(tmp_path, capsys):
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"text": "x"}])
    assert run_cli("--input", tmp_path / "missing.jsonl", "--tokenizer", TOKENIZER, "--output-prefix", tmp_path / "m") == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "data.csv").write_text("text\nx\n")
    assert run_cli("--input", tmp_path / "data.csv", "--tokenizer", TOKENIZER, "--output-prefix", tmp_path / "c") == 1
    assert "unknown input format" in capsys.readouterr().err
    assert run_cli("--input", ok, "--tokenizer", tmp_path / "none.json", "--output-prefix", tmp_path / "t") == 1
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "c.parquet")
    assert run_cli("--input", tmp_path / "c.parquet", "--tokenizer", TOKENIZER, "--output-prefix", tmp_path / "p") == 1
    assert "no column 'text'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    assert not list(tmp_path.glob("*_document.*"))


def test_empty_input_gives_empty_dataset(tmp_path):
    src = write_jsonl(tmp_path / "empty.jsonl", [])
    assert run_cli("--input", src, "--tokenizer", TOKENIZER, "--output-prefix", tmp_path / "z", "--append-eod") == 0
    assert len(MMapIndexedDataset(tmp_path / "z_text_document")) == 0


def test_corpus_dir_mode(tmp_path, tok):
    corpus = tmp_path / "corpus"
    (corpus / "natural").mkdir(parents=True)
    (corpus / "code").mkdir()
    write_jsonl(corpus / "natural" / "zh-Hans.jsonl.gz", [{"text": DOCS[1]}], gz=True)
    write_jsonl(corpus / "code" / "python.jsonl", [{"text": DOCS[4]}, {"text": DOCS[0]}])
    (corpus / "languages.json").write_text("{}")  # metadata, not a language
    summary = tmp_path / "s.json"
    assert run_cli("--corpus-dir", corpus, "--tokenizer", TOKENIZER, "--output-prefix", tmp_path / "out",
                   "--append-eod", "--workers", "2", summary=summary) == 0
    assert read_back(tmp_path / "out" / "zh-Hans_text_document") == expected(tok, [DOCS[1]])
    assert read_back(tmp_path / "out" / "python_text_document") == expected(tok, [DOCS[4], DOCS[0]])
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        f"{lang}_text_document.{ext}" for lang in ("zh-Hans", "python") for ext in ("bin", "idx"))
    assert json.loads(summary.read_text())["documents"] == 3


def test_special_token_text_in_documents_is_plain_text_unless_asked(tmp_path, tok):
    """Default: a literal "</s>" in a web page is text, never a document separator. With
    --match-special-tokens it becomes the end-of-document token, as Megatron-DeepSpeed does."""
    eod_text = tok.backend.id_to_token(tok.eod_id)
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": f"one {eod_text} two"}])
    for flag, name in (((), "safe"), (("--match-special-tokens",), "megatron")):
        assert run_cli("--input", str(src), "--tokenizer", str(TOKENIZER), "--output-prefix", str(tmp_path / name),
                       "--quiet", *flag) == 0
    safe = MMapIndexedDataset(str(tmp_path / "safe_text_document"))[0].tolist()
    megatron = MMapIndexedDataset(str(tmp_path / "megatron_text_document"))[0].tolist()
    assert tok.eod_id not in safe
    assert megatron.count(tok.eod_id) == 1
    assert tok.decode(safe) == tok.decode(megatron) == f"one {eod_text} two"
