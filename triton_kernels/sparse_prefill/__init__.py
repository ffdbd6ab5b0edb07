"""Sparse top-p prefill of retrieval heads: per query tile, the sink, diagonal and top-p blocks of the
tile's pooled index query, then exact causal attention over them.

The Triton op (``kernel.py``) is imported on first use, so importing the reference alone never defines
Triton kernels: ``TRITON_INTERPRET`` is read when a kernel is defined, and a test that sets it must be
able to do so after another module imported this folder for its reference.
"""

from .reference import (TILE_Q, Tile, chunk_tiles, paged_sparse_prefill_ref, pool_index_queries,
                        tile_block_mass_ref, tile_forced_blocks, tile_topp_ref)

_KERNEL_NAMES = ("SparsePrefillWorkspace", "make_sparse_prefill_workspace", "sparse_prefill")

__all__ = [*_KERNEL_NAMES, "TILE_Q", "Tile", "chunk_tiles", "paged_sparse_prefill_ref", "pool_index_queries",
           "tile_block_mass_ref", "tile_forced_blocks", "tile_topp_ref"]


def __getattr__(name):
    if name in _KERNEL_NAMES:
        from . import kernel
        return getattr(kernel, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
