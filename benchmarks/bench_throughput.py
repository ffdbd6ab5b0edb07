"""Serving throughput of two fixed long-context workloads (long prompts, long decodes over shared
documents) through ``vllm bench serve``, one or more backends: see :mod:`rtpurbo_vllm.bench.throughput`
and ``--help``.

    python3 -P benchmarks/bench_throughput.py --workload long-decodes --backends FLASH_ATTN,RTPURBO --out results/tp
"""

import sys

from rtpurbo_vllm.bench.throughput import main

if __name__ == "__main__":
    sys.exit(main())
