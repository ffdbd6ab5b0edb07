"""``RTPurboAttentionImpl``: the "run" half of the backend; ``forward`` only launches kernels.

Per layer and step (tokens ordered decodes first, see :mod:`rtpurbo_vllm.attention.metadata`):

1. the new tokens' K/V go into the layer's cache units (one launch for every KV head, each with its
   kind's slot mapping; fp8 caches quantised with the layer's scales);
2. their 16-dim index keys (RoPE undone, projected per retrieval head) go into the index units, and
   in the same launch the decode tokens' index queries into the decode workspace;
3. decode tokens: block top-p per retrieval head -> head-wise sparse decode
   (retrieval heads over their kept blocks, local heads over sinks + window); on a GPU the local
   heads' part runs on vLLM's auxiliary stream while the selection runs (the layer joins it before
   combining);
4. prefill tokens: head-wise prefill (local heads sinks + window; retrieval heads dense causal, or,
   with ``prefill_top_p < 1``, index queries -> per query tile the sink, diagonal and top-p blocks).

Where every head lives is the layer's :class:`~rtpurbo_vllm.kv_cache.layer_kv.LayerKV`, the one
seam between the KV layout and the kernels: ``--additional-config '{"rtpurbo": {"kv_layout": ...}}'``
picks ``"compact"`` (the default: full K/V only for retrieval KV heads, sinks + window for the others)
or ``"full"`` (every KV head keeps every token), and both run the same code.

CUDA graphs: a pure-decode step (padded to a capture size: padded requests have ``seq_len`` 0, the
null block and slot -1) runs steps 1-3 only, with launch grids fixed by the padded batch size and
every tensor a view of vLLM's persistent buffers, the builder's workspace, the caches or the layer's
plan, so vLLM captures it whole and replays it (:mod:`rtpurbo_vllm.attention.builder`). Padded rows
write no cache entry and produce output 0. The prefill path (step 4) always runs eagerly.

Everything that depends only on the layer (its retrieval heads on this rank, indexer weights, the
RoPE table, the prefill head split, its share of the KV layout) is prepared once in
:meth:`RTPurboAttentionImpl.process_weights_after_loading`; the unit tensors are resolved once vLLM
has bound them (:meth:`RTPurboAttentionImpl.bind_kv_cache`, from each metadata builder's first build).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from vllm.config import get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.models.utils import extract_layer_index
from vllm.utils.torch_utils import aux_stream
from vllm.v1.attention.backend import AttentionImpl, AttentionType

from rtpurbo_vllm.attention.metadata import RTPurboMetadata
from rtpurbo_vllm.attention.prefill import PrefillHeads, SparseRetrieval, headwise_prefill, headwise_prefill_torch
from rtpurbo_vllm.attention.serving_config import kv_layout_for, serving_artifact, serving_kv_layout, serving_params
from rtpurbo_vllm.attention.tp import rank_indexer, rank_layout
from rtpurbo_vllm.kv_cache.layer_kv import LayerKV
from rtpurbo_vllm.kv_cache.side_layers import install_kv_layout
from rtpurbo_vllm.rope import RopeSpec
from rtpurbo_vllm.triton_kernels.block_topp import block_topp
from rtpurbo_vllm.triton_kernels.index_keys import (IndexQueries, index_queries, rope_table, rope_table_length,
                                                    write_index_keys)
from rtpurbo_vllm.triton_kernels.kv_write import kv_write
from rtpurbo_vllm.triton_kernels.sparse_decode import headwise_sparse_decode

KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "fp8", "fp8_e4m3")
_ROPE_TABLES: dict[tuple[RopeSpec, torch.device], torch.Tensor] = {}


@dataclass
class _LayerHeads:
    """What one layer needs at every step, on this rank's device.

    Attributes:
        retrieval_heads: ``[HR]`` int32, rank-local retrieval query heads.
        kv_heads: ``[HR]`` int32, the KV head each of them reads.
        w_q: ``[HR, DI, D]`` model dtype, indexer query projections.
        w_k: ``[HR, DI, D]`` model dtype, indexer key projections.
        prefill: the prefill head split.
    """

    retrieval_heads: torch.Tensor
    kv_heads: torch.Tensor
    w_q: torch.Tensor
    w_k: torch.Tensor
    prefill: PrefillHeads


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
            f"kv_cache_dtype={kv_cache_dtype}": kv_cache_dtype not in KV_CACHE_DTYPES,
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
        self.params = serving_params(self.vllm_config)
        self.rope = self.artifact.model.rope
        self.kv_layout = kv_layout_for(self.vllm_config)
        self.layer_name: str | None = None
        self.heads: _LayerHeads | None = None
        self.kv: LayerKV | None = None
        self.side_stream: torch.cuda.Stream | None = None      # set with the weights (CUDA only)
        # Set by the metadata builder: a weak reference to its ``prepare`` (caches bound, warmed up).
        self.prepare_caches: Callable[[], Callable[[], None] | None] = lambda: None

    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        """Finds this impl's layer, slices the artifact for this rank, installs the layer's share of
        the KV layout (its own spec and the side units homed at it)."""
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
        attention_layers = sorted((n for n, l in context.items() if isinstance(getattr(l, "impl", None),
                                                                                RTPurboAttentionImpl)),
                                  key=extract_layer_index)
        layer_names = tuple(attention_layers)
        if len(layer_names) != layout.num_layers:
            raise ValueError(f"the model has {len(layer_names)} RTPURBO attention layers, the artifact "
                             f"{layout.num_layers}; was the artifact made for this model?")
        attn_layer = context[self.layer_name]
        kv_layout = serving_kv_layout(self.vllm_config, self.artifact, self.kv_layout,
                                      attn_layer.kv_cache_torch_dtype, act_dtype)
        install_kv_layout(attn_layer, kv_layout, layer_names, self.vllm_config)
        self.kv = LayerKV(kv_layout, layer_names.index(self.layer_name), layer_names)
        heads = layout.retrieval_heads[layer]
        w_q, w_k = rank_indexer(self.artifact.layout, layer, *self.artifact.indexer[layer])
        self.heads = _LayerHeads(
            retrieval_heads=torch.tensor(heads, dtype=torch.int32, device=device),
            kv_heads=torch.tensor([layout.kv_head_of(h) for h in heads], dtype=torch.int32, device=device),
            w_q=w_q.to(device=device, dtype=act_dtype).contiguous(),
            w_k=w_k.to(device=device, dtype=act_dtype).contiguous(),
            prefill=PrefillHeads.build(heads, self.num_heads, self.num_kv_heads, device),
        )
        self.rope_table = _shared_rope_table(self.rope, torch.device(device),
                                             self.vllm_config.model_config.max_model_len)
        # vLLM's auxiliary stream (one per process, made here, never during a graph capture); None off CUDA.
        self.side_stream = aux_stream() if torch.device(device).type == "cuda" else None

    def bind_kv_cache(self) -> None:
        """Resolves the layer's unit tensors from the caches vLLM bound last (never inside a CUDA-graph
        capture: it copies the per-head offsets to the device). Every metadata builder calls it once: the
        V1 model runner binds a minimal cache, with builders of its own, to measure its CUDA graphs'
        memory, frees it, then binds the real cache and makes new builders."""
        self.kv.bind(self.vllm_config.compilation_config.static_forward_context)

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
            kv_cache: the layer's own full unit (its heads are addressed through ``self.kv``).
            attn_metadata: this step's metadata; None in vLLM's memory-profiling run.
            output: ``[T_pad, HQ, D]``, written in place.
        """
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("RTPURBO does not fuse output quantisation")
        if attn_metadata is None:
            # vLLM's dummy runs: the memory-profiling run (no caches yet) and, once the caches exist,
            # warm-up and piecewise-capture runs, where the builder gets ready if no build has yet.
            prepare = self.prepare_caches()
            if prepare is not None and kv_cache.numel() and not (query.is_cuda
                                                                 and torch.cuda.is_current_stream_capturing()):
                prepare()
            return output.fill_(0)
        md, heads, p, kv = attn_metadata, self.heads, self.params, self.kv
        if not kv.is_bound:
            raise RuntimeError(f"{self.layer_name}: the KV units are not bound; the RTPURBO metadata builder "
                               "binds them at its first build, before any forward")
        n, nd = md.num_actual_tokens, md.num_decode_tokens
        groups = get_forward_context().attn_metadata
        window = groups[kv.window_group] if kv.window_group is not None else None
        index = groups[kv.index_group] if kv.index is not None else None
        slot_mappings = [md.slot_mapping, None if window is None else window.slot_mapping[:n]]
        kv_write(key[:n], value[:n], kv.kv, slot_mappings, layer._k_scale, layer._v_scale)
        # The decode tokens' index queries ([nd, HR, DI]), computed in the index-key write's launch (the decode
        # chain starts at block top-p) and read by block top-p.
        decode_index_queries = (None if md.decode is None
                                else md.decode.workspace.index_queries[:nd, :heads.retrieval_heads.shape[0]])
        if index is not None:
            queries = None if decode_index_queries is None else IndexQueries(
                query[:nd], heads.retrieval_heads, heads.w_q, decode_index_queries)
            write_index_keys(key[:n], md.positions, self.rope_table, heads.kv_heads, heads.w_k,
                             index.slot_mapping[:n], kv.index, is_neox_style=self.rope.is_neox_style,
                             queries=queries)
        if md.decode is not None:
            rows = slice(0, md.decode.seq_lens.shape[0])
            tables = {"full": md.decode.block_table,
                      "window": None if window is None else window.block_table[rows]}
            self._decode(layer, query[:nd], kv.kv_tables(tables), None if index is None else index.block_table[rows],
                         decode_index_queries, md, output[:nd])
        if md.prefill is not None:
            if query.is_cuda and torch.cuda.is_current_stream_capturing():
                # Its launch shapes come from per-step host values: a replay would run stale ones.
                raise RuntimeError("RTPURBO's prefill path cannot run inside a CUDA-graph capture; vLLM "
                                   "captures only pure single-token decode batches with this backend")
            pf = md.prefill
            rows = slice(nd, nd + pf.seq_lens.shape[0])          # decode requests have one token each
            tables = {"full": pf.block_table, "window": None if window is None else window.block_table[rows]}
            sparse = None
            if pf.sparse is not None and index is not None:
                sparse = self._sparse_retrieval(query[nd:n], md.positions[nd:n], kv.kv_tables(tables),
                                                index.block_table[rows], pf.sparse)
            run_prefill = headwise_prefill if query.is_cuda else headwise_prefill_torch
            run_prefill(query[nd:n], kv.kv_parts(tables), pf.cu_seqlens_q, pf.seq_lens, pf.max_query_len,
                        pf.max_seq_len, heads.prefill, p.sink_tokens, p.window, self.scale, output[nd:n],
                        dense_threshold=p.dense_threshold, k_scale=layer._k_scale, v_scale=layer._v_scale,
                        q_scale=layer._q_scale, sparse=sparse)
        return output

    def _sparse_retrieval(self, query, positions, kv_tables, index_table, step) -> SparseRetrieval:
        """The prefill rows' index queries, and what the retrieval heads' sparse prefill reads."""
        heads, kv = self.heads, self.kv
        index_queries_out = step.index_queries[:query.shape[0], :heads.retrieval_heads.shape[0]]
        index_queries(query, positions, self.rope_table, heads.retrieval_heads, heads.w_q, index_queries_out,
                      is_neox_style=self.rope.is_neox_style)
        return SparseRetrieval(kv=kv.kv, kv_tables=kv_tables, index=kv.index, index_table=kv.index.table(0, index_table),
                               index_queries=index_queries_out, heads=heads.retrieval_heads, plan=step.plan,
                               workspace=step.workspace, top_p=self.params.prefill_top_p,
                               block_size=self.params.block_size)

    def _decode(self, layer, query, kv_tables, index_table, index_queries, md: RTPurboMetadata, out) -> None:
        """Decode part: the head-wise sparse decode into ``out``, its select step the block top-p of
        ``index_queries`` (``[num_decodes, HR, DI]``, written with the index keys) beside the local heads'
        splits (on the side stream on a GPU)."""
        dec, heads, p, kv = md.decode, self.heads, self.params, self.kv
        ws = dec.workspace
        num_decodes, num_retrieval = query.shape[0], heads.retrieval_heads.shape[0]
        selected = ws.selected[:num_decodes, :num_retrieval]
        num_selected = ws.num_selected[:num_decodes, :num_retrieval]

        def select() -> None:
            block_topp(index_queries, kv.index, kv.index.table(0, index_table),
                       dec.seq_lens, p.top_p, p.sink_tokens, p.block_size, selected.shape[-1], ws.topp[num_retrieval],
                       selected, num_selected, dense_threshold=p.dense_threshold)

        headwise_sparse_decode(query, kv.kv, kv_tables, dec.seq_lens, heads.retrieval_heads, selected,
                               num_selected, p.block_size, p.sink_tokens, p.window, self.scale, ws.attention, out,
                               dense_threshold=p.dense_threshold, k_scale=layer._k_scale, v_scale=layer._v_scale,
                               select=select if num_retrieval else None, side_stream=self.side_stream)


def _shared_rope_table(spec: RopeSpec, device: torch.device, max_model_len: int) -> torch.Tensor:
    """One cos|sin table per RoPE, device and length, shared by every layer of the process; it covers
    every position vLLM can pass (below ``max_model_len``) and vLLM's own table length."""
    num_positions = max(rope_table_length(spec), max_model_len)
    key = (spec, device, num_positions)
    if key not in _ROPE_TABLES:
        _ROPE_TABLES[key] = rope_table(spec, device, num_positions=num_positions)
    return _ROPE_TABLES[key]
