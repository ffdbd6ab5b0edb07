"""Indexer scores and block top-p selection for retrieval heads at decode."""

from .reference import block_topp_ref, expand_block_mask, index_scores_ref, token_topp_ref

__all__ = ["block_topp_ref", "expand_block_mask", "index_scores_ref", "token_topp_ref"]
