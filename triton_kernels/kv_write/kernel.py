"""Writes a step's new K/V into a layer's paged K|V units (Triton), every KV head in one launch.

The layer's KV heads are described by a :class:`..paged_heads.PagedHeads` of width ``2D``: head ``h``
lives at ``base + offsets[h]`` and belongs to kind ``kinds[h]`` (0 = full, 1 = window), whose slot
mapping (``[T]`` int64, vLLM's ``page * P + offset``, negative = skip) and page geometry place token
``t`` at ``page * page_stride + offset * token_stride``. K goes to ``[0, D)`` of the vector, V to
``[D, 2D)`` (FlashAttention's packed layout).

Grid ``(cdiv(T, BLOCK_T), HKV)``: one program per block of tokens and KV head; it reads its head's kind
and offset on the device, so launch shapes depend only on ``T`` and ``HKV`` (CUDA-graph safe, no host
sync). Page and slot offsets are int64. ``T`` changes every step and is not specialised on
(``do_not_specialize``), so one compiled variant serves every step (``rtpurbo_vllm.attention.warmup``).

FP8 units (uint8 bytes of float8_e4m3fn, as vLLM stores ``kv_cache_dtype="fp8"``) get vLLM's
``reshape_and_cache_flash`` quantisation: ``x / scale`` (IEEE division) in float32, saturated to
+-448, rounded to nearest even (:func:`..fp8.quantize_e4m3`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..fp8 import quantize_e4m3
from ..launch import interpreting
from ..paged_heads import PagedHeads

_BLOCK_T = 16
_NUM_WARPS = 4


@triton.jit(do_not_specialize=["T"])
def _kv_write_kernel(
    key_ptr, value_ptr, cache_ptr, offsets_ptr, kinds_ptr, sm0_ptr, sm1_ptr, k_scale_ptr, v_scale_ptr,
    T, page0, page_stride0, token_stride0, page1, page_stride1, token_stride1,
    s_kt, s_kh, s_vt, s_vh,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_T: tl.constexpr, OFF_ALIGN: tl.constexpr,
    FP8: tl.constexpr, MANUAL_FP8: tl.constexpr,
):
    h = tl.program_id(1)
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    kind = tl.load(kinds_ptr + h)
    head_off = tl.multiple_of(tl.load(offsets_ptr + h), OFF_ALIGN)
    # The head's kind picks its slot mapping and page geometry.
    if kind == 0:
        slot = tl.load(sm0_ptr + offs_t, mask=mask_t, other=-1).to(tl.int64)
    else:
        slot = tl.load(sm1_ptr + offs_t, mask=mask_t, other=-1).to(tl.int64)
    page_size = tl.where(kind == 0, page0, page1).to(tl.int64)
    page_stride = tl.where(kind == 0, page_stride0, page_stride1).to(tl.int64)
    token_stride = tl.where(kind == 0, token_stride0, token_stride1).to(tl.int64)
    keep = slot >= 0
    slot = tl.where(keep, slot, 0)
    row = head_off + (slot // page_size) * page_stride + (slot % page_size) * token_stride     # [BLOCK_T]

    offs_d = tl.arange(0, D_PAD)
    mask = keep[:, None] & (offs_d < D)[None, :]
    k = tl.load(key_ptr + (offs_t * s_kt + h * s_kh)[:, None] + offs_d[None, :], mask=mask, other=0.0)
    v = tl.load(value_ptr + (offs_t * s_vt + h * s_vh)[:, None] + offs_d[None, :], mask=mask, other=0.0)
    if FP8:
        k_out = quantize_e4m3(k.to(tl.float32), tl.load(k_scale_ptr), MANUAL_FP8)
        v_out = quantize_e4m3(v.to(tl.float32), tl.load(v_scale_ptr), MANUAL_FP8)
    else:
        k_out = k.to(cache_ptr.dtype.element_ty)
        v_out = v.to(cache_ptr.dtype.element_ty)
    dst = cache_ptr + row[:, None] + offs_d[None, :]
    tl.store(dst, k_out, mask=mask)
    tl.store(dst + D, v_out, mask=mask)


def kv_write(key: torch.Tensor, value: torch.Tensor, kv: PagedHeads,
             slot_mappings: Sequence[torch.Tensor | None], k_scale: torch.Tensor | None = None,
             v_scale: torch.Tensor | None = None) -> None:
    """Writes the step's new K/V of every KV head of a layer into its units, in one launch.

    Only shapes, dtypes and devices are checked (no host sync); launch shapes depend only on ``T`` and
    ``HKV``, so the call can be captured in a CUDA graph.

    Args:
        key: ``[T, HKV, D]`` bf16/fp16/fp32, unit last stride (any other strides).
        value: ``[T, HKV, D]`` like ``key``.
        kv: the layer's K|V layout, ``HKV`` heads of width ``2D`` and kinds 0 and/or 1; its units are
            **written in place** (bf16/fp16/fp32 units: values rounded to their dtype; fp8 units:
            quantised with the scales).
        slot_mappings: per kind ``k`` the heads use, ``[T]`` int64 (or int32) slots of that kind
            (``page * P + offset``; negative: the token is padding or not kept, nothing written).
            Entries of unused kinds may be None.
        k_scale, v_scale: with fp8 units, 1-element float32 device tensors (vLLM's
            ``layer._k_scale`` / ``_v_scale``): the stored value is ``x / scale``. Ignored otherwise.
    """
    if key.dim() != 3 or key.shape != value.shape:
        raise ValueError(f"key and value must both be [T, HKV, D], got {tuple(key.shape)} and {tuple(value.shape)}")
    t, hkv, d = key.shape
    if key.dtype not in (torch.bfloat16, torch.float16, torch.float32) or value.dtype != key.dtype:
        raise ValueError(f"key and value must share a float dtype (bf16/fp16/fp32), got {key.dtype} and {value.dtype}")
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("key and value need a unit stride in their last dimension")
    if kv.num_heads != hkv or kv.width != 2 * d:
        raise ValueError(f"the K|V layout has {kv.num_heads} heads of width {kv.width}, key has {hkv} heads "
                         f"of dim {d} (width {2 * d} expected)")
    if kv.num_kinds > 2:
        raise ValueError(f"K/V heads use kinds 0 (full) and 1 (window), got {kv.num_kinds} kinds")
    if len(slot_mappings) < kv.num_kinds:
        raise ValueError(f"{len(slot_mappings)} slot mappings for heads of {kv.num_kinds} kinds")
    devices = {key.device, value.device, kv.device}
    maps = []
    for k, geo in enumerate(kv.geometry):
        if geo is None:
            continue
        sm = slot_mappings[k]
        if sm is None or sm.shape != (t,) or sm.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"slot_mappings[{k}] must be [T={t}] int64, got "
                             f"{None if sm is None else (tuple(sm.shape), sm.dtype)}")
        devices.add(sm.device)
        maps.append(k)
    if kv.is_fp8:
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            if s is None or s.numel() != 1 or s.dtype != torch.float32:
                raise ValueError(f"fp8 units need {name} as a 1-element float32 tensor, got "
                                 f"{None if s is None else (tuple(s.shape), s.dtype)}")
            devices.add(s.device)
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if t == 0 or hkv == 0:
        return
    # A kind no head uses gets the other kind's (never read) arguments.
    geo = [kv.geometry[k] if k < kv.num_kinds and kv.geometry[k] is not None else kv.geometry[maps[0]]
           for k in range(2)]
    sms = [slot_mappings[k] if k < kv.num_kinds and kv.geometry[k] is not None else slot_mappings[maps[0]]
           for k in range(2)]
    fp8 = kv.is_fp8
    k_arg = k_scale if fp8 else kv.offsets
    v_arg = v_scale if fp8 else kv.offsets
    _kv_write_kernel[(triton.cdiv(t, _BLOCK_T), hkv)](
        key, value, kv.kernel_base(), kv.offsets, kv.kinds, sms[0], sms[1], k_arg, v_arg,
        t, *geo[0], *geo[1], key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        D=d, D_PAD=triton.next_power_of_2(d), BLOCK_T=_BLOCK_T, OFF_ALIGN=kv.offset_align,
        FP8=fp8, MANUAL_FP8=fp8 and interpreting(), num_warps=_NUM_WARPS,
    )

