"""Where each head's vectors live in vLLM's paged caches: the one addressing scheme of every kernel.

vLLM gives a cache *kind* several *unit* tensors of one shape ``[num_pages, P, slots, width]``
(``width = 2 * D`` for K|V packed as FlashAttention's layout, K = ``[..., :D]``, V = ``[..., D:]``;
``width = DI`` for index keys). One layer's heads are scattered over units (and a unit holds heads of
several layers): head ``h`` lives in unit ``head_unit[h]``, slot ``head_slot[h]``, and its tokens are
paged by the block table of its kind ``head_kind[h]``. Kinds of K/V: 0 = "full" (every token kept),
1 = "window" (only sinks + sliding window kept; other pages are vLLM's null block, never read). The
old one-tensor layout ``[num_pages, P, HKV, 2D]`` is one unit of kind 0 with slot ``h`` for head ``h``.

Two objects, split by lifetime:

- :class:`PagedHeads` (per layer, fixed): the units, the head -> (unit, slot, kind) maps, the geometry
  of each kind, and two small device tensors the kernels read: ``offsets [H]`` int64, the element
  offset of head ``h``'s slot 0 vector relative to ``base = units[0]``
  (``(units[u].data_ptr() - base.data_ptr()) // element_size + slot * slot_stride``), and
  ``kinds [H]`` int32. Kernels take ``base`` as their only cache pointer and address head ``h``'s
  token ``t`` at ``base + offsets[h] + page * page_stride + (t % P) * token_stride``: the units are
  separate allocations, reached through one pointer and int64 offsets in the GPU's flat address space
  (also valid under ``TRITON_INTERPRET=1`` on CPU tensors, whose pointers are host addresses).
- :class:`PageTable` (per step and kind): the kind's ``[B, max_pages]`` int32 block table (a view of
  a persistent buffer) and the kind's geometry, from :meth:`PagedHeads.table`.

CUDA graphs: kernels read only ``base`` (an address fixed for the life of the cache), ``offsets`` and
``kinds`` (persistent per layer) and the block tables passed per step (views of vLLM's persistent
buffers); launch grids depend only on shapes, and nothing is read back to the host.

FP8 units (vLLM's ``kv_cache_dtype="fp8"``/``"fp8_e4m3"``: ``torch.uint8`` bytes of float8_e4m3fn
values, or ``torch.float8_e4m3fn``) are passed to kernels as a float8_e4m3fn view (:meth:`PagedHeads.
kernel_base`); a value is ``fp8 * scale`` with the layer's ``k_scale``/``v_scale``.

:func:`gather` / :func:`scatter` are the plain PyTorch accessors the references use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

FP8_DTYPES = (torch.uint8, torch.float8_e4m3fn)
"""Unit dtypes read as float8_e4m3fn (vLLM stores fp8 caches as uint8 bytes)."""
FP8_MAX = 448.0
"""Largest finite float8_e4m3fn value; quantisation saturates to it."""


@dataclass(frozen=True)
class PageTable:
    """One cache kind's pages for one step.

    Attributes:
        block_table: ``[B, max_pages]`` int32 (unit last stride not required), page ids of each
            sequence's tokens: token ``t`` is on page ``block_table[b, t // page_size]``.
        page_size: P, tokens per page of this kind's units.
        page_stride: elements between pages of this kind's units (``unit.stride(0)``).
        token_stride: elements between tokens of a page (``unit.stride(1)``).
    """

    block_table: torch.Tensor
    page_size: int
    page_stride: int
    token_stride: int


@dataclass(frozen=True)
class PagedHeads:
    """Where the ``H`` heads of one layer live in one cache's unit tensors (build with :meth:`from_units`).

    Attributes:
        units: the unit tensors (one dtype and device; ``[num_pages, P, slots, width]`` each, unit
            last stride; units of one kind share shape and strides). Unreferenced units are allowed.
        head_unit, head_slot, head_kind: per head ``h``, its unit index, slot in that unit and kind.
        geometry: per kind ``k`` (0 .. max kind), ``(page_size, page_stride, token_stride)`` of its
            units, or None for a kind no head uses.
        offsets: ``[H]`` int64 on the units' device, element offsets from ``base`` (see module doc).
        kinds: ``[H]`` int32 on the units' device, ``head_kind``.
        base: ``units[0]``, the tensor kernels address every unit through.
        offset_align: largest power of two ``<= 16`` dividing every offset (a kernel alignment hint).
    """

    units: tuple[torch.Tensor, ...]
    head_unit: tuple[int, ...]
    head_slot: tuple[int, ...]
    head_kind: tuple[int, ...]
    geometry: tuple[tuple[int, int, int] | None, ...]
    offsets: torch.Tensor
    kinds: torch.Tensor
    base: torch.Tensor
    offset_align: int

    @classmethod
    def from_units(cls, units: Sequence[torch.Tensor], head_unit: Sequence[int], head_slot: Sequence[int],
                   head_kind: Sequence[int] | None = None) -> PagedHeads:
        """Checks the layout and computes the per-head offsets (one small host-to-device copy; call it
        once per layer, not per step).

        Args:
            units: unit tensors ``[num_pages, P, slots, width]``, one dtype and device, unit last stride.
            head_unit: ``[H]`` per head, index into ``units``.
            head_slot: ``[H]`` per head, slot in its unit (``< slots``).
            head_kind: ``[H]`` per head, its kind (``>= 0``); all heads of one unit share it. None: all 0.

        Raises:
            ValueError: with what is inconsistent.
        """
        units = tuple(units)
        head_unit, head_slot = tuple(int(u) for u in head_unit), tuple(int(s) for s in head_slot)
        head_kind = tuple(0 for _ in head_unit) if head_kind is None else tuple(int(k) for k in head_kind)
        if not units:
            raise ValueError("need at least one unit tensor")
        if not len(head_unit) == len(head_slot) == len(head_kind):
            raise ValueError(f"head_unit, head_slot and head_kind must have one entry per head, got "
                             f"{len(head_unit)}, {len(head_slot)} and {len(head_kind)}")
        base = units[0]
        for i, u in enumerate(units):
            if not isinstance(u, torch.Tensor) or u.dim() != 4:
                raise ValueError(f"unit {i} must be a [num_pages, P, slots, width] tensor, got "
                                 f"{getattr(u, 'shape', type(u).__name__)}")
            if u.dtype != base.dtype or u.device != base.device:
                raise ValueError(f"all units must share one dtype and device: unit {i} is {u.dtype} on {u.device}, "
                                 f"unit 0 is {base.dtype} on {base.device}")
            if u.stride(3) != 1:
                raise ValueError(f"unit {i} needs a unit stride in its last (width) dimension, got {u.stride()}")
            if u.shape[3] != base.shape[3]:
                raise ValueError(f"all units must have one width: unit {i} has {u.shape[3]}, unit 0 {base.shape[3]}")
        unit_kind: dict[int, int] = {}
        geometry: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        used: dict[tuple[int, int], int] = {}
        for h, (u, s, k) in enumerate(zip(head_unit, head_slot, head_kind)):
            if not 0 <= u < len(units):
                raise ValueError(f"head {h}: unit {u} out of range for {len(units)} units")
            if not 0 <= s < units[u].shape[2]:
                raise ValueError(f"head {h}: slot {s} out of range for unit {u} of shape {tuple(units[u].shape)}")
            if k < 0:
                raise ValueError(f"head {h}: kind {k} must be >= 0")
            if unit_kind.setdefault(u, k) != k:
                raise ValueError(f"unit {u} holds heads of kinds {unit_kind[u]} and {k}; a unit belongs to one kind")
            shape = (tuple(units[u].shape), tuple(units[u].stride()))
            if geometry.setdefault(k, shape) != shape:
                raise ValueError(f"units of kind {k} differ in shape/strides: {geometry[k]} and {shape} "
                                 f"(unit {u})")
            if used.setdefault((u, s), h) != h:
                raise ValueError(f"heads {used[(u, s)]} and {h} share unit {u} slot {s}")
        elem = base.element_size()
        offsets = []
        for u, s in zip(head_unit, head_slot):
            diff = units[u].data_ptr() - base.data_ptr()
            if diff % elem:
                raise ValueError(f"unit {u} is not aligned to its element size relative to unit 0")
            offsets.append(diff // elem + s * units[u].stride(2))
        align = 16
        while align > 1 and any(o % align for o in offsets):
            align //= 2
        num_kinds = max(head_kind, default=-1) + 1
        geo = tuple((geometry[k][0][1], geometry[k][1][0], geometry[k][1][1]) if k in geometry else None
                    for k in range(num_kinds))
        return cls(units=units, head_unit=head_unit, head_slot=head_slot, head_kind=head_kind, geometry=geo,
                   offsets=torch.tensor(offsets, dtype=torch.int64, device=base.device),
                   kinds=torch.tensor(head_kind, dtype=torch.int32, device=base.device), base=base,
                   offset_align=align)

    @classmethod
    def single(cls, cache: torch.Tensor) -> PagedHeads:
        """The one-tensor layout: ``cache [num_pages, P, H, width]``, head ``h`` in slot ``h``, kind 0."""
        heads = range(cache.shape[2])
        return cls.from_units([cache], [0 for _ in heads], list(heads), [0 for _ in heads])

    @property
    def num_heads(self) -> int:
        return len(self.head_unit)

    @property
    def num_kinds(self) -> int:
        return len(self.geometry)

    @property
    def width(self) -> int:
        return self.base.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def is_fp8(self) -> bool:
        """Whether the units hold float8_e4m3fn values (as uint8 bytes or float8_e4m3fn)."""
        return self.base.dtype in FP8_DTYPES

    def kernel_base(self) -> torch.Tensor:
        """``base`` as kernels take it: float8_e4m3fn for fp8 units (Triton's fp8e4nv), else itself."""
        return self.base.view(torch.float8_e4m3fn) if self.base.dtype == torch.uint8 else self.base

    def page_size(self, kind: int) -> int:
        return self._geometry(kind)[0]

    def table(self, kind: int, block_table: torch.Tensor) -> PageTable:
        """The :class:`PageTable` of ``kind`` for a step's ``block_table`` ``[B, max_pages]`` int32
        (no copy, no device work: pass a view of a persistent buffer for CUDA graphs)."""
        page_size, page_stride, token_stride = self._geometry(kind)
        return PageTable(block_table, page_size, page_stride, token_stride)

    def clone(self) -> PagedHeads:
        """The same layout over copies of the units (references write into these)."""
        return PagedHeads.from_units([u.clone() for u in self.units], self.head_unit, self.head_slot, self.head_kind)

    def _geometry(self, kind: int) -> tuple[int, int, int]:
        if not 0 <= kind < len(self.geometry) or self.geometry[kind] is None:
            raise ValueError(f"no head of this layout has kind {kind}")
        return self.geometry[kind]

    def check_attention_dtypes(self, q_dtype: torch.dtype, k_scale: torch.Tensor | None,
                               v_scale: torch.Tensor | None) -> bool:
        """K|V units the attention kernels read with ``q_dtype`` queries: ``q_dtype`` itself, or fp8 with
        1-element float32 ``k_scale`` / ``v_scale``. Returns whether they are fp8; raises ValueError."""
        if not self.is_fp8:
            if self.dtype != q_dtype:
                raise ValueError(f"K/V units are {self.dtype}; expected q's {q_dtype} or fp8 (uint8 / "
                                 f"float8_e4m3fn)")
            return False
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            if s is None or s.numel() != 1 or s.dtype != torch.float32:
                raise ValueError(f"fp8 K/V need {name} as a 1-element float32 tensor, got "
                                 f"{None if s is None else (tuple(s.shape), s.dtype)}")
        return True

    def check_tables(self, tables: Sequence[PageTable], batch: int, what: str = "tables") -> None:
        """Raises ValueError unless ``tables[k]`` fits every kind ``k`` the heads use, for ``batch`` rows."""
        if len(tables) < self.num_kinds:
            raise ValueError(f"{what}: {len(tables)} page tables for heads of {self.num_kinds} kinds")
        for k, geo in enumerate(self.geometry):
            if geo is None:
                continue
            t = tables[k]
            if not isinstance(t, PageTable):
                raise ValueError(f"{what}[{k}] must be a PageTable, got {type(t).__name__}")
            if (t.page_size, t.page_stride, t.token_stride) != geo:
                raise ValueError(f"{what}[{k}] has (page_size, page_stride, token_stride) "
                                 f"{(t.page_size, t.page_stride, t.token_stride)}, the kind-{k} units {geo}; "
                                 f"build it with PagedHeads.table")
            bt = t.block_table
            if bt.dim() != 2 or bt.shape[0] != batch or bt.dtype != torch.int32:
                raise ValueError(f"{what}[{k}].block_table must be [B={batch}, max_pages] int32, got "
                                 f"{tuple(bt.shape)} {bt.dtype}")
            if bt.device != self.device:
                raise ValueError(f"{what}[{k}].block_table is on {bt.device}, the units on {self.device}")


def gather(paged: PagedHeads, tables: Sequence[PageTable], b: int, head: int, tokens: torch.Tensor) -> torch.Tensor:
    """``[n, width]`` in the units' dtype: head ``head``'s stored vectors of sequence ``b``'s ``tokens``
    (``[n]`` int), through its unit, slot and its kind's block table."""
    unit = paged.units[paged.head_unit[head]]
    table = tables[paged.head_kind[head]]
    tokens = tokens.to(device=unit.device, dtype=torch.long)
    pages = table.block_table[b].to(unit.device).long()[tokens // table.page_size]
    return unit[pages, tokens % table.page_size, paged.head_slot[head]]


def scatter(paged: PagedHeads, slot_mappings: Sequence[torch.Tensor], head: int, values: torch.Tensor) -> None:
    """Writes ``values`` ``[T, width]`` (the units' dtype) of head ``head`` in place at its kind's slot
    mapping (``[T]`` int, ``page * P + offset``; negative entries are skipped)."""
    unit = paged.units[paged.head_unit[head]]
    kind = paged.head_kind[head]
    page_size = paged.page_size(kind)
    slots = slot_mappings[kind].to(unit.device).long()
    valid = slots >= 0
    slots = slots[valid]
    unit[slots // page_size, slots % page_size, paged.head_slot[head]] = values[valid.to(values.device)].to(
        device=unit.device, dtype=unit.dtype)


def to_float(raw: torch.Tensor, scale: torch.Tensor | float | None = None) -> torch.Tensor:
    """float32 values of stored entries: fp8 bytes/values times ``scale``; other dtypes as they are."""
    if raw.dtype in FP8_DTYPES:
        s = 1.0 if scale is None else (scale.float().reshape(()).to(raw.device) if isinstance(scale, torch.Tensor)
                                       else float(scale))
        return raw.view(torch.float8_e4m3fn).float() * s
    return raw.float()


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """vLLM's ``reshape_and_cache_flash`` fp8 store: ``x / scale`` in float32, saturated to +-448,
    rounded to nearest-even float8_e4m3fn; returned as ``dtype`` (uint8 bytes or float8_e4m3fn)."""
    s = scale.float().reshape(()).to(x.device) if isinstance(scale, torch.Tensor) else float(scale)
    q = (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(dtype) if dtype == torch.uint8 else q
