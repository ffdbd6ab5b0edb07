"""The host side of the sparse prefill: a batch's query tiles laid out for the kernels (the plan), and
the kernels' scratch.

A batch's chunks are cut into query tiles of up to ``tile_q`` rows at the positions that are multiples
of ``tile_q`` (:func:`.reference.chunk_tiles`); the kernels address tiles through one flat index, so a
batch of many short chunks (prefix-cache hits with a short question each) costs no more scratch than
one long chunk. Tiles are taken in sequence order and cut into *waves* of at most ``wave_tiles`` tiles,
the scratch of one pass of the kernels (:class:`SparsePrefillWorkspace`); a batch with more tiles runs
several passes.

:func:`plan_sparse_prefill` runs on the host once per step (the metadata builder's job) and is shared
by every layer; it needs only the host-side chunk and sequence lengths and makes one small copy to
the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .reference import chunk_tiles

TILE_Q = 128
"""Query rows per tile of the serving prefill and of ``rtpurbo-calibrate evaluate``'s prefill measurement:
the granularity of the selection and the attention's query tile."""

# Rows of SparsePrefillPlan.tiles.
TILE_SEQ, TILE_INDEX, ATTEND_ORDER = range(3)


@dataclass(frozen=True)
class Wave:
    """One pass of the kernels: ``num_tiles`` tiles, whose sequences have at most ``max_seqlen_k`` keys."""

    num_tiles: int
    max_seqlen_k: int


@dataclass(frozen=True)
class SparsePrefillPlan:
    """Where every query tile of a prefill batch goes.

    Attributes:
        tiles: ``[num_waves, 3, wave_tiles]`` int32 on the kernels' device; per wave, row
            ``TILE_SEQ[t]`` is the sequence of the wave's tile ``t``, ``TILE_INDEX[t]`` its index in that
            sequence's chunk and ``ATTEND_ORDER`` the wave's tiles by decreasing key count (the
            attention runs the longest first). Entries past a wave's tile count are unspecified.
        waves: the waves, in order.
        tile_q: query rows per tile.
    """

    tiles: torch.Tensor
    waves: tuple[Wave, ...]
    tile_q: int

    @property
    def wave_tiles(self) -> int:
        return self.tiles.shape[2]


def plan_sparse_prefill(query_lens: Sequence[int], seq_lens: Sequence[int], wave_tiles: int, tile_q: int = TILE_Q,
                        device: torch.device | str | None = None) -> SparsePrefillPlan:
    """The plan of a prefill batch.

    Args:
        query_lens: per sequence, the chunk's new rows (``>= 0``).
        seq_lens: per sequence, its keys including the chunk (``>= query_lens``), as the kernels' ``seqused_k``
            (where the chunk starts places its tiles, :func:`.reference.chunk_tiles`).
        wave_tiles: most tiles per wave (the workspace's tile capacity, ``>= 1``).
        tile_q: query rows per tile, a power of two ``>= 16``.
        device: where the kernels run.
    """
    if len(query_lens) != len(seq_lens):
        raise ValueError(f"{len(query_lens)} chunk lengths but {len(seq_lens)} sequence lengths")
    check_power_of_two("tile_q", tile_q)
    if wave_tiles < 1:
        raise ValueError(f"wave_tiles must be >= 1, got {wave_tiles}")
    tiles = []                                              # (sequence, tile index, last position + 1)
    for seq, (seqlen_q, seqlen_k) in enumerate(zip(query_lens, seq_lens)):
        if not 0 <= seqlen_q <= seqlen_k:
            raise ValueError(f"sequence {seq}: need 0 <= chunk rows <= keys, got {seqlen_q} and {seqlen_k}")
        tiles += [(seq, i, tile.last_pos + 1) for i, tile in enumerate(chunk_tiles(seqlen_q, seqlen_k, tile_q))]
    waves = [tiles[w:w + wave_tiles] for w in range(0, len(tiles), wave_tiles)] or [[]]
    table = torch.zeros(len(waves), 3, wave_tiles, dtype=torch.int32)
    for w, wave in enumerate(waves):
        for row, values in ((TILE_SEQ, [seq for seq, _, _ in wave]), (TILE_INDEX, [i for _, i, _ in wave]),
                            (ATTEND_ORDER, sorted(range(len(wave)), key=lambda t: -wave[t][2]))):
            table[w, row, :len(values)] = torch.tensor(values, dtype=torch.int32)
    summaries = tuple(Wave(num_tiles=len(wave), max_seqlen_k=max((seq_lens[seq] for seq, _, _ in wave), default=0))
                      for wave in waves)
    return SparsePrefillPlan(tiles=table.to(device), waves=summaries, tile_q=tile_q)


@dataclass(frozen=True)
class SparsePrefillWorkspace:
    """Scratch of one wave of :func:`sparse_prefill`; allocate once (:func:`make_sparse_prefill_workspace`)
    and share between layers (a layer with fewer retrieval heads uses the leading ones).

    Attributes:
        block_max: ``[wave_tiles, HR_max, max_blocks]`` float32, per (tile, block) max index score.
        block_sum: same shape, ``sum exp(score - block_max)``.
        kept: ``[wave_tiles, HR_max, max_blocks]`` int32, kept block ids per tile, ascending.
        num_kept: ``[wave_tiles, HR_max]`` int32, kept blocks per tile.
        tile_q: query rows per tile (the plan's).
    """

    block_max: torch.Tensor
    block_sum: torch.Tensor
    kept: torch.Tensor
    num_kept: torch.Tensor
    tile_q: int

    @property
    def wave_tiles(self) -> int:
        return self.kept.shape[0]

    @property
    def max_blocks(self) -> int:
        return self.kept.shape[2]


def make_sparse_prefill_workspace(wave_tiles: int, num_heads: int, max_seqlen_k: int, block_size: int,
                                  tile_q: int = TILE_Q, device: torch.device | str | None = None
                                  ) -> SparsePrefillWorkspace:
    """Scratch for waves of up to ``wave_tiles`` query tiles of ``tile_q`` rows, over up to
    ``max_seqlen_k`` keys (``max_model_len``), for layers of up to ``num_heads`` retrieval heads (HR_max).

    Size: ``wave_tiles * HR_max * (12 * max_blocks + 4)`` bytes with ``max_blocks =
    cdiv(max_seqlen_k, block_size)`` (about 16 MB for 80 tiles, HR_max 8, 128K keys in 64-token blocks).
    Uninitialised: every entry read is written first in the same wave.
    """
    if min(wave_tiles, num_heads, max_seqlen_k) < 1:
        raise ValueError(f"need positive sizes, got wave_tiles={wave_tiles}, num_heads={num_heads}, "
                         f"max_seqlen_k={max_seqlen_k}")
    check_power_of_two("tile_q", tile_q)
    check_power_of_two("block_size", block_size)
    shape = (wave_tiles, num_heads, math.ceil(max_seqlen_k / block_size))
    return SparsePrefillWorkspace(
        block_max=torch.empty(shape, dtype=torch.float32, device=device),
        block_sum=torch.empty(shape, dtype=torch.float32, device=device),
        kept=torch.empty(shape, dtype=torch.int32, device=device),
        num_kept=torch.empty(shape[:2], dtype=torch.int32, device=device),
        tile_q=tile_q)


def check_power_of_two(name: str, value: int, least: int = 16) -> None:
    """Raises ``ValueError`` unless ``value`` is a power of two ``>= least``."""
    if value < least or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {least}, got {value}")
