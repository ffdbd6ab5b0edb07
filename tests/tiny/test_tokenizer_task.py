"""The tiny model's tokenizer and task generator (fast, no model needed)."""

import random

import pytest

from rtpurbo_vllm.tiny.task import (PAIR_LEN, QUERY_LEN, TARGET_ANSWER, TARGET_ECHO, TARGET_FILLER,
                                    VALUE_DIGITS, filler_targets, make_probe, make_prompt,
                                    make_training_example, score)
from rtpurbo_vllm.tiny.tokenizer import (BOS_ID, FILLER_WORDS, KEY_WORDS, TOKEN_ID, UNK_ID, VOCAB,
                                         build_tokenizer)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_vocab_is_small_and_covers_the_task(tok):
    assert 100 < len(VOCAB) < 500
    assert not set(KEY_WORDS) & set(FILLER_WORDS)
    assert len(tok) == len(VOCAB)
    for word in [*"0123456789", "key", "query", ".", *KEY_WORDS]:
        assert word in TOKEN_ID


def test_round_trip(tok, seed):
    prompt = make_prompt(seed, context_len=300, n_pairs=3)
    ids = tok.encode(prompt.text)
    assert prompt.text.startswith(VOCAB[prompt.ids[1]]) and "<s>" not in prompt.text
    assert ids == prompt.ids                      # text -> ids gives the generator's ids (<s> added)
    assert tok.decode(ids, skip_special_tokens=True) == prompt.text
    assert UNK_ID not in ids


def test_tokenizer_splits_digits_and_punctuation(tok):
    assert tok.encode("Key Sigma 938.") == tok.encode("key sigma 9 3 8 .")
    assert tok.decode(tok.encode("query key sigma 9 3 8 ."), skip_special_tokens=True) \
        == "query key sigma 9 3 8 ."
    assert tok.encode("zebra")[1:] == [UNK_ID]


def test_saved_tokenizer_loads_with_auto(tmp_path, tok):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "the cat key alfa 3 4 5 ."
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.bos_token_id == BOS_ID and loaded.eos_token == "</s>" and loaded.pad_token == "<pad>"


def test_prompt_is_deterministic_and_well_formed(seed):
    a, b = make_prompt(seed, 1024, 6), make_prompt(seed, 1024, 6)
    assert a == b
    assert make_prompt(seed + 1, 1024, 6) != a
    assert len(a.ids) == 1024 and a.ids[0] == BOS_ID
    assert a.text.split()[-3:-1] == ["query", "key"] and len(a.answer) == VALUE_DIGITS
    key = a.ids[-1]                               # the queried key word
    pair = a.ids[a.pair_start:a.pair_start + PAIR_LEN]
    assert pair[:2] == [TOKEN_ID["key"], key] and pair[2:2 + VALUE_DIGITS] == a.answer
    assert a.ids.count(key) == 2                  # keys are distinct and never filler
    assert sum(1 for i in a.ids if i == TOKEN_ID["key"]) == 6 + 1


def test_min_distance_puts_the_pair_far_back(seed):
    for k in range(10):
        p = make_prompt(seed + k, 2048, 8, min_distance=1000)
        keys = [t for t, i in enumerate(p.ids[:-QUERY_LEN]) if i == TOKEN_ID["key"]]
        assert p.pair_start in keys
        far = [t for t in keys if len(p.ids) - 1 - t >= 1000]
        assert p.distance >= 1000 if far else p.pair_start == keys[0]


def test_training_example(seed):
    ids, targets = make_training_example(random.Random(seed), 512, 6, 5)
    assert (ids, targets) == make_training_example(random.Random(seed), 512, 6, 5)
    assert len(ids) == len(targets) == 512 and ids[0] == BOS_ID
    assert targets.count(TARGET_ANSWER) == 5 * (VALUE_DIGITS + 1)
    assert TARGET_ECHO not in targets
    for t in (t for t, m in enumerate(targets) if m == TARGET_ANSWER != targets[t - 1]):
        assert VOCAB[ids[t - 2]] == "key" and VOCAB[ids[t - 3]] == "query"


def test_probe_has_two_identical_copies(seed):
    probe = make_probe(seed, 1024)
    assert probe == make_probe(seed, 1024)
    assert len(probe.ids) == 1024
    first = probe.ids[probe.first.start:probe.first.stop]
    assert first == probe.ids[probe.second.start:probe.second.stop]
    assert probe.first.start >= 4 and probe.second.stop <= 1024 and probe.first.stop < probe.second.start


def test_score():
    assert score([5, 6, 7], [5, 6, 7, 2])
    assert not score([5, 6, 7], [5, 6])
    assert not score([5, 6, 7], [5, 7, 6])
    assert score("9 3 8", " 9 3 8 . the")
    assert score("9 3 8", "938")
    assert not score("9 3 8", "9 3 9")
    assert not score("", "")
    with pytest.raises(TypeError):
        score("9 3 8", [1, 2, 3])


def test_training_example_echoes(seed):
    ids, targets = make_training_example(random.Random(seed), 512, 3, 3, n_echoes=2)
    assert len(ids) == len(targets) == 512
    n_echo_targets = targets.count(TARGET_ECHO)
    assert 2 * 5 <= n_echo_targets <= 2 * 19    # each echo repeat: all but its first token


def test_filler_follows_the_skip_bigram_rule(seed):
    prompt = make_prompt(seed, 2048, 4)
    rule = filler_targets(prompt.ids)
    assert sum(rule) > 0.7 * len(prompt.ids)    # most filler is predictable from two tokens back
    ids, targets = make_training_example(random.Random(seed), 512, 2, 2)
    assert all((k == TARGET_FILLER) <= r for k, r in zip(targets, filler_targets(ids)))
