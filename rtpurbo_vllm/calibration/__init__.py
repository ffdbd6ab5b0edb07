"""RTPurbo calibration: turn a dense Llama / Mistral / Qwen2 / Qwen3 checkpoint into an RTPurbo artifact.

Pipeline (each step a library function and an ``rtpurbo-calibrate`` subcommand, see ``docs/CALIBRATION.md``):

- :func:`rtpurbo_vllm.calibration.heads.find_heads` (``heads``): needle-copy head scores, retrieval-head selection.
- :func:`rtpurbo_vllm.calibration.train_indexer.train_indexer` (``train-indexer``): stage-1 indexer training.
- :func:`rtpurbo_vllm.calibration.evaluate.evaluate_artifact` (``evaluate``): attention-mass recall of top-p
  (decode and prefill).
- :func:`rtpurbo_vllm.calibration.export.export_artifact` (``export``): the validated artifact folder.

Supporting modules: ``capture`` (pre-RoPE q/k and real attention rows), ``data`` (token sources),
``probes`` (needle-copy documents), ``outputs`` (atomic files), ``cli`` (the console script).
Nothing is imported here, so ``rtpurbo-calibrate --help`` stays instant.
"""
