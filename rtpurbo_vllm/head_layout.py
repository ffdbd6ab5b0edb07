"""Which query heads of each layer are retrieval heads, and what follows from it.

A *retrieval* query head attends to the whole context; every other query head is *local* and
attends to the sink tokens plus a sliding window. Under GQA a KV head must keep the whole history
as soon as one of its query heads is a retrieval head (a *retrieval KV head*).

Head ids are global (before tensor parallelism) unless a layout came from :meth:`HeadLayout.for_rank`,
whose ids are local to that rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class HeadLayout:
    """Retrieval query heads per layer of one model (or of one tensor-parallel rank).

    Attributes:
        num_heads: query heads per layer (HQ).
        num_kv_heads: KV heads per layer (HKV); ``num_heads % num_kv_heads == 0``.
        retrieval_heads: per layer, the sorted retrieval query-head ids.
    """

    num_heads: int
    num_kv_heads: int
    retrieval_heads: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if self.num_heads <= 0 or self.num_kv_heads <= 0:
            raise ValueError(f"head counts must be positive, got num_heads={self.num_heads}, "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        for layer, heads in enumerate(self.retrieval_heads):
            if list(heads) != sorted(set(heads)):
                raise ValueError(f"layer {layer}: retrieval heads {list(heads)} must be sorted and unique")
            if heads and not (0 <= heads[0] and heads[-1] < self.num_heads):
                raise ValueError(f"layer {layer}: retrieval heads {list(heads)} out of range "
                                 f"[0, {self.num_heads})")

    @classmethod
    def from_lists(cls, num_heads: int, num_kv_heads: int,
                   retrieval_heads: Sequence[Sequence[int]]) -> "HeadLayout":
        """Builds a layout from per-layer lists (sorted here; duplicates are rejected)."""
        per_layer = []
        for layer, heads in enumerate(retrieval_heads):
            ids = [int(h) for h in heads]
            if len(set(ids)) != len(ids):
                raise ValueError(f"layer {layer}: duplicate retrieval head ids in {ids}")
            per_layer.append(tuple(sorted(ids)))
        return cls(num_heads, num_kv_heads, tuple(per_layer))

    @classmethod
    def from_masks(cls, masks: Sequence[Sequence[int | bool]], num_kv_heads: int) -> "HeadLayout":
        """Builds a layout from one 0/1 list over the query heads per layer."""
        if not masks:
            raise ValueError("no layers given")
        num_heads = len(masks[0])
        for layer, mask in enumerate(masks):
            if len(mask) != num_heads:
                raise ValueError(f"layer {layer}: {len(mask)} head flags, expected {num_heads}")
        return cls.from_lists(num_heads, num_kv_heads,
                              [[h for h, flag in enumerate(mask) if flag] for mask in masks])

    @property
    def num_layers(self) -> int:
        return len(self.retrieval_heads)

    @property
    def group_size(self) -> int:
        """Query heads per KV head (G)."""
        return self.num_heads // self.num_kv_heads

    @property
    def num_retrieval_heads(self) -> int:
        """Retrieval query heads over all layers."""
        return sum(len(h) for h in self.retrieval_heads)

    def kv_head_of(self, head: int) -> int:
        """The KV head that query head ``head`` reads."""
        return head // self.group_size

    def retrieval_mask(self, layer: int) -> torch.Tensor:
        """``[HQ]`` bool (CPU): True for the retrieval query heads of ``layer``."""
        mask = torch.zeros(self.num_heads, dtype=torch.bool)
        mask[list(self.retrieval_heads[layer])] = True
        return mask

    def retrieval_kv_heads(self, layer: int) -> tuple[int, ...]:
        """Sorted KV heads of ``layer`` that serve at least one retrieval query head."""
        return tuple(sorted({self.kv_head_of(h) for h in self.retrieval_heads[layer]}))

    def retrieval_kv_index(self, layer: int) -> torch.Tensor:
        """``[HR]`` int64 (CPU): the KV head of each retrieval query head of ``layer``."""
        return torch.tensor([self.kv_head_of(h) for h in self.retrieval_heads[layer]], dtype=torch.long)

    def for_rank(self, tp_rank: int, tp_size: int) -> "HeadLayout":
        """The layout seen by one tensor-parallel rank, with rank-local head ids.

        vLLM gives rank ``r`` query heads ``[r*HQ/tp, (r+1)*HQ/tp)`` and, when ``HKV >= tp``, KV heads
        ``[r*HKV/tp, (r+1)*HKV/tp)``; when ``HKV < tp`` each KV head is replicated on ``tp/HKV`` ranks.
        """
        if tp_size <= 0 or not 0 <= tp_rank < tp_size:
            raise ValueError(f"bad tensor-parallel rank {tp_rank} of {tp_size}")
        if self.num_heads % tp_size:
            raise ValueError(f"{self.num_heads} query heads cannot be split over {tp_size} ranks")
        if self.num_kv_heads >= tp_size and self.num_kv_heads % tp_size:
            raise ValueError(f"{self.num_kv_heads} KV heads cannot be split over {tp_size} ranks")
        if self.num_kv_heads < tp_size and tp_size % self.num_kv_heads:
            raise ValueError(f"{self.num_kv_heads} KV heads cannot be replicated over {tp_size} ranks")
        heads_per_rank = self.num_heads // tp_size
        kv_per_rank = max(1, self.num_kv_heads // tp_size)
        lo, hi = tp_rank * heads_per_rank, (tp_rank + 1) * heads_per_rank
        local = [tuple(h - lo for h in heads if lo <= h < hi) for heads in self.retrieval_heads]
        return HeadLayout(heads_per_rank, kv_per_rank, tuple(local))
