"""vLLM KV-cache specs of the three kinds of RTPurbo cache unit (see :mod:`.layout`).

* full unit: :class:`RTPurboFullSpec` (a ``FullAttentionSpec``) ``(num_kv_heads=slots, head_size=D,
  block_size=Pf)``, K and V of every token;
* window unit: :class:`SinkWindowSpec` ``(num_kv_heads=slots, head_size=D, block_size=Pw,
  sliding_window=W, sink_tokens, dense_threshold)``; vLLM frees its blocks that fall out of the window
  except the sink blocks, and none while a request is shorter than ``dense_threshold`` (:mod:`.manager`);
* index unit: :class:`RTPurboIndexSpec` ``(num_kv_heads=1, head_size=DI*slots, block_size=Pi)``, one
  key vector per token (an ``MLAAttentionSpec``).

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

from rtpurbo_vllm.kv_cache.layout import INDEX, WINDOW

if TYPE_CHECKING:
    from rtpurbo_vllm.kv_cache.layout import KVLayout, UnitShape


@dataclass(frozen=True, kw_only=True)
class SinkWindowSpec(SlidingWindowSpec):
    """A sliding window that also keeps the first ``sink_tokens`` tokens of every request, and every
    token while a request is shorter than ``dense_threshold`` (it may still run dense).

    Memory per request (admission cap and start-up sizing): the sliding window's
    ``cdiv(min(max(W, dense_threshold) - 1 + in_flight, max_len), P) + 1`` blocks plus
    ``cdiv(sink_tokens, P)`` sink blocks, never more than ``cdiv(max_len, P)``.
    """

    sink_tokens: int = 0
    dense_threshold: int = 0

    @property
    def num_sink_blocks(self) -> int:
        return cdiv(self.sink_tokens, self.block_size) if self.sink_tokens > 0 else 0

    def max_admission_blocks_per_request(self, max_in_flight_tokens: int, max_model_len: int) -> int:
        held = max(self.sliding_window, self.dense_threshold)
        window_blocks = cdiv(min(held - 1 + max_in_flight_tokens, max_model_len), self.block_size) + 1
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
                   and spec.sink_tokens == self.sink_tokens and spec.dense_threshold == self.dense_threshold
                   for spec in kv_cache_specs.values())


@dataclass(frozen=True, kw_only=True)
class RTPurboFullSpec(FullAttentionSpec):
    """A full unit (K/V of every token); a ``FullAttentionSpec`` with its own manager."""


@dataclass(frozen=True, kw_only=True)
class RTPurboIndexSpec(MLAAttentionSpec):
    """An index unit (``DI * slots`` key values per token); an ``MLAAttentionSpec`` with its own manager."""


def unit_spec(shape: UnitShape, layout: KVLayout, **kwargs) -> KVCacheSpec:
    """The vLLM spec of one unit of ``shape`` in ``layout``. ``kwargs`` go to K/V specs
    (``kv_quant_mode``, ``head_size_v``)."""
    if shape.kind == INDEX:
        return RTPurboIndexSpec(block_size=shape.block_size, num_kv_heads=1, head_size=shape.width * shape.slots,
                                dtype=shape.dtype)
    common = dict(block_size=shape.block_size, num_kv_heads=shape.slots, head_size=layout.head_size,
                  dtype=shape.dtype, **kwargs)
    if shape.kind == WINDOW:
        return SinkWindowSpec(sliding_window=layout.window, sink_tokens=layout.sink_tokens,
                              dense_threshold=layout.dense_threshold, **common)
    return RTPurboFullSpec(**common)
