"""``RTPurboAttentionBackend``: the static description vLLM reads to select and size the backend.

vLLM resolves this class through the ``CUSTOM`` slot that :mod:`rtpurbo_vllm.plugin` fills. It
holds no tensors and queries no device.

State: the serving path (metadata builder and impl, issue #4) is not written yet, so
:meth:`supports_combination` refuses every configuration with a message saying so; vLLM then stops
at start-up with that reason instead of failing later inside a forward pass.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from vllm.v1.attention.backend import AttentionBackend, MultipleOf

NOT_READY = ("the RTPURBO serving kernels are not implemented in this version of rtpurbo-vllm; "
             "serve with --attention-backend FLASH_ATTN until a release with the RTPURBO impl")


class RTPurboAttentionBackend(AttentionBackend):
    """RTPurbo head-wise sparse attention (retrieval heads dense / top-p; local heads sink + window)."""

    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16]

    @staticmethod
    def get_name() -> str:
        # vLLM maps this name back through AttentionBackendEnum in every worker; "CUSTOM" always
        # resolves there, even before the plugin installs the RTPURBO alias.
        return "CUSTOM"

    @staticmethod
    def get_supported_kernel_block_sizes() -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [64, 128]

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                           cache_dtype_str: str = "auto") -> tuple[int, ...]:
        """``(2, num_blocks, block_size, num_kv_heads, head_size)``: K and V pages, FlashAttention's layout."""
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    @classmethod
    def supports_combination(cls, head_size, dtype, kv_cache_dtype, block_size, use_mla, has_sink,
                             use_sparse, use_mm_prefix, device_capability) -> str | None:
        return NOT_READY

    @staticmethod
    def get_impl_cls():
        raise NotImplementedError(NOT_READY)

    @staticmethod
    def get_builder_cls():
        raise NotImplementedError(NOT_READY)
