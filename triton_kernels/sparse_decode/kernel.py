"""Head-wise sparse decode over vLLM's paged KV cache: split-KV Triton kernels plus an LSE combine.

One decode query per sequence (already written to the cache). Each query head attends to a set of
the sequence's ``L = seq_lens[b]`` tokens:

- a *local* head to the sinks and the sliding window: token ``t < L`` with ``L-1 - t < window`` or
  ``t < sink_tokens``;
- a *retrieval* head ``r`` (query head ``retrieval_heads[r]``) to the tokens of its selected BS-token
  blocks ``selected[b, r, :num_selected[b, r]]`` (tokens ``>= L`` dropped).

The softmax is renormalised over the kept tokens; a head that keeps nothing gets output 0 and LSE
``-inf`` (as :func:`sparse_decode_ref`). Query head ``h`` reads KV head ``h // (HQ // HKV)``.

Parallelisation (flash-decoding). Each head's kept tokens form a *virtual* token list, of length
``n = min(sink, ws) + L - ws`` (``ws = max(L - window, 0)``) for local heads and
``num_selected * BS`` for retrieval heads. It is cut into at most S splits of
``chunk = roundup(cdiv(n, S), TILE)`` tokens, computed on the device from ``seq_lens`` /
``num_selected``. S depends only on the batch size and the workspace (:meth:`SparseDecodeWorkspace.
splits_for_batch`: small batches get more splits per sequence from the same workspace), so launch
grids depend only on shapes: the op is CUDA-graph safe and never syncs with the host. Its compiled
variants differ only in S (the block tables' row strides are not specialised on). Two launches:

1. ``_split_kernel``, grid ``(B, units, S)``, one program per (sequence, head unit, split), units
   ``HR + HKV`` in all (retrieval units first):
   - a retrieval unit ``r < HR`` follows its own block list (a tile may span several blocks; each
     token's page comes from the block table); its single query row is padded to the 16-row minimum
     of ``tl.dot``;
   - a KV-group unit takes the G query heads of the group together (one ``[G, D] x [D, TILE]`` dot
     per tile, so K/V are loaded once for the group); rows of retrieval heads are computed but not
     stored, and a group without local heads does nothing.
   Without a ``select`` step, one launch covers every unit, so both kinds share the machine (back to
   back, batch 1 leaves it idle). With one (the caller's block top-p, which fills ``selected``), the
   KV-group units run on ``side_stream`` when given while ``select`` and then the retrieval units run
   on the current stream: the local heads' window, most of the bytes a step reads, no longer waits for
   the latency-bound selection. They launch after ``select``: launched before it, their programs
   filled the GPU ahead of the block stats (slower). The current stream waits for the side stream
   before the combine (a fork and join that CUDA-graph capture records as parallel branches).
2. ``_combine_kernel``, grid ``(B, HQ, D / 32)``: merges the valid splits' ``(out, lse)`` into ``out``.

K/V addressing (:mod:`..paged_heads`): the layer's KV heads are a :class:`PagedHeads` of width
``2D`` (K at ``[0, D)``, V at ``[D, 2D)`` of each vector), possibly scattered over several unit
tensors. Every program addresses its KV head ``g`` as ``base + offsets[g]`` (int64 element offset of
the head's unit and slot from the one ``base`` pointer) plus ``page * page_stride + (t % P) *
token_stride``, with the page from the block table of the head's kind (``kinds[g]``: 0 full, 1 window;
per-kind block table, page size and strides are launch arguments, selected per program at run time).
Retrieval units always read kind-0 heads through the kind-0 table; a KV-group unit reads its KV
head's kind. Local units only ever enumerate sink and window tokens, so a window kind's pages outside
them (vLLM's null block) are never read.

FP8 units (float8_e4m3fn, stored by vLLM as uint8) are loaded as fp8 and the dots run in fp16 (the
values converted exactly, the query saturated to fp16's range: :mod:`..fp8`); ``k_scale`` is folded
into the softmax scale and ``v_scale`` into each split's output.

Splits past a head's work return without writing; the combine merges only the valid ones (it loads a
head's first 32 slots before it knows how many are, and drops the rest). The KV-group units cut their
tokens into ``S_local <= S`` splits (:func:`local_splits_for`,
``CONFIG["local_programs_per_sm"]``; their forked launch has ``S_local`` programs per sequence and KV head), the
retrieval units into ``S``. Work per program is bounded by ``roundup(cdiv(max n, S_local or S), TILE)``
tokens. Page offsets are int64.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..fp8 import fp16_dot_operand, fp16_dot_query, fp16_dot_values
from ..launch import interpreting, pdl_launch, wait_for_previous_kernel
from ..online_softmax import online_softmax_step, tile_scores
from ..paged_heads import PagedHeads, PageTable

DEFAULT_SPLITS_PER_SEQ = 32
"""Default workspace slots per sequence of ``max_batch`` (``S`` at full batch)."""
DEFAULT_MAX_SPLITS = 64
"""Default cap on ``S`` when a small batch could use more of the workspace."""

# Launch configuration; module-level so a benchmark can sweep it (values are read at each launch).
# local_programs_per_sm: the most programs the KV-group units' splits launch per SM of the GPU,
# B * HKV * S_local <= local_programs_per_sm * SMs (S_local a power of two, at least 1, at most the
# retrieval units' S); 0: no bound, S_local = S. Fewer, longer programs that all fit on the GPU at once
# leave room for the selection chain beside them and spend less of their time starting up.
CONFIG = {"tile_local": 128, "tile_retrieval": 128, "warps": 4, "stages": 2, "warps_combine": 2,
          "local_programs_per_sm": 2}
NOMINAL_SMS = 132
"""SMs assumed off the GPU (an H100's or H200's), so that the interpreter cuts the work as those cards do."""


@dataclass(frozen=True)
class SparseDecodeWorkspace:
    """Split-KV scratch of :func:`headwise_sparse_decode`; allocate once, reuse for every layer.

    Attributes:
        partial_out: ``[num_slots, HQ, D]`` float32, per-split normalised outputs; sequence ``b`` of a
            batch of B with S splits uses slots ``b * S + split``.
        partial_lse: ``[num_slots, HQ]`` float32, per-split natural-log LSEs.
        max_splits: cap on S.
    """

    partial_out: torch.Tensor
    partial_lse: torch.Tensor
    max_splits: int = DEFAULT_MAX_SPLITS

    @property
    def num_slots(self) -> int:
        return self.partial_lse.shape[0]

    def splits_for_batch(self, batch: int) -> int:
        """S for a batch of ``batch`` sequences: the largest power of two with ``batch * S`` slots,
        capped at ``max_splits`` (a function of shapes only, hence fixed within a CUDA graph)."""
        per_seq = min(self.num_slots // max(batch, 1), self.max_splits)
        if per_seq < 1:
            raise ValueError(f"workspace has {self.num_slots} slots, too few for {batch} sequences; "
                             f"allocate it with max_batch >= {batch}")
        return 1 << (per_seq.bit_length() - 1)


def allocate_sparse_decode_workspace(max_batch: int, num_heads: int, head_dim: int,
                                     splits_per_seq: int = DEFAULT_SPLITS_PER_SEQ,
                                     max_splits: int = DEFAULT_MAX_SPLITS,
                                     device: torch.device | str | None = None) -> SparseDecodeWorkspace:
    """Scratch for up to ``max_batch`` decode sequences of ``num_heads`` query heads.

    It holds ``max_batch * splits_per_seq`` split slots (``* HQ * (D + 1) * 4`` bytes). A batch of B
    sequences cuts each head's kept tokens into ``S = min(max_splits, pow2floor(slots / B))``
    splits, so a program handles at most ``cdiv(max kept tokens, S)`` tokens (rounded up to a
    128-token tile); small batches get more splits, hence more parallelism, from the same memory.
    """
    if min(max_batch, num_heads, head_dim, splits_per_seq, max_splits) < 1:
        raise ValueError(f"need positive sizes, got max_batch={max_batch}, num_heads={num_heads}, "
                         f"head_dim={head_dim}, splits_per_seq={splits_per_seq}, max_splits={max_splits}")
    slots = max_batch * splits_per_seq
    partial_out = torch.empty(slots, num_heads, head_dim, dtype=torch.float32, device=device)
    partial_lse = torch.empty(slots, num_heads, dtype=torch.float32, device=device)
    return SparseDecodeWorkspace(partial_out, partial_lse, max_splits)


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (:data:`NOMINAL_SMS` off CUDA)."""
    if device.type != "cuda":
        return NOMINAL_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def local_splits_for(batch: int, num_kv_heads: int, num_splits: int, num_sms: int) -> int:
    """S_local, the splits per (sequence, KV head) of the KV-group units: ``num_splits`` (S) unless
    ``CONFIG["local_programs_per_sm"] * num_sms`` bounds ``batch * num_kv_heads * S_local`` (a power of
    two, >= 1)."""
    cap = CONFIG["local_programs_per_sm"] * num_sms
    if cap <= 0:
        return num_splits
    per_unit = max(cap // max(batch * num_kv_heads, 1), 1)
    return min(num_splits, 1 << (per_unit.bit_length() - 1))


# ----------------------------------------------------------------------------------------------------
# Shared device helpers: the combine must cut work exactly as the split kernels do.


@triton.jit
def _split_chunk(n_virtual, num_splits, TILE: tl.constexpr):
    """Tokens per split: ``cdiv(n, num_splits)`` rounded up to a whole tile (at least one tile)."""
    chunk = tl.cdiv(tl.cdiv(n_virtual, num_splits), TILE) * TILE
    return tl.maximum(chunk, TILE)


@triton.jit
def _local_span(seq_len, sink_tokens, window, dense_threshold):
    """Window start ``ws``, sinks before it ``n_sink`` and kept-token count of a local head.

    Virtual token ``i`` is token ``i`` if ``i < n_sink``, else ``ws + i - n_sink``. A sequence shorter
    than ``dense_threshold`` is dense: its window covers every token.
    """
    ws = tl.where(seq_len < dense_threshold, 0, tl.maximum(seq_len - window, 0))
    n_sink = tl.minimum(sink_tokens, ws)
    return ws, n_sink, n_sink + seq_len - ws


@triton.jit
def _is_retrieval(h, ret_ptr, HR, HR_PAD: tl.constexpr):
    """``[len(h)]`` bool: which query heads ``h`` are retrieval heads."""
    r_idx = tl.arange(0, HR_PAD)
    heads = tl.load(ret_ptr + r_idx, mask=r_idx < HR, other=-1)
    return tl.max((h[:, None] == heads[None, :]).to(tl.int32), 1) > 0


@triton.jit
def _attend_split(q, kv_ptr, head_off, bt_row, sel_row, start, end, seq_len, ws, n_sink,
                  page_size, page_stride, token_stride,
                  ROWS: tl.constexpr, RETRIEVAL: tl.constexpr, BS: tl.constexpr,
                  D: tl.constexpr, D_PAD: tl.constexpr, TILE: tl.constexpr,
                  qk_scale, UPCAST_DOT: tl.constexpr, FP8: tl.constexpr):
    """Online softmax of the ``[ROWS, D_PAD]`` queries over virtual tokens ``[start, end)`` of the KV
    head at ``kv_ptr + head_off`` (K at ``[0, D)``, V at ``[D, 2D)``), paged by ``bt_row``.

    Returns un-normalised ``acc [ROWS, D_PAD]``, ``l [ROWS]`` and the base-2 running max ``m [ROWS]``.
    FP8 K/V are dotted in fp16 (:mod:`..fp8`); their scales live in ``qk_scale`` and the caller's output
    factor.
    """
    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < D
    offs_t = tl.arange(0, TILE)
    if FP8:
        q = fp16_dot_query(q)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D_PAD], tl.float32)
    for off in range(start, end, TILE):
        vi = off + offs_t
        valid = vi < end
        if RETRIEVAL:
            blk = tl.load(sel_row + vi // BS, mask=valid, other=-1)
            tok = blk * BS + vi % BS
            valid = valid & (blk >= 0) & (tok < seq_len)
        else:
            tok = tl.where(vi < n_sink, vi, ws + vi - n_sink)
        page = tl.load(bt_row + tok // page_size, mask=valid, other=0).to(tl.int64)
        row = head_off + page * page_stride + (tok % page_size).to(tl.int64) * token_stride      # [TILE]
        mask = valid[:, None] & mask_d[None, :]
        k = tl.load(kv_ptr + row[:, None] + offs_d[None, :], mask=mask, other=0.0)             # [TILE, D_PAD]
        v = tl.load(kv_ptr + row[:, None] + D + offs_d[None, :], mask=mask, other=0.0)         # [TILE, D_PAD]
        if FP8:
            k = fp16_dot_operand(k)
            v = fp16_dot_values(v, mask)
        s = tl.where(valid[None, :], tile_scores(q, k, UPCAST_DOT) * qk_scale, float("-inf"))   # [ROWS, TILE]
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, s, v, UPCAST_DOT)
    return acc, l_i, m_i


@triton.jit
def _store_partial(po_ptr, pl_ptr, slot, h, acc, l_i, m_i, mask_h, out_scale, s_pos, s_poh, s_pls, s_plh,
                   D: tl.constexpr, D_PAD: tl.constexpr):
    """Stores one split's normalised output (times ``out_scale``) and natural-log LSE (0 and -inf where
    nothing is kept)."""
    offs_d = tl.arange(0, D_PAD)
    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    lse = tl.where(has, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    po = po_ptr + slot * s_pos + h[:, None] * s_poh + offs_d[None, :]
    tl.store(po, acc * (out_scale / l_safe)[:, None], mask=mask_h[:, None] & (offs_d < D)[None, :])
    tl.store(pl_ptr + slot * s_pls + h * s_plh, lse, mask=mask_h)


# ----------------------------------------------------------------------------------------------------
# Kernels.


@triton.jit
def _local_split(
    b, kvh, split, q_ptr, kv_ptr, off_ptr, kind_ptr, bt0_ptr, bt1_ptr, seq_lens_ptr, ret_ptr, po_ptr, pl_ptr,
    sink_tokens, window, dense_threshold, qk_scale, out_scale, HR, local_splits,
    s_qb, s_qh, page0, page_stride0, token_stride0, s_bt0, page1, page_stride1, token_stride1, s_bt1,
    s_pos, s_poh, s_pls, s_plh,
    G: tl.constexpr, ROWS: tl.constexpr, HR_PAD: tl.constexpr, HAS_RET: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, TILE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    OFF_ALIGN: tl.constexpr, UPCAST_DOT: tl.constexpr, FP8: tl.constexpr,
):
    """Split ``split`` (of ``local_splits <= NUM_SPLITS``) of the local query heads of KV group ``kvh`` (all
    G rows in one dot), reading the KV head through its kind's block table and geometry (only sink and
    window tokens)."""
    seq_len = tl.load(seq_lens_ptr + b)
    ws, n_sink, n_virtual = _local_span(seq_len, sink_tokens, window, dense_threshold)
    chunk = _split_chunk(n_virtual, local_splits, TILE)
    start = split * chunk
    offs_g = tl.arange(0, ROWS)
    h = kvh * G + offs_g
    mask_h = offs_g < G
    if HAS_RET:
        mask_h = mask_h & (_is_retrieval(h, ret_ptr, HR, HR_PAD) == 0)
    # Nothing to do past the head's tokens or in a group of retrieval heads only.
    if (start < n_virtual) & (tl.max(mask_h.to(tl.int32), 0) > 0):
        offs_d = tl.arange(0, D_PAD)
        q = tl.load(q_ptr + b * s_qb + h[:, None] * s_qh + offs_d[None, :],
                    mask=mask_h[:, None] & (offs_d < D)[None, :], other=0.0)           # [ROWS, D_PAD]
        end = tl.minimum(start + chunk, n_virtual)
        head_off = tl.multiple_of(tl.load(off_ptr + kvh), OFF_ALIGN)
        kind = tl.load(kind_ptr + kvh)
        if kind == 0:
            bt_row = bt0_ptr + b * s_bt0
        else:
            bt_row = bt1_ptr + b * s_bt1
        page_size = tl.where(kind == 0, page0, page1)
        page_stride = tl.where(kind == 0, page_stride0, page_stride1).to(tl.int64)
        token_stride = tl.where(kind == 0, token_stride0, token_stride1).to(tl.int64)
        acc, l_i, m_i = _attend_split(q, kv_ptr, head_off, bt_row, bt_row, start, end, seq_len, ws, n_sink,
                                      page_size, page_stride, token_stride,
                                      ROWS, False, 1, D, D_PAD, TILE, qk_scale, UPCAST_DOT, FP8)
        _store_partial(po_ptr, pl_ptr, b * NUM_SPLITS + split, h, acc, l_i, m_i, mask_h, out_scale,
                       s_pos, s_poh, s_pls, s_plh, D, D_PAD)


@triton.jit
def _retrieval_split(
    b, r, split, q_ptr, kv_ptr, off_ptr, bt0_ptr, seq_lens_ptr, ret_ptr, sel_ptr, nsel_ptr, po_ptr, pl_ptr,
    qk_scale, out_scale, max_blocks,
    s_qb, s_qh, page0, page_stride0, token_stride0, s_bt0, s_sb, s_sr, s_nb, s_nr,
    s_pos, s_poh, s_pls, s_plh,
    G: tl.constexpr, ROWS: tl.constexpr, BS: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, TILE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    OFF_ALIGN: tl.constexpr, UPCAST_DOT: tl.constexpr, FP8: tl.constexpr,
):
    """Split ``split`` of retrieval head ``r`` (its one query row padded to ROWS for tl.dot); its KV
    head ``h // G`` is a kind-0 (full) head, read through the kind-0 block table."""
    n_sel = tl.load(nsel_ptr + b * s_nb + r * s_nr)
    n_virtual = tl.minimum(tl.maximum(n_sel, 0), max_blocks) * BS
    chunk = _split_chunk(n_virtual, NUM_SPLITS, TILE)
    start = split * chunk
    if start < n_virtual:
        seq_len = tl.load(seq_lens_ptr + b)
        h = tl.load(ret_ptr + r)
        offs_row = tl.arange(0, ROWS)
        mask_h = offs_row == 0
        offs_d = tl.arange(0, D_PAD)
        q = tl.load(q_ptr + b * s_qb + h * s_qh + offs_row[:, None] * 0 + offs_d[None, :],
                    mask=mask_h[:, None] & (offs_d < D)[None, :], other=0.0)           # [ROWS, D_PAD]
        end = tl.minimum(start + chunk, n_virtual)
        head_off = tl.multiple_of(tl.load(off_ptr + h // G), OFF_ALIGN)
        acc, l_i, m_i = _attend_split(q, kv_ptr, head_off, bt0_ptr + b * s_bt0, sel_ptr + b * s_sb + r * s_sr,
                                      start, end, seq_len, 0, 0, page0, page_stride0.to(tl.int64),
                                      token_stride0.to(tl.int64),
                                      ROWS, True, BS, D, D_PAD, TILE, qk_scale, UPCAST_DOT, FP8)
        _store_partial(po_ptr, pl_ptr, b * NUM_SPLITS + split, h + offs_row, acc, l_i, m_i, mask_h, out_scale,
                       s_pos, s_poh, s_pls, s_plh, D, D_PAD)


@triton.jit(do_not_specialize=["s_bt0", "s_bt1", "first_unit", "local_splits"])
def _split_kernel(
    q_ptr, kv_ptr, off_ptr, kind_ptr, bt0_ptr, bt1_ptr, seq_lens_ptr, ret_ptr, sel_ptr, nsel_ptr,
    po_ptr, pl_ptr, k_scale_ptr, v_scale_ptr, sink_tokens, window, dense_threshold, qk_scale, max_blocks, HR,
    first_unit, local_splits,
    s_qb, s_qh, page0, page_stride0, token_stride0, s_bt0, page1, page_stride1, token_stride1, s_bt1,
    s_sb, s_sr, s_nb, s_nr, s_pos, s_poh, s_pls, s_plh,
    G: tl.constexpr, ROWS: tl.constexpr, HR_PAD: tl.constexpr, HAS_RET: tl.constexpr,
    BS: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    TILE_LOCAL: tl.constexpr, TILE_RET: tl.constexpr, NUM_SPLITS: tl.constexpr, OFF_ALIGN: tl.constexpr,
    UPCAST_DOT: tl.constexpr, FP8: tl.constexpr, PDL: tl.constexpr,
):
    """Grid ``(B, units, S)``: units ``first_unit ..`` of the ``HR`` retrieval units (their splits run
    longest) followed by the ``HKV`` KV-group units."""
    wait_for_previous_kernel(PDL)
    b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1) + first_unit
    split = tl.program_id(2)
    out_scale = 1.0
    if FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr)
        out_scale = tl.load(v_scale_ptr)
    if head < HR:
        _retrieval_split(b, head, split, q_ptr, kv_ptr, off_ptr, bt0_ptr, seq_lens_ptr, ret_ptr, sel_ptr,
                         nsel_ptr, po_ptr, pl_ptr, qk_scale, out_scale, max_blocks,
                         s_qb, s_qh, page0, page_stride0, token_stride0, s_bt0, s_sb, s_sr, s_nb, s_nr,
                         s_pos, s_poh, s_pls, s_plh,
                         G, ROWS, BS, D, D_PAD, TILE_RET, NUM_SPLITS, OFF_ALIGN, UPCAST_DOT, FP8)
    else:
        _local_split(b, head - HR, split, q_ptr, kv_ptr, off_ptr, kind_ptr, bt0_ptr, bt1_ptr, seq_lens_ptr,
                     ret_ptr, po_ptr, pl_ptr, sink_tokens, window, dense_threshold, qk_scale, out_scale, HR,
                     local_splits, s_qb, s_qh, page0, page_stride0, token_stride0, s_bt0, page1, page_stride1,
                     token_stride1, s_bt1, s_pos, s_poh, s_pls, s_plh,
                     G, ROWS, HR_PAD, HAS_RET, D, D_PAD, TILE_LOCAL, NUM_SPLITS, OFF_ALIGN, UPCAST_DOT, FP8)


@triton.jit
def _merge_splits(m, den, acc, lse, po):
    """Folds splits (``lse [SPLIT_BLOCK]``, natural log, ``-inf`` for none; ``po [SPLIT_BLOCK, D_BLOCK]``
    normalised outputs) into the running max ``m``, denominator ``den`` and un-normalised ``acc``."""
    m_new = tl.maximum(m, tl.max(lse, 0))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_ref)
    w = tl.exp(lse - m_ref)                                                            # 0 where -inf
    return m_new, den * alpha + tl.sum(w, 0), acc * alpha + tl.sum(w[:, None] * po, 0)


@triton.jit(do_not_specialize=["local_splits"])
def _combine_kernel(
    po_ptr, pl_ptr, out_ptr, lse_ptr, seq_lens_ptr, ret_ptr, nsel_ptr,
    sink_tokens, window, dense_threshold, max_blocks, HR, local_splits,
    s_pos, s_poh, s_pls, s_plh, s_ob, s_oh, s_lb, s_lh, s_nb, s_nr,
    BS: tl.constexpr, HR_PAD: tl.constexpr, HAS_RET: tl.constexpr, HAS_LSE: tl.constexpr,
    D: tl.constexpr, D_BLOCK: tl.constexpr, TILE_LOCAL: tl.constexpr, TILE_RET: tl.constexpr,
    NUM_SPLITS: tl.constexpr, SPLIT_BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    """Grid ``(B, HQ, cdiv(D, D_BLOCK))``: merges one head's splits over a slice of D."""
    wait_for_previous_kernel(PDL)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    d0 = tl.program_id(2) * D_BLOCK

    offs_s = tl.arange(0, SPLIT_BLOCK)
    offs_d = d0 + tl.arange(0, D_BLOCK)
    mask_d = offs_d < D
    base = b * NUM_SPLITS
    # The first SPLIT_BLOCK splits' partials (SPLIT_BLOCK <= NUM_SPLITS: always in the workspace), loaded
    # before the head's split count, which takes a load of its own (two for a retrieval head), is known.
    first_lse = tl.load(pl_ptr + (base + offs_s) * s_pls + h * s_plh)
    first_po = tl.load(po_ptr + (base + offs_s)[:, None] * s_pos + h * s_poh + offs_d[None, :],
                       mask=mask_d[None, :], other=0.0)                                    # [SPLIT_BLOCK, D_BLOCK]

    seq_len = tl.load(seq_lens_ptr + b)
    _, _, n_virtual = _local_span(seq_len, sink_tokens, window, dense_threshold)
    n_splits = tl.cdiv(n_virtual, _split_chunk(n_virtual, local_splits, TILE_LOCAL))
    if HAS_RET:
        r_idx = tl.arange(0, HR_PAD)
        hit = tl.load(ret_ptr + r_idx, mask=r_idx < HR, other=-1) == h
        is_ret = tl.max(hit.to(tl.int32), 0) > 0
        slot = tl.max(tl.where(hit, r_idx, 0), 0)
        n_sel = tl.load(nsel_ptr + b * s_nb + slot * s_nr, mask=is_ret, other=0)
        n_ret = tl.minimum(tl.maximum(n_sel, 0), max_blocks) * BS
        n_splits = tl.where(is_ret, tl.cdiv(n_ret, _split_chunk(n_ret, NUM_SPLITS, TILE_RET)), n_splits)

    # Splits past the count hold what an earlier step left there: dropped, not weighted by 0.
    first_valid = offs_s < n_splits
    m, den, acc = _merge_splits(float("-inf"), 0.0, tl.zeros([D_BLOCK], tl.float32),
                                tl.where(first_valid, first_lse, float("-inf")),
                                tl.where(first_valid[:, None], first_po, 0.0))
    for s0 in range(SPLIT_BLOCK, n_splits, SPLIT_BLOCK):
        mask_s = s0 + offs_s < n_splits
        slots = base + s0 + offs_s
        lse = tl.load(pl_ptr + slots * s_pls + h * s_plh, mask=mask_s, other=float("-inf"))
        po = tl.load(po_ptr + slots[:, None] * s_pos + h * s_poh + offs_d[None, :],
                     mask=mask_s[:, None] & mask_d[None, :], other=0.0)                # [SPLIT_BLOCK, D_BLOCK]
        m, den, acc = _merge_splits(m, den, acc, lse, po)
    has = den > 0.0
    den_safe = tl.where(has, den, 1.0)
    tl.store(out_ptr + b * s_ob + h * s_oh + offs_d, (acc / den_safe).to(out_ptr.dtype.element_ty), mask=mask_d)
    if HAS_LSE & (d0 == 0):
        tl.store(lse_ptr + b * s_lb + h * s_lh, tl.where(has, m + tl.log(den_safe), float("-inf")))


# ----------------------------------------------------------------------------------------------------
# Launcher.


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def headwise_sparse_decode(q: torch.Tensor, kv: PagedHeads, kv_tables: Sequence[PageTable], seq_lens: torch.Tensor,
                           retrieval_heads: torch.Tensor, selected: torch.Tensor,
                           num_selected: torch.Tensor, block_size: int, sink_tokens: int, window: int,
                           scale: float, workspace: SparseDecodeWorkspace, out: torch.Tensor,
                           lse: torch.Tensor | None = None, dense_threshold: int = 0,
                           k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                           select: Callable[[], object] | None = None,
                           side_stream: torch.cuda.Stream | None = None) -> torch.Tensor:
    """Head-wise sparse decode attention of one layer for B decode sequences (one new token each).

    Only shapes, dtypes and devices are checked (no host sync); values are trusted. Launch shapes
    depend only on tensor shapes, so the call can be captured in a CUDA graph and replayed with new
    ``seq_lens`` / block tables / ``selected`` / ``num_selected`` / cache contents.

    Args:
        q: ``[B, HQ, D]`` bf16/fp16 (any strides with a unit last stride), the decode queries.
        kv: the layer's K|V layout: ``HKV`` heads of width ``2D`` (K at ``[0, D)``, V at ``[D, 2D)``),
            ``HQ % HKV == 0``, kinds 0 (full) and/or 1 (window). Units in ``q``'s dtype, or fp8
            (uint8 bytes / float8_e4m3fn, with ``k_scale``/``v_scale``). The KV heads of retrieval
            heads must be kind 0; a local head reads its KV head's kind.
        kv_tables: per kind the heads use, its :class:`PageTable` for this batch (``[B, max_pages]``
            int32 block table; entries past a sequence's tokens are never read, and a window-kind
            table's pages outside the sinks and the window are never read either).
        seq_lens: ``[B]`` int32, tokens per sequence including the decode token (0: padding entry,
            its output is 0).
        retrieval_heads: ``[HR]`` int32, the query heads that are retrieval heads (unique, in
            ``[0, HQ)``); every other head is local. ``HR`` may be 0.
        selected: ``[B, HR, max_blocks]`` int32, ascending ids of the BS-token blocks each retrieval
            head keeps, -1 padded; only the first ``num_selected`` entries are read.
        num_selected: ``[B, HR]`` int32, valid entries of ``selected`` (clamped to ``[0, max_blocks]``).
        block_size: BS, tokens per selection block (any ``>= 1``; page sizes and BS need not divide
            each other).
        sink_tokens: leading tokens local heads always see (``>= 0``).
        window: local heads see tokens less than ``window`` positions before the decode token (``>= 1``).
        scale: softmax scale.
        workspace: from :func:`allocate_sparse_decode_workspace` for ``HQ`` heads of dim ``D`` with
            ``max_batch >= B``; overwritten.
        out: ``[B, HQ, D]`` (unit last stride), written in place in its own dtype.
        lse: optional ``[B, HQ]`` float32, written in place with each head's natural-log LSE
            (``-inf`` where a head keeps nothing).
        dense_threshold: a sequence with ``seq_len < dense_threshold`` is dense: its local heads see
            every token (its retrieval heads see what ``selected`` holds: every block, from block
            top-p with the same threshold; a window kind must then hold every token of such a
            sequence). 0: no sequence is dense.
        k_scale, v_scale: fp8 units only: 1-element float32 device tensors (vLLM's ``layer._k_scale``
            / ``_v_scale``); a stored value means ``fp8 * scale``. Ignored for bf16/fp16 units.
        select: optional step that fills ``selected`` and ``num_selected`` (the retrieval heads'
            block top-p), launched on the current stream before the KV-group units' splits and the
            retrieval units' (see the module docstring); ``None``: they are filled already.
        side_stream: with ``select``, the CUDA stream the KV-group units' splits run on, after the
            work queued so far on the current stream; the current stream waits for it before the
            combine. ``None``: everything runs on the current stream, in the same order.

    Returns:
        ``out``.
    """
    _check(q.dim() == 3, f"q must be [B, HQ, D], got shape {tuple(q.shape)}")
    batch, num_heads, head_dim = q.shape
    _check(isinstance(kv, PagedHeads), f"kv must be a PagedHeads, got {type(kv).__name__}")
    num_kv_heads = kv.num_heads
    _check(kv.width == 2 * head_dim, f"K|V vectors have width {kv.width}, expected 2 * D = {2 * head_dim}")
    _check(num_kv_heads > 0 and num_heads % num_kv_heads == 0,
           f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    _check(kv.num_kinds <= 2, f"K/V heads use kinds 0 (full) and 1 (window), got {kv.num_kinds} kinds")
    kv.check_tables(kv_tables, batch, "kv_tables")
    _check(q.dtype in (torch.bfloat16, torch.float16), f"q must be bf16 or fp16, got {q.dtype}")
    fp8 = kv.check_attention_dtypes(q.dtype, k_scale, v_scale)
    _check(out.shape == q.shape, f"out has shape {tuple(out.shape)}, expected {tuple(q.shape)}")
    for name, t in (("q", q), ("out", out)):
        _check(t.stride(-1) == 1, f"{name} needs a unit stride in its last dimension")
    _check(seq_lens.shape == (batch,) and seq_lens.dtype == torch.int32,
           f"seq_lens must be [B={batch}] int32, got {tuple(seq_lens.shape)} {seq_lens.dtype}")
    _check(retrieval_heads.dim() == 1 and retrieval_heads.dtype == torch.int32,
           f"retrieval_heads must be [HR] int32, got {tuple(retrieval_heads.shape)} {retrieval_heads.dtype}")
    num_ret = retrieval_heads.shape[0]
    _check(num_ret <= num_heads, f"{num_ret} retrieval heads for {num_heads} query heads")
    _check(num_ret == 0 or (kv.num_kinds > 0 and kv.geometry[0] is not None),
           "retrieval heads read kind-0 (full) KV heads, and this layout has none")
    _check(selected.dim() == 3 and selected.shape[:2] == (batch, num_ret) and selected.dtype == torch.int32,
           f"selected must be [B={batch}, HR={num_ret}, max_blocks] int32, got {tuple(selected.shape)} "
           f"{selected.dtype}")
    _check(num_selected.shape == (batch, num_ret) and num_selected.dtype == torch.int32,
           f"num_selected must be [B={batch}, HR={num_ret}] int32, got {tuple(num_selected.shape)} "
           f"{num_selected.dtype}")
    _check(block_size >= 1 and sink_tokens >= 0 and window >= 1,
           f"need block_size >= 1, sink_tokens >= 0, window >= 1; got {block_size}, {sink_tokens}, {window}")
    po, pl = workspace.partial_out, workspace.partial_lse
    _check(po.dtype == pl.dtype == torch.float32 and po.dim() == 3 and po.shape[1:] == (num_heads, head_dim)
           and pl.shape == po.shape[:2],
           f"workspace {tuple(po.shape)} does not fit HQ={num_heads}, D={head_dim}; "
           f"use allocate_sparse_decode_workspace")
    if lse is not None:
        _check(lse.shape == (batch, num_heads) and lse.dtype == torch.float32,
               f"lse must be [B={batch}, HQ={num_heads}] float32, got {tuple(lse.shape)} {lse.dtype}")
    tensors = (q, kv.base, seq_lens, retrieval_heads, selected, num_selected, po, pl, out,
               *((k_scale, v_scale) if fp8 else ()))
    _check(len({t.device for t in tensors}) == 1, "all tensors must be on one device")
    _check(side_stream is None or q.is_cuda, f"side_stream runs CUDA tensors only; these are on {q.device} "
                                              "(pass side_stream=None)")
    if batch == 0:
        if select is not None:
            select()
        return out
    num_splits = workspace.splits_for_batch(batch)   # raises if the workspace is too small

    cfg = CONFIG
    # The configured tiles are for D <= 128; halve them for wider heads to bound registers.
    tile_local = cfg["tile_local"] if head_dim <= 128 else cfg["tile_local"] // 2
    tile_ret = cfg["tile_retrieval"] if head_dim <= 128 else cfg["tile_retrieval"] // 2
    group = num_heads // num_kv_heads
    d_pad = triton.next_power_of_2(head_dim)
    hr_pad = max(triton.next_power_of_2(num_ret), 1)
    has_ret = num_ret > 0
    qk_scale = float(scale) * 1.4426950408889634   # exp2 domain
    max_blocks = selected.shape[2]
    upcast = interpreting() and q.dtype == torch.bfloat16
    # With HR == 0 these pointers are passed but never dereferenced.
    ret_arg = retrieval_heads if has_ret else seq_lens
    nsel_arg = num_selected if has_ret else seq_lens
    nsel_strides = num_selected.stride() if has_ret else (0, 0)
    # A kind no head uses gets another kind's (never read) table.
    used = [k for k, g in enumerate(kv.geometry) if g is not None]
    tables = [kv_tables[k] if k in used else kv_tables[used[0]] for k in range(2)]
    table_args = [a for t in tables for a in (t.page_size, t.page_stride, t.token_stride, t.block_table.stride(0))]
    part_strides = (po.stride(0), po.stride(1), pl.stride(0), pl.stride(1))
    sel_arg = selected if has_ret else seq_lens
    sel_strides = selected.stride()[:2] if has_ret else (0, 0)
    scale_args = (k_scale, v_scale) if fp8 else (pl, pl)
    pdl = pdl_launch(q.device)

    local_splits = local_splits_for(batch, num_kv_heads, num_splits, sm_count(q.device))

    def launch_splits(first_unit: int, num_units: int, splits: int) -> None:
        if num_units == 0:
            return
        _split_kernel[(batch, num_units, splits)](
            q, kv.kernel_base(), kv.offsets, kv.kinds, tables[0].block_table, tables[1].block_table, seq_lens,
            ret_arg, sel_arg, nsel_arg, po, pl, *scale_args,
            sink_tokens, window, dense_threshold, qk_scale, max_blocks, num_ret, first_unit, local_splits,
            q.stride(0), q.stride(1), *table_args, *sel_strides, *nsel_strides, *part_strides,
            G=group, ROWS=max(triton.next_power_of_2(group), 16), HR_PAD=hr_pad,
            HAS_RET=has_ret, BS=block_size, D=head_dim, D_PAD=d_pad,
            TILE_LOCAL=tile_local, TILE_RET=tile_ret, NUM_SPLITS=num_splits, OFF_ALIGN=kv.offset_align,
            UPCAST_DOT=upcast, FP8=fp8, PDL=pdl, num_warps=cfg["warps"], num_stages=cfg["stages"], launch_pdl=pdl,
        )

    if select is None:
        launch_splits(0, num_ret + num_kv_heads, num_splits)
    else:
        fork = side_stream is not None
        if fork:
            side_stream.wait_stream(torch.cuda.current_stream(q.device))   # the decode token's K/V is written
        select()
        with torch.cuda.stream(side_stream):         # a no-op for None: the current stream, in order
            launch_splits(num_ret, num_kv_heads, local_splits)
        launch_splits(0, num_ret, num_splits)
        if fork:
            torch.cuda.current_stream(q.device).wait_stream(side_stream)
    lse_arg = lse if lse is not None else pl
    lse_strides = lse.stride() if lse is not None else (0, 0)
    d_block = min(d_pad, 32)
    _combine_kernel[(batch, num_heads, triton.cdiv(head_dim, d_block))](
        po, pl, out, lse_arg, seq_lens, ret_arg, nsel_arg,
        sink_tokens, window, dense_threshold, max_blocks, num_ret, local_splits,
        *part_strides, out.stride(0), out.stride(1), *lse_strides, *nsel_strides,
        BS=block_size, HR_PAD=hr_pad, HAS_RET=has_ret, HAS_LSE=lse is not None,
        D=head_dim, D_BLOCK=d_block, TILE_LOCAL=tile_local, TILE_RET=tile_ret,
        NUM_SPLITS=num_splits, SPLIT_BLOCK=min(num_splits, 32), PDL=pdl, num_warps=cfg["warps_combine"],
        launch_pdl=pdl,
    )
    return out
