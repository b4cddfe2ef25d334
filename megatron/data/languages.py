"""Registry of BLOOM's 46 natural and 13 programming languages.

The data lives in ``languages.json`` next to this module (a copy of the demo corpus's
``data/corpus/languages.json``): names, family/group, script, BLOOM's share of the ROOTS
training corpus where BigScience published one, and the size of each language in the bundled
demo corpus. This module turns it into frozen dataclasses and small lookup helpers::

    >>> from megatron.data import languages
    >>> languages.get_language("zh-Hans").name
    'Chinese (Simplified)'
    >>> len(languages.natural_languages()), len(languages.programming_languages())
    (46, 13)

Codes are BCP-47 style for natural languages (``en``, ``zh-Hans``, ``nso``) and lower-case
names for programming languages (``python``, ``cpp``, ``csharp``). They double as the file
stems of the demo corpus (``natural/<code>.jsonl.gz``, ``code/<code>.jsonl.gz``).
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Mapping

__all__ = [
    "Language",
    "UnknownLanguageError",
    "LANGUAGES",
    "get_language",
    "all_languages",
    "natural_languages",
    "programming_languages",
    "groups",
    "by_group",
    "group_shares_pct",
    "demo_corpus_files",
    "NUM_NATURAL",
    "NUM_PROGRAMMING",
]

NUM_NATURAL = 46
NUM_PROGRAMMING = 13
Kind = Literal["natural", "code"]
# Sub-directory of a corpus directory that holds each kind's files.
_KIND_DIRS: dict[str, str] = {"natural": "natural", "code": "code"}


@dataclass(frozen=True)
class Language:
    """One BLOOM language.

    Attributes:
        code: registry key and corpus file stem (``en``, ``zh-Hans``, ``python``).
        name: English name (``Chinese (Simplified)``, ``C#``).
        kind: ``"natural"`` or ``"code"``.
        group: BLOOM's grouping (``Romance``, ``Indic``, ``Niger-Congo`` ... ; ``code`` for
            programming languages).
        family: language family (``Indo-European``); None for code.
        subgroup: finer group inside Indic/Niger-Congo (``Dravidian``, ``Bantu``), else None.
        script: ISO 15924 script of the text (``Latn``, ``Deva``); None for code.
        iso639_3: ISO 639-3 code; None for code.
        bloom_share_pct: percent of BLOOM's training bytes, None where unpublished (code
            languages are published as file counts instead, see ``bloom_files``).
        bloom_share_source: where ``bloom_share_pct`` comes from (a key of the JSON's
            ``share_sources``).
        bloom_files: number of files in BLOOM's training data (code only).
        demo_docs: documents of this language in the bundled demo corpus (0 = no file).
        demo_bytes: UTF-8 bytes of text of this language in the demo corpus.
    """

    code: str
    name: str
    kind: Kind
    group: str
    family: str | None
    subgroup: str | None
    script: str | None
    iso639_3: str | None
    bloom_share_pct: float | None
    bloom_share_source: str | None
    bloom_files: int | None
    demo_docs: int
    demo_bytes: int

    @property
    def is_code(self) -> bool:
        """True for a programming language."""
        return self.kind == "code"

    @property
    def corpus_relpath(self) -> str:
        """Path of this language's file inside a corpus directory (``natural/en.jsonl.gz``)."""
        return f"{_KIND_DIRS[self.kind]}/{self.code}.jsonl.gz"


class UnknownLanguageError(KeyError):
    """Raised for a language code (or group) the registry does not know (a KeyError, so
    ``LANGUAGES`` behaves like any mapping)."""

    def __str__(self) -> str:  # KeyError would repr() the message, quotes and all
        return str(self.args[0]) if self.args else ""


@lru_cache(maxsize=1)
def _raw() -> dict[str, Any]:
    """The parsed ``languages.json`` shipped with the package."""
    text = resources.files(__package__).joinpath("languages.json").read_text(encoding="utf-8")
    return json.loads(text)


def _from_record(rec: Mapping[str, Any]) -> Language:
    """Build a :class:`Language` from one record of ``languages.json``."""
    if rec["kind"] not in _KIND_DIRS:
        raise ValueError(f"languages.json: {rec['code']!r} has unknown kind {rec['kind']!r}")
    share = rec.get("bloom_share_pct")
    files = rec.get("bloom_files")
    return Language(
        code=rec["code"],
        name=rec["name"],
        kind=rec["kind"],
        group=rec["group"],
        family=rec.get("family"),
        subgroup=rec.get("subgroup"),
        script=rec.get("script"),
        iso639_3=rec.get("iso639_3"),
        bloom_share_pct=None if share is None else float(share),
        bloom_share_source=rec.get("bloom_share_source"),
        bloom_files=None if files is None else int(files),
        demo_docs=int(rec.get("demo_docs") or 0),
        demo_bytes=int(rec.get("demo_bytes") or 0),
    )


@lru_cache(maxsize=1)
def _registry() -> Mapping[str, Language]:
    """Code -> Language, in the JSON's order (natural languages by share, then code)."""
    langs = [_from_record(r) for r in _raw()["languages"]]
    table = {lang.code: lang for lang in langs}
    if len(table) != len(langs):
        raise ValueError("languages.json: duplicate language codes")
    return MappingProxyType(table)


class _LazyRegistry(Mapping[str, Language]):
    """Read-only mapping code -> Language that loads the JSON on first use."""

    def __getitem__(self, code: str) -> Language:
        return get_language(code)

    def __contains__(self, code: object) -> bool:
        return code in _registry()

    def __iter__(self):
        return iter(_registry())

    def __len__(self) -> int:
        return len(_registry())

    def __repr__(self) -> str:
        return f"LANGUAGES({', '.join(_registry())})"


#: All languages, keyed by code. ``LANGUAGES["fr"]`` raises :class:`UnknownLanguageError`
#: with suggestions for an unknown code.
LANGUAGES: Mapping[str, Language] = _LazyRegistry()


def _suggestions(query: str) -> list[str]:
    """Close matches for an unknown code: by code, by prefix (``zh``) and by English name."""
    reg = _registry()
    q = query.strip().lower()
    found: list[str] = []
    found += [c for c in reg if c.lower().startswith(q + "-")]
    lower_codes = {c.lower(): c for c in reg}
    found += [lower_codes[c] for c in difflib.get_close_matches(q, lower_codes, n=4, cutoff=0.6)]
    names = {lang.name.lower(): lang.code for lang in reg.values()}
    found += [names[n] for n in difflib.get_close_matches(q, names, n=3, cutoff=0.7)]
    found += [lang.code for lang in reg.values() if q and q == (lang.iso639_3 or "")]
    return list(dict.fromkeys(found))  # de-duplicate, keep order


def get_language(code: str) -> Language:
    """Return the language registered under ``code``.

    Codes match exactly first, then case-insensitively (BCP-47 tags are case-insensitive, so
    ``zh-hans`` finds ``zh-Hans``).

    Raises:
        UnknownLanguageError: ``code`` is not one of BLOOM's 59 languages; the message lists
            close matches (by code, prefix, English name or ISO 639-3 code).
    """
    reg = _registry()
    if code in reg:
        return reg[code]
    folded = {c.lower(): lang for c, lang in reg.items()}
    if isinstance(code, str) and code.lower() in folded:
        return folded[code.lower()]
    hints = _suggestions(code) if isinstance(code, str) else []
    if isinstance(code, str) and code.lower() in {g.lower() for g in groups()}:
        raise UnknownLanguageError(
            f"{code!r} is a language group, not a language code: use by_group({code!r})"
        )
    hint = (
        "did you mean " + ", ".join(f"{c!r} ({reg[c].name})" for c in hints) + "?"
        if hints
        else "see megatron.data.languages.LANGUAGES for the 59 codes"
    )
    raise UnknownLanguageError(f"unknown language code {code!r}: {hint}")


def all_languages() -> tuple[Language, ...]:
    """All 59 languages: the 46 natural ones first, then the 13 programming languages."""
    return tuple(_registry().values())


def natural_languages() -> tuple[Language, ...]:
    """BLOOM's 46 natural languages, ordered by BLOOM's training share (largest first)."""
    return tuple(lang for lang in _registry().values() if lang.kind == "natural")


def programming_languages() -> tuple[Language, ...]:
    """BLOOM's 13 programming languages, ordered by BLOOM's file count (largest first)."""
    return tuple(lang for lang in _registry().values() if lang.kind == "code")


def groups() -> tuple[str, ...]:
    """Names of all groups (``Romance``, ``Indic``, ``Niger-Congo``, ..., ``code``)."""
    return tuple(dict.fromkeys(lang.group for lang in _registry().values()))


def by_group(group: str) -> tuple[Language, ...]:
    """Languages of one group, e.g. ``by_group("Indic")`` (case-insensitive).

    Raises:
        UnknownLanguageError: no such group; the message lists the known groups.
    """
    wanted = group.lower()
    found = tuple(lang for lang in _registry().values() if lang.group.lower() == wanted)
    if not found:
        raise UnknownLanguageError(f"unknown language group {group!r}; known groups: {', '.join(groups())}")
    return found


def group_shares_pct() -> dict[str, float]:
    """BLOOM's published share (percent of training bytes) of whole groups (Indic, code ...)."""
    return dict(_raw()["group_shares_pct"])


# BLOOM paper (Le Scao et al., 2022), table 1, as bigscience-workshop/xmtf's plotting code
# lists it: "Programming Languages ... 174,700,245,772" bytes of 1,614,479,114,961 in all.
ROOTS_CODE_BYTES = 174_700_245_772
ROOTS_TOTAL_BYTES = 1_614_479_114_961


def bloom_mixture_weights() -> dict[str, float]:
    """BLOOM's training mixture as blend weights summing to 1, language code -> weight.

    The programming languages share the code portion of ROOTS (174.7 GB of 1.61 TB, 10.82%) in
    proportion to their file counts, the only per-language figure BigScience published for code.
    The natural languages share the rest in proportion to their ``bloom_share_pct``, which come
    from several sources and do not add up to exactly the remaining 89.18%.
    """
    natural = {lang.code: lang.bloom_share_pct for lang in natural_languages()}
    missing = [code for code, share in natural.items() if share is None]
    if missing:
        raise ValueError(f"languages.json: no bloom_share_pct for {missing}")
    code = programming_languages()
    files = sum(lang.bloom_files for lang in code)
    code_fraction = ROOTS_CODE_BYTES / ROOTS_TOTAL_BYTES
    natural_total = sum(natural.values())
    return {**{name: (1.0 - code_fraction) * share / natural_total for name, share in natural.items()},
            **{lang.code: code_fraction * lang.bloom_files / files for lang in code}}


def demo_corpus_files(root: str | Path, *, include_missing: bool = False) -> dict[str, Path]:
    """Map language code -> path of its ``.jsonl.gz`` in a corpus directory laid out like
    ``data/corpus`` (``natural/<code>.jsonl.gz``, ``code/<code>.jsonl.gz``).

    Languages without a file (Chitumbuka, ``tum``, has no text in the demo corpus) are left
    out unless ``include_missing`` is true.

    Raises:
        FileNotFoundError: ``root`` is not a directory, or holds none of the expected files.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"corpus directory {root} does not exist (expected e.g. data/corpus)")
    paths = {lang.code: root / lang.corpus_relpath for lang in all_languages()}
    present = {code: p for code, p in paths.items() if p.is_file()}
    if not present:
        raise FileNotFoundError(
            f"{root} holds no natural/<code>.jsonl.gz or code/<code>.jsonl.gz files; "
            "point it at a corpus directory such as data/corpus"
        )
    return paths if include_missing else present
