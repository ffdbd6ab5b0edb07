"""The 16-dim indexer projection in plain PyTorch: the ground truth for the index-key kernels.

vLLM hands the attention backend post-RoPE q/k; the indexer projects *pre*-RoPE vectors, so the fused
references un-rotate first (:func:`rtpurbo_vllm.rope.invert_rope`, exact inverse of vLLM's rotation,
YaRN's mscale divided out) and then project with each retrieval head's own ``W`` (``[HR, DI, D]``).

Computed in float32; inputs are never modified; outputs live on the inputs' device.
"""

from __future__ import annotations

import torch

from rtpurbo_vllm.rope import RopeSpec, invert_rope

from ..paged_heads import PagedHeads, quantize_fp8, scatter


def index_project_ref(x_pre: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Projects pre-RoPE queries or keys with each retrieval head's own matrix.

    For keys, the caller first gathers, per retrieval head, the KV head that head reads.

    Args:
        x_pre: ``[T, HR, D]`` any float dtype, pre-RoPE q (or k) of each retrieval head.
        w: ``[HR, DI, D]`` any float dtype, ``W^Q_h`` (or ``W^K_h``) per retrieval head.

    Returns:
        ``[T, HR, DI]`` float32: ``w[h] @ x_pre[t, h]``.
    """
    return torch.einsum("thd,hid->thi", x_pre.float(), w.float())


def index_queries_ref(query: torch.Tensor, positions: torch.Tensor, spec: RopeSpec, heads: torch.Tensor,
                      w_q: torch.Tensor) -> torch.Tensor:
    """Index queries of the retrieval heads from post-RoPE queries.

    Args:
        query: ``[T, HQ, D]`` any float dtype, post-RoPE queries as vLLM's backend receives them.
        positions: ``[T]`` integer token positions.
        spec: the model's rotary embedding.
        heads: ``[HR]`` integer, the query head of each retrieval head.
        w_q: ``[HR, DI, D]`` any float dtype, ``W^Q_h`` per retrieval head.

    Returns:
        ``[T, HR, DI]`` float32: ``w_q[r] @ unrope(query[t, heads[r]])``, un-RoPE in float32.
    """
    q = query[:, heads.long()].float()
    return index_project_ref(invert_rope(q, positions, spec), w_q)


def index_keys_ref(key: torch.Tensor, positions: torch.Tensor, spec: RopeSpec, kv_heads: torch.Tensor,
                   w_k: torch.Tensor) -> torch.Tensor:
    """Index keys of the retrieval heads from post-RoPE keys (no cache involved).

    Args:
        key: ``[T, HKV, D]`` any float dtype, post-RoPE keys.
        positions: ``[T]`` integer token positions.
        spec: the model's rotary embedding.
        kv_heads: ``[HR]`` integer, the KV head each retrieval head reads (repeats allowed).
        w_k: ``[HR, DI, D]`` any float dtype, ``W^K_h`` per retrieval head.

    Returns:
        ``[T, HR, DI]`` float32: ``w_k[r] @ unrope(key[t, kv_heads[r]])``, un-RoPE in float32.
    """
    k = key[:, kv_heads.long()].float()
    return index_project_ref(invert_rope(k, positions, spec), w_k)


def write_index_keys_ref(key: torch.Tensor, positions: torch.Tensor, spec: RopeSpec, kv_heads: torch.Tensor,
                         w_k: torch.Tensor, slot_mapping: torch.Tensor, index: PagedHeads) -> PagedHeads:
    """The paged index-key units after writing the tokens' index keys, as a new layout over copies.

    Args:
        key, positions, spec, kv_heads, w_k: as :func:`index_keys_ref`.
        slot_mapping: ``[T]`` integer, vLLM's ``page_id * P + offset`` per token of the index kind;
            ``-1`` (any negative value) marks a padding token, which writes nothing.
        index: the index-key layout (``HR`` heads of width ``DI``, one kind); not modified.

    Returns:
        ``index.clone()`` with head ``r``'s entry of each non-padding token's slot set to
        ``w_k[r] @ unrope(key[t, kv_heads[r]])`` (float32 rounded to the units' dtype; fp8 units:
        :func:`..paged_heads.quantize_fp8` with scale 1), written through :func:`..paged_heads.scatter`.
    """
    keys = index_keys_ref(key, positions, spec, kv_heads, w_k)                     # [T, HR, DI] float32
    assert keys.shape[1:] == (index.num_heads, index.width), (keys.shape, index.num_heads, index.width)
    out = index.clone()
    for r in range(index.num_heads):
        stored = quantize_fp8(keys[:, r], 1.0, index.dtype) if index.is_fp8 else keys[:, r].to(index.dtype)
        scatter(out, [slot_mapping], r, stored)
    return out
