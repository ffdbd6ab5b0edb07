"""HeadLayout: retrieval heads per layer, GQA mapping and the tensor-parallel slice of each rank."""

import pytest
import torch

from rtpurbo_vllm.head_layout import HeadLayout


def test_from_lists_sorts_and_maps_kv_heads():
    layout = HeadLayout.from_lists(8, 2, [[5, 1], [], [7]])
    assert layout.retrieval_heads == ((1, 5), (), (7,))
    assert layout.num_layers == 3 and layout.group_size == 4 and layout.num_retrieval_heads == 3
    assert layout.retrieval_kv_heads(0) == (0, 1) and layout.retrieval_kv_heads(1) == ()
    assert layout.retrieval_kv_index(0).tolist() == [0, 1]
    assert layout.retrieval_mask(2).tolist() == [False] * 7 + [True]


def test_from_masks():
    layout = HeadLayout.from_masks([[0, 1, 0, 0], [1, 1, 0, 1]], num_kv_heads=4)
    assert layout.retrieval_heads == ((1,), (0, 1, 3))


@pytest.mark.parametrize("args, match", [
    pytest.param((6, 4, [[0]]), "not a multiple", id="gqa-ratio"),
    pytest.param((8, 2, [[1, 1]]), "duplicate", id="duplicate"),
    pytest.param((8, 2, [[8]]), "out of range", id="out-of-range"),
    pytest.param((0, 1, [[]]), "positive", id="no-heads"),
])
def test_bad_layouts_are_refused(args, match):
    with pytest.raises(ValueError, match=match):
        HeadLayout.from_lists(*args)


@pytest.mark.parametrize("num_kv_heads, tp", [(8, 2), (8, 4), (2, 4), (1, 2)],
                         ids=["kv8-tp2", "kv8-tp4", "kv2-tp4-replicated", "mqa-tp2"])
def test_ranks_cover_the_model_once(num_kv_heads, tp):
    layout = HeadLayout.from_lists(8, num_kv_heads, [[0, 3, 4, 7], [2], []])
    seen = [[] for _ in range(layout.num_layers)]
    for rank in range(tp):
        local = layout.for_rank(rank, tp)
        assert local.num_heads == 8 // tp and local.num_kv_heads == max(1, num_kv_heads // tp)
        for layer, heads in enumerate(local.retrieval_heads):
            seen[layer] += [rank * local.num_heads + h for h in heads]
            # A rank-local head reads the rank-local KV head that holds its global KV head.
            for h in heads:
                global_kv = layout.kv_head_of(rank * local.num_heads + h)
                assert local.kv_head_of(h) == global_kv % local.num_kv_heads
    assert [tuple(s) for s in seen] == list(layout.retrieval_heads)


def test_bad_tensor_parallel_split():
    with pytest.raises(ValueError, match="cannot be split"):
        HeadLayout.from_lists(8, 2, [[0]]).for_rank(0, 3)
    with pytest.raises(ValueError, match="bad tensor-parallel rank"):
        HeadLayout.from_lists(8, 2, [[0]]).for_rank(2, 2)
    assert torch.equal(HeadLayout.from_lists(4, 4, [[]]).retrieval_mask(0), torch.zeros(4, dtype=torch.bool))
