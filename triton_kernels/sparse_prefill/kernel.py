"""Sparse top-p prefill of retrieval heads over vLLM's paged caches, in Triton.

Semantics: :mod:`.reference` (query tiles of up to ``tile_q`` chunk rows, cut at the positions that
are multiples of ``tile_q``; per (sequence, retrieval head, tile) the sink blocks, the diagonal blocks
and the top-p blocks of the keys' index scores, each the max over the tile's rows; exact causal
attention of each row over its tile's kept blocks).

The tiles come from the step's :class:`.plan.SparsePrefillPlan`: a flat list per wave, so scratch
follows the number of tiles, not the batch size times the longest chunk. Three launches per wave;
grids depend on the wave's tile count, ``HR`` and ``cdiv(max_seqlen_k, BS)`` (host values of the plan;
prefill runs eagerly), nothing is read back to the host, and every scratch tensor comes from
:class:`SparsePrefillWorkspace`:

1. ``_score_kernel``, grid ``(cdiv(blocks, BLOCKS_PER_PROG), tiles, HR)``: one program holds one tile's
   ``[TILE_Q, DI]`` index queries and walks ``BLOCKS_PER_PROG`` key blocks of one head, ``SUB`` keys at
   a time: one ``[SUB, DI] x [DI, TILE_Q]`` dot gives every (key, row) logit, the max over the rows
   each key's score; it writes per (tile, block) the max score and ``sum exp(score - max)`` over the
   keys the tile may see. The dot runs in the index queries' 16-bit dtype when the index keys share it
   or are fp8 (the products are exact, the sums float32), else on float32 operands as tf32x3 (about
   float32 accuracy). Programs past the tile's last key return at once; the index keys of a head are
   re-read per tile, from L2 at long contexts.
2. ``_select_kernel``, grid ``(tiles, HR)``: per tile, the sort-free top-p of :mod:`..topp_search`
   with the sink blocks and the diagonal blocks forced; writes the kept ids ascending and their count.
   ``top_p >= 1`` skips launch 1 and keeps every block.
3. ``_attend_kernel``, grid ``(tiles, HR)``, in the plan's attention order (the tiles with the most keys
   first): one program per (tile, retrieval head) holds its ``[TILE_Q, D]`` queries and walks its
   kept-block list as a list of virtual tokens (token ``i % BS`` of block ``kept[i // BS]``) in
   ``[TILE_Q, D] x [D, KV_TILE]`` tiles, so ``KV_TILE`` is free of BS: K and V of each kept block are
   loaded once (per-token page lookups through the kind-0 block table), online softmax in float32
   (exp2), P in the dot dtype of V for the second dot. The kept list is ascending and ends with the blocks
   holding the tile's own positions, so the loop runs in two parts: the whole tiles before them with no
   mask at all, then the rest with the causal mask ``key_pos <= row_pos``. FP8 K/V are dotted in fp16
   (:mod:`..fp8`); ``k_scale`` joins the softmax scale and ``v_scale`` the output factor.

Variants: the constexprs and specialised arguments follow the model, the layer, the dtypes and the
workspace, never the step (block-table row strides and the per-sequence arrays' alignment, views of
vLLM's buffers offset by the decode count, are not specialised on), so the start-up warm-up
(:mod:`rtpurbo_vllm.attention.warmup`) compiles every variant a step can launch.

Hopper: the attention tiles compile to wgmma with cp.async software pipelining (``CONFIG["stages"]``)
of the gathered K/V rows; the paged gather rules out TMA. ``CONFIG`` holds the launch knobs a sweep on
the GPU should settle (``kv_tile``, ``stages``, the score kernel's blocks per program and warps, the
selection's ``search_bits``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..fp8 import fp16_dot_operand, fp16_dot_query
from ..launch import interpreting
from ..online_softmax import online_softmax_step, tile_scores
from ..paged_heads import PagedHeads, PageTable
from ..topp_search import keep_every_block, topp_select_row
from .plan import ATTEND_ORDER, TILE_INDEX, TILE_SEQ, SparsePrefillPlan, SparsePrefillWorkspace, check_power_of_two

# The plan's rows, as the kernels read them.
_TILE_SEQ, _TILE_INDEX, _ATTEND_ORDER = tl.constexpr(TILE_SEQ), tl.constexpr(TILE_INDEX), tl.constexpr(ATTEND_ORDER)

# Launch configuration; module-level so a benchmark can sweep it (values are read at each launch).
# search_bits: bits per step of the selection's k-ary threshold search (:mod:`..topp_search`); the
# prefill launches many selection programs at once, so the binary search (1), the least arithmetic in
# all, is the default, unlike the latency-bound decode selection (``block_topp.kernel.CONFIG``).
# score_warps: one warp per score program (mma.sync; the reductions over rows and over a block's keys
# stay inside the warp) rather than a warpgroup whose per-block reductions cross warps.
CONFIG = {"blocks_per_prog": 16, "score_sub": 64, "score_warps": 1, "select_chunk": 4096, "kv_tile": 64,
          "stages": 3, "search_bits": 1}


# ----------------------------------------------------------------------------------------------------
# Device helpers.


@triton.jit
def _index_scores(keys, q, NATIVE: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """``keys [SUB, DI_PAD] @ q [TILE_Q, DI_PAD]^T`` in float32. ``NATIVE``: in ``q``'s 16-bit dtype
    (``keys`` of that dtype or fp8, converted exactly), else float32 operands as tf32x3."""
    if NATIVE:
        if keys.dtype != q.dtype:                                # fp8: through float32, exactly
            keys = keys.to(tl.float32)
        return tile_scores(keys.to(q.dtype), q, UPCAST_DOT)
    return tl.dot(keys.to(tl.float32), tl.trans(q.to(tl.float32)), input_precision="tf32x3")


@triton.jit
def _tile_span(seqlen_q, seqlen_k, tile, TILE_Q: tl.constexpr):
    """First chunk row and row count of chunk tile(s) ``tile`` (:func:`.reference.chunk_tiles`: the
    chunk's rows cut at the positions that are multiples of ``TILE_Q``; a count ``<= 0``: past the chunk)."""
    start = tile * TILE_Q - (seqlen_k - seqlen_q) % TILE_Q
    row0 = tl.maximum(start, 0)
    return row0, tl.minimum(start + TILE_Q, seqlen_q) - row0


@triton.jit
def _attend_tiles(acc, l_i, m_i, q, pos, last_pos, kv_ptr, kv_off, bt_row, kept_row, start, end,
                  page_size, page_stride, token_stride, qk_scale,
                  MASKED: tl.constexpr, BS: tl.constexpr, KV_TILE: tl.constexpr, D: tl.constexpr,
                  D_PAD: tl.constexpr, UPCAST_DOT: tl.constexpr, FP8: tl.constexpr):
    """Online softmax of ``q`` ``[TILE_Q, D_PAD]`` over virtual tokens ``[start, end)`` of the kept
    list (virtual token ``i`` is token ``i % BS`` of block ``kept_row[i // BS]``), ``KV_TILE`` at a
    time (a tile may span several blocks, or a block several tiles). ``MASKED``: drop virtual tokens
    ``>= end`` and keys past each row's position ``pos``; otherwise every key of every tile is visible
    to every row. Returns the updated ``acc``, ``l_i`` and base-2 ``m_i``."""
    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < D
    offs_t = tl.arange(0, KV_TILE)
    for vi0 in range(start, end, KV_TILE):
        vi = vi0 + offs_t                                                                 # [KV_TILE]
        if MASKED:
            # Only here can a tile reach past the list, the last row (and the sequence's pages).
            in_list = vi < end
            tok = tl.load(kept_row + vi // BS, mask=in_list, other=0) * BS + vi % BS
            valid = in_list & (tok <= last_pos)
            page = tl.load(bt_row + tok // page_size, mask=valid, other=0).to(tl.int64)
        else:
            tok = tl.load(kept_row + vi // BS) * BS + vi % BS
            valid = offs_t < KV_TILE
            page = tl.load(bt_row + tok // page_size).to(tl.int64)
        k_ptrs = kv_ptr + (kv_off + page * page_stride + (tok % page_size).to(tl.int64) * token_stride)[:, None] \
            + offs_d[None, :]                                                             # [KV_TILE, D_PAD]
        if MASKED or D != D_PAD:
            mask = valid[:, None] & mask_d[None, :]
            k = tl.load(k_ptrs, mask=mask, other=0.0)
            v = tl.load(k_ptrs + D, mask=mask, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(k_ptrs + D)
        if FP8:
            k = fp16_dot_operand(k)
            v = fp16_dot_operand(v)
        s = tile_scores(q, k, UPCAST_DOT) * qk_scale                                   # [TILE_Q, KV_TILE]
        if MASKED:
            s = tl.where(valid[None, :] & (tok[None, :] <= pos[:, None]), s, float("-inf"))
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, s, v, UPCAST_DOT)
    return acc, l_i, m_i


# ----------------------------------------------------------------------------------------------------
# Kernels.


@triton.jit
def _plan_tile(plan_ptr, s_row, t):
    """Sequence and chunk tile index of the wave's tile ``t``."""
    return tl.load(plan_ptr + _TILE_SEQ * s_row + t).to(tl.int64), tl.load(plan_ptr + _TILE_INDEX * s_row + t)


@triton.jit(do_not_specialize=["s_bt"], do_not_specialize_on_alignment=["bt_ptr", "seqused_k_ptr"])
def _score_kernel(plan_ptr, q_idx_ptr, idx_ptr, idx_off_ptr, bt_ptr, cu_q_ptr, seqused_k_ptr, max_ptr, sum_ptr,
                  dense_threshold, s_row, s_it, s_ih, s_id, page_size, page_stride, token_stride, s_bt, s_wt, s_wh,
                  TILE_Q: tl.constexpr, BLOCKS_PER_PROG: tl.constexpr, BS: tl.constexpr, SUB: tl.constexpr,
                  DI: tl.constexpr, DI_PAD: tl.constexpr, OFF_ALIGN: tl.constexpr, NATIVE: tl.constexpr,
                  UPCAST_DOT: tl.constexpr):
    """Grid ``(cdiv(blocks, BLOCKS_PER_PROG), tiles, HR)``: per-(tile, block) stats of the keys' scores
    (max over the tile's rows of the index logit) of the wave's tile ``t`` over ``BLOCKS_PER_PROG``
    key blocks of one head; nothing for a sequence under ``dense_threshold`` keys (it keeps every block)."""
    t = tl.program_id(1)
    r = tl.program_id(2)
    b, tile = _plan_tile(plan_ptr, s_row, t)
    q0 = tl.load(cu_q_ptr + b)
    seqlen_q = tl.load(cu_q_ptr + b + 1) - q0
    seqlen_k = tl.load(seqused_k_ptr + b)
    row0, n_rows = _tile_span(seqlen_q, seqlen_k, tile, TILE_Q)
    n_keys = seqlen_k - seqlen_q + row0 + n_rows                                         # last_pos + 1
    first_block = tl.program_id(0) * BLOCKS_PER_PROG
    end_block = tl.minimum(first_block + BLOCKS_PER_PROG, tl.cdiv(n_keys, BS))
    if (first_block < end_block) & (seqlen_k >= dense_threshold):
        # Rows past the tile repeat its last row, which leaves every key's max as it is.
        rows = tl.minimum(tl.arange(0, TILE_Q), n_rows - 1)
        dims = tl.arange(0, DI_PAD)
        q = tl.load(q_idx_ptr + (q0 + row0 + rows).to(tl.int64)[:, None] * s_it + r * s_ih + dims[None, :] * s_id,
                    mask=(dims < DI)[None, :], other=0.0)                                # [TILE_Q, DI_PAD]
        idx_off = tl.multiple_of(tl.load(idx_off_ptr + r), OFF_ALIGN)
        bt_row = bt_ptr + b * s_bt
        ws = t * s_wt + r * s_wh
        offs_t = tl.arange(0, SUB)
        for blk in range(first_block, end_block):
            m_i = float("-inf")
            l_i = 0.0
            for sub in tl.static_range(BS // SUB):
                tok = blk * BS + sub * SUB + offs_t                                       # [SUB]
                valid = tok < n_keys
                page = tl.load(bt_row + tok // page_size, mask=valid, other=0).to(tl.int64)
                row = idx_off + page * page_stride + (tok % page_size).to(tl.int64) * token_stride
                keys = tl.load(idx_ptr + row[:, None] + dims[None, :], mask=valid[:, None] & (dims < DI)[None, :],
                               other=0.0)                                                 # [SUB, DI_PAD]
                logits = _index_scores(keys, q, NATIVE, UPCAST_DOT)                       # [SUB, TILE_Q]
                score = tl.where(valid, tl.max(logits, 1), float("-inf"))
                m_new = tl.maximum(m_i, tl.max(score, 0))
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
                l_i = l_i * tl.exp(m_i - m_ref) + tl.sum(tl.exp(score - m_ref), 0)
                m_i = m_new
            tl.store(max_ptr + ws + blk, m_i)
            tl.store(sum_ptr + ws + blk, l_i)


@triton.jit(do_not_specialize_on_alignment=["seqused_k_ptr"])
def _select_kernel(plan_ptr, cu_q_ptr, seqused_k_ptr, max_ptr, sum_ptr, kept_ptr, nkept_ptr,
                   top_p, dense_threshold, num_sink_blocks, max_blocks, s_row, s_wt, s_wh, s_kt, s_kh, s_nt, s_nh,
                   TILE_Q: tl.constexpr, BS: tl.constexpr, KEEP_ALL: tl.constexpr, CHUNK: tl.constexpr,
                   SEARCH_BITS: tl.constexpr):
    """Grid ``(tiles, HR)``: the kept blocks of the wave's tile ``t``."""
    t = tl.program_id(0)
    r = tl.program_id(1)
    b, tile = _plan_tile(plan_ptr, s_row, t)
    seqlen_q = tl.load(cu_q_ptr + b + 1) - tl.load(cu_q_ptr + b)
    seqlen_k = tl.load(seqused_k_ptr + b)
    row0, n_rows = _tile_span(seqlen_q, seqlen_k, tile, TILE_Q)
    first_pos = seqlen_k - seqlen_q + row0
    num_blocks = tl.minimum(tl.cdiv(first_pos + n_rows, BS), max_blocks)
    kept_row = kept_ptr + t * s_kt + r * s_kh
    if KEEP_ALL:
        count = keep_every_block(kept_row, num_blocks, CHUNK)
    elif seqlen_k < dense_threshold:
        count = keep_every_block(kept_row, num_blocks, CHUNK)
    else:
        first_diagonal = tl.maximum(first_pos - BS + 1, 0) // BS
        ws = t * s_wt + r * s_wh
        count = topp_select_row(max_ptr + ws, sum_ptr + ws, kept_row, num_blocks, max_blocks, num_sink_blocks,
                                first_diagonal, top_p, CHUNK, SEARCH_BITS)
    tl.store(nkept_ptr + t * s_nt + r * s_nh, count)


@triton.jit(do_not_specialize=["s_bt"], do_not_specialize_on_alignment=["bt_ptr", "seqused_k_ptr"])
def _attend_kernel(plan_ptr, q_ptr, kv_ptr, kv_off_ptr, bt_ptr, cu_q_ptr, seqused_k_ptr, heads_ptr, kept_ptr,
                   nkept_ptr, out_ptr, lse_ptr, k_scale_ptr, v_scale_ptr, qk_scale,
                   s_row, s_qt, s_qh, page_size, page_stride, token_stride, s_bt, s_kt, s_kh, s_nt, s_nh,
                   s_ot, s_oh, s_lt, s_lh,
                   G: tl.constexpr, TILE_Q: tl.constexpr, BS: tl.constexpr, KV_TILE: tl.constexpr,
                   D: tl.constexpr, D_PAD: tl.constexpr, OFF_ALIGN: tl.constexpr, HAS_LSE: tl.constexpr,
                   UPCAST_DOT: tl.constexpr, FP8: tl.constexpr):
    """Grid ``(tiles, HR)``, the plan's attention order (longest first): one tile's rows of one retrieval head."""
    t = tl.load(plan_ptr + _ATTEND_ORDER * s_row + tl.program_id(0))
    r = tl.program_id(1)
    b, tile = _plan_tile(plan_ptr, s_row, t)
    q0 = tl.load(cu_q_ptr + b)
    seqlen_q = tl.load(cu_q_ptr + b + 1) - q0
    seqlen_k = tl.load(seqused_k_ptr + b)
    row0, n_rows = _tile_span(seqlen_q, seqlen_k, tile, TILE_Q)
    if n_rows > 0:
        first_pos = seqlen_k - seqlen_q + row0
        last_pos = first_pos + n_rows - 1
        h = tl.load(heads_ptr + r)
        rows = tl.arange(0, TILE_Q)
        mask_r = rows < n_rows
        offs_d = tl.arange(0, D_PAD)
        mask_d = offs_d < D
        tok_rows = (q0 + row0 + rows).to(tl.int64)                                       # [TILE_Q]
        q = tl.load(q_ptr + tok_rows[:, None] * s_qt + h * s_qh + offs_d[None, :],
                    mask=mask_r[:, None] & mask_d[None, :], other=0.0)                   # [TILE_Q, D_PAD]
        pos = first_pos + rows
        out_scale = 1.0
        if FP8:
            q = fp16_dot_query(q)
            qk_scale = qk_scale * tl.load(k_scale_ptr)
            out_scale = tl.load(v_scale_ptr)
        kv_off = tl.multiple_of(tl.load(kv_off_ptr + h // G), OFF_ALIGN)
        bt_row = bt_ptr + b * s_bt
        kept_row = kept_ptr + t * s_kt + r * s_kh
        count = tl.load(nkept_ptr + t * s_nt + r * s_nh)
        # The kept list is ascending and ends with the blocks holding the tile's own positions (forced
        # diagonal blocks, the highest ids): the whole KV tiles before them need no mask; the rest (those
        # blocks, and at most one tile that reaches into them) is masked.
        n_own = last_pos // BS - first_pos // BS + 1
        unmasked = tl.maximum(count - n_own, 0) * BS // KV_TILE * KV_TILE
        m_i = tl.full([TILE_Q], float("-inf"), tl.float32)
        l_i = tl.zeros([TILE_Q], tl.float32)
        acc = tl.zeros([TILE_Q, D_PAD], tl.float32)
        acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, pos, last_pos, kv_ptr, kv_off, bt_row, kept_row,
                                      0, unmasked, page_size, page_stride, token_stride, qk_scale,
                                      False, BS, KV_TILE, D, D_PAD, UPCAST_DOT, FP8)
        acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, pos, last_pos, kv_ptr, kv_off, bt_row, kept_row,
                                      unmasked, count * BS, page_size, page_stride, token_stride, qk_scale,
                                      True, BS, KV_TILE, D, D_PAD, UPCAST_DOT, FP8)
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        o = acc * (out_scale / l_safe)[:, None]
        tl.store(out_ptr + tok_rows[:, None] * s_ot + h * s_oh + offs_d[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=mask_r[:, None] & mask_d[None, :])
        if HAS_LSE:
            lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
            tl.store(lse_ptr + tok_rows * s_lt + h * s_lh, lse, mask=mask_r)


# ----------------------------------------------------------------------------------------------------
# Launcher.


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def sparse_prefill(q: torch.Tensor, kv: PagedHeads, kv_tables: Sequence[PageTable], index: PagedHeads,
                   index_table: PageTable, q_idx: torch.Tensor, cu_seqlens_q: torch.Tensor,
                   seqused_k: torch.Tensor, heads: torch.Tensor, plan: SparsePrefillPlan,
                   top_p: float, sink_tokens: int, block_size: int, scale: float,
                   workspace: SparsePrefillWorkspace, out: torch.Tensor, lse: torch.Tensor | None = None,
                   dense_threshold: int = 0, k_scale: torch.Tensor | None = None,
                   v_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse top-p prefill (or chunked prefill) of the retrieval heads of one layer; writes their rows of ``out``.

    Each sequence's ``seqlen_q`` new query rows are the last rows of its ``seqused_k`` keys, whose K/V
    and index keys are already in the caches. Semantics: :mod:`.reference`; the tiles have up to
    ``plan.tile_q`` rows. Only shapes, dtypes and devices are checked (no host sync); values are
    trusted. Not for CUDA graphs (the grids follow the plan's waves).

    Args:
        q: ``[T, HQ, D]`` bf16/fp16 (unit last stride), post-RoPE queries of the prefill rows.
        kv: the layer's K|V layout (:class:`PagedHeads`, ``HKV`` heads of width ``2D``, ``HQ % HKV == 0``),
            units in ``q``'s dtype or fp8 (uint8 bytes / float8_e4m3fn, with ``k_scale``/``v_scale``).
            The KV heads of the retrieval heads must be kind 0 (full); they are read through
            ``kv_tables[0]``.
        kv_tables: per kind the heads use, its :class:`PageTable` (``[B, max_pages]`` int32 block table).
        index: the layer's index-key layout: ``HR`` heads of width DI (a power of two >= 16; retrieval
            head ``r``'s index keys in head ``r``), kind 0, bf16/fp16/fp32 units or fp8 units (unscaled).
        index_table: its :class:`PageTable` for this batch (``[B, max_pages]`` int32).
        q_idx: ``[T', HR, DI]`` (``T' >= T``) bf16/fp16/fp32, any strides, the rows' index queries (from
            :func:`..index_keys.index_queries` on ``q`` and the rows' positions).
        cu_seqlens_q: ``[B+1]`` int32, row offsets of the sequences in ``q`` (``cu_seqlens_q[-1] <= T``).
        seqused_k: ``[B]`` int32, keys per sequence, history and chunk (``>= seqlen_q``).
        heads: ``[HR]`` int32, the query head of each retrieval head (unique, in ``[0, HQ)``).
        plan: the batch's tiles (:func:`.plan.plan_sparse_prefill` of the same chunk and sequence
            lengths), on ``q``'s device.
        top_p: ``> 0``; ``>= 1`` keeps every block (dense causal attention).
        sink_tokens: leading tokens whose blocks every tile keeps (``>= 0``).
        block_size: BS, tokens per selection block, a power of two ``>= 16``.
        scale: softmax scale.
        workspace: from :func:`make_sparse_prefill_workspace` with ``tile_q == plan.tile_q``,
            ``wave_tiles >= plan.wave_tiles``, ``HR_max >= HR`` and ``max_blocks`` covering every
            sequence's ``cdiv(seqused_k, BS)``.
        out: ``[T, HQ, D]`` (unit last stride); the rows of the retrieval heads are written in its dtype,
            every other entry is left untouched.
        lse: optional ``[T, HQ]`` float32 (any strides: a transposed view of FA3's ``[HQ, T]`` works);
            the retrieval heads' natural-log LSEs are written, every other entry is left untouched.
        dense_threshold: a sequence with ``seqused_k < dense_threshold`` keeps every block (0: none).
        k_scale, v_scale: fp8 units only: 1-element float32 device tensors; a stored value means
            ``fp8 * scale``.

    Returns:
        ``out``, and the last wave's selection (views of the workspace, valid until its next use):
        ``kept`` ``[tiles, HR, max_blocks]`` int32, each tile's kept block ids ascending (entries past the
        count unspecified), and ``num_kept`` ``[tiles, HR]`` int32, in the wave's tile order.
    """
    _check(q.dim() == 3, f"q must be [T, HQ, D], got shape {tuple(q.shape)}")
    num_tokens, num_heads, head_dim = q.shape
    _check(q.dtype in (torch.bfloat16, torch.float16), f"q must be bf16 or fp16, got {q.dtype}")
    _check(isinstance(kv, PagedHeads) and isinstance(index, PagedHeads),
           f"kv and index must be PagedHeads, got {type(kv).__name__} and {type(index).__name__}")
    _check(kv.width == 2 * head_dim, f"K|V vectors have width {kv.width}, expected 2 * D = {2 * head_dim}")
    _check(num_heads % kv.num_heads == 0, f"{num_heads} query heads are not a multiple of {kv.num_heads} KV heads")
    _check(kv.geometry and kv.geometry[0] is not None, "retrieval heads read kind-0 (full) KV heads, and this "
           "layout has none")
    _check(heads.dim() == 1 and heads.dtype == torch.int32, f"heads must be [HR] int32, got {tuple(heads.shape)} "
           f"{heads.dtype}")
    num_ret = heads.shape[0]
    _check(1 <= num_ret <= num_heads, f"{num_ret} retrieval heads for {num_heads} query heads")
    _check(cu_seqlens_q.dim() == 1 and cu_seqlens_q.dtype == torch.int32 and cu_seqlens_q.shape[0] >= 1,
           f"cu_seqlens_q must be [B+1] int32, got {tuple(cu_seqlens_q.shape)} {cu_seqlens_q.dtype}")
    batch = cu_seqlens_q.shape[0] - 1
    _check(seqused_k.shape == (batch,) and seqused_k.dtype == torch.int32,
           f"seqused_k must be [B={batch}] int32, got {tuple(seqused_k.shape)} {seqused_k.dtype}")
    kv.check_tables(kv_tables, batch, "kv_tables")
    fp8 = kv.check_attention_dtypes(q.dtype, k_scale, v_scale)
    _check(index.num_heads == num_ret and index.num_kinds == 1,
           f"index must hold the {num_ret} retrieval heads' index keys in kind 0, got {index.num_heads} heads of "
           f"{index.num_kinds} kinds")
    index.check_tables([index_table], batch, "index_table")
    floats = (torch.bfloat16, torch.float16, torch.float32)
    _check(index.dtype in floats or index.is_fp8, f"index units must be bf16, fp16, float32 or fp8, got {index.dtype}")
    index_dim = index.width
    check_power_of_two("the index dim DI (index.width)", index_dim)
    _check(q_idx.dim() == 3 and q_idx.shape[1:] == (num_ret, index_dim) and q_idx.shape[0] >= num_tokens
           and q_idx.dtype in floats,
           f"q_idx must be float [T={num_tokens}, HR={num_ret}, DI={index_dim}], got {tuple(q_idx.shape)} "
           f"{q_idx.dtype}")
    _check(out.shape == q.shape and out.stride(-1) == 1 and q.stride(-1) == 1,
           f"out must be [T, HQ, D] {tuple(q.shape)} and q and out need a unit last stride")
    if lse is not None:
        _check(lse.shape == (num_tokens, num_heads) and lse.dtype == torch.float32,
               f"lse must be [T={num_tokens}, HQ={num_heads}] float32, got {tuple(lse.shape)} {lse.dtype}")
    _check(top_p > 0.0, f"top_p must be > 0, got {top_p}")
    _check(sink_tokens >= 0, f"sink_tokens must be >= 0, got {sink_tokens}")
    check_power_of_two("block_size", block_size)
    _check(isinstance(plan, SparsePrefillPlan), f"plan must be a SparsePrefillPlan, got {type(plan).__name__}")
    max_key_blocks = triton.cdiv(max((wave.max_seqlen_k for wave in plan.waves), default=0), block_size)
    _check(workspace.tile_q == plan.tile_q and workspace.wave_tiles >= plan.wave_tiles
           and workspace.kept.shape[1] >= num_ret and workspace.max_blocks >= max_key_blocks,
           f"workspace (tiles of {workspace.tile_q} rows, {tuple(workspace.kept.shape)}) does not serve waves of "
           f"{plan.wave_tiles} tiles of {plan.tile_q} rows, HR={num_ret}, {max_key_blocks} blocks: allocate it with "
           f"make_sparse_prefill_workspace")
    tensors = (q, kv.base, index.base, q_idx, cu_seqlens_q, seqused_k, heads, out, workspace.kept, plan.tiles,
               *((lse,) if lse is not None else ()), *((k_scale, v_scale) if fp8 else ()))
    _check(len({t.device for t in tensors}) == 1, "all tensors must be on one device")
    ws_max, ws_sum = workspace.block_max[:, :num_ret], workspace.block_sum[:, :num_ret]
    kept, num_kept = workspace.kept[:, :num_ret], workspace.num_kept[:, :num_ret]
    last = plan.waves[-1].num_tiles if plan.waves else 0
    if batch == 0:
        return out, kept[:0], num_kept[:0]

    cfg = CONFIG
    keep_all = top_p >= 1.0
    native_scores = q_idx.dtype != torch.float32 and (index.dtype == q_idx.dtype or index.is_fp8)
    table = kv_tables[0]
    kv_tile = cfg["kv_tile"] if head_dim <= 128 else cfg["kv_tile"] // 2   # bound registers for wide heads
    lse_arg = lse if lse is not None else out
    lse_strides = lse.stride() if lse is not None else (0, 0)
    scale_args = (k_scale, v_scale) if fp8 else (seqused_k, seqused_k)
    s_row = plan.tiles.stride(1)
    chunk = min(triton.next_power_of_2(workspace.max_blocks), cfg["select_chunk"])
    for wave, wave_plan in zip(plan.waves, plan.tiles):
        if wave.num_tiles == 0:
            continue
        num_blocks = triton.cdiv(wave.max_seqlen_k, block_size)
        if not keep_all:
            blocks_per_prog = cfg["blocks_per_prog"]
            _score_kernel[(triton.cdiv(num_blocks, blocks_per_prog), wave.num_tiles, num_ret)](
                wave_plan, q_idx, index.kernel_base(), index.offsets, index_table.block_table, cu_seqlens_q,
                seqused_k, ws_max, ws_sum, dense_threshold, s_row, *q_idx.stride(),
                index_table.page_size, index_table.page_stride, index_table.token_stride,
                index_table.block_table.stride(0), *ws_max.stride()[:2],
                TILE_Q=plan.tile_q, BLOCKS_PER_PROG=blocks_per_prog, BS=block_size,
                SUB=min(block_size, cfg["score_sub"]), DI=index_dim, DI_PAD=triton.next_power_of_2(index_dim),
                OFF_ALIGN=index.offset_align, NATIVE=native_scores,
                UPCAST_DOT=interpreting() and q_idx.dtype == torch.bfloat16, num_warps=cfg["score_warps"])
        _select_kernel[(wave.num_tiles, num_ret)](
            wave_plan, cu_seqlens_q, seqused_k, ws_max, ws_sum, kept, num_kept,
            float(top_p), dense_threshold, math.ceil(sink_tokens / block_size), workspace.max_blocks, s_row,
            *ws_max.stride()[:2], *kept.stride()[:2], *num_kept.stride(),
            TILE_Q=plan.tile_q, BS=block_size, KEEP_ALL=keep_all, CHUNK=chunk, SEARCH_BITS=cfg["search_bits"],
            num_warps=4 if chunk <= 1024 else 8)
        _attend_kernel[(wave.num_tiles, num_ret)](
            wave_plan, q, kv.kernel_base(), kv.offsets, table.block_table, cu_seqlens_q, seqused_k, heads, kept,
            num_kept, out, lse_arg, *scale_args, float(scale) * 1.4426950408889634,
            s_row, q.stride(0), q.stride(1), table.page_size, table.page_stride, table.token_stride,
            table.block_table.stride(0), *kept.stride()[:2], *num_kept.stride(), out.stride(0), out.stride(1),
            *lse_strides,
            G=num_heads // kv.num_heads, TILE_Q=plan.tile_q, BS=block_size, KV_TILE=kv_tile,
            D=head_dim, D_PAD=triton.next_power_of_2(head_dim), OFF_ALIGN=kv.offset_align,
            HAS_LSE=lse is not None, UPCAST_DOT=interpreting() and q.dtype == torch.bfloat16, FP8=fp8,
            num_warps=8 if plan.tile_q >= 128 else 4, num_stages=cfg["stages"])
    return out, kept[:last], num_kept[:last]
