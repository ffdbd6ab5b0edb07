"""How well an artifact's indexer routes: per retrieval head, on held-out text, the share of the real
attention mass inside the blocks the indexer's top-p keeps, and the share of blocks kept, for the
decode and for the prefill.

Decode: for each sampled query (decode-like positions in the second half of each sequence) and
retrieval head, the indexer scores all past tokens, :func:`block_topp_ref` picks blocks with the
artifact's ``top_p``, ``block_size`` and ``sink_tokens`` (sink blocks and the query's own block
forced), and the real attention row (post-RoPE, causal) is summed over the kept tokens (*recall*).
For scale, *oracle blocks kept* is the share an oracle needs: block top-p on the real attention itself.

Prefill: each sequence is prefilled as one chunk, cut into query tiles of
:data:`~rtpurbo_vllm.triton_kernels.sparse_prefill.TILE_Q` rows; per tile and retrieval head the
sparse prefill's selection (:mod:`rtpurbo_vllm.triton_kernels.sparse_prefill`: sink and diagonal
blocks plus the top-p blocks of its keys' index scores, each the max over the tile's rows, at the artifact's
``prefill_top_p``) is applied to the real attention rows of the tile: the mass each row keeps,
averaged over the tile's rows, is the tile's *prefill recall*. ``dense_threshold`` is not applied
(both measure the routing itself). The same captured q/k serve both.

``index_key_dtype`` rounds the index keys as a cache of that dtype would store them (no scale): it
measures what a storage dtype costs the routing (``float32``, the default, leaves them as computed).

The results dict is the single source of the JSON and the markdown report.
"""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path
from typing import Any

import torch

from rtpurbo_vllm import __version__
from rtpurbo_vllm.artifacts import RTPurboArtifact, load_artifact
from rtpurbo_vllm import outputs
from rtpurbo_vllm.calibration.capture import LoadedModel, attention_rows, capture_retrieval, resolve_model
from rtpurbo_vllm.calibration.data import TokenSource, sample_sequence
from rtpurbo_vllm.triton_kernels.block_topp import block_topp_ref, expand_block_mask, index_scores_ref
from rtpurbo_vllm.triton_kernels.index_keys import index_project_ref
from rtpurbo_vllm.triton_kernels.sparse_prefill import (TILE_Q, chunk_tiles, tile_block_mass_ref, tile_forced_blocks,
                                                        tile_topp_ref)

REPORT_JSON, REPORT_MD = "evaluate.json", "evaluate.md"
DECODE_METRICS = ("recall", "blocks_kept", "oracle_blocks_kept")
PREFILL_METRICS = ("prefill_recall", "prefill_recall_p10", "prefill_blocks_kept")
METRICS = DECODE_METRICS + PREFILL_METRICS
TILE_METRICS = ("tile_recall", "tile_kept", "tile_visible")
EVALUATED_KEY_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "fp8_e4m3": torch.float8_e4m3fn,
                    "fp8_e5m2": torch.float8_e5m2}
"""``index_key_dtype`` name -> the dtype the index keys are rounded to (and read back as float32)."""


def _stats(values: torch.Tensor) -> dict[str, float]:
    """mean, min, p10, p50 of a 1-D float tensor."""
    q = torch.quantile(values.double(), torch.tensor([0.1, 0.5], dtype=torch.double))
    return {"mean": float(values.mean()), "min": float(values.min()), "p10": float(q[0]), "p50": float(q[1])}


def layer_routing(lm: LoadedModel, heads: list[int], q_pre: torch.Tensor, k_pre: torch.Tensor,
                  query_pos: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor, top_p: float,
                  block_size: int, sink_tokens: int, key_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Routing quality of one layer's retrieval heads on one sequence.

    Args:
        heads: the layer's HR retrieval query heads.
        q_pre: ``[Q, HR, D]`` pre-RoPE queries of those heads at ``query_pos`` (``[Q]`` int64).
        k_pre: ``[T, HKV, D]`` pre-RoPE keys.
        w_q, w_k: ``[HR, DI, D]`` indexer projections.
        top_p, block_size, sink_tokens: the artifact's selection settings.
        key_dtype: the index keys' storage dtype (:data:`EVALUATED_KEY_DTYPES`).

    Returns:
        :data:`DECODE_METRICS` -> ``[HR, Q]`` float32 (CPU): attention mass inside the kept blocks,
        share of blocks kept, share of blocks the oracle keeps.
    """
    teacher = attention_rows(q_pre, k_pre, query_pos, torch.tensor(heads), lm)              # [HR, Q, T]
    q_idx, k_idx = _index_vectors(lm, heads, q_pre, k_pre, w_q, w_k, key_dtype)  # [Q, HR, DI], [T, HR, DI]
    out = {m: torch.empty(len(heads), len(query_pos)) for m in DECODE_METRICS}
    for i, pos in enumerate(query_pos.tolist()):
        n = pos + 1
        real = teacher[:, i, :n]                                                            # [HR, n]
        keep = block_topp_ref(index_scores_ref(q_idx[i], k_idx[:n]), top_p, block_size, sink_tokens)
        oracle = block_topp_ref(real.log(), top_p, block_size, sink_tokens)                 # [HR, NB]
        out["recall"][:, i] = (real * expand_block_mask(keep, n, block_size)).sum(-1).cpu()
        out["blocks_kept"][:, i] = keep.float().mean(-1).cpu()
        out["oracle_blocks_kept"][:, i] = oracle.float().mean(-1).cpu()
    return out


def layer_prefill_routing(lm: LoadedModel, heads: list[int], q_pre: torch.Tensor, k_pre: torch.Tensor,
                          w_q: torch.Tensor, w_k: torch.Tensor, top_p: float, block_size: int,
                          sink_tokens: int, key_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Sparse-prefill routing of one layer's retrieval heads on one sequence prefilled as one chunk.

    Args:
        heads: the layer's HR retrieval query heads.
        q_pre: ``[T, HR, D]`` pre-RoPE queries of those heads at every position.
        k_pre: ``[T, HKV, D]`` pre-RoPE keys.
        w_q, w_k: ``[HR, DI, D]`` indexer projections.
        top_p, block_size, sink_tokens: the artifact's ``prefill_top_p`` and selection settings.
        key_dtype: the index keys' storage dtype (:data:`EVALUATED_KEY_DTYPES`).

    Returns:
        :data:`TILE_METRICS` -> ``[HR, NT]`` float32 (CPU), per query tile of :data:`TILE_Q` rows:
        ``tile_recall``, the real attention mass of each of the tile's rows on its kept blocks,
        averaged over the rows; ``tile_kept``, its kept blocks; ``tile_visible``, the blocks it may
        see (``ceil((last_pos + 1) / block_size)``, the same for every head).
    """
    num_tokens, head_ids = k_pre.shape[0], torch.tensor(heads)
    q_idx, k_idx = _index_vectors(lm, heads, q_pre, k_pre, w_q, w_k, key_dtype)            # [T, HR, DI]
    tiles = chunk_tiles(num_tokens, num_tokens, TILE_Q)
    out = {m: torch.empty(len(heads), len(tiles)) for m in TILE_METRICS}
    for i, tile in enumerate(tiles):
        n = tile.last_pos + 1
        mass = tile_block_mass_ref(q_idx[tile.row0:tile.row1], k_idx[:n], block_size)
        keep = tile_topp_ref(mass, tile_forced_blocks(tile, block_size, sink_tokens), top_p)  # [HR, NB]
        positions = torch.arange(tile.first_pos, n)                  # one chunk: chunk rows are positions
        real = attention_rows(q_pre[tile.row0:tile.row1], k_pre[:n], positions, head_ids, lm)  # [HR, rows, n]
        kept_tokens = expand_block_mask(keep, n, block_size)[:, None]                           # [HR, 1, n]
        out["tile_recall"][:, i] = (real * kept_tokens).sum(-1).mean(-1).cpu()
        out["tile_kept"][:, i] = keep.sum(-1).cpu()
        out["tile_visible"][:, i] = keep.shape[1]
    return out


def _index_vectors(lm: LoadedModel, heads: list[int], q_pre: torch.Tensor, k_pre: torch.Tensor,
                   w_q: torch.Tensor, w_k: torch.Tensor,
                   key_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Index queries ``[Q, HR, DI]`` of ``q_pre`` ``[Q, HR, D]`` and index keys ``[T, HR, DI]`` of
    ``k_pre`` ``[T, HKV, D]`` (each head reading its KV head, rounded to ``key_dtype``), float32 on
    ``q_pre``'s device."""
    kv_of = torch.tensor(heads) // (lm.num_heads // lm.num_kv_heads)
    q_idx = index_project_ref(q_pre, w_q.to(q_pre.device))
    k_idx = index_project_ref(k_pre[:, kv_of.to(k_pre.device)], w_k.to(k_pre.device))
    return q_idx, k_idx.to(key_dtype).float()


def _head_row(measured: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """:data:`METRICS` of one head from its :func:`layer_routing` and :func:`layer_prefill_routing`
    rows over all sequences: decode metrics averaged over the queries; the prefill recall's mean and
    p10 over the tiles, and the kept share of the visible blocks summed over the tiles."""
    v = {m: torch.cat(rows) for m, rows in measured.items()}
    return {**{m: float(v[m].mean()) for m in DECODE_METRICS},
            "prefill_recall": float(v["tile_recall"].mean()),
            "prefill_recall_p10": float(torch.quantile(v["tile_recall"], 0.1)),
            "prefill_blocks_kept": float(v["tile_kept"].sum() / v["tile_visible"].sum())}


def evaluate_artifact(model: str | os.PathLike | LoadedModel, artifact: str | os.PathLike | RTPurboArtifact, *,
                      data: str | os.PathLike | None = None, num_seqs: int = 4, seq_len: int = 4096,
                      queries_per_seq: int = 32, seed: int = 1234, device: str | None = None,
                      index_key_dtype: str = "float32") -> dict[str, Any]:
    """The ``evaluate`` command's measurement; returns the results dict (see :func:`write_report`).

    Args:
        model: a model folder or a loaded model.
        artifact: an artifact folder (validated against the model) or an in-memory artifact with indexer.
        data: held-out text: the held-out split (last 10 %) of this file/folder; None = synthetic text
            from a seed stream the training does not use (``seed``).
        num_seqs, seq_len, queries_per_seq: how much to measure.
        index_key_dtype: a name of :data:`EVALUATED_KEY_DTYPES`: the index keys are rounded to it.

    Raises:
        ValueError: artifact missing, invalid, without indexer or retrieval heads, or made for another
            model; an unknown ``index_key_dtype``.
    """
    if index_key_dtype not in EVALUATED_KEY_DTYPES:
        raise ValueError(f"unknown index key dtype {index_key_dtype!r}; choose one of "
                         f"{', '.join(EVALUATED_KEY_DTYPES)}")
    key_dtype = EVALUATED_KEY_DTYPES[index_key_dtype]
    lm = resolve_model(model, device)
    if not isinstance(artifact, RTPurboArtifact):
        artifact = load_artifact(artifact, hf_config=lm.hf_config)
    if artifact.indexer is None:
        raise ValueError("the artifact has no indexer; fix: export one with `rtpurbo-calibrate export --indexer`")
    if not any(artifact.retrieval_heads):
        raise ValueError("the artifact has no retrieval heads (every head is local), so there is no routing to "
                         "evaluate; fix: export an artifact whose heads file selects retrieval heads")
    if num_seqs < 1 or queries_per_seq < 1 or seq_len < 2:
        raise ValueError(f"need num_seqs >= 1, queries_per_seq >= 1, seq_len >= 2; got {num_seqs}, "
                         f"{queries_per_seq}, {seq_len}")
    p = artifact.params
    retrieval = [list(h) for h in artifact.retrieval_heads]
    source = TokenSource.create(lm.tokenizer, data, "heldout")
    t0 = time.perf_counter()
    per_head: dict[tuple[int, int], dict[str, list[torch.Tensor]]] = {}
    for index in range(num_seqs):
        ids, query_pos = sample_sequence(source, seq_len, queries_per_seq, seed, index)
        captured = capture_retrieval(lm, retrieval, ids, torch.arange(len(ids)))   # every row: the prefill's
        for layer, heads in enumerate(retrieval):
            if not heads:
                continue
            w_q, w_k = artifact.indexer[layer]
            q_pre, k_pre = captured.q_pre[layer], captured.k_pre[layer]
            decode = layer_routing(lm, heads, q_pre[query_pos.to(q_pre.device)], k_pre, query_pos, w_q, w_k,
                                   p.top_p, p.block_size, p.sink_tokens, key_dtype)
            prefill = layer_prefill_routing(lm, heads, q_pre, k_pre, w_q, w_k, p.prefill_top_p, p.block_size,
                                            p.sink_tokens, key_dtype)
            for j, head in enumerate(heads):
                for m, values in {**decode, **prefill}.items():
                    per_head.setdefault((layer, head), {}).setdefault(m, []).append(values[j])
    rows = [{"layer": layer, "head": head, "kv_head": head // (lm.num_heads // lm.num_kv_heads), **_head_row(v)}
            for (layer, head), v in sorted(per_head.items())]
    name = getattr(lm.hf_config, "_name_or_path", "") or lm.hf_config.architectures[0]
    return {
        "model": str(name),
        "params": p.to_dict(),
        "data": source.description,
        "num_sequences": num_seqs,
        "seq_len": seq_len,
        "queries_per_seq": queries_per_seq,
        "prefill_tile_q": TILE_Q,
        "index_key_dtype": index_key_dtype,
        "seed": seed,
        "summary": {"num_retrieval_heads": len(rows), "num_query_heads": lm.num_layers * lm.num_heads,
                    **{m: _stats(torch.tensor([r[m] for r in rows])) for m in METRICS}},
        "heads": rows,
        "environment": {"rtpurbo_vllm": __version__, "torch": torch.__version__, "device": str(lm.device),
                        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "wall_s": round(time.perf_counter() - t0, 2)},
    }


def render_markdown(report: dict[str, Any]) -> str:
    """The markdown report of an :func:`evaluate_artifact` results dict."""
    s, p = report["summary"], report["params"]
    summary = [{"metric": m, **s[m]} for m in METRICS]
    return (f"# RTPurbo indexer evaluation: {report['model']}\n\n"
            f"{s['num_retrieval_heads']} retrieval heads of {s['num_query_heads']} query heads; "
            f"top_p {p['top_p']}, prefill_top_p {p['prefill_top_p']}, block {p['block_size']}, "
            f"sink {p['sink_tokens']}; index keys in {report.get('index_key_dtype', 'float32')}; "
            f"{report['num_sequences']} held-out sequences x {report['seq_len']} tokens, "
            f"{report['queries_per_seq']} decode queries each (second half), each sequence prefilled as one "
            f"chunk in tiles of {report['prefill_tile_q']} rows; data: {report['data']}.\n\n"
            "- **recall**: share of the real attention mass inside the indexer's top-p blocks (decode)\n"
            "- **blocks_kept**: share of blocks the indexer keeps (sink and own block included)\n"
            "- **oracle_blocks_kept**: share an oracle keeps (block top-p on the real attention)\n"
            "- **prefill_recall**: per query tile, the real attention mass its rows keep on the tile's sink, "
            "diagonal and top-p blocks (averaged over its rows); mean over tiles\n"
            "- **prefill_recall_p10**: the same, 10th percentile over tiles\n"
            "- **prefill_blocks_kept**: kept blocks over causally visible blocks, summed over tiles (the "
            "prefill's attention work relative to dense)\n\n"
            "## Summary over heads\n\n" + outputs.markdown_table(summary) +
            "\n## Per head\n\n" + outputs.markdown_table(report["heads"]) +
            "\n_" + ", ".join(f"{k} {v}" for k, v in report["environment"].items()) + "_\n")


def write_report(report: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Writes ``evaluate.json`` and ``evaluate.md`` (atomically) to ``out_dir``."""
    out_dir = outputs.ensure_writable_dir(out_dir)
    return {"json": outputs.write_json(out_dir / REPORT_JSON, report),
            "markdown": outputs.write_bytes(out_dir / REPORT_MD, render_markdown(report).encode())}
