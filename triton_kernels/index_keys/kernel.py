"""Fused un-RoPE + 16-dim indexer projection (Triton), for keys into the paged index-key units and for queries.

vLLM hands the attention backend post-RoPE ``q [T, HQ, D]`` / ``k [T, HKV, D]`` and the token
``positions [T]``; the indexer needs the pre-RoPE vectors. One kernel, ``_index_vectors_kernel``, does
both projections; each program takes ``BLOCK_T`` tokens of one retrieval head ``r`` and, for the keys
(of all ``T`` tokens) and the queries (of the first ``TQ`` tokens) it is launched with,

1. loads the tokens' rows of the head it reads (query head ``heads[r]`` or KV head ``kv_heads[r]``) as the
   two rotary halves (NeoX: channels ``j`` and ``rotary_dim/2 + j``; GPT-J: ``2j`` and ``2j + 1``) plus the
   pass-through tail ``[rotary_dim, D)`` (partial rotary),
2. un-rotates the halves in float32 with the ``cos | sin`` rows of their positions, the exact inverse of
   vLLM's 2x2 rotation (transpose / (cos² + sin²), so YaRN's folded mscale is divided out),
3. projects with the matching columns of ``W[r]`` (``[DI, D]``) in three ``[BLOCK_T, *] x [*, DI]`` products
   accumulated in float32: tensor-core dots (``tf32x3``: about 1e-6 relative error against a float32
   matmul) for tiles of 16 or more tokens, plain float32 multiply-adds for smaller ones,
4. stores ``[BLOCK_T, DI]``: queries into ``out[t, r, :]``; keys into the paged index-key units at
   ``slot_mapping[t] = page * P + offset`` (negative slots are padding: nothing is loaded or stored),
   addressed through :mod:`..paged_heads`: retrieval head ``r``'s keys live at ``base + offsets[r]``
   (its unit tensor and slot) plus ``page * page_stride + offset * token_stride``.

:func:`write_index_keys` launches it for the keys, and with ``queries`` also for the index queries of a
step's decode tokens (the first tokens of vLLM's batch), so the decode chain starts at block top-p;
:func:`index_queries` launches it for queries alone.

Grid ``(cdiv(T, BLOCK_T), HR, parts)``, one part for the keys and one for the queries (they run side by
side): it depends on shapes only, so every launch can be captured in a CUDA graph. A launch of at most
``CONFIG["per_token_up_to"]`` tokens (a decode step's) has one token per program (``BLOCK_T`` 1): the
tile of ``CONFIG["block_t"]`` tokens would leave most of its work masked and run as one long serial
chain per program. ``T`` and ``TQ`` are not specialised on (``do_not_specialize``): one compiled variant
per kind of launch and tiling serves every step.
Token, page and table offsets are computed in int64. A position outside the table has no RoPE angle: its
row reads a clamped table row (memory safety) and comes out NaN, never a plausible wrong vector (keys of
padding tokens are not stored: their slot is negative).
:func:`index_queries` also refuses such positions up front when they are on the host (no device sync);
on a device the caller covers them (the attention impl builds its table for every position below
``max_model_len``).

The table is built once per model with :func:`rope_table` (float32 ``[num_positions, rotary_dim]``, row
``p`` = ``cos(p) | sin(p)`` exactly as :func:`rtpurbo_vllm.rope.rope_cos_sin` gives them — the layout of
vLLM's ``cos_sin_cache``, but float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from rtpurbo_vllm.rope import RopeSpec, rope_cos_sin

from ..fp8 import quantize_e4m3
from ..launch import interpreting, pdl_launch, wait_for_previous_kernel
from ..paged_heads import PagedHeads

# Launch settings a benchmark may change (read at each launch): block_t tokens per program and warps per
# program (the fastest of a sweep over BLOCK_T, warps and dot precision on Hopper, at prefill sizes; the
# history of that sweep is in docs/results/); launches of at most per_token_up_to tokens have one token
# per program.
CONFIG = {"block_t": 32, "warps": 2, "per_token_up_to": 16}
_DOT_PRECISION = "tf32x3"  # 3 TF32 MMAs: ~1e-6 relative to the float32 result


def rope_table_length(spec: RopeSpec) -> int:
    """Rows vLLM 0.26 gives its ``cos_sin_cache`` for ``spec``: ``max_position`` scaled by ``factor`` for
    ``linear`` (and for ``yarn`` from ``original_max_position_embeddings``), else ``max_position``."""
    p = dict(spec.scaling or {})
    rope_type = p.get("rope_type", "default")
    if rope_type == "linear":
        return int(spec.max_position * p["factor"])
    if rope_type == "yarn":
        return max(spec.max_position, int(p["original_max_position_embeddings"] * p["factor"]))
    return spec.max_position


def rope_table(spec: RopeSpec, device: torch.device | str | None = None,
               num_positions: int | None = None) -> torch.Tensor:
    """The ``cos | sin`` table the kernels read; build it once per model and share it between layers.

    Args:
        spec: the model's rotary embedding.
        device: where the table lives (the kernels' device).
        num_positions: rows; defaults to :func:`rope_table_length` (vLLM's own table length).

    Returns:
        ``[num_positions, spec.rotary_dim]`` float32, contiguous: row ``p`` is
        ``cat(cos, sin)`` of :func:`rtpurbo_vllm.rope.rope_cos_sin` at position ``p`` (mscale folded in).
        ``num_positions * rotary_dim * 4`` bytes (64 MiB for 131072 positions at rotary_dim 128).
    """
    n = rope_table_length(spec) if num_positions is None else int(num_positions)
    if n < 1:
        raise ValueError(f"num_positions must be positive, got {n}")
    positions = torch.arange(n, dtype=torch.int64, device=device)
    cos, sin = rope_cos_sin(spec, positions)
    return torch.cat((cos, sin), dim=-1).contiguous()


# ----------------------------------------------------------------------------------------------------
# Device code.


@triton.jit
def _project_acc(x, w, acc, PRECISION: tl.constexpr):
    """``acc + x @ w^T`` in float32 for ``x [BLOCK_T, K]``, ``w [DI, K]``, ``acc [BLOCK_T, DI]``: a tensor-core
    dot for tiles of 16 or more tokens, plain multiply-adds below (``tl.dot`` needs 16 rows)."""
    if x.shape[0] >= 16:
        return tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    return acc + tl.sum(x[:, None, :] * w[None, :, :], axis=2)


@triton.jit
def _unrope_project(x_ptr, s_xt, s_xh, head, pos_ptr, cs_ptr, s_cs, num_positions, w_ptr, s_wh, s_wi, r,
                    offs_t, mask_t,
                    D: tl.constexpr, ROT: tl.constexpr, NEOX: tl.constexpr, BLOCK_HALF: tl.constexpr,
                    BLOCK_TAIL: tl.constexpr, DI: tl.constexpr, PRECISION: tl.constexpr):
    """``[BLOCK_T, DI]`` float32: ``W[r] @ unrope(x[t, head])`` for the tokens ``offs_t`` (int64).

    The rotary pairs are loaded as two ``[BLOCK_T, HALF]`` halves (NeoX: channels ``j`` and ``HALF + j``;
    GPT-J: ``2j`` and ``2j + 1``), un-rotated, and projected with the matching columns of ``W``; the
    pass-through tail ``[ROT, D)`` is projected as is. Three products (:func:`_project_acc`), no gathers.
    """
    HALF: tl.constexpr = ROT // 2
    TAIL: tl.constexpr = D - ROT
    offs_j = tl.arange(0, BLOCK_HALF)
    mask_j = offs_j < HALF
    if NEOX:
        ch1 = offs_j
        ch2 = offs_j + HALF
    else:
        ch1 = 2 * offs_j
        ch2 = 2 * offs_j + 1

    row = x_ptr + offs_t * s_xt + head.to(tl.int64) * s_xh                             # [BLOCK_T]
    m = mask_t[:, None] & mask_j[None, :]
    x1 = tl.load(row[:, None] + ch1[None, :], mask=m, other=0.0).to(tl.float32)        # [BLOCK_T, BLOCK_HALF]
    x2 = tl.load(row[:, None] + ch2[None, :], mask=m, other=0.0).to(tl.float32)

    pos = tl.load(pos_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
    in_table = (pos >= 0) & (pos < num_positions)
    pos = tl.minimum(tl.maximum(pos, 0), num_positions - 1)
    cs_row = cs_ptr + pos * s_cs                                                       # [BLOCK_T]
    c = tl.load(cs_row[:, None] + offs_j[None, :], mask=m, other=1.0)
    s = tl.load(cs_row[:, None] + HALF + offs_j[None, :], mask=m, other=0.0)
    # Inverse of [[c, -s], [s, c]] (vLLM: o1 = x1 c - x2 s, o2 = x2 c + x1 s), divided by c² + s².
    inv = 1.0 / (c * c + s * s)
    p1 = (x1 * c + x2 * s) * inv
    p2 = (x2 * c - x1 * s) * inv

    offs_i = tl.arange(0, DI)
    w_row = w_ptr + r.to(tl.int64) * s_wh + offs_i * s_wi                              # [DI]
    mw = mask_j[None, :]
    w1 = tl.load(w_row[:, None] + ch1[None, :], mask=mw, other=0.0).to(tl.float32)     # [DI, BLOCK_HALF]
    w2 = tl.load(w_row[:, None] + ch2[None, :], mask=mw, other=0.0).to(tl.float32)
    acc = _project_acc(p1, w1, tl.zeros((p1.shape[0], DI), tl.float32), PRECISION)      # [BLOCK_T, DI]
    acc = _project_acc(p2, w2, acc, PRECISION)
    if TAIL > 0:
        offs_k = tl.arange(0, BLOCK_TAIL)
        mask_k = offs_k < TAIL
        xt = tl.load(row[:, None] + ROT + offs_k[None, :], mask=mask_t[:, None] & mask_k[None, :],
                     other=0.0).to(tl.float32)                                          # [BLOCK_T, BLOCK_TAIL]
        wt = tl.load(w_row[:, None] + ROT + offs_k[None, :], mask=mask_k[None, :], other=0.0).to(tl.float32)
        acc = _project_acc(xt, wt, acc, PRECISION)
    return tl.where(in_table[:, None], acc, float("nan"))


@triton.jit(do_not_specialize=["T", "TQ"])
def _index_vectors_kernel(
    k_ptr, q_ptr, pos_ptr, cs_ptr, kv_heads_ptr, heads_ptr, w_k_ptr, w_q_ptr, slot_ptr, cache_ptr, offsets_ptr,
    out_ptr,
    T, TQ, num_positions,
    s_kt, s_kh, s_qt, s_qh, s_cs, s_wkh, s_wki, s_wqh, s_wqi, s_cp, s_co, s_ot, s_oh, s_oi,
    D: tl.constexpr, ROT: tl.constexpr, NEOX: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_TAIL: tl.constexpr, DI: tl.constexpr, BLOCK_T: tl.constexpr, PAGE: tl.constexpr, PRECISION: tl.constexpr,
    OFF_ALIGN: tl.constexpr, FP8: tl.constexpr, MANUAL_FP8: tl.constexpr, KEYS: tl.constexpr,
    QUERIES: tl.constexpr, PDL: tl.constexpr,
):
    """Grid ``(cdiv(T, BLOCK_T), HR, KEYS + QUERIES)``: with ``KEYS`` the index keys of tokens ``[0, T)``
    into the units (the programs of the third axis' first index), with ``QUERIES`` the index queries of
    tokens ``[0, TQ)`` (``TQ <= T``) into ``out`` (its last index): the two run side by side."""
    wait_for_previous_kernel(PDL)
    r = tl.program_id(1)
    first = tl.program_id(0).to(tl.int64) * BLOCK_T
    offs_t = first + tl.arange(0, BLOCK_T)
    offs_i = tl.arange(0, DI)
    if QUERIES:
        if (tl.program_id(2) == tl.num_programs(2) - 1) & (first < TQ):
            mask_q = offs_t < TQ
            head = tl.load(heads_ptr + r)
            acc = _unrope_project(q_ptr, s_qt, s_qh, head, pos_ptr, cs_ptr, s_cs, num_positions,
                                  w_q_ptr, s_wqh, s_wqi, r, offs_t, mask_q, D, ROT, NEOX, BLOCK_HALF, BLOCK_TAIL,
                                  DI, PRECISION)
            dst = out_ptr + (offs_t * s_ot + r.to(tl.int64) * s_oh)[:, None] + offs_i[None, :] * s_oi
            tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=mask_q[:, None])
    if KEYS:
        if tl.program_id(2) == 0:
            slot = tl.load(slot_ptr + offs_t, mask=offs_t < T, other=-1).to(tl.int64)
            keep = slot >= 0
            kv_head = tl.load(kv_heads_ptr + r)
            acc = _unrope_project(k_ptr, s_kt, s_kh, kv_head, pos_ptr, cs_ptr, s_cs, num_positions,
                                  w_k_ptr, s_wkh, s_wki, r, offs_t, keep, D, ROT, NEOX, BLOCK_HALF, BLOCK_TAIL, DI,
                                  PRECISION)
            slot = tl.where(keep, slot, 0)
            page = slot // PAGE
            offset = slot % PAGE
            head_off = tl.multiple_of(tl.load(offsets_ptr + r), OFF_ALIGN)   # retrieval head r's unit and slot
            dst = cache_ptr + (head_off + page * s_cp + offset * s_co)[:, None] + offs_i[None, :]
            if FP8:
                tl.store(dst, quantize_e4m3(acc, 1.0, MANUAL_FP8), mask=keep[:, None])
            else:
                tl.store(dst, acc.to(cache_ptr.dtype.element_ty), mask=keep[:, None])


# ----------------------------------------------------------------------------------------------------
# Launchers.


def _check_common(name: str, x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                  head_ids: torch.Tensor, w: torch.Tensor, is_neox_style: bool) -> tuple[int, int, int, int, int]:
    """Shape/dtype checks shared by both launchers (metadata only, no device sync); returns T, D, HR, DI, rot."""
    if x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"{name} must be a float [T, H, D] tensor, got {x.dtype} {tuple(x.shape)}")
    if x.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension, got strides {x.stride()}")
    t, _, d = x.shape
    if positions.shape != (t,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be int32/int64 [{t}], got {positions.dtype} {tuple(positions.shape)}")
    if cos_sin.dim() != 2 or cos_sin.dtype != torch.float32 or not cos_sin.is_contiguous():
        raise ValueError("cos_sin must be the contiguous float32 [num_positions, rotary_dim] table from "
                         f"rope_table(), got {cos_sin.dtype} {tuple(cos_sin.shape)}")
    rot = cos_sin.shape[1]
    if rot % 2 or not 0 < rot <= d:
        raise ValueError(f"rotary_dim (cos_sin.shape[1]) = {rot} must be even and in (0, D={d}]")
    if w.dim() != 3 or w.shape[2] != d or w.stride(-1) != 1:
        raise ValueError(f"w must be [HR, DI, D={d}] with a contiguous last dimension, got "
                         f"{tuple(w.shape)} strides {w.stride()}")
    hr, di = w.shape[0], w.shape[1]
    if di < 16 or di & (di - 1):
        raise ValueError(f"index dim DI = {di} must be a power of two >= 16")
    if head_ids.shape != (hr,) or head_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"head ids must be int32/int64 [HR={hr}], got {head_ids.dtype} {tuple(head_ids.shape)}")
    devices = {x.device, positions.device, cos_sin.device, head_ids.device, w.device}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if not isinstance(is_neox_style, bool):
        raise TypeError(f"is_neox_style must be a bool, got {type(is_neox_style).__name__}")
    return t, d, hr, di, rot


def _check_positions(positions: torch.Tensor, num_positions: int) -> None:
    """Every query position has a row in the ``cos | sin`` table (host positions only: reading device
    positions back would sync; see :func:`index_queries`)."""
    if positions.numel() == 0 or positions.device.type != "cpu":
        return
    low, high = (int(v) for v in positions.aminmax())
    if low < 0 or high >= num_positions:
        raise ValueError(f"positions span [{low}, {high}] but the RoPE table has rows [0, {num_positions}); fix: "
                         f"build it with rope_table(spec, num_positions=...) covering every position")


def first_tiled_launch() -> int:
    """The fewest tokens a launch takes in ``CONFIG["block_t"]``-token tiles; fewer run one token per program.
    Both are separate compiled variants: a warm-up launches one of each."""
    return CONFIG["per_token_up_to"] + 1


def _tile(t: int, d: int, rot: int) -> dict[str, int]:
    """Block sizes of a launch over ``t`` tokens: tokens per program (:data:`CONFIG`), rotary halves and tail
    padded to powers of two (>= 16 for tl.dot)."""
    block_half = max(16, triton.next_power_of_2(rot // 2))
    block_tail = max(16, triton.next_power_of_2(d - rot)) if d > rot else 16
    block_t = 1 if t < first_tiled_launch() else CONFIG["block_t"]
    return dict(BLOCK_HALF=block_half, BLOCK_TAIL=block_tail, BLOCK_T=block_t)


@dataclass(frozen=True)
class IndexQueries:
    """The index queries :func:`write_index_keys` also computes in its launch: those of the batch's first
    ``TQ`` tokens (their positions are the first ``TQ`` of the keys').

    Attributes:
        query: ``[TQ, HQ, D]`` bf16/fp16/fp32 (device), post-RoPE; last dimension contiguous.
        heads: ``[HR]`` int32 (or int64) (device), the query head of each retrieval head.
        w_q: ``[HR, DI, D]`` any float dtype (device), ``W^Q_h``; last dimension contiguous.
        out: ``[TQ, HR, DI]`` any float dtype (device; computed in float32, rounded to ``out``'s dtype),
            **written in place**: ``w_q[r] @ unrope(query[t, heads[r]])``.
    """

    query: torch.Tensor
    heads: torch.Tensor
    w_q: torch.Tensor
    out: torch.Tensor


def _check_queries(queries: IndexQueries, positions: torch.Tensor, cos_sin: torch.Tensor,
                   is_neox_style: bool) -> tuple[int, int, int, int, int]:
    """:func:`_check_common` of the queries and their output buffer; returns TQ, D, HR, DI, rot."""
    t, d, hr, di, rot = _check_common("query", queries.query, positions, cos_sin, queries.heads, queries.w_q,
                                      is_neox_style)
    out = queries.out
    if out.shape != (t, hr, di) or not out.is_floating_point() or out.device != queries.query.device:
        raise ValueError(f"out must be a float [{t}, {hr}, {di}] tensor on {queries.query.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    return t, d, hr, di, rot


def _launch(t: int, positions: torch.Tensor, cos_sin: torch.Tensor, is_neox_style: bool, d: int, rot: int, hr: int,
            keys: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, PagedHeads] | None,
            queries: IndexQueries | None) -> None:
    """One :func:`_index_vectors_kernel` launch over ``t`` tokens: the index keys (``keys``: ``key,
    kv_heads, w_k, slot_mapping, index``) and/or the index ``queries``. The absent side's pointers are
    the present side's tensors and its strides 0, never dereferenced (its ``KEYS`` / ``QUERIES`` is off)."""
    if t == 0 or hr == 0:
        return
    if keys is not None:
        key, kv_heads, w_k, slot_mapping, index = keys
        cache, offsets, fp8, off_align = index.kernel_base(), index.offsets, index.is_fp8, index.offset_align
        page_size, page_stride, token_stride = index.geometry[0]
    if queries is not None:
        query, heads, w_q, out = queries.query, queries.heads, queries.w_q, queries.out
    if keys is None:
        key, kv_heads, w_k, slot_mapping, cache, offsets = query, heads, w_q, positions, out, heads
        fp8, off_align, page_size, page_stride, token_stride = False, 1, 1, 0, 0
    if queries is None:
        query, heads, w_q, out = key, kv_heads, w_k, cache
    out_strides = out.stride() if queries is not None else (0, 0, 0)
    tile = _tile(t, d, rot)
    pdl = pdl_launch(positions.device)
    _index_vectors_kernel[(triton.cdiv(t, tile["BLOCK_T"]), hr, (keys is not None) + (queries is not None))](
        key, query, positions, cos_sin, kv_heads, heads, w_k, w_q, slot_mapping, cache, offsets, out,
        t, 0 if queries is None else query.shape[0], cos_sin.shape[0],
        key.stride(0), key.stride(1), query.stride(0), query.stride(1), cos_sin.stride(0),
        w_k.stride(0), w_k.stride(1), w_q.stride(0), w_q.stride(1), page_stride, token_stride, *out_strides,
        D=d, ROT=rot, NEOX=is_neox_style, DI=w_k.shape[1], **tile, PAGE=page_size, PRECISION=_DOT_PRECISION,
        OFF_ALIGN=off_align, FP8=fp8, MANUAL_FP8=fp8 and interpreting(), KEYS=keys is not None,
        QUERIES=queries is not None, PDL=pdl, num_warps=CONFIG["warps"], launch_pdl=pdl,
    )


def index_queries(query: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, heads: torch.Tensor,
                  w_q: torch.Tensor, out: torch.Tensor, *, is_neox_style: bool) -> torch.Tensor:
    """Index queries of the retrieval heads from vLLM's post-RoPE queries.

    Args:
        query: ``[T, HQ, D]`` bf16/fp16/fp32 (device), post-RoPE; last dimension contiguous.
        positions: ``[T]`` int64 (or int32) (device), token positions.
        cos_sin: ``[num_positions, rotary_dim]`` float32 (device), from :func:`rope_table`.
        heads: ``[HR]`` int32 (or int64) (device), the query head of each retrieval head.
        w_q: ``[HR, DI, D]`` any float dtype (device), ``W^Q_h``; last dimension contiguous.
        out: ``[T, HR, DI]`` any float dtype (device; computed in float32, rounded to ``out``'s dtype),
            **written in place**: ``w_q[r] @ unrope(query[t, heads[r]])``.
        is_neox_style: the model's RoPE pairing (``RopeSpec.is_neox_style``).

    Returns:
        ``out``.

    Raises:
        ValueError: ``positions`` on the host with one outside ``[0, num_positions)``. Device positions
            are not read back (no sync): an out-of-table row of ``out`` is NaN instead, and the caller
            covers every position it can pass (vLLM keeps positions below ``max_model_len``).
    """
    queries = IndexQueries(query, heads, w_q, out)
    t, d, hr, _, rot = _check_queries(queries, positions, cos_sin, is_neox_style)
    _check_positions(positions, cos_sin.shape[0])
    _launch(t, positions, cos_sin, is_neox_style, d, rot, hr, None, queries)
    return out


def write_index_keys(key: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, kv_heads: torch.Tensor,
                     w_k: torch.Tensor, slot_mapping: torch.Tensor, index: PagedHeads, *,
                     is_neox_style: bool, queries: IndexQueries | None = None) -> PagedHeads:
    """Writes the retrieval heads' index keys of vLLM's post-RoPE keys into the paged index-key units,
    and with ``queries`` the index queries of the first tokens in the same launch.

    Args:
        key: ``[T, HKV, D]`` bf16/fp16/fp32 (device), post-RoPE; last dimension contiguous.
        positions: ``[T]`` int64 (or int32) (device), token positions.
        cos_sin: ``[num_positions, rotary_dim]`` float32 (device), from :func:`rope_table`.
        kv_heads: ``[HR]`` int32 (or int64) (device), the KV head each retrieval head reads (repeats allowed).
        w_k: ``[HR, DI, D]`` any float dtype (device), ``W^K_h``; last dimension contiguous.
        slot_mapping: ``[T]`` int64 (device), vLLM's ``page_id * P + offset``; negative = padding, skipped.
        index: the layer's index-key layout: ``HR`` heads (head ``r`` = retrieval head ``r``) of width
            ``DI``, one kind, bf16/fp16/fp32 or fp8 units (device); **written in place** at the tokens'
            slots (``w_k[r] @ unrope(key[t, kv_heads[r]])`` rounded to the units' dtype; fp8: saturated to
            +-448, unscaled, :func:`..fp8.quantize_e4m3`) of head ``r``'s unit and slot; nothing else is
            touched.
        is_neox_style: the model's RoPE pairing (``RopeSpec.is_neox_style``).
        queries: the index queries of tokens ``[0, TQ)`` (``TQ <= T``, the same ``HR`` and ``DI``), as
            :func:`index_queries` computes them (device positions are not checked; see there).

    Returns:
        ``index``.
    """
    t, d, hr, di, rot = _check_common("key", key, positions, cos_sin, kv_heads, w_k, is_neox_style)
    if not isinstance(index, PagedHeads):
        raise TypeError(f"index must be a PagedHeads, got {type(index).__name__}")
    if (index.num_heads, index.width) != (hr, di) or not (index.base.is_floating_point() or index.is_fp8):
        raise ValueError(f"index must hold HR={hr} heads of width DI={di} in bf16/fp16/fp32 or fp8 units, got "
                         f"{index.num_heads} heads of width {index.width} in {index.dtype}")
    if index.num_kinds != 1:
        raise ValueError(f"index keys live in one cache kind (0), got heads of {index.num_kinds} kinds")
    if slot_mapping.shape != (t,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int64 [{t}], got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    if index.device != key.device or slot_mapping.device != key.device:
        raise ValueError("the index units and slot_mapping must be on the key's device")
    if queries is not None:
        if queries.query.dim() != 3 or queries.query.shape[0] > t:
            raise ValueError(f"queries must be those of the first TQ <= T={t} tokens, [TQ, HQ, D], got a query "
                             f"of shape {tuple(queries.query.shape)}")
        tq = queries.query.shape[0]
        if (_check_queries(queries, positions[:tq], cos_sin, is_neox_style)[1:4] != (d, hr, di)
                or queries.query.device != key.device):
            raise ValueError(f"queries must match the keys' D={d}, HR={hr} and DI={di} and device {key.device}, "
                             f"got query {tuple(queries.query.shape)}, w_q {tuple(queries.w_q.shape)}")
    _launch(t, positions, cos_sin, is_neox_style, d, rot, hr, (key, kv_heads, w_k, slot_mapping, index), queries)
    return index
