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


@pytest.mark.parametrize("name", ["compact", "full"])
def test_every_rank_declares_the_same_unit_specs(name):
    """Layer 0 has 1 retrieval head on rank 0 and 3 on rank 1, layer 1 none on rank 0: both ranks
    plan units of the same shapes, each holding only its own heads."""
    from rtpurbo_vllm.kv_cache import KVLayout, unit_spec

    layout = HeadLayout.from_lists(8, 2, [[1, 4, 5, 7], [6]])
    plans = [KVLayout.build(layout, name=name, head_size=64, window=32, tp_rank=r, tp_size=2) for r in range(2)]
    specs = [{kind: unit_spec(shape, p) for kind, shape in p.units.items()} for p in plans]
    assert specs[0] == specs[1]
    assert [len(p.places[0].index) for p in plans] == [1, 3] and [len(p.places[1].index) for p in plans] == [0, 1]
    assert all(p.num_kv_heads == 1 for p in plans)
