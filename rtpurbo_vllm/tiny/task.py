"""Synthetic long-context key-value retrieval task of the tiny model.

A document is filler words with *pairs* ``key sigma 9 3 8 .`` buried in it; a *query*
``query key sigma`` asks for the value of an earlier pair, answered by ``9 3 8``. Keys are single
words of their own (never filler), and the value follows the key directly, so finding it is one
step of induction: attend to the token after the earlier copy of the current token. (Keys of three
digits with ``: value`` in between need a match three tokens deep, which a from-scratch model did
not learn within the CPU budget: 25-28 % with 5-8 pairs.) Every generator takes a seed (or a
``random.Random``) and is deterministic in it. Token ids come from the fixed vocabulary of
:mod:`rtpurbo_vllm.tiny.tokenizer`; every id sequence starts with ``<s>``.

Filler is not uniform noise: each filler word is drawn among four fixed *successors* of the word two
places back (a skip-bigram rule), with an occasional ``.``. Predicting it needs the previous token,
which is what makes a from-scratch model grow the previous-token heads that retrieval builds on.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Sequence

from rtpurbo_vllm.tiny.tokenizer import BOS_ID, FILLER_WORDS, KEY_WORDS, TOKEN_ID, VOCAB

VALUE_DIGITS = 3
_DIGIT_IDS = [TOKEN_ID[str(d)] for d in range(10)]
_FILLER_IDS = [TOKEN_ID[w] for w in FILLER_WORDS]
_KEY_IDS = [TOKEN_ID[w] for w in KEY_WORDS]
_KEY, _QUERY, _STOP = (TOKEN_ID[w] for w in ("key", "query", "."))
PAIR_LEN = 1 + 1 + VALUE_DIGITS + 1                  # key K d d d .
QUERY_LEN = 1 + 1 + 1                                # query key K
MAX_PAIRS = len(KEY_WORDS)
_SENTENCE_END_P = 0.08                               # chance that a filler token is "."
_N_SUCCESSORS = 4
_rule_rng = random.Random(20260528)
_SUCCESSORS = {w: _rule_rng.sample(_FILLER_IDS, _N_SUCCESSORS) for w in _FILLER_IDS}

TARGET_NONE, TARGET_ANSWER, TARGET_ECHO, TARGET_FILLER = 0, 1, 2, 3


@dataclass(frozen=True)
class Prompt:
    """One evaluation prompt.

    Attributes:
        ids: ``[T]`` prompt ids (``T`` = the requested context length), ``<s>`` first, ending with
            the query's key word.
        answer: ``[VALUE_DIGITS]`` ids of the expected continuation.
        pair_start: index in ``ids`` of the ``key`` token of the queried pair.
    """

    ids: list[int]
    answer: list[int]
    pair_start: int

    @property
    def text(self) -> str:
        """The prompt as words joined by spaces, without ``<s>`` (what an API client sends)."""
        return " ".join(VOCAB[i] for i in self.ids[1:])

    @property
    def answer_text(self) -> str:
        return " ".join(VOCAB[i] for i in self.answer)

    @property
    def distance(self) -> int:
        """Tokens from the queried pair's ``key`` to the last prompt token."""
        return len(self.ids) - 1 - self.pair_start


@dataclass(frozen=True)
class Probe:
    """A needle-copy probe document: the same needle span twice.

    Attributes:
        ids: ``[T]`` ids, ``<s>`` first.
        first: index range of the first needle copy in ``ids`` (near the start).
        second: index range of the second copy (near the end); ``ids[first] == ids[second]``.
    """

    ids: list[int]
    first: range
    second: range


def _filler(rng: random.Random, n: int, context: Sequence[int] = ()) -> list[int]:
    """``n`` filler ids continuing ``context`` (only its last two ids matter).

    A token is ``.`` with probability ``_SENTENCE_END_P``, else one of the four successors of the
    token two places back when that is a filler word, else a uniformly random filler word.
    """
    out = list(context[-2:])
    for _ in range(n):
        if rng.random() < _SENTENCE_END_P:
            out.append(_STOP)
        elif len(out) >= 2 and out[-2] in _SUCCESSORS:
            out.append(rng.choice(_SUCCESSORS[out[-2]]))
        else:
            out.append(rng.choice(_FILLER_IDS))
    return out[len(out) - n:] if n else []


def filler_words(rng: random.Random, n: int) -> list[str]:
    """``n`` filler words of the training documents' skip-bigram filler, as text (``.`` is a word
    of its own), for prompts built from text such as ``rtpurbo-eval``'s.

    The words are drawn one after the other from ``rng``, so the first ``k`` are the same for every
    ``n >= k`` given the same ``rng`` state.
    """
    return [VOCAB[i] for i in _filler(rng, n)]


def filler_targets(ids: Sequence[int]) -> list[bool]:
    """``[T]``: True where ``ids[t]`` follows the skip-bigram rule from a filler word at ``t - 2``."""
    return [t >= 2 and ids[t - 2] in _SUCCESSORS and ids[t] in _SUCCESSORS[ids[t - 2]]
            for t in range(len(ids))]


def _digits(rng: random.Random, n: int) -> list[int]:
    return [rng.choice(_DIGIT_IDS) for _ in range(n)]


def _distinct_keys(rng: random.Random, n: int) -> list[int]:
    """``n`` distinct key-word ids (``n <= MAX_PAIRS``)."""
    return rng.sample(_KEY_IDS, n)


def pair_span(key: int, value: Sequence[int]) -> list[int]:
    """``key K v v v .`` as ``[PAIR_LEN]`` ids."""
    return [_KEY, key, *value, _STOP]


def query_span(key: int) -> list[int]:
    """``query key K`` as ``[QUERY_LEN]`` ids (the answer follows)."""
    return [_QUERY, _KEY, key]


def _spread(rng: random.Random, total: int, parts: int) -> list[int]:
    """Splits ``total`` filler tokens into ``parts`` random non-negative gap sizes."""
    cuts = sorted(rng.randint(0, total) for _ in range(parts - 1))
    return [b - a for a, b in zip([0, *cuts], [*cuts, total])]


def make_prompt(seed: int, context_len: int = 2048, n_pairs: int = 8,
                min_distance: int = 0) -> Prompt:
    """A prompt of exactly ``context_len`` ids whose last query asks for one of ``n_pairs`` pairs.

    The pairs sit at uniformly random places in the filler; the queried pair is drawn among those at
    least ``min_distance`` tokens before the end (the one farthest back when none is).
    """
    rng = random.Random(seed)
    n_filler = context_len - 1 - n_pairs * PAIR_LEN - QUERY_LEN
    if n_filler < 0:
        raise ValueError(f"context_len={context_len} is too short for {n_pairs} pairs")
    keys = _distinct_keys(rng, n_pairs)
    values = [_digits(rng, VALUE_DIGITS) for _ in keys]
    gaps = _spread(rng, n_filler, n_pairs + 1)
    ids, starts = [BOS_ID], []
    for gap, key, value in zip(gaps, keys, values):
        ids += _filler(rng, gap, ids)
        starts.append(len(ids))
        ids += pair_span(key, value)
    ids += _filler(rng, gaps[-1], ids)
    far = [i for i, s in enumerate(starts) if len(ids) + QUERY_LEN - 1 - s >= min_distance]
    pick = rng.choice(far) if far else 0
    ids += query_span(keys[pick])
    return Prompt(ids=ids, answer=list(values[pick]), pair_start=starts[pick])


def make_training_example(rng: random.Random, seq_len: int, n_pairs: int, n_queries: int,
                          n_echoes: int = 0, echo_len: tuple[int, int] = (6, 20),
                          echo_digit_p: float = 0.5) -> tuple[list[int], list[int]]:
    """A training document of exactly ``seq_len`` ids with pairs, queries and echoes interleaved.

    Events are shuffled with a pair first. Each query asks for a uniformly chosen pair defined
    before it and is followed by its answer and ``.``. An *echo* is a span of random digits (each
    token with probability ``echo_digit_p``) and filler words (length drawn from ``echo_len``)
    that appears twice, the second time at a later random place: copying it is the induction skill
    that answering a query builds on (digits repeat often, so copying them must match more than
    one token back), with far more targets per document. ``n_pairs = n_queries = 0`` gives echoes
    alone.

    Returns:
        ``(ids, targets)``: ``ids`` ``[seq_len]``; ``targets`` ``[seq_len]`` says what predicts
        ``ids[t]``: ``TARGET_ANSWER`` for an answer digit and the ``.`` closing an answer,
        ``TARGET_ECHO`` for an echo token after the echo's first (both exactly predictable by
        looking back), ``TARGET_FILLER`` for a filler token that follows the skip-bigram rule (one
        of four), else ``TARGET_NONE``.
    """
    if n_queries and not n_pairs:
        raise ValueError("queries need at least one pair")
    answered = QUERY_LEN + VALUE_DIGITS + 1
    spans = [[rng.choice(_DIGIT_IDS if rng.random() < echo_digit_p else _FILLER_IDS)
              for _ in range(rng.randint(*echo_len))] for _ in range(n_echoes)]
    n_filler = seq_len - 1 - n_pairs * PAIR_LEN - n_queries * answered - 2 * sum(map(len, spans))
    if n_filler < 0:
        raise ValueError(f"seq_len={seq_len} is too short for {n_pairs} pairs, {n_queries} "
                         f"queries and {n_echoes} echoes")
    events = ["q"] * n_queries + ["p"] * max(0, n_pairs - 1) + ["e"] * (2 * n_echoes)
    rng.shuffle(events)
    events = ["p", *events] if n_pairs else events
    keys = _distinct_keys(rng, n_pairs)
    values = [_digits(rng, VALUE_DIGITS) for _ in keys]
    gaps = _spread(rng, n_filler, len(events) + 1)
    ids, targets, defined, echoed = [BOS_ID], [TARGET_NONE], 0, 0
    for gap, event in zip(gaps, events):
        ids += _filler(rng, gap, ids)
        targets += [TARGET_NONE] * gap
        if event == "p":
            ids += pair_span(keys[defined], values[defined])
            targets += [TARGET_NONE] * PAIR_LEN
            defined += 1
        elif event == "q":
            pick = rng.randrange(defined)
            ids += query_span(keys[pick]) + values[pick] + [_STOP]
            targets += [TARGET_NONE] * QUERY_LEN + [TARGET_ANSWER] * (VALUE_DIGITS + 1)
        else:                                   # echoes come in order: first copies, then repeats
            span = spans[echoed % n_echoes]
            ids += span
            targets += [TARGET_NONE] * len(span) if echoed < n_echoes else \
                [TARGET_NONE] + [TARGET_ECHO] * (len(span) - 1)
            echoed += 1
    ids += _filler(rng, gaps[-1], ids)
    targets += [TARGET_NONE] * gaps[-1]
    rule = filler_targets(ids)
    return ids, [TARGET_FILLER if kind == TARGET_NONE and r else kind for kind, r in zip(targets, rule)]


def make_probe(seed: int, length: int = 2048, n_needle_pairs: int = 4, offset: int = 16,
               tail: int = 8) -> Probe:
    """A document of ``length`` ids with the same needle (``n_needle_pairs`` pairs) twice.

    The first copy starts at ``offset`` (after ``<s>`` and filler, clear of the attention sinks),
    the second ends ``tail`` filler tokens before the end; filler fills the rest.
    """
    rng = random.Random(seed)
    needle: list[int] = []
    for key in _distinct_keys(rng, n_needle_pairs):
        needle += pair_span(key, _digits(rng, VALUE_DIGITS))
    middle = length - offset - 2 * len(needle) - tail
    if offset < 1 or middle < 0:
        raise ValueError(f"length={length} is too short for a {len(needle)}-token needle twice")
    ids = [BOS_ID]
    ids += _filler(rng, offset - 1, ids)
    first = range(len(ids), len(ids) + len(needle))
    ids += needle
    ids += _filler(rng, middle, ids)
    second = range(len(ids), len(ids) + len(needle))
    ids += needle
    ids += _filler(rng, tail, ids)
    return Probe(ids=ids, first=first, second=second)


_WORD = re.compile(r"\d|[^\W\d_]+|[^\w\s]")


def _words(text: str) -> list[str]:
    """The words of ``text`` as the tokenizer splits them (lower case, one digit per word)."""
    return _WORD.findall(text.lower())


def score(answer: Sequence[int] | str, generated: Sequence[int] | str) -> bool:
    """Exact match: the first ``len(answer)`` tokens of ``generated`` equal ``answer``.

    Both are id sequences or both are text (e.g. ``"9 3 8"`` against an API completion
    ``" 9 3 8 . the"``); text is compared word by word.
    """
    if isinstance(answer, str) != isinstance(generated, str):
        raise TypeError("answer and generated must both be ids or both be text")
    if isinstance(answer, str):
        answer, generated = _words(answer), _words(generated)
    answer, generated = list(answer), list(generated)
    return len(answer) > 0 and generated[:len(answer)] == answer
