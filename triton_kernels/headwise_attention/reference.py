"""Head-wise prefill attention in plain PyTorch: the ground truth for the prefill kernels.

Layout (vLLM varlen): the tokens of B sequences are concatenated; ``cu_seqlens_q`` / ``cu_seqlens_k``
(int32, ``[B+1]``) give each sequence's rows. A sequence's ``seqlen_q`` new queries sit at the END of its
``seqlen_k`` keys: query ``i`` of the chunk has absolute position ``seqlen_k - seqlen_q + i``.

Retrieval query heads attend densely and causally. Local query heads see key ``j`` from the query at
absolute position ``i`` iff ``j <= i`` and (``i - j < window`` or ``j < sink_tokens``).

Computed in float32; inputs are never modified; outputs live on the inputs' device.
"""

from __future__ import annotations

import torch


def attention_mask(seqlen_q: int, seqlen_k: int, sink_tokens: int = 0, window: int | None = None,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Which keys each query of a chunk sees.

    Args:
        seqlen_q: new queries of the sequence (the chunk), ``<= seqlen_k``.
        seqlen_k: keys of the sequence, history and chunk together.
        sink_tokens: leading keys every query sees (only used with ``window``).
        window: ``None`` for plain causal; else (``>= 1``) a query at ``i`` sees ``j <= i`` with
            ``i - j < window`` or ``j < sink_tokens``.
        device: device of the result.

    Returns:
        ``[seqlen_q, seqlen_k]`` bool: True where query ``i`` of the chunk sees key ``j``.
    """
    if window is not None and (window < 1 or sink_tokens < 0):
        raise ValueError(f"need window >= 1 and sink_tokens >= 0, got window={window}, "
                         f"sink_tokens={sink_tokens}")
    i = torch.arange(seqlen_k - seqlen_q, seqlen_k, device=device)[:, None]  # [Tq, 1] absolute positions
    j = torch.arange(seqlen_k, device=device)[None, :]                        # [1, Tk]
    visible = j <= i
    if window is not None:
        visible &= (i - j < window) | (j < sink_tokens)
    return visible


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of one sequence restricted to the visible keys, in float32.

    Query head ``h`` reads KV head ``h // G``. A query that sees no key gets output 0 and LSE ``-inf``.

    Args:
        q: ``[Tq, HQ, D]`` any float dtype.
        k: ``[Tk, HKV, D]`` any float dtype; ``HQ % HKV == 0``.
        v: ``[Tk, HKV, D]`` any float dtype.
        visible: ``[HQ, Tq, Tk]`` bool (broadcastable), True where the query sees the key.
        scale: multiplies ``q . k``.

    Returns:
        out ``[Tq, HQ, D]`` float32 and lse ``[Tq, HQ]`` float32 (natural log of the softmax denominator).
    """
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    group = num_heads // num_kv_heads
    k = k.float().repeat_interleave(group, dim=1)                       # [Tk, HQ, D]
    v = v.float().repeat_interleave(group, dim=1)                       # [Tk, HQ, D]
    s = torch.einsum("qhd,khd->hqk", q.float(), k) * scale              # [HQ, Tq, Tk]
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                                    # [HQ, Tq]
    p = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0.0)[..., None])  # [HQ, Tq, Tk]
    out = torch.einsum("hqk,khd->qhd", p, v)                            # [Tq, HQ, D]
    return out, lse.transpose(0, 1)


def headwise_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                           retrieval_mask: torch.Tensor, sink_tokens: int, window: int,
                           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Head-wise causal attention of chunks of new queries against their sequences' whole KV history.

    Args:
        q: ``[T_q, HQ, D]`` any float dtype, the new queries of all sequences.
        k: ``[T_k, HKV, D]`` any float dtype, all keys (history then chunk) of all sequences.
        v: ``[T_k, HKV, D]`` any float dtype.
        cu_seqlens_q: ``[B+1]`` int32, query row offsets per sequence.
        cu_seqlens_k: ``[B+1]`` int32, key row offsets per sequence; ``seqlen_q <= seqlen_k``.
        retrieval_mask: ``[HQ]`` bool, True for retrieval (dense causal) heads, False for local heads.
        sink_tokens: leading keys local heads always see (``>= 0``).
        window: local heads see keys less than ``window`` positions back (``>= 1``).
        scale: softmax scale.

    Returns:
        out ``[T_q, HQ, D]`` float32 and lse ``[T_q, HQ]`` float32. Rows outside ``cu_seqlens_q`` are 0.
    """
    if retrieval_mask.shape != (q.shape[1],):
        raise ValueError(f"retrieval_mask has shape {tuple(retrieval_mask.shape)}, expected ({q.shape[1]},)")
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.zeros(q.shape[:2], dtype=torch.float32, device=q.device)
    retrieval = retrieval_mask.to(q.device)[:, None, None]             # [HQ, 1, 1]
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for q0, q1, k0, k1 in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:]):
        if q1 - q0 > k1 - k0:
            raise ValueError(f"a sequence has {q1 - q0} queries but only {k1 - k0} keys")
        dense = attention_mask(q1 - q0, k1 - k0, device=q.device)                     # [Tq, Tk]
        local = attention_mask(q1 - q0, k1 - k0, sink_tokens, window, q.device)       # [Tq, Tk]
        visible = torch.where(retrieval, dense, local)                                # [HQ, Tq, Tk]
        out[q0:q1], lse[q0:q1] = masked_attention(q[q0:q1], k[k0:k1], v[k0:k1], visible, scale)
    return out, lse
