"""Per-step attention metadata of the RTPURBO backend (written by the builder, read by the impl).

The batch is ordered decodes first, then prefills (vLLM reorders it for us)::

    tokens:  | d0 | d1 | ... | d_{ND-1} | prefill 0 chunk ... | prefill 1 chunk ... |
             '---- decode part: one ----''----- prefill part: query_len > 1 -------'
                   token per request

A prefill chunk's queries are the last ``query_len`` tokens of its sequence; the earlier tokens
(prefix-cache hits, earlier chunks) are already in the paged cache. All tensors live on the GPU and
are slices of vLLM's per-step tensors or of the builder's persistent buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.v1.attention.backend import AttentionMetadata

from rtpurbo_vllm.triton_kernels.block_topp import BlockTopPWorkspace
from rtpurbo_vllm.triton_kernels.sparse_decode import SparseDecodeWorkspace
from rtpurbo_vllm.triton_kernels.sparse_prefill import SparsePrefillPlan, SparsePrefillWorkspace


@dataclass
class RTPurboDecodeWorkspace:
    """Scratch of the decode kernels, allocated once by the builder and shared by all layers.

    Attributes:
        index_queries: ``[max_decodes, HR_max, DI]`` in the KV cache's dtype (the index keys' dtype), the
            indexer query per retrieval head.
        selected: ``[max_decodes, HR_max, max_blocks]`` int32, kept selection blocks (ascending, -1 pad).
        num_selected: ``[max_decodes, HR_max]`` int32.
        topp: the block top-p kernel's scratch per retrieval-head count HR of a layer (views of one
            ``[max_decodes, HR_max, max_blocks]`` buffer pair).
        attention: the split-KV sparse decode kernel's scratch.
    """

    index_queries: torch.Tensor
    selected: torch.Tensor
    num_selected: torch.Tensor
    topp: dict[int, BlockTopPWorkspace]
    attention: SparseDecodeWorkspace


@dataclass
class RTPurboDecodeMetadata:
    """The decode requests (one new token each).

    Attributes:
        seq_lens: ``[ND]`` int32, tokens in the cache including the new one.
        block_table: ``[ND, max_pages]`` int32, page ids of each sequence.
        workspace: the decode kernels' scratch (sliced to ``ND`` by the impl).
    """

    seq_lens: torch.Tensor
    block_table: torch.Tensor
    workspace: RTPurboDecodeWorkspace


@dataclass
class RTPurboSparsePrefill:
    """The retrieval heads' sparse top-p prefill of this step (only when ``prefill_top_p < 1``).

    Attributes:
        plan: the prefill chunks' query tiles, in waves (built once per step on the host).
        index_queries: ``[max_num_batched_tokens, HR_max, DI]`` in the model dtype, scratch for the
            prefill rows' index queries (a layer uses ``[:T, :HR]``).
        workspace: the sparse prefill kernels' scratch, allocated once by the builder.
    """

    plan: SparsePrefillPlan
    index_queries: torch.Tensor
    workspace: SparsePrefillWorkspace


@dataclass
class RTPurboPrefillMetadata:
    """The prefill requests (a chunk of ``query_len > 1`` new tokens each).

    Attributes:
        cu_seqlens_q: ``[NP+1]`` int32, query offsets relative to the first prefill token.
        seq_lens: ``[NP]`` int32, tokens in the cache including the chunk.
        block_table: ``[NP, max_pages]`` int32.
        max_query_len: longest chunk.
        max_seq_len: longest sequence (an upper bound).
        sparse: the retrieval heads' sparse prefill, or None (they run dense).
    """

    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    max_query_len: int
    max_seq_len: int
    sparse: RTPurboSparsePrefill | None = None


@dataclass
class RTPurboMetadata(AttentionMetadata):
    """What one step of the RTPURBO impl needs, for every layer of the KV-cache group.

    Attributes:
        num_actual_tokens: tokens of the step (without CUDA-graph padding).
        slot_mapping: ``[num_actual_tokens]`` int64, cache slot of each new token (-1: padding).
        positions: ``[num_actual_tokens]`` int64, position of each new token (to undo RoPE).
        num_decode_tokens: leading tokens that belong to decode requests (``ND``).
        decode: the decode part, or None.
        prefill: the prefill part, or None.
    """

    num_actual_tokens: int
    slot_mapping: torch.Tensor
    positions: torch.Tensor
    num_decode_tokens: int
    decode: RTPurboDecodeMetadata | None
    prefill: RTPurboPrefillMetadata | None
