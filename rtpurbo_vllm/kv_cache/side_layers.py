"""Side-cache layers of the RTPurbo KV layout and the one call that installs them on a layer.

:func:`install_kv_layout` turns one vLLM ``Attention`` layer (prefix ``p``) into the three caches of
:mod:`.layout`:

* ``p`` itself declares ``RTPurboFullSpec(R heads)`` (a per-instance ``get_kv_cache_spec``; the
  class and other layers are untouched). vLLM binds ``layer.kv_cache``: FlashAttention's layout,
  ``[B, R, Pf, 2D]`` logical / ``[B, Pf, R, 2D]`` physical; K = ``[..., :D]``, V = ``[..., D:]``.
* ``p.rtp_window`` (:class:`RTPurboWindowCache`, only when R < H) declares
  ``SinkWindowSpec(H-R heads)``; its ``kv_cache`` has the same layout with H - R heads and block
  size Pw.
* ``p.rtp_index`` (:class:`RTPurboPlannedIndexCache`, only when n > 0) declares
  ``RTPurboIndexSpec(DI*n)``; its ``kv_cache`` is ``[B, Pi, DI*n]``.

Each cache lives in its own vLLM KV-cache group, so each has its **own block table and slot
mapping**. The side layers' metadata (:class:`SideCacheMetadata`, built once per step and group)
carries them; the impl reads them with ``get_forward_context().attn_metadata[name]``. The side
layers are parameter-free, register themselves in ``static_forward_context`` (so vLLM sizes,
allocates and binds them) and launch nothing.
"""

from __future__ import annotations

import types
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
)
from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend
from vllm.v1.kv_cache_interface import KVCacheSpec, get_kv_quant_mode

from rtpurbo_vllm.attention.index_cache import RTPurboIndexCache, RTPurboIndexCacheBackend
from rtpurbo_vllm.kv_cache.layout import KVLayoutPlan
from rtpurbo_vllm.kv_cache.specs import full_spec, index_spec, window_spec

WINDOW_SUFFIX = "rtp_window"
INDEX_SUFFIX = "rtp_index"


@dataclass
class SideCacheMetadata(AttentionMetadata):
    """Per step: how one side cache's group addresses its pages (references to vLLM's persistent
    buffers, so a captured CUDA graph replays with the current step's values).

    Attributes:
        block_table: ``[num_reqs(+pad), max_blocks]`` int32: the group's block table, in kernel
            blocks (the group's block size; out-of-window blocks are vLLM's null block 0).
        slot_mapping: ``[num_tokens(+pad)]`` int64: the cache slot of each scheduled token (-1 = none).
        seq_lens: ``[num_reqs(+pad)]`` int32: tokens per request after this step.
    """

    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    seq_lens: torch.Tensor


class SideCacheMetadataBuilder(AttentionMetadataBuilder[SideCacheMetadata]):
    """Hands a side cache its group's block table and slot mapping; launches nothing."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.ALWAYS

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> SideCacheMetadata:
        m = common_attn_metadata
        return SideCacheMetadata(block_table=m.block_table_tensor, slot_mapping=m.slot_mapping, seq_lens=m.seq_lens)


class RTPurboWindowCacheBackend(FlashAttentionBackend):
    """FlashAttention's paged K/V layout (so FA and the Triton kernels read it unchanged):
    ``[B, H-R, Pw, 2D]`` logical, ``[B, Pw, H-R, 2D]`` physical (NHD)."""

    @staticmethod
    def get_name() -> str:
        return "RTPURBO_WINDOW_CACHE"

    @staticmethod
    def get_impl_cls():
        raise NotImplementedError("the RTPurbo window cache is written and read by the RTPURBO attention impl")

    @staticmethod
    def get_builder_cls() -> type[SideCacheMetadataBuilder]:
        return SideCacheMetadataBuilder


class RTPurboPlannedIndexCacheBackend(RTPurboIndexCacheBackend):
    """``[B, Pi, DI*n]``; unlike the design-A index cache it has its own group, hence metadata."""

    @staticmethod
    def get_builder_cls() -> type[SideCacheMetadataBuilder]:
        return SideCacheMetadataBuilder


class RTPurboWindowCache(nn.Module, AttentionLayerBase):
    """The window KV heads of one layer: sink tokens + sliding window, bound ``kv_cache``
    ``[B, H-R, Pw, 2D]`` (logical; physical NHD).

    Args:
        prefix: ``f"{attention_prefix}.rtp_window"`` (exactly one numeric component).
        plan: the layout plan.
        dtype: the K/V cache dtype (the ``Attention`` layer's ``kv_cache_torch_dtype``).
        kv_cache_dtype: the ``Attention`` layer's ``kv_cache_dtype`` string (quantisation mode).
        vllm_config: the layer registers itself in its static forward context.
    """

    def __init__(self, prefix: str, plan: KVLayoutPlan, dtype: torch.dtype, kv_cache_dtype: str,
                 vllm_config: VllmConfig) -> None:
        super().__init__()
        if not plan.has_window_cache:
            raise ValueError(f"{prefix}: the plan keeps every KV head in full")
        self.prefix = self.layer_name = prefix
        self.plan = plan
        self.dtype = dtype
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_cache = torch.tensor([])
        _register(prefix, self, vllm_config)

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> KVCacheSpec:
        return window_spec(self.plan, self.dtype, kv_quant_mode=get_kv_quant_mode(self.kv_cache_dtype))

    def get_attn_backend(self) -> type[AttentionBackend]:
        return RTPurboWindowCacheBackend

    def key_value(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The bound cache as ``(k, v)``, each ``[B, Pw, H-R, D]`` (strided views)."""
        return _split_kv(self.kv_cache)

    def forward(self) -> None:
        """Never called: the attention impl writes and reads this cache."""


class RTPurboPlannedIndexCache(RTPurboIndexCache):
    """The index keys of one layer in the planned layout: ``n`` slots (padded), block size Pi.

    Slot ``j < len(plan.retrieval_heads[layer])`` holds retrieval query head
    ``plan.retrieval_heads[layer][j]``; higher slots are padding (never written or read).
    """

    def __init__(self, prefix: str, plan: KVLayoutPlan, dtype: torch.dtype, vllm_config: VllmConfig) -> None:
        super().__init__(prefix, plan.index_width, plan.index_width, plan.index_dim, dtype, vllm_config)
        self.layer_name = prefix
        self.plan = plan

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> KVCacheSpec:
        return index_spec(self.plan, self.dtype)

    def get_attn_backend(self) -> type[AttentionBackend]:
        return RTPurboPlannedIndexCacheBackend


@dataclass(frozen=True)
class LayerKVCaches:
    """What :func:`install_kv_layout` set up for one layer (the impl keeps it).

    Attributes:
        layer_name: the ``Attention`` layer (its spec now has R heads).
        layer: its index (``extract_layer_index``).
        window: the window side layer (None when R == H).
        index: the index side layer (None when n == 0).
        full_kv_index: ``[R]`` int64: rank KV head of each full-cache head.
        window_kv_index: ``[H-R]`` int64: rank KV head of each window-cache head.
    """

    layer_name: str
    layer: int
    window: RTPurboWindowCache | None
    index: RTPurboPlannedIndexCache | None
    full_kv_index: torch.Tensor
    window_kv_index: torch.Tensor


def install_kv_layout(attn_layer: nn.Module, plan: KVLayoutPlan, vllm_config: VllmConfig,
                      index_dtype: torch.dtype | None = None) -> LayerKVCaches:
    """Gives ``attn_layer`` (a vLLM ``Attention``) the planned layout; call once per layer, before
    vLLM collects KV-cache specs (e.g. in the impl's ``process_weights_after_loading``).

    Replaces only this instance's ``get_kv_cache_spec`` (R heads, block size Pf) and creates the
    window and index side layers under ``{layer_name}.rtp_window`` / ``{layer_name}.rtp_index``.
    """
    from vllm.model_executor.models.utils import extract_layer_index

    name = attn_layer.layer_name
    layer = extract_layer_index(name)
    if (attn_layer.num_kv_heads, attn_layer.head_size) != (plan.num_kv_heads, plan.head_size):
        raise ValueError(f"{name}: the plan is for {plan.num_kv_heads} KV heads of size {plan.head_size}, the "
                         f"layer has {attn_layer.num_kv_heads} of size {attn_layer.head_size}")
    if getattr(attn_layer, "_rtpurbo_kv_layout", None) is not None:
        raise RuntimeError(f"{name}: the RTPurbo KV layout is already installed")
    dtype = attn_layer.kv_cache_torch_dtype
    quant_mode = get_kv_quant_mode(attn_layer.kv_cache_dtype)

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> KVCacheSpec:
        return full_spec(plan, dtype, head_size_v=self.head_size_v, kv_quant_mode=quant_mode)

    attn_layer.get_kv_cache_spec = types.MethodType(get_kv_cache_spec, attn_layer)
    window = index = None
    if plan.has_window_cache:
        window = RTPurboWindowCache(f"{name}.{WINDOW_SUFFIX}", plan, dtype, attn_layer.kv_cache_dtype, vllm_config)
    if plan.has_index_cache:
        index = RTPurboPlannedIndexCache(f"{name}.{INDEX_SUFFIX}", plan, index_dtype or plan.index_dtype,
                                         vllm_config)
    caches = LayerKVCaches(layer_name=name, layer=layer, window=window, index=index,
                           full_kv_index=plan.full_kv_index(layer), window_kv_index=plan.window_kv_index(layer))
    attn_layer._rtpurbo_kv_layout = caches
    return caches


def split_key_value(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A FlashAttention-layout cache (``[B, H, P, 2D]`` logical) as ``(k, v)``, each ``[B, P, H, D]``."""
    return _split_kv(kv_cache)


def _split_kv(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = kv_cache.shape[-1] // 2
    nhd = kv_cache.transpose(1, 2)
    return nhd[..., :d], nhd[..., d:]


def _register(prefix: str, layer: nn.Module, vllm_config: VllmConfig) -> None:
    context = vllm_config.compilation_config.static_forward_context
    if prefix in context:
        raise ValueError(f"Duplicate layer name: {prefix}")
    context[prefix] = layer
