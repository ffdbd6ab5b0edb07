"""Head-wise prefill of one layer on vLLM's paged KV cache (FlashAttention layout).

With the split KV layout (:mod:`rtpurbo_vllm.kv_cache`; a plan built with ``full_kv_heads``), the
cache passed as ``key_cache``/``value_cache`` holds only the full KV heads and ``window_kv`` holds the
others (sinks + window, its own block table and page size). Each cache then gets its own local pass,
on the query heads of its KV heads (gathered, then scattered back into ``out``), and retrieval heads
read their KV head's slot in the main cache.

Retrieval query heads attend densely and causally; local query heads see the ``sink_tokens`` first keys
plus a sliding ``window`` (the query itself included); a sequence with fewer than ``dense_threshold``
keys runs dense on every head. Semantics: :func:`rtpurbo_vllm.reference.rtpurbo_prefill_ref`.

:func:`headwise_prefill` (FlashAttention-3, Hopper) runs, for the sequences that are not dense:

1. local heads: one FA3 call over all query heads with ``window_size=(window - 1, 0)``, written into
   ``out`` together with its LSE; then the sink keys that lie outside a query's window are merged in
   by log-sum-exp (one Triton pass, :mod:`rtpurbo_vllm.triton_kernels.sink_merge`);
2. retrieval heads: one dense causal FA3 call per KV head ``g`` that serves retrieval heads, on the
   one-head views ``key_cache[:, :, g:g+1]`` (no copy); the results overwrite those heads in ``out``;
3. dense sequences: one dense causal FA3 call over the local pass's heads; its rows replace theirs.

Sequences are taken out of a call by passing it ``seqused_k = 0`` for them (FA3 then reads none of
their keys), so no call needs host-side knowledge of which sequences are dense. A batch whose
``max_seqlen_k`` is at most ``window`` or below ``dense_threshold`` is dense on every head: one FA3
call (full layout only). :func:`headwise_prefill_torch` is the CPU fallback with the same signature.

FA3 facts this relies on (``vllm/vllm_flash_attn/flash_attn_interface.py`` and FA3's ``mha_fwd``):
q/k/v/out need only a unit stride in the last dimension (other strides are passed to the kernel);
``seqused_k`` and ``cu_seqlens_q`` must be contiguous int32; with ``cu_seqlens_q`` the LSE comes back
as ``[HQ, T]`` float32 (natural log); a query at chunk row ``i`` sees keys in
``[i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right]`` and ``causal=True`` sets
``right = 0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from rtpurbo_vllm.head_layout import HeadLayout
from rtpurbo_vllm.triton_kernels.headwise_attention import headwise_attention_ref
from rtpurbo_vllm.triton_kernels.sink_merge import merge_sinks


@dataclass(frozen=True, eq=False)
class RTPurboPrefillPlan:
    """The head split of one layer as the prefill uses it; built once per layer on the host.

    Attributes:
        num_heads: query heads of the layer (HQ).
        num_kv_heads: KV heads of the layer (HKV).
        retrieval_groups: for each KV head ``g`` that serves retrieval query heads, in increasing ``g``:
            ``(g, heads)`` with ``heads`` ``[n_g]`` int64 on the plan's device, the retrieval query heads
            that read ``g``, in increasing order.
        local_heads: the local query heads, in increasing order.
        retrieval_mask: ``[HQ]`` bool on the plan's device, True for retrieval query heads.
        full_kv_heads: split layout: the KV heads the main cache holds, in its head order (None: the
            main cache holds every KV head).
        cache_parts: per cache, ``(kv_heads, query_heads)``: ``[H_c]`` and ``[H_c * G]`` int64 on the
            plan's device, its KV heads in slot order and the query heads that read them; one part
            with ``None`` entries (no gather) in the full layout, (main, window) in the split layout.
    """

    num_heads: int
    num_kv_heads: int
    retrieval_groups: tuple[tuple[int, torch.Tensor], ...]
    local_heads: tuple[int, ...]
    retrieval_mask: torch.Tensor
    full_kv_heads: tuple[int, ...] | None = None
    cache_parts: tuple[tuple[torch.Tensor | None, torch.Tensor | None], ...] = ((None, None),)

    @classmethod
    def build(cls, retrieval_heads: Sequence[int], num_heads: int, num_kv_heads: int,
              device: torch.device | str = "cpu",
              full_kv_heads: Sequence[int] | None = None) -> "RTPurboPrefillPlan":
        """The plan of a layer whose retrieval query heads are ``retrieval_heads`` (any order);
        ``full_kv_heads`` (split layout) lists the main cache's KV heads in slot order and must
        include every retrieval head's KV head.

        Raises ``ValueError`` for duplicate or out-of-range heads, or ``num_heads % num_kv_heads != 0``.
        """
        layout = HeadLayout.from_lists(num_heads, num_kv_heads, [retrieval_heads])
        heads = layout.retrieval_heads[0]
        groups = []
        for kv_head in layout.retrieval_kv_heads(0):
            members = [h for h in heads if layout.kv_head_of(h) == kv_head]
            groups.append((kv_head, torch.tensor(members, dtype=torch.long, device=device)))
        parts: tuple = ((None, None),)
        if full_kv_heads is not None:
            full_kv_heads = tuple(full_kv_heads)
            if not set(layout.retrieval_kv_heads(0)) <= set(full_kv_heads):
                raise ValueError(f"full KV heads {full_kv_heads} miss a retrieval KV head of {heads}")
            group = num_heads // num_kv_heads
            window_kv_heads = [g for g in range(num_kv_heads) if g not in full_kv_heads]
            parts = tuple((torch.tensor(kv, dtype=torch.long, device=device),
                           torch.tensor([g * group + i for g in kv for i in range(group)], dtype=torch.long,
                                        device=device))
                          for kv in (full_kv_heads, window_kv_heads) if kv)
        return cls(num_heads=num_heads, num_kv_heads=num_kv_heads, retrieval_groups=tuple(groups),
                   local_heads=tuple(h for h in range(num_heads) if h not in heads),
                   retrieval_mask=layout.retrieval_mask(0).to(device), full_kv_heads=full_kv_heads,
                   cache_parts=parts)

    def cache_slot(self, kv_head: int) -> int:
        """Head index of a full KV head in the main cache."""
        return kv_head if self.full_kv_heads is None else self.full_kv_heads.index(kv_head)


def _cache_parts(plan: RTPurboPrefillPlan, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 block_table: torch.Tensor, window_kv: tuple | None) -> list[tuple]:
    """``(kv_heads, query_heads, key_cache, value_cache, block_table)`` per cache of the plan."""
    caches = [(key_cache, value_cache, block_table)] + ([window_kv] if window_kv is not None else [])
    if len(caches) != len(plan.cache_parts):
        raise ValueError(f"the plan reads {len(plan.cache_parts)} caches, got {len(caches)} (window_kv is "
                         f"{'set' if window_kv is not None else 'None'})")
    return [(*part, *cache) for part, cache in zip(plan.cache_parts, caches)]


def _check_args(query: torch.Tensor, parts: list[tuple], cu_seqlens_q: torch.Tensor, seqused_k: torch.Tensor,
                plan: RTPurboPrefillPlan, sink_tokens: int, window: int, out: torch.Tensor) -> None:
    """Host-side checks of the shapes and settings a caller can get wrong (no device sync)."""
    if query.dim() != 3 or query.shape[1] != plan.num_heads:
        raise ValueError(f"query has shape {tuple(query.shape)}, expected [T, {plan.num_heads}, D] "
                         f"for this layer's plan")
    num_seqs = cu_seqlens_q.shape[0] - 1
    for kv_heads, _, key_cache, value_cache, block_table in parts:
        heads = plan.num_kv_heads if kv_heads is None else kv_heads.shape[0]
        expected_cache = (key_cache.shape[0], key_cache.shape[1], heads, query.shape[2])
        for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
            if tuple(cache.shape) != expected_cache:
                raise ValueError(f"{name} has shape {tuple(cache.shape)}, expected {expected_cache} "
                                 f"([num_pages, page_size, H_cache, D])")
        if block_table.shape[0] != num_seqs:
            raise ValueError(f"cu_seqlens_q describes {num_seqs} sequences but a block table has shape "
                             f"{tuple(block_table.shape)}")
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


def headwise_prefill(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, seqused_k: torch.Tensor, max_seqlen_q: int,
                     max_seqlen_k: int, block_table: torch.Tensor, plan: RTPurboPrefillPlan,
                     sink_tokens: int, window: int, scale: float, out: torch.Tensor,
                     dense_threshold: int = 0, window_kv: tuple | None = None) -> None:
    """Head-wise prefill (or chunked prefill) of one layer with FlashAttention-3; writes ``out``.

    Each sequence's ``seqlen_q`` new queries are the last rows of its ``seqused_k`` keys, which are
    already in the cache. No device sync. Scratch: per retrieval KV head the gathered queries and
    their output (``[T, n_g, D]`` each); ``[T, HQ, D]`` for the dense call when ``dense_threshold > 0``.
    The sink merge (``triton_kernels/sink_merge``) works in place.

    Args:
        query: ``[T, HQ, D]`` fp16/bf16 on a Hopper GPU, post-RoPE; last dimension contiguous.
        key_cache: ``[num_pages, P, HKV, D]`` same dtype, last dimension contiguous, other strides free
            (vLLM's ``kv_cache.transpose(1, 2).split(D, -1)`` views).
        value_cache: ``[num_pages, P, HKV, D]`` same dtype and layout rules.
        cu_seqlens_q: ``[B+1]`` int32 contiguous, query row offsets; ``cu_seqlens_q[-1] == T``.
        seqused_k: ``[B]`` int32 contiguous, keys per sequence (history plus chunk).
        max_seqlen_q: longest chunk (an upper bound is fine).
        max_seqlen_k: longest ``seqused_k`` (an upper bound is fine, up to ``max_pages * P``).
        block_table: ``[B, max_pages]`` int32, last dimension contiguous; entries past a sequence's
            pages must still be valid page ids (vLLM's are).
        plan: the layer's :class:`RTPurboPrefillPlan` on the query's device.
        sink_tokens: leading keys local heads always see (``>= 0``).
        window: local heads see keys less than ``window`` positions back (``>= 1``).
        scale: softmax scale.
        out: ``[T, HQ, D]`` dtype of ``query``, last dimension contiguous; fully overwritten.
        dense_threshold: sequences with ``seqused_k < dense_threshold`` run dense on every head
            (0: none).
        window_kv: split layout (plan built with ``full_kv_heads``; ``key_cache``/``value_cache``/
            ``block_table`` then hold the full KV heads): ``(key_cache, value_cache, block_table)`` of
            the window KV heads, ``[num_pages_w, P_w, H - R, D]`` twice and ``[B, max_pages_w]`` int32.
            Only sink and window keys of each query (every key of a dense sequence) are read.
    """
    parts = _cache_parts(plan, key_cache, value_cache, block_table, window_kv)
    _check_args(query, parts, cu_seqlens_q, seqused_k, plan, sink_tokens, window, out)
    from vllm.utils.torch_utils import canonicalize_singleton_dim_strides
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    def fa3(q, k, v, table, used, **kwargs):
        return flash_attn_varlen_func(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q,
                                      seqused_k=used, max_seqlen_k=max_seqlen_k, block_table=table,
                                      softmax_scale=scale, causal=True, fa_version=3, **kwargs)

    if plan.full_kv_heads is None and (max_seqlen_k <= window or max_seqlen_k < dense_threshold):
        fa3(query, key_cache, value_cache, block_table, seqused_k, out=out)
        return
    token_seqs = _token_seqs(cu_seqlens_q, query.shape[0])                                 # [T] int64
    dense_seqs = seqused_k < dense_threshold if dense_threshold else None                  # [B] bool
    headwise_used = seqused_k.masked_fill(dense_seqs, 0) if dense_threshold else seqused_k  # [B] int32

    # Per cache: its query heads ([T, HQ_c, D], the query itself in the full layout).
    part_queries = [query if q_heads is None else query.index_select(1, q_heads) for _, q_heads, *_ in parts]
    if plan.local_heads:
        # Every query head of each cache (retrieval ones are overwritten below).
        for q, (_, q_heads, k_cache, v_cache, table) in zip(part_queries, parts):
            o = out if q_heads is None else torch.empty_like(q)
            _, lse = fa3(q, k_cache, v_cache, table, headwise_used, out=o,
                         window_size=(window - 1, 0), return_softmax_lse=True)             # lse [HQ_c, T]
            if sink_tokens and max_seqlen_k > window:      # else no row sees a sink outside its window
                merge_sinks(q, k_cache, v_cache, cu_seqlens_q, headwise_used, table, token_seqs, sink_tokens,
                            window, scale, o, lse)
            if q_heads is not None:
                out.index_copy_(1, q_heads, o)
    for kv_head, heads in plan.retrieval_groups:
        slot = plan.cache_slot(kv_head)
        k = canonicalize_singleton_dim_strides(key_cache[:, :, slot:slot + 1])             # [N, P, 1, D]
        v = canonicalize_singleton_dim_strides(value_cache[:, :, slot:slot + 1])
        out.index_copy_(1, heads, fa3(query.index_select(1, heads), k, v, block_table, headwise_used))
    if dense_threshold:
        dense_rows = dense_seqs[token_seqs][:, None, None]                                 # [T, 1, 1]
        for q, (_, q_heads, k_cache, v_cache, table) in zip(part_queries, parts):
            dense_out = fa3(q, k_cache, v_cache, table, seqused_k.masked_fill(~dense_seqs, 0))  # [T, HQ_c, D]
            if q_heads is None:
                torch.where(dense_rows, dense_out, out, out=out)
            else:
                out.index_copy_(1, q_heads, torch.where(dense_rows, dense_out, out.index_select(1, q_heads)))


def headwise_prefill_torch(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           cu_seqlens_q: torch.Tensor, seqused_k: torch.Tensor, max_seqlen_q: int,
                           max_seqlen_k: int, block_table: torch.Tensor, plan: RTPurboPrefillPlan,
                           sink_tokens: int, window: int, scale: float, out: torch.Tensor,
                           dense_threshold: int = 0, window_kv: tuple | None = None) -> None:
    """:func:`headwise_prefill` in plain PyTorch (CPU, CI): gathers the pages, runs the reference.

    Same arguments and result, any float dtype and device; computed in float32 and syncs with the
    host. ``max_seqlen_q`` and ``max_seqlen_k`` are unused (kept for the shared signature). Window
    keys no local query can see (their pages may be vLLM's null block) are gathered as zeros.
    """
    parts = _cache_parts(plan, key_cache, value_cache, block_table, window_kv)
    _check_args(query, parts, cu_seqlens_q, seqused_k, plan, sink_tokens, window, out)
    seqlens_k = seqused_k.tolist()
    slots = [torch.arange(n, device=query.device) for n in seqlens_k]
    chunk_starts = (seqused_k - cu_seqlens_q.diff()).tolist()
    k = query.new_empty(sum(seqlens_k), plan.num_kv_heads, query.shape[2])               # [T_k, HKV, D]
    v = torch.empty_like(k)
    for i, (kv_heads, _, k_cache, v_cache, table) in enumerate(parts):
        page_size = k_cache.shape[1]
        pages = [table[b, s // page_size].long() for b, s in enumerate(slots)]
        k_part = torch.cat([k_cache[p, s % page_size] for p, s in zip(pages, slots)])    # [T_k, H_c, D]
        v_part = torch.cat([v_cache[p, s % page_size] for p, s in zip(pages, slots)])
        if i > 0:   # the window cache holds sinks + what the chunk's first query sees (+ dense seqs)
            held = torch.cat([(s < sink_tokens) | (s > c - window) | (n < dense_threshold)
                              for s, c, n in zip(slots, chunk_starts, seqlens_k)])
            k_part = torch.where(held[:, None, None], k_part, 0)
            v_part = torch.where(held[:, None, None], v_part, 0)
        heads = slice(None) if kv_heads is None else kv_heads
        k[:, heads], v[:, heads] = k_part, v_part
    cu_seqlens_k = torch.tensor([0] + seqlens_k).cumsum(0).int()
    args = (query, k, v, cu_seqlens_q, cu_seqlens_k)
    result, _ = headwise_attention_ref(*args, plan.retrieval_mask, sink_tokens, window, scale)
    if any(n < dense_threshold for n in seqlens_k):
        all_heads = torch.ones_like(plan.retrieval_mask)
        dense, _ = headwise_attention_ref(*args, all_heads, sink_tokens, window, scale)
        dense_rows = (seqused_k < dense_threshold).repeat_interleave(cu_seqlens_q.diff().long())
        result = torch.where(dense_rows.to(query.device)[:, None, None], dense, result)
    out.copy_(result)
