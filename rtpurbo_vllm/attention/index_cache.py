"""The indexer-key side cache: one 16-dim key per token and retrieval query head, in paged blocks.

``RTPurboIndexCache`` is a parameter-free layer that registers itself in vLLM's static forward
context, so vLLM's KV-cache manager sizes and allocates it next to the attention layer's K/V pages.
Its spec is key-only (``MLAAttentionSpec``: one vector per token, not K and V) with the attention
layers' block size, so vLLM puts it in the same KV-cache group as the K/V pages
(``UniformTypeKVCacheSpecs``): a block id means the same tokens in both caches and the attention
layer's block table and slot mapping address both. The same pattern as vLLM's DeepSeek-V3.2 and
MiniMax-M3 indexer caches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionMetadata,
    AttentionMetadataBuilder,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import KVCacheSpec, MLAAttentionSpec


class RTPurboIndexCacheBackend(AttentionBackend):
    """Describes the side cache's layout: ``[num_blocks, block_size, HR * DI]`` (bf16/fp16)."""

    @staticmethod
    def get_name() -> str:
        return "RTPURBO_INDEX_CACHE"

    @staticmethod
    def get_impl_cls():
        raise NotImplementedError("the RTPurbo index cache is written and read by the RTPURBO attention impl")

    @staticmethod
    def get_builder_cls() -> type["RTPurboIndexCacheMetadataBuilder"]:
        return RTPurboIndexCacheMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes() -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                           cache_dtype_str: str = "auto") -> tuple[int, ...]:
        return (num_blocks, block_size, head_size)

    @staticmethod
    def get_kv_cache_stride_order(include_num_layers_dimension: bool = False) -> tuple[int, ...]:
        if include_num_layers_dimension:
            raise NotImplementedError
        return (0, 1, 2)


@dataclass
class RTPurboIndexCacheMetadata(AttentionMetadata):
    """Empty: the attention impl addresses the side cache through its own metadata."""


class RTPurboIndexCacheMetadataBuilder(AttentionMetadataBuilder[RTPurboIndexCacheMetadata]):
    """vLLM wants a builder per backend; the side cache needs no per-step state of its own."""

    # The side cache launches nothing, so it never limits CUDA-graph capture.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.ALWAYS

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> RTPurboIndexCacheMetadata:
        return RTPurboIndexCacheMetadata()


class RTPurboIndexCache(nn.Module, AttentionLayerBase):
    """Side-cache layer of one attention layer; vLLM binds ``kv_cache`` ``[num_blocks, P, S * DI]``.

    Args:
        prefix: unique layer name with exactly one numeric component (the layer index).
        num_heads: retrieval query heads of the layer on this rank (HR >= 0).
        num_slots: S, heads the cache has room for: the same on every tensor-parallel rank (vLLM
            requires equal specs), so the most any rank serves (``tp.index_slots``); ``HR <= S``.
        index_dim: DI, the indexer dimension (16).
        dtype: cache dtype (the model's activation dtype).
        vllm_config: the engine config; the layer registers itself in its static forward context.
    """

    def __init__(self, prefix: str, num_heads: int, num_slots: int, index_dim: int, dtype: torch.dtype,
                 vllm_config: VllmConfig) -> None:
        super().__init__()
        if not 0 <= num_heads <= num_slots or num_slots <= 0:
            raise ValueError(f"{prefix}: an index cache needs 0 <= heads <= slots and slots > 0, got "
                             f"{num_heads} heads, {num_slots} slots")
        self.prefix = prefix
        self.num_heads = num_heads
        self.num_slots = num_slots
        self.index_dim = index_dim
        self.dtype = dtype
        self.kv_cache = torch.tensor([])
        context = vllm_config.compilation_config.static_forward_context
        if prefix in context:
            raise ValueError(f"Duplicate layer name: {prefix}")
        context[prefix] = self

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> KVCacheSpec:
        return MLAAttentionSpec(block_size=vllm_config.cache_config.block_size, num_kv_heads=1,
                                head_size=self.num_slots * self.index_dim, dtype=self.dtype)

    def get_attn_backend(self) -> type[AttentionBackend]:
        return RTPurboIndexCacheBackend

    def paged_view(self) -> torch.Tensor:
        """This rank's heads of the bound cache, ``[num_blocks, P, HR, DI]`` (a strided view)."""
        full = self.kv_cache.view(*self.kv_cache.shape[:2], self.num_slots, self.index_dim)
        return full[:, :, :self.num_heads]

    def forward(self) -> None:
        """Never called: the attention impl writes and reads this cache."""
