"""Decode attention restricted to each query head's kept tokens."""

from .reference import sparse_decode_ref, sparse_decode_varlen_ref

__all__ = ["sparse_decode_ref", "sparse_decode_varlen_ref"]
