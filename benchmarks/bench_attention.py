"""One attention layer of Llama-3-8B shape: RTPURBO against FlashAttention-3 dense, same process and card.

Shape: 32 query heads, 8 KV heads, head dim 128, bf16, paged cache (64-token pages); 5 of 32 query
heads (15%) are retrieval heads, spread over 5 KV heads; local heads see 4 sinks + 8192 tokens.

- Prefill of one sequence at each length: FA3 dense causal vs the head-wise prefill
  (retrieval heads dense per KV group, local heads windowed + sink pass), plus the index-key write;
  and the same with the retrieval heads' sparse top-p prefill (``--prefill-top-p``, index queries
  included). As for decode, ``--keep`` of the blocks are planted as the indexer's hot blocks (every
  query of a retrieval head points the same way), and the share each tile really kept is printed.
- Decode (one new token per sequence, batch 1 and 32): FA3 paged decode vs the decode tokens' index keys
  and index queries (one launch) + block top-p + head-wise sparse decode, the local heads' part on a
  side stream beside block top-p (as served). ``--kv-cache-dtype fp8``: both read an FP8 K/V cache as
  vLLM serves one (FA3 with FP8 queries and descales, its ``FLASH_ATTN`` fp8 path, the queries quantised
  outside the timed step; RTPURBO's kernels with ``k_scale``/``v_scale``, its index keys in e4m3 as
  served with an fp8 cache unless ``--index-key-dtype`` says otherwise). The sparse decode's split
  scratch is sized for ``--max-num-seqs`` sequences, as the serving builder sizes it for vLLM's
  ``max_num_seqs``, which sets the splits per sequence.
  Random weights have no real sparsity, so the kept-block share is set explicitly: ``--keep`` of each
  sequence's blocks are planted as the indexer's hot blocks (the paper measures > 97% decode sparsity
  at 512K, i.e. about 3% kept); the share top-p really kept is printed. Both sides are timed as
  CUDA-graph replays (median of repeats) of ``--layers`` layers' steps, each layer with its own caches as
  in a model, and reported per layer. ``--variants`` times RTPURBO's step again with other launch
  settings (e.g. ``launch.pdl=1``) in the same process, beside this run's.

Run on a Hopper GPU from the repo root:
    python3 -P benchmarks/bench_attention.py --out results/
    python3 -P benchmarks/bench_attention.py --prefill --decode 128 --batch 1 --config sparse_decode.warps=8
    python3 -P benchmarks/bench_attention.py --prefill --decode 128 512 --batch 1 4 --variants launch.pdl=1
    python3 -P benchmarks/bench_attention.py --prefill --decode 128 --batch 1 4 --kv-cache-dtype fp8
It prints a table of times and ratios, where RTPURBO's sparse prefill spends its GPU time (per kernel,
one call under ``torch.profiler``), RTPURBO's decode step as the GPU runs it (each kernel's start and
duration in the replayed graph) beside FA3 over the local heads' window alone (every query head,
``window_size`` ``(WINDOW - 1, 0)``: what FA3 would take for the window splits' work), and per decode
point the bytes the step must read (:func:`decode_bytes`) with the achieved TB/s of both sides and
their share of the card's peak (``--peak-bandwidth``, by default the card's from
:data:`PEAK_BYTES_PER_S`); it writes ``bench_attention.json`` and ``bench_attention.png``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rtpurbo_vllm.attention.prefill import PrefillHeads, SparseRetrieval, headwise_prefill
from rtpurbo_vllm.bench.attention_layer import (BS, D, DI, HKV, HQ, PAGE, RETRIEVAL, SINK, TOP_P, WINDOW,
                                                DecodeIndexInputs,
                                                decode_index_inputs, dtype, plant_hot_blocks, random_block_table,
                                                rope_spec)
from rtpurbo_vllm.bench.environment import environment
from rtpurbo_vllm.bench.kernel_config import applied, apply_overrides, parse_overrides
from rtpurbo_vllm.bench.timing import (format_timeline, kernel_table, layer_count, profile_cuda_graph,
                                      profile_kernels, replay_timeline, time_cuda_graph, time_eager)
from rtpurbo_vllm.kv_cache.layer_kv import KVPart
from rtpurbo_vllm.kv_cache.layout import INDEX_KEY_DTYPES, index_key_dtype
from rtpurbo_vllm.outputs import write_figure, write_json
from rtpurbo_vllm.rope import apply_rope
from rtpurbo_vllm.triton_kernels.block_topp import block_topp, make_block_topp_workspace
from rtpurbo_vllm.triton_kernels.index_keys import IndexQueries, index_queries, rope_table, write_index_keys
from rtpurbo_vllm.triton_kernels.paged_heads import PagedHeads
from rtpurbo_vllm.triton_kernels.sparse_decode import (allocate_sparse_decode_workspace, headwise_sparse_decode,
                                                       local_splits_for, sm_count)
from rtpurbo_vllm.triton_kernels.sparse_prefill import TILE_Q, make_sparse_prefill_workspace, plan_sparse_prefill
from rtpurbo_vllm.triton_kernels.sparse_prefill.plan import TILE_INDEX

DTYPE = dtype()
KV_DTYPES = {"auto": DTYPE, "fp8": torch.float8_e4m3fn}     # --kv-cache-dtype, as vLLM names them
VLLM_MAX_NUM_SEQS = 1024                # vLLM's default max_num_seqs on an H100/H200 (the --max-num-seqs default)
# Peak HBM bandwidth of the Hopper cards FA3 runs on, by a part of the name torch gives the card (the default
# --peak-bandwidth; the first match counts): NVIDIA's data sheets.
PEAK_BYTES_PER_S = {"GH200 480GB": 4.0e12, "GH200": 4.9e12, "H200": 4.8e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12,
                    "H100": 3.35e12}
PREFILL_WAVE_TILES = 1024               # query tiles per sparse prefill wave (one layer's call, not a server's chunk)
ROPE = rope_spec()


def fa3(q, k_cache, v_cache, cu_q, seqused_k, max_q, max_k, block_table, out, window=None, descale=None):
    """FA3 as vLLM's FLASH_ATTN calls it; ``descale`` (``[B, HKV]`` float32): FP8 ``q`` and caches, with
    that descale for all three."""
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    scales = {} if descale is None else {"q_descale": descale, "k_descale": descale, "v_descale": descale}
    flash_attn_varlen_func(q, k_cache, v_cache, max_q, cu_q, max_k, seqused_k=seqused_k, causal=True,
                           softmax_scale=D ** -0.5, block_table=block_table, out=out, fa_version=3,
                           window_size=window, **scales)


def paged_cache(num_pages: int, device, kv_dtype: torch.dtype = DTYPE):
    """K|V cache of ``num_pages`` pages in vLLM's packed layout (``kv_dtype``: bf16 or float8_e4m3fn),
    random contents: ``(key_cache, value_cache, PagedHeads)``."""
    kv = torch.randn(num_pages, PAGE, HKV, 2 * D, dtype=DTYPE, device=device).to(kv_dtype)
    key_cache, value_cache = kv.split(D, dim=-1)
    return key_cache, value_cache, PagedHeads.single(kv)


def index_key_weights(device) -> tuple[torch.Tensor, torch.Tensor]:
    """The index-key write's inputs besides the keys: the KV head of each retrieval head (``[HR]`` int32)
    and random ``W_k`` (``[HR, DI, D]``, the layer's dtype)."""
    kv_heads = torch.tensor([h // (HQ // HKV) for h in RETRIEVAL], dtype=torch.int32, device=device)
    return kv_heads, torch.randn(len(RETRIEVAL), DI, D, dtype=DTYPE, device=device) / D ** 0.5


def bench_prefill(length: int, device, repeats: int, prefill_top_p: float = TOP_P, keep: float = 0.03) -> dict:
    block_table, num_pages = random_block_table(length, 1, device)
    key_cache, value_cache, kv = paged_cache(num_pages, device)
    positions = torch.arange(length, device=device)
    q = torch.randn(length, HQ, D, dtype=DTYPE, device=device)
    # Every retrieval query points one way per head (its pre-RoPE vector is constant), so the planted
    # hot blocks hold each tile's index mass.
    q[:, list(RETRIEVAL)] = apply_rope(torch.randn(1, len(RETRIEVAL), D, device=device).expand(length, -1, -1),
                                       positions, ROPE).to(DTYPE)
    k_new = torch.randn(length, HKV, D, dtype=DTYPE, device=device)
    cu_q = torch.tensor([0, length], dtype=torch.int32, device=device)
    seqused = torch.tensor([length], dtype=torch.int32, device=device)
    out = torch.empty_like(q)
    heads = PrefillHeads.build(RETRIEVAL, HQ, HKV, device)
    parts = [KVPart(key_cache, value_cache, block_table, tuple(range(HKV)))]
    retrieval = torch.tensor(RETRIEVAL, dtype=torch.int32, device=device)
    w_q = torch.randn(len(RETRIEVAL), DI, D, dtype=DTYPE, device=device) / D ** 0.5
    kv_heads, w_k = index_key_weights(device)
    index = PagedHeads.single(torch.empty(block_table.numel(), PAGE, len(RETRIEVAL), DI, dtype=DTYPE, device=device))
    slots = (block_table[0, positions // PAGE].long() * PAGE + positions % PAGE)
    table = rope_table(ROPE, device, num_positions=length)
    q_idx = torch.empty(length, len(RETRIEVAL), DI, dtype=DTYPE, device=device)
    index_queries(q, positions, table, retrieval, w_q, q_idx, is_neox_style=True)
    planted = torch.empty(block_table.numel(), PAGE, len(RETRIEVAL), DI, dtype=DTYPE, device=device)
    plant_hot_blocks(q_idx[:1], planted, block_table, length, keep, torch.Generator().manual_seed(0))
    planted_index = PagedHeads.single(planted)
    plan = plan_sparse_prefill([length], [length], PREFILL_WAVE_TILES, TILE_Q, device)
    workspace = make_sparse_prefill_workspace(PREFILL_WAVE_TILES, len(RETRIEVAL), length, BS, TILE_Q, device)
    sparse = SparseRetrieval(kv=kv, kv_tables=[kv.table(0, block_table)], index=planted_index,
                             index_table=planted_index.table(0, block_table), index_queries=q_idx, heads=retrieval,
                             plan=plan, workspace=workspace, top_p=prefill_top_p, block_size=BS)

    def dense():
        fa3(q, key_cache, value_cache, cu_q, seqused, length, length, block_table, out)

    def rtpurbo():
        write_index_keys(k_new, positions, table, kv_heads, w_k, slots, index, is_neox_style=True)
        headwise_prefill(q, parts, cu_q, seqused, length, length, heads, SINK, WINDOW, D ** -0.5, out)

    def rtpurbo_sparse():
        write_index_keys(k_new, positions, table, kv_heads, w_k, slots, index, is_neox_style=True)
        index_queries(q, positions, table, retrieval, w_q, q_idx, is_neox_style=True)
        headwise_prefill(q, parts, cu_q, seqused, length, length, heads, SINK, WINDOW, D ** -0.5, out, sparse=sparse)

    def sparse_seconds():
        start = time.perf_counter()
        rtpurbo_sparse()
        torch.cuda.synchronize()
        return time.perf_counter() - start

    reps = max(2, repeats // max(1, length // 131072))
    t_dense, t_rtp, t_sparse = (time_eager(fn, reps, 1) for fn in (dense, rtpurbo, rtpurbo_sparse))
    seconds, kernels = profile_kernels(sparse_seconds)
    # Kept share of the last wave's tiles (the longest), against the blocks each tile may see.
    last = plan.waves[-1]
    tile_index = plan.tiles[-1, TILE_INDEX, :last.num_tiles].long()
    keys = ((tile_index + 1) * TILE_Q).clamp(max=length)                  # a fresh prefill: row i is position i
    visible = torch.div(keys + BS - 1, BS, rounding_mode="floor")
    kept = workspace.num_kept[:last.num_tiles, :len(RETRIEVAL)].float().sum() / (visible.sum() * len(RETRIEVAL))
    flops = 4 * length * length / 2 * HQ * D
    return {"phase": "prefill", "batch": 1, "context": length, "fa3_ms": t_dense, "rtpurbo_ms": t_rtp,
            "speedup": t_dense / t_rtp, "rtpurbo_sparse_ms": t_sparse, "sparse_speedup": t_dense / t_sparse,
            "prefill_top_p": prefill_top_p, "kept_block_share": float(kept), "fa3_tflops": flops / t_dense / 1e9,
            "rtpurbo_sparse_kernels": kernel_table(kernels, seconds, top=10)}


@dataclass
class DecodeLayer:
    """One layer's own tensors in :func:`bench_decode`: its K/V cache (as FA3 and as RTPURBO read it), its
    decode-step queries (``q_fa3`` in the cache's dtype) with their index queries and index keys, and the
    decode tokens' keys ``k_new`` ``[B, HKV, D]`` with the index-key weights ``w_k``."""

    key_cache: torch.Tensor
    value_cache: torch.Tensor
    kv: PagedHeads
    kv_tables: list
    inputs: DecodeIndexInputs
    queries: IndexQueries
    q_fa3: torch.Tensor
    k_new: torch.Tensor
    w_k: torch.Tensor


def bench_decode(batch: int, length: int, keep: float, device, repeats: int, max_model_len: int | None = None,
                 max_num_seqs: int | None = None, kv_cache_dtype: str = "auto", index_keys: str = "auto",
                 layers: int = 1) -> dict:
    """One decode step of ``batch`` sequences of ``length`` tokens. RTPURBO's block top-p is sized, as in
    serving, by ``max_model_len`` (default ``length``): ``max_blocks = ceil(max_model_len / BS)``; its
    split scratch by ``max_num_seqs`` (default ``batch``); ``kv_cache_dtype`` a key of :data:`KV_DTYPES`;
    ``index_keys`` the index keys' storage, one of :data:`~rtpurbo_vllm.kv_cache.layout.INDEX_KEY_DTYPES`
    as the serving option ``index_key_dtype``. Each timed graph runs the step of ``layers`` layers one
    after the other, each with its own caches, queries and weights over one block table and one set of
    workspaces, as a model's decode graph does; the times are per layer (the replay's launch shared by
    the layers, and no layer finding in L2 what its previous replay left there)."""
    kv_dtype = KV_DTYPES[kv_cache_dtype]
    fp8 = kv_dtype != DTYPE
    index_dtype = index_key_dtype(index_keys, DTYPE, torch.uint8 if fp8 else DTYPE)
    block_table, num_pages = random_block_table(length, batch, device)
    stack = []
    for _ in range(layers):
        key_cache, value_cache, kv = paged_cache(num_pages, device, kv_dtype)
        inputs = decode_index_inputs(batch, length, keep, block_table, num_pages, device, index_dtype)
        queries = IndexQueries(inputs.q, inputs.heads, inputs.w_q, inputs.q_idx)
        kv_heads, w_k = index_key_weights(device)
        stack.append(DecodeLayer(key_cache, value_cache, kv, [kv.table(0, block_table)], inputs, queries,
                                 inputs.q.to(kv_dtype), torch.randn(batch, HKV, D, dtype=DTYPE, device=device), w_k))
    seq_lens, table, heads = stack[0].inputs.seq_lens, stack[0].inputs.rope_table, stack[0].inputs.heads
    positions = stack[0].inputs.positions
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device=device)
    out = torch.empty_like(stack[0].inputs.q)
    max_model_len = max(max_model_len or length, length)
    max_blocks = math.ceil(max_model_len / BS)
    selected = torch.empty(batch, len(RETRIEVAL), max_blocks, dtype=torch.int32, device=device)
    num_selected = torch.empty(batch, len(RETRIEVAL), dtype=torch.int32, device=device)
    topp_ws = make_block_topp_workspace(batch, len(RETRIEVAL), max_blocks, device)
    max_num_seqs = max(max_num_seqs or batch, batch)
    attn_ws = allocate_sparse_decode_workspace(max_num_seqs, HQ, D, device=device)
    splits = attn_ws.splits_for_batch(batch)
    kv_scale = torch.ones(1, dtype=torch.float32, device=device) if fp8 else None
    descale = torch.ones(batch, HKV, dtype=torch.float32, device=device) if fp8 else None

    def dense():
        for layer in stack:
            fa3(layer.q_fa3, layer.key_cache, layer.value_cache, cu_q, seq_lens, 1, length, block_table, out,
                descale=descale)

    def window():           # FA3 over the window alone (no sinks), every query head: the local heads' part its way
        for layer in stack:
            fa3(layer.q_fa3, layer.key_cache, layer.value_cache, cu_q, seq_lens, 1, length, block_table, out,
                window=(WINDOW - 1, 0), descale=descale)

    side_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    # The decode tokens' index keys (into their own, last slots) with their index queries in one launch.
    slots = block_table[:, (length - 1) // PAGE].long() * PAGE + (length - 1) % PAGE

    def rtpurbo():          # as the backend runs it: the local heads' splits beside the selection
        for layer in stack:
            x = layer.inputs

            def select(x=x):           # block top-p (block scores + selection)
                block_topp(x.q_idx, x.index, x.index_table, seq_lens, TOP_P, SINK, BS, max_blocks, topp_ws,
                           selected, num_selected)

            write_index_keys(layer.k_new, positions, table, kv_heads, layer.w_k, slots, x.index, is_neox_style=True,
                             queries=layer.queries)
            headwise_sparse_decode(x.q, layer.kv, layer.kv_tables, seq_lens, heads, selected,
                                   num_selected, BS, SINK, WINDOW, D ** -0.5, attn_ws, out, k_scale=kv_scale,
                                   v_scale=kv_scale, select=select, side_stream=side_stream)

    t_dense, t_rtp, t_window = (time_cuda_graph(fn, repeats) / layers for fn in (dense, rtpurbo, window))
    kept = num_selected.float().mean().item() / math.ceil(length / BS)
    timeline = replay_timeline(profile_cuda_graph(rtpurbo, repeats), repeats)
    return {"phase": "decode", "batch": batch, "context": length, "max_model_len": max_model_len, "layers": layers,
            "kv_cache_dtype": kv_cache_dtype, "index_key_dtype": index_keys, "index_key_bytes": index_dtype.itemsize,
            "max_num_seqs": max_num_seqs, "splits": splits,
            "local_splits": local_splits_for(batch, HKV, splits, sm_count(device)),
            "fa3_ms": t_dense, "rtpurbo_ms": t_rtp, "speedup": t_dense / t_rtp, "fa3_window_ms": t_window,
            "kept_block_share": kept,
            "bytes": decode_bytes(batch, length, int(num_selected.sum().item()), kv_dtype.itemsize,
                                  index_dtype.itemsize),
            "rtpurbo_kernels": timeline}


def format_kernel_table(table: dict, title: str) -> list[str]:
    """A :func:`~rtpurbo_vllm.bench.timing.kernel_table` of one call as text: its wall and summed GPU time,
    then per kernel its GPU milliseconds, share of the GPU time, launches and name."""
    lines = [f"\n{title}: wall {table['wall_ms']:.1f} ms, kernels {table['gpu_ms']:.1f} ms on the GPU"]
    lines += [f"  {k['ms']:9.3f} ms {k['ms'] / table['gpu_ms']:6.1%} {k['launches']:6.0f}x  {k['name'][:60]}"
              for k in table["kernels"]]
    return lines


def decode_bytes(batch: int, length: int, kept_blocks: int, kv_bytes: int = 2, index_bytes: int = 2) -> dict[str, int]:
    """Bytes one decode step of one layer must read from HBM, at the least.

    Args:
        batch: sequences, each ``length`` tokens long.
        kept_blocks: blocks block top-p kept, summed over sequences and retrieval heads.
        kv_bytes: bytes of one K or V element (2: bf16, 1: fp8); index_bytes: of one index-key element.

    Returns:
        ``fa3``: K and V of every KV head over the whole context; ``rtpurbo``: K and V of the sink and
        window tokens of every KV head that serves a local head, the 16-dim index keys of every
        retrieval head over the context, and K and V of each retrieval head's kept ``BS``-token blocks.
    """
    kv_token = 2 * D * kv_bytes                                               # K and V of one token, one KV head
    local_kv_heads = len({h // (HQ // HKV) for h in range(HQ) if h not in RETRIEVAL})
    window = batch * min(length, SINK + WINDOW) * local_kv_heads * kv_token
    index = batch * length * len(RETRIEVAL) * DI * index_bytes
    kept = kept_blocks * BS * kv_token
    return {"fa3": batch * length * HKV * kv_token, "rtpurbo": window + index + kept,
            "rtpurbo_window": window, "rtpurbo_index": index, "rtpurbo_kept": kept}


def card_peak_bandwidth(name: str) -> float | None:
    """The peak memory bandwidth (bytes/s) of the card called ``name`` (``torch.cuda.get_device_name``),
    or None for a card not in :data:`PEAK_BYTES_PER_S`."""
    return next((peak for part, peak in PEAK_BYTES_PER_S.items() if part in name), None)


def add_bandwidth(row: dict, peak_bytes_per_s: float) -> dict:
    """``row`` (a decode row) with the bytes of :func:`decode_bytes`, the achieved TB/s of both sides
    and their share of the card's peak ``peak_bytes_per_s``."""
    row = dict(row)
    for side in ("fa3", "rtpurbo"):
        per_s = row["bytes"][side] / (row[f"{side}_ms"] * 1e-3)
        row[f"{side}_tb_per_s"] = per_s / 1e12
        row[f"{side}_peak_share"] = per_s / peak_bytes_per_s
    return row


def print_bandwidth(rows: list[dict], peak_bytes_per_s: float) -> None:
    """Per decode point: the bytes the step must read and the achieved bandwidth, both sides."""
    print(f"\nDecode bandwidth: bytes one layer's step must read (MB), achieved TB/s and share of the peak "
          f"{peak_bytes_per_s / 1e12:.2f} TB/s")
    print(f"{'batch':>5} {'context':>8} {'FA3 MB':>10} {'FA3 TB/s':>9} {'peak':>6} {'RTP MB':>10} {'RTP TB/s':>9} "
          f"{'peak':>6} {'window':>8} {'index':>8} {'kept':>8}")
    for r in rows:
        b = r["bytes"]
        print(f"{r['batch']:5d} {r['context'] // 1024:7d}K {b['fa3'] / 1e6:10.2f} {r['fa3_tb_per_s']:9.2f} "
              f"{r['fa3_peak_share']:6.1%} {b['rtpurbo'] / 1e6:10.2f} {r['rtpurbo_tb_per_s']:9.2f} "
              f"{r['rtpurbo_peak_share']:6.1%} {b['rtpurbo_window'] / 1e6:8.2f} {b['rtpurbo_index'] / 1e6:8.2f} "
              f"{b['rtpurbo_kept'] / 1e6:8.2f}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, phase in zip(axes, ("prefill", "decode")):
        for batch in sorted({r["batch"] for r in rows if r["phase"] == phase}):
            pts = [r for r in rows if r["phase"] == phase and r["batch"] == batch]
            ax.plot([r["context"] // 1024 for r in pts], [r["speedup"] for r in pts], marker="o",
                    label=f"batch {batch}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (K tokens)")
        ax.set_ylabel("speedup over FA3 dense")
        ax.set_title(f"{phase}, one layer (32q/8kv, d=128, 15% retrieval)")
        ax.axhline(1, color="gray", lw=0.5)
        ax.legend()
    fig.tight_layout()
    write_figure(path, fig)


def time_variants(variants: dict[str, dict], decode_rows: list[dict], run) -> list[dict]:
    """RTPURBO's decode step at every point of ``decode_rows`` again under each of ``variants``
    (``{text: overrides}``, :func:`rtpurbo_vllm.bench.kernel_config.applied`), by ``run(batch, length)``
    (a :func:`bench_decode` row); one row per (variant, point) with its time beside the point's own."""
    out = []
    for text, variant in variants.items():
        with applied(variant):
            for base in decode_rows:
                row = run(base["batch"], base["context"])
                out.append({"variant": text, "batch": base["batch"], "context": base["context"],
                            "rtpurbo_ms": row["rtpurbo_ms"], "base_ms": base["rtpurbo_ms"],
                            "speedup_vs_base": base["rtpurbo_ms"] / row["rtpurbo_ms"],
                            "rtpurbo_kernels": row["rtpurbo_kernels"]})
                print(out[-1], flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefill", metavar="K", type=int, nargs="*", default=[32, 128, 512, 1024],
                        help="prefill context lengths in K tokens (default 32 128 512 1024)")
    parser.add_argument("--decode", metavar="K", type=int, nargs="*", default=[32, 128, 512],
                        help="decode context lengths in K tokens (default 32 128 512)")
    parser.add_argument("--batch", metavar="B", type=int, nargs="*", default=[1, 32],
                        help="decode batch sizes (default 1 32)")
    parser.add_argument("--max-model-len", metavar="K", type=int, default=None,
                        help="decode: size block top-p for this max_model_len in K tokens, as a server with "
                             "--max-model-len does (default: each context itself)")
    parser.add_argument("--kv-cache-dtype", choices=sorted(KV_DTYPES), default="auto",
                        help="decode: the K/V cache of both sides, as vLLM's --kv-cache-dtype (default auto: bf16)")
    parser.add_argument("--index-key-dtype", choices=INDEX_KEY_DTYPES, default="auto",
                        help="decode: RTPURBO's index keys, as the serving option index_key_dtype (default auto: "
                             "e4m3 with an fp8 cache, else bf16)")
    parser.add_argument("--max-num-seqs", metavar="N", type=int, default=VLLM_MAX_NUM_SEQS,
                        help="decode: size the sparse decode's split scratch as a server with this max_num_seqs "
                             "does (default %(default)s, vLLM's on an H100/H200)")
    parser.add_argument("--keep", metavar="SHARE", type=float, default=0.03,
                        help="share of blocks planted as the indexer's hot blocks (default 0.03)")
    parser.add_argument("--prefill-top-p", metavar="P", type=float, default=TOP_P,
                        help="prefill: the retrieval heads' sparse prefill top-p (default %(default)s)")
    parser.add_argument("--repeats", metavar="N", type=int, default=20, help="timed repeats (median)")
    parser.add_argument("--layers", metavar="N", type=layer_count, default=4,
                        help="decode: layers per timed graph, each with its own caches, times per layer (default "
                             "%(default)s: a model's graph shares its launch, and a layer's bytes leave L2 before "
                             "its next replay)")
    parser.add_argument("--peak-bandwidth", metavar="BYTES_PER_S", type=float,
                        help="the card's peak memory bandwidth, for the decode bandwidth table (default: the "
                             "card's, for " + ", ".join(PEAK_BYTES_PER_S) + ")")
    parser.add_argument("--config", metavar="KERNEL.KEY=VALUE", nargs="*", default=[],
                        help="launch settings of the Triton kernels for this run (rtpurbo_vllm.bench.kernel_config), "
                             "e.g. sparse_decode.warps=8 block_topp.search_bits=2")
    parser.add_argument("--variants", metavar="KERNEL.KEY=VALUE[,...]", nargs="*", default=[],
                        help="decode: time RTPURBO's step again at every point with each of these settings (on top "
                             "of --config), e.g. launch.pdl=1 block_topp.stats_blocks_per_prog=8,launch.pdl=1")
    parser.add_argument("--out", metavar="DIR", default="results", help="folder for the JSON and the PNG")
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.config)
        variants = {text: parse_overrides(text.split(",")) for text in args.variants}
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name(0)
    peak_bandwidth = args.peak_bandwidth or card_peak_bandwidth(card)
    if peak_bandwidth is None:
        print(f"error: no peak memory bandwidth known for {card!r}: pass --peak-bandwidth BYTES_PER_S "
              "(e.g. 3.35e12 for an H100 SXM)", file=sys.stderr)
        return 2
    kernel_config = apply_overrides(overrides)
    device = torch.device("cuda")
    torch.manual_seed(0)
    max_model_len = args.max_model_len and args.max_model_len * 1024
    rows = []
    for k in args.prefill:
        rows.append(bench_prefill(k * 1024, device, args.repeats, args.prefill_top_p, args.keep))
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    for batch in args.batch:
        for k in args.decode:
            free = torch.cuda.mem_get_info()[0]
            need = batch * k * 1024 * HKV * 2 * D * KV_DTYPES[args.kv_cache_dtype].itemsize * 1.3 * args.layers
            if need > free:
                print(f"skip decode batch {batch} at {k}K: needs {need / 2**30:.0f} GiB, {free / 2**30:.0f} free")
                continue
            rows.append(add_bandwidth(bench_decode(batch, k * 1024, args.keep, device, args.repeats,
                                                   max_model_len, args.max_num_seqs, args.kv_cache_dtype,
                                                   args.index_key_dtype, args.layers),
                                      peak_bandwidth))
            print(rows[-1], flush=True)
            torch.cuda.empty_cache()
    variant_rows = time_variants(variants, [r for r in rows if r["phase"] == "decode"],
                                 lambda batch, length: bench_decode(batch, length, args.keep, device, args.repeats,
                                                                    max_model_len, args.max_num_seqs,
                                                                    args.kv_cache_dtype, args.index_key_dtype,
                                                                    args.layers))
    out = Path(args.out)
    result = {"environment": {**environment(), "sm_count": torch.cuda.get_device_properties(0).multi_processor_count},
              "shape": {"HQ": HQ, "HKV": HKV, "D": D, "retrieval": RETRIEVAL, "sink": SINK, "window": WINDOW,
                        "top_p": TOP_P},
              "peak_bandwidth": peak_bandwidth, "kernel_config": kernel_config, "command": " ".join(sys.argv),
              "rows": rows, "variants": variant_rows}
    write_json(out / "bench_attention.json", result)
    plot(rows, out / "bench_attention.png")
    print(f"\n{result['environment']['device']}  (times in ms, median; decode: K/V cache {args.kv_cache_dtype}, "
          f"index keys {args.index_key_dtype}, per layer of {args.layers}-layer graphs, "
          f"split scratch for max_num_seqs {args.max_num_seqs}"
          + (f"; block top-p sized for max_model_len {args.max_model_len}K)" if args.max_model_len else ")"))
    if overrides:
        print("kernel settings set for this run: " + ", ".join(f"{k}.{key}={v}" for k, values in overrides.items()
                                                               for key, v in values.items()))
    print(f"{'phase':8} {'batch':>5} {'context':>8} {'FA3':>10} {'RTPURBO':>10} {'speedup':>8} {'kept':>6} "
          f"{'sparse pf':>10} {'speedup':>8}")
    for r in rows:
        sparse = f"{r['rtpurbo_sparse_ms']:10.3f} {r['sparse_speedup']:7.2f}x" if "rtpurbo_sparse_ms" in r else ""
        print(f"{r['phase']:8} {r['batch']:5d} {r['context'] // 1024:7d}K {r['fa3_ms']:10.3f} "
              f"{r['rtpurbo_ms']:10.3f} {r['speedup']:7.2f}x {r['kept_block_share']:6.3f} {sparse}")
    for r in rows:
        if "rtpurbo_sparse_kernels" in r:
            print("\n".join(format_kernel_table(r["rtpurbo_sparse_kernels"], f"RTPURBO sparse prefill, "
                                                 f"{r['context'] // 1024}K, one call under torch.profiler")))
    decode_rows = [r for r in rows if "rtpurbo_kernels" in r]
    if decode_rows:
        print(f"\nRTPURBO decode step on the GPU: its CUDA graph ({args.layers} layers) replayed {args.repeats} times "
              "under torch.profiler (medians; kernels of the side stream overlap the others)")
    for r in decode_rows:
        print(f"batch {r['batch']}, {r['context'] // 1024}K: step {r['rtpurbo_ms'] * 1000:.1f} us per layer (events); "
              f"FA3 over the window alone, every head: {r['fa3_window_ms'] * 1000:.1f} us")
        print("\n".join(format_timeline(r["rtpurbo_kernels"])))
    if decode_rows:
        print_bandwidth(decode_rows, peak_bandwidth)
    if variant_rows:
        print("\nRTPURBO decode step with other settings (ms; > 1: faster than this run's settings)")
        print(f"{'batch':>5} {'context':>8} {'base':>9} {'variant':>9} {'speedup':>8}  settings")
        for v in variant_rows:
            print(f"{v['batch']:5d} {v['context'] // 1024:7d}K {v['base_ms']:9.4f} {v['rtpurbo_ms']:9.4f} "
                  f"{v['speedup_vs_base']:7.3f}x  {v['variant']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
