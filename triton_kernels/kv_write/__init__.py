"""Writes a step's new K/V into the paged K|V unit tensors of a layer (:class:`..paged_heads.PagedHeads`).

The Triton op (``kernel.py``) is imported on first use, so importing the reference alone never defines
Triton kernels: ``TRITON_INTERPRET`` is read when a kernel is defined, and a test that sets it must be
able to do so after another module imported this folder for its reference.
"""

from .reference import kv_write_ref

_KERNEL_NAMES = ("kv_write",)

__all__ = [*_KERNEL_NAMES, "kv_write_ref"]


def __getattr__(name):
    if name in _KERNEL_NAMES:
        from . import kernel
        return getattr(kernel, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
