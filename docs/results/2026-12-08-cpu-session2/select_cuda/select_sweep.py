"""Experiment: the decode block top-p selection in CUDA (``topp_select.cu`` here) against the Triton
``_select_kernel`` on the same block stats, on a GPU.

1. Correctness: random, flat, tied and peaked block stats of awkward lengths (several sequences of
   different lengths, dense sequences under ``dense_threshold``, ``top_p`` 1, sinks), and the layer
   benchmark's decode inputs: rows where the two select different blocks are counted, and each such row's
   kept mass (float64, from the stats) is printed for both, so a borderline difference (summation order)
   can be told from a bug.
2. Speed: CUDA-graph replays of ``--layers`` layers' selections (each layer with its own stats), the
   Triton selection alone, the CUDA one alone, and ``block_topp`` (stats + Triton selection) whole, per
   layer, at bench_attention's decode points.
3. The layer: ``benchmarks/bench_attention.py``'s decode step (bf16, and with ``--kv-cache-dtype fp8``
   when asked) with the Triton selection, then with the CUDA one launched in its place inside
   ``block_topp``, each beside FA3, with the selection's GPU time in the step.

Run from the repository root on a GPU (compiles the extension with the machine's nvcc, ~1 min):
    python3 -P docs/results/2026-12-08-cpu-session2/select_cuda/select_sweep.py [--contexts 128 512 1024] [--batch 1 4]
Exit 1 if a row differs by more than a borderline difference (kept mass off top_p by more than 1e-5).
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import shutil
import sys
import tempfile

import torch
import triton

from rtpurbo_vllm.bench.attention_layer import (BS, RETRIEVAL, SINK, TOP_P, decode_index_inputs,
                                                random_block_table)
from rtpurbo_vllm.bench.timing import time_cuda_graph
from rtpurbo_vllm.triton_kernels.block_topp import block_topp, make_block_topp_workspace
from rtpurbo_vllm.triton_kernels.block_topp import kernel as topp_kernel

HERE = os.path.dirname(os.path.abspath(__file__))


def missing_cuda_headers() -> list[str]:
    """An include folder with the CUDA library headers torch's headers want (cusparse.h, ...) where the
    toolkit lacks them and the pip ``nvidia`` packages have them (only the missing ones: the toolkit's
    own ``crt/`` headers must win)."""
    cuda_include = os.path.join(os.environ["CUDA_HOME"], "include")
    if os.path.exists(os.path.join(cuda_include, "cusparse.h")):
        return []
    import nvidia

    sources = [d for p in nvidia.__path__ for d in glob.glob(os.path.join(p, "*", "include"))
               if os.path.exists(os.path.join(d, "cusparse.h"))]
    if not sources:
        return []
    folder = tempfile.mkdtemp(prefix="cuda_headers_")
    for name in os.listdir(sources[0]):
        if not os.path.exists(os.path.join(cuda_include, name)):
            os.symlink(os.path.join(sources[0], name), os.path.join(folder, name))
    return [folder]


def build():
    if "CUDA_HOME" not in os.environ:
        nvcc = shutil.which("nvcc")
        os.environ["CUDA_HOME"] = ("/usr/local/cuda" if os.path.exists("/usr/local/cuda/bin/nvcc") or not nvcc
                                   else os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    from torch.utils.cpp_extension import load

    return load(name="rtpurbo_topp_select_exp", sources=[os.path.join(HERE, "topp_select.cu")],
                extra_cuda_cflags=["-O3", "-gencode=arch=compute_90,code=sm_90", "--resource-usage"],
                extra_include_paths=missing_cuda_headers(),
                build_directory=tempfile.mkdtemp(prefix="topp_select_"), verbose=True)


def triton_select(ws, seq_lens, selected, num_selected, top_p, sink_tokens, max_blocks, dense_threshold=0):
    """The Triton selection alone, launched as block_topp launches it."""
    cfg = topp_kernel.CONFIG
    chunk = min(triton.next_power_of_2(max_blocks), cfg["select_chunk"])
    warps = cfg["select_warps"] or (4 if chunk <= 1024 else 8 if chunk <= 4096 else 16)
    topp_kernel._select_kernel[(selected.shape[1], selected.shape[0])](
        seq_lens, ws.block_max, ws.block_sum, selected, num_selected,
        ws.block_max.stride(0), ws.block_max.stride(1), selected.stride(0), selected.stride(1),
        num_selected.stride(0), num_selected.stride(1), float(top_p), dense_threshold,
        math.ceil(sink_tokens / BS), max_blocks, BLOCK_SIZE=BS, CHUNK=chunk, SEARCH_BITS=cfg["search_bits"],
        PDL=False, num_warps=warps)


def cuda_select(ext, ws, seq_lens, selected, num_selected, top_p, sink_tokens, max_blocks, dense_threshold=0):
    ext.topp_select(seq_lens, ws.block_max, ws.block_sum, selected, num_selected, float(top_p), dense_threshold,
                    math.ceil(sink_tokens / BS), max_blocks, BS)


def kept_mass(ws, b, h, kept, num_blocks):
    """Kept mass of one row (float64) from its block stats."""
    m = ws.block_max[b, h, :num_blocks].double()
    mass = ws.block_sum[b, h, :num_blocks].double() * torch.exp(m - m.max())
    mass = mass / mass.sum()
    return mass[kept.long()].sum().item()


def compare(ext, ws, seq_lens, top_p, sink_tokens, max_blocks, dense_threshold, label) -> int:
    """Runs both selections on ``ws``; prints and returns the rows that differ beyond a borderline case."""
    batch, heads = ws.block_max.shape[0], ws.block_max.shape[1]
    outs = []
    for fn in (lambda s, n: triton_select(ws, seq_lens, s, n, top_p, sink_tokens, max_blocks, dense_threshold),
               lambda s, n: cuda_select(ext, ws, seq_lens, s, n, top_p, sink_tokens, max_blocks, dense_threshold)):
        s = torch.full((batch, heads, max_blocks), -7, dtype=torch.int32, device="cuda")
        n = torch.full((batch, heads), -7, dtype=torch.int32, device="cuda")
        fn(s, n)
        torch.cuda.synchronize()
        outs.append((s, n))
    (st, nt), (sc, nc) = outs
    bad = 0
    differ = 0
    for b in range(batch):
        num_blocks = min(math.ceil(int(seq_lens[b]) / BS), max_blocks)
        for h in range(heads):
            if torch.equal(st[b, h], sc[b, h]) and int(nt[b, h]) == int(nc[b, h]):
                continue
            differ += 1
            kt, kc = st[b, h, :int(nt[b, h])], sc[b, h, :max(int(nc[b, h]), 0)]
            mt, mc = kept_mass(ws, b, h, kt, num_blocks), kept_mass(ws, b, h, kc, num_blocks)
            padded = bool((sc[b, h, max(int(nc[b, h]), 0):] == -1).all())
            borderline = (padded and abs(int(nt[b, h]) - int(nc[b, h])) <= 1 and mc >= top_p - 1e-5
                          and abs(mt - mc) < 1e-4)
            bad += not borderline
            print(f"  {label}: row (b={b}, h={h}) differs: triton {int(nt[b, h])} blocks mass {mt:.7f}, cuda "
                  f"{int(nc[b, h])} blocks mass {mc:.7f}{'' if borderline else '  <-- NOT borderline'}")
    print(f"{label}: {batch * heads} rows, {differ} differ, {bad} beyond a borderline case")
    return bad


def random_stats(batch, heads, max_blocks, pattern, gen):
    ws = make_block_topp_workspace(batch, heads, max_blocks, "cuda")
    shape = (batch, heads, max_blocks)
    if pattern == "random":
        m = torch.randn(shape, generator=gen) * 3
        s = torch.rand(shape, generator=gen) * 63 + 1
    elif pattern == "flat":
        m = torch.randn(shape, generator=gen) * 0.01
        s = 64 - torch.rand(shape, generator=gen) * 0.1
    elif pattern == "ties":
        m = torch.zeros(shape)
        s = torch.full(shape, 32.0)
        m[..., ::7] = 2.0
    else:   # peaked: a few hot blocks
        m = torch.randn(shape, generator=gen) * 0.3
        s = torch.rand(shape, generator=gen) * 63 + 1
        hot = torch.randint(0, max_blocks, (batch, heads, 3), generator=gen)
        m.scatter_(2, hot, 12.0)
    ws.block_max.copy_(m)
    ws.block_sum.copy_(s)
    return ws


def correctness(ext) -> int:
    gen = torch.Generator().manual_seed(0)
    bad = 0
    for max_blocks in (1, 3, 100, 1000, 2048, 2049, 4096, 5000, 8192, 16384, 20000):
        for pattern in ("random", "flat", "ties", "peaked"):
            batch = 7
            lens = torch.randint(1, max_blocks * BS + 1, (batch,), generator=gen)
            lens[0] = max_blocks * BS          # a full row
            lens[1] = 0                        # an empty (padded) row
            seq_lens = lens.to(torch.int32).cuda()
            ws = random_stats(batch, len(RETRIEVAL), max_blocks, pattern, gen)
            for top_p, dense in ((TOP_P, 0), (0.5, 0), (0.99, 0), (1.0, 0), (TOP_P, max_blocks * BS // 2)):
                bad += compare(ext, ws, seq_lens, top_p, SINK if max_blocks > 1 else 0, max_blocks, dense,
                               f"blocks {max_blocks} {pattern} top_p {top_p} dense<{dense}")
    return bad


def speed(ext, contexts, batches, layers, repeats) -> int:
    print(f"\n{torch.cuda.get_device_name()}: selection per layer of {layers}-layer CUDA graphs (median of {repeats})")
    print(f"{'batch':>5} {'context':>8} {'triton select us':>17} {'cuda select us':>15} {'ratio':>6} "
          f"{'block_topp us':>14} {'with cuda us':>13}")
    bad = 0
    for batch in batches:
        for k in contexts:
            length = k * 1024
            max_blocks = math.ceil(length / BS)
            block_table, num_pages = random_block_table(length, batch, "cuda")
            stack = [decode_index_inputs(batch, length, 0.03, block_table, num_pages, "cuda") for _ in range(layers)]
            wss = [make_block_topp_workspace(batch, len(RETRIEVAL), max_blocks, "cuda") for _ in range(layers)]
            sel = torch.empty(batch, len(RETRIEVAL), max_blocks, dtype=torch.int32, device="cuda")
            num = torch.empty(batch, len(RETRIEVAL), dtype=torch.int32, device="cuda")
            for inputs, ws in zip(stack, wss):      # each layer's block stats
                block_topp(inputs.q_idx, inputs.index, inputs.index_table, inputs.seq_lens, TOP_P, SINK, BS,
                           max_blocks, ws, sel, num)
            seq_lens = stack[0].seq_lens
            bad += compare(ext, wss[-1], seq_lens, TOP_P, SINK, max_blocks, 0, f"b{batch} {k}K layer inputs")

            def run_triton():
                for ws in wss:
                    triton_select(ws, seq_lens, sel, num, TOP_P, SINK, max_blocks)

            def run_cuda():
                for ws in wss:
                    cuda_select(ext, ws, seq_lens, sel, num, TOP_P, SINK, max_blocks)

            def run_block_topp():
                for inputs, ws in zip(stack, wss):
                    block_topp(inputs.q_idx, inputs.index, inputs.index_table, inputs.seq_lens, TOP_P, SINK, BS,
                               max_blocks, ws, sel, num)

            t_tri = time_cuda_graph(run_triton, repeats) / layers * 1e3
            t_cu = time_cuda_graph(run_cuda, repeats) / layers * 1e3
            t_all = time_cuda_graph(run_block_topp, repeats) / layers * 1e3
            print(f"{batch:5d} {k:7d}K {t_tri:17.1f} {t_cu:15.1f} {t_tri / t_cu:5.2f}x {t_all:14.1f} "
                  f"{t_all - t_tri + t_cu:13.1f}", flush=True)
            del stack, wss
            torch.cuda.empty_cache()
    return bad


class CudaSelectLaunch:
    """Stands in for ``block_topp``'s ``_select_kernel``: ``[grid](...)`` with the Triton launch's arguments
    launches the CUDA selection instead."""

    def __init__(self, ext):
        self.ext = ext

    def __getitem__(self, grid):
        def launch(seq_lens, block_max, block_sum, selected, num_selected, *rest, BLOCK_SIZE, **_):
            top_p, dense_threshold, num_sink_blocks, max_blocks = rest[6:10]
            self.ext.topp_select(seq_lens, block_max, block_sum, selected, num_selected, top_p, dense_threshold,
                                 num_sink_blocks, max_blocks, BLOCK_SIZE)
        return launch


def layer(ext, contexts, batches, layers, repeats, kv_cache_dtypes) -> None:
    import importlib.util

    path = os.path.join(HERE, "..", "..", "..", "..", "benchmarks", "bench_attention.py")
    spec = importlib.util.spec_from_file_location("bench_attention_module", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    triton_launch = topp_kernel._select_kernel
    print(f"\n{torch.cuda.get_device_name()}: one layer's decode step (bench_attention.bench_decode, per layer of "
          f"{layers}-layer graphs, split scratch for max_num_seqs 1024)")
    print(f"{'kv':>5} {'batch':>5} {'context':>8} {'FA3 ms':>8} {'triton ms':>10} {'x':>6} {'sel us':>7} "
          f"{'cuda ms':>8} {'x':>6} {'sel us':>7}")
    for kv in kv_cache_dtypes:
        for batch in batches:
            for k in contexts:
                cells = []
                for launch in (triton_launch, CudaSelectLaunch(ext)):
                    topp_kernel._select_kernel = launch
                    try:
                        row = bench.bench_decode(batch, k * 1024, 0.03, torch.device("cuda"), repeats,
                                                 max_num_seqs=1024, kv_cache_dtype=kv, layers=layers)
                    finally:
                        topp_kernel._select_kernel = triton_launch
                    select_us = sum(x["us"] for x in row["rtpurbo_kernels"]["kernels"]
                                    if "select" in x["name"]) / layers
                    cells.append((row["fa3_ms"], row["rtpurbo_ms"], select_us))
                    torch.cuda.empty_cache()
                fa3 = cells[0][0]
                print(f"{kv:>5} {batch:5d} {k:7d}K {fa3:8.4f} {cells[0][1]:10.4f} {fa3 / cells[0][1]:5.2f}x "
                      f"{cells[0][2]:7.1f} {cells[1][1]:8.4f} {cells[1][0] / cells[1][1]:5.2f}x {cells[1][2]:7.1f}",
                      flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="*", default=[128, 512, 1024])
    parser.add_argument("--batch", type=int, nargs="*", default=[1, 4])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--skip-correctness", action="store_true")
    parser.add_argument("--layer-kv", nargs="*", default=["auto"], metavar="KV",
                        help="KV dtypes of the layer comparison (auto, fp8; none: skip it)")
    args = parser.parse_args()
    ext = build()
    torch.manual_seed(0)
    bad = 0 if args.skip_correctness else correctness(ext)
    bad += speed(ext, args.contexts, args.batch, args.layers, args.repeats)
    if args.layer_kv:
        layer(ext, [k for k in args.contexts if k <= 512], args.batch, args.layers, args.repeats, args.layer_kv)
    print(f"\n{bad} row(s) differ beyond a borderline case")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
