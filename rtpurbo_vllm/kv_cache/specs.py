"""vLLM KV-cache specs of the three RTPurbo caches of a layer (see :mod:`.layout`).

* full cache (the model's ``Attention`` layer): :class:`RTPurboFullSpec` (a ``FullAttentionSpec``)
  ``(num_kv_heads=R, head_size=D, block_size=Pf)``, K and V of every token of the R full KV heads,
  page ``Pf * R * 2D * s`` bytes;
* window cache (``{prefix}.rtp_window``): :class:`SinkWindowSpec` ``(num_kv_heads=H-R, head_size=D,
  block_size=Pw, sliding_window=W, sink_tokens=4)``, same page bytes; vLLM frees its blocks that fall
  out of the window except the ``ceil(sink / Pw)`` sink blocks (:mod:`.manager`);
* index cache (``{prefix}.rtp_index``): :class:`RTPurboIndexSpec` ``(num_kv_heads=1,
  head_size=DI*n, block_size=Pi)``, one key vector per token (an ``MLAAttentionSpec``), same page
  bytes.

The Full-type specs use :class:`~rtpurbo_vllm.kv_cache.manager.FullPrefixManager` (the stock full
manager plus a fix for hybrid prefix hits with two Full-type groups) and the window spec
:class:`~rtpurbo_vllm.kv_cache.manager.SinkWindowManager`; :func:`register_kv_cache_specs` registers
both in vLLM's ``KVCacheSpecRegistry``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from vllm.utils.math_utils import cdiv
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheSpec,
    MLAAttentionSpec,
    SlidingWindowSpec,
)

if TYPE_CHECKING:
    import torch

    from rtpurbo_vllm.kv_cache.layout import KVLayoutPlan


@dataclass(frozen=True, kw_only=True)
class SinkWindowSpec(SlidingWindowSpec):
    """A sliding window that also keeps the first ``sink_tokens`` tokens of every request.

    Memory per request (admission cap and start-up sizing): the sliding window's
    ``cdiv(min(W - 1 + in_flight, max_len), P) + 1`` blocks plus ``cdiv(sink_tokens, P)`` sink blocks,
    never more than ``cdiv(max_len, P)``.
    """

    sink_tokens: int = 0

    @property
    def num_sink_blocks(self) -> int:
        return cdiv(self.sink_tokens, self.block_size) if self.sink_tokens > 0 else 0

    def max_admission_blocks_per_request(self, max_in_flight_tokens: int, max_model_len: int) -> int:
        window_blocks = super().max_admission_blocks_per_request(max_in_flight_tokens, max_model_len)
        return min(window_blocks + self.num_sink_blocks, cdiv(max_model_len, self.block_size))

    @classmethod
    def merge(cls, specs: list[SinkWindowSpec]) -> SinkWindowSpec:
        """Layers of one group must agree on every field (sinks included)."""
        for spec in specs:
            if not isinstance(spec, SinkWindowSpec):
                raise AssertionError(f"cannot merge {type(spec).__name__} into a SinkWindowSpec group")
            for f in fields(SinkWindowSpec):
                if getattr(spec, f.name) != getattr(specs[0], f.name):
                    raise AssertionError(f"SinkWindowSpec layers of one group differ in {f.name}")
        return copy.deepcopy(specs[0])

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, KVCacheSpec]) -> bool:
        return all(isinstance(spec, SinkWindowSpec) and spec.sliding_window == self.sliding_window
                   and spec.sink_tokens == self.sink_tokens for spec in kv_cache_specs.values())


@dataclass(frozen=True, kw_only=True)
class RTPurboFullSpec(FullAttentionSpec):
    """The full K/V cache (R heads); a ``FullAttentionSpec`` with its own manager."""


@dataclass(frozen=True, kw_only=True)
class RTPurboIndexSpec(MLAAttentionSpec):
    """Key-only index cache (``DI * n`` values per token); an ``MLAAttentionSpec`` with its own manager."""


def full_spec(plan: KVLayoutPlan, dtype: torch.dtype | None = None, **kwargs) -> RTPurboFullSpec:
    """The main ``Attention`` layer's spec: R full KV heads. ``kwargs`` go to the spec
    (``kv_quant_mode``, ``head_size_v``)."""
    return RTPurboFullSpec(block_size=plan.blocks.full, num_kv_heads=plan.num_full_kv_heads,
                             head_size=plan.head_size, dtype=dtype or plan.kv_dtype, **kwargs)


def window_spec(plan: KVLayoutPlan, dtype: torch.dtype | None = None, **kwargs) -> SinkWindowSpec:
    """The window side layer's spec: H - R KV heads, sink tokens plus a sliding window."""
    if not plan.has_window_cache:
        raise ValueError("this plan keeps every KV head in full; it has no window cache")
    return SinkWindowSpec(block_size=plan.blocks.window, num_kv_heads=plan.num_window_kv_heads,
                          head_size=plan.head_size, dtype=dtype or plan.kv_dtype,
                          sliding_window=plan.window, sink_tokens=plan.sink_tokens, **kwargs)


def index_spec(plan: KVLayoutPlan, dtype: torch.dtype | None = None) -> RTPurboIndexSpec:
    """The index side layer's spec: ``DI * n`` key values per token."""
    if not plan.has_index_cache:
        raise ValueError("this plan has no retrieval head, hence no index cache")
    return RTPurboIndexSpec(block_size=plan.blocks.index, num_kv_heads=1,
                            head_size=plan.index_dim * plan.index_width, dtype=dtype or plan.index_dtype)
