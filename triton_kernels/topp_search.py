"""Sort-free block top-p over one row of per-block softmax stats (Triton device functions, no launcher).

A row is ``num_blocks`` blocks with stats ``block_max[j]`` (max score) and ``block_sum[j]``
(``sum exp(score - block_max[j])``), as the score kernels write them. From them:
``mass_j = block_sum[j] * exp(block_max[j] - M) / Z`` (``M`` the row max, ``Z`` the partition sum).
The kept set is the forced blocks (``j < num_sink_blocks`` or ``j >= first_tail_block``) plus the
greedy prefix of the other blocks by decreasing mass, ties to the lower id, until the kept mass
reaches ``top_p``; every block if even all of them fall short.

Without sorting: masses are non-negative floats, so their int32 bit patterns order like their values,
and a search over bit patterns finds ``tau``, the largest mass with
``F + sum(mass_j >= tau, j not forced) >= top_p`` (``F`` the forced mass): the mass of the last block
the greedy order takes. Kept: forced blocks, blocks above ``tau``, and the blocks tied at ``tau`` in id
order while ``F + sum(mass > tau) + (ties before) * tau < top_p``.

The search is k-ary, ``SEARCH_BITS`` bits per step (a constexpr; 1 is the binary search): it keeps a
bracket ``[lo, hi)`` of bit patterns with ``lo`` reached and ``hi`` not. It starts from the candidates'
own range ``[smallest, largest + 1)`` when all candidates together reach ``top_p`` (``S`` at the
smallest is the whole candidate mass, above the largest it is 0), from ``[-1, 0)`` ("keep all") when
they do not, and from ``[+inf bits - 1, +inf bits)`` (no candidate) when the forced mass alone does.
Each step evaluates the ``K = 2**SEARCH_BITS - 1`` interior thresholds
``t_k = lo + floor(k * (hi - lo) / 2**SEARCH_BITS)`` with one reduction of a
``[2**SEARCH_BITS, CHUNK]`` where-tensor over its block axis (the candidate mass ``>= t_k`` for every
``k`` at once; the last lane, ``t_{K+1} = hi``, pads it to a power of two, and ``SEARCH_BITS = 1``
has the one lane ``lo + floor((hi - lo) / 2)``, the binary search's midpoint), narrows the bracket
to ``[t_n, t_{n+1})`` with ``n`` the largest reached ``k`` (``t_0 = lo``; a threshold that a narrow
bracket puts on ``lo`` counts as reached), then shrinks it to the candidate values inside,
``[smallest, largest + 1)`` (one more reduction: ``S`` is the same at both ends, so the invariant
holds, and the bracket is never empty, as ``S(lo) > S(hi)``). The search ends when the bracket holds
one value, ``tau = lo``: the width shrinks by ``2**SEARCH_BITS`` or more per step, so within
``ceil(31 / SEARCH_BITS)`` steps, and in practice after about ``log2`` of the number of candidates (the
binary search: 10 to 16 steps over 2K to 8K blocks; 3 bits: 4 to 6). The thresholds are split with
int32 arithmetic that cannot overflow (:func:`_split_point`). ``tau`` is the one bit pattern where
``F + S(t) >= top_p`` flips (``S(t)``, the candidate mass ``>= t``, does not grow with ``t``: a float sum
in a fixed order is monotone in its terms), so every ``SEARCH_BITS`` keeps the same blocks as long as
the reductions add the blocks in the same order (they do where the blocks sit on the same threads;
another order could only move ``tau`` where ``F + S(t)`` is within rounding of ``top_p``).

The threshold axis is the leading one so that the compiler spreads the blocks over the threads as in
the row's own 1-D tensors and keeps a block's ``2**SEARCH_BITS`` comparisons in one thread: no
shared-memory exchange of the row per step, and the row stays in registers (``2**SEARCH_BITS *
CHUNK / threads`` where-values per thread per step, fused into the reduction; 4 bits at ``CHUNK`` 4096
and 8 warps compile for sm_90 without spills). A row of at most ``CHUNK`` blocks keeps its masses in
registers through the search; a longer one re-reads them from memory twice per step (all thresholds
in one pass, the bracket's shrinking in the other). More bits per step
mean fewer serial block-wide reductions (the latency of a lone program at batch 1) for ``2**SEARCH_BITS``
times the arithmetic per step; the launchers take the value from a tunable setting.

Shared by the decode selection (``block_topp``: the forced tail is the last block,
``first_tail_block = num_blocks - 1``) and the prefill selection (``sparse_prefill``: the forced tail is
a query tile's diagonal blocks). A caller that must keep every block passes ``top_p = inf``.
"""

from __future__ import annotations

import triton
import triton.language as tl

F32_INF_BITS = tl.constexpr(0x7F800000)
"""Bit pattern of +inf in float32: every finite non-negative mass has a smaller one."""
NOT_CANDIDATE_BITS = tl.constexpr(-2)
"""Stands in for the bit pattern of a block that is not a candidate: below every threshold (``>= -1``)."""


@triton.jit
def _chunk_mass(b_max, b_sum, blocks, num_blocks, num_sink_blocks, first_tail_block, global_max, inv_total):
    """:func:`block_mass` of stats already loaded (``b_max`` / ``b_sum`` of ``blocks``; lanes past the row are
    masked, whatever they hold)."""
    valid = blocks < num_blocks
    mass = tl.where(valid, b_sum * tl.exp(b_max - global_max) * inv_total, 0.0)
    forced = valid & ((blocks < num_sink_blocks) | (blocks >= first_tail_block))
    return mass, valid, forced, valid & ~forced


@triton.jit
def block_mass(block_max_ptr, block_sum_ptr, blocks, num_blocks, num_sink_blocks, first_tail_block,
               global_max, inv_total):
    """Masses of ``blocks`` (0 past the row), and which of them are valid, forced and candidates."""
    valid = blocks < num_blocks
    b_max = tl.load(block_max_ptr + blocks, mask=valid, other=0.0)
    b_sum = tl.load(block_sum_ptr + blocks, mask=valid, other=0.0)
    return _chunk_mass(b_max, b_sum, blocks, num_blocks, num_sink_blocks, first_tail_block, global_max, inv_total)


@triton.jit
def _candidate_bits(mass, candidate):
    """The masses' int32 bit patterns (ordered like the masses), :data:`NOT_CANDIDATE_BITS` for non-candidates."""
    return tl.where(candidate, mass.to(tl.int32, bitcast=True), NOT_CANDIDATE_BITS)


@triton.jit
def _mass_at_least(bits, mass, bounds):
    """``[K, 1]`` sums of ``mass`` ``[1, N]`` over the entries whose ``bits`` ``[1, N]`` are ``>= bounds[k]``
    (``bounds`` ``[K, 1]``): one reduction of a ``[K, N]`` where-tensor over its second axis."""
    return tl.sum(tl.where(bits >= bounds, mass, 0.0), axis=1, keep_dims=True)


@triton.jit
def _candidate_mass_at_least(block_max_ptr, block_sum_ptr, num_blocks, num_sink_blocks, first_tail_block,
                             global_max, inv_total, bounds, CHUNK: tl.constexpr):
    """``[K, 1]`` sums of the non-forced masses whose bit pattern is ``>= bounds[k]`` (``bounds`` ``[K, 1]``),
    re-read chunk by chunk as ``[1, CHUNK]`` rows (one pass over the row for all ``K`` bounds)."""
    total = tl.zeros(bounds.shape, tl.float32)
    for start in range(0, num_blocks, CHUNK):
        mass, _, _, candidate = block_mass(block_max_ptr, block_sum_ptr, start + tl.arange(0, CHUNK)[None, :],
                                           num_blocks, num_sink_blocks, first_tail_block, global_max, inv_total)
        total += _mass_at_least(_candidate_bits(mass, candidate), mass, bounds)
    return total


@triton.jit
def _min_min(a_lo, a_hi, b_lo, b_hi):
    return tl.minimum(a_lo, b_lo), tl.minimum(a_hi, b_hi)


@triton.jit
def _bracket_gaps(bits, lo, hi):
    """How far the entries of ``bits`` (a ``[1, N]`` row) in ``[lo, hi)`` (``0 <= lo < hi``) reach into it: the
    smallest ``bits - lo`` and ``hi - 1 - bits`` among them, uint32. As unsigned offsets from either end an
    entry outside the bracket (non-candidates' ``-2`` included) is at least its width ``hi - lo`` away, so
    both are plain minima, no masks; no entry inside gives gaps of at least the width. One reduction."""
    gap_lo, gap_hi = tl.reduce(((bits - lo).to(tl.uint32, bitcast=True),
                                (hi - 1 - bits).to(tl.uint32, bitcast=True)), 1, _min_min)
    return tl.min(gap_lo, axis=0), tl.min(gap_hi, axis=0)


@triton.jit
def _candidate_bracket_gaps(block_max_ptr, block_sum_ptr, num_blocks, num_sink_blocks, first_tail_block,
                            global_max, inv_total, lo, hi, CHUNK: tl.constexpr):
    """:func:`_bracket_gaps` of the candidates' bit patterns, re-read chunk by chunk (one pass over the row)."""
    gap_lo = tl.full((), 0xFFFFFFFF, tl.uint32)
    gap_hi = tl.full((), 0xFFFFFFFF, tl.uint32)
    for start in range(0, num_blocks, CHUNK):
        mass, _, _, candidate = block_mass(block_max_ptr, block_sum_ptr, start + tl.arange(0, CHUNK)[None, :],
                                           num_blocks, num_sink_blocks, first_tail_block, global_max, inv_total)
        chunk_lo, chunk_hi = _bracket_gaps(_candidate_bits(mass, candidate), lo, hi)
        gap_lo, gap_hi = tl.minimum(gap_lo, chunk_lo), tl.minimum(gap_hi, chunk_hi)
    return gap_lo, gap_hi


@triton.jit
def _shrink_bracket(candidate_row, in_registers, block_max_ptr, block_sum_ptr, num_blocks, num_sink_blocks,
                    first_tail_block, global_max, inv_total, lo, hi, CHUNK: tl.constexpr):
    """``[lo, hi)`` shrunk to the candidate values it holds, ``[smallest, largest + 1)`` (unchanged if none)."""
    if in_registers:
        gap_lo, gap_hi = _bracket_gaps(candidate_row, lo, hi)
    else:
        gap_lo, gap_hi = _candidate_bracket_gaps(block_max_ptr, block_sum_ptr, num_blocks, num_sink_blocks,
                                                 first_tail_block, global_max, inv_total, lo, hi, CHUNK)
    holds_any = gap_lo < (hi - lo).to(tl.uint32, bitcast=True)
    return (tl.where(holds_any, lo + gap_lo.to(tl.int32, bitcast=True), lo),
            tl.where(holds_any, hi - gap_hi.to(tl.int32, bitcast=True), hi))


@triton.jit
def _split_point(lo, step, rest, k, SEARCH_BITS: tl.constexpr):
    """``lo + floor(k * width / 2**SEARCH_BITS)`` for ``width = step * 2**SEARCH_BITS + rest``
    (``0 <= rest < 2**SEARCH_BITS``, ``0 <= k <= 2**SEARCH_BITS``), without int32 overflow."""
    return lo + step * k + ((rest * k) >> SEARCH_BITS)


@triton.jit
def _compact_chunk(kept_ptr, count, ties_seen, blocks, mass, valid, forced, candidate, tau_bits, tau, keep_all,
                   mass_before_ties, top_p):
    """Appends the kept ``blocks`` of one chunk to ``kept_ptr[count:]`` in ascending order; returns the new
    ``count`` and ``ties_seen`` (candidates tied at ``tau`` so far, in id order)."""
    bits = mass.to(tl.int32, bitcast=True)
    tie = (candidate & (bits == tau_bits)).to(tl.int32)
    ties_before = ties_seen + tl.cumsum(tie, axis=0) - tie
    tie_kept = (tie != 0) & (mass_before_ties + ties_before.to(tl.float32) * tau < top_p)
    keep = valid & (keep_all | forced | (candidate & (bits > tau_bits)) | tie_kept)
    keep_i = keep.to(tl.int32)
    tl.store(kept_ptr + count + tl.cumsum(keep_i, axis=0) - keep_i, blocks.to(tl.int32), mask=keep)
    return count + tl.sum(keep_i), ties_seen + tl.sum(tie)


@triton.jit
def topp_select_row(block_max_ptr, block_sum_ptr, kept_ptr, num_blocks, num_sink_blocks, first_tail_block, top_p,
                    CHUNK: tl.constexpr, SEARCH_BITS: tl.constexpr):
    """Writes the kept block ids of one row, ascending, to ``kept_ptr[0 : count]``; returns ``count``.

    ``block_max_ptr`` / ``block_sum_ptr`` point at the row's block 0 (unit stride). Entries past
    ``count`` are not written. ``SEARCH_BITS`` (1 to 8): bits of ``tau`` found per search step. The
    row's first ``CHUNK`` blocks are loaded once and stay in registers (a row of at most ``CHUNK``
    blocks is read once); the rest is re-read chunk by chunk where each pass needs it.
    """
    tl.static_assert((SEARCH_BITS >= 1) & (SEARCH_BITS <= 8), "SEARCH_BITS must be in [1, 8]")
    lanes = tl.arange(0, CHUNK)
    first_valid = lanes < num_blocks
    first_max = tl.load(block_max_ptr + lanes, mask=first_valid, other=float("-inf"))
    first_sum = tl.load(block_sum_ptr + lanes, mask=first_valid, other=0.0)
    # Softmax normaliser of the row from its block stats.
    global_max = tl.max(first_max)
    for start in range(CHUNK, num_blocks, CHUNK):
        blocks = start + lanes
        b_max = tl.load(block_max_ptr + blocks, mask=blocks < num_blocks, other=float("-inf"))
        global_max = tl.maximum(global_max, tl.max(b_max))
    global_max = tl.where(num_blocks > 0, global_max, 0.0)    # empty rows: keep the arithmetic finite
    total = tl.sum(tl.where(first_valid, first_sum * tl.exp(first_max - global_max), 0.0))
    for start in range(CHUNK, num_blocks, CHUNK):
        blocks = start + lanes
        valid = blocks < num_blocks
        b_max = tl.load(block_max_ptr + blocks, mask=valid, other=0.0)
        b_sum = tl.load(block_sum_ptr + blocks, mask=valid, other=0.0)
        total += tl.sum(tl.where(valid, b_sum * tl.exp(b_max - global_max), 0.0))
    inv_total = 1.0 / tl.maximum(total, 1.0)    # total >= 1 (the top block's own term) unless empty

    in_registers = num_blocks <= CHUNK
    first_mass, first_valid, first_forced, first_candidate = _chunk_mass(
        first_max, first_sum, lanes, num_blocks, num_sink_blocks, first_tail_block, global_max, inv_total)
    forced_mass = tl.sum(tl.where(first_forced, first_mass, 0.0))
    candidate_mass = tl.sum(tl.where(first_candidate, first_mass, 0.0))
    for start in range(CHUNK, num_blocks, CHUNK):
        mass, _, forced, candidate = block_mass(block_max_ptr, block_sum_ptr, start + lanes, num_blocks,
                                                num_sink_blocks, first_tail_block, global_max, inv_total)
        forced_mass += tl.sum(tl.where(forced, mass, 0.0))
        candidate_mass += tl.sum(tl.where(candidate, mass, 0.0))

    # tau: invariant reached(lo), not reached(hi) (module doc). Lane j of a
    # step is the threshold t_{j+1}; with K_PAD = 2**SEARCH_BITS lanes (SEARCH_BITS > 1) the last lane is
    # t_{K+1} = hi, never reached.
    # The steps work on 2-D tensors, the thresholds ``[K_PAD, 1]`` against the row ``[1, CHUNK]``, so that
    # they stay in the layout of their ``[K_PAD, CHUNK]`` comparison: the register-resident row is put in
    # it once, here, not moved between thread layouts at every step.
    K_PAD: tl.constexpr = (1 << SEARCH_BITS) - (SEARCH_BITS == 1)
    splits = (tl.arange(0, K_PAD) + 1)[:, None]                       # [K_PAD, 1]: k of each lane
    candidate_row = _candidate_bits(first_mass, first_candidate)[None, :]
    mass_row = first_mass[None, :]
    # The first bracket: the candidates' range when they reach top_p, "keep all" when they do not, no
    # candidate when the forced mass alone does.
    first_lo, first_hi = _shrink_bracket(candidate_row, in_registers, block_max_ptr, block_sum_ptr, num_blocks,
                                         num_sink_blocks, first_tail_block, global_max, inv_total,
                                         tl.full((), 0, tl.int32), tl.full((), F32_INF_BITS, tl.int32), CHUNK)
    reachable = forced_mass + candidate_mass >= top_p
    forced_reach = forced_mass >= top_p
    lo = tl.where(forced_reach, F32_INF_BITS - 1, tl.where(reachable, first_lo, -1))
    hi = tl.where(forced_reach, F32_INF_BITS, tl.where(reachable, first_hi, 0))
    mass_above = tl.full((), 0.0, tl.float32)                         # S(hi): no candidate is >= hi
    while hi - lo > 1:
        step = (hi - lo) >> SEARCH_BITS
        rest = (hi - lo) & ((1 << SEARCH_BITS) - 1)
        bounds = _split_point(lo, step, rest, splits, SEARCH_BITS)    # [K_PAD, 1], lo <= bounds <= hi
        if in_registers:
            mass_at_least = _mass_at_least(candidate_row, mass_row, bounds)
        else:
            mass_at_least = _candidate_mass_at_least(block_max_ptr, block_sum_ptr, num_blocks, num_sink_blocks,
                                                     first_tail_block, global_max, inv_total, bounds, CHUNK)
        reached = (bounds == lo) | ((bounds < hi) & (forced_mass + mass_at_least >= top_p))
        n = tl.max(tl.where(reached, splits, 0))                      # largest reached k (0: none)
        # S at the new hi = t_{n+1}: lane n + 1 when there is one (always but in the binary search's n = 1,
        # where hi stays). The last hi is tau + 1: S(hi) is the candidate mass above tau.
        mass_above = tl.where(n < K_PAD, tl.sum(tl.where(splits == n + 1, mass_at_least, 0.0)), mass_above)
        lo, hi = _split_point(lo, step, rest, n, SEARCH_BITS), _split_point(lo, step, rest, n + 1, SEARCH_BITS)
        # The candidate values inside; the search ends when there is one.
        lo, hi = _shrink_bracket(candidate_row, in_registers, block_max_ptr, block_sum_ptr, num_blocks,
                                 num_sink_blocks, first_tail_block, global_max, inv_total, lo, hi, CHUNK)
    tau_bits = lo
    tau = tau_bits.to(tl.float32, bitcast=True)
    keep_all = tau_bits < 0
    mass_before_ties = forced_mass + mass_above

    # Compaction in ascending block order.
    count, ties_seen = _compact_chunk(kept_ptr, tl.full((), 0, tl.int32), tl.full((), 0, tl.int32), lanes,
                                      first_mass, first_valid, first_forced, first_candidate, tau_bits, tau,
                                      keep_all, mass_before_ties, top_p)
    for start in range(CHUNK, num_blocks, CHUNK):
        blocks = start + lanes
        mass, valid, forced, candidate = block_mass(block_max_ptr, block_sum_ptr, blocks, num_blocks,
                                                    num_sink_blocks, first_tail_block, global_max, inv_total)
        count, ties_seen = _compact_chunk(kept_ptr, count, ties_seen, blocks, mass, valid, forced, candidate,
                                          tau_bits, tau, keep_all, mass_before_ties, top_p)
    return count


@triton.jit
def keep_every_block(kept_ptr, num_blocks, CHUNK: tl.constexpr):
    """Writes ``0 .. num_blocks - 1`` to ``kept_ptr``; returns ``num_blocks``."""
    for start in range(0, num_blocks, CHUNK):
        blocks = start + tl.arange(0, CHUNK)
        tl.store(kept_ptr + blocks, blocks.to(tl.int32), mask=blocks < num_blocks)
    return num_blocks
