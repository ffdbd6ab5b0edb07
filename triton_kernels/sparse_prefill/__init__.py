"""Sparse top-p prefill of retrieval heads: per query tile, the sink, diagonal and top-p blocks of the
index scores of the tile's rows (per key, the max over the rows), then exact causal attention over them.

The host side (``plan.py``) lays a batch's query tiles out for the kernels and allocates their scratch. The Triton op
(``kernel.py``) is imported on first use, so importing the reference alone never defines
Triton kernels: ``TRITON_INTERPRET`` is read when a kernel is defined, and a test that sets it must be
able to do so after another module imported this folder for its reference.
"""

from .plan import (TILE_Q, SparsePrefillPlan, SparsePrefillWorkspace, Wave, make_sparse_prefill_workspace,
                   plan_sparse_prefill)
from .reference import (Tile, chunk_tiles, paged_sparse_prefill_ref, sparse_prefill_visible_ref,
                        tile_block_mass_ref, tile_forced_blocks, tile_topp_ref)

_KERNEL_NAMES = ("sparse_prefill",)

__all__ = [*_KERNEL_NAMES, "TILE_Q", "SparsePrefillPlan", "SparsePrefillWorkspace", "Tile", "Wave",
           "chunk_tiles", "make_sparse_prefill_workspace", "paged_sparse_prefill_ref", "plan_sparse_prefill",
           "sparse_prefill_visible_ref", "tile_block_mass_ref", "tile_forced_blocks", "tile_topp_ref"]


def __getattr__(name):
    if name in _KERNEL_NAMES:
        from . import kernel
        return getattr(kernel, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
