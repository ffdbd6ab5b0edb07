"""Calibration text as token ids: a user's text file or folder, or a built-in synthetic generator.

A :class:`TokenSource` hands out token sequences of any length, deterministically from a
``random.Random``. Text files are tokenised once into one stream (documents separated by the EOS
token when the tokenizer has one); the last :data:`HELDOUT_FRACTION` of the stream is the held-out
split used by ``evaluate``, the rest the training split. The synthetic source works with any
tokenizer: random ordinary (non-special) tokens in which spans of earlier text recur, so retrieval
heads have something to retrieve.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

HELDOUT_FRACTION = 0.1
TEXT_SUFFIXES = (".txt", ".md")
SPLITS = ("train", "heldout")
# Synthetic text: every ~_COPY_EVERY tokens a span of _COPY_LEN tokens from earlier text recurs.
_COPY_EVERY = 192
_COPY_LEN = (8, 32)


def read_documents(path: str | os.PathLike) -> list[str]:
    """The documents of a text file (one document) or a folder (each ``*.txt``/``*.md`` file under
    it, in sorted order).

    Raises:
        ValueError: the path does not exist, or the folder holds no text file.
    """
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"{path} holds no {'/'.join(TEXT_SUFFIXES)} file; fix: pass a text file or a "
                             f"folder of text files")
    else:
        raise ValueError(f"calibration data {path} does not exist; fix: pass a text file or folder, or omit "
                         f"--data to use the built-in synthetic text")
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


@dataclass(frozen=True)
class TokenSource:
    """Where calibration tokens come from.

    Attributes:
        description: what the tokens are (recorded in reports and the artifact's provenance).
        bos: the tokenizer's BOS id, put first in every sequence (None: nothing is prepended).
        stream: the text split's token ids, or None for synthetic text.
        vocab: ids the synthetic generator draws from (the tokenizer's non-special ids).
    """

    description: str
    bos: int | None
    stream: tuple[int, ...] | None
    vocab: tuple[int, ...]

    @classmethod
    def create(cls, tokenizer, data: str | os.PathLike | None = None, split: str = "train") -> TokenSource:
        """The text of ``data`` (a file or folder) tokenised with ``tokenizer``, restricted to ``split``
        (``"train"`` or ``"heldout"``); synthetic text when ``data`` is None."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        special = set(tokenizer.all_special_ids)
        vocab = tuple(i for i in range(len(tokenizer)) if i not in special)
        if not vocab:
            raise ValueError("the tokenizer has no ordinary tokens")
        if data is None:
            return cls("synthetic: random tokens with recurring spans", tokenizer.bos_token_id, None, vocab)
        stream: list[int] = []
        for doc in read_documents(data):
            stream += tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                stream.append(tokenizer.eos_token_id)
        cut = int(len(stream) * (1 - HELDOUT_FRACTION))
        part = stream[:cut] if split == "train" else stream[cut:]
        return cls(f"{data} ({split} split, {len(part)} tokens)", tokenizer.bos_token_id, tuple(part), vocab)

    def tokens(self, rng: random.Random, n: int) -> list[int]:
        """``n`` consecutive tokens: a random window of the text, or fresh synthetic text.

        Raises:
            ValueError: the text split is shorter than ``n`` tokens.
        """
        if self.stream is None:
            return self._synthetic(rng, n)
        if len(self.stream) < n:
            raise ValueError(f"calibration data {self.description} is shorter than the {n} tokens needed; "
                             f"fix: add text or ask for shorter sequences")
        start = rng.randrange(len(self.stream) - n + 1)
        return list(self.stream[start:start + n])

    def sequence(self, rng: random.Random, length: int) -> list[int]:
        """A ``[length]`` id list: BOS (if any) followed by :meth:`tokens`."""
        head = [] if self.bos is None else [self.bos]
        return head + self.tokens(rng, length - len(head))

    def _synthetic(self, rng: random.Random, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            if len(out) > 2 * _COPY_LEN[1] and rng.random() < 1 / _COPY_EVERY:
                span = rng.randint(*_COPY_LEN)
                start = rng.randrange(len(out) - span)
                out += out[start:start + span]
            else:
                out.append(rng.choice(self.vocab))
        return out[:n]


def sample_sequence(source: TokenSource, seq_len: int, num_queries: int, seed: int,
                    index: int) -> tuple[list[int], torch.Tensor]:
    """Sequence number ``index`` of a seeded stream: ``[seq_len]`` ids and ``[Q]`` int64 sorted query
    positions drawn without replacement from its second half (decode-like, far from the start);
    ``Q = min(num_queries, seq_len - seq_len // 2)``. A pure function of ``(seed, index)``."""
    rng = random.Random(seed * 1_000_003 + index)
    ids = source.sequence(rng, seq_len)
    candidates = range(seq_len // 2, seq_len)
    return ids, torch.tensor(sorted(rng.sample(candidates, min(num_queries, len(candidates)))))
