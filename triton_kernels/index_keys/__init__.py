"""Indexer projection of pre-RoPE queries and keys to DI (16) dims per retrieval head."""

from .reference import index_project_ref

__all__ = ["index_project_ref"]
