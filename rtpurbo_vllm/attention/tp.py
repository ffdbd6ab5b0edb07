"""Tensor parallelism: the slice of the model's heads (and indexer weights) that this rank serves."""

from __future__ import annotations

import torch

from rtpurbo_vllm.head_layout import HeadLayout


def tp_rank_and_size() -> tuple[int, int]:
    """This process's tensor-parallel rank and world size (0, 1 outside a distributed run)."""
    from vllm.distributed import parallel_state

    if parallel_state._TP is None:
        return 0, 1
    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


def rank_layout(layout: HeadLayout) -> HeadLayout:
    """The head layout of this rank, with rank-local head ids (see :meth:`HeadLayout.for_rank`)."""
    return layout.for_rank(*tp_rank_and_size())


def rank_indexer(layout: HeadLayout, layer: int, w_q: torch.Tensor,
                 w_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of a layer's indexer weights.

    Args:
        layout: the model's global layout.
        layer: layer index.
        w_q: ``[HR, DI, D]``, one row per global retrieval head of the layer (ascending head id).
        w_k: ``[HR, DI, D]``.

    Returns:
        ``(w_q, w_k)`` restricted to the retrieval heads this rank serves, ``[HR_rank, DI, D]`` each.
    """
    rank, size = tp_rank_and_size()
    heads_per_rank = layout.num_heads // size
    lo, hi = rank * heads_per_rank, (rank + 1) * heads_per_rank
    rows = [i for i, head in enumerate(layout.retrieval_heads[layer]) if lo <= head < hi]
    return w_q[rows], w_k[rows]
