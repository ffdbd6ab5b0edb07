"""Decode attention restricted to each query head's kept tokens.

The Triton op (``kernel.py``) is imported on first use, so importing the reference alone never defines
Triton kernels: ``TRITON_INTERPRET`` is read when a kernel is defined, and a test that sets it must be
able to do so after another module imported this folder for its reference.
"""

from .reference import decode_keep_ref, paged_sparse_decode_ref, sparse_decode_ref, sparse_decode_varlen_ref

_KERNEL_NAMES = ("DEFAULT_MAX_SPLITS", "DEFAULT_SPLITS_PER_SEQ", "SparseDecodeWorkspace", "allocate_sparse_decode_workspace",
                 "headwise_sparse_decode", "local_splits_for", "sm_count")

__all__ = [*_KERNEL_NAMES, "decode_keep_ref", "paged_sparse_decode_ref", "sparse_decode_ref", "sparse_decode_varlen_ref"]


def __getattr__(name):
    if name in _KERNEL_NAMES:
        from . import kernel
        return getattr(kernel, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
