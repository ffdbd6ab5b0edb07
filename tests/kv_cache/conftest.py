"""Helpers for the KV-layout tests: real vLLM configs, spec dicts as the workers collect them, a
KV-cache manager and requests the way the scheduler drives them."""

from __future__ import annotations

import pytest
import torch
import transformers

import rtpurbo_vllm.kv_cache  # noqa: F401  (registers the specs)
from rtpurbo_vllm.kv_cache import INDEX, KVLayout, unit_spec

MAX_POSITIONS = 262144


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A local folder with a small Llama config.json (only max_model_len matters to these tests)."""
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             max_position_embeddings=MAX_POSITIONS,
                             architectures=["LlamaForCausalLM"]).save_pretrained(path)
    return path


@pytest.fixture
def make_config(model_dir):
    """``make_config(max_model_len, ...)``: a real ``VllmConfig`` (CPU device, hybrid allocator on)."""
    from vllm.config import CacheConfig, DeviceConfig, ModelConfig, SchedulerConfig, VllmConfig

    def make(max_model_len: int, *, prefix_caching: bool = True, max_num_batched_tokens: int = 2048):
        model_config = ModelConfig(model=str(model_dir), dtype="bfloat16", max_model_len=max_model_len,
                                   skip_tokenizer_init=True)
        scheduler = SchedulerConfig(max_model_len=max_model_len, is_encoder_decoder=False,
                                    max_num_batched_tokens=max(max_num_batched_tokens, 1),
                                    max_num_seqs=16, enable_chunked_prefill=True)
        config = VllmConfig(model_config=model_config, device_config=DeviceConfig("cpu"),
                            cache_config=CacheConfig(block_size=16, enable_prefix_caching=prefix_caching),
                            scheduler_config=scheduler)
        config.scheduler_config.disable_hybrid_kv_cache_manager = False
        return config

    return make


def layer_name(i: int) -> str:
    return f"model.layers.{i}.self_attn.attn"


def layer_names(num_layers: int) -> tuple[str, ...]:
    return tuple(layer_name(i) for i in range(num_layers))


def model_specs(layout: KVLayout, *, fa_stride: bool = True) -> dict:
    """The spec dict a worker would report: the attention layers first (built with the model, full
    units ``< L``), then the side units (built after weight loading), with the backends'
    block-stride flags stamped (K/V units use FlashAttention's layout)."""
    from dataclasses import replace

    names = layer_names(layout.num_layers)
    specs = {}
    for kind, shape in layout.units.items():
        spec = unit_spec(shape, layout)
        if kind != INDEX:
            spec = replace(spec, indexes_kv_by_block_stride=fa_stride)
        for name in layout.unit_names(names, kind):
            specs[name] = spec
    main = {n: specs.pop(n) for n in names}
    return {**main, **specs}


def dense_specs(num_layers: int, num_kv_heads: int, head_size: int, dtype=torch.bfloat16) -> dict:
    """vLLM's stock spec of every layer (all KV heads, every token)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    return {layer_name(i): FullAttentionSpec(block_size=16, num_kv_heads=num_kv_heads, head_size=head_size,
                                             dtype=dtype, indexes_kv_by_block_stride=True)
            for i in range(num_layers)}


class Engine:
    """A real ``KVCacheManager`` over a real ``KVCacheConfig``, driven like the scheduler does."""

    def __init__(self, vllm_config, specs: dict, num_blocks: int, enable_caching: bool = True):
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_manager import KVCacheManager
        from vllm.v1.core.kv_cache_utils import (
            get_kv_cache_configs,
            get_request_block_hasher,
            init_none_hash,
            resolve_kv_cache_block_sizes,
        )

        vllm_config.cache_config.num_gpu_blocks_override = num_blocks
        self.config = get_kv_cache_configs(vllm_config, [specs], [1 << 40])[0]
        assert self.config.num_blocks == num_blocks
        self.scheduler_block_size, self.hash_block_size = resolve_kv_cache_block_sizes(self.config, vllm_config)
        init_none_hash(sha256)
        self.hasher = get_request_block_hasher(self.hash_block_size, sha256)
        self.manager = KVCacheManager(self.config, vllm_config.model_config.max_model_len,
                                      scheduler_block_size=self.scheduler_block_size,
                                      hash_block_size=self.hash_block_size,
                                      max_in_flight_tokens=vllm_config.max_in_flight_tokens,
                                      enable_caching=enable_caching)
        self.groups = {type(g.kv_cache_spec).__name__: i for i, g in enumerate(self.config.kv_cache_groups)}

    def request(self, request_id: str, tokens: list[int]):
        from vllm import SamplingParams
        from vllm.v1.request import Request

        return Request(request_id, list(tokens), SamplingParams(max_tokens=1 << 20), None,
                       block_hasher=self.hasher)

    def admit(self, request, first_chunk: int | None = None, must_fit: bool = False) -> int:
        """Schedules a waiting request's first chunk (after a prefix lookup); returns the hit length."""
        computed, num_hit, _ = self.manager.get_computed_blocks(request)
        chunk = (request.num_tokens - num_hit) if first_chunk is None else min(first_chunk,
                                                                              request.num_tokens - num_hit)
        blocks = self.manager.allocate_slots(request, chunk, num_hit, computed, full_sequence_must_fit=must_fit)
        if blocks is None:
            return -1
        request.num_computed_tokens = num_hit + chunk
        return num_hit

    def step(self, request, num_tokens: int) -> bool:
        """Schedules ``num_tokens`` more prompt tokens of a running request."""
        num_tokens = min(num_tokens, request.num_tokens - request.num_computed_tokens)
        if self.manager.allocate_slots(request, num_tokens) is None:
            return False
        request.num_computed_tokens += num_tokens
        return True

    def decode(self, request, token: int = 7) -> bool:
        """Appends one sampled token and schedules it."""
        request.append_output_token_ids(token)
        return self.step(request, 1)

    def blocks(self, request, spec_name: str) -> list:
        return self.manager.coordinator.get_blocks(request.request_id)[self.groups[spec_name]]

    def spec(self, spec_name: str):
        return self.config.kv_cache_groups[self.groups[spec_name]].kv_cache_spec

    @property
    def num_free(self) -> int:
        return self.manager.block_pool.get_num_free_blocks()


@pytest.fixture(scope="session")
def kv():
    """The helpers above (``--import-mode=importlib`` keeps test modules from importing conftest)."""
    import types

    return types.SimpleNamespace(Engine=Engine, model_specs=model_specs, dense_specs=dense_specs,
                                 layer_name=layer_name, layer_names=layer_names)
