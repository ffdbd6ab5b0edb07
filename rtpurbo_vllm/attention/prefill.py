"""Head-wise prefill of one layer over its cache units (:class:`~rtpurbo_vllm.kv_cache.layer_kv.LayerKV`).

Retrieval query heads attend causally, densely or, given a :class:`SparseRetrieval` (``prefill_top_p
< 1``), to the sink, diagonal and top-p blocks of each query tile; local query heads see the
``sink_tokens`` first keys plus a sliding ``window`` (the query itself included); a sequence with fewer
than ``dense_threshold`` keys runs dense on every head. Semantics:
:func:`rtpurbo_vllm.reference.rtpurbo_prefill_ref`, and for the sparse retrieval heads
:mod:`rtpurbo_vllm.triton_kernels.sparse_prefill.reference`.

The layer's KV heads come in *parts* (:class:`~rtpurbo_vllm.kv_cache.layer_kv.KVPart`, from
``LayerKV.kv_parts``): runs of consecutive slots of one unit, each a paged FlashAttention-layout view
with its kind's block table. The full layout has one part (every
KV head, in order); the compact layout one per unit the layer touches. :func:`headwise_prefill`
(FlashAttention-3, Hopper) runs, for the sequences that are not dense:

1. local heads: per :class:`HeadRun` of each part (:meth:`PrefillHeads.local_runs`), one FA3 call with
   ``window_size=(window - 1, 0)`` on views of the query, ``out`` and the part's K/V (no copies), written
   together with its LSE; then the sink keys that lie outside a query's window are merged in by
   log-sum-exp (one Triton pass per run, :mod:`rtpurbo_vllm.triton_kernels.sink_merge`). A run is a
   contiguous range of query heads over the KV slots they read: whole GQA groups of consecutive KV
   heads merge into one run. Steps of at least :data:`EXACT_RUNS_MIN_TOKENS` query rows leave the
   retrieval heads out of these calls (their share of the windowed work, 5 of 32 heads for a 15 %
   selection, is not computed); shorter steps keep whole groups, fewer calls, and overwrite those rows;
2. retrieval heads: one dense causal FA3 call per run of them (:meth:`PrefillHeads.retrieval_runs`), on
   views as above; or, sparse, one :func:`~rtpurbo_vllm.triton_kernels.sparse_prefill.sparse_prefill`
   call for all of them; the results overwrite those heads in ``out``;
3. dense sequences: per run of whole groups of each part, one dense causal FA3 call; its rows replace
   theirs.

Sequences are taken out of a call by passing it ``seqused_k = 0`` for them (FA3 then reads none of
their keys), so no call needs host-side knowledge of which sequences are dense. A one-part batch whose
``max_seqlen_k`` is at most ``window`` or below ``dense_threshold`` is dense on every head: one FA3
call (not when the retrieval heads run sparse). FP8 caches: the queries are quantised with the layer's ``q_scale`` and FA3 descales Q, K and V
(as vLLM's FLASH_ATTN does). :func:`headwise_prefill_torch` is the CPU fallback with the same signature.

FA3 facts this relies on (``vllm/vllm_flash_attn/flash_attn_interface.py`` and FA3's ``mha_fwd``):
q/k/v/out need only a unit stride in the last dimension (other strides are passed to the kernel);
``seqused_k`` and ``cu_seqlens_q`` must be contiguous int32; with ``cu_seqlens_q`` the LSE comes back
as ``[HQ, T]`` float32 (natural log); a query at chunk row ``i`` sees keys in
``[i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right]`` and ``causal=True`` sets
``right = 0``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rtpurbo_vllm.head_layout import HeadLayout
from rtpurbo_vllm.kv_cache.layer_kv import KVPart
from rtpurbo_vllm.triton_kernels.headwise_attention import headwise_attention_ref
from rtpurbo_vllm.triton_kernels.paged_heads import FP8_MAX, PagedHeads, PageTable, to_float
from rtpurbo_vllm.triton_kernels.sink_merge import merge_sinks
from rtpurbo_vllm.triton_kernels.sparse_prefill import (SparsePrefillPlan, SparsePrefillWorkspace,
                                                        paged_sparse_prefill_ref)


EXACT_RUNS_MIN_TOKENS = 2048
"""Prefill steps with at least this many query rows run the local heads' windows for local query heads
only; shorter ones, whose FA3 launches would cost more than the rows they skip, cover whole GQA groups."""


@dataclass(frozen=True)
class HeadRun:
    """One FA3 call's heads: the layer's query heads ``[first_head, first_head + num_heads)`` and the
    KV slots ``[first_slot, first_slot + num_slots)`` of a part that they read (GQA group
    ``num_heads // num_slots``)."""

    first_slot: int
    num_slots: int
    first_head: int
    num_heads: int

    @property
    def heads(self) -> slice:
        return slice(self.first_head, self.first_head + self.num_heads)

    @property
    def slots(self) -> slice:
        return slice(self.first_slot, self.first_slot + self.num_slots)


@functools.cache
def head_runs(kv_head_ids: tuple[int, ...], group: int, wanted: frozenset[int]) -> tuple[HeadRun, ...]:
    """The fewest runs (:class:`HeadRun`) covering the ``wanted`` query heads of a part that holds the KV heads
    ``kv_head_ids`` (in slot order; KV head ``g`` serves query heads ``[g * group, (g + 1) * group)``).

    Each KV head's wanted query heads split into contiguous ranges; a range that is its whole group joins
    the run before it when that run is whole groups ending at the query head just before (then its KV
    head is the next one, in the next slot). Runs come in slot order. Cached: a layer asks for the same
    runs at every prefill step.
    """
    runs: list[HeadRun] = []
    for slot, kv_head in enumerate(kv_head_ids):
        first = kv_head * group
        wanted_heads = [h for h in range(first, first + group) if h in wanted]
        for start in (h for h in wanted_heads if h - 1 not in wanted_heads):
            count = next(n for n in range(1, group + 1) if start + n not in wanted_heads)
            last = runs[-1] if runs else None
            if (count == group and last is not None and last.num_heads == last.num_slots * group
                    and last.first_slot + last.num_slots == slot and last.first_head + last.num_heads == start):
                runs[-1] = HeadRun(last.first_slot, last.num_slots + 1, last.first_head, last.num_heads + group)
            else:
                runs.append(HeadRun(slot, 1, start, count))
    return tuple(runs)


@dataclass(frozen=True, eq=False)
class PrefillHeads:
    """The head split of one layer as the prefill uses it; built once per layer on the host.

    Attributes:
        num_heads: query heads of the layer (HQ).
        num_kv_heads: KV heads of the layer (HKV).
        retrieval_heads: the retrieval query heads, in increasing order.
        local_heads: the local query heads, in increasing order.
        retrieval_mask: ``[HQ]`` bool on the device, True for retrieval query heads.
    """

    num_heads: int
    num_kv_heads: int
    retrieval_heads: tuple[int, ...]
    local_heads: tuple[int, ...]
    retrieval_mask: torch.Tensor

    @classmethod
    def build(cls, retrieval_heads: Sequence[int], num_heads: int, num_kv_heads: int,
              device: torch.device | str = "cpu") -> "PrefillHeads":
        """The split of a layer whose retrieval query heads are ``retrieval_heads`` (any order).

        Raises ``ValueError`` for duplicate or out-of-range heads, or ``num_heads % num_kv_heads != 0``.
        """
        layout = HeadLayout.from_lists(num_heads, num_kv_heads, [retrieval_heads])
        heads = tuple(sorted(layout.retrieval_heads[0]))
        return cls(num_heads=num_heads, num_kv_heads=num_kv_heads, retrieval_heads=heads,
                   local_heads=tuple(h for h in range(num_heads) if h not in heads),
                   retrieval_mask=layout.retrieval_mask(0).to(device))

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    def local_runs(self, kv_head_ids: Sequence[int], exact: bool) -> tuple[HeadRun, ...]:
        """The FA3 calls of the local heads of a part holding ``kv_head_ids``: runs of its local query
        heads (``exact``), or of the whole groups that have a local head."""
        wanted = frozenset(self.local_heads)
        if not exact:
            groups = {h // self.group for h in wanted}
            wanted = frozenset(h for h in range(self.num_heads) if h // self.group in groups)
        return head_runs(tuple(kv_head_ids), self.group, wanted)

    def retrieval_runs(self, kv_head_ids: Sequence[int]) -> tuple[HeadRun, ...]:
        """The dense causal FA3 calls of the retrieval heads of a part holding ``kv_head_ids``."""
        return head_runs(tuple(kv_head_ids), self.group, frozenset(self.retrieval_heads))

    def group_runs(self, kv_head_ids: Sequence[int]) -> tuple[HeadRun, ...]:
        """Runs of every query head of a part holding ``kv_head_ids`` (whole groups)."""
        return head_runs(tuple(kv_head_ids), self.group, frozenset(range(self.num_heads)))


@dataclass(frozen=True)
class SparseRetrieval:
    """What the retrieval heads' sparse top-p prefill of one layer reads (one step).

    Attributes:
        kv: the layer's K|V heads (``LayerKV.kv``); retrieval heads read kind 0 (full).
        kv_tables: per kind, its :class:`PageTable` for the prefill sequences (``LayerKV.kv_tables``).
        index: the layer's index keys (``LayerKV.index``), one head per retrieval head.
        index_table: their :class:`PageTable` for the prefill sequences.
        index_queries: ``[T, HR, DI]``, the prefill rows' index queries.
        heads: ``[HR]`` int32, the retrieval query heads.
        plan: the step's query tiles.
        workspace: the kernels' scratch.
        top_p: ``prefill_top_p`` (``< 1``).
        block_size: tokens per selection block.
    """

    kv: PagedHeads
    kv_tables: list[PageTable | None]
    index: PagedHeads
    index_table: PageTable
    index_queries: torch.Tensor
    heads: torch.Tensor
    plan: SparsePrefillPlan
    workspace: SparsePrefillWorkspace
    top_p: float
    block_size: int


def _check_args(query: torch.Tensor, parts: Sequence[KVPart], cu_seqlens_q: torch.Tensor, seqused_k: torch.Tensor,
                heads: PrefillHeads, sink_tokens: int, window: int, out: torch.Tensor) -> None:
    """Host-side checks of the shapes and settings a caller can get wrong (no device sync)."""
    if query.dim() != 3 or query.shape[1] != heads.num_heads:
        raise ValueError(f"query has shape {tuple(query.shape)}, expected [T, {heads.num_heads}, D] "
                         f"for this layer")
    num_seqs = cu_seqlens_q.shape[0] - 1
    covered = sorted(h for part in parts for h in part.kv_head_ids)
    if covered != list(range(heads.num_kv_heads)):
        raise ValueError(f"the parts hold KV heads {covered}, expected each of the layer's {heads.num_kv_heads} "
                         "exactly once")
    for part in parts:
        if part.key_cache.shape != part.value_cache.shape or part.key_cache.shape[2] != len(part.kv_head_ids):
            raise ValueError(f"a part's K/V views {tuple(part.key_cache.shape)} / {tuple(part.value_cache.shape)} "
                             f"must both be [num_pages, P, {len(part.kv_head_ids)}, D]")
        if part.key_cache.shape[-1] != query.shape[2]:
            raise ValueError(f"cache head dim {part.key_cache.shape[-1]} differs from the query's {query.shape[2]}")
        if part.block_table.shape[0] != num_seqs:
            raise ValueError(f"cu_seqlens_q describes {num_seqs} sequences but a block table has shape "
                             f"{tuple(part.block_table.shape)}")
    if out.shape != query.shape or out.dtype != query.dtype:
        raise ValueError(f"out is {out.dtype} {tuple(out.shape)}, expected {query.dtype} "
                         f"{tuple(query.shape)} like the query")
    if seqused_k.shape != (num_seqs,):
        raise ValueError(f"cu_seqlens_q describes {num_seqs} sequences but seqused_k has shape "
                         f"{tuple(seqused_k.shape)}")
    if window < 1 or sink_tokens < 0:
        raise ValueError(f"need window >= 1 and sink_tokens >= 0, got window={window}, "
                         f"sink_tokens={sink_tokens}")


def _token_seqs(cu_seqlens_q: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``[T]`` int64: the sequence of each query row (no device sync)."""
    seqs = torch.arange(cu_seqlens_q.shape[0] - 1, device=cu_seqlens_q.device)
    return torch.repeat_interleave(seqs, cu_seqlens_q.diff(), output_size=num_tokens)


def headwise_prefill(query: torch.Tensor, parts: Sequence[KVPart], cu_seqlens_q: torch.Tensor, seqused_k: torch.Tensor, max_seqlen_q: int,
                     max_seqlen_k: int, heads: PrefillHeads, sink_tokens: int, window: int, scale: float,
                     out: torch.Tensor, dense_threshold: int = 0, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None, q_scale: torch.Tensor | None = None,
                     sparse: SparseRetrieval | None = None) -> None:
    """Head-wise prefill (or chunked prefill) of one layer with FlashAttention-3; writes ``out``.

    Each sequence's ``seqlen_q`` new queries are the last rows of its ``seqused_k`` keys, which are
    already in the cache. No device sync. Scratch: per run of the dense calls its output when
    ``dense_threshold > 0``; every other call writes ``out`` in place.

    Args:
        query: ``[T, HQ, D]`` fp16/bf16 on a Hopper GPU, post-RoPE; last dimension contiguous.
        parts: the layer's KV heads as paged views (:meth:`LayerKV.kv_parts`), each KV head in exactly
            one; bf16/fp16 of the query's dtype or float8_e4m3fn; block-table entries past a sequence's
            pages must be valid page ids (vLLM's are).
        cu_seqlens_q: ``[B+1]`` int32 contiguous, query row offsets; ``cu_seqlens_q[-1] == T``.
        seqused_k: ``[B]`` int32 contiguous, keys per sequence (history plus chunk).
        max_seqlen_q: longest chunk (an upper bound is fine).
        max_seqlen_k: longest ``seqused_k`` (an upper bound is fine, up to ``max_pages * P``).
        heads: the layer's :class:`PrefillHeads` on the query's device.
        sink_tokens: leading keys local heads always see (``>= 0``).
        window: local heads see keys less than ``window`` positions back (``>= 1``). Window parts hold
            only sink and window keys (and every key of a dense sequence); nothing else is read there.
        scale: softmax scale.
        out: ``[T, HQ, D]`` dtype of ``query``, last dimension contiguous; fully overwritten.
        dense_threshold: sequences with ``seqused_k < dense_threshold`` run dense on every head (0: none).
        k_scale, v_scale, q_scale: 1-element float32 device tensors, the layer's scales (fp8 units only).
        sparse: the retrieval heads' sparse prefill (None: dense causal).
    """
    _check_args(query, parts, cu_seqlens_q, seqused_k, heads, sink_tokens, window, out)
    from vllm.utils.torch_utils import canonicalize_singleton_dim_strides
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    fp8 = parts[0].key_cache.dtype == torch.float8_e4m3fn
    num_seqs = cu_seqlens_q.shape[0] - 1

    def fa3(q, k, v, table, used, **kwargs):
        if fp8:
            shape = (num_seqs, k.shape[2])
            kwargs.update(q_descale=q_scale.expand(shape), k_descale=k_scale.expand(shape),
                          v_descale=v_scale.expand(shape))
            q = (q.float() / q_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            if "out" not in kwargs:
                kwargs["out"] = torch.empty(q.shape, dtype=query.dtype, device=query.device)
        return flash_attn_varlen_func(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q,
                                      seqused_k=used, max_seqlen_k=max_seqlen_k, block_table=table,
                                      softmax_scale=scale, causal=True, fa_version=3, **kwargs)

    all_dense = max_seqlen_k < dense_threshold or (max_seqlen_k <= window and sparse is None)
    if len(parts) == 1 and parts[0].kv_heads is None and all_dense:
        only = parts[0]
        fa3(query, only.key_cache, only.value_cache, only.block_table, seqused_k, out=out)
        return
    token_seqs = _token_seqs(cu_seqlens_q, query.shape[0])                                 # [T] int64
    dense_seqs = seqused_k < dense_threshold if dense_threshold else None                  # [B] bool
    headwise_used = seqused_k.masked_fill(dense_seqs, 0) if dense_threshold else seqused_k  # [B] int32
    sink_scales = (k_scale, v_scale) if fp8 else (None, None)

    def views(part: KVPart, run: HeadRun) -> tuple[torch.Tensor, ...]:
        """The run's query rows, output rows and K/V slots: views, no copies."""
        return tuple(canonicalize_singleton_dim_strides(x) for x in (query[:, run.heads], out[:, run.heads],
                                                                      part.key_cache[:, :, run.slots],
                                                                      part.value_cache[:, :, run.slots]))

    exact = query.shape[0] >= EXACT_RUNS_MIN_TOKENS
    for part in parts:
        for run in heads.local_runs(part.kv_head_ids, exact):
            q, o, k, v = views(part, run)
            _, lse = fa3(q, k, v, part.block_table, headwise_used, out=o, window_size=(window - 1, 0),
                         return_softmax_lse=True)                                          # lse [H_run, T]
            if sink_tokens and max_seqlen_k > window:      # else no row sees a sink outside its window
                merge_sinks(q, k, v, cu_seqlens_q, headwise_used, part.block_table, token_seqs, sink_tokens,
                            window, scale, o, lse, *sink_scales)
    if sparse is not None:
        from rtpurbo_vllm.triton_kernels.sparse_prefill import sparse_prefill
        sparse_prefill(query, sparse.kv, sparse.kv_tables, sparse.index, sparse.index_table, sparse.index_queries,
                       cu_seqlens_q, seqused_k, sparse.heads, sparse.plan, sparse.top_p, sink_tokens,
                       sparse.block_size, scale, sparse.workspace, out, dense_threshold=dense_threshold,
                       k_scale=k_scale, v_scale=v_scale)
    for part in parts if sparse is None else ():
        for run in heads.retrieval_runs(part.kv_head_ids):
            q, o, k, v = views(part, run)
            fa3(q, k, v, part.block_table, headwise_used, out=o)
    if dense_threshold:
        dense_rows = dense_seqs[token_seqs][:, None, None]                                 # [T, 1, 1]
        for part in parts:
            for run in heads.group_runs(part.kv_head_ids):
                q, o, k, v = views(part, run)
                dense_out = fa3(q, k, v, part.block_table, seqused_k.masked_fill(~dense_seqs, 0))  # [T, H_run, D]
                o.copy_(torch.where(dense_rows, dense_out, o))


def headwise_prefill_torch(query: torch.Tensor, parts: Sequence[KVPart], cu_seqlens_q: torch.Tensor, seqused_k: torch.Tensor, max_seqlen_q: int,
                           max_seqlen_k: int, heads: PrefillHeads, sink_tokens: int, window: int, scale: float,
                           out: torch.Tensor, dense_threshold: int = 0, k_scale: torch.Tensor | None = None,
                           v_scale: torch.Tensor | None = None, q_scale: torch.Tensor | None = None,
                           sparse: SparseRetrieval | None = None) -> None:
    """:func:`headwise_prefill` in plain PyTorch (CPU, CI): gathers the pages, runs the reference.

    Same arguments and result, any float dtype and device; computed in float32 (fp8 keys and values
    dequantised with their scales; the queries are not quantised) and syncs with the host.
    ``max_seqlen_q``, ``max_seqlen_k`` and ``q_scale`` are unused (kept for the shared signature).
    Window keys no local query can see (their pages may be vLLM's null block) are gathered as zeros.
    """
    _check_args(query, parts, cu_seqlens_q, seqused_k, heads, sink_tokens, window, out)
    seqlens_k = seqused_k.tolist()
    slots = [torch.arange(n, device=query.device) for n in seqlens_k]
    chunk_starts = (seqused_k - cu_seqlens_q.diff()).tolist()
    k = query.new_empty(sum(seqlens_k), heads.num_kv_heads, query.shape[2], dtype=torch.float32)  # [T_k, HKV, D]
    v = torch.empty_like(k)
    for part in parts:
        page_size = part.key_cache.shape[1]
        pages = [part.block_table[b, s // page_size].long() for b, s in enumerate(slots)]
        k_part = to_float(torch.cat([part.key_cache[p, s % page_size] for p, s in zip(pages, slots)]), k_scale)
        v_part = to_float(torch.cat([part.value_cache[p, s % page_size] for p, s in zip(pages, slots)]), v_scale)
        if part.is_window:   # holds sinks + what the chunk's first query sees (+ dense sequences)
            held = torch.cat([(s < sink_tokens) | (s > c - window) | (n < dense_threshold)
                              for s, c, n in zip(slots, chunk_starts, seqlens_k)])
            k_part = torch.where(held[:, None, None], k_part, 0)
            v_part = torch.where(held[:, None, None], v_part, 0)
        index = slice(None) if part.kv_heads is None else part.kv_heads
        k[:, index], v[:, index] = k_part, v_part
    cu_seqlens_k = torch.tensor([0] + seqlens_k).cumsum(0).int()
    args = (query.float(), k, v, cu_seqlens_q, cu_seqlens_k)
    result, _ = headwise_attention_ref(*args, heads.retrieval_mask, sink_tokens, window, scale)
    if any(n < dense_threshold for n in seqlens_k):
        all_heads = torch.ones_like(heads.retrieval_mask)
        dense, _ = headwise_attention_ref(*args, all_heads, sink_tokens, window, scale)
        dense_rows = (seqused_k < dense_threshold).repeat_interleave(cu_seqlens_q.diff().long())
        result = torch.where(dense_rows.to(query.device)[:, None, None], dense, result)
    if sparse is not None:
        retrieval, _, _ = paged_sparse_prefill_ref(
            query, sparse.kv, sparse.kv_tables, sparse.index, sparse.index_table, sparse.index_queries,
            cu_seqlens_q, seqused_k, sparse.heads, sparse.top_p, sink_tokens, sparse.block_size, scale,
            sparse.plan.tile_q, dense_threshold, k_scale, v_scale)
        result[:, sparse.heads.long()] = retrieval[:query.shape[0]]
    out.copy_(result)
