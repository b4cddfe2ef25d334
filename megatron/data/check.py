"""The pre-launch data check: every dataset prefix and the tokenizer exist and agree.

Run before any rank starts (``pretrain_bloom.py --dry-run --check-data``, which the SLURM
scripts call before ``srun``), and again by the trainer before it opens the datasets, so a
48-node job never waits in the queue for hours only to die on its first missing file. It
lists every problem in one message, not just the first:

* the tokenizer file is missing or unreadable;
* a ``.bin``/``.idx`` pair is missing, truncated or corrupt (the index reader's own checks);
* the ``.idx`` dtype cannot hold the tokenizer's ids (uint16 data for a 250k vocabulary);
* the data holds ids the tokenizer does not have (preprocessed with another tokenizer);
* documents end with a token other than the tokenizer's end-of-document id (preprocessed with
  ``--append-eod`` and another tokenizer).

Only the first documents' tokens are read: the check stays fast on terabytes of data.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Optional

import numpy as np

from megatron.config import DataConfig

if TYPE_CHECKING:  # for annotations; check_data imports them when it runs
    from megatron.data.indexed_dataset import MMapIndexedDataset
    from megatron.data.tokenizer import HFTokenizer

DOCUMENTS_READ = 8  # per dataset: enough to see the end-of-document convention


def check_data(data: DataConfig, tokenizer: Optional[HFTokenizer] = None) -> list[str]:
    """Every problem with ``data``'s tokenizer and dataset prefixes, one line each (empty: fine).
    ``tokenizer``: ``data.tokenizer`` already loaded by the caller (else it is loaded here)."""
    from megatron.data.indexed_dataset import IndexedDatasetError, MMapIndexedDataset
    from megatron.data.tokenizer import load_tokenizer

    problems: list[str] = []
    if tokenizer is None and data.tokenizer:
        try:
            tokenizer = load_tokenizer(data.tokenizer)
        except (OSError, ValueError) as exc:
            problems.append(f"data.tokenizer {data.tokenizer}: {exc}")
    for spec in data.datasets:
        where = f"data.datasets[{spec.name!r}] ({spec.prefix})"
        try:
            dataset = MMapIndexedDataset(spec.prefix, validate=False)
        except (IndexedDatasetError, OSError) as exc:
            problems.append(f"{where}: {exc}")
            continue
        with dataset:
            if tokenizer is not None:
                problems += _disagreements(where, dataset, tokenizer)
    return problems


def _disagreements(where: str, dataset: MMapIndexedDataset, tokenizer: HFTokenizer) -> list[str]:
    problems = []
    vocab = tokenizer.vocab_size
    dtype = np.dtype(dataset.dtype)
    if dtype.kind in "iu" and np.iinfo(dtype).max < vocab - 1:
        problems.append(f"{where}: ids are stored as {dtype}, which cannot hold the tokenizer's {vocab:,} ids: "
                        "preprocess with this tokenizer")
    docs = dataset.doc_idx[: DOCUMENTS_READ + 1]
    firsts = [np.asarray(dataset[int(i)]) for i in docs[:-1] if int(i) < len(dataset)]
    if not firsts:
        return problems
    highest = max(int(t.max()) for t in firsts if t.size)
    if highest >= vocab:
        problems.append(f"{where}: holds token id {highest:,} but the tokenizer has {vocab:,} ids: it was "
                        "preprocessed with another tokenizer")
    ends = Counter(int(t[-1]) for t in firsts if t.size)
    last, count = ends.most_common(1)[0] if ends else (None, 0)
    eod = tokenizer.eod_id
    # All documents ending in the same special token means --append-eod; it must be ours.
    if count == len(firsts) > 1 and last != eod and _is_special(tokenizer, last):
        problems.append(f"{where}: documents end with token id {last} ({_name(tokenizer, last)!r}) but the "
                        f"tokenizer's end-of-document id is {eod} ({_name(tokenizer, eod)!r}): preprocessed with "
                        "another tokenizer")
    return problems


def _name(tokenizer, token_id: int) -> Optional[str]:
    return tokenizer.backend.id_to_token(int(token_id))


def _is_special(tokenizer, token_id: int) -> bool:
    special = {t.content for t in tokenizer.backend.get_added_tokens_decoder().values() if t.special}
    return _name(tokenizer, token_id) in special


def format_problems(problems: list[str]) -> str:
    """The one message that lists them all."""
    return (f"data check: {len(problems)} problem(s); fix them (or the config's data section) before launching:\n"
            + "\n".join(f"  - {p}" for p in problems))
