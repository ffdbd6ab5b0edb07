"""The 16-dim indexer projection in plain PyTorch: the ground truth for the index-key kernels.

Computed in float32; inputs are never modified; outputs live on the inputs' device.
"""

from __future__ import annotations

import torch


def index_project_ref(x_pre: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Projects pre-RoPE queries or keys with each retrieval head's own matrix.

    For keys, the caller first gathers, per retrieval head, the KV head that head reads.

    Args:
        x_pre: ``[T, HR, D]`` any float dtype, pre-RoPE q (or k) of each retrieval head.
        w: ``[HR, DI, D]`` any float dtype, ``W^Q_h`` (or ``W^K_h``) per retrieval head.

    Returns:
        ``[T, HR, DI]`` float32: ``w[h] @ x_pre[t, h]``.
    """
    return torch.einsum("thd,hid->thi", x_pre.float(), w.float())
