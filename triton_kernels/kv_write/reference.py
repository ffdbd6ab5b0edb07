"""The K/V cache write in plain PyTorch: the ground truth for :func:`..kernel.kv_write`.

Each KV head's new K and V go, packed as ``K | V`` (``[2D]``), to the slot its kind's slot mapping gives
(``page * P + offset``; negative = skip), in its unit and slot. FP8 units store vLLM's
``reshape_and_cache_flash`` quantisation: ``x / scale`` in float32, saturated to +-448, rounded to
nearest-even float8_e4m3fn. Inputs are never modified.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..paged_heads import PagedHeads, quantize_fp8, scatter


def kv_write_ref(key: torch.Tensor, value: torch.Tensor, kv: PagedHeads, slot_mappings: Sequence[torch.Tensor | None],
                 k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> PagedHeads:
    """The units after writing the step's K/V, as a new :class:`PagedHeads` over copies.

    Args:
        key, value: ``[T, HKV, D]`` any float dtype.
        kv: the layer's K|V layout (width ``2D``, ``HKV`` heads).
        slot_mappings: per kind, ``[T]`` integer slots (None for a kind no head uses).
        k_scale, v_scale: 1-element float32 scales (fp8 units only).

    Returns:
        ``kv.clone()`` with the writes applied.
    """
    out = kv.clone()
    d = key.shape[2]
    for h in range(kv.num_heads):
        k, v = key[:, h], value[:, h]
        if kv.is_fp8:
            k, v = quantize_fp8(k, k_scale, kv.dtype), quantize_fp8(v, v_scale, kv.dtype)
        else:
            k, v = k.to(kv.dtype), v.to(kv.dtype)
        packed = torch.cat([k, v], dim=-1)
        assert packed.shape[1] == 2 * d == kv.width
        scatter(out, slot_mappings, h, packed)
    return out
