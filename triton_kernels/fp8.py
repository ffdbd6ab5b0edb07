"""float8_e4m3fn values in the kernels: storing float32 as fp8, and the dtype attention dots read fp8
K/V in (Triton device functions, no launcher).

:func:`quantize_e4m3` is vLLM's ``reshape_and_cache_flash`` fp8 store: ``x / scale`` (IEEE division)
in float32, saturated to +-448, rounded to nearest even. On the GPU the rounding is Triton's native
fp32 -> fp8e4nv conversion (round to nearest even); under ``TRITON_INTERPRET=1``, whose fp8 downcast
does not round correctly, an exact bit-level encoder (:func:`fp8e4m3_rne_bits`) does the same rounding
(``MANUAL`` True). The plain-PyTorch twin is :func:`..paged_heads.quantize_fp8`.

Attention over fp8 K/V dots in fp16 (:func:`fp16_dot_query`, :func:`fp16_dot_operand`,
:func:`fp16_dot_values`): e4m3 converts to fp16 exactly in one instruction per pair of values on Hopper
(to bf16 it takes three, through float32), and a bf16 query converts to fp16 exactly wherever fp16 is
normal (``|q|`` in ``[2**-14, 65504]``; beyond it saturates, as vLLM's fp8 FA3 path saturates queries
at 448). The softmax weights then multiply V in fp16 too, 10 mantissa bits against bf16's 7.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def fp8e4m3_rne_bits(x):
    """float8_e4m3fn codes (uint8) of float32 ``x`` already within +-448, rounded to nearest even."""
    bits = x.to(tl.int32, bitcast=True)
    sign = ((bits >> 31) & 1) << 7
    mag = bits & 0x7FFFFFFF
    # Normal results (|x| >= 2^-6): round the 23-bit mantissa to 3 bits, carrying into the exponent.
    rounded = mag + 0x7FFFF + ((mag >> 20) & 1)
    normal = (((rounded >> 23) - 120) << 3) | ((rounded >> 20) & 7)
    # Subnormal results: multiples of 2^-9, rounded to nearest even by the 1.5 * 2^23 trick (8 = 2^-6).
    a = mag.to(tl.float32, bitcast=True)
    sub = ((a * 512.0 + 12582912.0) - 12582912.0).to(tl.int32)
    code = tl.where(a < 0.015625, sub, normal) | sign
    return code.to(tl.uint8)


@triton.jit
def quantize_e4m3(x, scale, MANUAL: tl.constexpr):
    """fp8e4nv values of ``x / scale`` saturated to +-448 (float32 in); ``MANUAL``: the bit-level encoder."""
    y = tl.math.div_rn(x, scale)
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    if MANUAL:
        return fp8e4m3_rne_bits(y).to(tl.float8e4nv, bitcast=True)
    else:
        return y.to(tl.float8e4nv, fp_downcast_rounding="rtne")


@triton.jit
def fp16_dot_query(q):
    """``q`` (bf16/fp16) as fp16 for dots with fp8 keys, saturated to fp16's +-65504."""
    return tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)


@triton.jit
def fp16_dot_operand(x):
    """fp8e4nv ``x`` (keys or values) as fp16, exactly."""
    return x.to(tl.float16)


@triton.jit
def fp16_dot_values(v, mask):
    """fp8e4nv values ``v`` ``[TILE, D]`` as fp16 for ``p @ v``, 0 outside ``mask`` (where the load put 0
    already). The select keeps the conversion where the tile is loaded: without it the compiler moves
    the fp8 tile through shared memory and converts it there, reading it back one byte per instruction
    (the dot wants each thread's values along the token axis); with it the fp16 tile is read back with
    transposing ``ldmatrix``, in fewer instructions and registers (sm_90 compile of the decode split
    kernel)."""
    return tl.where(mask, v.to(tl.float16), 0.0)
