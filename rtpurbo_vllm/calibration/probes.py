"""Needle-copy probe documents for head classification (paper notes §2).

A probe is a document of ``probe_tokens`` ids holding the same needle span twice: once near the
start (after ``offset`` tokens, clear of the attention sinks) and once ending ``tail`` tokens before
the end. Filler and needle come from a :class:`~rtpurbo_vllm.calibration.data.TokenSource` (the
user's text or synthetic text), the needle from a different random place than the filler, or from a
source of its own (text whose spans recur nowhere else, so the copy has one match).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from rtpurbo_vllm.calibration.data import TokenSource

DEFAULT_NEEDLE_TOKENS = 64
DEFAULT_OFFSET = 16
DEFAULT_TAIL = 16


@dataclass(frozen=True)
class NeedleProbe:
    """One probe document.

    Attributes:
        ids: ``[T]`` token ids.
        first: positions of the first needle copy (N_pre of Eq.3).
        second: positions of the second copy (N_post); ``ids[first] == ids[second]``.
    """

    ids: list[int]
    first: range
    second: range


def min_probe_tokens(needle_tokens: int = DEFAULT_NEEDLE_TOKENS, offset: int = DEFAULT_OFFSET,
                     tail: int = DEFAULT_TAIL) -> int:
    """Shortest probe: offset, needle, a gap of at least one needle length, needle, tail."""
    return offset + 3 * needle_tokens + tail


def make_probes(source: TokenSource, num_probes: int, probe_tokens: int, seed: int,
                needle_tokens: int = DEFAULT_NEEDLE_TOKENS, offset: int = DEFAULT_OFFSET,
                tail: int = DEFAULT_TAIL, needle_source: TokenSource | None = None) -> list[NeedleProbe]:
    """``num_probes`` different probes, deterministic in ``seed``; needles are cut from
    ``needle_source`` when given, else from ``source``.

    Raises:
        ValueError: ``probe_tokens`` is shorter than :func:`min_probe_tokens`, or a count is not positive.
    """
    if num_probes < 1 or needle_tokens < 1:
        raise ValueError(f"need num_probes >= 1 and needle_tokens >= 1, got {num_probes}, {needle_tokens}")
    needed = min_probe_tokens(needle_tokens, offset, tail)
    if probe_tokens < needed:
        raise ValueError(f"--probe-tokens {probe_tokens} is shorter than needed: a probe holds {offset} leading "
                         f"tokens, the {needle_tokens}-token needle twice with a gap of at least one needle, and "
                         f"{tail} trailing tokens = {needed}; fix: pass --probe-tokens >= {needed} (long probes, "
                         f"e.g. 8192+, separate retrieval heads best) or a shorter --needle-tokens")
    rng = random.Random(seed)
    probes = []
    for _ in range(num_probes):
        needle = (needle_source or source).tokens(rng, needle_tokens)
        doc = source.sequence(rng, probe_tokens - 2 * needle_tokens)
        second_start = probe_tokens - tail - needle_tokens
        ids = doc[:offset] + needle + doc[offset:second_start - needle_tokens] + needle + doc[len(doc) - tail:]
        assert len(ids) == probe_tokens
        probes.append(NeedleProbe(ids, range(offset, offset + needle_tokens),
                                  range(second_start, second_start + needle_tokens)))
    return probes
