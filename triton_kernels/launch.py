"""Programmatic dependent launch (PDL) of the decode step's kernel chain, a launch setting.

At batch 1 a decode step is a chain of small kernels that each wait for the one before them: index
keys with the index queries, block stats, selection, the retrieval heads' splits, the combine. Each
also waits for its own launch. With PDL (compute capability 9.0 and later) a kernel is launched while
the one before it on the stream is still running: its programs start, then wait at
``griddepcontrol.wait`` until that kernel has finished and its writes are visible, so the launch
overlaps the earlier kernel's tail instead of following it. A CUDA-graph capture records the launch
as a programmatic edge.

Every kernel launched this way calls :func:`wait_for_previous_kernel` as its first statement, before it
reads or writes memory: the ordering of memory accesses is exactly that of a plain launch. The
``griddepcontrol.launch_dependents`` that follows lets the next kernel in the chain be scheduled once
every program of this one has started.

``CONFIG["pdl"]`` (0 or 1, read at each launch) turns it on; :func:`pdl_launch` is False off CUDA,
under the Triton interpreter and below compute capability 9.0.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

# pdl: 1 launches the decode chain's kernels with programmatic dependent launch (see the module docstring).
CONFIG = {"pdl": 0}


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``): launchers then take the
    interpreter's branches (a bit-level fp8 encoder, float32 dots for bf16) and never PDL."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pdl_launch(device: torch.device) -> bool:
    """Whether kernels launched on ``device`` now use PDL (``CONFIG["pdl"]`` and a device that has it)."""
    return (bool(CONFIG["pdl"]) and device.type == "cuda" and not interpreting()
            and torch.cuda.get_device_capability(device)[0] >= 9)


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    """A PDL-launched kernel's first statement: waits until the kernel before it on the stream has finished
    (its writes visible), then lets the next one be scheduled. Nothing when ``PDL`` is False."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
