"""FLASH_ATTN against RTPURBO under ``vllm serve``, ``vllm bench serve`` and ``vllm bench latency``
(dummy weights, synthetic artifact): see :mod:`rtpurbo_vllm.bench.serving` and ``--help``.

    python3 -P benchmarks/bench_serving.py --out results/serving --dry-run
"""

import sys

from rtpurbo_vllm.bench.serving import main

if __name__ == "__main__":
    sys.exit(main())
