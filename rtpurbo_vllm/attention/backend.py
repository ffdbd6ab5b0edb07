"""``RTPurboAttentionBackend``: the static description vLLM reads to select and size the backend.

vLLM resolves this class through the ``CUSTOM`` slot that :mod:`rtpurbo_vllm.plugin` fills. It holds
no tensors and queries no device. The layer's own cache is a full unit of the KV layout
(:mod:`rtpurbo_vllm.kv_cache`) in FlashAttention's layout (``[num_blocks, slots, P, 2 * D]`` logical,
``[num_blocks, P, slots, 2 * D]`` physical); the other units are side layers with backends of their
own (:mod:`rtpurbo_vllm.kv_cache.side_layers`). FP8 KV caches (``fp8``, ``fp8_e4m3``) are supported.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend


class RTPurboAttentionBackend(FlashAttentionBackend):
    """RTPurbo head-wise sparse attention (retrieval heads dense / top-p; local heads sink + window)."""

    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16]
    forward_includes_kv_cache_update: bool = True

    @staticmethod
    def get_name() -> str:
        # vLLM maps this name back through AttentionBackendEnum in every worker; "CUSTOM" always
        # resolves there, even before the plugin installs the RTPURBO alias.
        return "CUSTOM"

    @staticmethod
    def get_impl_cls():
        from rtpurbo_vllm.attention.impl import RTPurboAttentionImpl

        return RTPurboAttentionImpl

    @staticmethod
    def get_builder_cls():
        from rtpurbo_vllm.attention.builder import RTPurboMetadataBuilder

        return RTPurboMetadataBuilder

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [64, 128]

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size in cls.get_supported_head_sizes()

    @classmethod
    def supports_kv_cache_dtype(cls, kv_cache_dtype) -> bool:
        return kv_cache_dtype in (None, "auto", "float16", "bfloat16", "fp8", "fp8_e4m3")

    @classmethod
    def supports_sink(cls) -> bool:
        return False

    @classmethod
    def supports_mm_prefix(cls) -> bool:
        return False

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_non_causal(cls) -> bool:
        return False

    @classmethod
    def supports_batch_invariance(cls) -> bool:
        return False

    @classmethod
    def supports_per_head_quant_scales(cls) -> bool:
        return False

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        from vllm.v1.attention.backend import AttentionType

        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_compute_capability(cls, capability) -> bool:
        # FlashAttention-3 (prefill) needs Hopper; the Triton decode kernels run anywhere.
        return capability is None or capability.major == 9

    @classmethod
    def supports_combination(cls, head_size, dtype, kv_cache_dtype, block_size, use_mla, has_sink,
                             use_sparse, use_mm_prefix, device_capability) -> str | None:
        # FlashAttention's own rule (sinks below SM90, mm-prefix without FA4) does not apply: both are
        # refused above.
        return None
