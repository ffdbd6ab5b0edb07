"""``RTPurboMetadataBuilder``: turns vLLM's per-step batch state into :class:`RTPurboMetadata`.

This is the "plan" half of the backend: it runs once per step for all RTPURBO layers of a KV-cache
group, splits the batch into its decode and prefill parts, lays the prefill chunks' query tiles out
for the sparse prefill (``prefill_top_p < 1``: :func:`~rtpurbo_vllm.triton_kernels.sparse_prefill.
plan_sparse_prefill`, from host-side lengths, one small copy to the device) and hands out the
kernels' scratch, which it allocates once (sized by ``max_num_seqs``, ``max_num_batched_tokens`` and
``max_model_len``) so that the impl's ``forward`` only launches kernels.

CUDA graphs (``AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE``): vLLM captures the whole forward,
attention included, of pure-decode batches padded to a capture size (FULL_AND_PIECEWISE /
FULL_DECODE_ONLY); mixed and prefill batches keep running the attention eagerly between piecewise
graphs. A replayed graph reads whatever the captured launches were given, so every tensor of the
decode part is a view of memory that does not move between steps:

* vLLM's persistent per-step buffers (both model runners fill them in place and hand out views at
  fixed addresses): ``seq_lens``, ``block_table_tensor``, ``slot_mapping`` (padding: -1),
  ``positions`` and ``query_start_loc``; padded requests get ``seq_len`` 0 and the null block;
* the builder's own :class:`RTPurboDecodeWorkspace`, allocated here once.

The decode part's Python values (token and request counts) are the padded batch size both at
capture and at replay, and the kernels' launch grids depend only on them and on constants
(``max_model_len``, head counts), never on per-step sequence lengths.
"""

from __future__ import annotations

import weakref
from typing import ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionCGSupport,
    AttentionMetadataBuilder,
    CommonAttentionMetadata,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills

from rtpurbo_vllm.attention.metadata import (
    RTPurboDecodeMetadata,
    RTPurboDecodeWorkspace,
    RTPurboMetadata,
    RTPurboPrefillMetadata,
    RTPurboSparsePrefill,
)
from rtpurbo_vllm.attention.serving_config import serving_artifact, serving_params
from rtpurbo_vllm.attention.tp import rank_layout
from rtpurbo_vllm.attention.warmup import warm_up
from rtpurbo_vllm.triton_kernels.block_topp import BlockTopPWorkspace, make_block_topp_workspace
from rtpurbo_vllm.triton_kernels.sparse_decode import allocate_sparse_decode_workspace
from rtpurbo_vllm.triton_kernels.sparse_prefill import TILE_Q, make_sparse_prefill_workspace, plan_sparse_prefill

SPARE_PREFILL_TILES = 64
"""Tiles of a sparse prefill wave beyond a full chunk's: room for the tiles of other short chunks."""


class RTPurboMetadataBuilder(AttentionMetadataBuilder[RTPurboMetadata]):
    """Builds :class:`RTPurboMetadata` for the RTPURBO layers of one KV-cache group."""

    # Pure single-token decode batches are captured whole; vLLM never captures the others' attention.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)
        self._kv_bound = False
        # The layers reach :meth:`prepare` from metadata-less forwards too (vLLM's dummy runs after the
        # caches exist), for model runners that build no metadata before the first request.
        context = vllm_config.compilation_config.static_forward_context
        for name in layer_names:
            context[name].impl.prepare_caches = weakref.WeakMethod(self.prepare)
        artifact = serving_artifact(vllm_config)
        layout = rank_layout(artifact.layout)
        params = serving_params(vllm_config)
        self.max_blocks = -(-vllm_config.model_config.max_model_len // params.block_size)
        max_decodes = self.max_decodes = vllm_config.scheduler_config.max_num_seqs
        retrieval_counts = {len(h) for h in layout.retrieval_heads} - {0}
        max_retrieval = max(retrieval_counts, default=1)
        topp = make_block_topp_workspace(max_decodes, max_retrieval, self.max_blocks, device)
        head_size = kv_cache_spec.head_size
        self.workspace = RTPurboDecodeWorkspace(
            index_queries=torch.empty(max_decodes, max_retrieval, params.index_dim,
                                      dtype=vllm_config.model_config.dtype, device=device),
            selected=torch.empty(max_decodes, max_retrieval, self.max_blocks, dtype=torch.int32, device=device),
            num_selected=torch.empty(max_decodes, max_retrieval, dtype=torch.int32, device=device),
            topp={hr: BlockTopPWorkspace(topp.block_max[:, :hr], topp.block_sum[:, :hr])
                  for hr in retrieval_counts},
            attention=allocate_sparse_decode_workspace(max_decodes, layout.num_heads, head_size,
                                                       device=device),
        )
        # The sparse prefill's scratch (None: the retrieval heads prefill densely).
        self.prefill_index_queries = self.prefill_workspace = None
        if params.prefill_top_p < 1.0 and retrieval_counts:
            max_tokens = vllm_config.scheduler_config.max_num_batched_tokens
            self.prefill_index_queries = torch.empty(max_tokens, max_retrieval, params.index_dim,
                                                     dtype=vllm_config.model_config.dtype, device=device)
            self.prefill_workspace = make_sparse_prefill_workspace(
                -(-max_tokens // TILE_Q) + SPARE_PREFILL_TILES, max_retrieval, vllm_config.model_config.max_model_len,
                params.block_size, TILE_Q, device)

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata) -> RTPurboMetadata:
        """Metadata of a capture batch: exactly what :meth:`build` gives at replay (the same views of
        vLLM's buffers, the same workspace), so the captured decode launches are the ones a replay
        needs. vLLM captures the attention only for padded single-token decode batches (our support
        level); other batches (e.g. the eager breaks of an opt-in breakable graph) come here too and
        keep their prefill part, which :meth:`RTPurboAttentionImpl.forward
        <rtpurbo_vllm.attention.impl.RTPurboAttentionImpl.forward>` refuses to run inside a capture."""
        return self.build(common_prefix_len=0, common_attn_metadata=common_attn_metadata)

    def prepare(self) -> None:
        """Once the caches exist (vLLM binds them after creating the builders): resolves every layer's
        unit tensors in the caches bound last (a model runner that binds a new cache makes new builders),
        then, on a GPU, compiles every kernel variant the layers can launch
        (:func:`~rtpurbo_vllm.attention.warmup.warm_up`; it builds again). Once per builder; never inside
        a CUDA-graph capture. Called by the first :meth:`build` and by the layers' first metadata-less
        forward after the caches exist, whichever comes first."""
        if self._kv_bound:
            return
        context = self.vllm_config.compilation_config.static_forward_context
        for name in self.layer_names:
            context[name].impl.bind_kv_cache()
        self._kv_bound = True
        if self.device.type == "cuda":
            warm_up(self)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> RTPurboMetadata:
        self.prepare()
        cm = common_attn_metadata
        if cm.positions is None:
            raise RuntimeError("RTPURBO needs token positions in the attention metadata (to undo RoPE); "
                               "this vLLM model runner does not provide them")
        num_decodes, num_prefills, num_decode_tokens, _ = split_decodes_and_prefills(cm, decode_threshold=1)
        num_tokens = cm.num_actual_tokens
        decode = prefill = None
        if num_decodes:
            if num_decodes > self.max_decodes:
                raise RuntimeError(f"{num_decodes} decode requests in one step, but the RTPURBO decode "
                                   f"workspace serves max_num_seqs={self.max_decodes}")
            # Views of vLLM's persistent buffers (fixed addresses, see the module docstring).
            decode = RTPurboDecodeMetadata(seq_lens=cm.seq_lens[:num_decodes],
                                           block_table=cm.block_table_tensor[:num_decodes],
                                           workspace=self.workspace)
        if num_prefills:
            prefill = RTPurboPrefillMetadata(
                cu_seqlens_q=cm.query_start_loc[num_decodes:cm.num_reqs + 1] - num_decode_tokens,
                seq_lens=cm.seq_lens[num_decodes:cm.num_reqs],
                block_table=cm.block_table_tensor[num_decodes:cm.num_reqs],
                max_query_len=cm.max_query_len,
                max_seq_len=cm.max_seq_len,
                sparse=self._sparse_prefill(cm, num_decodes),
            )
        return RTPurboMetadata(num_actual_tokens=num_tokens, slot_mapping=cm.slot_mapping[:num_tokens],
                               positions=cm.positions[:num_tokens], num_decode_tokens=num_decode_tokens,
                               decode=decode, prefill=prefill)

    def _sparse_prefill(self, cm: CommonAttentionMetadata, num_decodes: int) -> RTPurboSparsePrefill | None:
        """The prefill requests' query tiles (host lengths: ``query_start_loc_cpu`` and vLLM's upper
        bound of the sequence lengths, exact for prefill rows; a copy of the device lengths where a
        model runner gives no bound), with the builder's scratch."""
        if self.prefill_workspace is None:
            return None
        rows = slice(num_decodes, cm.num_reqs)
        query_lens = cm.query_start_loc_cpu[num_decodes:cm.num_reqs + 1].diff().tolist()
        lengths = cm.seq_lens_cpu_upper_bound if cm.seq_lens_cpu_upper_bound is not None else cm.seq_lens.cpu()
        seq_lens = lengths[rows].tolist()
        plan = plan_sparse_prefill(query_lens, seq_lens, self.prefill_workspace.wave_tiles, TILE_Q, self.device)
        return RTPurboSparsePrefill(plan=plan, index_queries=self.prefill_index_queries,
                                    workspace=self.prefill_workspace)
