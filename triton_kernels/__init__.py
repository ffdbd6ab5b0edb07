"""Kernels of rtpurbo-vllm, one folder per op, installed as ``rtpurbo_vllm.triton_kernels``.

Each op folder holds ``reference.py`` (plain PyTorch, the ground truth the kernel is tested against)
and, once written, ``kernel.py`` (Triton). Imports inside this folder are relative: it is never a
top-level package.
"""
