"""Start-up warm-up of the RTPURBO attention: every Triton kernel variant the serving path can launch is
compiled (and every kernel it calls loaded) before the first request.

Triton compiles a kernel the first time it is launched as a new *variant*: new ``constexpr`` values, or
a new specialisation of another argument (an int equal to 1 or divisible by 16, a pointer aligned to
16 bytes). vLLM's own start-up runs little of the RTPURBO path (its memory-profiling run passes no
metadata, CUDA-graph capture runs pure decodes, model runner V2's warm-up one step of two-token prompts
and one decode step), so the first requests used to compile the windowed prefill's kernels and a
variant for each new step size: seconds on an H200. Two halves make the first requests cost what later
ones do:

1. **Few variants.** Kernel arguments that change from step to step are not specialised on: token
   counts, the prefill LSE's head stride (a token count) and block-table row strides
   (``do_not_specialize``), and the alignment of the sink merge's per-sequence index arrays, views of
   vLLM's buffers offset by the decode count (``do_not_specialize_on_alignment``). What is left depends
   on the model, the layer (its retrieval head count), the KV layout and dtype, for the index keys on
   whether a step has fewer tokens than :func:`first_tiled_launch` (one token per program) or not, and
   for the sparse decode on the decode batch's split count ``S``
   (``SparseDecodeWorkspace.splits_for_batch``: a few values up to ``max_num_seqs``).
2. **One warm-up.** :func:`warm_up` runs every layer's real ``RTPurboAttentionImpl.forward`` through
   the builder's real ``build`` (and the side units' builders) on the small steps of
   :func:`warmup_steps`, against the real caches and the builder's workspace: a mixed step (one
   decode, a fresh prompt and a chunk of as many tokens that ends at ``max_model_len``, so the
   head-wise prefill takes its windowed path and the sink merge) and a pure prefill of the prompt (one
   FA3 call for short sequences), with two-token prompts and again with prompts of
   :func:`first_tiled_launch` tokens, and one pure decode step per split count ``S``.

Nothing is written to a cache: every dummy token has slot -1 in every kind's slot mapping (the kernels
skip it, as they skip CUDA-graph padding), and every block-table entry is vLLM's null block 0, which is
only read. Outputs go to dummy tensors; the decode workspace is scratch.

When: :meth:`RTPurboMetadataBuilder.prepare` calls :func:`warm_up` on a GPU, right after binding
its layers' caches (off the GPU nothing is compiled: the CPU tests run Triton's interpreter), once,
at whichever comes first of its first build and a layer's first metadata-less forward after the
caches exist; never inside a CUDA-graph capture. Both come during vLLM's start-up: the first build
for the first full CUDA graph (both model runners build its metadata before the capture starts) or
in model runner V2's own warm-up steps; the metadata-less forward in the V1 model runner's dummy runs
after the caches are allocated (compile warm-up sizes, piecewise capture, and the sampler warm-up
that even ``--enforce-eager`` runs). The log line ``RTPURBO warm-up: ...`` gives its duration.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from vllm.forward_context import create_forward_context, override_forward_context
from vllm.logger import init_logger
from vllm.v1.attention.backend import CommonAttentionMetadata

from rtpurbo_vllm.kv_cache.layout import FULL, INDEX, WINDOW
from rtpurbo_vllm.triton_kernels.index_keys import first_tiled_launch

if TYPE_CHECKING:
    from rtpurbo_vllm.attention.builder import RTPurboMetadataBuilder

logger = init_logger(__name__)

PROMPT_TOKENS = 2
"""Query length of the first warm-up prefills: the least that is not a decode."""


@dataclass(frozen=True)
class WarmupStep:
    """One dummy step; requests in vLLM's order (decodes first).

    Attributes:
        num_decodes: decode requests, one token each (one-token sequences).
        prefills: per prefill request ``(query_len, seq_len)``: its chunk is the last ``query_len`` of
            its ``seq_len`` tokens.
    """

    num_decodes: int
    prefills: tuple[tuple[int, int], ...] = ()


def warmup_steps(max_decodes: int, splits_for_batch: Callable[[int], int], max_model_len: int) -> list[WarmupStep]:
    """The warm-up's steps (module docstring): mixed and pure prefill with prompts of
    :data:`PROMPT_TOKENS` and of :func:`first_tiled_launch` tokens, and a pure decode of the smallest batch
    of each split count ``splits_for_batch(B)`` for ``B`` in ``[1, max_decodes]``."""
    steps = []
    for prompt in (PROMPT_TOKENS, max(first_tiled_launch(), PROMPT_TOKENS)):
        short, long = (prompt, prompt), (prompt, max(max_model_len, prompt))
        steps += [WarmupStep(1, (short, long)), WarmupStep(0, (short,))]
    first_batch: dict[int, int] = {}
    for batch in range(1, max_decodes + 1):
        first_batch.setdefault(splits_for_batch(batch), batch)
    return [*steps, *map(WarmupStep, first_batch.values())]


def step_metadata(step: WarmupStep, page_size: int, device: torch.device) -> CommonAttentionMetadata:
    """vLLM's per-step metadata of ``step`` for a KV-cache group of ``page_size``-token pages: every
    page the null block 0, every slot -1, host copies where vLLM keeps them."""
    query_lens = [1] * step.num_decodes + [q for q, _ in step.prefills]
    seq_lens = [1] * step.num_decodes + [s for _, s in step.prefills]
    num_reqs, num_tokens = len(query_lens), sum(query_lens)
    query_start = torch.tensor([0, *itertools.accumulate(query_lens)], dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    positions = torch.cat([torch.arange(s - q, s) for q, s in zip(query_lens, seq_lens)])
    return CommonAttentionMetadata(
        query_start_loc=query_start.to(device), query_start_loc_cpu=query_start, seq_lens=lens.to(device),
        num_reqs=num_reqs, num_actual_tokens=num_tokens, max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        block_table_tensor=torch.zeros(num_reqs, -(-max(seq_lens) // page_size), dtype=torch.int32, device=device),
        slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=device),
        positions=positions.to(device),
        is_prefilling=torch.tensor([q > 1 for q in query_lens], device=device),
        seq_lens_cpu_upper_bound=lens, _seq_lens_cpu=lens,
        _num_computed_tokens_cpu=lens - torch.tensor(query_lens, dtype=torch.int32))


def warm_up(builder: RTPurboMetadataBuilder) -> None:
    """Runs every layer of ``builder`` on :func:`warmup_steps` (see the module docstring); the layers'
    caches must be bound (the builder's first build does it, then calls this)."""
    config = builder.vllm_config
    context = config.compilation_config.static_forward_context
    layers = [context[name] for name in builder.layer_names]
    kv = layers[0].impl.kv
    dtype, device = config.model_config.dtype, builder.device
    # Metadata of the side units' groups (vLLM keys it by any of their units' names), from their own builders.
    side = {name: kind for name, kind in ((kv.window_group, WINDOW), (kv.index_group, INDEX)) if name is not None}
    side_builders = {name: context[name].get_attn_backend().get_builder_cls()(
        context[name].get_kv_cache_spec(config), [name], config, device) for name in side}
    steps = warmup_steps(builder.max_decodes, builder.workspace.attention.splits_for_batch,
                         config.model_config.max_model_len)
    start = time.perf_counter()
    with torch.inference_mode():
        for step in steps:
            common = {kind: step_metadata(step, shape.block_size, device) for kind, shape in kv.layout.units.items()}
            md = builder.build(0, common[FULL])
            groups = {name: md for name in builder.layer_names}
            groups.update({name: side_builders[name].build(0, common[kind]) for name, kind in side.items()})
            with override_forward_context(create_forward_context(groups, config)):
                for layer in layers:
                    impl, n = layer.impl, md.num_actual_tokens
                    query = torch.zeros(n, impl.num_heads, impl.head_size, dtype=dtype, device=device)
                    key = torch.zeros(n, impl.num_kv_heads, impl.head_size, dtype=dtype, device=device)
                    impl.forward(layer, query, key, torch.zeros_like(key), layer.kv_cache, md, torch.empty_like(query))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    logger.info("RTPURBO warm-up: %d layers x %d steps (decode batches %s) in %.1f s", len(layers), len(steps),
                [s.num_decodes for s in steps], time.perf_counter() - start)
