"""Tokenizer loading (Hugging Face ``tokenizers``).

BLOOM's tokenizer is a byte-level BPE stored as a ``tokenizer.json``; any such file works
here (one trained with ``tools/train_tokenizer.py``, BLOOM's own, or another model's)::

    tok = load_tokenizer("tokenizer.json")          # or tokenizer.json.gz, or a directory
    ids = tok.encode("Hello world")
    tok.eod_id, tok.pad_id, tok.vocab_size

Megatron's vocabulary padding is ``ModelConfig.padded_vocab_size`` (megatron/config.py).

The end-of-document id (appended after every document by ``tools/preprocess_data.py``) is
``</s>`` when the vocabulary has it, as in BLOOM, else the tokenizer's end-of-text token.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer

__all__ = [
    "EOD_CANDIDATES",
    "PAD_CANDIDATES",
    "HFTokenizer",
    "load_tokenizer",
]

# Looked up in this order. BLOOM uses </s>; the rest cover GPT-2/Qwen, Llama 3 and Gemma
# style vocabularies, so a user-supplied tokenizer.json usually works without flags.
EOD_CANDIDATES: tuple[str, ...] = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>")
PAD_CANDIDATES: tuple[str, ...] = ("<pad>", "<|pad|>", "[PAD]")


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` plus the ids Megatron needs (EOD, pad) and batch helpers.

    Text that literally contains a special token's string (``"</s>"`` in a web page) is
    encoded as plain text by default (``split_special_tokens=True``), so raw data can never
    inject a document separator; pass False to match special tokens in text instead.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        path: str | None = None,
        eod_token: str | None = None,
        pad_token: str | None = None,
        split_special_tokens: bool = True,
    ) -> None:
        self.backend = tokenizer
        self.path = path
        if hasattr(type(tokenizer), "encode_special_tokens"):  # tokenizers >= 0.19
            self.backend.encode_special_tokens = split_special_tokens
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        # Ids can be sparse in hand-edited files; size the embedding by the largest id.
        self.vocab_size = max(tokenizer.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
        self.eod_token = self._pick(vocab, eod_token, EOD_CANDIDATES, "eod")
        self.eod_id = vocab[self.eod_token]
        try:
            self.pad_token = self._pick(vocab, pad_token, PAD_CANDIDATES, "pad")
        except ValueError:
            if pad_token is not None:
                raise
            # Padding is never attended to, so reusing EOD is safe (GPT-2 style vocabularies).
            self.pad_token = self.eod_token
        self.pad_id = vocab[self.pad_token]

    def _pick(self, vocab: dict[str, int], wanted: str | None, candidates: Sequence[str], role: str) -> str:
        """Return ``wanted`` (must be in the vocab) or the first candidate present."""
        where = f"tokenizer {self.path}" if self.path else "tokenizer"
        if wanted is not None:
            if wanted not in vocab:
                raise ValueError(f"{where}: {role} token {wanted!r} is not in the vocabulary")
            return wanted
        added = [t.content for t in self.backend.get_added_tokens_decoder().values()]
        # Added (special) tokens first: some vocabularies (Qwen's) also hold "</s>" as an
        # ordinary BPE token that is not their end-of-text marker.
        for pool in (set(added), vocab):
            for tok in candidates:
                if tok in pool:
                    return tok
        raise ValueError(
            f"{where} has no {role} token: none of {list(candidates)} is in the vocabulary "
            f"(added tokens: {added[:20]}). Pass {role}_token=... naming the right one, or "
            "retrain with tools/train_tokenizer.py, which adds <unk> <s> </s> <pad>."
        )

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"HFTokenizer(path={self.path!r}, vocab_size={self.vocab_size}, "
            f"eod={self.eod_token!r}:{self.eod_id}, pad={self.pad_token!r}:{self.pad_id})"
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without any special tokens added around it."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (no special tokens added); same as ``encode`` per text."""
        encodings = self._encode_batch(texts)
        return [e.ids for e in encodings]

    def encode_batch_flat(
        self, texts: Sequence[str], dtype: np.dtype | type = np.int32, append_eod: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encode ``texts`` into one flat id array plus the per-text lengths (int32).

        This is the preprocessing fast path: one contiguous buffer per batch, which the
        ``.bin`` writer appends as raw bytes without per-document arrays.
        """
        id_lists = [e.ids for e in self._encode_batch(texts)]
        extra = 1 if append_eod else 0
        lengths = np.fromiter((len(ids) + extra for ids in id_lists), dtype=np.int32, count=len(id_lists))
        flat = np.empty(int(lengths.sum(dtype=np.int64)), dtype=dtype)
        pos = 0
        for ids in id_lists:
            n = len(ids)
            flat[pos : pos + n] = ids
            pos += n
            if append_eod:
                flat[pos] = self.eod_id
                pos += 1
        return flat, lengths

    def _encode_batch(self, texts: Sequence[str]):
        # encode_batch_fast skips character offsets, which we never use (about 2x faster).
        fast = getattr(self.backend, "encode_batch_fast", None)
        texts = list(texts)
        if fast is not None:
            return fast(texts, add_special_tokens=False)
        return self.backend.encode_batch(texts, add_special_tokens=False)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (numpy arrays welcome)."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of ``token``, or None when it is not in the vocabulary."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Token string of ``token_id``, or None when out of range."""
        return self.backend.id_to_token(int(token_id))


def _resolve(path: str | os.PathLike) -> Path:
    """A tokenizer file from a file or directory path (tokenizer.json, then .json.gz)."""
    p = Path(path)
    if p.is_dir():
        for name in ("tokenizer.json", "tokenizer.json.gz"):
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(f"directory {p} has no tokenizer.json or tokenizer.json.gz")
    if not p.is_file():
        raise FileNotFoundError(
            f"tokenizer file {p} does not exist; train one with tools/train_tokenizer.py "
            "or pass the path of an existing tokenizer.json"
        )
    return p


def load_tokenizer(
    path: str | os.PathLike,
    *,
    eod_token: str | None = None,
    pad_token: str | None = None,
    split_special_tokens: bool = True,
) -> HFTokenizer:
    """Load a Hugging Face ``tokenizer.json`` (plain, gzip'd, or a directory holding one).

    Args:
        path: ``tokenizer.json``, ``tokenizer.json.gz`` or a directory containing either.
        eod_token: end-of-document token; default ``</s>``, else the first of
            :data:`EOD_CANDIDATES` in the vocabulary.
        pad_token: padding token; default the first of :data:`PAD_CANDIDATES`, else EOD.
        split_special_tokens: encode special-token strings found in text as plain text.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a valid ``tokenizers`` JSON, or it has no EOD token.
    """
    file = _resolve(path)
    try:
        if file.suffix == ".gz":
            with gzip.open(file, "rb") as f:
                tok = Tokenizer.from_str(f.read().decode("utf-8"))
        else:
            tok = Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception for malformed JSON

        raise ValueError(
            f"{file} is not a valid Hugging Face tokenizers JSON file ({type(err).__name__}: {err})"
        ) from err
    return HFTokenizer(
        tok, path=str(file), eod_token=eod_token, pad_token=pad_token, split_special_tokens=split_special_tokens
    )
