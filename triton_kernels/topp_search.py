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
Each step cuts the bracket into ``2**SEARCH_BITS`` sub-brackets ``[t_k, t_{k+1})``,
``t_k = lo + floor(k * (hi - lo) / 2**SEARCH_BITS)`` (``t_0 = lo``, the last ``t`` is ``hi``), and
makes one reduction over the row of a ``[2**SEARCH_BITS, CHUNK]`` tuple: per sub-bracket, the
candidate mass ``>= t_k`` and how far the candidates inside it reach into it (its smallest and largest
candidate value). It takes ``[t_n, t_{n+1})`` with ``n`` the largest reached ``k`` (``t_0 = lo`` is
reached, and so is a ``t_k`` that a narrow bracket puts on ``lo``), shrunk to the candidate values
inside, ``[smallest, largest + 1)`` (``S`` is the same at both ends, so the invariant holds, and the
bracket is never empty, as ``S(lo) > S(hi)``): the reduction that finds the threshold also shrinks the
bracket, one round of the program's warps per step. The search ends when the bracket holds one
value, ``tau = lo``: the width shrinks by ``2**SEARCH_BITS`` or more per step, so within
``ceil(31 / SEARCH_BITS)`` steps, and in practice after about ``log2`` of the number of candidates (the
binary search: 10 to 16 steps over 2K to 8K blocks; 3 bits: 4 to 6). The thresholds are split with
int32 arithmetic that cannot overflow (:func:`_split_point`). ``tau`` is the one bit pattern where
``F + S(t) >= top_p`` flips (``S(t)``, the candidate mass ``>= t``, does not grow with ``t``: a float sum
in a fixed order is monotone in its terms), so every ``SEARCH_BITS`` keeps the same blocks as long as
the reductions add the blocks in the same order (they do where the blocks sit on the same threads;
another order could only move ``tau`` where ``F + S(t)`` is within rounding of ``top_p``).

The sub-bracket axis is the leading one so that the compiler spreads the blocks over the threads as in
the row's own 1-D tensors and keeps a block's ``2**SEARCH_BITS`` comparisons in one thread: no
shared-memory exchange of the row per step, and the row stays in registers (``2**SEARCH_BITS *
CHUNK / threads`` values per thread per step, fused into the reduction). A row of at most ``CHUNK``
blocks keeps its masses in registers through the search; a longer one re-reads them from memory once
per step. More bits per step mean fewer serial block-wide reductions (the latency of a lone program at
batch 1) for ``2**SEARCH_BITS`` times the arithmetic per step; the launchers take the value from a
tunable setting.

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
def _sum_sum_min_max(a_forced, a_candidate, a_smallest, a_largest, b_forced, b_candidate, b_smallest, b_largest):
    return (a_forced + b_forced, a_candidate + b_candidate, tl.minimum(a_smallest, b_smallest),
            tl.maximum(a_largest, b_largest))


@triton.jit
def _chunk_totals(mass, forced, candidate):
    """One reduction over a chunk (1-D): its forced mass, its candidate mass, and its candidates'
    smallest and largest bit patterns (:data:`F32_INF_BITS` and ``-1`` when it has none)."""
    bits = mass.to(tl.int32, bitcast=True)
    return tl.reduce((tl.where(forced, mass, 0.0), tl.where(candidate, mass, 0.0),
                      tl.where(candidate, bits, F32_INF_BITS), tl.where(candidate, bits, -1)), 0, _sum_sum_min_max)


@triton.jit
def _min_min_sum(a_lo, a_hi, a_mass, b_lo, b_hi, b_mass):
    return tl.minimum(a_lo, b_lo), tl.minimum(a_hi, b_hi), a_mass + b_mass


@triton.jit
def _lane_stats(bits, mass, lower, upper):
    """Per lane ``k`` (``lower``, ``upper`` ``[K, 1]``, ``0 <= lower <= upper``) over a row (``bits``, ``mass``
    ``[1, N]``), in one reduction over the row: the mass of the entries whose bits are ``>= lower[k]``, and
    how far the entries in ``[lower[k], upper[k])`` reach into it: the smallest ``bits - lower`` and
    ``upper - 1 - bits`` among them, uint32 (``[K, 1]`` each). As unsigned offsets from either end an
    entry outside the bracket (non-candidates' ``-2`` included) is at least its width away, so both are
    plain minima, no masks; no entry inside gives gaps of at least the width."""
    gap_lo, gap_hi, mass_at_least = tl.reduce(((bits - lower).to(tl.uint32, bitcast=True),
                                               (upper - 1 - bits).to(tl.uint32, bitcast=True),
                                               tl.where(bits >= lower, mass, 0.0)), 1, _min_min_sum,
                                              keep_dims=True)
    return mass_at_least, gap_lo, gap_hi


@triton.jit
def _candidate_lane_stats(block_max_ptr, block_sum_ptr, num_blocks, num_sink_blocks, first_tail_block,
                          global_max, inv_total, lower, upper, CHUNK: tl.constexpr):
    """:func:`_lane_stats` of the candidates (non-forced masses), the row re-read chunk by chunk as
    ``[1, CHUNK]`` rows (one pass over it for every lane)."""
    mass_at_least = tl.zeros(lower.shape, tl.float32)
    gap_lo = tl.full(lower.shape, 0xFFFFFFFF, tl.uint32)
    gap_hi = tl.full(lower.shape, 0xFFFFFFFF, tl.uint32)
    for start in range(0, num_blocks, CHUNK):
        mass, _, _, candidate = block_mass(block_max_ptr, block_sum_ptr, start + tl.arange(0, CHUNK)[None, :],
                                           num_blocks, num_sink_blocks, first_tail_block, global_max, inv_total)
        chunk_mass, chunk_lo, chunk_hi = _lane_stats(_candidate_bits(mass, candidate), mass, lower, upper)
        mass_at_least += chunk_mass
        gap_lo, gap_hi = tl.minimum(gap_lo, chunk_lo), tl.minimum(gap_hi, chunk_hi)
    return mass_at_least, gap_lo, gap_hi


@triton.jit
def _search_stats(candidate_row, mass_row, in_registers, block_max_ptr, block_sum_ptr, num_blocks, num_sink_blocks,
                  first_tail_block, global_max, inv_total, lower, upper, CHUNK: tl.constexpr):
    """:func:`_lane_stats` of the row's candidates, from the registers or re-read."""
    if in_registers:
        mass_at_least, gap_lo, gap_hi = _lane_stats(candidate_row, mass_row, lower, upper)
    else:
        mass_at_least, gap_lo, gap_hi = _candidate_lane_stats(block_max_ptr, block_sum_ptr, num_blocks,
                                                              num_sink_blocks, first_tail_block, global_max,
                                                              inv_total, lower, upper, CHUNK)
    return mass_at_least, gap_lo, gap_hi


@triton.jit
def _shrunk(lo, hi, gap_lo, gap_hi):
    """``[lo, hi)`` shrunk to the candidate values it holds, ``[smallest, largest + 1)``, given their gaps
    (unchanged if it holds none)."""
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
def topp_select_row(block_max_ptr, block_sum_ptr, kept_ptr, num_blocks, capacity, num_sink_blocks, first_tail_block,
                    top_p, CHUNK: tl.constexpr, SEARCH_BITS: tl.constexpr):
    """Writes the kept block ids of one row, ascending, to ``kept_ptr[0 : count]``; returns ``count``.

    ``block_max_ptr`` / ``block_sum_ptr`` point at the row's block 0 (unit stride), readable (whatever
    they hold) up to ``capacity >= num_blocks`` entries: the first chunk is loaded by ``capacity``
    and cut to ``num_blocks`` after, so that its loads need not wait for the row's length (usually a
    load of the caller's). Entries past ``count`` are not written. ``SEARCH_BITS`` (1 to 8): bits of
    ``tau`` found per search step. The row's first ``CHUNK`` blocks are loaded once and stay in
    registers (a row of at most ``CHUNK`` blocks is read once); the rest is re-read chunk by chunk where
    each pass needs it.
    """
    tl.static_assert((SEARCH_BITS >= 1) & (SEARCH_BITS <= 8), "SEARCH_BITS must be in [1, 8]")
    lanes = tl.arange(0, CHUNK)
    first_valid = lanes < num_blocks
    readable = lanes < capacity
    first_max = tl.where(first_valid, tl.load(block_max_ptr + lanes, mask=readable, other=0.0), float("-inf"))
    first_sum = tl.load(block_sum_ptr + lanes, mask=readable, other=0.0)      # masked where it is used
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
    forced_mass, candidate_mass, smallest, largest = _chunk_totals(first_mass, first_forced, first_candidate)
    for start in range(CHUNK, num_blocks, CHUNK):
        mass, _, forced, candidate = block_mass(block_max_ptr, block_sum_ptr, start + lanes, num_blocks,
                                                num_sink_blocks, first_tail_block, global_max, inv_total)
        chunk_forced, chunk_candidate, chunk_smallest, chunk_largest = _chunk_totals(mass, forced, candidate)
        forced_mass += chunk_forced
        candidate_mass += chunk_candidate
        smallest, largest = tl.minimum(smallest, chunk_smallest), tl.maximum(largest, chunk_largest)

    # tau: invariant reached(lo), not reached(hi) (module doc). Lane k of a step is the sub-bracket
    # [t_k, t_{k + 1}), k = 0 .. 2**SEARCH_BITS - 1 (t_0 = lo, t_{2**SEARCH_BITS} = hi).
    # The steps work on 2-D tensors, the lanes ``[LANES, 1]`` against the row ``[1, CHUNK]``, so that
    # they stay in the layout of their ``[LANES, CHUNK]`` comparison: the register-resident row is put in
    # it once, here, not moved between thread layouts at every step.
    LANES: tl.constexpr = 1 << SEARCH_BITS
    splits = tl.arange(0, LANES)[:, None]                             # [LANES, 1]: k of each lane
    candidate_row = _candidate_bits(first_mass, first_candidate)[None, :]
    mass_row = first_mass[None, :]
    # The first bracket: the candidates' range when they reach top_p (then they hold a positive mass), "keep
    # all" when they do not, no candidate when the forced mass alone does.
    reachable = forced_mass + candidate_mass >= top_p
    forced_reach = forced_mass >= top_p
    lo = tl.where(forced_reach, F32_INF_BITS - 1, tl.where(reachable, smallest, -1))
    hi = tl.where(forced_reach, F32_INF_BITS, tl.where(reachable, largest + 1, 0))
    mass_above = tl.full((), 0.0, tl.float32)                         # S(hi): no candidate is >= hi
    while hi - lo > 1:
        step = (hi - lo) >> SEARCH_BITS
        rest = (hi - lo) & ((1 << SEARCH_BITS) - 1)
        lower = _split_point(lo, step, rest, splits, SEARCH_BITS)     # [LANES, 1], lo <= lower <= upper <= hi
        upper = _split_point(lo, step, rest, splits + 1, SEARCH_BITS)
        # One pass over the row: S(t_k) for every lane, and each sub-bracket's candidate range.
        mass_at_least, gap_lo, gap_hi = _search_stats(candidate_row, mass_row, in_registers, block_max_ptr,
                                                      block_sum_ptr, num_blocks, num_sink_blocks, first_tail_block,
                                                      global_max, inv_total, lower, upper, CHUNK)
        reached = (lower == lo) | (forced_mass + mass_at_least >= top_p)
        n = tl.max(tl.where(reached, splits, 0))                      # largest reached k (lane 0, lo, is)
        # S at the new hi = t_{n+1}: lane n + 1 when there is one, else hi stays (and so does S(hi)). The
        # last hi is tau + 1: S(hi) is the candidate mass above tau.
        mass_above = tl.where(n + 1 < LANES, tl.sum(tl.where(splits == n + 1, mass_at_least, 0.0)), mass_above)
        in_lane = splits == n
        # The candidate values inside [t_n, t_{n+1}); the search ends when there is one.
        lo, hi = _shrunk(tl.sum(tl.where(in_lane, lower, 0)), tl.sum(tl.where(in_lane, upper, 0)),
                         tl.max(tl.where(in_lane, gap_lo, 0)), tl.max(tl.where(in_lane, gap_hi, 0)))
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
