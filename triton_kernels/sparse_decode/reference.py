"""Sparse decode attention in plain PyTorch: the ground truth for the sparse decode kernels.

One decode query per sequence attends exactly to the kept tokens of each query head, with the softmax
renormalised over those tokens. A head that keeps no token gets output 0 and LSE ``-inf``.

Computed in float32; inputs are never modified; outputs live on the inputs' device.
:func:`paged_sparse_decode_ref` reads the K/V of vLLM's paged unit tensors
(:class:`..paged_heads.PagedHeads`) as the kernel does, through :func:`..paged_heads.gather`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..headwise_attention.reference import attention_mask, masked_attention
from ..paged_heads import PagedHeads, PageTable, gather, to_float


def sparse_decode_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of one sequence's query over the kept tokens.

    Args:
        q: ``[HQ, D]`` any float dtype, the decode query.
        k: ``[T, HKV, D]`` any float dtype, the sequence's keys (the query's own included).
        v: ``[T, HKV, D]`` any float dtype.
        keep: ``[HQ, T]`` bool, the tokens each query head attends to.
        scale: softmax scale.

    Returns:
        out ``[HQ, D]`` float32 and lse ``[HQ]`` float32.
    """
    if keep.shape != (q.shape[0], k.shape[0]):
        raise ValueError(f"keep has shape {tuple(keep.shape)}, expected {(q.shape[0], k.shape[0])}")
    out, lse = masked_attention(q[None], k, v, keep[:, None, :], scale)   # [1, HQ, D], [1, HQ]
    return out[0], lse[0]


def sparse_decode_varlen_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_k: torch.Tensor,
                             keep: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sparse_decode_ref` for a batch: one decode query per sequence, keys concatenated.

    Args:
        q: ``[B, HQ, D]`` any float dtype, one decode query per sequence.
        k: ``[T_k, HKV, D]`` any float dtype, the keys of all sequences.
        v: ``[T_k, HKV, D]`` any float dtype.
        cu_seqlens_k: ``[B+1]`` int32, key row offsets per sequence.
        keep: ``[HQ, T_k]`` bool, the tokens each query head attends to, in the keys' row order.
        scale: softmax scale.

    Returns:
        out ``[B, HQ, D]`` float32 and lse ``[B, HQ]`` float32.
    """
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.zeros(q.shape[:2], dtype=torch.float32, device=q.device)
    cu_k = cu_seqlens_k.tolist()
    if len(cu_k) != q.shape[0] + 1:
        raise ValueError(f"cu_seqlens_k has {len(cu_k)} entries for {q.shape[0]} queries")
    for b, (k0, k1) in enumerate(zip(cu_k[:-1], cu_k[1:])):
        out[b], lse[b] = sparse_decode_ref(q[b], k[k0:k1], v[k0:k1], keep[:, k0:k1], scale)
    return out, lse


def decode_keep_ref(seq_len: int, num_heads: int, retrieval_heads: Sequence[int], selected: torch.Tensor,
                    num_selected: torch.Tensor, block_size: int, sink_tokens: int, window: int,
                    dense_threshold: int = 0, device: torch.device | str | None = None) -> torch.Tensor:
    """``[HQ, L]`` bool: the tokens each query head of one decode sequence attends to.

    Local heads: sinks and window (every token when ``L < dense_threshold``). Retrieval head
    ``retrieval_heads[r]``: the tokens of blocks ``selected[r, :num_selected[r]]`` (``[HR, max_blocks]``
    and ``[HR]``; the count clamped to ``[0, max_blocks]``, ids < 0 and tokens >= L dropped).
    """
    keep = attention_mask(1, seq_len, sink_tokens, window, device)[0].expand(num_heads, seq_len).clone()
    if seq_len < dense_threshold:
        keep[:] = True
    selected, num_selected = selected.cpu(), num_selected.cpu()
    for r, h in enumerate(retrieval_heads):
        n = min(max(int(num_selected[r]), 0), selected.shape[-1])
        blocks = selected[r, :n].long()
        blocks = blocks[blocks >= 0]
        tokens = (blocks[:, None] * block_size + torch.arange(block_size)).flatten()
        row = torch.zeros(seq_len, dtype=torch.bool)
        row[tokens[tokens < seq_len]] = True
        keep[h] = row.to(keep.device)
    return keep


def paged_sparse_decode_ref(q: torch.Tensor, kv: PagedHeads, kv_tables: Sequence[PageTable],
                            seq_lens: torch.Tensor | Sequence[int], retrieval_heads: torch.Tensor | Sequence[int],
                            selected: torch.Tensor, num_selected: torch.Tensor, block_size: int, sink_tokens: int,
                            window: int, scale: float, dense_threshold: int = 0,
                            k_scale: torch.Tensor | None = None,
                            v_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`headwise_sparse_decode`'s result from the paged K|V layout, in float32.

    Each KV head's vectors are read through :func:`gather` (its unit, slot and kind's block table)
    for the tokens some query head of its group keeps, and only those (a window kind's other pages may
    hold anything); fp8 entries are dequantised as ``fp8 * scale``. Arguments as the kernel's.

    Returns:
        out ``[B, HQ, D]`` float32 and lse ``[B, HQ]`` float32 (0 and ``-inf`` for ``seq_len == 0``).
    """
    batch, num_heads, head_dim = q.shape
    group = num_heads // kv.num_heads
    lens = [int(n) for n in (seq_lens.tolist() if isinstance(seq_lens, torch.Tensor) else seq_lens)]
    ret = [int(h) for h in (retrieval_heads.tolist() if isinstance(retrieval_heads, torch.Tensor)
                            else retrieval_heads)]
    out = torch.zeros(batch, num_heads, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.full((batch, num_heads), float("-inf"), dtype=torch.float32, device=q.device)
    for b, n in enumerate(lens):
        if n == 0:
            continue
        keep = decode_keep_ref(n, num_heads, ret, selected[b], num_selected[b], block_size, sink_tokens, window,
                               dense_threshold, q.device)
        k = torch.zeros(n, kv.num_heads, head_dim, dtype=torch.float32, device=q.device)
        v = torch.zeros_like(k)
        for g in range(kv.num_heads):
            tokens = keep[g * group:(g + 1) * group].any(0).nonzero().flatten()
            raw = gather(kv, kv_tables, b, g, tokens).to(q.device)
            k[tokens, g] = to_float(raw[:, :head_dim], k_scale)
            v[tokens, g] = to_float(raw[:, head_dim:], v_scale)
        out[b], lse[b] = sparse_decode_ref(q[b], k, v, keep, scale)
    return out, lse
