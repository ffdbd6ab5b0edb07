"""Task generation (rtpurbo_vllm.eval.tasks): deterministic per seed, sized in real tokenizer tokens,
answers that the prompt actually supports, and the restricted-vocabulary path of the tiny model.

Two tokenizers are built here with the ``tokenizers`` library, saved and loaded back through
``load_tokenizer`` (the ``--tokenizer`` path): a byte-level BPE that round-trips any text (ruler
templates, built-in words) and a word-level tokenizer with a small fixed vocabulary that splits
digits, like the tiny model's (terse templates, words from its vocabulary).
"""

import random
import re
from collections import Counter
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rtpurbo_vllm.eval.tasks import (MARKER_WORDS, RULER_TEMPLATES, TASKS, TaskGenerator, _fit,
                                     load_tokenizer)
from rtpurbo_vllm.eval.words import BUILTIN_WORDS

TOLERANCE = 8          # a prompt has between length - TOLERANCE and length tokens
TINY_TOKENIZER = Path(__file__).parents[2] / "rtpurbo_vllm" / "tiny" / "model" / "tokenizer.json"
WORD_TASKS = ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt"]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A byte-level BPE (1500 ids) trained on built-in words and the ruler templates, loaded from disk."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    corpus = [" ".join(rng.sample(BUILTIN_WORDS, 50)) for _ in range(200)] + [RULER_TEMPLATES.probe()] * 5
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=1500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|eos|>"]))
    path = tmp_path_factory.mktemp("bpe")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>").save_pretrained(path)
    return load_tokenizer(str(path))


@pytest.fixture(scope="module")
def words_only(tmp_path_factory):
    """A lower-casing word-level tokenizer: specials, digits (split one by one), the terse markers and
    150 filler words (a third of them outside the built-in list); decoding joins tokens with spaces."""
    filler = list(BUILTIN_WORDS[:100]) + [f"zz{c}{d}" for c in "abcde" for d in "abcdefghij"]
    vocab = ["<pad>", "<s>", "</s>", "<unk>", *"0123456789", "key", "value", "query", ":", ".", ",", *filler]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    path = tmp_path_factory.mktemp("words")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(path)
    return load_tokenizer(str(path))


def test_builtin_words_are_unique_plain_words():
    assert len(set(BUILTIN_WORDS)) == len(BUILTIN_WORDS) >= 1000
    assert all(w.isascii() and w.isalpha() and w.islower() for w in BUILTIN_WORDS)
    assert not MARKER_WORDS & set(BUILTIN_WORDS)


@pytest.mark.parametrize("task", list(TASKS))
def test_samples_hit_the_length_and_repeat_per_seed(bpe, task):
    gen = TaskGenerator(bpe)
    assert gen.describe()["template"] == "ruler" and gen.describe()["vocab"] == "builtin"
    for length in (2048, 5001):
        s = gen.sample(task, length, index=3, seed=11)
        assert length - TOLERANCE <= s.num_tokens <= length
        assert s.num_tokens == len(bpe(s.prompt, add_special_tokens=False)["input_ids"])
        assert s == TaskGenerator(bpe).sample(task, length, index=3, seed=11)
        assert s.prompt != gen.sample(task, length, index=3, seed=12).prompt
        assert s.prompt != gen.sample(task, length, index=4, seed=11).prompt


def test_niah_needles_hold_the_answers(bpe):
    gen = TaskGenerator(bpe)
    for task, num_answers in [("niah_single", 1), ("niah_multikey", 1), ("niah_multivalue", 4),
                              ("niah_multiquery", 4)]:
        s = gen.sample(task, 3000, 0, seed=1)
        needles = re.findall(r"special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.", s.prompt)
        asked = re.search(r"numbers? for (.*) mentioned", s.prompt).group(1)
        assert len(needles) == {"niah_single": 1, "niah_multivalue": 4}.get(task, 4)
        assert sorted(s.answers) == sorted(v for k, v in needles if k in asked) and len(s.answers) == num_answers
        assert s.meta["depths"] == sorted(s.meta["depths"]) and len(s.meta["depths"]) == len(needles)


def test_vt_chain_binds_every_answer_to_the_value(bpe):
    s = TaskGenerator(bpe).sample("vt", 3000, 0, seed=2)
    bound = {a: b for a, b in re.findall(r"VAR ([A-Z]{5}) = ([0-9]+|VAR [A-Z]{5})\.", s.prompt)}
    value = re.search(r"assigned the value (\d+)", s.prompt).group(1)

    def resolve(name):
        rhs = bound[name]
        return resolve(rhs[4:]) if rhs.startswith("VAR ") else rhs

    assert sorted(s.answers) == sorted(n for n in bound if resolve(n) == value) and len(s.answers) == 5


def test_cwe_and_fwe_answers_are_the_most_frequent_words(bpe):
    gen = TaskGenerator(bpe)
    cwe = gen.sample("cwe", 6000, 0, seed=3)
    counts = Counter(re.findall(r"\d+\. ([a-z]+)", cwe.prompt.split("\n")[1]))
    top = [w for w, _ in counts.most_common(10)]
    assert sorted(top) == sorted(cwe.answers)
    assert min(counts[w] for w in top) >= 2 * max(c for w, c in counts.items() if w not in top)
    fwe = gen.sample("fwe", 6000, 0, seed=3)
    counts = Counter(fwe.prompt.split("\n")[1].split())
    (_, c3), (_, c4) = counts.most_common(4)[2:]
    assert [w for w, _ in counts.most_common(3)] == list(fwe.answers) and c3 > c4


def test_restricted_vocabulary_uses_terse_templates_and_its_own_words(words_only):
    gen = TaskGenerator(words_only)
    assert gen.describe()["template"] == "terse" and gen.describe()["vocab"] == "tokenizer"
    assert set(gen.lexicon) <= set(words_only.get_vocab()) - MARKER_WORDS
    for task in WORD_TASKS:
        for length in (777, 2048):
            s = gen.sample(task, length, 0, seed=5)
            ids = words_only(s.prompt, add_special_tokens=False)["input_ids"]
            assert length - TOLERANCE <= s.num_tokens == len(ids) <= length
            assert words_only.unk_token_id not in ids
            assert all(re.fullmatch(r"\d \d \d|[a-z]+", a) for a in s.answers)     # as the tokenizer decodes
            assert s == gen.sample(task, length, 0, seed=5)
    assert gen.default_tasks() == tuple(WORD_TASKS) and gen.key_pool is None
    s = gen.sample("niah_multikey", 2048, 1, seed=5)
    decoded = words_only.decode(words_only(s.prompt, add_special_tokens=False)["input_ids"])
    key = re.search(r"query key ([a-z]+)$", decoded).group(1)
    assert key in gen.lexicon and f"key {key} {s.answers[0]} ." in decoded
    assert decoded.split().count(key) == 2              # the needle and the question: never filler
    assert len(re.findall(r"key [a-z]+ \d \d \d \.", decoded)) == 4 and s.max_tokens == 8


def test_restricted_vocabulary_rejects_what_it_cannot_phrase(words_only):
    gen = TaskGenerator(words_only)
    for task in ("cwe", "fwe"):
        with pytest.raises(ValueError, match="ruler"):
            gen.sample(task, 2048, 0, seed=0)
    with pytest.raises(ValueError, match="--template auto"):
        TaskGenerator(words_only, template="ruler")
    assert TaskGenerator(words_only, vocab="builtin").describe()["num_words"] == 100
    with pytest.raises(ValueError, match="tiny model's tokenizer"):
        TaskGenerator(words_only, vocab="tiny")


def test_bad_requests_raise_value_errors(bpe):
    gen = TaskGenerator(bpe)
    with pytest.raises(ValueError, match="needs more than 64 tokens"):
        gen.sample("niah_single", 64, 0, seed=0)
    with pytest.raises(ValueError, match="unknown task"):
        gen.sample("niah", 1024, 0, seed=0)
    with pytest.raises(ValueError, match="vocab="):
        TaskGenerator(bpe, vocab="english")
    with pytest.raises(ValueError, match="cannot load a tokenizer"):
        load_tokenizer("/nonexistent/model")


def test_fit_finds_the_largest_size_under_the_target():
    text, tokens, units = _fit(lambda n: "x " * (n + 5), lambda t: len(t.split()), 1000, 10_000, "t")
    assert (tokens, units) == (1000, 995)
    text, tokens, units = _fit(lambda n: "x y " * n, lambda t: len(t.split()), 1001, 10_000, "t")
    assert (tokens, units) == (1000, 500)
    with pytest.raises(ValueError, match="cannot fill"):
        _fit(lambda n: "x " * n, lambda t: len(t.split()), 1000, 100, "t")


# -- the tiny model's task family --------------------------------------------------------------------
needs_tiny = pytest.mark.skipif(not TINY_TOKENIZER.exists(), reason="the tiny model is not trained in this checkout")


@pytest.fixture(scope="module")
def tiny_tok():
    return load_tokenizer(str(TINY_TOKENIZER.parent))


@needs_tiny
def test_tiny_model_tokenizer_gets_its_training_format(tiny_tok):
    """Auto settings give the tiny model's documents: ``key K d d d .`` pairs with K a key word, in
    skip-bigram filler without key words, and a prompt ending ``query key K``, answered ``d d d``."""
    from rtpurbo_vllm.tiny.task import KEY_WORDS, filler_targets, pair_span, query_span
    from rtpurbo_vllm.tiny.tokenizer import FILLER_WORDS, TOKEN_ID

    gen = TaskGenerator(tiny_tok)
    assert gen.describe() | {"tokenizer_class": None} == {
        "template": "terse", "vocab": "tiny", "num_words": len(FILLER_WORDS), "num_key_words": len(KEY_WORDS),
        "filler": "skip-bigram", "tokenizer_class": None}
    assert gen.default_tasks() == ("niah_single", "niah_multikey")
    keys = {TOKEN_ID[w] for w in KEY_WORDS}
    for task, num_pairs in (("niah_single", 1), ("niah_multikey", 4)):
        for length in (1024, 2048):
            s = gen.sample(task, length, 3, seed=9)
            ids = tiny_tok(s.prompt, add_special_tokens=False)["input_ids"]
            assert length - TOLERANCE <= s.num_tokens == len(ids) <= length and tiny_tok.unk_token_id not in ids
            assert s == TaskGenerator(tiny_tok).sample(task, length, 3, seed=9)
            assert s.prompt != gen.sample(task, length, 3, seed=10).prompt
            assert ids[-3:] == query_span(ids[-1]) and ids[-1] in keys
            starts = [t for t in range(len(ids) - 3) if ids[t] == TOKEN_ID["key"]]
            assert len(starts) == num_pairs and all(ids[t + 1] in keys for t in starts)
            pairs = {ids[t + 1]: ids[t + 2:t + 5] for t in starts}
            assert all(ids[t:t + 6] == pair_span(ids[t + 1], pairs[ids[t + 1]]) for t in starts)
            assert len(pairs) == num_pairs and (set(ids) & keys) == set(pairs)     # key words only in pairs
            assert s.answers == (tiny_tok.decode(pairs[ids[-1]]),) and re.fullmatch(r"\d \d \d", s.answers[0])
            assert s.max_tokens == 8
            filler = [t for t, i in enumerate(ids) if tiny_tok.convert_ids_to_tokens(i) in FILLER_WORDS]
            rule = filler_targets(ids)
            assert sum(rule[t] for t in filler) / len(filler) > 0.75        # the skip-bigram filler


@needs_tiny
def test_tiny_model_tokenizer_other_settings(tiny_tok):
    from rtpurbo_vllm.tiny.task import KEY_WORDS

    vt = TaskGenerator(tiny_tok).sample("vt", 1024, 0, seed=0)      # phrased, names from the key words
    assert 1024 - TOLERANCE <= vt.num_tokens and set(vt.answers) <= set(KEY_WORDS) and len(vt.answers) == 5
    plain = TaskGenerator(tiny_tok, vocab="tokenizer")                # uniform filler, keys from the lexicon
    assert plain.describe()["filler"] == "uniform" and plain.key_pool is None
    s = plain.sample("niah_single", 1024, 0, seed=0)
    key = s.prompt.split()[-1]
    assert 1024 - TOLERANCE <= s.num_tokens and s.prompt.split().count(key) == 2


@pytest.mark.skipif(not TINY_TOKENIZER.exists(), reason="the tiny model is not trained in this checkout")
def test_tiny_model_tokenizer():
    tok = load_tokenizer(str(TINY_TOKENIZER.parent))
    gen = TaskGenerator(tok)
    for task in ("niah_single", "niah_multikey", "vt"):
        s = gen.sample(task, 1024, 0, seed=0)
        assert 1024 - TOLERANCE <= s.num_tokens <= 1024
        assert tok.unk_token_id not in tok(s.prompt, add_special_tokens=False)["input_ids"]
