"""Indexer projection of pre-RoPE queries and keys to DI (16) dims per retrieval head.

The kernels un-RoPE vLLM's post-RoPE q/k (table from :func:`rope_table`) and project them in one pass:
:func:`write_index_keys` into the paged index-key units (a :class:`..paged_heads.PagedHeads`), with the
decode tokens' index queries (:class:`IndexQueries`) in the same launch if asked; :func:`index_queries`
into a buffer.
"""

from .kernel import (IndexQueries, first_tiled_launch, index_queries, rope_table, rope_table_length,
                     write_index_keys)
from .reference import index_keys_ref, index_project_ref, index_queries_ref, write_index_keys_ref

__all__ = ["IndexQueries", "first_tiled_launch", "index_keys_ref", "index_project_ref", "index_queries",
           "index_queries_ref", "rope_table", "rope_table_length", "write_index_keys", "write_index_keys_ref"]
