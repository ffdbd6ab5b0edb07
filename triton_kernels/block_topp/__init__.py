"""Indexer scores and block top-p selection for retrieval heads at decode.

The Triton op (``kernel.py``) is imported on first use, so importing the reference alone never defines
Triton kernels: ``TRITON_INTERPRET`` is read when a kernel is defined, and a test that sets it must be
able to do so after another module imported this folder for its reference.
"""

from .reference import (block_topp_ref, expand_block_mask, index_scores_ref, paged_block_topp_ref,
                        paged_index_keys_ref, token_topp_ref)

_KERNEL_NAMES = ("BlockTopPWorkspace", "block_topp", "make_block_topp_workspace")

__all__ = [*_KERNEL_NAMES, "block_topp_ref", "expand_block_mask", "index_scores_ref", "paged_block_topp_ref",
           "paged_index_keys_ref", "token_topp_ref"]


def __getattr__(name):
    if name in _KERNEL_NAMES:
        from . import kernel
        return getattr(kernel, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
