"""The attention layer the kernel benchmarks time, and its decode inputs.

Shape: Llama-3-8B's (32 query heads, 8 KV heads, head dim 128, bf16), 64-token pages and selection
blocks, 5 of the 32 query heads (15%) are retrieval heads with 16-dim index keys; local heads see 4
sinks + 8192 tokens. ``benchmarks/bench_attention.py`` times the whole layer against FA3,
``benchmarks/bench_block_topp.py`` the decode selection alone; both build their decode batches with
:func:`random_block_table` and :func:`decode_index_inputs`.

Random weights have no real sparsity, so :func:`plant_hot_blocks` sets the kept-block share
explicitly: a share of each sequence's blocks holds the indexer's mass.

Torch and the Triton kernels are imported when a function runs, not at import time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

HQ, HKV, D, DI, PAGE, BS = 32, 8, 128, 16, 64, 64
RETRIEVAL = (3, 9, 14, 22, 27)          # 5 of 32 (15%), on KV heads 0, 2, 3, 5, 6
SINK, WINDOW, TOP_P = 4, 8192, 0.9
ROPE_BASE, ROPE_MAX_POSITION = 500000.0, 1 << 21


def dtype():
    """The layer's dtype (bf16)."""
    import torch

    return torch.bfloat16


def rope_spec():
    """The layer's RoPE (neox style over the whole head, base 500000)."""
    from rtpurbo_vllm.rope import RopeSpec

    return RopeSpec(head_size=D, rotary_dim=D, max_position=ROPE_MAX_POSITION, base=ROPE_BASE,
                    is_neox_style=True, scaling=None)


def random_block_table(tokens_per_seq: int, num_seqs: int, device):
    """``([num_seqs, pages_per_seq] int32, num_pages)``: distinct, shuffled pages for every sequence."""
    import torch

    pages_per_seq = math.ceil(tokens_per_seq / PAGE)
    num_pages = pages_per_seq * num_seqs
    block_table = torch.randperm(num_pages, device=device, dtype=torch.int32).view(num_seqs, pages_per_seq)
    return block_table, num_pages


def plant_hot_blocks(q_idx, index_cache, block_table, length, keep, generator):
    """Makes ``keep`` of each sequence's blocks (plus the forced ones) hold the indexer's mass."""
    import torch

    num_blocks = math.ceil(length / BS)
    hot = max(1, round(keep * num_blocks))
    index_cache.normal_(0, 0.05)
    for b in range(q_idx.shape[0]):
        blocks = torch.randperm(num_blocks, generator=generator, device="cpu")[:hot]
        tokens = (blocks[:, None] * BS + torch.arange(BS)).flatten()
        tokens = tokens[tokens < length].to(q_idx.device)
        pages, offs = block_table[b, tokens // PAGE].long(), tokens % PAGE
        index_cache[pages, offs] = (4.0 * q_idx[b] / q_idx[b].norm(dim=-1, keepdim=True)).to(index_cache.dtype)


@dataclass
class DecodeIndexInputs:
    """One decode step's queries and the retrieval heads' index keys (:func:`decode_index_inputs`).

    Attributes:
        q: ``[B, HQ, D]`` the new tokens' queries. positions: ``[B]`` their positions (``length - 1``).
        rope_table: the RoPE table the index queries are built with. heads: ``[HR]`` int32 retrieval
            heads. w_q: ``[HR, DI, D]`` the index-query projection.
        q_idx: ``[B, HR, DI]`` the index queries. index: the index keys' :class:`PagedHeads`.
        index_table: their :class:`PageTable` (the batch's block table). seq_lens: ``[B]`` int32.
    """

    q: Any
    positions: Any
    rope_table: Any
    heads: Any
    w_q: Any
    q_idx: Any
    index: Any
    index_table: Any
    seq_lens: Any


def decode_index_inputs(batch: int, length: int, keep: float, block_table, num_pages: int,
                        device, index_dtype=None) -> DecodeIndexInputs:
    """A decode step of ``batch`` sequences of ``length`` tokens over ``block_table``'s pages: random
    queries, their index queries, and index keys with ``keep`` of each sequence's blocks planted hot
    (:func:`plant_hot_blocks`, a fixed generator), stored in ``index_dtype`` (default the model's dtype;
    ``torch.uint8``: unscaled e4m3 bytes, as a cache with fp8 index keys stores them)."""
    import torch

    from rtpurbo_vllm.triton_kernels.index_keys import index_queries, rope_table
    from rtpurbo_vllm.triton_kernels.paged_heads import PagedHeads, quantize_fp8

    q = torch.randn(batch, HQ, D, dtype=dtype(), device=device)
    seq_lens = torch.full((batch,), length, dtype=torch.int32, device=device)
    heads = torch.tensor(RETRIEVAL, dtype=torch.int32, device=device)
    w_q = torch.randn(len(RETRIEVAL), DI, D, dtype=dtype(), device=device) / D ** 0.5
    positions = torch.full((batch,), length - 1, device=device)
    table = rope_table(rope_spec(), device, num_positions=length)
    q_idx = torch.empty(batch, len(RETRIEVAL), DI, dtype=dtype(), device=device)
    index_cache = torch.empty(num_pages, PAGE, len(RETRIEVAL), DI, dtype=dtype(), device=device)
    index_queries(q, positions, table, heads, w_q, q_idx, is_neox_style=True)
    plant_hot_blocks(q_idx, index_cache, block_table, length, keep, torch.Generator().manual_seed(0))
    if index_dtype == torch.uint8:
        index_cache = quantize_fp8(index_cache, 1.0)
    index = PagedHeads.single(index_cache)
    return DecodeIndexInputs(q=q, positions=positions, rope_table=table, heads=heads, w_q=w_q, q_idx=q_idx,
                             index=index, index_table=index.table(0, block_table), seq_lens=seq_lens)
