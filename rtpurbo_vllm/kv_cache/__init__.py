"""RTPurbo's KV-cache layouts: full K/V only for retrieval KV heads, sink + window K/V for the others,
index keys, stored in units that vLLM 0.26's hybrid KV-cache manager groups without padding.

Importing this package registers the specs with vLLM's ``KVCacheSpecRegistry``
(:func:`register_kv_cache_specs`): a :class:`SinkWindowSpec` must never reach vLLM without its
sink-keeping manager, and a process that unpickles one imports this package first.
"""

from rtpurbo_vllm.kv_cache.layout import (
    FULL,
    INDEX,
    INDEX_KEY_DTYPES,
    KV_LAYOUTS,
    WINDOW,
    BlockPlan,
    HeadPlace,
    KVLayout,
    LayerPlaces,
    UnitShape,
    index_key_dtype,
    plan_block_sizes,
)
from rtpurbo_vllm.kv_cache.manager import FullPrefixManager, SinkWindowManager, register_kv_cache_specs
from rtpurbo_vllm.kv_cache.specs import RTPurboFullSpec, RTPurboIndexSpec, SinkWindowSpec, unit_spec

register_kv_cache_specs()

__all__ = [
    "FULL", "INDEX", "INDEX_KEY_DTYPES", "KV_LAYOUTS", "WINDOW", "BlockPlan", "FullPrefixManager", "HeadPlace", "KVLayout",
    "LayerPlaces", "RTPurboFullSpec", "RTPurboIndexSpec", "SinkWindowManager", "SinkWindowSpec", "UnitShape",
    "index_key_dtype", "plan_block_sizes", "register_kv_cache_specs", "unit_spec",
]
