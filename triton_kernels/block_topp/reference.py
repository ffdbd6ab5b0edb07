"""Indexer scores and top-p selection in plain PyTorch: the ground truth for the block top-p kernel.

For one decode query of one sequence, each retrieval head scores the sequence's T keys (the query's
own token included, last), turns the scores into a softmax distribution and keeps the smallest set of
tokens (or BS-token blocks) whose mass reaches ``top_p``. Candidates are taken in order of decreasing
mass, ties to the lower index, so the set is deterministic; ``top_p == 1`` keeps everything.

Computed in float32; inputs are never modified; outputs live on the inputs' device.
:func:`paged_block_topp_ref` reads the index keys from vLLM's paged unit tensors
(:class:`..paged_heads.PagedHeads`) as the kernel does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..paged_heads import PagedHeads, PageTable, gather, to_float


def index_scores_ref(q_idx: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor:
    """Indexer scores of one query against a sequence's index keys (plain dot product, no scale).

    Args:
        q_idx: ``[HR, DI]`` any float dtype, the query's index vector per retrieval head.
        k_idx: ``[T, HR, DI]`` any float dtype, the sequence's index keys per retrieval head.

    Returns:
        ``[HR, T]`` float32.
    """
    return torch.einsum("hi,thi->ht", q_idx.float(), k_idx.float())


def _topp_select(mass: torch.Tensor, top_p: float, forced: torch.Tensor) -> torch.Tensor:
    """Smallest set containing ``forced`` whose mass reaches ``top_p``, filled by decreasing mass.

    Args:
        mass: ``[H, N]`` float32, non-negative, each row summing to 1.
        top_p: in ``(0, 1]``.
        forced: ``[H, N]`` bool, entries kept whatever their mass.

    Returns:
        ``[H, N]`` bool keep mask.
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_p == 1.0:
        return torch.ones_like(mass, dtype=torch.bool)
    # Forced entries first, then decreasing mass; the stable sort puts ties in index order.
    rank_key = torch.where(forced, torch.inf, mass)
    order = torch.sort(rank_key, dim=-1, descending=True, stable=True).indices    # [H, N]
    sorted_mass = mass.gather(-1, order)                                           # [H, N]
    mass_before = torch.nn.functional.pad(sorted_mass.cumsum(-1)[:, :-1], (1, 0))  # [H, N] exclusive
    keep_sorted = mass_before < top_p
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted) | forced


def token_topp_ref(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Token-level top-p: the smallest token set per head whose softmax mass reaches ``top_p``.

    Args:
        scores: ``[HR, T]`` any float dtype, indexer scores.
        top_p: in ``(0, 1]`` (ValueError otherwise).

    Returns:
        ``[HR, T]`` bool keep mask.
    """
    mass = torch.softmax(scores.float(), dim=-1)                                   # [HR, T]
    return _topp_select(mass, top_p, torch.zeros_like(mass, dtype=torch.bool))


def block_topp_ref(scores: torch.Tensor, top_p: float, block_size: int, sink_tokens: int) -> torch.Tensor:
    """Block-level top-p over BS-token blocks of one query's indexer scores.

    The softmax runs over the T tokens; a block's mass is the sum over its tokens (the last block may
    be partial). The blocks holding the ``sink_tokens`` first tokens and the last block (the query's
    own) are always kept; other blocks join by decreasing mass (ties: lower block first) until the kept
    mass reaches ``top_p``. The result is the smallest such set containing the forced blocks.

    Args:
        scores: ``[HR, T]`` any float dtype, indexer scores, ``T >= 1``.
        top_p: in ``(0, 1]`` (ValueError otherwise); 1 keeps every block.
        block_size: BS, tokens per block (``>= 1``).
        sink_tokens: leading sink tokens (``>= 0``); their blocks are forced.

    Returns:
        ``[HR, ceil(T / BS)]`` bool keep mask over blocks.
    """
    num_heads, num_tokens = scores.shape
    if block_size < 1 or sink_tokens < 0 or num_tokens < 1:
        raise ValueError(f"need block_size >= 1, sink_tokens >= 0 and T >= 1, got block_size={block_size}, "
                         f"sink_tokens={sink_tokens}, T={num_tokens}")
    num_blocks = math.ceil(num_tokens / block_size)
    probs = torch.softmax(scores.float(), dim=-1)                                  # [HR, T]
    padded = torch.nn.functional.pad(probs, (0, num_blocks * block_size - num_tokens))
    mass = padded.view(num_heads, num_blocks, block_size).sum(-1)                  # [HR, NB]
    blocks = torch.arange(num_blocks, device=scores.device)
    forced = (blocks < math.ceil(sink_tokens / block_size)) | (blocks == num_blocks - 1)  # [NB]
    return _topp_select(mass, top_p, forced.expand(num_heads, num_blocks))


def expand_block_mask(keep_blocks: torch.Tensor, num_tokens: int, block_size: int) -> torch.Tensor:
    """Token mask from a block mask.

    Args:
        keep_blocks: ``[HR, ceil(T / BS)]`` bool.
        num_tokens: T.
        block_size: BS.

    Returns:
        ``[HR, T]`` bool: token ``t`` is kept iff block ``t // BS`` is.
    """
    if keep_blocks.shape[-1] != math.ceil(num_tokens / block_size):
        raise ValueError(f"{keep_blocks.shape[-1]} blocks do not cover {num_tokens} tokens "
                         f"of block size {block_size}")
    return keep_blocks.repeat_interleave(block_size, dim=-1)[..., :num_tokens]


def paged_index_keys_ref(index: PagedHeads, index_table: PageTable, b: int, seq_len: int) -> torch.Tensor:
    """``[T, HR, DI]`` float32: the index keys of sequence ``b``'s ``T = seq_len`` tokens, read through
    :func:`..paged_heads.gather` (head ``r``'s unit and slot, the index kind's block table)."""
    tokens = torch.arange(seq_len)
    return torch.stack([to_float(gather(index, [index_table], b, r, tokens)) for r in range(index.num_heads)], dim=1)


def paged_block_topp_ref(q_idx: torch.Tensor, index: PagedHeads, index_table: PageTable,
                         seq_lens: torch.Tensor | Sequence[int], top_p: float, sink_tokens: int, block_size: int,
                         dense_threshold: int = 0) -> list[torch.Tensor | None]:
    """:func:`block_topp_ref` of every decode sequence, from the paged index keys.

    Args:
        q_idx: ``[B, HR, DI]`` the decode queries' index vectors.
        index, index_table: the index-key layout and the batch's page table (as the kernel's).
        seq_lens: ``[B]`` tokens per sequence.
        top_p, sink_tokens, block_size: as :func:`block_topp_ref`.
        dense_threshold: a sequence shorter than it keeps every block.

    Returns:
        Per sequence, ``[HR, ceil(T / BS)]`` bool keep mask (None for ``T == 0``).
    """
    lens = seq_lens.tolist() if isinstance(seq_lens, torch.Tensor) else list(seq_lens)
    out = []
    for b, n in enumerate(lens):
        if n == 0:
            out.append(None)
            continue
        keys = paged_index_keys_ref(index, index_table, b, n).to(q_idx.device)
        keep = block_topp_ref(index_scores_ref(q_idx[b], keys), 1.0 if n < dense_threshold else top_p, block_size,
                              sink_tokens)
        out.append(keep)
    return out
