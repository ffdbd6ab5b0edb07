"""Sort-free block top-p over one row of per-block softmax stats (Triton device functions, no launcher).

A row is ``num_blocks`` blocks with stats ``block_max[j]`` (max score) and ``block_sum[j]``
(``sum exp(score - block_max[j])``), as the score kernels write them. From them:
``mass_j = block_sum[j] * exp(block_max[j] - M) / Z`` (``M`` the row max, ``Z`` the partition sum).
The kept set is the forced blocks (``j < num_sink_blocks`` or ``j >= first_tail_block``) plus the
greedy prefix of the other blocks by decreasing mass, ties to the lower id, until the kept mass
reaches ``top_p``; every block if even all of them fall short.

Without sorting: masses are non-negative floats, so their int32 bit patterns order like their values,
and a 31-step binary search over bit patterns finds ``tau``, the largest mass with
``F + sum(mass_j >= tau, j not forced) >= top_p`` (``F`` the forced mass): the mass of the last block
the greedy order takes. Kept: forced blocks, blocks above ``tau``, and the blocks tied at ``tau`` in id
order while ``F + sum(mass > tau) + (ties before) * tau < top_p``. A row of at most ``CHUNK`` blocks
keeps its masses in registers through the search; a longer one re-reads them at every step.

Shared by the decode selection (``block_topp``: the forced tail is the last block,
``first_tail_block = num_blocks - 1``) and the prefill selection (``sparse_prefill``: the forced tail is
a query tile's diagonal blocks). A caller that must keep every block passes ``top_p = inf``.
"""

from __future__ import annotations

import triton
import triton.language as tl

F32_INF_BITS = tl.constexpr(0x7F800000)
"""Bit pattern of +inf in float32: every finite non-negative mass has a smaller one."""
SEARCH_STEPS = tl.constexpr(31)
"""ceil(log2(F32_INF_BITS + 1)): binary-search steps that shrink ``[-1, +inf bits]`` to adjacent values."""


@triton.jit
def block_mass(block_max_ptr, block_sum_ptr, blocks, num_blocks, num_sink_blocks, first_tail_block,
               global_max, inv_total):
    """Masses of ``blocks`` (0 past the row), and which of them are valid, forced and candidates."""
    valid = blocks < num_blocks
    b_max = tl.load(block_max_ptr + blocks, mask=valid, other=0.0)
    b_sum = tl.load(block_sum_ptr + blocks, mask=valid, other=0.0)
    mass = tl.where(valid, b_sum * tl.exp(b_max - global_max) * inv_total, 0.0)
    forced = valid & ((blocks < num_sink_blocks) | (blocks >= first_tail_block))
    return mass, valid, forced, valid & ~forced


@triton.jit
def _candidate_mass_at_least(block_max_ptr, block_sum_ptr, num_blocks, num_sink_blocks, first_tail_block,
                             global_max, inv_total, bound_bits, STRICT: tl.constexpr, CHUNK: tl.constexpr):
    """Sum of non-forced masses whose bit pattern is ``>= bound_bits`` (``>`` if ``STRICT``), re-read
    chunk by chunk."""
    total = 0.0
    for start in range(0, num_blocks, CHUNK):
        mass, _, _, candidate = block_mass(block_max_ptr, block_sum_ptr, start + tl.arange(0, CHUNK), num_blocks,
                                           num_sink_blocks, first_tail_block, global_max, inv_total)
        bits = mass.to(tl.int32, bitcast=True)
        above = (bits > bound_bits) if STRICT else (bits >= bound_bits)
        total += tl.sum(tl.where(candidate & above, mass, 0.0))
    return total


@triton.jit
def topp_select_row(block_max_ptr, block_sum_ptr, kept_ptr, num_blocks, num_sink_blocks, first_tail_block, top_p,
                    CHUNK: tl.constexpr):
    """Writes the kept block ids of one row, ascending, to ``kept_ptr[0 : count]``; returns ``count``.

    ``block_max_ptr`` / ``block_sum_ptr`` point at the row's block 0 (unit stride). Entries past
    ``count`` are not written.
    """
    lanes = tl.arange(0, CHUNK)
    # Softmax normaliser of the row from its block stats.
    global_max = float("-inf")
    for start in range(0, num_blocks, CHUNK):
        blocks = start + lanes
        b_max = tl.load(block_max_ptr + blocks, mask=blocks < num_blocks, other=float("-inf"))
        global_max = tl.maximum(global_max, tl.max(b_max))
    global_max = tl.where(num_blocks > 0, global_max, 0.0)    # empty rows: keep the arithmetic finite
    total = 0.0
    for start in range(0, num_blocks, CHUNK):
        blocks = start + lanes
        valid = blocks < num_blocks
        b_max = tl.load(block_max_ptr + blocks, mask=valid, other=0.0)
        b_sum = tl.load(block_sum_ptr + blocks, mask=valid, other=0.0)
        total += tl.sum(tl.where(valid, b_sum * tl.exp(b_max - global_max), 0.0))
    inv_total = 1.0 / tl.maximum(total, 1.0)    # total >= 1 (the top block's own term) unless empty

    in_registers = num_blocks <= CHUNK
    first_mass, _, first_forced, first_candidate = block_mass(block_max_ptr, block_sum_ptr, lanes, num_blocks,
                                                              num_sink_blocks, first_tail_block, global_max,
                                                              inv_total)
    forced_mass = tl.sum(tl.where(first_forced, first_mass, 0.0))
    for start in range(CHUNK, num_blocks, CHUNK):
        mass, _, forced, _ = block_mass(block_max_ptr, block_sum_ptr, start + lanes, num_blocks, num_sink_blocks,
                                        first_tail_block, global_max, inv_total)
        forced_mass += tl.sum(tl.where(forced, mass, 0.0))

    # tau: invariant reached(lo), not reached(hi), from lo = -1 ("keep all") and hi = +inf.
    first_bits = first_mass.to(tl.int32, bitcast=True)
    lo = tl.full((), -1, tl.int32)
    hi = tl.full((), F32_INF_BITS, tl.int32)
    for _ in range(SEARCH_STEPS):
        mid = lo + (hi - lo) // 2
        if in_registers:
            mass_at_least = tl.sum(tl.where(first_candidate & (first_bits >= mid), first_mass, 0.0))
        else:
            mass_at_least = _candidate_mass_at_least(block_max_ptr, block_sum_ptr, num_blocks, num_sink_blocks,
                                                     first_tail_block, global_max, inv_total, mid, False, CHUNK)
        reached = forced_mass + mass_at_least >= top_p
        lo = tl.where(reached, mid, lo)
        hi = tl.where(reached, hi, mid)
    tau_bits = lo
    tau = tau_bits.to(tl.float32, bitcast=True)
    keep_all = tau_bits < 0
    if in_registers:
        mass_above = tl.sum(tl.where(first_candidate & (first_bits > tau_bits), first_mass, 0.0))
    else:
        mass_above = _candidate_mass_at_least(block_max_ptr, block_sum_ptr, num_blocks, num_sink_blocks,
                                              first_tail_block, global_max, inv_total, tau_bits, True, CHUNK)
    mass_before_ties = forced_mass + mass_above

    # Compaction in ascending block order.
    count = tl.full((), 0, tl.int32)
    ties_seen = tl.full((), 0, tl.int32)
    for start in range(0, num_blocks, CHUNK):
        blocks = start + lanes
        mass, valid, forced, candidate = block_mass(block_max_ptr, block_sum_ptr, blocks, num_blocks,
                                                    num_sink_blocks, first_tail_block, global_max, inv_total)
        bits = mass.to(tl.int32, bitcast=True)
        tie = (candidate & (bits == tau_bits)).to(tl.int32)
        ties_before = ties_seen + tl.cumsum(tie, axis=0) - tie
        tie_kept = (tie != 0) & (mass_before_ties + ties_before.to(tl.float32) * tau < top_p)
        keep = valid & (keep_all | forced | (candidate & (bits > tau_bits)) | tie_kept)
        keep_i = keep.to(tl.int32)
        tl.store(kept_ptr + count + tl.cumsum(keep_i, axis=0) - keep_i, blocks.to(tl.int32), mask=keep)
        count += tl.sum(keep_i)
        ties_seen += tl.sum(tie)
    return count


@triton.jit
def keep_every_block(kept_ptr, num_blocks, CHUNK: tl.constexpr):
    """Writes ``0 .. num_blocks - 1`` to ``kept_ptr``; returns ``num_blocks``."""
    for start in range(0, num_blocks, CHUNK):
        blocks = start + tl.arange(0, CHUNK)
        tl.store(kept_ptr + blocks, blocks.to(tl.int32), mask=blocks < num_blocks)
    return num_blocks
