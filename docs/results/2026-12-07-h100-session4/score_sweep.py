"""Sparse prefill score kernel: its GPU time at 128K under launch settings."""
import sys, torch
sys.path.insert(0, "benchmarks")   # run from the repo root
import bench_attention as ba
from rtpurbo_vllm.triton_kernels.sparse_prefill import kernel as K
base = dict(K.CONFIG)
length = int(sys.argv[1]) * 1024
for text in sys.argv[2:]:
    over = dict(kv.split("=") for kv in text.split(",")) if text != "default" else {}
    K.CONFIG = {**base, **{k: int(v) for k, v in over.items()}}
    r = ba.bench_prefill(length, torch.device("cuda"), 3)
    ks = {k["name"]: k["ms"] for k in r["rtpurbo_sparse_kernels"]["kernels"]}
    print(f"{text:40s} sparse {r['rtpurbo_sparse_ms']:8.2f} ms  score {ks.get('_score_kernel', 0):8.2f} ms  "
          f"fa3 {r['fa3_ms']:8.1f}  kept {r['kept_block_share']:.3f}", flush=True)
