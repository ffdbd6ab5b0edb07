"""KVLayout: every head stored exactly once, in equal-count units with equal pages, for any head set."""

import random

import pytest
import torch

from rtpurbo_vllm.head_layout import HeadLayout
from rtpurbo_vllm.kv_cache import FULL, INDEX, WINDOW, KVLayout, plan_block_sizes

L, HQ, HKV, D = 32, 32, 8, 128


def llama8b_heads(selection: str, seed: int = 0) -> HeadLayout:
    """Llama-3-8B's head shape with the three selections of ``rtpurbo-calibrate heads``: the global
    top 15 % of query heads (random here, as for dummy weights), whole KV groups (15 % of KV heads), or
    one retrieval KV head per layer."""
    rng = random.Random(seed)
    if selection == "global15":
        chosen = rng.sample([(l, h) for l in range(L) for h in range(HQ)], round(0.15 * L * HQ))
    elif selection == "kvgroup15":
        groups = rng.sample([(l, g) for l in range(L) for g in range(HKV)], round(0.15 * L * HKV))
        chosen = [(l, 4 * g + i) for l, g in groups for i in range(4)]
    else:
        chosen = [(l, 4 * g + i) for l in range(L) for g in [rng.randrange(HKV)] for i in range(4)]
    return HeadLayout.from_lists(HQ, HKV, [[h for l2, h in chosen if l2 == l] for l in range(L)])


def check_places(layout: KVLayout, heads: HeadLayout) -> None:
    """Every head has one place, no two heads share one, full KV heads are exactly the retrieval ones."""
    seen = set()
    for layer, places in enumerate(layout.places):
        retrieval_kv = set(heads.retrieval_kv_heads(layer)) if layout.name == "compact" else set(range(HKV))
        for h, p in enumerate(places.kv):
            assert p.kind == (FULL if h in retrieval_kv else WINDOW)
            assert 0 <= p.unit < layout.units[p.kind].count and 0 <= p.slot < layout.units[p.kind].slots
            seen.add((p.kind, p.unit, p.slot))
        assert len(places.index) == len(heads.retrieval_heads[layer])
        for p in places.index:
            assert p.kind == INDEX and p.unit < layout.units[INDEX].count and p.slot < layout.units[INDEX].slots
            seen.add((p.kind, p.unit, p.slot))
    stored = sum(len(p.kv) + len(p.index) for p in layout.places)
    assert len(seen) == stored
    assert stored + sum(layout.empty_slots().values()) == sum(s.count * s.slots for s in layout.units.values())


@pytest.mark.parametrize("selection, arithmetic, bf16_min, fp8_min", [
    ("global15", 1.8, 1.7, 3.2), ("kvgroup15", 4.2, 4.0, 7.0), ("n1", 4.7, 4.4, 8.0)])
def test_llama3_8b_any_selection_without_uniform_padding(selection, arithmetic, bf16_min, fp8_min):
    heads = llama8b_heads(selection)
    layout = KVLayout.build(heads, head_size=D, window=8192, sink_tokens=4, dense_threshold=16384)
    check_places(layout, heads)
    shapes = list(layout.units.values())
    assert {s.count for s in shapes} == {layout.unit_count} and layout.unit_count >= L
    assert len({s.page_size_bytes for s in shapes}) == 1                   # equal pages: no page padding
    assert layout.blocks.scheduler_block_size <= 4096
    assert all(s.block_size % 16 == 0 for s in shapes)
    # Empty full slots are less than one unit's worth per unit count: no promoted KV heads per layer.
    assert layout.empty_slots()[FULL] < layout.unit_count
    ratio = layout.capacity_ratio(131072)
    assert bf16_min <= ratio <= arithmetic * 1.05
    fp8 = KVLayout.build(heads, head_size=D, kv_dtype=torch.uint8, index_dtype=torch.bfloat16, window=8192,
                         sink_tokens=4, dense_threshold=16384)
    check_places(fp8, heads)
    assert fp8.capacity_ratio(131072, baseline_dtype=torch.bfloat16) >= fp8_min
    assert fp8.capacity_ratio(131072) >= 2 * fp8_min / 4                       # against FLASH_ATTN fp8


def test_a_layers_heads_follow_each_other_in_their_units():
    heads = llama8b_heads("global15", seed=3)
    layout = KVLayout.build(heads, head_size=D, window=8192)
    order = [(p.unit, p.slot) for places in layout.places for p in places.kv if p.kind == FULL]
    assert order == sorted(order)
    slots = layout.units[FULL].slots
    assert [u * slots + s for u, s in order] == list(range(len(order)))


def test_full_layout_is_one_unit_per_layer_in_head_order():
    heads = llama8b_heads("global15")
    layout = KVLayout.build(heads, name="full", head_size=D, window=8192, dense_threshold=16384)
    check_places(layout, heads)
    assert set(layout.units) == {FULL, INDEX} and layout.unit_count == L and layout.units[FULL].slots == HKV
    assert all(p.unit == layer and p.slot == h for layer, places in enumerate(layout.places)
               for h, p in enumerate(places.kv))
    assert {s.block_size for s in layout.units.values()} == {16}               # one KV-cache group
    assert layout.dense_threshold == 0 and layout.side_units(0) == ((INDEX, 0),)


def test_tensor_parallel_ranks_get_the_same_unit_shapes():
    heads = llama8b_heads("global15", seed=5)
    layouts = [KVLayout.build(heads, head_size=D, window=8192, tp_rank=r, tp_size=2) for r in range(2)]
    assert layouts[0].units == layouts[1].units
    for r, layout in enumerate(layouts):
        check_places(layout, heads.for_rank(r, 2))
        assert layout.num_kv_heads == HKV // 2


def test_every_kv_head_retrieval_drops_the_window_units():
    heads = HeadLayout.from_lists(8, 2, [[0, 5], [1, 4, 7]])
    layout = KVLayout.build(heads, head_size=128)
    check_places(layout, heads)
    assert set(layout.units) == {FULL, INDEX} and layout.units[FULL].block_size == layout.units[INDEX].block_size


def test_no_retrieval_head_keeps_full_units_for_the_layers_and_no_index():
    heads = HeadLayout.from_lists(8, 2, [[], []])
    layout = KVLayout.build(heads, head_size=64, window=64)
    assert set(layout.units) == {FULL, WINDOW}
    assert layout.unit_count == 2 and layout.empty_slots()[FULL] == 2        # each layer owns a unit


def test_side_units_are_named_after_their_home_layer():
    heads = llama8b_heads("kvgroup15")
    layout = KVLayout.build(heads, head_size=D, window=8192)
    names = tuple(f"model.layers.{i}.self_attn.attn" for i in range(L))
    full = layout.unit_names(names, FULL)
    assert full[:L] == names and len(set(full)) == layout.unit_count
    homes = [u for layer in range(L) for u in layout.side_units(layer)]
    assert len(homes) == len(set(homes)) == 3 * layout.unit_count - L
    assert layout.unit_names(names, WINDOW)[L + 1] == "model.layers.1.self_attn.attn.rtp_window1"


@pytest.mark.parametrize("full, window, index", [(1, 7, 4), (2, 6, 8), (3, 5, 11), (1, 1, 1), (4, 9, 3)])
def test_block_plan_divides_exactly(full, window, index):
    b = plan_block_sizes(full, window, index, kv_bytes_per_head=256, index_bytes_per_slot=32)
    assert b.full * full * 256 == b.window * window * 256 == b.index * b.index_slots * 32 == b.page_size_bytes
    assert all(x % 16 == 0 for x in b.block_sizes) and b.index_slots >= index


def test_bytes_per_sequence_counts_whole_blocks_and_the_window():
    heads = HeadLayout.from_lists(8, 2, [[0, 1, 2, 3], [0, 1, 2, 3]])
    layout = KVLayout.build(heads, head_size=64, window=64, sink_tokens=4)
    page = layout.blocks.page_size_bytes
    # 1000 tokens: full 63 blocks, index 32 blocks, window: 64 + one block = 80 tokens -> 5 blocks + sink block.
    assert layout.bytes_per_sequence(1000) == 2 * page * (63 + 32 + 5 + 1)
    dense = 2 * 2 * 2 * 64 * 2 * 1008
    assert layout.capacity_ratio(1000) == pytest.approx(dense / layout.bytes_per_sequence(1000))
