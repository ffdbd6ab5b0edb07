"""Sparse top-p prefill of retrieval heads in plain PyTorch: the ground truth for the sparse prefill kernels.

Layout (vLLM varlen): sequence ``b``'s chunk of ``seqlen_q`` new query rows are the last rows of its
``seqlen_k`` keys, so chunk row ``i`` sits at position ``seqlen_k - seqlen_q + i``. Query tiles are
the sequence's positions in aligned runs of ``tile_q`` (``[j * tile_q, (j + 1) * tile_q)``); a chunk
holds the parts of them its rows cover (:func:`chunk_tiles`: the first and last may be short). A tile's
selection thus depends on its positions, not on where vLLM cut the prompt into chunks or where a
prefix-cache hit ended, except for a tile a chunk boundary cuts. Per retrieval head ``r`` (query head
``heads[r]``, KV head ``heads[r] // G``) and tile:

1. Each key ``t <= last_pos`` (causal for the tile's last row) scores the max over the tile's rows of
   the index logit ``q_idx[i] . k_idx[t]`` (no scale); the float32 softmax of these scores gives each
   BS-token block its mass (:func:`tile_block_mass_ref`).
2. The tile keeps the sink blocks (those holding the first ``sink_tokens`` tokens), its diagonal blocks
   (every block overlapping ``[first_pos - BS + 1, last_pos]``) and the fewest other blocks, taken by
   decreasing mass with ties to the lower block id, that bring the kept mass to ``top_p``
   (:func:`tile_topp_ref`); ``top_p >= 1`` keeps every block.
3. Each row attends with an exact softmax to the keys of the kept blocks at positions ``<= its own``.

Computed in float32; inputs are never modified; outputs live on the inputs' device.
:func:`paged_sparse_prefill_ref` reads K/V and index keys from vLLM's paged unit tensors through
:func:`..paged_heads.gather`, as the kernel does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..headwise_attention.reference import masked_attention
from ..paged_heads import PagedHeads, PageTable, gather, to_float

@dataclass(frozen=True)
class Tile:
    """One query tile of a chunk: chunk rows ``[row0, row1)`` at positions ``[first_pos, last_pos]``."""

    row0: int
    row1: int
    first_pos: int
    last_pos: int


def chunk_tiles(seqlen_q: int, seqlen_k: int, tile_q: int) -> list[Tile]:
    """The query tiles of a chunk of ``seqlen_q`` rows ending a sequence of ``seqlen_k`` keys: the
    chunk's rows in runs cut at the positions that are multiples of ``tile_q`` (``ceil((shift +
    seqlen_q) / tile_q)`` tiles for ``shift = (seqlen_k - seqlen_q) % tile_q``, none for an empty chunk;
    the kept share of a tile is its kept-block count over ``ceil((last_pos + 1) / BS)``)."""
    if not 0 <= seqlen_q <= seqlen_k or tile_q < 1:
        raise ValueError(f"need 0 <= seqlen_q <= seqlen_k and tile_q >= 1, got {seqlen_q}, {seqlen_k}, {tile_q}")
    start = seqlen_k - seqlen_q
    cuts = [0, *range(tile_q - start % tile_q, seqlen_q, tile_q), seqlen_q] if seqlen_q else [0]
    return [Tile(r0, r1, start + r0, start + r1 - 1) for r0, r1 in zip(cuts[:-1], cuts[1:])]


def tile_block_mass_ref(q_idx: torch.Tensor, k_idx: torch.Tensor, block_size: int) -> torch.Tensor:
    """Block masses of one query tile over the keys it may see.

    A key's score is the max over the tile's rows of its index logit, so a block that any row wants
    ranks high: a tile whose last rows ask for a fact far back keeps that block although its other
    rows look elsewhere (a mean over the rows' index queries would dilute that row's vote). The
    logits of a row for the keys after its own position join the max; they lie in the tile's
    diagonal blocks, which every tile keeps anyway.

    Args:
        q_idx: ``[n_rows, HR, DI]`` any float dtype, the tile's rows' index queries (``n_rows >= 1``).
        k_idx: ``[n, HR, DI]`` any float dtype, index keys of positions ``0 .. last_pos`` (``n >= 1``).
        block_size: BS, tokens per block.

    Returns:
        ``[HR, ceil(n / BS)]`` float32: per block the softmax mass of its keys' scores (each row sums to 1).
    """
    num_keys = k_idx.shape[0]
    num_blocks = math.ceil(num_keys / block_size)
    scores = torch.einsum("qhi,thi->hqt", q_idx.float(), k_idx.float()).amax(dim=1)            # [HR, n]
    probs = torch.softmax(scores, dim=-1)
    padded = torch.nn.functional.pad(probs, (0, num_blocks * block_size - num_keys))
    return padded.view(probs.shape[0], num_blocks, block_size).sum(-1)


def tile_forced_blocks(tile: Tile, block_size: int, sink_tokens: int) -> torch.Tensor:
    """``[ceil((last_pos + 1) / BS)]`` bool: the tile's sink blocks and diagonal blocks (those
    overlapping ``[first_pos - BS + 1, last_pos]``)."""
    blocks = torch.arange(math.ceil((tile.last_pos + 1) / block_size))
    first_diagonal = max(tile.first_pos - block_size + 1, 0) // block_size
    return (blocks < math.ceil(sink_tokens / block_size)) | (blocks >= first_diagonal)


def tile_topp_ref(mass: torch.Tensor, forced: torch.Tensor, top_p: float) -> torch.Tensor:
    """The forced blocks plus the fewest others, by decreasing mass (ties: lower id first), that bring
    the kept mass to ``top_p``; every block when ``top_p >= 1`` (or when all of them fall short).

    Args:
        mass: ``[HR, NB]`` float32, non-negative.
        forced: ``[NB]`` bool.
        top_p: ``> 0``.

    Returns:
        ``[HR, NB]`` bool keep mask.
    """
    if top_p >= 1.0:
        return torch.ones_like(mass, dtype=torch.bool)
    forced = forced.to(mass.device).expand_as(mass)
    # Forced blocks first, then decreasing mass; the stable sort keeps ties in id order.
    order = torch.sort(torch.where(forced, torch.inf, mass), dim=-1, descending=True, stable=True).indices
    sorted_mass = mass.gather(-1, order)
    mass_before = torch.nn.functional.pad(sorted_mass.cumsum(-1)[:, :-1], (1, 0))      # exclusive prefix
    keep = torch.zeros_like(forced).scatter(-1, order, mass_before < top_p)
    return keep | forced


def sparse_prefill_visible_ref(q_idx: torch.Tensor, k_idx: torch.Tensor, top_p: float, sink_tokens: int,
                               block_size: int, tile_q: int, dense_threshold: int = 0
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Which keys each new row of one sequence's chunk sees, per retrieval head.

    Args:
        q_idx: ``[Tq, HR, DI]`` any float dtype, the chunk rows' index queries (the chunk ends the sequence).
        k_idx: ``[Tk, HR, DI]`` any float dtype, the index keys of all ``Tk >= Tq`` positions.
        top_p, sink_tokens, block_size, tile_q, dense_threshold: as :func:`paged_sparse_prefill_ref`.

    Returns:
        keep ``[HR, num_tiles, ceil(Tk / BS)]`` bool, the kept blocks per tile (blocks past a tile's
        last position False), and visible ``[HR, Tq, Tk]`` bool, the kept keys at positions ``<=`` the
        row's own.
    """
    seqlen_q, seqlen_k, num_ret = q_idx.shape[0], k_idx.shape[0], k_idx.shape[1]
    tiles = chunk_tiles(seqlen_q, seqlen_k, tile_q)
    keep = torch.zeros(num_ret, len(tiles), math.ceil(seqlen_k / block_size), dtype=torch.bool)
    p = 1.0 if seqlen_k < dense_threshold else top_p
    for i, tile in enumerate(tiles):
        mass = tile_block_mass_ref(q_idx[tile.row0:tile.row1], k_idx[:tile.last_pos + 1].to(q_idx.device),
                                   block_size)
        keep[:, i, :mass.shape[1]] = tile_topp_ref(mass, tile_forced_blocks(tile, block_size, sink_tokens), p).cpu()
    tokens = torch.arange(seqlen_k)
    positions = torch.arange(seqlen_k - seqlen_q, seqlen_k)                                    # [Tq]
    causal = tokens[None, :] <= positions[:, None]                                             # [Tq, Tk]
    row_tile = positions // tile_q - (seqlen_k - seqlen_q) // tile_q                          # [Tq]
    visible = keep[:, row_tile][:, :, tokens // block_size] & causal                           # [HR, Tq, Tk]
    return keep, visible


def paged_sparse_prefill_ref(q: torch.Tensor, kv: PagedHeads, kv_tables: Sequence[PageTable], index: PagedHeads,
                             index_table: PageTable, q_idx: torch.Tensor, cu_seqlens_q: torch.Tensor,
                             seqused_k: torch.Tensor, heads: torch.Tensor | Sequence[int], top_p: float,
                             sink_tokens: int, block_size: int, scale: float, tile_q: int,
                             dense_threshold: int = 0, k_scale: torch.Tensor | None = None,
                             v_scale: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """:func:`sparse_prefill`'s result, in float32 (arguments as the kernel's, ``tile_q`` the plan's).

    K/V of the retrieval heads' KV heads and the index keys are read through :func:`gather`; fp8
    entries are dequantised as ``fp8 * scale``. A sequence with ``seqlen_k < dense_threshold`` keeps
    every block. The keys each row sees: :func:`sparse_prefill_visible_ref`.

    Returns:
        out ``[T, HR, D]`` float32 (the rows of query head ``heads[r]`` in column ``r``), lse
        ``[T, HR]`` float32 (natural log), and per sequence ``keep [HR, num_tiles_b, NB_b]`` bool
        (``NB_b = ceil(seqlen_k / BS)``; blocks past a tile's last position are False).
    """
    num_tokens, num_heads, head_dim = q.shape
    group = num_heads // kv.num_heads
    heads = [int(h) for h in (heads.tolist() if isinstance(heads, torch.Tensor) else heads)]
    cu_q, lens_k = cu_seqlens_q.tolist(), seqused_k.tolist()
    out = torch.zeros(num_tokens, len(heads), head_dim, dtype=torch.float32, device=q.device)
    lse = torch.zeros(num_tokens, len(heads), dtype=torch.float32, device=q.device)
    keeps = []
    for b, (q0, q1, seqlen_k) in enumerate(zip(cu_q[:-1], cu_q[1:], lens_k)):
        tokens = torch.arange(seqlen_k)
        k_idx = torch.stack([to_float(gather(index, [index_table], b, r, tokens)) for r in range(len(heads))], 1)
        keep, visible = sparse_prefill_visible_ref(q_idx[q0:q1], k_idx, top_p, sink_tokens, block_size, tile_q,
                                                   dense_threshold)
        keeps.append(keep)
        if q1 == q0:
            continue
        for r, h in enumerate(heads):
            raw = gather(kv, kv_tables, b, h // group, tokens).to(q.device)
            k = to_float(raw[:, :head_dim], k_scale)[:, None]                               # [Tk, 1, D]
            v = to_float(raw[:, head_dim:], v_scale)[:, None]
            o, s = masked_attention(q[q0:q1, h:h + 1], k, v, visible[r:r + 1].to(q.device), scale)
            out[q0:q1, r], lse[q0:q1, r] = o[:, 0], s[:, 0]
    return out, lse, keeps
