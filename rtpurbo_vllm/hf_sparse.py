"""Runs a Hugging Face model with RTPurbo attention taken from the exact PyTorch reference.

This is the CPU-friendly way to see what RTPurbo does to a model's answers, without vLLM: the
calibration tests and the demo measure task accuracy with it, and it can knock out chosen heads for
ablation studies. It plugs into transformers' attention-function registry, so it works for every
architecture whose attention calls ``ALL_ATTENTION_FUNCTIONS`` (Llama, Mistral, Qwen2, Qwen3).

Supports batch size 1 without padding (positions ``0..T-1``), prefill and token-by-token decode with
a KV cache. Prefill computes what :func:`~rtpurbo_vllm.reference.rtpurbo_prefill_ref` does with
torch's fused attention (causal calls for the retrieval heads, masked calls for the local heads), so
long prompts stay fast on the CPU; with ``prefill_top_p < 1`` the retrieval heads see the keys
:func:`~rtpurbo_vllm.triton_kernels.sparse_prefill.sparse_prefill_visible_ref` keeps (query tiles of
:data:`~rtpurbo_vllm.triton_kernels.sparse_prefill.TILE_Q` rows, as the vLLM backend cuts them). Each
decode step runs
:func:`~rtpurbo_vllm.reference.rtpurbo_decode_ref`, recovering pre-RoPE q/k with
:func:`~rtpurbo_vllm.rope.invert_rope` exactly as the vLLM backend does.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import torch

from rtpurbo_vllm.artifacts import RTPurboArtifact
from rtpurbo_vllm.reference import rtpurbo_decode_keep_ref
from rtpurbo_vllm.rope import RopeSpec, invert_rope
from rtpurbo_vllm.triton_kernels.headwise_attention import attention_mask
from rtpurbo_vllm.triton_kernels.index_keys import index_project_ref
from rtpurbo_vllm.triton_kernels.sparse_decode import sparse_decode_varlen_ref
from rtpurbo_vllm.triton_kernels.sparse_prefill import TILE_Q, sparse_prefill_visible_ref

ATTENTION_NAME = "rtpurbo_reference"
_LOCAL_CHUNK = 256
"""Queries of a local head's prefill per attention call."""
_SPARSE_CHUNK = 8 * TILE_Q
"""Queries of the retrieval heads' sparse prefill per attention call (whole query tiles)."""


@dataclass
class DecodeStats:
    """What the retrieval heads kept, summed over the decode steps of a run.

    Attributes:
        kept_blocks: selection blocks kept by retrieval heads (sum over steps, layers and heads).
        total_blocks: selection blocks those heads could have kept.
        local_tokens: tokens local heads attended to (sum over steps, layers and heads).
        context_tokens: tokens the same local heads would attend to densely.
    """

    kept_blocks: int = 0
    total_blocks: int = 0
    local_tokens: int = 0
    context_tokens: int = 0

    @property
    def kept_block_share(self) -> float:
        """Share of selection blocks the retrieval heads kept (0 when nothing was decoded)."""
        return self.kept_blocks / self.total_blocks if self.total_blocks else 0.0

    @property
    def local_token_share(self) -> float:
        """Share of the context that local heads attended to."""
        return self.local_tokens / self.context_tokens if self.context_tokens else 0.0


@dataclass
class _Run:
    artifact: RTPurboArtifact | None
    rope: RopeSpec | None
    stats: DecodeStats | None
    ablated: Mapping[int, Sequence[int]] = field(default_factory=dict)


_ACTIVE: list[_Run] = []


def _attention(module, query, key, value, hf_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: ``query [1, HQ, Tq, D]``, ``key/value [1, HKV, Tk, D]`` post-RoPE.

    ``hf_mask`` (transformers' own mask) is not read: without padding, each query's visible keys follow
    from the positions ``0..Tk-1``.

    Returns ``([1, Tq, HQ, D]`` in the query dtype, ``None)``.
    """
    run = _ACTIVE[-1]
    if query.shape[0] != 1:
        raise ValueError(f"the RTPurbo reference runner supports batch size 1, got {query.shape[0]}")
    layer = module.layer_idx
    q = query[0].transpose(0, 1)                                       # [Tq, HQ, D]
    k = key[0].transpose(0, 1)                                         # [Tk, HKV, D]
    v = value[0].transpose(0, 1)
    num_q, num_k = q.shape[0], k.shape[0]
    scale = module.scaling if scaling is None else scaling
    if run.artifact is None:   # dense (ablation only)
        qh, kh, vh = _heads_first(q, k, v)
        out = torch.nn.functional.scaled_dot_product_attention(
            qh, kh, vh, scale=scale, attn_mask=attention_mask(num_q, num_k, device=q.device)).transpose(0, 1)
    elif num_q > 1 or num_k < run.artifact.params.dense_threshold:
        out = _prefill(run, layer, q, k, v, scale)
    else:
        out = _decode(run, layer, q, k, v, torch.tensor([0, num_k], dtype=torch.int32), scale)
    out = out.to(query.dtype)
    for head in run.ablated.get(layer, ()):
        out[:, head] = 0
    return out[None], None


def _heads_first(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``q [Tq, HQ, D]``, ``k/v [Tk, HKV, D]`` -> ``[HQ, Tq, D]``, ``[HQ, Tk, D]``, ``[HQ, Tk, D]`` float32,
    each KV head repeated for its query heads (the layout ``scaled_dot_product_attention`` takes)."""
    group = q.shape[1] // k.shape[1]
    return (q.transpose(0, 1).float(), k.transpose(0, 1).float().repeat_interleave(group, dim=0),
            v.transpose(0, 1).float().repeat_interleave(group, dim=0))


def _prefill(run: _Run, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Head-wise prefill of one sequence through ``scaled_dot_product_attention``:
    :func:`~rtpurbo_vllm.reference.rtpurbo_prefill_ref` for ``B = 1``, the retrieval heads sparse
    when ``prefill_top_p < 1`` (:func:`_sparse_retrieval`).

    Retrieval heads (every head when ``Tk < dense_threshold``) run one causal call. Local heads run
    per chunk of :data:`_LOCAL_CHUNK` queries against only the keys the chunk can see (the sinks and
    the window before it), so their cost grows with ``Tq * (window + chunk)``, not ``Tq * Tk``.

    Args:
        run: the artifact (retrieval heads, sinks, window, dense threshold, indexer) and RoPE.
        layer: the layer's index.
        q: ``[Tq, HQ, D]`` post-RoPE queries, the last ``Tq`` of the sequence's ``Tk`` tokens.
        k, v: ``[Tk, HKV, D]`` post-RoPE keys and values.
        scale: softmax scale.

    Returns:
        ``[Tq, HQ, D]`` float32.
    """
    params, retrieval_heads = run.artifact.params, run.artifact.retrieval_heads[layer]
    num_q, num_heads, num_k = q.shape[0], q.shape[1], k.shape[0]
    qh, kh, vh = _heads_first(q, k, v)
    dense = num_k < params.dense_threshold
    causal = [h for h in range(num_heads) if dense or h in set(retrieval_heads)]
    local = [h for h in range(num_heads) if h not in set(causal)]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    out = torch.empty_like(qh)
    if retrieval_heads and not dense and params.prefill_top_p < 1:
        heads = list(retrieval_heads)
        out[heads] = _sparse_retrieval(run, layer, q, k, qh[heads], kh[heads], vh[heads], scale)
        causal = [h for h in causal if h not in set(heads)]
    if causal:
        out[causal] = sdpa(qh[causal], kh[causal], vh[causal], scale=scale,
                           attn_mask=attention_mask(num_q, num_k, device=q.device))
    first = num_k - num_q                                                     # position of query 0
    for c0 in range(0, num_q if local else 0, _LOCAL_CHUNK):
        c1 = min(c0 + _LOCAL_CHUNK, num_q)
        lo = max(0, first + c0 - params.window + 1)                           # oldest window key
        keys = torch.cat((torch.arange(min(params.sink_tokens, lo), device=q.device),
                          torch.arange(lo, first + c1, device=q.device)))     # [K] key positions
        qpos = torch.arange(first + c0, first + c1, device=q.device)[:, None]  # [C, 1]
        visible = (keys <= qpos) & ((qpos - keys < params.window) | (keys < params.sink_tokens))
        out[local, c0:c1] = sdpa(qh[local, c0:c1], kh[local][:, keys], vh[local][:, keys], scale=scale,
                                 attn_mask=visible)
    return out.transpose(0, 1)


def _sparse_retrieval(run: _Run, layer: int, q: torch.Tensor, k: torch.Tensor, qh: torch.Tensor, kh: torch.Tensor,
                      vh: torch.Tensor, scale: float) -> torch.Tensor:
    """The retrieval heads' sparse top-p prefill, :data:`_SPARSE_CHUNK` query rows per call.

    Args:
        q: ``[Tq, HQ, D]`` and k: ``[Tk, HKV, D]`` post-RoPE (for the index queries and keys).
        qh: ``[HR, Tq, D]``, kh, vh: ``[HR, Tk, D]`` float32, the retrieval heads' queries and their KV
            heads' keys and values.

    Returns:
        ``[HR, Tq, D]`` float32.
    """
    p, heads = run.artifact.params, list(run.artifact.retrieval_heads[layer])
    w_q, w_k = run.artifact.indexer[layer]
    num_q, num_k = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    positions = torch.arange(num_k, device=q.device)
    q_idx = index_project_ref(invert_rope(q[:, heads], positions[num_k - num_q:], run.rope), w_q)   # [Tq, HR, DI]
    k_idx = index_project_ref(invert_rope(k, positions, run.rope)[:, [h // group for h in heads]], w_k)
    out = torch.empty_like(qh)
    first = num_k - num_q
    for start in range(-(first % _SPARSE_CHUNK), num_q, _SPARSE_CHUNK):
        # Rows [c0, c1) at positions cut at multiples of _SPARSE_CHUNK: the same tiles as the whole chunk's.
        c0, c1 = max(start, 0), min(start + _SPARSE_CHUNK, num_q)
        _, visible = sparse_prefill_visible_ref(q_idx[c0:c1], k_idx[:first + c1], p.prefill_top_p, p.sink_tokens,
                                                p.block_size, TILE_Q)                          # [HR, C, K]
        out[:, c0:c1] = torch.nn.functional.scaled_dot_product_attention(
            qh[:, c0:c1], kh[:, :first + c1], vh[:, :first + c1], scale=scale, attn_mask=visible.to(q.device))
    return out


def _decode(run: _Run, layer: int, q, k, v, cu_k, scale) -> torch.Tensor:
    """One decode step through the reference; updates ``run.stats``. Returns ``[1, HQ, D]`` fp32."""
    artifact, p = run.artifact, run.artifact.params
    heads = artifact.retrieval_heads[layer]
    w_q, w_k = artifact.indexer[layer]
    positions = torch.arange(k.shape[0])
    q_pre = invert_rope(q, positions[-1:], run.rope)                   # [1, HQ, D]
    k_pre = invert_rope(k, positions, run.rope)                        # [Tk, HKV, D]
    keep = rtpurbo_decode_keep_ref(cu_k, q_pre, k_pre, heads, w_q, w_k, p.sink_tokens, p.window,
                                   p.top_p, p.block_size, p.dense_threshold)            # [HQ, Tk]
    if run.stats is not None:
        num_blocks = -(-k.shape[0] // p.block_size)
        block_keep = torch.nn.functional.pad(keep, (0, num_blocks * p.block_size - k.shape[0]))
        block_keep = block_keep.view(keep.shape[0], num_blocks, p.block_size).any(-1)
        local = torch.ones(keep.shape[0], dtype=torch.bool)
        local[list(heads)] = False
        run.stats.kept_blocks += int(block_keep[list(heads)].sum())
        run.stats.total_blocks += num_blocks * len(heads)
        run.stats.local_tokens += int(keep[local].sum())
        run.stats.context_tokens += int(local.sum()) * k.shape[0]
    return sparse_decode_varlen_ref(q, k, v, cu_k, keep, scale)[0]


@contextlib.contextmanager
def _use(model, run: _Run) -> Iterator[None]:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, _attention)
    previous = model.config._attn_implementation
    _ACTIVE.append(run)
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        _ACTIVE.pop()
        model.set_attn_implementation(previous)


def rtpurbo_reference_attention(model, artifact: RTPurboArtifact,
                                stats: DecodeStats | None = None) -> contextlib.AbstractContextManager:
    """Context manager: ``model`` runs RTPurbo attention (reference) inside the ``with`` block.

    Args:
        model: a transformers causal LM (Llama, Mistral, Qwen2 or Qwen3 family).
        artifact: the model's RTPurbo artifact, with an indexer.
        stats: if given, accumulates what the decode steps kept.
    """
    if not artifact.has_indexer:
        raise ValueError("the artifact has no indexer; train one with `rtpurbo-calibrate train-indexer` "
                         "and export it before running RTPurbo decode")
    return _use(model, _Run(artifact, RopeSpec.from_hf_config(model.config), stats))


def ablated_heads_attention(model, heads: Mapping[int, Sequence[int]]) -> contextlib.AbstractContextManager:
    """Context manager: dense attention with the output of the given query heads zeroed.

    Args:
        model: a transformers causal LM.
        heads: layer index -> query heads whose attention output is replaced by zeros.
    """
    return _use(model, _Run(None, None, None, dict(heads)))
