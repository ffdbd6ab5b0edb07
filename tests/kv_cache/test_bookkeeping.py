"""Block bookkeeping with vLLM's real KVCacheManager, coordinator and block pool.

Layout: HQ=8, HKV=2 (G=4), D=64, two layers, compact: two units per kind, one full and one window KV
head per unit, index units of 4 slots, so the full and window units have 16-token blocks and the
index units 32-token blocks (equal 4 KiB pages), window 64, 4 sink tokens (block 0 of the window
units), scheduler block 32, hash block 16.
"""

import pytest

from rtpurbo_vllm.head_layout import HeadLayout
from rtpurbo_vllm.kv_cache import KVLayout

WINDOW, SINK = 64, 4
FULL, WIN, IDX = "RTPurboFullSpec", "SinkWindowSpec", "RTPurboIndexSpec"


@pytest.fixture(scope="module")
def plan():
    layout = HeadLayout.from_lists(8, 2, [[0, 1, 2, 3], [0, 1, 2, 3]])
    plan = KVLayout.build(layout, head_size=64, window=WINDOW, sink_tokens=SINK)
    assert [(s.count, s.slots) for s in plan.units.values()] == [(2, 1), (2, 1), (2, 4)]
    assert (plan.blocks.full, plan.blocks.window, plan.blocks.index) == (16, 16, 32)
    return plan


@pytest.fixture
def engine(plan, make_config, kv):
    def make(num_blocks=1000, max_model_len=2048, **config):
        eng = kv.Engine(make_config(max_model_len, **config), kv.model_specs(plan), num_blocks)
        assert (eng.scheduler_block_size, eng.hash_block_size) == (32, 16)
        return eng
    return make


def ids(blocks):
    return [None if b.is_null else b.block_id for b in blocks]


def check_window(eng, request, processed):
    """The window list after freeing for ``processed`` tokens: sink kept, out-of-window nulls, tail real."""
    blocks = eng.blocks(request, WIN)
    skipped = max(0, processed - WINDOW + 1) // 16
    assert not blocks[0].is_null, "the sink block must never be freed"
    for i, block in enumerate(blocks[1:], start=1):
        assert block.is_null == (i < skipped), (i, skipped, ids(blocks))
    return blocks


def held(eng, request):
    return sum(not b.is_null for name in (FULL, WIN, IDX) for b in eng.blocks(request, name))


def test_window_frees_blocks_but_keeps_the_sink(engine):
    eng = engine()
    total = eng.num_free
    r = eng.request("a", list(range(40)))
    assert eng.admit(r) == 0
    sink = eng.blocks(r, WIN)[0].block_id
    for _ in range(200):
        before = r.num_computed_tokens
        assert eng.decode(r)
        blocks = check_window(eng, r, before)
        assert blocks[0].block_id == sink
        real = sum(not b.is_null for b in blocks)
        assert real <= 1 + -(-(WINDOW - 1) // 16) + 1          # sink + window + the partial block
        assert ids(eng.blocks(r, FULL)).count(None) == 0 and len(eng.blocks(r, FULL)) == -(-r.num_tokens // 16)
        assert ids(eng.blocks(r, IDX)).count(None) == 0 and len(eng.blocks(r, IDX)) == -(-r.num_tokens // 32)
        assert eng.num_free == total - held(eng, r)
    assert r.num_tokens == 240 and eng.blocks(r, WIN)[1].is_null


def test_free_returns_every_block(engine):
    eng = engine()
    total = eng.num_free
    requests = [eng.request(str(i), [i] * (50 + 37 * i)) for i in range(3)]
    for r in requests:
        eng.admit(r)
        for _ in range(70):
            eng.decode(r)
    assert eng.num_free < total
    for r in requests:
        eng.manager.free(r)
    assert eng.num_free == total == eng.config.num_blocks - 1   # the null block is never free


def test_prefix_hit_reuses_full_window_and_index_pages(engine):
    eng = engine()
    prompt = list(range(150))
    r1 = eng.request("r1", prompt)
    eng.admit(r1)
    for _ in range(10):
        eng.decode(r1)
    before = {name: ids(eng.blocks(r1, name)) for name in (FULL, WIN, IDX)}
    r2 = eng.request("r2", prompt + [1000 + i for i in range(30)])
    hit = eng.admit(r2)
    assert hit == 128                                        # scheduler-block (32) aligned, < 150
    full, win, index = (ids(eng.blocks(r2, name)) for name in (FULL, WIN, IDX))
    assert full[:8] == before[FULL][:8] and index[:4] == before[IDX][:4]
    # Window: the shared sink block, nulls, then the cached blocks of tokens [64, 128) (r1 had
    # already freed some of them; the prefix cache kept their contents).
    assert win[0] == before[WIN][0]
    assert win[1:4] == [None] * 3 and None not in win[4:]
    cached_tail = [eng.manager.block_pool.get_cached_block(h, [eng.groups[WIN]])
                   for h in r2.block_hashes[4:8]]
    assert win[4:8] == [c[0].block_id for c in cached_tail]
    assert set(full[8:]).isdisjoint(before[FULL]) and set(index[4:]).isdisjoint(before[IDX])


def test_no_hit_without_the_sink_block(engine):
    eng = engine()
    prompt = list(range(150))
    r1 = eng.request("r1", prompt)
    eng.admit(r1)
    sink = eng.blocks(r1, WIN)[0].block_id
    r1_cached = {b.block_id for name in (FULL, WIN, IDX) for b in eng.blocks(r1, name)
                 if not b.is_null and b.block_hash is not None}
    eng.manager.free(r1)
    probe = eng.request("probe", prompt + [7])
    assert eng.manager.get_computed_blocks(probe)[1] == 128    # with the sink cached: a hit
    eng.manager.evict_blocks({sink})
    r2 = eng.request("r2", prompt + [7])
    blocks, hit, _ = eng.manager.get_computed_blocks(r2)
    assert hit == 0
    assert len(blocks.blocks[eng.groups[FULL]]) == len(blocks.blocks[eng.groups[WIN]]) == 0
    # vLLM leaves the second Full-type group's blocks untrimmed; FullPrefixManager drops them.
    assert len(blocks.blocks[eng.groups[IDX]]) == 4
    assert eng.admit(r2) == 0
    # No cached page of r1 is reused (its uncached tail blocks may be, as plain free blocks).
    assert r1_cached.isdisjoint(b for name in (FULL, WIN, IDX) for b in ids(eng.blocks(r2, name)))


def test_shorter_window_hit_trims_every_full_type_group(engine):
    """The window hit ends before the full hit: both Full-type groups must be cut to it."""
    eng = engine()
    prompt = list(range(150))
    r1 = eng.request("r1", prompt)
    eng.admit(r1)
    r1_index = ids(eng.blocks(r1, IDX))
    eng.manager.free(r1)
    window_block_7 = eng.manager.block_pool.get_cached_block(r1.block_hashes[7], [eng.groups[WIN]])[0]
    eng.manager.evict_blocks({window_block_7.block_id})

    r2 = eng.request("r2", prompt + [7])
    raw, raw_hit, _ = eng.manager.coordinator.find_longest_cache_hit(r2.block_hashes, r2.num_tokens - 1)
    assert raw_hit == 96
    # vLLM 0.26's coordinator trims only the first Full-type group: the index group keeps 4 blocks.
    assert len(raw[eng.groups[FULL]]) == 6 and len(raw[eng.groups[IDX]]) == 4
    assert eng.admit(r2) == 96
    index = ids(eng.blocks(r2, IDX))
    assert index[:3] == r1_index[:3] and index[3] != r1_index[3]   # FullPrefixManager dropped the 4th
    assert len(index) == -(-r2.num_tokens // 32)


def test_chunked_prefill_frees_as_it_goes(engine):
    eng = engine()
    r = eng.request("long", [i % 97 for i in range(300)])
    assert eng.admit(r, first_chunk=48) == 0
    while r.num_computed_tokens < r.num_tokens:
        before = r.num_computed_tokens
        assert eng.step(r, 48)
        check_window(eng, r, before)
    blocks = eng.blocks(r, WIN)
    # Every token a local head reads next (sinks + last W-1) sits in a real block.
    for t in list(range(SINK)) + list(range(r.num_tokens - WINDOW + 1, r.num_tokens)):
        assert not blocks[t // 16].is_null, t
    assert len(eng.blocks(r, FULL)) == 300 // 16 + 1 and len(eng.blocks(r, IDX)) == -(-300 // 32)


def test_preempt_and_recompute_hits_its_own_pages(engine):
    eng = engine()
    total = eng.num_free
    r = eng.request("p", list(range(100)))
    eng.admit(r, first_chunk=64)
    eng.step(r, 64)
    for _ in range(60):
        eng.decode(r)
    full_before, win_before = ids(eng.blocks(r, FULL)), ids(eng.blocks(r, WIN))
    # Preemption (recompute mode): free everything, restart from zero computed tokens.
    eng.manager.free(r)
    assert eng.num_free == total
    r.num_computed_tokens = 0
    hit = eng.admit(r)
    assert hit == (r.num_tokens - 1) // 32 * 32
    assert ids(eng.blocks(r, FULL))[:hit // 16] == full_before[:hit // 16]
    win = ids(eng.blocks(r, WIN))
    assert win[0] == win_before[0]
    assert None not in win[(hit - WINDOW + 1) // 16: hit // 16]
    for _ in range(5):
        assert eng.decode(r)


def test_admission_counts_sink_and_window_not_the_whole_sequence(engine):
    def need(eng, r):
        return eng.manager.coordinator.get_num_blocks_to_allocate(
            r.request_id, r.num_tokens, tuple(() for _ in eng.groups), 0, 0, 0, r.num_tokens,
            apply_admission_cap=True)

    probe = engine(num_blocks=1000, max_model_len=2000, max_num_batched_tokens=64)
    r = probe.request("big", [3] * 2000)
    window_cap = probe.manager.coordinator.single_type_managers[probe.groups[WIN]]._max_admission_blocks_per_request
    blocks = need(probe, r)
    assert blocks == 2000 // 16 + -(-2000 // 32) + window_cap
    # The window reserve is the in-flight window plus the sink block, far below the sequence.
    assert window_cap < 2000 // 16
    # A pool that holds exactly that admits the request and runs its chunked prefill to the end; one
    # block less (the null block takes one) refuses it up front.
    tight = engine(num_blocks=blocks, max_model_len=2000, max_num_batched_tokens=64)
    assert tight.admit(tight.request("big", [3] * 2000), first_chunk=64, must_fit=True) == -1
    eng = engine(num_blocks=blocks + 1, max_model_len=2000, max_num_batched_tokens=64)
    r = eng.request("big", [3] * 2000)
    assert eng.admit(r, first_chunk=64, must_fit=True) == 0
    while r.num_computed_tokens < r.num_tokens:
        assert eng.step(r, 64)
    assert eng.num_free >= 0


def test_window_keeps_every_block_while_the_sequence_may_run_dense(make_config, kv):
    layout = KVLayout.build(HeadLayout.from_lists(8, 2, [[0, 1, 2, 3], [0, 1, 2, 3]]), head_size=64,
                            window=WINDOW, sink_tokens=SINK, dense_threshold=200)
    eng = kv.Engine(make_config(2048), kv.model_specs(layout), 1000)
    r = eng.request("r", list(range(150)))
    eng.admit(r)
    assert None not in ids(eng.blocks(r, WIN))              # 150 + 1 < 200: the next step may be dense
    while r.num_computed_tokens + 1 < 199:
        assert eng.decode(r)
    assert None not in ids(eng.blocks(r, WIN))
    for _ in range(40):
        assert eng.decode(r)
    check_window(eng, r, r.num_computed_tokens)             # past the threshold: sink + window only
    # A second request with the same prompt hits only if every block before its hit is still cached.
    again = eng.request("again", list(range(150)))
    assert eng.admit(again) == 128
    assert None not in ids(eng.blocks(again, WIN))
