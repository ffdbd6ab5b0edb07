"""Decode block top-p per launch setting: CUDA-graph replay times of ``block_topp`` for each search width
and register chunk.

The selection's threshold search takes ``search_bits`` bits per step (``block_topp.kernel.CONFIG``;
1 is the binary search of 31 steps), and one selection program holds up to ``select_chunk`` blocks in
registers (a longer row re-reads the workspace once per step). Inputs as ``bench_attention.py``'s decode points
(:mod:`rtpurbo_vllm.bench.attention_layer`: 5 retrieval heads, 16-dim index keys, 64-token pages and
blocks, ``--keep`` of the blocks planted hot, top-p 0.9). Per context and batch, ``block_topp`` (block
stats and selection) is timed at every (width, chunk), and every setting must select exactly what the
binary search at the default chunk selects; the script exits with 1 if one does not.

Run on a GPU from the repo root:
    python3 -P benchmarks/bench_block_topp.py [--contexts 128 512] [--batch 1 4] [--bits 1 2 3 4]
    python3 -P benchmarks/bench_block_topp.py --bits 3 --chunks 4096 8192 16384
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from rtpurbo_vllm.bench.attention_layer import (BS, RETRIEVAL, SINK, TOP_P, decode_index_inputs,
                                                random_block_table)
from rtpurbo_vllm.bench.timing import time_cuda_graph
from rtpurbo_vllm.triton_kernels.block_topp import block_topp, make_block_topp_workspace
from rtpurbo_vllm.triton_kernels.block_topp import kernel as topp_kernel


def bench_point(batch: int, length: int, settings: list[tuple[int, int]], keep: float, device,
                repeats: int) -> list[dict]:
    """One row per ``(search_bits, select_chunk)``: ``block_topp`` milliseconds and whether it selects what
    the first setting does."""
    block_table, num_pages = random_block_table(length, batch, device)
    inputs = decode_index_inputs(batch, length, keep, block_table, num_pages, device)
    max_blocks = math.ceil(length / BS)
    workspace = make_block_topp_workspace(batch, len(RETRIEVAL), max_blocks, device)
    selected = torch.empty(batch, len(RETRIEVAL), max_blocks, dtype=torch.int32, device=device)
    num_selected = torch.empty(batch, len(RETRIEVAL), dtype=torch.int32, device=device)

    def run():
        block_topp(inputs.q_idx, inputs.index, inputs.index_table, inputs.seq_lens, TOP_P, SINK, BS, max_blocks,
                   workspace, selected, num_selected)

    saved, rows, binary = dict(topp_kernel.CONFIG), [], None
    try:
        for bits, chunk in settings:
            topp_kernel.CONFIG.update(search_bits=bits, select_chunk=chunk)   # read at launch: before the capture
            selected.fill_(-7)
            num_selected.fill_(-7)
            run()
            result = (selected.clone(), num_selected.clone())
            if binary is None:
                binary = result
            same = torch.equal(result[0], binary[0]) and torch.equal(result[1], binary[1])
            rows.append({"batch": batch, "context": length, "blocks": max_blocks, "search_bits": bits,
                         "select_chunk": chunk, "ms": time_cuda_graph(run, repeats), "same_as_binary": same,
                         "kept_block_share": num_selected.float().mean().item() / max_blocks})
    finally:
        topp_kernel.CONFIG.clear()
        topp_kernel.CONFIG.update(saved)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", metavar="K", type=int, nargs="*", default=[128, 512],
                        help="context lengths in K tokens (default 128 512)")
    parser.add_argument("--batch", metavar="B", type=int, nargs="*", default=[1, 4], help="batch sizes (default 1 4)")
    parser.add_argument("--bits", metavar="N", type=int, nargs="*", default=[1, 2, 3, 4],
                        help="search bits per step to time (default 1 2 3 4; 1 always runs, as the reference)")
    parser.add_argument("--chunks", metavar="N", type=int, nargs="*", default=[topp_kernel.CONFIG["select_chunk"]],
                        help="select_chunk values to time, powers of two (default: the kernel's, %(default)s)")
    parser.add_argument("--keep", metavar="SHARE", type=float, default=0.03,
                        help="share of blocks planted as the indexer's hot blocks (default 0.03)")
    parser.add_argument("--repeats", metavar="N", type=int, default=50, help="timed replays (median)")
    args = parser.parse_args(argv)
    if any(c < 1 or c & (c - 1) for c in args.chunks) or any(not 1 <= b <= 8 for b in args.bits):
        print("--chunks must be powers of two and --bits in 1..8", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench_block_topp.py needs a CUDA GPU (none found); nothing was measured", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    default_chunk = topp_kernel.CONFIG["select_chunk"]
    settings = [(1, default_chunk)] + [(b, c) for b in args.bits for c in args.chunks if (b, c) != (1, default_chunk)]
    rows = []
    for batch in args.batch:
        for k in args.contexts:
            rows += bench_point(batch, k * 1024, settings, args.keep, torch.device("cuda"), args.repeats)
            torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()}: block_topp (stats + selection), CUDA-graph replay, median of "
          f"{args.repeats}; HR={len(RETRIEVAL)}, BS={BS}, top_p={TOP_P}, default search_bits="
          f"{topp_kernel.CONFIG['search_bits']}, default select_chunk={default_chunk}")
    print(f"{'batch':>5} {'context':>8} {'blocks':>7} {'bits':>4} {'chunk':>6} {'ms':>9} {'vs 1 bit':>9} {'kept':>6} "
          f"{'same':>5}")
    base = {}
    for r in rows:
        base.setdefault((r["batch"], r["context"]), r["ms"])
        print(f"{r['batch']:5d} {r['context'] // 1024:7d}K {r['blocks']:7d} {r['search_bits']:4d} "
              f"{r['select_chunk']:6d} {r['ms']:9.4f} "
              f"{r['ms'] / base[(r['batch'], r['context'])]:8.3f}x {r['kept_block_share']:6.3f} "
              f"{'yes' if r['same_as_binary'] else 'NO':>5}")
    differ = [r for r in rows if not r["same_as_binary"]]
    if differ:
        print(f"\n{len(differ)} setting(s) selected other blocks than the binary search", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
