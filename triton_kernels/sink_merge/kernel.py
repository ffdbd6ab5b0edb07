"""Sink merge in Triton: one pass over the windowed output, sinks merged by online log-sum-exp.

Grid ``(cdiv(T, BLOCK_T), HQ)``: a program loads ``BLOCK_T`` query rows of one head, their window
output and LSE, folds in each sink key the row may see (``j <= i - window``) with the online-softmax
update in float32, and writes the rows that gained a sink. Each row's sequence, position and the sink
pages come from ``token_seqs``, ``cu_seqlens_q``, ``seqused_k`` and the block table on the device: no
host sync, one read of ``query``/``out``/``lse`` and one write of ``out`` (the PyTorch version it
replaces made about fifteen float32 passes over ``[T, HQ, D]``). Equals :func:`.reference.merge_sinks_ref`
up to float32 summation order. One compiled variant serves every step and every run of heads: the token
count (also the LSE's head stride), the GQA group and the block table's row stride are not specialised
on, nor the alignment of the per-sequence index arrays (views of vLLM's buffers offset by the decode
count).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_T = 32


@triton.jit(do_not_specialize=["num_tokens", "group", "sbt_b", "sl_h"],
            do_not_specialize_on_alignment=["cu_ptr", "used_ptr", "seq_ptr", "bt_ptr"])
def _merge_sinks_kernel(q_ptr, k_ptr, v_ptr, cu_ptr, used_ptr, seq_ptr, bt_ptr, out_ptr, lse_ptr,
                        num_tokens, group, page_size, window, scale, k_scale_ptr, v_scale_ptr,
                        sq_t, sq_h, sk_n, sk_p, sk_h, sv_n, sv_p, sv_h, sbt_b, so_t, so_h, sl_h, sl_t,
                        NUM_SINKS: tl.constexpr, HEAD_DIM: tl.constexpr, SCALED: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    head = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < num_tokens
    seq = tl.load(seq_ptr + rows, mask=row_ok, other=0).to(tl.int32)     # int32 or int64 in memory
    pos = rows - tl.load(cu_ptr + seq + 1, mask=row_ok, other=0) + tl.load(used_ptr + seq, mask=row_ok, other=0)
    last = tl.where(row_ok, pos - window, -1)              # the last sink a row may see
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    tile = row_ok[:, None] & dim_ok[None, :]
    rows64 = rows.to(tl.int64)
    q = tl.load(q_ptr + rows64[:, None] * sq_t + head * sq_h + dims[None, :], mask=tile, other=0.0).to(tl.float32)
    out_ptrs = out_ptr + rows64[:, None] * so_t + head * so_h + dims[None, :]
    acc = tl.load(out_ptrs, mask=tile, other=0.0).to(tl.float32)
    m = tl.load(lse_ptr + head * sl_h + rows64 * sl_t, mask=row_ok, other=float("-inf"))
    denom = tl.full([BLOCK_T], 1.0, tl.float32)
    kv_head = head // group
    k_scale, v_scale = 1.0, 1.0
    if SCALED:
        k_scale = tl.load(k_scale_ptr)
        v_scale = tl.load(v_scale_ptr)
    for s in tl.static_range(NUM_SINKS):
        seen = last >= s
        load_ok = seen[:, None] & dim_ok[None, :]
        page = tl.load(bt_ptr + seq.to(tl.int64)[:, None] * sbt_b + s // page_size,
                       mask=seen[:, None], other=0).to(tl.int64)                 # [BLOCK_T, 1]
        offset = s % page_size
        k = tl.load(k_ptr + page * sk_n + offset * sk_p + kv_head * sk_h + dims[None, :],
                    mask=load_ok, other=0.0).to(tl.float32) * k_scale
        score = tl.where(seen, tl.sum(q * k, axis=1) * scale, float("-inf"))
        m_new = tl.maximum(m, score)
        alpha = tl.where(m_new == float("-inf"), 1.0, tl.exp(m - m_new))
        p = tl.where(seen, tl.exp(score - m_new), 0.0)
        v = tl.load(v_ptr + page * sv_n + offset * sv_p + kv_head * sv_h + dims[None, :],
                    mask=load_ok, other=0.0).to(tl.float32) * v_scale
        acc = acc * alpha[:, None] + p[:, None] * v
        denom = denom * alpha + p
        m = m_new
    tl.store(out_ptrs, (acc / denom[:, None]).to(out_ptr.dtype.element_ty),
             mask=(last >= 0)[:, None] & dim_ok[None, :])      # rows that saw no sink stay as they are


def merge_sinks(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                cu_seqlens_q: torch.Tensor, seqused_k: torch.Tensor, block_table: torch.Tensor,
                token_seqs: torch.Tensor, sink_tokens: int, window: int, scale: float,
                out: torch.Tensor, lse: torch.Tensor, k_scale: torch.Tensor | None = None,
                v_scale: torch.Tensor | None = None) -> None:
    """Triton version of :func:`.reference.merge_sinks_ref` (same arguments and semantics).

    Shapes and dtypes as there; additionally ``query`` and ``out`` need a contiguous last dimension,
    ``key_cache``/``value_cache`` a contiguous last dimension (other strides free), ``block_table``
    a contiguous last dimension, and ``cu_seqlens_q``/``seqused_k``/``token_seqs`` must be contiguous.
    """
    num_tokens, num_heads, head_size = query.shape
    num_kv_heads = key_cache.shape[2]
    if num_heads % num_kv_heads or out.shape != query.shape or lse.shape != (num_heads, num_tokens):
        raise ValueError(f"bad shapes: query {tuple(query.shape)}, cache {tuple(key_cache.shape)}, "
                         f"out {tuple(out.shape)}, lse {tuple(lse.shape)}")
    for name, x in (("query", query), ("out", out), ("key_cache", key_cache), ("value_cache", value_cache),
                    ("block_table", block_table)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension, got strides {x.stride()}")
    if (k_scale is None) != (v_scale is None):
        raise ValueError("pass both k_scale and v_scale (an fp8 cache's) or neither")
    if num_tokens == 0 or sink_tokens <= 0:
        return
    grid = (triton.cdiv(num_tokens, BLOCK_T), num_heads)
    _merge_sinks_kernel[grid](
        query, key_cache, value_cache, cu_seqlens_q, seqused_k, token_seqs, block_table, out, lse,
        num_tokens, num_heads // num_kv_heads, key_cache.shape[1], window, scale,
        lse if k_scale is None else k_scale, lse if v_scale is None else v_scale,
        query.stride(0), query.stride(1), *key_cache.stride()[:3], *value_cache.stride()[:3],
        block_table.stride(0), out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        NUM_SINKS=sink_tokens, SCALED=k_scale is not None, HEAD_DIM=head_size, BLOCK_T=BLOCK_T,
        BLOCK_D=triton.next_power_of_2(head_size))
