"""The memory layout of RTPurbo's KV cache: which heads keep every token, and where each head lives.

Per tensor-parallel rank, a KV head whose query heads include a retrieval head keeps the whole
history (a *full* KV head); every other KV head keeps only the sink tokens and the last ``window``
tokens (a *window* KV head); every retrieval query head keeps a ``DI``-dim index key per token (in the
model's dtype, or in fp8, by default with an fp8 K/V cache: :func:`index_key_dtype`).

vLLM's KV-cache manager groups cache layers by equal spec, gives each group one block table, and
backs a block id by one page in each of ``group_size`` shared tensors; groups of unequal size pad
the smaller ones with whole layers of memory. So the heads are stored in **units**: cache layers of
``slots`` heads each, ``count`` units per kind and the same ``count`` for every kind (no padding
layers), with one page size for every kind (no page padding):

==========  =======================================  =================================================
kind        vLLM spec of each unit                   unit tensor (physical)
==========  =======================================  =================================================
``full``    ``RTPurboFullSpec(slots_f, D, Pf)``      ``[B, Pf, slots_f, 2D]`` (FlashAttention layout)
``window``  ``SinkWindowSpec(slots_w, D, W, Pw)``    ``[B, Pw, slots_w, 2D]``
``index``   ``RTPurboIndexSpec(DI * slots_i, Pi)``   ``[B, Pi, slots_i * DI]``
==========  =======================================  =================================================

Heads are packed into units in (layer, head) order, so a unit may hold heads of several layers and
a layer's heads may span two units; the kernels address every head through its own
``(kind, unit, slot)`` (:class:`HeadPlace`). The first ``num_layers`` full units are the model's
``Attention`` layers themselves (each must own a spec to get metadata), the others are side layers
(:mod:`.side_layers`). Every head is stored exactly once; the only waste is the empty slots of the
last units of each kind (``count * slots - heads``), which :meth:`KVLayout.summary` reports.

Two layouts share this machinery:

* ``"compact"``: full units hold the retrieval KV heads, window units the others; ``count`` and the
  slots per unit are chosen to minimise the bytes a long sequence needs (:func:`plan_unit_count`).
* ``"full"``: every KV head is full, one unit per layer holding its KV heads in order (vLLM's stock
  cache), and index units beside them in the same KV-cache group (one block size, one block table).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rtpurbo_vllm.head_layout import HeadLayout

if TYPE_CHECKING:
    from rtpurbo_vllm.artifacts import RTPurboArtifact

KV_LAYOUTS = ("compact", "full")
FULL, WINDOW, INDEX = "full", "window", "index"
KINDS = (FULL, WINDOW, INDEX)
DEFAULT_BLOCK_UNIT = 16
# Prefix-cache hits land on multiples of lcm(block sizes); keep that below this many tokens when possible.
DEFAULT_MAX_SCHEDULER_BLOCK = 4096
# The context length whose memory the unit plan minimises (a long-context request).
DEFAULT_REFERENCE_TOKENS = 131072
# Index-slot padding is weighed against page size at this context length (see plan_block_sizes).
PAGE_REFERENCE_TOKENS = 16384
INDEX_KEY_DTYPES = ("auto", "model", "fp8_e4m3")
"""Storage of the index keys: ``"model"`` the model's activation dtype, ``"fp8_e4m3"`` one byte per value
(uint8 bytes of unscaled float8_e4m3fn, saturated at +-448), ``"auto"`` (the default) the K/V cache's
precision: e4m3 with an fp8 K/V cache (whose keys vLLM stores unscaled too, at its default ``k_scale`` of
1), the model's dtype otherwise."""


def index_key_dtype(setting: str, model_dtype: torch.dtype, kv_dtype: torch.dtype) -> torch.dtype:
    """The index units' torch dtype for ``setting`` (one of :data:`INDEX_KEY_DTYPES`), the model's activation
    dtype and the K/V cache's (``torch.uint8`` for fp8 caches). e4m3 halves the index keys' bytes; on the
    two test models it keeps the decode recall (``rtpurbo-calibrate evaluate --index-key-dtype``), but its
    3-bit mantissa moves block masses where index scores are large."""
    if setting not in INDEX_KEY_DTYPES:
        raise ValueError(f"unknown index key dtype {setting!r}; expected one of {INDEX_KEY_DTYPES}")
    fp8 = setting == "fp8_e4m3" or (setting == "auto" and kv_dtype == torch.uint8)
    return torch.uint8 if fp8 else model_dtype


@dataclass(frozen=True)
class BlockPlan:
    """Block sizes (tokens per vLLM block) of the three kinds of unit and their common page size.

    Attributes:
        full: block size of the full units.
        window: block size of the window units (None without window units).
        index: block size of the index units (None without index units).
        index_slots: index slots per unit (possibly padded up so that the pages divide).
        page_size_bytes: bytes of one page of every unit (equal pages), or of a full unit when there
            are no window units (then every unit shares one block size and one KV-cache group, and
            page sizes may differ).
    """

    full: int
    window: int | None
    index: int | None
    index_slots: int
    page_size_bytes: int

    @property
    def block_sizes(self) -> tuple[int, ...]:
        return tuple(b for b in (self.full, self.window, self.index) if b is not None)

    @property
    def scheduler_block_size(self) -> int:
        """vLLM's scheduler block (lcm of the group block sizes): the prefix-cache hit granularity."""
        return math.lcm(*self.block_sizes)


def plan_block_sizes(full_slots: int, window_slots: int, index_slots: int, kv_bytes_per_head: int,
                     index_bytes_per_slot: int, block_unit: int = DEFAULT_BLOCK_UNIT,
                     max_scheduler_block: int = DEFAULT_MAX_SCHEDULER_BLOCK,
                     reference_tokens: int = PAGE_REFERENCE_TOKENS) -> BlockPlan:
    """Chooses block sizes giving every kind of unit the same page size.

    With ``f = slots_f*kv``, ``w = slots_w*kv`` and ``i = slots_i'*c`` bytes per token, the smallest
    common page is ``lcm(unit*f, unit*w, unit*i)`` and the block sizes are that page over ``f``, ``w``
    and ``i`` (multiples of ``unit`` by construction). ``slots_i' >= slots_i`` is searched: a padded
    index slot costs ``c`` bytes per token, a large page about 1.5 pages per unit and sequence, and
    the scheduler block (lcm of the block sizes) is vLLM's prefix-cache hit granularity. Among the
    widths whose scheduler block is at most ``max_scheduler_block`` (all widths if none is), the one
    with the least ``(slots_i' - slots_i) * c * reference_tokens + 1.5 * page`` wins.

    Args:
        full_slots: KV heads per full unit (>= 1).
        window_slots: KV heads per window unit (0: no window units).
        index_slots: index slots per index unit (0: no index units).
        kv_bytes_per_head: bytes per token of one KV head (K and V: ``2 * D * dtype size``).
        index_bytes_per_slot: bytes per token of one index slot (``DI * dtype size``).
        block_unit: every block size is a multiple of this (the kernels' block size).
        max_scheduler_block: the largest prefix-cache hit granularity accepted when avoidable.
        reference_tokens: the context length at which index padding is weighed against page size.
    """
    if full_slots < 1 or window_slots < 0 or index_slots < 0:
        raise ValueError(f"bad slot counts full={full_slots}, window={window_slots}, index={index_slots}")
    full_bytes = full_slots * kv_bytes_per_head
    if window_slots == 0:
        # One KV-cache group (UniformTypeKVCacheSpecs): one block size, per-unit page sizes may differ.
        return BlockPlan(full=block_unit, window=None, index=block_unit if index_slots else None,
                         index_slots=index_slots, page_size_bytes=block_unit * full_bytes)
    window_bytes = window_slots * kv_bytes_per_head
    base_page = block_unit * math.lcm(full_bytes, window_bytes)
    if index_slots == 0:
        return BlockPlan(full=base_page // full_bytes, window=base_page // window_bytes, index=None,
                         index_slots=0, page_size_bytes=base_page)
    candidates = []
    for slots in range(index_slots, 2 * index_slots + block_unit + 1):
        slot_bytes = slots * index_bytes_per_slot
        page = math.lcm(base_page, block_unit * slot_bytes)
        candidates.append(BlockPlan(full=page // full_bytes, window=page // window_bytes,
                                    index=page // slot_bytes, index_slots=slots, page_size_bytes=page))
    allowed = [c for c in candidates if c.scheduler_block_size <= max_scheduler_block] or candidates

    def cost(c: BlockPlan) -> tuple[float, int]:
        padding = (c.index_slots - index_slots) * index_bytes_per_slot * reference_tokens
        return padding + 1.5 * c.page_size_bytes, c.scheduler_block_size

    return min(allowed, key=cost)


@dataclass(frozen=True)
class UnitShape:
    """The cache units of one kind (every unit of a kind has the same spec).

    Attributes:
        kind: ``"full"``, ``"window"`` or ``"index"``.
        count: units of this kind (the same for every kind of a compact layout).
        slots: heads per unit.
        block_size: tokens per vLLM block.
        width: values per head and token (``2 * D`` for K|V, ``DI`` for index keys).
        dtype: the unit tensor's dtype.
    """

    kind: str
    count: int
    slots: int
    block_size: int
    width: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token takes in one unit."""
        return self.slots * self.width * _dtype_size(self.dtype)

    @property
    def page_size_bytes(self) -> int:
        return self.block_size * self.bytes_per_token


@dataclass(frozen=True)
class HeadPlace:
    """Where one head's vectors live: slot ``slot`` of unit ``unit`` of kind ``kind``."""

    kind: str
    unit: int
    slot: int


@dataclass(frozen=True)
class LayerPlaces:
    """Where one layer's heads live (ids local to the rank).

    Attributes:
        kv: per KV head of the layer, its place (kind ``"full"`` or ``"window"``).
        index: per retrieval query head of the layer (in ``retrieval_heads`` order), its index slot.
    """

    kv: tuple[HeadPlace, ...]
    index: tuple[HeadPlace, ...]


def unit_name(layer_names: tuple[str, ...], kind: str, unit: int) -> str:
    """The cache layer of unit ``unit`` of ``kind``: full units ``< num_layers`` are the model's
    ``Attention`` layers; every other unit is a side layer ``{layer}.rtp_{kind}{k}`` of layer
    ``unit % num_layers`` (one numeric component, as vLLM's ``extract_layer_index`` needs)."""
    num_layers = len(layer_names)
    home, k = layer_names[unit % num_layers], unit // num_layers
    if kind == FULL and k == 0:
        return home
    return f"{home}.rtp_{kind}{k}"


def _pack(heads_per_layer: list[list[int]], slots: int, kind: str) -> list[dict[int, HeadPlace]]:
    """Packs heads in (layer, head) order into units of ``slots`` slots; per layer, head -> place."""
    places, position = [], 0
    for heads in heads_per_layer:
        layer = {}
        for h in heads:
            layer[h] = HeadPlace(kind, position // slots, position % slots)
            position += 1
        places.append(layer)
    return places


def plan_unit_count(full_heads: int, window_heads: int, index_heads: int, num_layers: int,
                    kv_bytes_per_head: int, index_bytes_per_slot: int, cached_tokens: int,
                    block_unit: int = DEFAULT_BLOCK_UNIT, max_scheduler_block: int = DEFAULT_MAX_SCHEDULER_BLOCK,
                    reference_tokens: int = DEFAULT_REFERENCE_TOKENS) -> tuple[int, int, int, BlockPlan]:
    """Chooses the unit count ``g`` (>= ``num_layers``) and slots per unit of a compact layout.

    For each ``g`` the slots are ``ceil(heads / g)`` per kind and :func:`plan_block_sizes` sizes the
    pages; the plan whose units need the fewest bytes for one sequence of ``reference_tokens`` tokens
    (full and index units for every token, window units for ``cached_tokens`` plus a page, 1.5 pages
    of rounding per unit) wins, preferring scheduler blocks within ``max_scheduler_block``.
    Head counts are the largest of any tensor-parallel rank.

    Returns:
        ``(g, full_slots, window_slots, blocks)`` (index slots: ``blocks.index_slots``).
    """
    best = None
    for count in range(num_layers, max(num_layers, full_heads, window_heads, index_heads) + 1):
        full_slots = max(1, -(-full_heads // count))
        window_slots = -(-window_heads // count)
        index_slots = -(-index_heads // count)
        blocks = plan_block_sizes(full_slots, window_slots, index_slots, kv_bytes_per_head,
                                  index_bytes_per_slot, block_unit, max_scheduler_block)
        window_tokens = min(reference_tokens, cached_tokens + (blocks.window or 0))
        per_token = full_slots * kv_bytes_per_head + blocks.index_slots * index_bytes_per_slot
        units_per_kind = 1 + bool(window_slots) + bool(index_slots)
        total = count * (reference_tokens * per_token + window_tokens * window_slots * kv_bytes_per_head
                         + 1.5 * units_per_kind * blocks.page_size_bytes)
        key = (blocks.scheduler_block_size > max_scheduler_block, total, count)
        if best is None or key < best[0]:
            best = (key, (count, full_slots, window_slots, blocks))
    return best[1]


@dataclass(frozen=True)
class KVLayout:
    """The KV-cache layout of one tensor-parallel rank (the same unit specs on every rank).

    Build with :meth:`build` or :meth:`from_artifact`. Head ids are local to the rank
    (``HeadLayout.for_rank``).

    Attributes:
        name: ``"compact"`` or ``"full"``.
        num_heads: query heads per layer on this rank (HQ).
        num_kv_heads: KV heads per layer on this rank (H).
        head_size: D.
        index_dim: DI.
        sink_tokens: leading tokens a local head always sees.
        window: tokens a window unit keeps behind the newest one (the serving window).
        dense_threshold: sequences shorter than this run dense on every head, so window units keep
            every token until a sequence reaches it (0: never).
        retrieval_heads: per layer, the rank's retrieval query heads (index places in this order).
        units: per kind present, its :class:`UnitShape`.
        places: per layer, where its heads live.
        blocks: block sizes and page size.
        tp_rank, tp_size: the rank this layout is for.
    """

    name: str
    num_heads: int
    num_kv_heads: int
    head_size: int
    index_dim: int
    sink_tokens: int
    window: int
    dense_threshold: int
    retrieval_heads: tuple[tuple[int, ...], ...]
    units: dict[str, UnitShape]
    places: tuple[LayerPlaces, ...]
    blocks: BlockPlan
    tp_rank: int = 0
    tp_size: int = 1

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, layout: HeadLayout, *, name: str = "compact", head_size: int,
              kv_dtype: torch.dtype = torch.bfloat16, index_dtype: torch.dtype | None = None,
              index_dim: int = 16, sink_tokens: int = 4, window: int = 8192, dense_threshold: int = 0,
              tp_rank: int = 0, tp_size: int = 1, block_unit: int = DEFAULT_BLOCK_UNIT,
              max_scheduler_block: int = DEFAULT_MAX_SCHEDULER_BLOCK) -> KVLayout:
        """Plans rank ``tp_rank``'s layout from the model's global head layout.

        Slot counts are maxima over all ranks, so every rank declares the same specs (vLLM asserts it).
        """
        if name not in KV_LAYOUTS:
            raise ValueError(f"unknown KV layout {name!r}; expected one of {KV_LAYOUTS}")
        index_dtype = index_dtype or kv_dtype
        ranks = [layout.for_rank(r, tp_size) for r in range(tp_size)]
        mine = ranks[tp_rank]
        num_layers, hkv = mine.num_layers, mine.num_kv_heads
        kv_bytes = 2 * head_size * _dtype_size(kv_dtype)
        slot_bytes = index_dim * _dtype_size(index_dtype)

        def full_heads_of(rank_layout: HeadLayout) -> list[list[int]]:
            if name == "full":
                return [list(range(hkv))] * num_layers
            return [list(rank_layout.retrieval_kv_heads(l)) for l in range(num_layers)]

        full_counts = [sum(map(len, full_heads_of(r))) for r in ranks]
        most_full, most_window = max(full_counts), max(num_layers * hkv - n for n in full_counts)
        most_index = max(r.num_retrieval_heads for r in ranks)
        if name == "full" or most_window == 0:
            count, full_slots, window_slots = num_layers, -(-most_full // num_layers), 0
            blocks = plan_block_sizes(full_slots, 0, -(-most_index // count), kv_bytes, slot_bytes, block_unit)
        else:
            cached = max(window, dense_threshold) + sink_tokens
            count, full_slots, window_slots, blocks = plan_unit_count(
                most_full, most_window, most_index, num_layers, kv_bytes, slot_bytes, cached, block_unit,
                max_scheduler_block)
        full = full_heads_of(mine)
        window_heads = [[h for h in range(hkv) if h not in f] for f in full]
        full_places = _pack(full, full_slots, FULL)
        window_places = _pack(window_heads, max(window_slots, 1), WINDOW)
        index_places = _pack([list(range(len(h))) for h in mine.retrieval_heads], max(blocks.index_slots, 1), INDEX)
        places = tuple(LayerPlaces(kv=tuple({**full_places[l], **window_places[l]}[h] for h in range(hkv)),
                                   index=tuple(index_places[l][j] for j in range(len(mine.retrieval_heads[l]))))
                       for l in range(num_layers))
        units = {FULL: UnitShape(FULL, count, full_slots, blocks.full, 2 * head_size, kv_dtype)}
        if window_slots:
            units[WINDOW] = UnitShape(WINDOW, count, window_slots, blocks.window, 2 * head_size, kv_dtype)
        if blocks.index_slots:
            units[INDEX] = UnitShape(INDEX, count, blocks.index_slots, blocks.index, index_dim, index_dtype)
        return cls(name=name, num_heads=mine.num_heads, num_kv_heads=hkv, head_size=head_size,
                   index_dim=index_dim, sink_tokens=sink_tokens, window=window,
                   dense_threshold=dense_threshold if window_slots else 0,
                   retrieval_heads=mine.retrieval_heads, units=units, places=places, blocks=blocks,
                   tp_rank=tp_rank, tp_size=tp_size)

    @classmethod
    def from_artifact(cls, artifact: RTPurboArtifact, *, name: str = "compact", kv_dtype: torch.dtype,
                      index_dtype: torch.dtype | None = None, tp_rank: int = 0, tp_size: int = 1,
                      block_unit: int = DEFAULT_BLOCK_UNIT) -> KVLayout:
        """The layout of an artifact's model (``SparsityParams`` give sinks, window, threshold and DI)."""
        p = artifact.params
        return cls.build(artifact.layout, name=name, head_size=artifact.model.head_dim, kv_dtype=kv_dtype,
                         index_dtype=index_dtype, index_dim=p.index_dim, sink_tokens=p.sink_tokens,
                         window=p.window, dense_threshold=p.dense_threshold, tp_rank=tp_rank,
                         tp_size=tp_size, block_unit=block_unit)

    # ------------------------------------------------------------------ shape facts
    @property
    def num_layers(self) -> int:
        return len(self.places)

    @property
    def unit_count(self) -> int:
        """Units per kind (g)."""
        return self.units[FULL].count

    def has(self, kind: str) -> bool:
        return kind in self.units

    @property
    def num_sink_blocks(self) -> int:
        """Window-unit blocks that hold the sink tokens (kept for the whole request)."""
        if not self.has(WINDOW) or self.sink_tokens == 0:
            return 0
        return -(-self.sink_tokens // self.units[WINDOW].block_size)

    def unit_names(self, layer_names: tuple[str, ...], kind: str) -> tuple[str, ...]:
        """The cache-layer name of every unit of ``kind`` (see :func:`unit_name`)."""
        if len(layer_names) != self.num_layers:
            raise ValueError(f"{len(layer_names)} layer names for a {self.num_layers}-layer layout")
        return tuple(unit_name(layer_names, kind, u) for u in range(self.units[kind].count))

    def side_units(self, layer: int) -> tuple[tuple[str, int], ...]:
        """``(kind, unit)`` of the side layers that layer ``layer`` creates (its home units)."""
        return tuple((kind, u) for kind, shape in self.units.items() for u in range(shape.count)
                     if u % self.num_layers == layer and not (kind == FULL and u < self.num_layers))

    # ------------------------------------------------------------------ bytes
    @property
    def bytes_per_block(self) -> int:
        """Bytes of vLLM's KV pool per block id: one page in each of the ``g`` tensors that the kinds'
        groups share; without window units (one group, a tensor per unit) one page of every unit."""
        pages = (shape.page_size_bytes for shape in self.units.values())
        return self.unit_count * (self.blocks.page_size_bytes if self.has(WINDOW) else sum(pages))

    def empty_slots(self) -> dict[str, int]:
        """Per kind, unit slots that hold no head on this rank."""
        used = {FULL: 0, WINDOW: 0, INDEX: 0}
        for p in self.places:
            for q in (*p.kv, *p.index):
                used[q.kind] += 1
        return {kind: shape.count * shape.slots - used[kind] for kind, shape in self.units.items()}

    def bytes_per_sequence(self, context: int) -> int:
        """KV bytes one sequence of ``context`` tokens holds on this rank in decode (vLLM's whole
        blocks: the full and index units every token, window units sinks + window + the current block)."""
        total = 0
        for kind, shape in self.units.items():
            tokens = context
            if kind == WINDOW:
                held = max(self.window, self.dense_threshold) if context < self.dense_threshold else self.window
                tokens = min(context, held + shape.block_size) + self.num_sink_blocks * shape.block_size
                tokens = min(tokens, _cdiv(context, shape.block_size) * shape.block_size)
            total += shape.count * _cdiv(tokens, shape.block_size) * shape.page_size_bytes
        return total

    def vllm_bytes_per_sequence(self, context: int, max_in_flight_tokens: int) -> int:
        """What vLLM's start-up arithmetic reserves per sequence of ``context`` tokens (its "Maximum
        concurrency" line): whole blocks of every kind, the window units' admission cap
        (``max(window, dense_threshold) - 1 + max_in_flight_tokens`` tokens, a block more and the sink
        blocks; vLLM's ``VllmConfig.max_in_flight_tokens``)."""
        total = 0
        for kind, shape in self.units.items():
            blocks = _cdiv(context, shape.block_size)
            if kind == WINDOW:
                held = max(self.window, self.dense_threshold) - 1 + max_in_flight_tokens
                blocks = min(_cdiv(min(held, context), shape.block_size) + 1 + self.num_sink_blocks, blocks)
            total += shape.count * blocks * shape.page_size_bytes
        return total

    def vllm_capacity_ratio(self, context: int, max_in_flight_tokens: int,
                            baseline_dtype: torch.dtype | None = None) -> float:
        """The ratio of vLLM's "Maximum concurrency" lines, this layout against vLLM's stock cache."""
        return (self.dense_bytes_per_sequence(context, baseline_dtype)
                / self.vllm_bytes_per_sequence(context, max_in_flight_tokens))

    def dense_bytes_per_sequence(self, context: int, kv_dtype: torch.dtype | None = None,
                                 block_size: int = DEFAULT_BLOCK_UNIT) -> int:
        """What vLLM's stock cache (every KV head, every token) needs for the sequence on this rank,
        in ``kv_dtype`` (default: this layout's K/V dtype)."""
        dtype = kv_dtype or self.units[FULL].dtype
        return (self.num_layers * self.num_kv_heads * 2 * self.head_size * _dtype_size(dtype)
                * _cdiv(context, block_size) * block_size)

    def capacity_ratio(self, context: int, baseline_dtype: torch.dtype | None = None) -> float:
        """How many more sequences of ``context`` tokens fit than in vLLM's stock cache (of
        ``baseline_dtype``; default: this layout's K/V dtype)."""
        return self.dense_bytes_per_sequence(context, baseline_dtype) / self.bytes_per_sequence(context)

    def summary(self, context: int = DEFAULT_REFERENCE_TOKENS) -> str:
        """One line for logs and reports."""
        slots = ", ".join(f"{k} {s.count}x{s.slots} (block {s.block_size})" for k, s in self.units.items())
        empty = self.empty_slots()
        return (f"KV layout {self.name!r}: units {slots}; page {self.blocks.page_size_bytes} B, prefix-hit "
                f"granularity {self.blocks.scheduler_block_size} tokens; empty slots "
                + ", ".join(f"{k} {n}" for k, n in empty.items())
                + f"; capacity vs FLASH_ATTN (same KV dtype) at {context} tokens: {self.capacity_ratio(context):.2f}x")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
