"""Tensor parallelism: each rank serves its slice of the retrieval heads and their indexer rows."""

import pytest
import torch

from rtpurbo_vllm.attention import tp
from rtpurbo_vllm.head_layout import HeadLayout


def test_outside_a_distributed_run_the_rank_is_the_whole_model():
    assert tp.tp_rank_and_size() == (0, 1)


@pytest.mark.parametrize("rank", [0, 1])
def test_rank_slices_heads_and_indexer_rows(monkeypatch, rank):
    monkeypatch.setattr(tp, "tp_rank_and_size", lambda: (rank, 2))
    layout = HeadLayout.from_lists(8, 2, [[1, 3, 4, 6]])
    w_q = torch.arange(4.0)[:, None, None].expand(4, 16, 64)    # row r holds r
    w_k = -w_q
    local = tp.rank_layout(layout)
    assert local == layout.for_rank(rank, 2)
    q, k = tp.rank_indexer(layout, 0, w_q, w_k)
    rows = [0, 1] if rank == 0 else [2, 3]            # global heads 1, 3 | 4, 6
    assert q[:, 0, 0].tolist() == rows and k[:, 0, 0].tolist() == [-r for r in rows]
    assert local.retrieval_heads == (((1, 3),) if rank == 0 else ((0, 2),))


@pytest.mark.parametrize("rank", [0, 1])
def test_index_cache_spec_is_the_same_on_every_rank(monkeypatch, rank):
    """Layer 0 has 1 retrieval head on rank 0 and 3 on rank 1, layer 1 none on rank 0: both ranks
    declare index caches of 3 slots, and each rank's view holds only its own heads."""
    from vllm.config import CacheConfig, DeviceConfig, VllmConfig

    from rtpurbo_vllm.attention.index_cache import RTPurboIndexCache

    monkeypatch.setattr(tp, "tp_rank_and_size", lambda: (rank, 2))
    layout = HeadLayout.from_lists(8, 2, [[1, 4, 5, 7], [6]])
    config = VllmConfig(cache_config=CacheConfig(block_size=16), device_config=DeviceConfig("cpu"))
    assert [tp.index_slots(layout, layer) for layer in range(2)] == [3, 1]
    local = tp.rank_layout(layout)
    specs = []
    for layer in range(2):
        heads = local.retrieval_heads[layer]
        cache = RTPurboIndexCache(f"model.layers.{layer}.attn.rtp_index", len(heads), tp.index_slots(layout, layer),
                                  16, torch.bfloat16, config)
        specs.append(cache.get_kv_cache_spec(config))
        cache.kv_cache = torch.zeros(5, 16, cache.num_slots * 16, dtype=torch.bfloat16)
        assert cache.paged_view().shape == (5, 16, len(heads), 16)
    assert [(s.head_size, s.block_size) for s in specs] == [(48, 16), (16, 16)]
