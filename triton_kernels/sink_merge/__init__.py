"""Sink merge of head-wise prefill: adds to a windowed attention output the sink keys outside each
query's window, by log-sum-exp with the window's LSE.

The Triton op (``kernel.py``) is imported on first use, so importing the reference alone never defines
Triton kernels (``TRITON_INTERPRET`` is read when a kernel is defined).
"""

from .reference import merge_sinks_ref

__all__ = ["merge_sinks", "merge_sinks_ref"]


def __getattr__(name):
    if name == "merge_sinks":
        from .kernel import merge_sinks
        return merge_sinks
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
