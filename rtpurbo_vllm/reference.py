"""One layer of RTPurbo attention for a batch, composed from the per-op references (float32, torch only).

Used as the end-to-end ground truth by the backend tests and by calibration. Layout as in vLLM: the
tokens of B sequences are concatenated and ``cu_seqlens_q`` / ``cu_seqlens_k`` (int32, ``[B+1]``) give
each sequence's rows; a chunk of new queries sits at the end of its sequence's keys.

- Prefill: retrieval query heads attend densely and causally; local heads see the ``sink_tokens``
  first keys plus a sliding ``window``.
- Decode: local heads as in prefill; each retrieval head ranks the sequence's tokens with its 16-dim
  indexer on pre-RoPE q/k and attends exactly to the tokens of its top-p blocks.
- A sequence whose total length ``seqlen_k`` is below ``dense_threshold`` runs dense on every head. The
  test is per call, so a long prompt prefilled in chunks runs its early chunks dense.

``q``/``k`` are post-RoPE (attention); ``q_pre``/``k_pre`` are pre-RoPE (indexer only).
"""

from __future__ import annotations

from typing import Sequence

import torch

from rtpurbo_vllm.triton_kernels.block_topp import block_topp_ref, expand_block_mask, index_scores_ref
from rtpurbo_vllm.triton_kernels.headwise_attention import attention_mask, headwise_attention_ref
from rtpurbo_vllm.triton_kernels.index_keys import index_project_ref
from rtpurbo_vllm.triton_kernels.sparse_decode import sparse_decode_varlen_ref


def _retrieval_index(retrieval_heads: Sequence[int], num_heads: int) -> torch.Tensor:
    """``[HR]`` int64 (CPU): the retrieval query heads, validated (unique, in ``[0, HQ)``)."""
    heads = [int(h) for h in retrieval_heads]
    if len(set(heads)) != len(heads) or any(not 0 <= h < num_heads for h in heads):
        raise ValueError(f"retrieval heads {heads} must be unique and in [0, {num_heads})")
    return torch.tensor(heads, dtype=torch.long)


def rtpurbo_prefill_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                        retrieval_heads: Sequence[int], sink_tokens: int, window: int,
                        dense_threshold: int, scale: float) -> torch.Tensor:
    """Head-wise prefill (or chunked prefill) of one layer.

    Args:
        q: ``[T_q, HQ, D]`` any float dtype, post-RoPE new queries of all sequences.
        k: ``[T_k, HKV, D]`` any float dtype, post-RoPE keys (history then chunk) of all sequences.
        v: ``[T_k, HKV, D]`` any float dtype.
        cu_seqlens_q: ``[B+1]`` int32, query row offsets (``cu_seqlens_q[-1] == T_q``).
        cu_seqlens_k: ``[B+1]`` int32, key row offsets.
        retrieval_heads: the layer's retrieval query heads.
        sink_tokens: leading keys local heads always see.
        window: local heads' sliding window.
        dense_threshold: sequences with ``seqlen_k < dense_threshold`` run dense on every head.
        scale: softmax scale.

    Returns:
        ``[T_q, HQ, D]`` float32.
    """
    num_heads = q.shape[1]
    headwise = torch.zeros(num_heads, dtype=torch.bool)
    headwise[_retrieval_index(retrieval_heads, num_heads)] = True
    dense = torch.ones(num_heads, dtype=torch.bool)
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k)
    out_dense, _ = headwise_attention_ref(*args, dense, sink_tokens, window, scale)        # [T_q, HQ, D]
    out_headwise, _ = headwise_attention_ref(*args, headwise, sink_tokens, window, scale)  # [T_q, HQ, D]
    seqlens_q = cu_seqlens_q.diff().long()
    is_dense = (cu_seqlens_k.diff() < dense_threshold).repeat_interleave(seqlens_q)      # [T_q]
    return torch.where(is_dense.to(q.device)[:, None, None], out_dense, out_headwise)


def rtpurbo_decode_keep_ref(cu_seqlens_k: torch.Tensor, q_pre: torch.Tensor, k_pre: torch.Tensor,
                            retrieval_heads: Sequence[int], w_q: torch.Tensor, w_k: torch.Tensor,
                            sink_tokens: int, window: int, top_p: float, block_size: int,
                            dense_threshold: int) -> torch.Tensor:
    """The tokens each query head attends to at one decode step (for inspection and for the decode).

    Local heads keep the sinks plus the window; retrieval heads keep the tokens of their top-p blocks
    (:func:`block_topp_ref` on indexer scores ``(w_q[r] q_pre) . (w_k[r] k_pre)`` of the KV head the
    retrieval head reads); sequences below ``dense_threshold`` keep every token on every head.

    Args:
        cu_seqlens_k: ``[B+1]`` int32, key row offsets; each sequence's decode query is its last token.
        q_pre: ``[B, HQ, D]`` any float dtype, pre-RoPE decode queries.
        k_pre: ``[T_k, HKV, D]`` any float dtype, pre-RoPE keys of all sequences.
        retrieval_heads: the layer's HR retrieval query heads; ``w_q[r]``/``w_k[r]`` belong to the r-th.
        w_q: ``[HR, DI, D]`` any float dtype, indexer query projections.
        w_k: ``[HR, DI, D]`` any float dtype, indexer key projections.
        sink_tokens: leading keys always seen (local heads; forced blocks for retrieval heads).
        window: local heads' sliding window.
        top_p: in ``(0, 1]``.
        block_size: BS, tokens per selection block.
        dense_threshold: sequences with ``seqlen_k < dense_threshold`` keep everything.

    Returns:
        ``[HQ, T_k]`` bool, in the keys' row order.
    """
    num_heads, num_kv_heads = q_pre.shape[1], k_pre.shape[1]
    heads = _retrieval_index(retrieval_heads, num_heads).to(q_pre.device)               # [HR]
    if not w_q.shape[0] == w_k.shape[0] == len(heads):
        raise ValueError(f"w_q and w_k hold {w_q.shape[0]} and {w_k.shape[0]} heads, "
                         f"expected one per retrieval head ({len(heads)})")
    kv_heads = heads // (num_heads // num_kv_heads)                                      # [HR]
    keep = torch.ones(num_heads, k_pre.shape[0], dtype=torch.bool, device=q_pre.device)  # [HQ, T_k]
    cu_k = cu_seqlens_k.tolist()
    for b, (k0, k1) in enumerate(zip(cu_k[:-1], cu_k[1:])):
        seqlen = k1 - k0
        if seqlen < dense_threshold:
            continue
        keep[:, k0:k1] = attention_mask(1, seqlen, sink_tokens, window, q_pre.device)    # local heads
        q_idx = index_project_ref(q_pre[b, heads][None], w_q)[0]                         # [HR, DI]
        k_idx = index_project_ref(k_pre[k0:k1, kv_heads], w_k)                           # [T, HR, DI]
        keep_blocks = block_topp_ref(index_scores_ref(q_idx, k_idx), top_p, block_size, sink_tokens)
        keep[heads, k0:k1] = expand_block_mask(keep_blocks, seqlen, block_size)          # [HR, T]
    return keep


def rtpurbo_decode_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_k: torch.Tensor,
                       q_pre: torch.Tensor, k_pre: torch.Tensor, retrieval_heads: Sequence[int],
                       w_q: torch.Tensor, w_k: torch.Tensor, sink_tokens: int, window: int, top_p: float,
                       block_size: int, dense_threshold: int, scale: float) -> torch.Tensor:
    """One decode step of one layer: exact attention over :func:`rtpurbo_decode_keep_ref`'s tokens.

    Args:
        q: ``[B, HQ, D]`` any float dtype, post-RoPE decode queries (one per sequence, at its last token).
        k: ``[T_k, HKV, D]`` any float dtype, post-RoPE keys of all sequences (the new token included).
        v: ``[T_k, HKV, D]`` any float dtype.
        cu_seqlens_k, q_pre, k_pre, retrieval_heads, w_q, w_k, sink_tokens, window, top_p, block_size,
        dense_threshold: as in :func:`rtpurbo_decode_keep_ref`.
        scale: softmax scale.

    Returns:
        ``[B, HQ, D]`` float32.
    """
    keep = rtpurbo_decode_keep_ref(cu_seqlens_k, q_pre, k_pre, retrieval_heads, w_q, w_k, sink_tokens,
                                   window, top_p, block_size, dense_threshold)           # [HQ, T_k]
    return sparse_decode_varlen_ref(q, k, v, cu_seqlens_k, keep, scale)[0]
