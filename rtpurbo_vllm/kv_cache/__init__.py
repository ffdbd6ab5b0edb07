"""RTPurbo's memory-saving KV-cache layout (issue #5): full K/V only for retrieval KV heads, sink +
window K/V for the others, index keys; specs, managers and side layers for vLLM 0.26.

Importing this package registers the specs with vLLM's ``KVCacheSpecRegistry``
(:func:`register_kv_cache_specs`): a :class:`SinkWindowSpec` must never reach vLLM without its
sink-keeping manager, and a process that unpickles one imports this package first.
"""

from rtpurbo_vllm.kv_cache.layout import BlockPlan, KVLayoutPlan, PaddingStats, plan_block_sizes
from rtpurbo_vllm.kv_cache.manager import FullPrefixManager, SinkWindowManager, register_kv_cache_specs
from rtpurbo_vllm.kv_cache.specs import (
    RTPurboFullSpec,
    RTPurboIndexSpec,
    SinkWindowSpec,
    full_spec,
    index_spec,
    window_spec,
)

register_kv_cache_specs()

__all__ = [
    "BlockPlan", "FullPrefixManager", "KVLayoutPlan", "PaddingStats", "RTPurboFullSpec", "RTPurboIndexSpec",
    "SinkWindowManager", "SinkWindowSpec", "full_spec", "index_spec", "plan_block_sizes",
    "register_kv_cache_specs", "window_spec",
]
