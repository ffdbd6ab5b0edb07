"""Block top-p selection for retrieval heads at decode, in Triton (sort-free).

For every decode sequence ``b`` and retrieval head ``h``, the op scores the sequence's index keys
against the query's index vector, forms the softmax mass of each BS-token selection block and keeps
the smallest block set reaching ``top_p`` that contains the forced blocks (the sink block(s) and the
last, own block), filled by decreasing mass with ties to the lower block id. This equals
:func:`.reference.block_topp_ref` applied to :func:`.reference.index_scores_ref` up to float
summation order.

Two launches, both with grids fixed by ``(B, HR, max_blocks)`` so they can be captured in a CUDA
graph; nothing is read back to the host and nothing is allocated when a workspace and outputs are
passed in. The block table's row stride (its width, set by whoever allocates it) is not specialised on.

1. ``_block_stats_kernel``, grid ``(HR, cdiv(max_blocks, BLOCKS_PER_PROG), B)``: each program scores
   ``BLOCKS_PER_PROG`` selection blocks of one (sequence, head) in float32 and writes, per block, the
   max score ``m_j`` and ``l_j = sum_t exp(s_t - m_j)`` to the workspace. The page ids, the
   sequence's length and the head's offset are loaded together, so the keys wait for one round trip
   to memory: the page ids are bounded by the block table's width, not by the length. Programs past
   the sequence's last block stop after those loads.
2. ``_select_kernel``, grid ``(HR, B)``: per (sequence, head), :func:`..topp_search.topp_select_row`
   (shared with the prefill selection) combines the block stats into masses
   ``mass_j = l_j * exp(m_j - M) / Z`` (``M`` the global max, ``Z`` the partition sum), then finds
   the threshold ``tau`` without sorting: masses are non-negative floats, so their int32 bit patterns
   order like their values, and a k-ary search over bit patterns (``SEARCH_BITS`` bits per step, one
   ``[2**SEARCH_BITS, CHUNK]`` reduction per step that also shrinks the bracket to the candidate values
   it holds; 1 is a binary search) finds the largest ``tau`` with
   ``F + sum(mass_j >= tau, j not forced) >= top_p`` (``F`` the forced mass). ``tau`` is
   the mass of the last block the greedy order takes. The kept set is the forced blocks, every
   non-forced block with mass ``> tau``, and the blocks tied at ``tau`` in id order while
   ``F + sum(mass > tau) + (ties before) * tau < top_p`` -- exactly the greedy prefix. If even all
   blocks fall short of ``top_p`` (rounding), or ``top_p == 1``, every block is kept. A last pass
   writes the kept ids in ascending order, the count, and ``-1`` padding. A row of at most ``CHUNK``
   (``CONFIG["select_chunk"]``) blocks keeps its masses in registers through the search; a longer row
   re-reads them from the workspace once per search step. The choice is made per row, so a long
   ``max_model_len`` (which sets ``max_blocks``) does not put short rows on the slow path.

Index keys are addressed through :mod:`..paged_heads`: retrieval head ``r``'s keys live at
``base + offsets[r]`` (its unit tensor and slot) plus ``page * page_stride + (t % P) * token_stride``,
the page from the index kind's block table.

Tuning: one selection program per (sequence, head) means a handful of programs at batch 1, so the
selection is latency-bound on its serial search steps; ``CONFIG["search_bits"]`` trades steps
(at most ``ceil(31 / bits)``) for arithmetic per step (``2**bits`` thresholds). Every value selects the
same blocks; the fastest is a GPU measurement (``benchmarks/bench_block_topp.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..launch import pdl_launch, wait_for_previous_kernel
from ..paged_heads import PagedHeads, PageTable
from ..topp_search import topp_select_row


# Launch settings a benchmark may change (read at each launch). search_bits: bits of the threshold
# found per step of the selection's k-ary search (1: a binary search; 3: 8 sub-brackets per step);
# with the bracket shrunk to the candidate values it holds after each step, the binary search's cheap
# steps are the fastest. select_chunk: the most blocks one selection program holds in registers (a power
# of two; longer rows re-read the workspace once per search step); the program has 4 warps up to 1024
# blocks, 8 up to 4096, 16 above, unless select_warps (0: that rule) sets it. The [2**bits, CHUNK]
# reduction of a step lives in registers (2**bits per block per thread; 3 bits at CHUNK 4096 and 8 warps
# compile for sm_90 without spills, 4 bits spill); more warps mean fewer blocks per thread in each serial
# search step.
# stats_blocks_per_prog: selection blocks scored by one stats program (one [blocks, BS, DI] tile of keys; a
# power of two).
CONFIG = {"search_bits": 1, "select_chunk": 8192, "select_warps": 0, "stats_blocks_per_prog": 4}


@dataclass(frozen=True)
class BlockTopPWorkspace:
    """Scratch of :func:`block_topp`, allocated once by :func:`make_block_topp_workspace`.

    Attributes:
        block_max: ``[max_batch, HR, max_blocks]`` float32, per block the max indexer score.
        block_sum: ``[max_batch, HR, max_blocks]`` float32, per block ``sum exp(score - block_max)``.

    Views work too (unit last stride, the same strides for both), e.g. ``[:, :hr]`` slices of a
    workspace allocated for the largest HR.
    """

    block_max: torch.Tensor
    block_sum: torch.Tensor


def make_block_topp_workspace(max_batch: int, num_heads: int, max_blocks: int,
                              device: torch.device | str) -> BlockTopPWorkspace:
    """Allocates the scratch of :func:`block_topp` for up to ``max_batch`` sequences.

    Args:
        max_batch: largest batch ``B`` the workspace will serve.
        num_heads: HR, retrieval heads of the layer(s) it serves.
        max_blocks: static bound on selection blocks per sequence, ``ceil(max_model_len / BS)``.
        device: where the op runs.

    Returns:
        A :class:`BlockTopPWorkspace` of ``2 * max_batch * HR * max_blocks`` float32 (uninitialised:
        every entry read is written first in the same call).
    """
    if max_batch < 1 or num_heads < 1 or max_blocks < 1:
        raise ValueError(f"need max_batch, num_heads and max_blocks >= 1, got {max_batch}, {num_heads}, "
                         f"{max_blocks}")
    shape = (max_batch, num_heads, max_blocks)
    return BlockTopPWorkspace(block_max=torch.empty(shape, dtype=torch.float32, device=device),
                              block_sum=torch.empty(shape, dtype=torch.float32, device=device))


# ---------------------------------------------------------------------------------------------------
# Kernel 1: per-block max score and exp-sum


@triton.jit(do_not_specialize=["stride_tb", "table_width"])
def _block_stats_kernel(
    q_ptr, cache_ptr, offsets_ptr, block_table_ptr, seq_lens_ptr, block_max_ptr, block_sum_ptr,
    stride_qb, stride_qh, stride_qd,
    stride_cp, stride_ct,
    stride_tb, stride_tp, table_width,
    stride_wb, stride_wh,
    max_blocks,
    DI: tl.constexpr, DI_PAD: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCKS_PER_PROG: tl.constexpr, OFF_ALIGN: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    head = tl.program_id(0)
    first_block = tl.program_id(1) * BLOCKS_PER_PROG
    seq = tl.program_id(2).to(tl.int64)
    blocks = first_block + tl.arange(0, BLOCKS_PER_PROG)                              # [NB]
    tokens = blocks[:, None] * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)[None, :]          # [NB, BS]
    # What the keys' addresses need is loaded together, the page ids bounded by the block table's width
    # rather than by the sequence's length (a load of its own): the keys wait for one round trip, not two.
    table_row = block_table_ptr + seq * stride_tb
    if PAGE_SIZE % BLOCK_SIZE == 0:   # a block lies on one page: one page id per block
        page_index = blocks // (PAGE_SIZE // BLOCK_SIZE)
        page = tl.load(table_row + page_index * stride_tp, mask=page_index < table_width, other=0)[:, None]
    else:                             # one per token
        page_index = tokens // PAGE_SIZE
        page = tl.load(table_row + page_index * stride_tp, mask=page_index < table_width, other=0)   # [NB, BS]
    head_off = tl.multiple_of(tl.load(offsets_ptr + head), OFF_ALIGN)                 # the head's unit and slot
    seq_len = tl.load(seq_lens_ptr + seq)
    num_blocks = tl.minimum(tl.cdiv(seq_len, BLOCK_SIZE), max_blocks)
    # Programs past the sequence's last block stop here. The condition reads the page ids as well (never
    # negative where it matters): on the length alone, the compiler sinks their load below the branch.
    if (first_block < num_blocks) | (tl.min(page) < 0):
        dims = tl.arange(0, DI_PAD)
        q = tl.load(q_ptr + seq * stride_qb + head * stride_qh + dims * stride_qd, mask=dims < DI,
                    other=0.0).to(tl.float32)                                         # [DI_PAD]
        in_range = blocks < num_blocks
        valid = in_range[:, None] & (tokens < seq_len)   # page ids past it (stale ones) stay unread
        row = head_off + page.to(tl.int64) * stride_cp + (tokens % PAGE_SIZE) * stride_ct   # [NB, BS] int64
        keys = tl.load(cache_ptr + row[:, :, None] + dims[None, None, :],
                       mask=valid[:, :, None] & (dims < DI)[None, None, :], other=0.0)
        scores = tl.sum(keys.to(tl.float32) * q[None, None, :], axis=2)               # [NB, BS]
        scores = tl.where(valid, scores, float("-inf"))
        block_max = tl.max(scores, axis=1)                                            # [NB]
        safe_max = tl.where(block_max == float("-inf"), 0.0, block_max)              # blocks past the end
        block_sum = tl.sum(tl.exp(scores - safe_max[:, None]), axis=1)                # [NB]
        ws_offset = seq * stride_wb + head.to(tl.int64) * stride_wh
        tl.store(block_max_ptr + ws_offset + blocks, block_max, mask=in_range)
        tl.store(block_sum_ptr + ws_offset + blocks, block_sum, mask=in_range)


# ---------------------------------------------------------------------------------------------------
# Kernel 2: threshold search and compaction


@triton.jit
def _select_kernel(
    seq_lens_ptr, block_max_ptr, block_sum_ptr, selected_ptr, num_selected_ptr,
    stride_wb, stride_wh, stride_sb, stride_sh, stride_nb, stride_nh,
    top_p, dense_threshold, num_sink_blocks, max_blocks,
    BLOCK_SIZE: tl.constexpr, CHUNK: tl.constexpr, SEARCH_BITS: tl.constexpr, PDL: tl.constexpr,
):
    """Grid ``(HR, B)``: the kept block ids of one (sequence, head), ``-1`` padded to ``max_blocks``."""
    wait_for_previous_kernel(PDL)
    head = tl.program_id(0).to(tl.int64)
    seq = tl.program_id(1).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + seq)
    num_blocks = tl.maximum(tl.minimum(tl.cdiv(seq_len, BLOCK_SIZE), max_blocks), 0)
    selected_ptr += seq * stride_sb + head * stride_sh
    # top_p 1 and dense sequences keep every block: a mass no row can reach.
    row_top_p = tl.where((top_p >= 1.0) | (seq_len < dense_threshold), float("inf"), top_p)
    count = topp_select_row(block_max_ptr + seq * stride_wb + head * stride_wh,
                            block_sum_ptr + seq * stride_wb + head * stride_wh, selected_ptr, num_blocks,
                            max_blocks, num_sink_blocks, num_blocks - 1, row_top_p, CHUNK, SEARCH_BITS)
    tl.store(num_selected_ptr + seq * stride_nb + head * stride_nh, count)
    lanes = tl.arange(0, CHUNK)
    for start in range((count // CHUNK) * CHUNK, max_blocks, CHUNK):
        slots = start + lanes
        tl.store(selected_ptr + slots, tl.full((CHUNK,), -1, tl.int32),
                 mask=(slots >= count) & (slots < max_blocks))


# ---------------------------------------------------------------------------------------------------
# Launcher


def block_topp(q_idx: torch.Tensor, index: PagedHeads, index_table: PageTable,
               seq_lens: torch.Tensor, top_p: float, sink_tokens: int, block_size: int, max_blocks: int,
               workspace: BlockTopPWorkspace, selected: torch.Tensor | None = None,
               num_selected: torch.Tensor | None = None,
               dense_threshold: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Block top-p selection of every retrieval head of a decode batch.

    Per sequence ``b`` and head ``h``: softmax over the ``seq_lens[b]`` index scores
    ``q_idx[b, h] . k`` (float32, no scale), block masses over BS-token selection blocks, and the
    smallest block set reaching ``top_p`` that holds the blocks of the first ``sink_tokens`` tokens
    and the last block, filled by decreasing mass (ties: lower id first); ``top_p == 1`` keeps all.
    Launch shapes depend only on ``B``, ``HR`` and ``max_blocks`` (CUDA-graph capturable); no host
    synchronisation.

    Args:
        q_idx: ``[B, HR, DI]`` bf16/fp16/fp32, the decode queries' index vectors.
        index: the layer's index-key layout: ``HR`` heads (head ``r`` = retrieval head ``r``) of width
            ``DI``, one kind, in bf16/fp16/fp32 units (usually ``q_idx``'s dtype) or fp8 units (unscaled
            float8_e4m3fn, as :func:`..index_keys.write_index_keys` stores them); both are read as
            float32; the decode token's own key is already written.
        index_table: the index kind's :class:`PageTable` for this batch (``[B, max_pages]`` int32 page
            ids per sequence; entries past a sequence's last page are never read).
        seq_lens: ``[B]`` int32, tokens per sequence, the decode token included. ``0`` gives an empty
            selection; the caller guarantees ``seq_lens <= max_blocks * BS`` (longer is clamped).
        top_p: in ``(0, 1]``.
        sink_tokens: leading tokens whose blocks are always kept (``>= 0``).
        block_size: BS, tokens per selection block, a power of two; any page size ``P`` works
            (``BS % P == 0`` or ``P % BS == 0`` are the usual cases; P is the index units' page size).
        max_blocks: static bound on blocks per sequence, ``ceil(max_model_len / BS)``.
        workspace: from :func:`make_block_topp_workspace` with ``max_batch >= B``, the same ``HR``
            and ``max_blocks``.
        selected: optional output ``[B, HR, max_blocks]`` int32, written in place; allocated if None.
        num_selected: optional output ``[B, HR]`` int32, written in place; allocated if None.
        dense_threshold: a sequence with ``seq_lens < dense_threshold`` keeps every block (it runs
            dense); 0: none does.

    Returns:
        ``selected`` ``[B, HR, max_blocks]`` int32: kept block ids ascending, then ``-1``; and
        ``num_selected`` ``[B, HR]`` int32: kept blocks per head. All on the inputs' device.
    """
    if q_idx.dim() != 3:
        raise ValueError(f"q_idx must be [B, HR, DI], got {tuple(q_idx.shape)}")
    batch, num_heads, index_dim = q_idx.shape
    if not isinstance(index, PagedHeads) or not isinstance(index_table, PageTable):
        raise TypeError(f"index must be a PagedHeads and index_table a PageTable, got {type(index).__name__} and "
                        f"{type(index_table).__name__}")
    if (index.num_heads, index.width) != (num_heads, index_dim):
        raise ValueError(f"index layout has {index.num_heads} heads of width {index.width}, q_idx "
                         f"{tuple(q_idx.shape)} wants (HR, DI) = {(num_heads, index_dim)}")
    if index.num_kinds != 1:
        raise ValueError(f"index keys live in one cache kind (0), got heads of {index.num_kinds} kinds")
    floats = (torch.bfloat16, torch.float16, torch.float32)
    if q_idx.dtype not in floats or not (index.dtype in floats or index.is_fp8):
        raise TypeError(f"q_idx must be bf16, fp16 or float32 and the index units that or fp8, got {q_idx.dtype} "
                        f"and {index.dtype}")
    block_table = index_table.block_table
    if block_table.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise TypeError(f"block_table and seq_lens must be int32, got {block_table.dtype} and {seq_lens.dtype}")
    if block_table.dim() != 2 or block_table.shape[0] != batch or seq_lens.shape != (batch,):
        raise ValueError(f"need block_table [B, max_pages] and seq_lens [B] with B={batch}, got "
                         f"{tuple(block_table.shape)} and {tuple(seq_lens.shape)}")
    index.check_tables([index_table], batch, "index_table")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if sink_tokens < 0:
        raise ValueError(f"sink_tokens must be >= 0, got {sink_tokens}")
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if max_blocks < 1:
        raise ValueError(f"max_blocks must be >= 1, got {max_blocks}")
    ws_max, ws_sum = workspace.block_max, workspace.block_sum
    ws_shape = ws_max.shape
    if (ws_sum.shape != ws_shape or len(ws_shape) != 3 or ws_shape[0] < batch
            or ws_shape[1:] != (num_heads, max_blocks) or ws_max.stride() != ws_sum.stride()
            or ws_max.stride(2) != 1 or ws_max.dtype != torch.float32 or ws_sum.dtype != torch.float32):
        raise ValueError(f"workspace of shape {tuple(ws_shape)} does not serve B={batch}, HR={num_heads}, "
                         f"max_blocks={max_blocks}: allocate it with make_block_topp_workspace")
    device = q_idx.device
    if selected is None:
        selected = torch.empty((batch, num_heads, max_blocks), dtype=torch.int32, device=device)
    if num_selected is None:
        num_selected = torch.empty((batch, num_heads), dtype=torch.int32, device=device)
    if (selected.shape != (batch, num_heads, max_blocks) or selected.dtype != torch.int32
            or selected.stride(2) != 1):
        raise ValueError(f"selected must be int32 [{batch}, {num_heads}, {max_blocks}] with unit last stride")
    if num_selected.shape != (batch, num_heads) or num_selected.dtype != torch.int32:
        raise ValueError(f"num_selected must be int32 [{batch}, {num_heads}]")
    if batch == 0:
        return selected, num_selected

    blocks_per_prog = CONFIG["stats_blocks_per_prog"]
    pdl = pdl_launch(device)
    _block_stats_kernel[(num_heads, triton.cdiv(max_blocks, blocks_per_prog), batch)](
        q_idx, index.kernel_base(), index.offsets, block_table, seq_lens, workspace.block_max, workspace.block_sum,
        *q_idx.stride(), index_table.page_stride, index_table.token_stride, *block_table.stride(),
        block_table.shape[1], workspace.block_max.stride(0), workspace.block_max.stride(1),
        max_blocks,
        DI=index_dim, DI_PAD=triton.next_power_of_2(index_dim), PAGE_SIZE=index_table.page_size,
        BLOCK_SIZE=block_size, BLOCKS_PER_PROG=blocks_per_prog,
        OFF_ALIGN=index.offset_align, PDL=pdl, num_warps=4, launch_pdl=pdl,
    )
    chunk = min(triton.next_power_of_2(max_blocks), CONFIG["select_chunk"])
    select_warps = CONFIG["select_warps"] or (4 if chunk <= 1024 else 8 if chunk <= 4096 else 16)
    _select_kernel[(num_heads, batch)](
        seq_lens, workspace.block_max, workspace.block_sum, selected, num_selected,
        workspace.block_max.stride(0), workspace.block_max.stride(1),
        selected.stride(0), selected.stride(1), num_selected.stride(0), num_selected.stride(1),
        float(top_p), dense_threshold, math.ceil(sink_tokens / block_size), max_blocks,
        BLOCK_SIZE=block_size, CHUNK=chunk, SEARCH_BITS=CONFIG["search_bits"], PDL=pdl,
        num_warps=select_warps, launch_pdl=pdl,
    )
    return selected, num_selected
