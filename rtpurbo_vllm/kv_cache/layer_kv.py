"""One layer's view of the :class:`~rtpurbo_vllm.kv_cache.layout.KVLayout`: the seam the impl, the
prefill and the kernels share.

:class:`LayerKV` knows, for one ``Attention`` layer on this rank, which unit (and slot) holds each of
its KV heads and index heads, which KV-cache group's metadata addresses each kind, and (once vLLM has
bound the caches, :meth:`LayerKV.bind`) the kernels' per-head descriptors
(:class:`~rtpurbo_vllm.triton_kernels.paged_heads.PagedHeads`). The full layout is the special case
of one full unit holding the layer's KV heads in order.

Kinds as the kernels number them: K/V kind 0 is ``"full"`` (the layer's own KV-cache group), kind 1
``"window"``; index heads are kind 0 of their own descriptor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rtpurbo_vllm.kv_cache.layout import FULL, INDEX, WINDOW, KVLayout, unit_name
from rtpurbo_vllm.kv_cache.side_layers import unit_tensor
from rtpurbo_vllm.triton_kernels.paged_heads import PagedHeads, PageTable

KV_KINDS = (FULL, WINDOW)
"""K/V kinds in the kernels' numbering (``PagedHeads.head_kind``)."""


@dataclass(frozen=True)
class KVPart:
    """A paged view of some of a layer's KV heads as a step reads them (one FA3 call's K/V).

    Attributes:
        key_cache, value_cache: ``[num_pages, P, H_p, D]`` (last dimension contiguous, other strides
            free; float8_e4m3fn for fp8 units).
        block_table: ``[B, max_pages]`` int32 of the step's sequences.
        kv_head_ids: the layer's KV heads in the view, in its head order.
        kv_heads: ``[H_p]`` int64 on the device, the same (None: every KV head of the layer, in order).
        is_window: the view holds only sink and window tokens (other pages may be vLLM's null block).
    """

    key_cache: torch.Tensor
    value_cache: torch.Tensor
    block_table: torch.Tensor
    kv_head_ids: tuple[int, ...]
    kv_heads: torch.Tensor | None = None
    is_window: bool = False


@dataclass(frozen=True)
class CachePart:
    """A run of the layer's KV heads in consecutive slots of one unit (one FA3 call in the prefill).

    Attributes:
        kind: ``"full"`` or ``"window"``.
        unit: index into :attr:`LayerKV.kv_units`.
        first_slot: the run's first slot in the unit.
        kv_heads: the layer's KV heads of the run, in slot order (ascending).
    """

    kind: str
    unit: int
    first_slot: int
    kv_heads: tuple[int, ...]


class LayerKV:
    """Where one layer's heads live and how a step addresses them.

    Args:
        layout: this rank's KV layout.
        layer: the layer's index in the model.
        layer_names: every ``Attention`` layer's name, in model order (unit names derive from them).
    """

    def __init__(self, layout: KVLayout, layer: int, layer_names: tuple[str, ...]) -> None:
        places = layout.places[layer]
        self.layout = layout
        self.kv_units = tuple(sorted({(p.kind, p.unit) for p in places.kv},
                                     key=lambda kind_unit: (KV_KINDS.index(kind_unit[0]), kind_unit[1])))
        self.index_units = tuple(sorted({p.unit for p in places.index}))
        self.kv_unit_names = tuple(unit_name(layer_names, kind, unit) for kind, unit in self.kv_units)
        self.index_unit_names = tuple(unit_name(layer_names, INDEX, unit) for unit in self.index_units)
        self.head_unit = tuple(self.kv_units.index((p.kind, p.unit)) for p in places.kv)
        self.head_slot = tuple(p.slot for p in places.kv)
        self.head_kind = tuple(KV_KINDS.index(p.kind) for p in places.kv)
        self.index_head_unit = tuple(self.index_units.index(p.unit) for p in places.index)
        self.index_head_slot = tuple(p.slot for p in places.index)
        # Metadata of the window and index groups sits under any of their units' names.
        self.window_group = unit_name(layer_names, WINDOW, 0) if layout.has(WINDOW) else None
        self.index_group = unit_name(layer_names, INDEX, 0) if layout.has(INDEX) else None
        parts: list[CachePart] = []
        for h, p in enumerate(places.kv):
            unit = self.kv_units.index((p.kind, p.unit))
            last = parts[-1] if parts else None
            if last and last.unit == unit and last.first_slot + len(last.kv_heads) == p.slot:
                parts[-1] = CachePart(p.kind, unit, last.first_slot, (*last.kv_heads, h))
            else:
                parts.append(CachePart(p.kind, unit, p.slot, (h,)))
        self.parts = tuple(parts)
        self.kv: PagedHeads | None = None
        self.index: PagedHeads | None = None
        self.part_kv_heads: tuple[torch.Tensor | None, ...] = ()

    @property
    def is_bound(self) -> bool:
        return self.kv is not None

    def bind(self, static_forward_context: dict) -> None:
        """Builds the kernels' descriptors from the unit tensors vLLM bound, and per part its KV heads
        (``[H_p]`` int64 on the device; None for a part holding every KV head in order). Call after vLLM
        bound a KV cache (again after it binds a new one) and before a CUDA-graph capture (small
        host-to-device copies)."""
        shapes = self.layout.units
        kv = [unit_tensor(static_forward_context[n].kv_cache, kind, shapes[kind].width)
              for n, (kind, _) in zip(self.kv_unit_names, self.kv_units)]
        self.kv = PagedHeads.from_units(kv, self.head_unit, self.head_slot, self.head_kind)
        if self.index_units:
            index = [unit_tensor(static_forward_context[n].kv_cache, INDEX, shapes[INDEX].width)
                     for n in self.index_unit_names]
            self.index = PagedHeads.from_units(index, self.index_head_unit, self.index_head_slot)
        every = tuple(range(self.layout.num_kv_heads))
        self.part_kv_heads = tuple(
            None if part.kv_heads == every else torch.tensor(part.kv_heads, dtype=torch.long, device=self.kv.device)
            for part in self.parts)

    def kv_tables(self, block_tables: dict[str, torch.Tensor]) -> list[PageTable | None]:
        """Per K/V kind the layer uses, its :class:`PageTable` for this step (``block_tables``: the
        kind's ``[B, max_pages]`` int32 rows for the step's sequences); None for a kind it doesn't use."""
        return [None if geometry is None else self.kv.table(k, block_tables[KV_KINDS[k]])
                for k, geometry in enumerate(self.kv.geometry)]

    def kv_parts(self, block_tables: dict[str, torch.Tensor]) -> list[KVPart]:
        """The layer's parts as the prefill reads them, with the step's block tables per kind."""
        parts = []
        for part, kv_heads in zip(self.parts, self.part_kv_heads):
            unit = self.kv.units[part.unit][:, :, part.first_slot:part.first_slot + len(part.kv_heads)]
            if unit.dtype == torch.uint8:
                unit = unit.view(torch.float8_e4m3fn)
            d = unit.shape[-1] // 2
            parts.append(KVPart(unit[..., :d], unit[..., d:], block_tables[part.kind], part.kv_heads, kv_heads,
                                part.kind == WINDOW))
        return parts
