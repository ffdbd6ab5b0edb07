"""One tile of an online (flash) softmax over keys, shared by the decode and prefill attention kernels
(Triton device functions, no launcher).

The running state of ``ROWS`` query rows is ``acc [ROWS, D_PAD]`` (un-normalised output), ``l [ROWS]``
(the sum of exponentials) and ``m [ROWS]`` (the running max, base 2: scores come pre-multiplied by
``softmax_scale * log2(e)``). A tile of keys whose scores are all ``-inf`` for a row leaves that row as
it was, also before any key was seen.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tile_scores(q, k, UPCAST_DOT: tl.constexpr):
    """``q [ROWS, D_PAD] @ k [TILE, D_PAD]^T`` in float32 (``UPCAST_DOT``: the interpreter's dot misreads
    bf16, stored as uint16, so round as the GPU does and dot in float32)."""
    if UPCAST_DOT:
        return tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
    return tl.dot(q, tl.trans(k))


@triton.jit
def online_softmax_step(acc, l_i, m_i, s, v, UPCAST_DOT: tl.constexpr):
    """Folds one tile into the state: ``s [ROWS, TILE]`` base-2 scores (``-inf`` where masked), ``v
    [TILE, D_PAD]`` values in the query dtype. Returns the new ``acc``, ``l`` and ``m``."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)     # a row that has seen no key yet stays empty
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if UPCAST_DOT:
        pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32))
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return acc * alpha[:, None] + pv, l_i, m_new
