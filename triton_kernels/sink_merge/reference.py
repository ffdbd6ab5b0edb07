"""Plain PyTorch reference of the sink merge (float32 math, every row at once)."""

from __future__ import annotations

import torch


def merge_sinks_ref(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, seqused_k: torch.Tensor, block_table: torch.Tensor,
                    token_seqs: torch.Tensor, sink_tokens: int, window: int, scale: float,
                    out: torch.Tensor, lse: torch.Tensor, k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None) -> None:
    """Adds to the windowed attention in ``out`` the sink keys that lie outside each query's window.

    Query row ``t`` of sequence ``b`` sits at absolute position ``i = seqused_k[b] - (cu_seqlens_q[b+1] - t)``
    and gains the keys ``j < sink_tokens`` with ``j <= i - window`` (nearer ones are in its window
    already), merged by log-sum-exp with the window's ``lse``. Rows with no such key keep their value
    exactly. Every head is merged (GQA: query head ``h`` reads KV head ``h // (HQ // HKV)``).

    Args:
        query: ``[T, HQ, D]`` float.
        key_cache, value_cache: ``[num_pages, P, HKV, D]`` float (or float8_e4m3fn), any strides.
        cu_seqlens_q: ``[B+1]`` int32, query row offsets.
        seqused_k: ``[B]`` int32, keys per sequence (0 leaves a sequence alone: its positions are negative).
        block_table: ``[B, max_pages]`` int32.
        token_seqs: ``[T]`` int, the sequence of each row.
        sink_tokens: leading keys local heads always see; window: keys less than ``window`` back are in
            the window; scale: softmax scale.
        out: ``[T, HQ, D]`` float, the windowed attention; updated in place.
        lse: ``[HQ, T]`` float32, its log-sum-exp (FlashAttention's varlen layout); only read.
        k_scale, v_scale: 1-element float32 tensors on the device; stored keys and values are multiplied by
            them (fp8 caches' scales; None: 1).
    """
    num_tokens, num_heads, _ = query.shape
    page_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    seqs = token_seqs.long()
    pos = torch.arange(num_tokens, device=query.device) + (seqused_k - cu_seqlens_q[1:]).long()[seqs]  # [T]
    sinks = torch.arange(sink_tokens, device=query.device)                                  # [S]
    visible = sinks[None, :] <= (pos - window)[:, None]                                     # [T, S]
    if not bool(visible.any()):
        return
    pages = block_table[:, sinks // page_size].long()                                       # [B, S]
    group = num_heads // num_kv_heads
    k = key_cache[pages, sinks % page_size][seqs].float().repeat_interleave(group, dim=2)    # [T, S, HQ, D]
    v = value_cache[pages, sinks % page_size][seqs].float().repeat_interleave(group, dim=2)
    k, v = (x if sc is None else x * sc for x, sc in ((k, k_scale), (v, v_scale)))
    s = torch.einsum("thd,tshd->ths", query.float(), k) * scale                             # [T, HQ, S]
    s = s.masked_fill(~visible[:, None, :], float("-inf"))
    lse_win = lse.t().float()                                                               # [T, HQ]
    m = torch.maximum(lse_win, s.amax(dim=-1))
    w_win = torch.exp(lse_win - m)
    p = torch.exp(s - m[..., None])
    merged = (w_win[..., None] * out.float() + torch.einsum("ths,tshd->thd", p, v)) / (w_win + p.sum(-1))[..., None]
    rows = visible.any(dim=1)[:, None, None]
    out.copy_(torch.where(rows, merged.to(out.dtype), out))
