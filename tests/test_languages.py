"""The 46 + 13 language registry."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from megatron.data import languages as L

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "corpus"


def test_counts_and_kinds():
    assert len(L.natural_languages()) == L.NUM_NATURAL == 46
    assert len(L.programming_languages()) == L.NUM_PROGRAMMING == 13
    assert len(L.all_languages()) == len(L.LANGUAGES) == 59
    assert all(lang.kind == "natural" for lang in L.natural_languages())
    assert all(lang.kind == "code" and lang.is_code for lang in L.programming_languages())
    codes = [lang.code for lang in L.all_languages()]
    assert len(set(codes)) == 59


def test_programming_languages_are_blooms():
    assert {lang.code for lang in L.programming_languages()} == {
        "java", "php", "cpp", "python", "javascript", "csharp", "ruby", "lua", "go", "typescript", "c", "scala", "rust"
    }
    assert all(lang.bloom_files and lang.bloom_files > 0 for lang in L.programming_languages())


def test_lookup_fields():
    en = L.get_language("en")
    assert (en.name, en.group, en.script, en.kind, en.bloom_share_pct) == ("English", "Germanic", "Latn", "natural", 30.31)
    zh = L.LANGUAGES["zh-Hans"]
    assert zh.script == "Hans" and zh.corpus_relpath == "natural/zh-Hans.jsonl.gz"
    assert L.get_language("python").corpus_relpath == "code/python.jsonl.gz"
    assert L.get_language("tum").demo_docs == 0  # Chitumbuka: no demo text
    assert "fr" in L.LANGUAGES and "xx" not in L.LANGUAGES


def test_lookup_is_case_insensitive():
    assert L.get_language("ZH-hans") is L.get_language("zh-Hans")
    assert L.get_language("Python").code == "python"


def test_languages_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        L.get_language("en").name = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    "query, suggestion",
    [("zh", "'zh-Hans'"), ("swahili", "'sw'"), ("pyton", "'python'"), ("eng", "'en'"), ("javscript", "'javascript'")],
)
def test_unknown_code_suggests_close_matches(query, suggestion):
    with pytest.raises(L.UnknownLanguageError) as info:
        L.get_language(query)
    msg = str(info.value)
    assert repr(query) in msg and suggestion in msg and "did you mean" in msg
    with pytest.raises(LookupError):
        L.LANGUAGES[query]


def test_unknown_code_without_matches():
    with pytest.raises(L.UnknownLanguageError, match="unknown language code 'qqqq'"):
        L.get_language("qqqq")


def test_group_name_is_not_a_code():
    with pytest.raises(L.UnknownLanguageError, match=r"language group.*by_group\('Indic'\)"):
        L.get_language("Indic")


def test_by_group():
    indic = L.by_group("Indic")
    assert len(indic) == 13 and {"hi", "ur", "bn", "ta", "or", "as"} <= {lang.code for lang in indic}
    assert len(L.by_group("niger-congo")) == 22
    assert L.by_group("code") == L.programming_languages()
    assert set(L.groups()) >= {"Indic", "Niger-Congo", "Romance", "code"}
    with pytest.raises(L.UnknownLanguageError, match="known groups"):
        L.by_group("Klingon")
    assert L.group_shares_pct()["Indic"] == 2.0


def test_demo_corpus_files():
    files = L.demo_corpus_files(CORPUS)
    assert len(files) == 58 and "tum" not in files
    assert all(p.is_file() and p.name == f"{code}.jsonl.gz" for code, p in files.items())
    assert files["cpp"] == CORPUS / "code" / "cpp.jsonl.gz"
    assert len(L.demo_corpus_files(CORPUS, include_missing=True)) == 59
    with pytest.raises(FileNotFoundError, match="does not exist"):
        L.demo_corpus_files(CORPUS / "nope")


def test_demo_sizes_match_the_corpus_readme_totals():
    natural = sum(lang.demo_bytes for lang in L.natural_languages())
    code = sum(lang.demo_bytes for lang in L.programming_languages())
    assert (natural, code) == (10_338_342, 3_897_136)


def test_package_copy_of_languages_json_matches_the_corpus():
    packaged = (ROOT / "megatron" / "data" / "languages.json").read_bytes()
    assert packaged == (CORPUS / "languages.json").read_bytes()
