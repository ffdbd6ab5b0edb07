"""Cache units as vLLM layers, and the one call that installs a layer's share of a :class:`KVLayout`.

:func:`install_kv_layout` runs once per ``Attention`` layer (before vLLM collects KV-cache specs):

* the layer itself becomes full unit ``layer`` (a per-instance ``get_kv_cache_spec``; the class and
  other layers are untouched). vLLM binds ``layer.kv_cache`` in FlashAttention's layout,
  ``[B, slots, P, 2D]`` logical / ``[B, P, slots, 2D]`` physical; K = ``[..., :D]``, V = ``[..., D:]``;
* the layer creates the side units homed at it (:meth:`KVLayout.side_units`), each a
  :class:`RTPurboCacheUnit` named by :func:`rtpurbo_vllm.kv_cache.layout.unit_name`: K/V units bound
  like the layer's own cache, index units ``[B, P, slots * DI]``.

Units of one kind share a spec, so vLLM puts them in one KV-cache group with **one block table and
slot mapping**: the compact layout has three groups (full, window, index); the full layout one (its
units share a block size). Side units' metadata (:class:`UnitMetadata`, built once per step and
group) carries the group's tables; the impl reads it with
``get_forward_context().attn_metadata[name]``. Side units have no parameters, register themselves in
``static_forward_context`` (so vLLM sizes, allocates and binds them) and launch nothing.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, replace
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
from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend
from vllm.v1.kv_cache_interface import KVCacheSpec, get_kv_quant_mode

from rtpurbo_vllm.kv_cache.layout import FULL, INDEX, KVLayout, unit_name
from rtpurbo_vllm.kv_cache.specs import unit_spec


@dataclass
class UnitMetadata(AttentionMetadata):
    """Per step: how one group of units addresses its pages (references to vLLM's persistent
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


class UnitMetadataBuilder(AttentionMetadataBuilder[UnitMetadata]):
    """Hands a unit its group's block table and slot mapping; launches nothing."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.ALWAYS

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> UnitMetadata:
        m = common_attn_metadata
        return UnitMetadata(block_table=m.block_table_tensor, slot_mapping=m.slot_mapping, seq_lens=m.seq_lens)


class _UnitBackend:
    """What every unit backend shares: no impl (the RTPURBO attention impl writes and reads units)
    and the :class:`UnitMetadataBuilder`."""

    @staticmethod
    def get_impl_cls():
        raise NotImplementedError("RTPurbo cache units are written and read by the RTPURBO attention impl")

    @staticmethod
    def get_builder_cls() -> type[UnitMetadataBuilder]:
        return UnitMetadataBuilder


class RTPurboKVUnitBackend(_UnitBackend, FlashAttentionBackend):
    """FlashAttention's paged K/V layout (so FA3 and the Triton kernels read it unchanged):
    ``[B, slots, P, 2D]`` logical, ``[B, P, slots, 2D]`` physical (NHD)."""

    @staticmethod
    def get_name() -> str:
        return "RTPURBO_KV_UNIT"


class RTPurboIndexUnitBackend(_UnitBackend, AttentionBackend):
    """The index unit's layout: ``[B, P, slots * DI]`` (the model's activation dtype)."""

    @staticmethod
    def get_name() -> str:
        return "RTPURBO_INDEX_UNIT"

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


class RTPurboCacheUnit(nn.Module, AttentionLayerBase):
    """One side unit (any kind) of a :class:`KVLayout`; vLLM binds its ``kv_cache``.

    Args:
        prefix: its name (:func:`unit_name`; exactly one numeric component).
        spec: its vLLM spec (:func:`rtpurbo_vllm.kv_cache.specs.unit_spec`).
        kind: ``"full"``, ``"window"`` or ``"index"``.
        vllm_config: the unit registers itself in its static forward context.
    """

    def __init__(self, prefix: str, spec: KVCacheSpec, kind: str, vllm_config: VllmConfig) -> None:
        super().__init__()
        self.prefix = self.layer_name = prefix
        self.spec = spec
        self.kind = kind
        self.kv_cache = torch.tensor([])
        context = vllm_config.compilation_config.static_forward_context
        if prefix in context:
            raise ValueError(f"Duplicate layer name: {prefix}")
        context[prefix] = self

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> KVCacheSpec:
        return self.spec

    def get_attn_backend(self) -> type[AttentionBackend]:
        return RTPurboIndexUnitBackend if self.kind == INDEX else RTPurboKVUnitBackend

    def forward(self) -> None:
        """Never called: the attention impl writes and reads this unit."""


def unit_tensor(kv_cache: torch.Tensor, kind: str, width: int) -> torch.Tensor:
    """A bound unit cache as ``[B, P, slots, width]`` (contiguous): K/V units from FlashAttention's
    logical ``[B, slots, P, 2D]``, index units from ``[B, P, slots * DI]``."""
    if kind == INDEX:
        return kv_cache.view(*kv_cache.shape[:2], -1, width)
    return kv_cache.transpose(1, 2)


def layer_unit_specs(layout: KVLayout, layer_names: tuple[str, ...], layer: int, kv_cache_dtype: str,
                     head_size_v: int) -> dict[str, tuple[str, KVCacheSpec]]:
    """``{name: (kind, spec)}`` of what layer ``layer`` (of ``layer_names``, model order) declares: its own
    full unit under its own name, then the side units homed at it; K/V specs in ``kv_cache_dtype``
    (vLLM's ``--kv-cache-dtype``), index specs in the layout's index dtype."""
    kv_kwargs = dict(kv_quant_mode=get_kv_quant_mode(kv_cache_dtype), head_size_v=head_size_v)
    specs = {layer_names[layer]: (FULL, unit_spec(layout.units[FULL], layout, **kv_kwargs))}
    for kind, unit in layout.side_units(layer):
        shape = layout.units[kind]
        specs[unit_name(layer_names, kind, unit)] = (kind, unit_spec(shape, layout) if kind == INDEX
                                                     else unit_spec(shape, layout, **kv_kwargs))
    return specs


def collected_specs(layout: KVLayout, layer_names: tuple[str, ...], kv_cache_dtype: str,
                    vllm_config: VllmConfig) -> dict[str, KVCacheSpec]:
    """The specs vLLM's workers collect from a model whose layers installed ``layout``: the attention
    layers' in model order, then the side units' (registered after them), each stamped with its
    backend's block-stride flag as the model runner stamps it."""
    from vllm.config import set_current_vllm_config

    declared = [layer_unit_specs(layout, layer_names, i, kv_cache_dtype, layout.head_size)
                for i in range(layout.num_layers)]
    ordered = [(name, kind, spec) for specs in declared for name, (kind, spec) in specs.items()
               if name in layer_names]
    ordered += [(name, kind, spec) for specs in declared for name, (kind, spec) in specs.items()
                if name not in layer_names]
    with set_current_vllm_config(vllm_config):
        stride = {kind: (RTPurboIndexUnitBackend if kind == INDEX else RTPurboKVUnitBackend).indexes_kv_by_block_stride()
                  for kind in {kind for _, kind, _ in ordered}}
    return {name: replace(spec, indexes_kv_by_block_stride=stride[kind]) for name, kind, spec in ordered}


def install_kv_layout(attn_layer: nn.Module, layout: KVLayout, layer_names: tuple[str, ...],
                      vllm_config: VllmConfig) -> None:
    """Makes ``attn_layer`` (a vLLM ``Attention``, one of ``layer_names`` in model order) full unit
    ``i`` of ``layout`` and creates the side units homed at it; call once per layer, before vLLM
    collects KV-cache specs (e.g. in the impl's ``process_weights_after_loading``)."""
    name = attn_layer.layer_name
    layer = layer_names.index(name)
    if (attn_layer.num_kv_heads, attn_layer.head_size) != (layout.num_kv_heads, layout.head_size):
        raise ValueError(f"{name}: the layout is for {layout.num_kv_heads} KV heads of size {layout.head_size}, "
                         f"the layer has {attn_layer.num_kv_heads} of size {attn_layer.head_size}")
    if getattr(attn_layer, "_rtpurbo_kv_layout", None) is not None:
        raise RuntimeError(f"{name}: the RTPurbo KV layout is already installed")
    specs = layer_unit_specs(layout, layer_names, layer, attn_layer.kv_cache_dtype, attn_layer.head_size_v)
    _, own_spec = specs.pop(name)
    attn_layer.get_kv_cache_spec = types.MethodType(lambda self, vllm_config: own_spec, attn_layer)
    for unit, (kind, spec) in specs.items():
        RTPurboCacheUnit(unit, spec, kind, vllm_config)
    attn_layer._rtpurbo_kv_layout = layout
