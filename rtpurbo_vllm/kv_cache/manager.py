"""Block bookkeeping of the RTPurbo caches inside vLLM's KV-cache manager.

:class:`SinkWindowManager` is vLLM's ``SlidingWindowManager`` except that the first
``S = cdiv(sink_tokens, block_size)`` blocks of a request are never freed while it runs. Its block
list for a request of ``T`` computed tokens is::

    [sink_0 .. sink_{S-1}, null, ..., null, window blocks ...]
     ^ kept (real)          ^ freed (out of window)  ^ blocks holding tokens >= T - W + 1

so the block table handed to the worker still maps token ``t < sink_tokens`` to its page and every
window token to its page; tokens in between map to vLLM's null block (the kernels must mask them,
as they mask any token outside sink + window). A prefix-cache hit needs the sink blocks and the
window blocks before the hit end (every block before it when the hit is shorter than
``dense_threshold``); preemption frees everything (as in vLLM).

:class:`FullPrefixManager` is vLLM's ``FullAttentionManager`` that trims prefix-hit blocks to the
hit length it is given. vLLM 0.26's ``HybridKVCacheCoordinator`` only trims the *first* Full-type
group when a sliding-window group shortens the hit, so with two Full-type groups (full K/V and the
index keys) the second one would receive blocks past the hit (which the next prefill would then
overwrite in shared, cached pages).

:func:`register_kv_cache_specs` registers both with ``KVCacheSpecRegistry`` (idempotent).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from vllm.utils.math_utils import cdiv
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_utils import BlockHashList, KVCacheBlock, resolve_block_hashes
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager, SlidingWindowManager
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec, SlidingWindowSpec

from rtpurbo_vllm.kv_cache.specs import RTPurboFullSpec, RTPurboIndexSpec, SinkWindowSpec

logger = logging.getLogger(__name__)


class FullPrefixManager(FullAttentionManager):
    """Full attention whose prefix-hit blocks never exceed the hit length (see the module doc)."""

    def _trim(self, request_id: str, new_computed_blocks: Sequence[KVCacheBlock],
              num_local_computed_tokens: int) -> Sequence[KVCacheBlock]:
        held = len(self.req_to_blocks.get(request_id, ()))
        keep = max(0, cdiv(num_local_computed_tokens, self.block_size) - held)
        return new_computed_blocks[:keep]

    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int,
                                   new_computed_blocks: Sequence[KVCacheBlock], total_computed_tokens: int,
                                   num_local_computed_tokens: int, num_tokens_main_model: int,
                                   apply_admission_cap: bool = False) -> int:
        new_computed_blocks = self._trim(request_id, new_computed_blocks, num_local_computed_tokens)
        return super().get_num_blocks_to_allocate(request_id, num_tokens, new_computed_blocks,
                                                  total_computed_tokens, num_local_computed_tokens,
                                                  num_tokens_main_model, apply_admission_cap)

    def add_local_computed_blocks(self, request_id: str, new_computed_blocks: Sequence[KVCacheBlock],
                                  num_local_computed_tokens: int, num_external_computed_tokens: int) -> None:
        new_computed_blocks = self._trim(request_id, new_computed_blocks, num_local_computed_tokens)
        super().add_local_computed_blocks(request_id, new_computed_blocks, num_local_computed_tokens,
                                          num_external_computed_tokens)


class SinkWindowManager(SlidingWindowManager):
    """``SlidingWindowManager`` that keeps the sink blocks of every request (see the module doc).

    ``get_num_skipped_tokens`` keeps vLLM's meaning (tokens before the window); every method that
    turns skipped tokens into null blocks leaves blocks ``[0, S)`` alone.
    """

    def __init__(self, kv_cache_spec: SinkWindowSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.num_sink_blocks = kv_cache_spec.num_sink_blocks

    def get_num_skipped_tokens(self, num_computed_tokens: int) -> int:
        """vLLM's window rule, but nothing is skipped while the next step may run dense."""
        if num_computed_tokens + 1 < self.kv_cache_spec.dense_threshold:
            return 0
        return super().get_num_skipped_tokens(num_computed_tokens)

    def _skipped_range(self, num_computed_tokens: int) -> tuple[int, int]:
        """Block indices ``[first, last)`` that are out of window and not sinks (empty: first >= last)."""
        last = self.get_num_skipped_tokens(num_computed_tokens) // self.block_size
        return self.num_sink_blocks, last

    # -------------------------------------------------------------- freeing
    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        first, last = self._skipped_range(processed_computed_tokens)
        blocks = self.req_to_blocks.get(request_id)
        if blocks is None or last <= first:
            return
        self._remove_blocks_in_range(request_id, first, min(last, len(blocks)))

    # -------------------------------------------------------------- allocation
    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int,
                                   new_computed_blocks: Sequence[KVCacheBlock], total_computed_tokens: int,
                                   num_local_computed_tokens: int, num_tokens_main_model: int,
                                   apply_admission_cap: bool = False) -> int:
        num_required = cdiv(num_tokens, self.block_size)
        if apply_admission_cap and self._max_admission_blocks_per_request is not None:
            num_required = min(num_required, self._max_admission_blocks_per_request)
        num_held = len(self.req_to_blocks.get(request_id, ()))
        if request_id in self.num_cached_block:
            # A running request gets no new prefix hits; skipped blocks are already nulls.
            assert len(new_computed_blocks) == 0
            return max(num_required - num_held, 0)
        first, last = self._skipped_range(total_computed_tokens)
        num_known = num_held + len(new_computed_blocks)

        def skipped(index: int) -> bool:
            return first <= index < last

        # Fresh blocks for every index in [num_known, num_required) outside the skipped range.
        lo, hi = num_known, num_required
        num_new = max(hi - lo, 0) - max(0, min(hi, last) - max(lo, first))
        # Prefix-hit blocks that are kept and sit in the free queue leave it when touched.
        kept = [b for j, b in enumerate(new_computed_blocks) if not skipped(num_held + j)]
        return num_new + self._get_num_evictable_blocks(kept)

    def add_local_computed_blocks(self, request_id: str, new_computed_blocks: Sequence[KVCacheBlock],
                                  num_local_computed_tokens: int, num_external_computed_tokens: int) -> None:
        req_blocks = self.req_to_blocks[request_id]
        assert len(req_blocks) == 0
        first, last = self._skipped_range(num_local_computed_tokens + num_external_computed_tokens)
        if last > first:
            sinks = list(new_computed_blocks[:first])
            tail = list(new_computed_blocks[last:])
            # Missing sinks (a hit shorter than the sinks; only with external KV) stay null here and
            # get fresh blocks in allocate_external_computed_blocks.
            blocks = (sinks + [self._null_block] * (first - len(sinks))
                      + [self._null_block] * (last - first) + tail)
            kept = sinks + tail
        else:
            blocks = kept = list(new_computed_blocks)
        if self.enable_caching:
            self.block_pool.touch(kept)
        else:
            assert not any(new_computed_blocks), "computed blocks without prefix caching"
        req_blocks.extend(blocks)
        self.num_cached_block[request_id] = len(req_blocks)

    def allocate_external_computed_blocks(self, request_id: str, num_local_computed_tokens: int,
                                          num_external_computed_tokens: int) -> None:
        req_blocks = self.req_to_blocks[request_id]
        total = num_local_computed_tokens + num_external_computed_tokens
        missing = [i for i in range(min(self.num_sink_blocks, cdiv(total, self.block_size)))
                   if i < len(req_blocks) and req_blocks[i].is_null]
        if missing:
            for i, block in zip(missing, self.block_pool.get_new_blocks(len(missing))):
                req_blocks[i] = block
            self.num_cached_block[request_id] = min(self.num_cached_block[request_id], missing[0])
        super().allocate_external_computed_blocks(request_id, num_local_computed_tokens,
                                                  num_external_computed_tokens)

    # -------------------------------------------------------------- prefix caching
    @classmethod
    def find_longest_cache_hit(cls, block_hashes: BlockHashList, max_length: int, kv_cache_group_ids: list[int],
                               block_pool: BlockPool, kv_cache_spec: KVCacheSpec, drop_eagle_block: bool,
                               alignment_tokens: int, dcp_world_size: int = 1,
                               pcp_world_size: int = 1) -> tuple[tuple[list[KVCacheBlock], ...], int]:
        """The sliding window's hit, which also needs the sink blocks to be cached, and every block
        when the hit is short enough to run dense (else no hit)."""
        assert isinstance(kv_cache_spec, SinkWindowSpec)
        computed, hit_length = super().find_longest_cache_hit(
            block_hashes, max_length, kv_cache_group_ids, block_pool, kv_cache_spec, drop_eagle_block,
            alignment_tokens, dcp_world_size, pcp_world_size)
        num_blocks = len(computed[0])
        needed = num_blocks if hit_length + 1 < kv_cache_spec.dense_threshold else kv_cache_spec.num_sink_blocks
        missing = [j for j in range(min(needed, num_blocks)) if computed[0][j].is_null]
        if not missing:
            return computed, hit_length
        hashes = resolve_block_hashes(block_hashes, block_pool.hash_block_size, kv_cache_spec.block_size,
                                      supports_fine_grained_hash_lookup=cls.supports_fine_grained_hash_lookup,
                                      alignment_tokens=alignment_tokens)
        for j in missing:
            cached = block_pool.get_cached_block(hashes[j], kv_cache_group_ids)
            if not cached:
                # Every hit covers token 0; without the sinks there is none (a miss is always safe).
                return tuple([] for _ in kv_cache_group_ids), 0
            for blocks, block in zip(computed, cached):
                blocks[j] = block
        return computed, hit_length

    @classmethod
    def reachable_block_mask(cls, start_block: int, end_block: int, alignment_tokens: int | None,
                             kv_cache_spec: KVCacheSpec, use_eagle: bool, retention_interval: int | None = None,
                             reachable_boundaries: Sequence[int] = ()) -> list[bool] | None:
        """The sliding window's cached blocks plus the sink blocks (every hit needs them) and every
        block before ``dense_threshold`` (a hit that short needs them all)."""
        mask = super().reachable_block_mask(start_block, end_block, alignment_tokens, kv_cache_spec, use_eagle,
                                            retention_interval, reachable_boundaries)
        if mask is None:
            return None
        assert isinstance(kv_cache_spec, SinkWindowSpec)
        kept = max(kv_cache_spec.num_sink_blocks, cdiv(kv_cache_spec.dense_threshold, kv_cache_spec.block_size))
        for i in range(start_block, min(end_block, kept)):
            mask[i - start_block] = True
        return mask


_REGISTERED = False


def register_kv_cache_specs() -> None:
    """Registers the RTPurbo specs and managers with vLLM (idempotent; cheap, no CUDA).

    Every process that builds KV-cache configs or managers needs it: the engine core
    (``get_kv_cache_configs``, the scheduler's coordinator) and the workers (spec collection,
    profiling); the plugin's ``register()`` calls it in each of them. ``_ensure_registered()`` runs
    first, or vLLM would skip its built-in registrations once the registry is non-empty.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(SinkWindowSpec, SinkWindowManager, uniform_type_base_spec=SlidingWindowSpec)
    for spec_cls in (RTPurboFullSpec, RTPurboIndexSpec):
        KVCacheSpecRegistry.register(spec_cls, FullPrefixManager, uniform_type_base_spec=FullAttentionSpec)
    _REGISTERED = True
    logger.debug("rtpurbo-vllm: KV-cache specs registered (RTPurboFullSpec, SinkWindowSpec, RTPurboIndexSpec)")
