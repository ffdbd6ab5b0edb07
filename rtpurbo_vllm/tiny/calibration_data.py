"""Calibration text for the tiny model: ``python -m rtpurbo_vllm.tiny.calibration_data --out DIR``.

The tiny model retrieves by one step of induction on key words, and its 366-word vocabulary makes
any span of ordinary task text recur many times in a document, so a needle cut from task text has
many earlier matches and the needle-copy probe cannot tell retrieval heads apart. Three files, one
document per line:

- ``filler.txt``: filler only (no key words): the probes' haystack (``heads --data``);
- ``records.txt``: ``key K d d d .`` records whose keys are distinct within every run of
  ``MAX_PAIRS`` records: the needles (``heads --needle-data``), so each key in the second copy has
  exactly one earlier match;
- ``task.txt``: task documents (filler, pairs, queries with answers): what the indexer is trained and
  evaluated on (``train-indexer --data``, ``evaluate --data``).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Sequence

from rtpurbo_vllm.tiny.task import (
    MAX_PAIRS,
    VALUE_DIGITS,
    _digits,
    _distinct_keys,
    filler_words,
    make_training_example,
    pair_span,
)
from rtpurbo_vllm.tiny.tokenizer import VOCAB

DOC_TOKENS = 4096


def _text(ids: Sequence[int]) -> str:
    return " ".join(VOCAB[i] for i in ids)


def filler_document(rng: random.Random, n: int = DOC_TOKENS) -> str:
    return " ".join(filler_words(rng, n))


def records_document(rng: random.Random, n: int = DOC_TOKENS) -> str:
    ids: list[int] = []
    while len(ids) < n:
        for key in _distinct_keys(rng, MAX_PAIRS):
            ids += pair_span(key, _digits(rng, VALUE_DIGITS))
    return _text(ids[:n])


def task_document(rng: random.Random, n: int = DOC_TOKENS) -> str:
    pairs = min(MAX_PAIRS, n // 64)
    return _text(make_training_example(rng, n, pairs, pairs)[0][1:])       # without <s>


def write_calibration_texts(out_dir: str | Path, num_docs: int = 64, seed: int = 0) -> dict[str, Path]:
    """Writes ``filler.txt``, ``records.txt`` and ``task.txt`` (``num_docs`` documents of
    ``DOC_TOKENS`` tokens each) to ``out_dir``; deterministic in ``seed``. Returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for k, (name, make) in enumerate([("filler", filler_document), ("records", records_document),
                                      ("task", task_document)]):
        rng = random.Random(seed * 1000 + k)
        paths[name] = out / f"{name}.txt"
        paths[name].write_text("\n".join(make(rng) for _ in range(num_docs)) + "\n")
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for filler.txt, records.txt, task.txt")
    parser.add_argument("--num-docs", type=int, default=64, help="documents per file (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, path in write_calibration_texts(args.out, args.num_docs, args.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
