"""The benchmarks behind ``benchmarks/*.py`` and the pieces they share.

- :mod:`.server`: ``vllm serve`` and ``vllm`` commands started, waited on and stopped; requests through
  the evaluation's OpenAI-API client; ``/metrics`` (also used by the GPU end-to-end tests).
- :mod:`.vllm_results`: what is read from vLLM's logs and ``vllm bench`` result files.
- :mod:`.environment`: the card, versions and commit recorded with every result.
- :mod:`.timing`: CUDA-graph and eager timing of one attention layer.
- :mod:`.attention_layer`: the layer shape and decode inputs of the kernel benchmarks
  (``bench_attention.py``, ``bench_block_topp.py``).
- :mod:`.serving` (its report: :mod:`.serving_report`), :mod:`.stability`, :mod:`.throughput`: the
  end-to-end benchmarks.
- :mod:`.summary`: ``docs/results/summary.json``, the latest value of every headline figure.

Nothing here imports vLLM, torch or CUDA at import time; the benchmarks' heavy imports are local.
"""
