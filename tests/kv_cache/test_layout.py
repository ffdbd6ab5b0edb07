"""Layout arithmetic: uniform counts, promoted heads, padding statistics, block sizes, bytes per token."""

import math

import pytest
import torch

from rtpurbo_vllm.head_layout import HeadLayout
from rtpurbo_vllm.kv_cache import KVLayoutPlan, plan_block_sizes

KV = 2 * 128 * 2      # bytes per token of one KV head (D=128, bf16)
IDX = 16 * 2          # bytes per token of one index slot (DI=16, bf16)


def test_gqa4_uneven_layers_single_rank():
    # HQ=8, HKV=2 (G=4): layer 0 has retrieval heads in both KV groups, layer 1 in one, layer 2 none.
    layout = HeadLayout.from_lists(8, 2, [[1, 6], [0, 2, 3], []])
    plan = KVLayoutPlan.build(layout, head_size=128)
    assert plan.num_full_kv_heads == 2 and plan.num_window_kv_heads == 0
    assert plan.retrieval_kv_heads == ((0, 1), (0,), ())
    assert plan.full_kv_heads == ((0, 1), (0, 1), (0, 1))
    assert plan.promoted_kv_heads == ((), (1,), (0, 1))
    # R == H: no window cache; one block size (vLLM makes a single UniformTypeKVCacheSpecs group).
    assert not plan.has_window_cache and plan.blocks.window is None
    assert plan.blocks.full == plan.blocks.index == 16 and plan.index_width == 3
    assert plan.padding.promoted_kv_heads == 3 and plan.padding.padded_index_slots == 1 + 0 + 3
    ideal = (2 * KV + 2 * IDX) + (KV + 3 * IDX) + 0
    planned = 3 * (2 * KV + 3 * IDX)
    assert plan.padding.ideal_bytes_per_token == ideal == plan.ideal_full_bytes_per_token()
    assert plan.padding.planned_bytes_per_token == planned == plan.full_bytes_per_token()
    assert plan.padding.wasted_fraction == pytest.approx((planned - ideal) / planned)
    assert plan.dense_bytes_per_token() == 3 * 2 * KV


def test_gqa1_promotes_lowest_window_heads_and_sizes_pages():
    # HQ=HKV=8 (no GQA): retrieval KV heads = retrieval query heads.
    layout = HeadLayout.from_lists(8, 8, [[5], [1, 7], [3]])
    plan = KVLayoutPlan.build(layout, head_size=128, window=8192, sink_tokens=4)
    assert plan.num_full_kv_heads == 2 and plan.index_width >= 2
    assert plan.full_kv_heads == ((0, 5), (1, 7), (0, 3))
    assert plan.window_kv_heads[0] == (1, 2, 3, 4, 6, 7)
    assert plan.kv_head_slots(0)[5] == ("full", 1) and plan.kv_head_slots(0)[1] == ("window", 0)
    assert plan.full_kv_index(2).tolist() == [0, 3] and plan.window_kv_index(2).dtype == torch.long
    b = plan.blocks
    # Equal pages, block sizes multiples of 16.
    assert b.full * 2 * KV == b.window * 6 * KV == b.index * plan.index_width * IDX == b.page_size_bytes
    assert all(s % 16 == 0 for s in b.block_sizes)
    assert b.scheduler_block_size == math.lcm(*b.block_sizes) and b.hash_block_size == 16
    assert plan.num_sink_blocks == 1


def test_tensor_parallel_uses_the_max_over_ranks():
    # HQ=8, HKV=4, TP=2: rank 0 holds query heads 0-3 (KV 0-1), rank 1 heads 4-7 (KV 2-3).
    layout = HeadLayout.from_lists(8, 4, [[0, 2, 3], [5], [4, 6]])
    plans = [KVLayoutPlan.build(layout, head_size=128, tp_rank=r, tp_size=2) for r in range(2)]
    for plan in plans:
        assert plan.num_kv_heads == 2 and plan.num_full_kv_heads == 2 and plan.index_width >= 3
        assert plan.blocks == plans[0].blocks and not plan.has_window_cache
    assert plans[0].retrieval_heads == ((0, 2, 3), (), ())
    assert plans[1].retrieval_heads == ((), (1,), (0, 2))
    assert plans[1].retrieval_kv_heads == ((), (0,), (0, 1))
    # Padding counts both ranks: 6 (layer, rank) slots of 2 KV heads hold 2+0+0+1+0+2... retrieval KV heads.
    retrieval_kv = sum(len(kv) for p in plans for kv in p.retrieval_kv_heads)
    assert plans[0].padding.promoted_kv_heads == 2 * 3 * 2 - retrieval_kv
    assert plans[0].padding == plans[1].padding


def test_no_retrieval_head_keeps_one_full_head_and_no_index():
    layout = HeadLayout.from_lists(4, 4, [[], []])
    plan = KVLayoutPlan.build(layout, head_size=128)
    assert plan.num_full_kv_heads == 1 and not plan.has_index_cache and plan.blocks.index is None
    assert plan.full_kv_heads == ((0,), (0,)) and plan.padding.promoted_kv_heads == 2
    assert plan.blocks.full * KV == plan.blocks.window * 3 * KV


@pytest.mark.parametrize("r,h,n", [(1, 8, 3), (3, 8, 5), (5, 8, 9), (2, 4, 7), (7, 8, 12), (1, 2, 1)])
def test_block_plan_divides_exactly(r, h, n):
    b = plan_block_sizes(r, h - r, n, KV, IDX)
    assert b.index_width >= n
    assert b.full * r * KV == b.window * (h - r) * KV == b.index * b.index_width * IDX == b.page_size_bytes
    assert all(s % 16 == 0 for s in b.block_sizes)
    assert b.scheduler_block_size <= 4096


def test_bytes_per_sequence_formula():
    layout = HeadLayout.from_lists(8, 4, [[0], [2, 5], [7]])
    plan = KVLayoutPlan.build(layout, head_size=128, window=1000, sink_tokens=4)
    r, n = plan.num_full_kv_heads, plan.index_width
    for ctx in (10, 1004, 50000):
        held = min(ctx, 1004)
        assert plan.bytes_per_sequence(ctx, "dense") == ctx * 3 * 4 * KV
        assert plan.bytes_per_sequence(ctx) == 3 * (ctx * (r * KV + n * IDX) + held * (4 - r) * KV)
        ideal = sum(ctx * (len(kv) * KV + len(q) * IDX) + held * (4 - len(kv)) * KV
                    for kv, q in zip(plan.retrieval_kv_heads, plan.retrieval_heads))
        assert plan.bytes_per_sequence(ctx, "ideal") == ideal
    assert plan.capacity_ratio(50000) == plan.bytes_per_sequence(50000, "dense") / plan.bytes_per_sequence(50000)


def llama8b_artifact_heads(selection: str, skew: float, ratio: float = 0.15, seed: int = 0):
    """Synthetic retrieval heads for Llama-3-8B's shape (32 layers x 32 query heads, 8 KV heads, G=4).

    Head scores are uniform noise times a per-layer factor ``1 - skew + skew * u_layer``. The 15 %
    budget (154 heads) is then spent by ``selection``:

    * ``"query-head"``: the top query heads wherever they fall (what a head-wise calibration does);
    * ``"kv-group"``: KV groups ranked by their best query head, whole groups (the last partially);
    * ``"kv-group-per-layer"``: the best KV group of every layer first, then the next-best groups
      of all layers by score (so retrieval KV heads are spread evenly over layers, design B's case).
    """
    g = torch.Generator().manual_seed(seed)
    layers, hq, hkv = 32, 32, 8
    scores = torch.rand(layers, hq, generator=g) * (1 - skew + skew * torch.rand(layers, 1, generator=g))
    budget = round(ratio * layers * hq)
    chosen = torch.zeros(layers, hq, dtype=torch.bool)
    if selection == "query-head":
        chosen.view(-1)[scores.flatten().argsort(descending=True)[:budget]] = True
        return HeadLayout.from_masks(chosen.int().tolist(), hkv), budget
    group_scores = scores.view(layers, hkv, hq // hkv).amax(-1)
    if selection == "kv-group":
        ranked = group_scores.flatten().argsort(descending=True).tolist()
    else:
        rank_in_layer = group_scores.argsort(-1, descending=True).argsort(-1)   # 0 = best group of its layer
        ranked = sorted(range(layers * hkv), key=lambda i: (rank_in_layer.view(-1)[i].item(),
                                                           -group_scores.view(-1)[i].item()))
    for idx in ranked:
        layer, kv = divmod(idx, hkv)
        members = torch.arange(kv * 4, kv * 4 + 4)
        for h in members[scores[layer, members].argsort(descending=True)].tolist():
            if chosen.sum() < budget:
                chosen[layer, h] = True
        if chosen.sum() >= budget:
            break
    return HeadLayout.from_masks(chosen.int().tolist(), hkv), budget


@pytest.mark.parametrize("skew", [0.3, 0.9], ids=["mild-layer-skew", "strong-layer-skew"])
@pytest.mark.parametrize("selection", ["kv-group-per-layer", "kv-group", "query-head"])
def test_llama3_8b_capacity_prediction(selection, skew):
    layout, budget = llama8b_artifact_heads(selection, skew)
    assert layout.num_retrieval_heads == budget == 154
    plan = KVLayoutPlan.build(layout, head_size=128, window=8192, sink_tokens=4)
    ctx = 131072
    retrieval_kv = [len(kv) for kv in plan.retrieval_kv_heads]
    print(f"\nLlama-3-8B shape, 15% retrieval by {selection}, layer skew {skew}: retrieval KV heads per "
          f"layer min {min(retrieval_kv)} max {max(retrieval_kv)} mean {sum(retrieval_kv) / 32:.2f}, index "
          f"slots used per layer max {max(len(h) for h in plan.retrieval_heads)}\n  {plan.summary(ctx)}")
    assert plan.capacity_ratio(ctx) <= plan.capacity_ratio(ctx, "ideal") + 1e-9
    if selection == "kv-group-per-layer":
        assert plan.num_full_kv_heads == 2 and plan.capacity_ratio(ctx) > 2.5
