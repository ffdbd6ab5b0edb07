"""Sparse decode attention in plain PyTorch: the ground truth for the sparse decode kernels.

One decode query per sequence attends exactly to the kept tokens of each query head, with the softmax
renormalised over those tokens. A head that keeps no token gets output 0 and LSE ``-inf``.

Computed in float32; inputs are never modified; outputs live on the inputs' device.
"""

from __future__ import annotations

import torch

from ..headwise_attention.reference import masked_attention


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
