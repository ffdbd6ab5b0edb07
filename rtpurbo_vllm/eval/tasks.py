"""Seeded RULER-style long-context tasks, sized in tokens of the served model's tokenizer.

Every sample is a prompt of (at most, and within a few tokens of) a requested number of tokens,
counted with the tokenizer of the model under test, plus the strings the answer must contain. The
tasks follow RULER (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your Long-Context
Language Models?"):

- ``niah_single``, ``niah_multikey``, ``niah_multivalue``, ``niah_multiquery``: needles
  "key -> value" hidden in filler text; one key, one of four keys, four values of one key, or four
  keys asked at once;
- ``vt``: variable tracking, a chain ``X1 = 12345, X2 = X1, ...``; every name bound to the value;
- ``cwe``: common-words extraction, the ten most frequent words of a numbered word list;
- ``fwe``: frequent-words extraction, the three most frequent words of Zipf-distributed text.

Nothing is downloaded. Filler and list words come from :data:`~rtpurbo_vllm.eval.words.BUILTIN_WORDS`
or from the tokenizer's own vocabulary, and only words the tokenizer round-trips are used. Two
template sets exist: ``ruler`` (RULER's English instructions) and ``terse`` (only the words
``key``, ``value``, ``query``, digits and ``: . ,``: needles ``key sigma 9 3 8 .``, the question
``query key sigma``), so that a tokenizer with a small fixed vocabulary can run the needle and
variable-tracking tasks. The ``tiny`` word source, chosen automatically for the tiny test model's
tokenizer (:mod:`rtpurbo_vllm.tiny`), reproduces that model's training documents: keys from its
dedicated key words, filler from its skip-bigram generator (:func:`rtpurbo_vllm.tiny.task.filler_words`).

A sample is a pure function of (tokenizer, template, vocabulary, task, length, index, seed).
"""

from __future__ import annotations

import math
import random
import string
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from rtpurbo_vllm.eval.words import BUILTIN_WORDS

TEMPLATE_CHOICES = ("auto", "ruler", "terse")
VOCAB_CHOICES = ("auto", "builtin", "tokenizer", "tiny")
TINY_TASKS = ("niah_single", "niah_multikey")
"""The tasks the tiny model is trained for (one queried key, its 3-digit value); the default tasks
of the ``tiny`` word source."""
MARKER_WORDS = frozenset({"key", "value", "query", "var"})
"""Words the templates use as markers; never used as filler, keys or list items."""
MIN_LEXICON = 64
"""Fewest round-tripping words a tokenizer must offer."""
SENTENCE_END_P = 0.1
"""Chance that a filler word ends a sentence (gets a ``.``); needles go between sentences."""


def load_tokenizer(path: str):
    """The Hugging Face tokenizer in the local folder ``path`` (no download is attempted).

    Raises:
        ValueError: ``path`` holds no tokenizer transformers can load.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load a tokenizer from {path!r} ({exc}); fix: pass --tokenizer the local "
                         "model folder the server was started with (it holds tokenizer.json or "
                         "tokenizer_config.json)") from exc


@dataclass(frozen=True)
class Sample:
    """One prompt and what its answer must contain.

    Attributes:
        task: task name, a key of :data:`TASKS`.
        length: requested context length in tokens.
        index: sample number within (task, length).
        prompt: the text sent to the server (as the completion prompt or the user message).
        answers: expected strings, as the tokenizer decodes them (e.g. ``"9 3 8"`` for a tokenizer
            that splits digits); the scoring rule looks for them in the output.
        num_tokens: tokens of ``prompt`` without special tokens (``<= length``); the server adds
            its BOS token and, for chat requests, the chat template.
        max_tokens: generation budget of the request.
        metric: scoring rule, a key of :data:`rtpurbo_vllm.eval.scoring.METRICS`.
        meta: task details (needle depths in [0, 1], queried keys, word frequencies).
    """

    task: str
    length: int
    index: int
    prompt: str
    answers: tuple[str, ...]
    num_tokens: int
    max_tokens: int
    metric: str = "recall_all"
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Templates:
    """The text around the generated content, and how keys, values and names look.

    ``niah_*`` and ``vt_*`` fields are format strings; ``cwe_*``/``fwe_*`` are ``None`` where the
    template set cannot phrase the task (``terse``).
    """

    name: str
    niah_intro: str
    niah_needle: str
    niah_question_one: str
    niah_question_many: str
    key_separator: str
    last_key_separator: str
    key_words: int
    """Words per NIAH key, joined by ``-``; 0 makes keys ``key_digits`` digits. Single-word keys
    come from the word source's key pool when it has one, else from the filler words, and then
    never appear as filler."""
    key_digits: int
    value_digits: int
    vt_intro: str
    vt_first: str
    vt_hop: str
    vt_question: str
    var_letters: int
    """Upper-case letters per variable name; 0 draws names from the word pool."""
    vt_value_digits: int
    cwe_intro: str | None = None
    cwe_question: str | None = None
    fwe_intro: str | None = None
    fwe_question: str | None = None
    budgets: tuple[tuple[str, int], ...] = ()
    """``(task, max_tokens)`` generation budgets replacing the task's RULER budget."""

    def budget(self, task: str, default: int) -> int:
        return dict(self.budgets).get(task, default)

    def join_keys(self, keys: Sequence[str]) -> str:
        """``a``, ``a and b`` style lists of keys for a question."""
        if len(keys) == 1:
            return keys[0]
        return self.key_separator.join(keys[:-1]) + self.last_key_separator + keys[-1]

    def probe(self) -> str:
        """Every template filled with example values: the tokenizer must round-trip this text."""
        key = "-".join(["apple"] * self.key_words) if self.key_words else "0123456789"
        name = "QWERT" if self.var_letters else ""      # word names come from the checked word pool
        parts = [self.niah_intro, self.niah_needle.format(key=key, value="1234567890"),
                 self.niah_question_one.format(keys=key),
                 self.niah_question_many.format(keys=self.join_keys([key, key, key])),
                 self.vt_intro, self.vt_first.format(name=name, value="98765"),
                 self.vt_hop.format(name=name, prev=name), self.vt_question.format(value="98765", count=5)]
        if self.cwe_intro is not None:
            parts += [self.cwe_intro, "1. apple 2. apple", self.cwe_question.format(count=10), self.fwe_intro,
                      self.fwe_question]
        return " ".join(parts)


RULER_TEMPLATES = Templates(
    name="ruler",
    niah_intro="Some special magic numbers are hidden within the following text. Make sure to memorize it. "
               "I will quiz you about the numbers afterwards.\n",
    niah_needle="One of the special magic numbers for {key} is: {value}.",
    niah_question_one="\nWhat is the special magic number for {keys} mentioned in the provided text? "
                      "The special magic number for {keys} mentioned in the provided text is",
    niah_question_many="\nWhat are all the special magic numbers for {keys} mentioned in the provided text? "
                       "The special magic numbers for {keys} mentioned in the provided text are",
    key_separator=", ", last_key_separator=", and ", key_words=2, key_digits=0, value_digits=7,
    vt_intro="Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n",
    vt_first="VAR {name} = {value}.",
    vt_hop="VAR {name} = VAR {prev}.",
    vt_question="\nQuestion: Find all variables that are assigned the value {value} in the text above. "
                "Answer: According to the chain(s) of variable assignment in the text above, {count} "
                "variables are assigned the value {value}, they are:",
    var_letters=5, vt_value_digits=5,
    cwe_intro="Below is a numbered list of words. In these words, some appear more often than others. "
              "Memorize the ones that appear most often.\n",
    cwe_question="\nQuestion: What are the {count} most common words in the above list? Answer: The top "
                 "{count} words that appear most often in the list are:",
    fwe_intro="Read the following text and track the frequency of each word. Find the three most "
              "frequently appeared words.\n",
    fwe_question="\nQuestion: Do not provide any explanation. What are the three most frequently appeared "
                 "words in the above text? Answer: According to the text above, the three most frequently "
                 "appeared words are:",
)

TERSE_TEMPLATES = Templates(
    # The needle format of the tiny model (rtpurbo_vllm.tiny.task.pair_span / query_span): a one-word
    # key, its value right after it, and a question that ends on the key, answered by the value.
    name="terse",
    niah_intro="",
    niah_needle="key {key} {value} .",
    niah_question_one=" query key {keys}",
    niah_question_many=" query key {keys}",
    key_separator=" , key ", last_key_separator=" , key ", key_words=1, key_digits=0, value_digits=3,
    vt_intro="",
    vt_first="key {name} : value {value} .",
    vt_hop="key {name} : value {prev} .",
    vt_question=" query value {value} : key",
    var_letters=0, vt_value_digits=3,
    # No answer prefix: the value is the first thing generated (4 tokens each with its "." under a
    # digit-splitting tokenizer); a short budget keeps later filler from matching by chance.
    budgets=(("niah_single", 8), ("niah_multikey", 8), ("niah_multivalue", 24), ("niah_multiquery", 24)),
)


@dataclass(frozen=True)
class _Draft:
    """A sample before sizing: ``render(n)`` is the prompt with ``n`` units of content (filler
    words, list items), deterministic in ``n``, with more tokens for larger ``n``."""

    render: Callable[[int], str]
    answers: Sequence[str]
    max_units: int
    meta: dict[str, Any]
    check: Callable[[int], None] | None = None
    """Called with the chosen ``n``; raises ``ValueError`` when the sample is ill-posed at that size."""


@dataclass(frozen=True)
class TaskSpec:
    """A task: how to draft a sample and its RULER generation budget."""

    name: str
    description: str
    max_tokens: int
    draft: Callable[["TaskGenerator", random.Random, str, int], _Draft]
    """``(generator, rng, filler_seed, length) -> _Draft``."""
    needs_ruler: bool = False
    """The task's instructions exist only in English (``ruler`` templates)."""


class TaskGenerator:
    """Builds :class:`Sample` s sized in tokens of ``tokenizer``.

    Args:
        tokenizer: a Hugging Face tokenizer (the served model's).
        vocab: where words come from: ``builtin`` (the built-in English list), ``tokenizer`` (whole
            lower-case words of the tokenizer's vocabulary), ``tiny`` (the tiny model's: keys and
            variable names from its key words, filler from its skip-bigram generator; only for its
            tokenizer) or ``auto`` (``tiny`` for the tiny model's tokenizer, else ``builtin`` when
            the tokenizer round-trips nearly all of it, else ``tokenizer``). Either way only words
            the tokenizer encodes without ``<unk>`` and decodes back unchanged are kept.
        template: ``ruler``, ``terse`` or ``auto`` (``ruler`` when the tokenizer round-trips its
            English text, else ``terse``).

    Raises:
        ValueError: the tokenizer cannot encode the chosen templates, or offers fewer than
            :data:`MIN_LEXICON` usable words.
    """

    def __init__(self, tokenizer, *, vocab: str = "auto", template: str = "auto"):
        if vocab not in VOCAB_CHOICES:
            raise ValueError(f"vocab={vocab!r}; fix: one of {', '.join(VOCAB_CHOICES)}")
        if template not in TEMPLATE_CHOICES:
            raise ValueError(f"template={template!r}; fix: one of {', '.join(TEMPLATE_CHOICES)}")
        self.tokenizer = tokenizer
        self.templates = self._pick_templates(template)
        self.vocab, self.lexicon = self._pick_lexicon(vocab)
        self.key_pool: list[str] | None = None
        """Words reserved for single-word keys and variable names (never filler), or ``None``:
        then those come from :attr:`lexicon` and are left out of the filler around them."""
        if self.vocab == "tiny":
            from rtpurbo_vllm.tiny.tokenizer import KEY_WORDS

            self.key_pool = self._keep_round_trips(list(KEY_WORDS))

    # -- tokenizer helpers ------------------------------------------------------------------
    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]

    def count(self, text: str) -> int:
        """Tokens of ``text`` without special tokens."""
        return len(self._encode([text])[0])

    def canonical(self, text: str) -> str:
        """``text`` as the tokenizer decodes its encoding, whitespace collapsed (``"938"`` becomes
        ``"9 3 8"`` under a digit-splitting word-level tokenizer)."""
        ids = self._encode([text])[0]
        return " ".join(self.tokenizer.decode(ids, skip_special_tokens=True,
                                              clean_up_tokenization_spaces=False).split())

    def _round_trips(self, texts: list[str]) -> list[bool]:
        """Per text: encoded without ``<unk>`` and decoded to the same characters (whitespace aside)."""
        unk = self.tokenizer.unk_token_id
        out = []
        for text, ids in zip(texts, self._encode(texts)):
            back = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            out.append((unk is None or unk not in ids) and "".join(back.split()) == "".join(text.split()))
        return out

    def _pick_templates(self, template: str) -> Templates:
        order = {"auto": [RULER_TEMPLATES, TERSE_TEMPLATES], "ruler": [RULER_TEMPLATES],
                 "terse": [TERSE_TEMPLATES]}[template]
        for candidate in order:
            if self._round_trips([candidate.probe()])[0]:
                return candidate
        fix = ("--template auto" if template != "auto" else
               "a tokenizer whose vocabulary holds at least key, value, query, the digits and ': . ,'")
        raise ValueError(f"the tokenizer cannot encode the {'/'.join(t.name for t in order)} task templates "
                         f"losslessly (some of their words become <unk> or change); fix: {fix}")

    def is_tiny_tokenizer(self) -> bool:
        """The tokenizer has exactly the tiny model's vocabulary (:mod:`rtpurbo_vllm.tiny.tokenizer`)."""
        from rtpurbo_vllm.tiny.tokenizer import TOKEN_ID

        return self.tokenizer.get_vocab() == TOKEN_ID

    def _pick_lexicon(self, vocab: str) -> tuple[str, list[str]]:
        if vocab == "auto" and self.is_tiny_tokenizer():
            vocab = "tiny"
        if vocab == "tiny":
            if not self.is_tiny_tokenizer():
                raise ValueError("--vocab tiny needs the tiny model's tokenizer (rtpurbo_vllm/tiny/model); "
                                 "fix: --vocab auto")
            from rtpurbo_vllm.tiny.tokenizer import FILLER_WORDS

            return vocab, self._keep_round_trips(list(FILLER_WORDS))
        kept = []
        if vocab != "tokenizer":
            builtin = [w for w in BUILTIN_WORDS if w not in MARKER_WORDS]
            kept = self._keep_round_trips(builtin)
            if vocab == "auto":
                vocab = "builtin" if len(kept) >= 0.95 * len(builtin) else "tokenizer"
        if vocab == "tokenizer":
            kept = self._tokenizer_words()
        if len(kept) < MIN_LEXICON:
            raise ValueError(f"only {len(kept)} words of the {vocab} vocabulary round-trip through the "
                             f"tokenizer (at least {MIN_LEXICON} are needed); fix: "
                             f"{'--vocab tokenizer' if vocab == 'builtin' else '--vocab builtin'}")
        return vocab, kept

    def _tokenizer_words(self) -> list[str]:
        """Sorted lower-case ASCII words (2 to 12 letters) that are single vocabulary entries and
        round-trip, markers excluded."""
        words = set()
        for token in self.tokenizer.get_vocab():
            word = self.tokenizer.convert_tokens_to_string([token]).strip()
            if 2 <= len(word) <= 12 and word.isascii() and word.isalpha() and word.islower():
                words.add(word)
        return self._keep_round_trips(sorted(words - MARKER_WORDS))

    def _keep_round_trips(self, words: list[str]) -> list[str]:
        """The ``words`` the tokenizer round-trips after a space (as they appear in running text)."""
        return [w for w, ok in zip(words, self._round_trips([" " + w for w in words])) if ok]

    # -- samples ------------------------------------------------------------------------------
    def sample(self, task: str, length: int, index: int, seed: int) -> Sample:
        """Sample ``index`` of ``task`` at ``length`` tokens; the same arguments give the same sample.

        Raises:
            ValueError: unknown task, a task the template set cannot phrase, or a ``length`` too
                short for the task's fixed text.
        """
        spec = _task_spec(task)
        if spec.needs_ruler and self.templates.name != "ruler":
            raise ValueError(f"task {task} needs the ruler (English) templates and this run uses the "
                             f"{self.templates.name} ones; fix: leave {task} out of --tasks, or use "
                             "--template auto with a tokenizer that encodes English")
        tag = f"rtpurbo-eval/{seed}/{task}/{length}/{index}"
        draft = spec.draft(self, random.Random(tag), tag + "/filler", length)
        text, num_tokens, units = _fit(draft.render, self.count, length, draft.max_units, task)
        if draft.check is not None:
            draft.check(units)
        return Sample(task=task, length=length, index=index, prompt=text,
                      answers=tuple(self.canonical(a) for a in draft.answers), num_tokens=num_tokens,
                      max_tokens=self.templates.budget(task, spec.max_tokens), meta=draft.meta)

    def generate(self, tasks: Sequence[str], lengths: Sequence[int], num_samples: int, seed: int,
                 progress: bool = False) -> list[Sample]:
        """``num_samples`` samples per (task, length), ordered by task, then length, then index."""
        from tqdm import tqdm

        keys = [(t, n, i) for t in tasks for n in lengths for i in range(num_samples)]
        return [self.sample(t, n, i, seed) for t, n, i in tqdm(keys, desc="generating", unit="sample",
                                                               disable=not progress)]

    def default_tasks(self) -> tuple[str, ...]:
        """The tasks run when none are named: those the tiny model is trained for with the ``tiny``
        word source, else every task the template set can phrase."""
        if self.vocab == "tiny":
            return TINY_TASKS
        return tuple(name for name, spec in TASKS.items() if self.templates.name == "ruler" or not spec.needs_ruler)

    def describe(self) -> dict[str, Any]:
        """Template set, word source and pool sizes, for the report's environment block."""
        return {"template": self.templates.name, "vocab": self.vocab, "num_words": len(self.lexicon),
                "num_key_words": len(self.key_pool) if self.key_pool is not None else None,
                "filler": "skip-bigram" if self.vocab == "tiny" else "uniform",
                "tokenizer_class": type(self.tokenizer).__name__}

    # -- pieces shared by the drafts ----------------------------------------------------------
    def haystack(self, filler_seed: str, n: int, needles: Sequence[str], depths: Sequence[float],
                 exclude: frozenset[str] = frozenset()) -> str:
        """``n`` filler words (some ending a sentence with ``.``) with ``needles`` inserted between
        sentences at relative ``depths`` (sorted, in [0, 1]); the first ``k`` words are the same for
        every ``n >= k``. Words in ``exclude`` never appear as filler.

        The ``tiny`` word source draws the tiny model's skip-bigram filler instead, where ``.`` is a
        word of its own (its keys are never filler, so ``exclude`` has nothing to remove)."""
        rng = random.Random(filler_seed)
        if self.vocab == "tiny":
            from rtpurbo_vllm.tiny.task import filler_words

            words = filler_words(rng, n)
        else:
            pool = [w for w in self.lexicon if w not in exclude]
            words = [rng.choice(pool) + ("." if rng.random() < SENTENCE_END_P else "") for _ in range(n)]
        pieces, start = [], 0
        for needle, depth in zip(needles, depths):
            at = max(start, int(depth * n))
            while 0 < at < n and not words[at - 1].endswith("."):
                at += 1
            pieces += words[start:at] + [needle]
            start = at
        return " ".join(pieces + words[start:])

    def digits(self, rng: random.Random, n: int, leading_zero: bool) -> str:
        """A random ``n``-digit number as text."""
        first = rng.choice(string.digits if leading_zero else string.digits[1:])
        return first + "".join(rng.choice(string.digits) for _ in range(n - 1))

    def distinct(self, make: Callable[[], str], n: int) -> list[str]:
        """``n`` distinct results of ``make()`` in draw order."""
        out: dict[str, None] = {}
        for _ in range(1000 * n):
            out[make()] = None
            if len(out) == n:
                return list(out)
        raise AssertionError(f"could not draw {n} distinct values")


def _fit(render: Callable[[int], str], count: Callable[[str], int], target: int, max_units: int,
         task: str) -> tuple[str, int, int]:
    """``(text, tokens, n)`` for the largest ``n <= max_units`` with ``count(render(n)) <= target``.

    Token counts grow almost linearly in ``n``, so secant steps land within a few units in two or
    three encodings; bisection takes over if they stall. ``count`` is assumed non-decreasing in ``n``.

    Raises:
        ValueError: the fixed text alone exceeds ``target``, or ``max_units`` units stay below it.
    """
    lo_text = render(0)
    base = lo_tokens = count(lo_text)
    lo = 0
    if base > target:
        raise ValueError(f"task {task} needs more than {target} tokens (its fixed text alone has {base}); "
                         f"fix: ask for longer --lengths")
    hi = max_units + 1                      # smallest n known to be too long (or beyond the cap)
    n = min(max_units, max(1, target - base))
    for step in range(64):
        if hi - lo <= 1:
            break
        text = render(n)
        tokens = count(text)
        if tokens <= target:
            lo, lo_text, lo_tokens = n, text, tokens
        else:
            hi = n
        guess = n + round((target - tokens) * n / max(tokens - base, 1)) if step < 8 else (lo + hi) // 2
        n = min(max(guess, lo + 1), hi - 1)
    if lo == max_units:
        raise ValueError(f"task {task} cannot fill {target} tokens with its word pool (at most {lo_tokens}); "
                         f"fix: --vocab tokenizer (a larger pool) or shorter --lengths")
    return lo_text, lo_tokens, lo


# -- drafts --------------------------------------------------------------------------------------
def _niah(num_keys: int, num_values: int, num_queries: int) -> Callable[..., _Draft]:
    """Needle-in-a-haystack with ``num_keys`` keys of ``num_values`` values each, ``num_queries``
    of them asked (RULER's niah_* settings)."""

    def draft(gen: TaskGenerator, rng: random.Random, filler_seed: str, length: int) -> _Draft:
        t = gen.templates
        if t.key_words == 1:
            keys = rng.sample(gen.key_pool or gen.lexicon, num_keys)
        elif t.key_words:
            keys = gen.distinct(lambda: "-".join(rng.sample(gen.lexicon, t.key_words)), num_keys)
        else:
            keys = gen.distinct(lambda: gen.digits(rng, t.key_digits, leading_zero=True), num_keys)
        values = gen.distinct(lambda: gen.digits(rng, t.value_digits, leading_zero=False), num_keys * num_values)
        needles = [(k, values[i * num_values + j]) for i, k in enumerate(keys) for j in range(num_values)]
        rng.shuffle(needles)
        depths = sorted(rng.random() for _ in needles)
        queried = rng.sample(keys, num_queries)
        answers = [v for k, v in needles if k in queried]
        question = (t.niah_question_one if len(answers) == 1 else t.niah_question_many).format(
            keys=t.join_keys(queried))
        texts = [t.niah_needle.format(key=k, value=v) for k, v in needles]
        exclude = frozenset(keys) if t.key_words == 1 else frozenset()
        return _Draft(render=lambda n: t.niah_intro + gen.haystack(filler_seed, n, texts, depths, exclude) + question,
                      answers=answers, max_units=4 * length + 64,
                      meta={"depths": [round(d, 4) for d in depths], "queried_keys": queried})

    return draft


def _vt(num_hops: int) -> Callable[..., _Draft]:
    """Variable tracking: one chain of ``num_hops`` re-assignments of a number (RULER's vt)."""

    def draft(gen: TaskGenerator, rng: random.Random, filler_seed: str, length: int) -> _Draft:
        t = gen.templates
        if t.var_letters:
            names = gen.distinct(lambda: "".join(rng.choices(string.ascii_uppercase, k=t.var_letters)),
                                 num_hops + 1)
        else:
            names = rng.sample(gen.key_pool or gen.lexicon, num_hops + 1)
        value = gen.digits(rng, t.vt_value_digits, leading_zero=False)
        texts = [t.vt_first.format(name=names[0], value=value)]
        texts += [t.vt_hop.format(name=b, prev=a) for a, b in zip(names, names[1:])]
        depths = sorted(rng.random() for _ in texts)
        question = t.vt_question.format(value=value, count=len(names))
        exclude = frozenset(names)
        return _Draft(render=lambda n: t.vt_intro + gen.haystack(filler_seed, n, texts, depths, exclude)
                      + question, answers=names, max_units=4 * length + 64,
                      meta={"depths": [round(d, 4) for d in depths]})

    return draft


def _cwe(num_common: int, freq_common: int, freq_uncommon: int) -> Callable[..., _Draft]:
    """Common-words extraction (RULER's cwe): ``num_common`` words appear ``freq_common`` times in a
    numbered list, the others ``freq_uncommon`` times; the unit of length is one list item of an
    uncommon word. Where the word pool is too small for that, uncommon words repeat more often and
    the common ones grow to at least twice the most any uncommon word can reach at this length."""

    def draft(gen: TaskGenerator, rng: random.Random, filler_seed: str, length: int) -> _Draft:
        t = gen.templates
        pool = rng.sample(gen.lexicon, len(gen.lexicon))
        common, uncommon = pool[:num_common], pool[num_common:]
        # A list item ("17. word") has at least 2 tokens, so at most length // 2 items fit.
        f_unc = max(freq_uncommon, math.ceil(length / 2 / len(uncommon)))
        f_com = max(freq_common, 2 * f_unc)

        def render(n: int) -> str:
            distinct = max(1, min(len(uncommon), math.ceil(n / freq_uncommon)))
            words = common * f_com + [uncommon[i % distinct] for i in range(n)]
            random.Random(f"{filler_seed}/{n}").shuffle(words)
            items = " ".join(f"{i}. {w}" for i, w in enumerate(words, 1))
            return t.cwe_intro + items + t.cwe_question.format(count=num_common)

        return _Draft(render=render, answers=common, max_units=len(uncommon) * f_unc,
                      meta={"freq_common": f_com, "max_freq_uncommon": f_unc})

    return draft


def _fwe(num_answers: int, alpha: float) -> Callable[..., _Draft]:
    """Frequent-words extraction (RULER's fwe): words with Zipf(``alpha``) counts, exactly
    apportioned; the ``num_answers`` most frequent are asked. The unit of length is one word."""

    def draft(gen: TaskGenerator, rng: random.Random, filler_seed: str, length: int) -> _Draft:
        t = gen.templates
        ranked = rng.sample(gen.lexicon, len(gen.lexicon))
        weights = [1.0 / (r ** alpha) for r in range(1, len(ranked) + 1)]
        total = sum(weights)

        def counts(n: int) -> list[int]:
            c = [math.floor(n * w / total) for w in weights]
            for r in range(n - sum(c)):         # the remainder goes to the top ranks: still non-increasing
                c[r] += 1
            return c

        def render(n: int) -> str:
            words = [w for w, k in zip(ranked, counts(n)) for _ in range(k)]
            random.Random(f"{filler_seed}/{n}").shuffle(words)
            return t.fwe_intro + " ".join(words) + t.fwe_question

        def check(n: int) -> None:
            c = counts(n)
            if c[num_answers - 1] <= c[num_answers]:
                raise ValueError(f"task fwe at {length} tokens has no clear top {num_answers} words; fix: "
                                 "ask for longer --lengths")

        return _Draft(render=render, answers=ranked[:num_answers], max_units=4 * length + 64, check=check,
                      meta={"alpha": alpha})

    return draft


TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec("niah_single", "one needle; recall its value", 128, _niah(1, 1, 1)),
    TaskSpec("niah_multikey", "four needles with different keys; recall the value of one", 128, _niah(4, 1, 1)),
    TaskSpec("niah_multivalue", "four values of one key; recall all four", 128, _niah(1, 4, 1)),
    TaskSpec("niah_multiquery", "four needles; recall the values of all four keys", 128, _niah(4, 1, 4)),
    TaskSpec("vt", "a chain of four re-assignments; name every variable bound to the value", 30, _vt(4)),
    TaskSpec("cwe", "numbered word list; the ten most common words", 120, _cwe(10, 30, 3), needs_ruler=True),
    TaskSpec("fwe", "Zipf-distributed words; the three most frequent", 50, _fwe(3, 2.0), needs_ruler=True),
)}


def _task_spec(task: str) -> TaskSpec:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; fix: one of {', '.join(TASKS)}")
    return TASKS[task]
