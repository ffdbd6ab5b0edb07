"""The long requests a vLLM engine holds while they decode, replayed through vLLM's own scheduler on the CPU.

How many 128K-token requests run at once is decided by vLLM's scheduler and KV-cache manager, not by
the GPU: a waiting request is admitted only when its whole sequence fits the free pool (vLLM 0.26's
``scheduler_reserve_full_isl``, on by default, with each spec's admission cap: a sliding window
reserves its in-flight span, not the sequence), and a running one holds what its groups keep. So the
count a loaded server reaches can be replayed on a CPU with vLLM's real ``Scheduler`` (the
``AsyncScheduler`` with async scheduling), ``KVCacheManager`` and ``get_kv_cache_configs``:

* the KV specs the workers report: FLASH_ATTN's ``FullAttentionSpec`` per layer, or RTPURBO's cache
  units (:func:`rtpurbo_vllm.kv_cache.side_layers.collected_specs`, what its layers declare);
* the KV memory of the GPU run (its start-up log: "Current kv cache memory in use is X GiB"), from
  which vLLM sizes the pool; the replay prints vLLM's logged KV tokens beside the GPU run's to check;
* vLLM's scheduler settings (``vllm serve`` on an H100/H200: 8192 batched tokens, async scheduling);
* a stand-in model: every step samples token 7 for each request past its prefill (the scheduler's
  decisions do not depend on token values); two batches are in flight with async scheduling, as the
  engine core's batch queue keeps them.

:func:`replay_held` sends more requests than fit and steps until every admitted request decodes and the
rest keep waiting. It is a replay of the scheduler's bookkeeping, not a GPU measurement.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

STAND_IN_TOKEN = 7


@dataclass(frozen=True)
class ReplaySettings:
    """What the replayed engine is.

    Attributes:
        context: prompt tokens of every request.
        kv_memory_bytes: the KV pool's memory, as the GPU run profiled it.
        max_num_batched_tokens, max_num_seqs, async_scheduling: vLLM's scheduler settings.
        output_tokens: tokens each request generates (none finishes during a replay: keep it large).
        kv_cache_dtype: ``"auto"`` (bf16) or ``"fp8"``.
    """

    context: int = 128 * 1024
    kv_memory_bytes: int = round(108.74 * 2**30)
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 1024
    async_scheduling: bool = True
    output_tokens: int = 2048
    kv_cache_dtype: str = "auto"


def replay_vllm_config(model_dir: Path, settings: ReplaySettings):
    """A ``VllmConfig`` of the model in ``model_dir`` (``config.json``) as the GPU engine has it, on the CPU
    device: ``max_model_len`` context + output tokens, 16-token blocks, prefix caching, the hybrid KV-cache
    manager, chunked prefill and the scheduler settings."""
    from vllm.config import CacheConfig, DeviceConfig, ModelConfig, SchedulerConfig, VllmConfig

    max_model_len = settings.context + settings.output_tokens
    model_config = ModelConfig(model=str(model_dir), dtype="bfloat16", max_model_len=max_model_len,
                               skip_tokenizer_init=True)
    scheduler = SchedulerConfig(max_model_len=max_model_len, is_encoder_decoder=False,
                                max_num_batched_tokens=settings.max_num_batched_tokens,
                                max_num_seqs=settings.max_num_seqs, enable_chunked_prefill=True,
                                async_scheduling=settings.async_scheduling)
    config = VllmConfig(model_config=model_config, device_config=DeviceConfig("cpu"),
                        cache_config=CacheConfig(block_size=16, enable_prefix_caching=True,
                                                 cache_dtype=settings.kv_cache_dtype),
                        scheduler_config=scheduler)
    config.scheduler_config.disable_hybrid_kv_cache_manager = False
    config.scheduler_config.async_scheduling = settings.async_scheduling
    return config


def dense_specs(vllm_config) -> dict[str, Any]:
    """FLASH_ATTN's specs: one ``FullAttentionSpec`` per layer, every KV head, as its workers report them."""
    from vllm.config import set_current_vllm_config
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend
    from vllm.v1.kv_cache_interface import FullAttentionSpec, get_kv_quant_mode

    hf = vllm_config.model_config.hf_config
    cache_dtype = vllm_config.cache_config.cache_dtype
    dtype = torch.uint8 if cache_dtype.startswith("fp8") else torch.bfloat16
    with set_current_vllm_config(vllm_config):
        by_stride = FlashAttentionBackend.indexes_kv_by_block_stride()
    spec = FullAttentionSpec(block_size=16, num_kv_heads=hf.num_key_value_heads, head_size=hf.head_dim, dtype=dtype,
                             kv_quant_mode=get_kv_quant_mode(cache_dtype), indexes_kv_by_block_stride=by_stride)
    return {f"model.layers.{i}.self_attn.attn": spec for i in range(hf.num_hidden_layers)}


def replay_held(vllm_config, specs: dict[str, Any], settings: ReplaySettings, num_requests: int | None = None,
                max_steps: int = 1_000_000) -> dict[str, Any]:
    """Sizes vLLM's KV pool for ``specs`` in ``settings.kv_memory_bytes``, sends ``num_requests`` distinct
    requests of ``settings.context`` tokens (default: ``ceil(3 x`` vLLM's logged max concurrency``) + 2``: the
    logged figure reserves the window's in-flight span for every request, so a memory-saving layout
    holds up to about 2.5x it)
    and steps vLLM's scheduler until no admitted request is still prefilling and, for 16 steps, the
    running count holds with requests waiting (or every request is admitted).

    Returns:
        ``num_blocks``, vLLM's logged ``kv_cache_tokens`` and ``max_concurrency`` for this pool, and
        ``held_requests`` (running then), ``all_admitted``, ``num_requests``, ``preemptions``, ``steps``.
    """
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import (
        generate_scheduler_kv_cache_config,
        get_kv_cache_capacity,
        get_kv_cache_configs,
        get_request_block_hasher,
        init_none_hash,
        resolve_kv_cache_block_sizes,
    )
    from vllm.v1.structured_output import StructuredOutputManager

    kv_config = generate_scheduler_kv_cache_config(
        get_kv_cache_configs(vllm_config, [specs], [settings.kv_memory_bytes]))
    vllm_config.cache_config.num_gpu_blocks = kv_config.num_blocks
    kv_tokens, max_concurrency = get_kv_cache_capacity(vllm_config, kv_config)
    scheduler_block, hash_block = resolve_kv_cache_block_sizes(kv_config, vllm_config)
    scheduler = vllm_config.scheduler_config.get_scheduler_cls()(
        vllm_config=vllm_config, kv_cache_config=kv_config, structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=scheduler_block, hash_block_size=hash_block)
    init_none_hash(sha256)
    hasher = get_request_block_hasher(hash_block, sha256)
    count = num_requests if num_requests is not None else math.ceil(3 * max_concurrency) + 2
    requests = [_request(i, settings, hasher) for i in range(count)]
    for request in requests:
        scheduler.add_request(request)
    result = _step_until_settled(scheduler, 2 if settings.async_scheduling else 1, max_steps)
    return {"num_blocks": kv_config.num_blocks, "kv_cache_tokens": kv_tokens,
            "max_concurrency": round(max_concurrency, 2), "num_requests": count,
            "preemptions": sum(r.num_preemptions for r in requests), **result}


def _request(i: int, settings: ReplaySettings, hasher):
    """Request ``i``: ``settings.context`` tokens no other request shares (no prefix hits between them)."""
    from vllm import SamplingParams
    from vllm.v1.request import Request

    tokens = [1000 + i] + [(i * 7919 + t) % 30000 + 1000 for t in range(settings.context - 1)]
    params = SamplingParams(max_tokens=settings.output_tokens, min_tokens=settings.output_tokens, ignore_eos=True)
    return Request(f"replay-{i}", tokens, params, None, block_hasher=hasher)


class Settling:
    """Watches a vLLM scheduler under load for the moment its queues settle: no running request still
    prefilling and, for ``stable_steps`` steps in a row, the same number running with requests waiting
    (or none waiting: every request admitted). Call :meth:`settled` after each step."""

    def __init__(self, stable_steps: int = 16):
        self.stable_steps, self.stable, self.last = stable_steps, 0, None

    def settled(self, scheduler) -> bool:
        running, waiting = len(scheduler.running), len(scheduler.waiting)
        prefilling = any(r.num_computed_tokens < r.num_prompt_tokens for r in scheduler.running)
        self.stable = self.stable + 1 if not prefilling and running == self.last else 0
        self.last = running
        return not prefilling and (not waiting or self.stable >= self.stable_steps)

    @staticmethod
    def state(scheduler) -> dict[str, Any]:
        """``held_requests`` (running now) and ``all_admitted`` (none waiting)."""
        return {"held_requests": len(scheduler.running), "all_admitted": not scheduler.waiting}


def _step_until_settled(scheduler, batches_in_flight: int, max_steps: int) -> dict[str, Any]:
    """Schedules and completes batches as the engine core's batch queue does (``batches_in_flight``
    scheduled before the oldest completes) until :class:`Settling` says so; see :func:`replay_held`."""
    from vllm.v1.outputs import ModelRunnerOutput

    in_flight: collections.deque = collections.deque()
    steps, watch = 0, Settling()
    while steps < max_steps:
        output = scheduler.schedule()
        if output.total_num_scheduled_tokens:
            # Who samples in this batch: every scheduled request whose prefill this batch completes or
            # which decodes (vLLM marks the others as prefill chunks when it schedules them).
            sampling = {rid for rid in output.num_scheduled_tokens if not scheduler.requests[rid].is_prefill_chunk}
            in_flight.append((output, sampling))
        if in_flight and (len(in_flight) >= batches_in_flight or not output.total_num_scheduled_tokens):
            done, sampling = in_flight.popleft()
            ids = list(done.num_scheduled_tokens)
            scheduler.update_from_output(done, ModelRunnerOutput(
                req_ids=ids, req_id_to_index={rid: i for i, rid in enumerate(ids)},
                sampled_token_ids=[[STAND_IN_TOKEN] if rid in sampling else [] for rid in ids]))
        steps += 1
        if watch.settled(scheduler):
            return {**watch.state(scheduler), "steps": steps}
    raise RuntimeError(f"the replay did not settle in {max_steps} steps ({len(scheduler.running)} running, "
                       f"{len(scheduler.waiting)} waiting)")
