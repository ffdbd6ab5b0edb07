"""RTPURBO under load (200 mixed 4K-128K requests, every block back in the pool) and batched against
one-at-a-time greedy outputs: see :mod:`rtpurbo_vllm.bench.stability` and ``--help``.

    python3 -P benchmarks/bench_stability.py --out results/stability --dry-run
"""

import sys

from rtpurbo_vllm.bench.stability import main

if __name__ == "__main__":
    sys.exit(main())
