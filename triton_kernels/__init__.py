"""Kernels of rtpurbo-vllm, one folder per op, installed as ``rtpurbo_vllm.triton_kernels``.

Each op folder holds ``kernel.py`` (Triton) and ``reference.py`` (plain PyTorch, the ground truth the
kernel is tested against); ``headwise_attention`` is a reference only (the head-wise prefill composes
FA3 calls and the ``sink_merge`` kernel). ``paged_heads.py`` (plain PyTorch) is the one description
every kernel uses of where a layer's heads live in vLLM's paged cache unit tensors. Imports inside this
folder are relative: it is never a top-level package.
"""
