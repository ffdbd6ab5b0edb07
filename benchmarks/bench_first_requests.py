"""First requests on a freshly started server against steady state, RTPURBO and FLASH_ATTN (tiny model):
see :mod:`rtpurbo_vllm.bench.first_requests` and ``--help``.

    python3 -P benchmarks/bench_first_requests.py --out results/first_requests --dry-run
"""

import sys

from rtpurbo_vllm.bench.first_requests import main

if __name__ == "__main__":
    sys.exit(main())
