"""Test builders for :class:`PagedHeads` layouts: one layer's heads scattered over several unit tensors
of several kinds, each kind with its own page size and block tables, every unheld entry garbage.

Test files load it by path (the tests run with ``--import-mode=importlib``, so sibling modules are not
importable by name). Shuffles use torch's generator, so the ``seed`` fixture replays them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rtpurbo_vllm.triton_kernels.paged_heads import PagedHeads, PageTable, quantize_fp8, scatter

FP8 = (torch.uint8, torch.float8_e4m3fn)


@dataclass
class KindSpec:
    """One cache kind of a test layout.

    Attributes:
        page_size: P of its units (a multiple of 16, as vLLM's).
        num_units: unit tensors of this kind (heads are scattered over them).
        slots: slots per unit (>= heads of this kind / num_units; spare slots hold other layers' garbage).
    """

    page_size: int
    num_units: int = 1
    slots: int = 1


def garbage_(t: torch.Tensor) -> torch.Tensor:
    """Fills ``t`` in place with values that show when read: NaN for floats, random bytes for fp8."""
    if t.dtype in FP8:
        b = t.view(torch.uint8)
        b.copy_(torch.randint(0, 256, t.shape, dtype=torch.uint8))
        b[..., ::7] = 0x7F    # a few NaN codes, which decode to NaN on the GPU
    else:
        t.fill_(float("nan"))
    return t


def kept_window(seq_lens: Sequence[int], sink_tokens: int, window: int, dense_threshold: int = 0):
    """``keep(b, tokens) -> bool mask`` of a window kind: sinks and the last ``window`` tokens (all of a
    sequence shorter than ``dense_threshold``)."""
    def keep(b, tokens):
        n = seq_lens[b]
        start = 0 if n < dense_threshold else max(n - window, 0)
        return (tokens < sink_tokens) | (tokens >= start)
    return keep


@dataclass
class Layout:
    """A built test layout: ``paged`` (the descriptor), ``tables`` (one :class:`PageTable` per kind),
    ``keeps`` (per kind, ``keep(b, tokens)``: which tokens the kind holds)."""

    paged: PagedHeads
    tables: list[PageTable]
    keeps: list[Callable]
    seq_lens: list[int]

    def slot_mapping(self, kind: int, b: int, tokens: torch.Tensor) -> torch.Tensor:
        """``[n]`` int64 slots (``page * P + offset``) of ``tokens`` of sequence ``b`` in ``kind``; -1 where
        the kind does not hold the token."""
        table = self.tables[kind]
        pages = table.block_table[b].cpu().long()[tokens // table.page_size]
        slots = pages * table.page_size + tokens % table.page_size
        return torch.where(self.keeps[kind](b, tokens), slots, -1)

    def fill(self, b: int, head: int, values: torch.Tensor) -> None:
        """Writes ``values`` ``[L, width]`` (the units' dtype) of head ``head`` for sequence ``b``'s tokens,
        where its kind holds them."""
        kind = self.paged.head_kind[head]
        tokens = torch.arange(values.shape[0])
        maps = [None] * self.paged.num_kinds
        maps[kind] = self.slot_mapping(kind, b, tokens)
        scatter(self.paged, maps, head, values)


def build(seq_lens: Sequence[int], head_kind: Sequence[int], width: int, dtype: torch.dtype,
          kinds: Sequence[KindSpec], device, keeps: Sequence[Callable | None] | None = None,
          spare_pages: int = 2, table_slack: int = 1, min_page: int = 0) -> Layout:
    """A garbage-filled layout of ``len(head_kind)`` heads (head ``h`` of kind ``head_kind[h]``).

    Units of all kinds are allocated in shuffled order (``units[0]``, the base, may be of any kind), each
    head gets a random free (unit, slot) of its kind. Per kind, page 0 is the null page (garbage); every
    page holding a token the kind keeps (``keeps[kind]``, default all) gets a distinct shuffled page id,
    other pages of a sequence and table entries past it map to 0.
    ``min_page`` shifts every real page id up (int64 offsets on the GPU).
    """
    keeps = list(keeps) if keeps is not None else [None] * len(kinds)
    keeps = [k if k is not None else (lambda b, t: torch.ones_like(t, dtype=torch.bool)) for k in keeps]
    tables_rows, num_pages = [], []
    for k, spec in enumerate(kinds):
        rows, next_page = [], 1 + min_page
        for b, n in enumerate(seq_lens):
            row = []
            for p0 in range(0, n, spec.page_size):
                toks = torch.arange(p0, min(p0 + spec.page_size, n))
                if keeps[k](b, toks).any():
                    row.append(next_page)
                    next_page += 1
                else:
                    row.append(0)
            rows.append(row)
        total = next_page + spare_pages
        perm = (1 + min_page + torch.randperm(next_page - 1 - min_page)).tolist()
        remap = {p: perm[p - 1 - min_page] for p in range(1 + min_page, next_page)}
        width_pages = max(max((len(r) for r in rows), default=0), 1) + table_slack
        table = torch.zeros(len(seq_lens), width_pages, dtype=torch.int32)   # past the sequence: null page
        for b, row in enumerate(rows):
            table[b, :len(row)] = torch.tensor([remap.get(p, 0) for p in row], dtype=torch.int32)
        tables_rows.append(table)
        num_pages.append(total)
    order = [(k, i) for k, spec in enumerate(kinds) for i in range(spec.num_units)]
    order = [order[i] for i in torch.randperm(len(order)).tolist()]
    units = []
    for k, _ in order:
        u = torch.empty(num_pages[k], kinds[k].page_size, kinds[k].slots, width, dtype=dtype, device=device)
        units.append(garbage_(u))
    free = {k: [(j, s) for j, (kk, _) in enumerate(order) if kk == k for s in range(kinds[k].slots)]
            for k in range(len(kinds))}
    for k in free:
        free[k] = [free[k][i] for i in torch.randperm(len(free[k])).tolist()]
    head_unit, head_slot = [], []
    for k in head_kind:
        j, s = free[k].pop()
        head_unit.append(j)
        head_slot.append(s)
    paged = PagedHeads.from_units(units, head_unit, head_slot, head_kind)
    tables = [PageTable(tables_rows[k].to(device), kinds[k].page_size, units[order.index((k, 0))].stride(0),
                        units[order.index((k, 0))].stride(1)) for k in range(len(kinds))]
    return Layout(paged, tables, keeps, list(seq_lens))


def store_values(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    """``x`` as the units store it: fp8 quantised with ``scale``, else rounded to ``dtype``."""
    if dtype in FP8:
        return quantize_fp8(x, scale, dtype)
    return x.to(dtype)


def paged_kv(seq_lens, head_kind, head_dim, dtype, kinds, device, keeps=None, k_scale=None, v_scale=None,
             min_page=0, values_dtype=torch.bfloat16, spare_pages=2):
    """A K|V layout filled with random K/V (quantised for fp8), plus what each sequence stores,
    ``[(k [L, HKV, D], v [L, HKV, D])]`` in the units' dtype (on the CPU; every token, also those a
    window kind does not hold)."""
    lay = build(seq_lens, head_kind, 2 * head_dim, dtype, kinds, device, keeps, spare_pages=spare_pages,
                min_page=min_page)
    logical = []
    for b, n in enumerate(seq_lens):
        k = torch.randn(n, len(head_kind), head_dim, dtype=values_dtype) * (2.0 if dtype in FP8 else 1.0)
        v = torch.randn(n, len(head_kind), head_dim, dtype=values_dtype)
        ks, vs = store_values(k, dtype, k_scale), store_values(v, dtype, v_scale)
        for h in range(len(head_kind)):
            lay.fill(b, h, torch.cat([ks[:, h], vs[:, h]], dim=-1).to(device))
        logical.append((ks, vs))
    return lay, logical


def copy_into(dst: Layout, src: Layout) -> None:
    """Gives the persistent layout ``dst`` the contents of ``src`` (same heads, kinds, page sizes, at most as
    many pages and table columns) in place: per head its unit slot, per kind the block table (other
    entries garbage / null page). What a CUDA-graph test does between replays."""
    for t, f in zip(dst.tables, src.tables):
        t.block_table.fill_(0)
        cols = min(t.block_table.shape[1], f.block_table.shape[1])
        t.block_table[:, :cols] = f.block_table[:, :cols]
    for h in range(dst.paged.num_heads):
        s = src.paged.units[src.paged.head_unit[h]][..., src.paged.head_slot[h], :]
        d = dst.paged.units[dst.paged.head_unit[h]][..., dst.paged.head_slot[h], :]
        assert s.shape[0] <= d.shape[0], f"the new layout has {s.shape[0]} pages, the persistent one {d.shape[0]}"
        garbage_(d)
        d[:s.shape[0]] = s
    dst.seq_lens = list(src.seq_lens)
