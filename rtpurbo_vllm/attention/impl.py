"""``RTPurboAttentionImpl``: the "run" half of the backend; ``forward`` only launches kernels.

Per layer and step (tokens ordered decodes first, see :mod:`rtpurbo_vllm.attention.metadata`):

1. the new tokens' K/V go into vLLM's paged cache (FlashAttention layout, all KV heads); with
   ``kv_layout="split"`` the full KV heads' K/V go into the layer's own cache and the others' into
   the window side cache, each with its own slot mapping;
2. their 16-dim index keys (RoPE undone, projected per retrieval head) go into the side cache;
3. decode tokens: index queries -> block top-p per retrieval head -> head-wise sparse decode
   (retrieval heads over their kept blocks, local heads over sinks + window);
4. prefill tokens: head-wise prefill (retrieval heads dense causal, local heads sinks + window).

CUDA graphs: a pure-decode step (padded to a capture size: padded requests have ``seq_len`` 0, the
null block and slot -1) runs steps 1-3 only, with launch grids fixed by the padded batch size and
every tensor a view of vLLM's persistent buffers, the builder's workspace, the caches or the layer's
plan, so vLLM captures it whole and replays it (:mod:`rtpurbo_vllm.attention.builder`). Padded rows
write no cache entry and produce output 0. The prefill path (step 4) always runs eagerly.

Everything that depends only on the layer (its retrieval heads on this rank, indexer weights, the
RoPE table, the prefill plan, the side caches) is prepared once in
:meth:`RTPurboAttentionImpl.process_weights_after_loading`.

KV layouts (``--additional-config '{"rtpurbo": {"kv_layout": ...}}'``):

* ``"full"`` (default): the layer's cache keeps every KV head; the index keys live in a side cache
  of the same KV-cache group (:mod:`rtpurbo_vllm.attention.index_cache`), addressed by the layer's
  block table and slot mapping.
* ``"split"``: :func:`rtpurbo_vllm.kv_cache.side_layers.install_kv_layout` gives the layer's cache
  only the R full KV heads and adds the window and index side layers, each its own KV-cache group
  whose block table and slot mapping come from ``get_forward_context().attn_metadata[side name]``.
  The window cache keeps ``max(window, dense_threshold - 1)`` tokens, so dense sequences find
  every key of their local heads there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from vllm.config import get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionImpl, AttentionType

from rtpurbo_vllm.attention.index_cache import RTPurboIndexCache
from rtpurbo_vllm.kv_cache.layout import KVLayoutPlan, serving_window
from rtpurbo_vllm.kv_cache.side_layers import RTPurboWindowCache, install_kv_layout
from rtpurbo_vllm.attention.metadata import RTPurboMetadata
from rtpurbo_vllm.attention.prefill import RTPurboPrefillPlan, headwise_prefill, headwise_prefill_torch
from rtpurbo_vllm.attention.serving_config import kv_layout_for, serving_artifact
from rtpurbo_vllm.attention.tp import index_slots, rank_indexer, rank_layout, tp_rank_and_size
from rtpurbo_vllm.rope import RopeSpec
from rtpurbo_vllm.triton_kernels.block_topp import block_topp
from rtpurbo_vllm.triton_kernels.index_keys import index_queries, rope_table, write_index_keys
from rtpurbo_vllm.triton_kernels.sparse_decode import headwise_sparse_decode

INDEX_CACHE_SUFFIX = "rtpurbo_index"
_ROPE_TABLES: dict[tuple[RopeSpec, torch.device], torch.Tensor] = {}


@dataclass
class _LayerPlan:
    """What one layer needs at every step, on this rank's device.

    Attributes:
        retrieval_heads: ``[HR]`` int32, rank-local retrieval query heads.
        kv_heads: ``[HR]`` int32, the KV head each of them reads.
        w_q: ``[HR, DI, D]`` model dtype, indexer query projections.
        w_k: ``[HR, DI, D]`` model dtype, indexer key projections.
        index_cache: the side-cache layer (None when the layer has no retrieval head on this rank);
            in the split layout its first HR of ``n`` slots hold the retrieval heads in order.
        prefill: the prefill head split.
        split: the split layout's caches of this layer (None in the full layout).
    """

    retrieval_heads: torch.Tensor
    kv_heads: torch.Tensor
    w_q: torch.Tensor
    w_k: torch.Tensor
    index_cache: RTPurboIndexCache | None
    prefill: RTPurboPrefillPlan
    split: _SplitCaches | None = None


@dataclass
class _SplitCaches:
    """The split layout of one layer (``kv_layout="split"``).

    Attributes:
        full_kv_heads: ``[R]`` int64, the KV heads of the layer's own cache, in slot order.
        window_kv_heads: ``[H-R]`` int64, the KV heads of the window cache, in slot order.
        kv_slots: ``[HKV]`` int32, per KV head its slot: ``j`` in the layer's cache, ``-1 - j`` in the
            window cache (the sparse decode kernel's ``kv_slots``).
        window: the window side layer (None when R == H).
    """

    full_kv_heads: torch.Tensor
    window_kv_heads: torch.Tensor
    kv_slots: torch.Tensor
    window: RTPurboWindowCache | None


class RTPurboAttentionImpl(AttentionImpl):
    """RTPurbo attention of one decoder layer (vLLM's ``AttentionImpl`` contract)."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes=None, sliding_window: int | None = None, kv_cache_dtype: str = "auto",
                 logits_soft_cap: float | None = None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, **kwargs) -> None:
        unsupported = {
            "ALiBi": alibi_slopes is not None,
            "a model-level sliding window": sliding_window is not None,
            "logit soft-capping": logits_soft_cap is not None,
            f"attention type {attn_type}": attn_type != AttentionType.DECODER,
            "KV-cache sharing between layers": kv_sharing_target_layer_name is not None,
            f"kv_cache_dtype={kv_cache_dtype}": kv_cache_dtype not in ("auto", "bfloat16", "float16"),
        }
        if any(unsupported.values()):
            names = ", ".join(name for name, bad in unsupported.items() if bad)
            raise ValueError(f"RTPURBO does not support {names}; serve this model with "
                             "--attention-backend FLASH_ATTN")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.vllm_config = get_current_vllm_config()
        self.artifact = serving_artifact(self.vllm_config)   # fails early, naming what is missing
        self.params = self.artifact.params
        self.rope = self.artifact.model.rope
        self.kv_layout = kv_layout_for(self.vllm_config)
        self.layer_name: str | None = None
        self.plan: _LayerPlan | None = None

    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        """Finds this impl's layer, slices the artifact for this rank, creates the side cache(s)."""
        context = self.vllm_config.compilation_config.static_forward_context
        names = [name for name, layer in context.items() if getattr(layer, "impl", None) is self]
        if len(names) != 1:
            raise RuntimeError(f"RTPURBO impl is registered under {len(names)} layers: {names}")
        self.layer_name = names[0]
        layer = extract_layer_index(self.layer_name)
        device = self.vllm_config.device_config.device
        layout = rank_layout(self.artifact.layout)
        if (layout.num_heads, layout.num_kv_heads) != (self.num_heads, self.num_kv_heads):
            raise ValueError(f"{self.layer_name}: the artifact gives this rank {layout.num_heads} query / "
                             f"{layout.num_kv_heads} KV heads, the layer has {self.num_heads} / "
                             f"{self.num_kv_heads}; was the artifact made for this model?")
        heads = layout.retrieval_heads[layer]
        w_q, w_k = rank_indexer(self.artifact.layout, layer, *self.artifact.indexer[layer])
        index_cache = split = None
        full_kv_heads = None
        if self.kv_layout == "split":
            attn_layer = context[self.layer_name]
            kv_plan = self._kv_layout_plan(attn_layer.kv_cache_torch_dtype, act_dtype)
            caches = install_kv_layout(attn_layer, kv_plan, self.vllm_config, index_dtype=act_dtype)
            full_kv_heads = caches.full_kv_index.tolist()
            slots = [j if kind == "full" else -1 - j for kind, j in kv_plan.kv_head_slots(layer)]
            split = _SplitCaches(full_kv_heads=caches.full_kv_index.to(device),
                                 window_kv_heads=caches.window_kv_index.to(device),
                                 kv_slots=torch.tensor(slots, dtype=torch.int32, device=device), window=caches.window)
            index_cache = caches.index if heads else None
        elif num_slots := index_slots(self.artifact.layout, layer):
            # every rank declares the cache, sized for the busiest rank (vLLM needs equal specs)
            cache = RTPurboIndexCache(f"{self.layer_name}.{INDEX_CACHE_SUFFIX}", len(heads), num_slots,
                                      self.params.index_dim, act_dtype, self.vllm_config)
            index_cache = cache if heads else None
        self.plan = _LayerPlan(
            retrieval_heads=torch.tensor(heads, dtype=torch.int32, device=device),
            kv_heads=torch.tensor([layout.kv_head_of(h) for h in heads], dtype=torch.int32, device=device),
            w_q=w_q.to(device=device, dtype=act_dtype).contiguous(),
            w_k=w_k.to(device=device, dtype=act_dtype).contiguous(),
            index_cache=index_cache,
            prefill=RTPurboPrefillPlan.build(heads, self.num_heads, self.num_kv_heads, device, full_kv_heads),
            split=split,
        )
        self.rope_table = _shared_rope_table(self.rope, torch.device(device))

    def _kv_layout_plan(self, kv_dtype: torch.dtype, index_dtype: torch.dtype) -> KVLayoutPlan:
        """This rank's split layout. Its window cache keeps ``max(window, dense_threshold - 1)``
        tokens, so a sequence shorter than ``dense_threshold`` (dense on every head) finds all its keys."""
        p = self.params
        rank, size = tp_rank_and_size()
        return KVLayoutPlan.build(self.artifact.layout, head_size=self.head_size, kv_dtype=kv_dtype,
                                  index_dtype=index_dtype, index_dim=p.index_dim, sink_tokens=p.sink_tokens,
                                  window=serving_window(p), tp_rank=rank, tp_size=size,
                                  block_unit=self.vllm_config.cache_config.block_size)

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: RTPurboMetadata | None, output: torch.Tensor,
                output_scale: torch.Tensor | None = None, output_block_scale: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor:
        """One layer's attention for a step.

        Args:
            layer: vLLM's ``Attention`` module (for the KV scales).
            query: ``[T_pad, HQ, D]`` post-RoPE.
            key: ``[T_pad, HKV, D]`` post-RoPE.
            value: ``[T_pad, HKV, D]``.
            kv_cache: ``[num_blocks, HKV, P, 2 * D]`` logical view of the paged K|V cache (split layout:
                ``[num_blocks, R, Pf, 2 * D]``, the full KV heads).
            attn_metadata: this step's metadata; None in vLLM's memory-profiling run.
            output: ``[T_pad, HQ, D]``, written in place.
        """
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("RTPURBO does not fuse output quantisation")
        if attn_metadata is None:
            return output.fill_(0)
        md, plan, p = attn_metadata, self.plan, self.params
        n, nd = md.num_actual_tokens, md.num_decode_tokens
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)  # [N, P, HKV|R, D]
        window, index = self._side_caches(md)
        split = plan.split
        if split is None:
            _write_kv(key[:n], value[:n], key_cache, value_cache, md.slot_mapping, self.kv_cache_dtype, layer)
        else:
            _write_kv(key[:n, split.full_kv_heads], value[:n, split.full_kv_heads], key_cache, value_cache,
                      md.slot_mapping, self.kv_cache_dtype, layer)
        if window is not None:
            _write_kv(key[:n, split.window_kv_heads], value[:n, split.window_kv_heads], *window.caches,
                      window.slot_mapping[:n], self.kv_cache_dtype, layer)
        if index is not None:
            write_index_keys(key[:n], md.positions, self.rope_table, plan.kv_heads, plan.w_k, index.slot_mapping[:n],
                             *index.caches, is_neox_style=self.rope.is_neox_style)
        if md.decode is not None:
            self._decode(query[:nd], key_cache, value_cache, window, index, md, output[:nd])
        if md.prefill is not None:
            if query.is_cuda and torch.cuda.is_current_stream_capturing():
                # Its launch shapes come from per-step host values: a replay would run stale ones.
                raise RuntimeError("RTPURBO's prefill path cannot run inside a CUDA-graph capture; vLLM "
                                   "captures only pure single-token decode batches with this backend")
            pf = md.prefill
            window_kv = None if window is None else (*window.caches, window.block_table[nd:nd + pf.seq_lens.shape[0]])
            run_prefill = headwise_prefill if query.is_cuda else headwise_prefill_torch
            run_prefill(query[nd:n], key_cache, value_cache, pf.cu_seqlens_q, pf.seq_lens,
                        pf.max_query_len, pf.max_seq_len, pf.block_table, plan.prefill, p.sink_tokens,
                        p.window, self.scale, output[nd:n], dense_threshold=p.dense_threshold, window_kv=window_kv)
        return output

    def _side_caches(self, md: RTPurboMetadata) -> tuple[_SideCache | None, _SideCache | None]:
        """This step's window cache (split layout only) and index cache (None where the layer has none).

        In the full layout the index cache shares the layer's group (its slot mapping; block table None:
        the decode part's own); in the split layout each side cache's group metadata comes from the
        forward context, where vLLM put it under the side layer's name.
        """
        plan = self.plan
        side = get_forward_context().attn_metadata if plan.split is not None else None
        window = index = None
        if plan.split is not None and plan.split.window is not None:
            meta = side[plan.split.window.prefix]
            window = _SideCache(plan.split.window.key_value(), meta.block_table, meta.slot_mapping)
        if plan.index_cache is not None:
            view = (plan.index_cache.paged_view()[:, :, :plan.retrieval_heads.shape[0]],)   # [N, Pi, HR, DI]
            meta = side[plan.index_cache.prefix] if side is not None else None
            index = (_SideCache(view, None, md.slot_mapping) if meta is None
                     else _SideCache(view, meta.block_table, meta.slot_mapping))
        return window, index

    def _decode(self, query, key_cache, value_cache, window: _SideCache | None, index: _SideCache | None,
                md: RTPurboMetadata, out) -> None:
        """Decode part: index queries, block top-p and the head-wise sparse decode into ``out``."""
        dec, plan, p = md.decode, self.plan, self.params
        ws = dec.workspace
        num_decodes, num_retrieval = query.shape[0], plan.retrieval_heads.shape[0]
        selected = ws.selected[:num_decodes, :num_retrieval]
        num_selected = ws.num_selected[:num_decodes, :num_retrieval]
        if index is not None:
            index_table = dec.block_table if index.block_table is None else index.block_table[:num_decodes]
            q_idx = ws.index_queries[:num_decodes, :num_retrieval]
            index_queries(query, md.positions[:num_decodes], self.rope_table, plan.retrieval_heads, plan.w_q,
                          q_idx, is_neox_style=self.rope.is_neox_style)
            block_topp(q_idx, *index.caches, index_table, dec.seq_lens, p.top_p, p.sink_tokens,
                       p.block_size, selected.shape[-1], ws.topp[num_retrieval], selected, num_selected,
                       dense_threshold=p.dense_threshold)
        kv_slots = plan.split.kv_slots if plan.split is not None else None
        window_cache = None if window is None else (*window.caches, window.block_table[:num_decodes])
        headwise_sparse_decode(query, key_cache, value_cache, dec.block_table, dec.seq_lens,
                               plan.retrieval_heads, selected, num_selected, p.block_size, p.sink_tokens,
                               p.window, self.scale, ws.attention, out, dense_threshold=p.dense_threshold,
                               kv_slots=kv_slots, window_cache=window_cache)


class _SideCache(NamedTuple):
    """A side cache as one step sees it.

    Attributes:
        caches: the window's ``(K, V)`` views ``[N, Pw, H-R, D]``, or the index's ``(paged view,)``
            ``[N, Pi, HR, DI]``.
        block_table: ``[num_reqs, max_blocks]`` int32 of its group (None: the layer's own).
        slot_mapping: ``[num_tokens(+pad)]`` int64 of its group.
    """

    caches: tuple[torch.Tensor, ...]
    block_table: torch.Tensor | None
    slot_mapping: torch.Tensor


def _write_kv(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, layer) -> None:
    """Writes the new tokens' K/V into the paged cache (vLLM's CUDA op; plain indexing on the CPU)."""
    if key.is_cuda:
        from vllm import _custom_ops as ops

        ops.reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype,
                                    layer._k_scale, layer._v_scale)
        return
    valid = slot_mapping >= 0
    key_cache.flatten(0, 1)[slot_mapping[valid]] = key[valid]
    value_cache.flatten(0, 1)[slot_mapping[valid]] = value[valid]


def _shared_rope_table(spec: RopeSpec, device: torch.device) -> torch.Tensor:
    """One cos|sin table per RoPE and device, shared by every layer of the process."""
    key = (spec, device)
    if key not in _ROPE_TABLES:
        _ROPE_TABLES[key] = rope_table(spec, device)
    return _ROPE_TABLES[key]
