"""The memory layout of RTPurbo's KV cache (design B of issue #5): which KV heads keep every token.

Per layer and tensor-parallel rank, a KV head whose query heads include a retrieval head keeps the
whole history (a *full* KV head); every other KV head keeps only the sink tokens and the last
``window`` tokens (a *window* KV head). vLLM groups layers by equal KV-cache spec, so the plan makes
the counts uniform: every layer (on every rank) gets exactly ``R`` full KV heads, where ``R`` is the
largest number of retrieval KV heads of any layer on any rank; a layer with fewer promotes its
lowest-numbered window KV heads to full. Likewise the index-key cache has ``n`` slots per token in
every layer (``n`` >= the largest number of retrieval query heads of a layer on a rank; slot ``j``
holds retrieval query head ``index_heads[layer][j]``, the other slots are never written or read).

Three caches per layer (shapes per rank; ``B`` = vLLM blocks, ``H`` = KV heads of the rank):

=============================  ==========================================  ============================
cache (layer name)             vLLM spec                                   tensor (logical / physical)
=============================  ==========================================  ============================
full  ``{prefix}``             ``RTPurboFullSpec(R, D, block=Pf)``         ``[B, R, Pf, 2D]`` / ``[B, Pf, R, 2D]``
window ``{prefix}.rtp_window`` ``SinkWindowSpec(H-R, D, W, sink, Pw)``     ``[B, H-R, Pw, 2D]`` / ``[B, Pw, H-R, 2D]``
index ``{prefix}.rtp_index``   ``RTPurboIndexSpec(1, DI*n, block=Pi)``     ``[B, Pi, DI*n]``
=============================  ==========================================  ============================

The block sizes ``Pf, Pw, Pi`` are multiples of ``block_unit`` (16, what FlashAttention and the
Triton kernels need) chosen so that the three pages have exactly the same byte size
(``Pf*R*2D*s == Pw*(H-R)*2D*s == Pi*n*DI*s'``), which vLLM's hybrid allocator requires
(``unify_kv_cache_spec_page_size``): no page padding, no padding layers. Where the numbers do not
divide, ``n`` is padded (index slots are 16x cheaper than KV heads); the plan reports every byte of
padding. Edge cases: ``R == H`` (every KV head full) drops the window cache and uses one block size
for both remaining caches (vLLM then makes one ``UniformTypeKVCacheSpecs`` group, design A);
``R >= 1`` always, because the main ``Attention`` layer must own a spec (a layer without one gets no
metadata); ``n == 0`` (no retrieval head anywhere) drops the index cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from rtpurbo_vllm.head_layout import HeadLayout

if TYPE_CHECKING:
    from rtpurbo_vllm.artifacts import RTPurboArtifact

DEFAULT_BLOCK_UNIT = 16
# Prefix-cache hits land on multiples of lcm(block sizes); keep that below this many tokens.
DEFAULT_MAX_SCHEDULER_BLOCK = 4096
# Index padding is weighed against page size at this context length (see plan_block_sizes).
DEFAULT_REFERENCE_TOKENS = 16384


def serving_window(params) -> int:
    """Tokens a window KV head keeps when served with ``params`` (:class:`SparsityParams`):
    ``max(window, dense_threshold - 1)``, so a sequence short enough to run dense finds every key of
    its local heads in the window cache."""
    return max(params.window, params.dense_threshold - 1)


@dataclass(frozen=True)
class BlockPlan:
    """Block sizes (tokens per vLLM block) of the three caches and their common page size.

    Attributes:
        full: block size of the full cache.
        window: block size of the window cache (None when every KV head is full).
        index: block size of the index cache (None without an index cache).
        index_width: index slots per token (``n``, possibly padded up for divisibility).
        page_size_bytes: bytes of one page of every cache (equal pages), or of the full cache when
            the pages may differ (``R == H``: one group, one block size).
    """

    full: int
    window: int | None
    index: int | None
    index_width: int
    page_size_bytes: int

    @property
    def block_sizes(self) -> tuple[int, ...]:
        return tuple(b for b in (self.full, self.window, self.index) if b is not None)

    @property
    def scheduler_block_size(self) -> int:
        """vLLM's scheduler block (lcm of the group block sizes): the prefix-cache hit granularity."""
        return math.lcm(*self.block_sizes)

    @property
    def hash_block_size(self) -> int:
        """vLLM's hash block (gcd of the group block sizes)."""
        return math.gcd(*self.block_sizes)


def plan_block_sizes(num_full: int, num_window: int, index_width: int, kv_bytes_per_head: int,
                     index_bytes_per_slot: int, block_unit: int = DEFAULT_BLOCK_UNIT,
                     max_scheduler_block: int = DEFAULT_MAX_SCHEDULER_BLOCK,
                     reference_tokens: int = DEFAULT_REFERENCE_TOKENS) -> BlockPlan:
    """Chooses block sizes giving every cache the same page size.

    With ``f = R*kv``, ``w = (H-R)*kv`` and ``i = n'*c`` bytes per token, the smallest common page is
    ``lcm(unit*f, unit*w, unit*i)`` and the block sizes are that page over ``f``, ``w`` and ``i``
    (multiples of ``unit`` by construction). ``n' >= n`` is searched: a padded index slot costs ``c``
    bytes per token, a large page costs about 1.5 pages per layer and sequence (half a block of the
    full and index caches, the window's extra block), and the scheduler block (lcm of the block sizes)
    is vLLM's prefix-cache hit granularity. Among the widths whose scheduler block is at most
    ``max_scheduler_block`` (all widths if none is), the one with the least
    ``(n'-n)*c*reference_tokens + 1.5*page`` wins.

    Args:
        num_full: full KV heads per layer (R >= 1).
        num_window: window KV heads per layer (H - R >= 0).
        index_width: index slots needed per token (n >= 0).
        kv_bytes_per_head: bytes per token of one KV head (K and V: ``2 * D * dtype size``).
        index_bytes_per_slot: bytes per token of one index slot (``DI * dtype size``).
        block_unit: every block size is a multiple of this (kernel block size).
        max_scheduler_block: the largest prefix-cache hit granularity accepted when avoidable.
        reference_tokens: the context length at which index padding is weighed against page size.
    """
    if num_full < 1 or num_window < 0 or index_width < 0:
        raise ValueError(f"bad head counts R={num_full}, H-R={num_window}, n={index_width}")
    full_bytes = num_full * kv_bytes_per_head
    if num_window == 0:
        # One group (UniformTypeKVCacheSpecs): one block size, per-layer page sizes may differ.
        return BlockPlan(full=block_unit, window=None, index=block_unit if index_width else None,
                         index_width=index_width, page_size_bytes=block_unit * full_bytes)
    window_bytes = num_window * kv_bytes_per_head
    base_page = block_unit * math.lcm(full_bytes, window_bytes)
    if index_width == 0:
        return BlockPlan(full=base_page // full_bytes, window=base_page // window_bytes, index=None,
                         index_width=0, page_size_bytes=base_page)
    candidates = []
    for width in range(index_width, 2 * index_width + block_unit + 1):
        slot_bytes = width * index_bytes_per_slot
        page = math.lcm(base_page, block_unit * slot_bytes)
        candidates.append(BlockPlan(full=page // full_bytes, window=page // window_bytes,
                                    index=page // slot_bytes, index_width=width, page_size_bytes=page))
    allowed = [c for c in candidates if c.scheduler_block_size <= max_scheduler_block] or candidates

    def cost(c: BlockPlan) -> tuple[float, int]:
        padding = (c.index_width - index_width) * index_bytes_per_slot * reference_tokens
        return padding + 1.5 * c.page_size_bytes, c.scheduler_block_size

    return min(allowed, key=cost)


@dataclass(frozen=True)
class PaddingStats:
    """What uniform counts cost against an ideal layout with per-layer counts (all ranks together).

    Bytes are per token of context beyond the window (the slope of memory vs. context length),
    summed over layers and ranks.

    Attributes:
        promoted_kv_heads: KV heads stored in full although none of their query heads is a
            retrieval head (sum over layers and ranks).
        padded_index_slots: index slots per token that no retrieval head uses.
        ideal_bytes_per_token: full-history bytes per token of the ideal per-layer layout.
        planned_bytes_per_token: full-history bytes per token of this plan.
    """

    promoted_kv_heads: int
    padded_index_slots: int
    ideal_bytes_per_token: int
    planned_bytes_per_token: int

    @property
    def wasted_bytes_per_token(self) -> int:
        return self.planned_bytes_per_token - self.ideal_bytes_per_token

    @property
    def wasted_fraction(self) -> float:
        """Share of the planned full-history bytes that padding takes (0 = none)."""
        return self.wasted_bytes_per_token / self.planned_bytes_per_token if self.planned_bytes_per_token else 0.0


@dataclass(frozen=True)
class KVLayoutPlan:
    """The KV-cache layout of one tensor-parallel rank (identical specs on every rank).

    Head ids are local to the rank (``HeadLayout.for_rank``). Build with :meth:`build` or
    :meth:`from_artifact`.

    Attributes:
        num_heads: query heads per layer on this rank (HQ).
        num_kv_heads: KV heads per layer on this rank (H).
        head_size: D.
        kv_dtype: dtype of the K/V caches.
        index_dim: DI (16).
        index_dtype: dtype of the index-key cache.
        sink_tokens: leading tokens a local head always sees.
        window: a local head sees the last ``window`` tokens, its own included.
        retrieval_heads: per layer, the rank's retrieval query heads (= the index slots in order).
        retrieval_kv_heads: per layer, KV heads that serve a retrieval query head.
        full_kv_heads: per layer, the R KV heads kept in full (sorted; retrieval ones plus promoted).
        window_kv_heads: per layer, the H - R KV heads kept as sink + window (sorted).
        blocks: block sizes and page size.
        padding: padding statistics over all ranks.
        tp_rank, tp_size: the rank this plan is for.
    """

    num_heads: int
    num_kv_heads: int
    head_size: int
    kv_dtype: torch.dtype
    index_dim: int
    index_dtype: torch.dtype
    sink_tokens: int
    window: int
    retrieval_heads: tuple[tuple[int, ...], ...]
    retrieval_kv_heads: tuple[tuple[int, ...], ...]
    full_kv_heads: tuple[tuple[int, ...], ...]
    window_kv_heads: tuple[tuple[int, ...], ...]
    blocks: BlockPlan
    padding: PaddingStats
    tp_rank: int = 0
    tp_size: int = 1

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, layout: HeadLayout, *, head_size: int, kv_dtype: torch.dtype = torch.bfloat16,
              index_dtype: torch.dtype | None = None, index_dim: int = 16, sink_tokens: int = 4,
              window: int = 8192, tp_rank: int = 0, tp_size: int = 1,
              block_unit: int = DEFAULT_BLOCK_UNIT,
              max_scheduler_block: int = DEFAULT_MAX_SCHEDULER_BLOCK) -> KVLayoutPlan:
        """Plans the layout of rank ``tp_rank`` from the model's global head layout.

        ``R`` and ``n`` are maxima over all layers and all ranks, so every rank declares the same
        specs (vLLM asserts it).
        """
        index_dtype = index_dtype or kv_dtype
        ranks = [layout.for_rank(r, tp_size) for r in range(tp_size)]
        num_full = max([1] + [len(rl.retrieval_kv_heads(l)) for rl in ranks for l in range(rl.num_layers)])
        needed_width = max([0] + [len(h) for rl in ranks for h in rl.retrieval_heads])
        mine = ranks[tp_rank]
        hkv = mine.num_kv_heads
        kv_bytes = 2 * head_size * _dtype_size(kv_dtype)
        slot_bytes = index_dim * _dtype_size(index_dtype)
        blocks = plan_block_sizes(num_full, hkv - num_full, needed_width, kv_bytes, slot_bytes,
                                  block_unit, max_scheduler_block)
        full, windowed, retrieval_kv = [], [], []
        for layer in range(mine.num_layers):
            kv = mine.retrieval_kv_heads(layer)
            promoted = [h for h in range(hkv) if h not in kv][:num_full - len(kv)]
            keep = tuple(sorted((*kv, *promoted)))
            retrieval_kv.append(kv)
            full.append(keep)
            windowed.append(tuple(h for h in range(hkv) if h not in keep))
        ideal = sum(len(rl.retrieval_kv_heads(l)) * kv_bytes + len(rl.retrieval_heads[l]) * slot_bytes
                    for rl in ranks for l in range(rl.num_layers))
        planned = tp_size * mine.num_layers * (num_full * kv_bytes + blocks.index_width * slot_bytes)
        padding = PaddingStats(
            promoted_kv_heads=sum(num_full - len(rl.retrieval_kv_heads(l))
                                  for rl in ranks for l in range(rl.num_layers)),
            padded_index_slots=sum(blocks.index_width - len(h) for rl in ranks for h in rl.retrieval_heads),
            ideal_bytes_per_token=ideal, planned_bytes_per_token=planned)
        return cls(num_heads=mine.num_heads, num_kv_heads=hkv, head_size=head_size, kv_dtype=kv_dtype,
                   index_dim=index_dim, index_dtype=index_dtype, sink_tokens=sink_tokens, window=window,
                   retrieval_heads=mine.retrieval_heads, retrieval_kv_heads=tuple(retrieval_kv),
                   full_kv_heads=tuple(full), window_kv_heads=tuple(windowed), blocks=blocks,
                   padding=padding, tp_rank=tp_rank, tp_size=tp_size)

    @classmethod
    def from_artifact(cls, artifact: RTPurboArtifact, *, kv_dtype: torch.dtype,
                      index_dtype: torch.dtype | None = None, tp_rank: int = 0, tp_size: int = 1,
                      block_unit: int = DEFAULT_BLOCK_UNIT) -> KVLayoutPlan:
        """The plan of an artifact's model (``SparsityParams`` give sink, window and DI)."""
        p = artifact.params
        return cls.build(artifact.layout, head_size=artifact.model.head_dim, kv_dtype=kv_dtype,
                         index_dtype=index_dtype, index_dim=p.index_dim, sink_tokens=p.sink_tokens,
                         window=p.window, tp_rank=tp_rank, tp_size=tp_size, block_unit=block_unit)

    # ------------------------------------------------------------------ shape facts
    @property
    def num_layers(self) -> int:
        return len(self.retrieval_heads)

    @property
    def num_full_kv_heads(self) -> int:
        """R: full KV heads per layer."""
        return len(self.full_kv_heads[0]) if self.full_kv_heads else 1

    @property
    def num_window_kv_heads(self) -> int:
        """H - R: window KV heads per layer."""
        return self.num_kv_heads - self.num_full_kv_heads

    @property
    def index_width(self) -> int:
        """n: index slots per token (>= every layer's retrieval query heads)."""
        return self.blocks.index_width

    @property
    def has_window_cache(self) -> bool:
        return self.num_window_kv_heads > 0

    @property
    def has_index_cache(self) -> bool:
        return self.index_width > 0

    @property
    def num_sink_blocks(self) -> int:
        """Window-cache blocks that hold the sink tokens (kept for the whole request)."""
        if not self.has_window_cache or self.sink_tokens == 0:
            return 0
        return -(-self.sink_tokens // self.blocks.window)

    def full_kv_index(self, layer: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """``[R]`` int64: rank KV head of each full-cache head slot of ``layer``."""
        return torch.tensor(self.full_kv_heads[layer], dtype=torch.long, device=device)

    def window_kv_index(self, layer: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """``[H-R]`` int64: rank KV head of each window-cache head slot of ``layer``."""
        return torch.tensor(self.window_kv_heads[layer], dtype=torch.long, device=device)

    def kv_head_slots(self, layer: int) -> tuple[tuple[str, int], ...]:
        """Per rank KV head of ``layer``: ``("full", j)`` or ``("window", j)``, its cache and slot."""
        slots = {h: ("full", j) for j, h in enumerate(self.full_kv_heads[layer])}
        slots.update({h: ("window", j) for j, h in enumerate(self.window_kv_heads[layer])})
        return tuple(slots[h] for h in range(self.num_kv_heads))

    @cached_property
    def promoted_kv_heads(self) -> tuple[tuple[int, ...], ...]:
        """Per layer, full KV heads without a retrieval query head (still computed as local heads)."""
        return tuple(tuple(h for h in full if h not in kv)
                     for full, kv in zip(self.full_kv_heads, self.retrieval_kv_heads))

    # ------------------------------------------------------------------ bytes
    @property
    def kv_bytes_per_head(self) -> int:
        """Bytes per token of one KV head (K and V)."""
        return 2 * self.head_size * _dtype_size(self.kv_dtype)

    @property
    def index_bytes_per_slot(self) -> int:
        return self.index_dim * _dtype_size(self.index_dtype)

    def dense_bytes_per_token(self) -> int:
        """vLLM's stock layout on this rank: every KV head keeps every token (no index cache)."""
        return self.num_layers * self.num_kv_heads * self.kv_bytes_per_head

    def full_bytes_per_token(self) -> int:
        """This plan on this rank: bytes per token of the caches that keep every token."""
        return self.num_layers * (self.num_full_kv_heads * self.kv_bytes_per_head
                                  + self.index_width * self.index_bytes_per_slot)

    def ideal_full_bytes_per_token(self) -> int:
        """The ideal per-layer layout on this rank (no promoted heads, no padded slots)."""
        return sum(len(kv) * self.kv_bytes_per_head + len(h) * self.index_bytes_per_slot
                   for kv, h in zip(self.retrieval_kv_heads, self.retrieval_heads))

    def window_bytes_per_token(self) -> int:
        """This plan: bytes per token of the window caches (for the tokens they hold)."""
        return self.num_layers * self.num_window_kv_heads * self.kv_bytes_per_head

    def window_tokens(self, context: int) -> int:
        """Tokens a window KV head holds for a sequence of ``context`` tokens (sinks + window)."""
        return min(context, self.sink_tokens + self.window)

    def bytes_per_sequence(self, context: int, kind: str = "planned") -> int:
        """KV bytes one sequence of ``context`` tokens needs on this rank, ignoring block rounding.

        ``kind``: ``"dense"`` (stock vLLM), ``"ideal"`` (per-layer counts, no padding) or
        ``"planned"`` (this plan).
        """
        held = self.window_tokens(context)
        if kind == "dense":
            return context * self.dense_bytes_per_token()
        if kind == "planned":
            return context * self.full_bytes_per_token() + held * self.window_bytes_per_token()
        if kind == "ideal":
            window_heads = sum(self.num_kv_heads - len(kv) for kv in self.retrieval_kv_heads)
            return context * self.ideal_full_bytes_per_token() + held * window_heads * self.kv_bytes_per_head
        raise ValueError(f"unknown kind {kind!r}")

    def capacity_ratio(self, context: int, kind: str = "planned") -> float:
        """How many more sequences of ``context`` tokens fit than with the dense layout."""
        return self.bytes_per_sequence(context, "dense") / self.bytes_per_sequence(context, kind)

    def vllm_bytes_per_sequence(self, context: int, max_in_flight_tokens: int) -> int:
        """What vLLM reserves per sequence of ``context`` tokens (its ``max_memory_usage_bytes``):
        whole blocks, and a window cache that also holds the in-flight tokens of chunked prefill
        (``max_in_flight_tokens``: vLLM's ``VllmConfig.max_in_flight_tokens``)."""
        b, page = self.blocks, self.blocks.page_size_bytes
        if not self.has_window_cache:
            per_layer = _cdiv(context, b.full) * b.full * self.num_full_kv_heads * self.kv_bytes_per_head
            if self.has_index_cache:
                per_layer += _cdiv(context, b.index) * b.index * self.index_width * self.index_bytes_per_slot
            return self.num_layers * per_layer
        blocks = _cdiv(context, b.full)
        if self.has_index_cache:
            blocks += _cdiv(context, b.index)
        window = _cdiv(min(self.window - 1 + max_in_flight_tokens, context), b.window) + 1 + self.num_sink_blocks
        blocks += min(window, _cdiv(context, b.window))
        return self.num_layers * blocks * page

    def vllm_capacity_ratio(self, context: int, max_in_flight_tokens: int, dense_block_size: int = 16) -> float:
        """The ratio vLLM's "Maximum concurrency" log line should show against the stock layout."""
        dense = self.num_layers * _cdiv(context, dense_block_size) * dense_block_size * self.num_kv_heads \
            * self.kv_bytes_per_head
        return dense / self.vllm_bytes_per_sequence(context, max_in_flight_tokens)

    def summary(self, context: int = 131072) -> str:
        """One line for logs and reports."""
        b = self.blocks
        return (f"R={self.num_full_kv_heads}/{self.num_kv_heads} full KV heads, n={self.index_width} index "
                f"slots, blocks full/window/index={b.full}/{b.window}/{b.index} "
                f"(page {b.page_size_bytes} B, prefix-hit granularity {b.scheduler_block_size}), "
                f"promoted KV heads {self.padding.promoted_kv_heads}, padded index slots "
                f"{self.padding.padded_index_slots}, padding {100 * self.padding.wasted_fraction:.1f}% of "
                f"full-history bytes; capacity vs dense at {context} tokens: "
                f"{self.capacity_ratio(context):.2f}x (ideal {self.capacity_ratio(context, 'ideal'):.2f}x)")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
