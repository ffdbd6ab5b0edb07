"""CPU check of ``topp_select.cu``'s algorithm: its flow (threads x VPT consecutive blocks, the binary
search over bit patterns with the bracket shrunk to the candidate values, ties ranked in block order)
emulated in NumPy float32 against the reference's greedy selection (``_topp_select``, float64 masses) on
random, flat, tied and peaked rows with sinks and garbage past each row's end. It checks the logic, not
the CUDA (synchronisation, shuffles, scans): that is the GPU run of ``select_sweep.py``.

Run from the repository root: ``.venv/bin/python docs/results/2026-12-08-cpu-session2/select_cuda/emulate.py``
"""
import math

import numpy as np
import torch

from rtpurbo_vllm.triton_kernels.block_topp.reference import _topp_select

INF_BITS = 0x7F800000
def f2i(x): return np.float32(x).view(np.int32).item()
def i2f(i): return np.int32(i).view(np.float32).item()
U = lambda x: x & 0xFFFFFFFF

def emulate(bmax, bsum, num_blocks, max_blocks, nsink, top_p, THREADS, VPT):
    # bmax, bsum: float32 arrays of length max_blocks
    f32 = np.float32
    m = np.full((THREADS, VPT), -np.inf, f32); l = np.zeros((THREADS, VPT), f32)
    j = np.arange(THREADS * VPT).reshape(THREADS, VPT)
    r = j < max_blocks
    m[r] = bmax[j[r]]; l[r] = bsum[j[r]]
    valid = j < num_blocks
    # per-thread (M, Z) then combine in thread order (warp tree differs, fine for emulation)
    M = max([f32(x) for x in m[valid]], default=-np.inf)
    Z = f32(0)
    for x, y in zip(m[valid], l[valid]): Z = f32(Z + f32(y * np.exp(f32(x - M))))
    gmax = f32(M) if num_blocks > 0 else f32(0)
    inv = f32(1) / max(Z, f32(1))
    forced = valid & ((j < nsink) | (j >= num_blocks - 1))
    cand = valid & ~forced
    mass = np.where(valid, (l * np.exp((m - gmax).astype(f32))).astype(f32) * inv, f32(0)).astype(f32)
    bits = np.where(cand, mass.view(np.int32), -2).astype(np.int64)
    F = f32(mass[forced].sum(dtype=f32)); C = f32(mass[cand].sum(dtype=f32))
    small = bits[cand].min() if cand.any() else INF_BITS
    large = bits[cand].max() if cand.any() else -1
    fr = F >= top_p; reach = f32(F + C) >= top_p
    lo = INF_BITS - 1 if fr else (small if reach else -1)
    hi = INF_BITS if fr else (large + 1 if reach else 0)
    above = f32(0)
    steps = 0
    while hi - lo > 1:
        steps += 1
        mid = lo + ((hi - lo) >> 1)
        b = bits.ravel()
        s = f32(np.where(b >= mid, np.maximum(b, 0).astype(np.int32).view(np.float32), f32(0)).sum(dtype=f32))
        g0lo = min(U(x - lo) for x in b); g0hi = min(U(mid - 1 - x) for x in b)
        g1lo = min(U(x - mid) for x in b); g1hi = min(U(hi - 1 - x) for x in b)
        up = f32(F + s) >= top_p
        nlo, nhi = (mid, hi) if up else (lo, mid)
        lg, hg = (g1lo, g1hi) if up else (g0lo, g0hi)
        if not up: above = s
        if lg < U(nhi - nlo):
            lo, hi = nlo + lg, nhi - hg
        else:
            lo, hi = nlo, nhi
    tau_bits = lo; tau = i2f(tau_bits) if tau_bits >= 0 else float("nan")
    keep_all = tau_bits < 0
    mbt = f32(F + above)
    keep = np.zeros(THREADS * VPT, bool)
    ties_before = 0
    for jj in range(THREADS * VPT):
        t, k = divmod(jj, VPT)
        if not valid[t, k]: continue
        tie = cand[t, k] and bits[t, k] == tau_bits
        tie_kept = tie and f32(mbt + f32(ties_before) * f32(tau)) < top_p
        ties_before += tie
        keep[jj] = keep_all or forced[t, k] or (cand[t, k] and bits[t, k] > tau_bits) or tie_kept
    return np.nonzero(keep)[0], steps

rng = np.random.default_rng(0)
bad = 0; total = 0
for trial in range(400):
    max_blocks = int(rng.choice([1, 2, 3, 7, 50, 100, 256, 300]))
    THREADS, VPT = 32, max(1, math.ceil(max_blocks / 32))
    T = int(rng.integers(1, max_blocks * 64 + 1))
    num_blocks = math.ceil(T / 64)
    pat = rng.choice(["random", "ties", "peaked", "flat"])
    if pat == "random": scores = rng.normal(size=T) * 2
    elif pat == "flat": scores = rng.normal(size=T) * 0.01
    elif pat == "ties": scores = np.tile(rng.normal(size=64), num_blocks)[:T]
    else:
        scores = rng.normal(size=T) * 0.3; scores[rng.integers(0, T, 3)] += 10
    scores = scores.astype(np.float32)
    top_p = float(rng.choice([0.5, 0.9, 0.99, 0.3]))
    sink = int(rng.choice([0, 4, 100]))
    pad = np.full(num_blocks * 64, -np.inf, np.float32); pad[:T] = scores
    blk = pad.reshape(num_blocks, 64)
    bmax = blk.max(1).astype(np.float32)
    bsum = np.exp(blk - bmax[:, None]).sum(1).astype(np.float32)
    bm = np.full(max_blocks, 123.0, np.float32); bs = np.full(max_blocks, 7.0, np.float32)
    bm[:num_blocks] = bmax; bs[:num_blocks] = bsum
    got, steps = emulate(bm, bs, num_blocks, max_blocks, math.ceil(sink / 64), top_p, THREADS, VPT)
    # reference on the same block masses (float64)
    mass = torch.tensor(bsum, dtype=torch.float64) * torch.exp(torch.tensor(bmax, dtype=torch.float64) - float(bmax.max()))
    mass = (mass / mass.sum()).float()[None]
    blocks = torch.arange(num_blocks)
    forced = ((blocks < math.ceil(sink / 64)) | (blocks == num_blocks - 1))[None]
    ref = torch.nonzero(_topp_select(mass, top_p, forced)[0]).flatten().numpy()
    total += 1
    if not np.array_equal(got, ref):
        bad += 1
        print("DIFF", pat, max_blocks, T, top_p, sink, len(got), len(ref))
print("rows", total, "differ", bad)
