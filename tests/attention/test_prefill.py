"""Head-wise prefill on the paged cache against rtpurbo_prefill_ref.

On the CPU: the plan, the torch fallback, and the FA3 path with FlashAttention-3 replaced by a torch
emulation of ``flash_attn_varlen_func`` (its argument checks and mask semantics, taken from
``vllm/vllm_flash_attn/flash_attn_interface.py`` and FA3's ``mha_fwd``). Marked ``gpu``: the FA3 path
with the real FlashAttention-3 (Hopper), bf16, up to 16K tokens.
"""

import importlib.util
import inspect
import math
import os
import sys
import types

import pytest
import torch

from rtpurbo_vllm.attention import prefill
from rtpurbo_vllm.attention.prefill import HeadRun, PrefillHeads, head_runs, headwise_prefill, headwise_prefill_torch
from rtpurbo_vllm.kv_cache.layer_kv import KVPart
from rtpurbo_vllm.reference import rtpurbo_prefill_ref
from rtpurbo_vllm.triton_kernels.headwise_attention import headwise_attention_ref, masked_attention

# (history per sequence, new queries per sequence, HQ, HKV, D, retrieval heads, page size, layout)
CPU_CASES = [
    ([0], [37], 4, 4, 16, [1], 16, "NHD"),
    ([0, 0, 0], [65, 111, 2], 8, 2, 16, [0, 2, 5], 16, "HND"),
    ([300, 0, 17], [45, 200, 63], 5, 1, 32, [1, 3], 16, "NHD"),
    ([452, 0], [63, 130], 4, 4, 64, [0, 1, 2, 3], 32, "HND"),
    ([129, 0], [100, 33], 8, 2, 16, [], 16, "NHD"),
]
WINDOWS = [1, 7, 64, 10_000]
SINKS = [0, 4, 20]


def _ids(case):
    hist, new, hq, hkv, d, heads, page_size, layout = case
    return "hist{}-new{}-HQ{}-HKV{}-D{}-ret{}-P{}-{}".format(
        "_".join(map(str, hist)), "_".join(map(str, new)), hq, hkv, d, "_".join(map(str, heads)) or "none",
        page_size, layout)


# ----------------------------------------------------------------------------------------------------
# Inputs.


def _cache_views(physical, layout, head_size):
    """vLLM 0.26's key/value cache views ``[num_pages, P, HKV, D]`` of a packed K|V cache.

    ``physical`` is the allocation: ``[N, P, HKV, 2D]`` for NHD or ``[N, HKV, P, 2D]`` for HND; the
    logical cache ``[N, HKV, P, 2D]`` is split the way ``FlashAttentionImpl.forward`` does it.
    """
    kv_cache = physical.permute(0, 2, 1, 3) if layout == "NHD" else physical
    return kv_cache.transpose(1, 2).split(head_size, dim=-1)


def _paged_batch(hist, new, hq, hkv, d, page_size, layout, dtype, device):
    """Random q/k/v of B sequences, with the keys written into shuffled pages of a noisy cache.

    Returns q ``[T, HQ, D]``, k and v ``[T_k, HKV, D]`` (each sequence's keys, contiguous), cu_q and
    cu_k ``[B+1]`` int32, seqused_k ``[B]`` int32, block_table ``[B, max_pages]`` int32 (rows padded
    with foreign pages), key_cache and value_cache; everything on ``device`` but cu_k (CPU).
    """
    seqlens_k = [h + n for h, n in zip(hist, new)]
    q = torch.randn(sum(new), hq, d).to(dtype)
    k = torch.randn(sum(seqlens_k), hkv, d).to(dtype)
    v = torch.randn(sum(seqlens_k), hkv, d).to(dtype)
    pages_per_seq = [math.ceil(n / page_size) for n in seqlens_k]
    num_pages = sum(pages_per_seq) + 3
    shape = (num_pages, page_size, hkv, 2 * d) if layout == "NHD" else (num_pages, hkv, page_size, 2 * d)
    physical = torch.randn(shape).to(dtype)
    key_cache, value_cache = _cache_views(physical, layout, d)
    block_table = torch.randint(0, num_pages, (len(seqlens_k), max(pages_per_seq) + 1), dtype=torch.int32)
    perm = torch.randperm(num_pages).tolist()
    start = 0
    for b, n in enumerate(seqlens_k):
        block_table[b, :pages_per_seq[b]] = torch.tensor(perm[:pages_per_seq[b]], dtype=torch.int32)
        perm = perm[pages_per_seq[b]:]
        t = torch.arange(n)
        key_cache[block_table[b, t // page_size].long(), t % page_size] = k[start:start + n]
        value_cache[block_table[b, t // page_size].long(), t % page_size] = v[start:start + n]
        start += n
    physical = physical.to(device)
    key_cache, value_cache = _cache_views(physical, layout, d)
    cu_q = torch.tensor([0] + new).cumsum(0).int()
    cu_k = torch.tensor([0] + seqlens_k).cumsum(0).int()
    seqused_k = torch.tensor(seqlens_k, dtype=torch.int32)
    return (q.to(device), k.to(device), v.to(device), cu_q.to(device), cu_k, seqused_k.to(device),
            block_table.to(device), key_cache, value_cache)


def _reference_blockwise(q, k, v, cu_q, cu_k, retrieval_heads, sink_tokens, window, dense_threshold, scale,
                         block=512):
    """float32 ``[T, HQ, D]``: rtpurbo_prefill_ref, one block of ``block`` queries at a time (bounded memory).

    A block of a sequence's queries is itself a chunk at the end of the keys up to its last query.
    """
    num_heads = q.shape[1]
    headwise = torch.zeros(num_heads, dtype=torch.bool)
    headwise[list(retrieval_heads)] = True
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        seqlen_q, seqlen_k = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        retrieval = torch.ones(num_heads, dtype=torch.bool) if seqlen_k < dense_threshold else headwise
        for a in range(0, seqlen_q, block):
            e = min(a + block, seqlen_q)
            num_keys = seqlen_k - seqlen_q + e
            rows, keys = slice(cq[b] + a, cq[b] + e), slice(ck[b], ck[b] + num_keys)
            out[rows], _ = headwise_attention_ref(q[rows], k[keys], v[keys], torch.tensor([0, e - a]),
                                                  torch.tensor([0, num_keys]), retrieval, sink_tokens, window,
                                                  scale)
    return out


# ----------------------------------------------------------------------------------------------------
# A torch stand-in for vllm.vllm_flash_attn.flash_attn_varlen_func (FA3, paged KV).


def _fake_flash_attn_varlen_func(q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, cu_seqlens_k=None,
                                 seqused_k=None, softmax_scale=None, causal=False, window_size=None,
                                 block_table=None, return_softmax_lse=False, out=None, fa_version=2):
    """FA3's checks and mask semantics in float32. Rows that see no key get NaN out and LSE (the
    real kernel writes 0 and -inf) so that a caller relying on them fails here."""
    assert fa_version == 3
    assert q.dtype in (torch.float16, torch.bfloat16) and k.dtype == v.dtype == q.dtype
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1, "FA3 needs a contiguous last dimension"
    assert cu_seqlens_k is None and block_table is not None and seqused_k is not None
    assert block_table.dtype == torch.int32 and block_table.stride(-1) == 1
    assert cu_seqlens_q.dtype == seqused_k.dtype == torch.int32
    assert cu_seqlens_q.is_contiguous() and seqused_k.is_contiguous()
    num_seqs = cu_seqlens_q.shape[0] - 1
    total_q, num_heads, head_size = q.shape
    num_pages, page_size, num_kv_heads = k.shape[:3]
    assert k.shape == v.shape == (num_pages, page_size, num_kv_heads, head_size)
    assert seqused_k.shape == (num_seqs,) and block_table.shape[0] == num_seqs
    assert num_heads % num_kv_heads == 0
    cu_q, used = cu_seqlens_q.tolist(), seqused_k.tolist()
    assert cu_q[-1] == total_q and cu_q[0] == 0
    assert max(b - a for a, b in zip(cu_q[:-1], cu_q[1:])) <= max_seqlen_q and max(used) <= max_seqlen_k
    assert all(n <= block_table.shape[1] * page_size for n in used)
    if out is not None:
        assert out.dtype == q.dtype and out.shape == q.shape and out.stride(-1) == 1
    left, right = (-1, -1) if window_size is None else tuple(window_size)
    if left >= max_seqlen_k - 1:
        left = -1
    if right >= max_seqlen_q - 1:
        right = -1
    if causal:
        right = 0

    result = torch.full(q.shape, float("nan"), dtype=torch.float32)
    lse = torch.full((num_heads, total_q), float("nan"), dtype=torch.float32)
    for b, (q0, q1, seqlen_k) in enumerate(zip(cu_q[:-1], cu_q[1:], used)):
        t = torch.arange(seqlen_k)
        pages, slots = block_table[b, t // page_size].long(), t % page_size
        i = torch.arange(q1 - q0)[:, None] + seqlen_k - (q1 - q0)       # bottom-right aligned
        j = torch.arange(seqlen_k)[None, :]
        visible = torch.ones(q1 - q0, seqlen_k, dtype=torch.bool)
        if left >= 0:
            visible &= j >= i - left
        if right >= 0:
            visible &= j <= i + right
        o, row_lse = masked_attention(q[q0:q1], k[pages, slots], v[pages, slots], visible, softmax_scale)
        empty = ~visible.any(dim=1)                                       # [Tq]
        result[q0:q1] = o.masked_fill(empty[:, None, None], float("nan"))
        lse[:, q0:q1] = row_lse.masked_fill(empty[:, None], float("nan")).t()
    if out is None:
        out = torch.empty_like(q)
    out.copy_(result)
    return (out, lse) if return_softmax_lse else out


@pytest.fixture
def fake_fa3(monkeypatch):
    """Installs the stand-in as ``vllm.vllm_flash_attn``; yields the list of each call's arguments."""
    calls = []

    def flash_attn_varlen_func(**kwargs):
        calls.append(kwargs)
        return _fake_flash_attn_varlen_func(**kwargs)

    module = types.ModuleType("vllm.vllm_flash_attn")
    module.flash_attn_varlen_func = flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "vllm.vllm_flash_attn", module)
    yield calls


def _run(fn, batch, heads, sink_tokens, window, dense_threshold, device="cpu"):
    """(out from ``fn``, reference float32) for one batch from :func:`_paged_batch`."""
    q, k, v, cu_q, cu_k, seqused_k, block_table, key_cache, value_cache = batch
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    plan = PrefillHeads.build(heads, hq, hkv, device=device)
    out = torch.full_like(q, float("nan"))
    max_q, max_k = int(cu_q.diff().max()), int(seqused_k.max())
    fn(q, [KVPart(key_cache, value_cache, block_table, tuple(range(hkv)))], cu_q, seqused_k, max_q, max_k, plan,
       sink_tokens, window, d ** -0.5, out, dense_threshold=dense_threshold)
    return out


def _part(kv_heads, key_cache, value_cache, block_table, is_window, device="cpu"):
    """A :class:`KVPart` of ``kv_heads`` (a subset of the layer's, in the views' head order)."""
    return KVPart(key_cache, value_cache, block_table, tuple(kv_heads),
                  torch.tensor(kv_heads, dtype=torch.long, device=device), is_window)


# ----------------------------------------------------------------------------------------------------
# CPU: the plan.


def test_plan_groups_and_local_heads():
    plan = PrefillHeads.build([5, 0, 2], num_heads=8, num_kv_heads=2)
    assert (plan.num_heads, plan.num_kv_heads) == (8, 2)
    assert plan.retrieval_heads == (0, 2, 5) and plan.local_heads == (1, 3, 4, 6, 7)
    assert plan.retrieval_runs(range(2)) == (HeadRun(0, 1, 0, 1), HeadRun(0, 1, 2, 1), HeadRun(1, 1, 5, 1))
    assert plan.retrieval_mask.tolist() == [True, False, True, False, False, True, False, False]


@pytest.mark.parametrize("heads, runs, local", [([], [], (0, 1, 2, 3, 4)), ([0, 1, 2, 3, 4], [(0, 5)], ()),
                                                ([4], [(4, 1)], (0, 1, 2, 3))])
def test_plan_mqa(heads, runs, local):
    plan = PrefillHeads.build(heads, num_heads=5, num_kv_heads=1)
    assert [(r.first_head, r.num_heads) for r in plan.retrieval_runs([0])] == runs
    assert plan.local_heads == local
    assert plan.retrieval_mask.sum() == len(heads)


@pytest.mark.parametrize("heads, hq, hkv, match", [([1, 1], 4, 4, "duplicate"), ([4], 4, 4, "out of range"),
                                                   ([-1], 4, 4, "out of range"), ([0], 6, 4, "not a multiple")])
def test_plan_rejects_bad_heads(heads, hq, hkv, match):
    with pytest.raises(ValueError, match=match):
        PrefillHeads.build(heads, hq, hkv)


# ----------------------------------------------------------------------------------------------------
# CPU: the torch fallback against rtpurbo_prefill_ref.


@pytest.mark.parametrize("case", [pytest.param(c, id=_ids(c)) for c in CPU_CASES])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("sink_tokens", SINKS)
def test_torch_fallback(seed, case, window, sink_tokens):
    hist, new, hq, hkv, d, heads, page_size, layout = case
    batch = _paged_batch(hist, new, hq, hkv, d, page_size, layout, torch.float32, "cpu")
    q, k, v, cu_q, cu_k = batch[:5]
    out = _run(headwise_prefill_torch, batch, heads, sink_tokens, window, dense_threshold=0)
    expected = rtpurbo_prefill_ref(q, k, v, cu_q, cu_k, heads, sink_tokens, window, 0, d ** -0.5)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dense_threshold", [0, 100, 250, 10_000])
def test_torch_fallback_dense_threshold(seed, dense_threshold):
    hist, new, hq, hkv, d, heads = [300, 0, 17], [45, 200, 63], 8, 2, 16, [0, 5]
    batch = _paged_batch(hist, new, hq, hkv, d, 16, "NHD", torch.float32, "cpu")
    q, k, v, cu_q, cu_k = batch[:5]
    out = _run(headwise_prefill_torch, batch, heads, 4, 7, dense_threshold)
    expected = rtpurbo_prefill_ref(q, k, v, cu_q, cu_k, heads, 4, 7, dense_threshold, d ** -0.5)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_bad_arguments():
    batch = _paged_batch([0], [10], 4, 2, 16, 16, "NHD", torch.float32, "cpu")
    q, _, _, cu_q, _, seqused_k, block_table, key_cache, value_cache = batch
    plan = PrefillHeads.build([1], 4, 2)
    parts = [KVPart(key_cache, value_cache, block_table, (0, 1))]
    args = (cu_q, seqused_k, 10, 10)
    with pytest.raises(ValueError, match="out is"):
        headwise_prefill_torch(q, parts, *args, plan, 4, 8, 0.25, torch.empty_like(q).half())
    with pytest.raises(ValueError, match="window >= 1"):
        headwise_prefill_torch(q, parts, *args, plan, 4, 0, 0.25, torch.empty_like(q))
    with pytest.raises(ValueError, match="query has shape"):
        headwise_prefill_torch(q, parts, *args, PrefillHeads.build([1], 8, 2), 4, 8, 0.25, torch.empty_like(q))
    with pytest.raises(ValueError, match="must both be"):
        headwise_prefill_torch(q, [KVPart(key_cache[:, :, :1], value_cache, block_table, (0, 1))], *args, plan,
                               4, 8, 0.25, torch.empty_like(q))
    with pytest.raises(ValueError, match="exactly once"):
        headwise_prefill_torch(q, [KVPart(key_cache[:, :, :1], value_cache[:, :, :1], block_table, (0,))], *args,
                               plan, 4, 8, 0.25, torch.empty_like(q))


def test_blockwise_reference_matches_reference(seed):
    """The GPU tests' memory-bounded reference is rtpurbo_prefill_ref."""
    batch = _paged_batch([300, 0, 17], [45, 200, 63], 8, 2, 16, 16, "NHD", torch.float32, "cpu")
    q, k, v, cu_q, cu_k = batch[:5]
    for window, sink, threshold in [(7, 4, 250), (64, 0, 0), (1, 20, 0)]:
        expected = rtpurbo_prefill_ref(q, k, v, cu_q, cu_k, [0, 5], sink, window, threshold, 0.25)
        got = _reference_blockwise(q, k, v, cu_q, cu_k, [0, 5], sink, window, threshold, 0.25, block=13)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------
# CPU: the FA3 path, FA3 emulated.


def test_fake_matches_real_signature():
    """Every parameter of the stand-in exists in vLLM's flash_attn_varlen_func with the same default."""
    vllm_dir = os.path.dirname(importlib.util.find_spec("vllm").origin)
    spec = importlib.util.spec_from_file_location(
        "fa_interface_probe", os.path.join(vllm_dir, "vllm_flash_attn", "flash_attn_interface.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)    # its relative imports of the CUDA extensions fail and are caught
    real = inspect.signature(module.flash_attn_varlen_func).parameters
    for name, param in inspect.signature(_fake_flash_attn_varlen_func).parameters.items():
        assert name in real and param.default == real[name].default, name


@pytest.mark.parametrize("window", [1, 5, 100])
def test_fake_fa3_window_matches_reference(seed, window):
    """The stand-in's window_size=(window - 1, 0) is the reference's local mask without sinks."""
    batch = _paged_batch([30, 0], [20, 77], 4, 2, 16, 16, "NHD", torch.float16, "cpu")
    q, k, v, cu_q, cu_k, seqused_k, block_table, key_cache, value_cache = batch
    out, lse = _fake_flash_attn_varlen_func(q, key_cache, value_cache, 77, cu_q, 77, seqused_k=seqused_k,
                                            softmax_scale=0.25, causal=True, window_size=(window - 1, 0),
                                            block_table=block_table, return_softmax_lse=True, fa_version=3)
    expected, expected_lse = headwise_attention_ref(q, k, v, cu_q, cu_k, torch.zeros(4, dtype=torch.bool), 0,
                                                    window, 0.25)
    torch.testing.assert_close(out.float(), expected, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse, expected_lse.t(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", [pytest.param(c, id=_ids(c)) for c in CPU_CASES])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("sink_tokens", SINKS)
def test_fa3_path_emulated(seed, fake_fa3, case, window, sink_tokens):
    hist, new, hq, hkv, d, heads, page_size, layout = case
    batch = _paged_batch(hist, new, hq, hkv, d, page_size, layout, torch.float16, "cpu")
    q, k, v, cu_q, cu_k, _, _, key_cache, _ = batch
    out = _run(headwise_prefill, batch, heads, sink_tokens, window, dense_threshold=0)
    expected = rtpurbo_prefill_ref(q, k, v, cu_q, cu_k, heads, sink_tokens, window, 0, d ** -0.5)
    torch.testing.assert_close(out.float(), expected, atol=2e-3, rtol=2e-3)

    plan = PrefillHeads.build(heads, hq, hkv)
    if window >= max(h + n for h, n in zip(hist, new)):
        assert len(fake_fa3) == 1 and "window_size" not in fake_fa3[0]          # dense on every head
        return
    runs = plan.local_runs(range(hkv), exact=False) + plan.retrieval_runs(range(hkv))   # a short step
    assert len(fake_fa3) == len(runs)
    for i, (call, run) in enumerate(zip(fake_fa3, runs)):
        assert ("window_size" in call) == (i < len(runs) - len(plan.retrieval_runs(range(hkv))))
        assert call["q"].shape[1] == run.num_heads and call["k"].shape[2] == run.num_slots
        # views of the query, the output and the cache, not copies
        assert call["q"].data_ptr() == q[:, run.first_head].data_ptr()
        assert call["out"].untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
        assert call["k"].data_ptr() == key_cache[:, :, run.first_slot].data_ptr()


def test_head_runs():
    """Contiguous wanted heads of each KV head; whole groups of consecutive KV heads in consecutive slots merge."""
    every = frozenset(range(32))
    assert head_runs(tuple(range(8)), 4, every) == (HeadRun(0, 8, 0, 32),)
    assert head_runs((1, 2, 5, 6), 4, every) == (HeadRun(0, 2, 4, 8), HeadRun(2, 2, 20, 8))
    assert head_runs((2, 0), 4, every) == (HeadRun(0, 1, 8, 4), HeadRun(1, 1, 0, 4))      # out of head order
    # The layer benchmark's retrieval heads (3, 9, 14, 22, 27) over 8 KV heads of 4 query heads.
    plan = PrefillHeads.build([3, 9, 14, 22, 27], 32, 8)
    runs = plan.local_runs(range(8), exact=True)
    assert [(r.first_slot, r.num_slots, r.first_head, r.num_heads) for r in runs] == [
        (0, 1, 0, 3), (1, 1, 4, 4), (2, 1, 8, 1), (2, 1, 10, 2), (3, 1, 12, 2), (3, 1, 15, 1), (4, 1, 16, 4),
        (5, 1, 20, 2), (5, 1, 23, 1), (6, 1, 24, 3), (7, 1, 28, 4)]
    assert sorted(h for r in runs for h in range(r.first_head, r.first_head + r.num_heads)) == list(plan.local_heads)
    assert plan.local_runs(range(8), exact=False) == (HeadRun(0, 8, 0, 32),)
    # A group of retrieval heads only needs no local call; the groups around it do not merge across it.
    plan = PrefillHeads.build([4, 5, 6, 7], 16, 4)
    assert plan.local_runs(range(4), exact=False) == (HeadRun(0, 1, 0, 4), HeadRun(2, 2, 8, 8))
    assert plan.group_runs([3, 1]) == (HeadRun(0, 1, 12, 4), HeadRun(1, 1, 4, 4))
    assert PrefillHeads.build(list(range(8)), 8, 2).local_runs(range(2), exact=True) == ()


@pytest.mark.parametrize("case", [pytest.param(c, id=_ids(c)) for c in CPU_CASES])
@pytest.mark.parametrize("sink_tokens", [0, 4])
def test_fa3_path_emulated_exact_runs(seed, fake_fa3, monkeypatch, case, sink_tokens):
    """Steps of at least ``EXACT_RUNS_MIN_TOKENS`` rows (here every step) run the windows of local query
    heads only: each FA3 call's heads are local, and the result is the reference's."""
    monkeypatch.setattr(prefill, "EXACT_RUNS_MIN_TOKENS", 1)
    hist, new, hq, hkv, d, heads, page_size, layout = case
    batch = _paged_batch(hist, new, hq, hkv, d, page_size, layout, torch.float16, "cpu")
    q, k, v, cu_q, cu_k = batch[:5]
    out = _run(headwise_prefill, batch, heads, sink_tokens, 7, dense_threshold=0)
    expected = rtpurbo_prefill_ref(q, k, v, cu_q, cu_k, heads, sink_tokens, 7, 0, d ** -0.5)
    torch.testing.assert_close(out.float(), expected, atol=2e-3, rtol=2e-3)
    windowed = [c for c in fake_fa3 if "window_size" in c]
    assert sum(c["q"].shape[1] for c in windowed) == hq - len(heads)
    for call in windowed:
        first = (call["q"].data_ptr() - q.data_ptr()) // (d * q.element_size())
        assert not set(range(first, first + call["q"].shape[1])) & set(heads)


@pytest.mark.parametrize("exact_from", [1, 10**9], ids=["exact", "whole-groups"])
def test_compact_kv_layout_exact_runs(seed, fake_fa3, monkeypatch, exact_from):
    """Both run kinds over the compact layout's parts (full heads out of head order, a window part)."""
    monkeypatch.setattr(prefill, "EXACT_RUNS_MIN_TOKENS", exact_from)
    case = SPLIT_CASES[1]
    hist, new, hq, hkv, d, heads, full, main_page, window_page, sink, window, dense = case
    batch = _paged_batch(hist, new, hq, hkv, d, 16, "NHD", torch.float16, "cpu")
    q, k, v, cu_q, cu_k, seqused_k = batch[:6]
    out = torch.full_like(q, float("nan"))
    headwise_prefill(q, _compact_parts(case, batch, 1000.0), cu_q, seqused_k, int(cu_q.diff().max()),
                     int(seqused_k.max()), PrefillHeads.build(heads, hq, hkv), sink, window, d ** -0.5, out)
    expected = rtpurbo_prefill_ref(q, k, v, cu_q, cu_k, heads, sink, window, 0, d ** -0.5)
    torch.testing.assert_close(out.float(), expected, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("dense_threshold", [100, 250, 10_000])
@pytest.mark.parametrize("heads", [[0, 5], [], list(range(8))])
def test_fa3_path_emulated_dense_threshold(seed, fake_fa3, dense_threshold, heads):
    hist, new, hq, hkv, d = [300, 0, 17], [45, 200, 63], 8, 2, 16
    batch = _paged_batch(hist, new, hq, hkv, d, 16, "HND", torch.float16, "cpu")
    q, k, v, cu_q, cu_k, seqused_k = batch[:6]
    out = _run(headwise_prefill, batch, heads, 4, 7, dense_threshold)
    expected = rtpurbo_prefill_ref(q, k, v, cu_q, cu_k, heads, 4, 7, dense_threshold, d ** -0.5)
    torch.testing.assert_close(out.float(), expected, atol=2e-3, rtol=2e-3)
    if dense_threshold > 345:
        assert len(fake_fa3) == 1                                                # every sequence dense
        return
    # Each call reads only its own sequences' keys: the dense call the dense ones, the others the rest.
    dense = seqused_k < dense_threshold
    for call in fake_fa3[:-1]:
        assert call["seqused_k"].tolist() == seqused_k.masked_fill(dense, 0).tolist()
    assert fake_fa3[-1]["seqused_k"].tolist() == seqused_k.masked_fill(~dense, 0).tolist()
    assert fake_fa3[-1]["q"].shape[1] == hq and "window_size" not in fake_fa3[-1]


@pytest.mark.parametrize("hist", [0, 9])
@pytest.mark.parametrize("sink_tokens", SINKS)
@pytest.mark.parametrize("fn", ["fa3", "torch"])
def test_lengths_around_window(seed, fake_fa3, hist, sink_tokens, fn):
    """Sequences just shorter and longer than the window, where only some sinks fall outside it."""
    window, lengths = 16, [15, 16, 17, 18, 19, 20, 21, 23, 37]
    fn, dtype, tol = {"fa3": (headwise_prefill, torch.float16, 2e-3),
                      "torch": (headwise_prefill_torch, torch.float32, 1e-5)}[fn]
    new = [n - min(hist, n - 1) for n in lengths]
    for batch_lengths in [lengths] + [[n] for n in lengths]:                   # one batch, then each alone
        idx = [lengths.index(n) for n in batch_lengths]
        batch = _paged_batch([lengths[i] - new[i] for i in idx], [new[i] for i in idx], 4, 2, 16, 16, "NHD",
                             dtype, "cpu")
        q, k, v, cu_q, cu_k = batch[:5]
        out = _run(fn, batch, [1], sink_tokens, window, dense_threshold=0)
        expected = rtpurbo_prefill_ref(q, k, v, cu_q, cu_k, [1], sink_tokens, window, 0, 0.25)
        torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


# ----------------------------------------------------------------------------------------------------
# GPU: the real FlashAttention-3.

# (history, new, HQ, HKV, D, retrieval heads, page size, layout, sink tokens, window, dense threshold, dtype)
GPU_CASES = [
    ([0, 0, 0, 0, 0], [1, 17, 255, 1000, 3001], 32, 8, 128, [1, 2, 9, 31], 16, "NHD", 4, 100, 0, "bf16"),
    ([0, 0, 0], [300, 2049, 777], 8, 2, 64, [0, 2, 5], 64, "HND", 4, 257, 0, "bf16"),
    ([15000, 0], [1384, 700], 32, 8, 128, [3, 17, 18, 30], 16, "NHD", 4, 8192, 0, "bf16"),
    ([0], [16384], 16, 4, 128, [0, 5, 6, 7], 16, "NHD", 4, 1024, 0, "bf16"),
    ([3000], [5000], 32, 8, 128, [1, 2, 9, 31], 128, "NHD", 4, 1000, 0, "bf16"),
    ([0, 0, 4000], [3000, 9000, 2000], 8, 2, 128, [1, 6], 16, "NHD", 4, 512, 5000, "bf16"),
    ([0, 0], [500, 1500], 5, 1, 64, [1, 3], 16, "HND", 0, 64, 0, "bf16"),
    ([0, 0], [500, 1500], 5, 1, 128, [1, 3], 16, "NHD", 20, 64, 0, "fp16"),
    ([2000, 0], [100, 300], 8, 2, 128, list(range(8)), 16, "NHD", 4, 64, 0, "bf16"),
    ([2000, 0], [100, 300], 8, 2, 128, [], 16, "NHD", 4, 64, 0, "bf16"),
    ([0, 0], [300, 600], 8, 2, 128, [3], 16, "NHD", 4, 1, 0, "bf16"),
    ([0, 0], [700, 1300], 32, 8, 128, [1], 16, "NHD", 4, 4096, 0, "bf16"),
    ([0, 0], [700, 1300], 32, 8, 64, [1], 16, "NHD", 4, 64, 2000, "bf16"),
]


def _gpu_ids(case):
    hist, new, hq, hkv, d, heads, page_size, layout, sink, window, threshold, dtype = case
    return "{}-sink{}-win{}-dense{}-{}".format(_ids(case[:8]), sink, window, threshold, dtype)


@pytest.fixture
def fa3():
    from vllm.vllm_flash_attn import fa_version_unsupported_reason, is_fa_version_supported
    if not is_fa_version_supported(3):
        pytest.skip(f"FlashAttention-3 unavailable: {fa_version_unsupported_reason(3)}")


@pytest.mark.gpu
@pytest.mark.parametrize("case", [pytest.param(c, id=_gpu_ids(c)) for c in GPU_CASES])
def test_fa3_path(seed, fa3, case):
    hist, new, hq, hkv, d, heads, page_size, layout, sink_tokens, window, dense_threshold, dtype = case
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    batch = _paged_batch(hist, new, hq, hkv, d, page_size, layout, dtype, "cuda")
    q, k, v, cu_q, cu_k = batch[:5]
    out = _run(headwise_prefill, batch, heads, sink_tokens, window, dense_threshold, device="cuda")
    expected = _reference_blockwise(q, k, v, cu_q, cu_k, heads, sink_tokens, window, dense_threshold, d ** -0.5)
    torch.testing.assert_close(out.float(), expected, atol=1.5e-2, rtol=1e-2)
    assert (out.float() - expected).abs().mean() < 2e-3


@pytest.mark.gpu
def test_fa3_path_leaves_inputs_alone(seed, fa3):
    batch = _paged_batch([3000, 0], [1000, 500], 8, 2, 128, 16, "NHD", torch.bfloat16, "cuda")
    q, key_cache = batch[0], batch[7]
    q_before, cache_before = q.clone(), key_cache.clone()
    _run(headwise_prefill, batch, [1, 6], 4, 256, 2000, device="cuda")
    assert torch.equal(q, q_before) and torch.equal(key_cache, cache_before)


# ----------------------------------------------------------------------------------------------------
# CPU: the compact KV layout (full KV heads in one view, the others in a window view).


def _split_paged(k, v, cu_k, heads, page_size, held, garbage=float("nan")):
    """K and V ``[N, page_size, len(heads), D]`` of ``heads`` and a block table: slots of tokens that
    ``held(b, t)`` rejects hold ``garbage``, and pages with none held are vLLM's null block 0."""
    ck = cu_k.tolist()
    pages = [torch.full((page_size, len(heads), 2, k.shape[2]), garbage, dtype=k.dtype)]
    rows = []
    for b in range(len(ck) - 1):
        row = []
        for p0 in range(0, ck[b + 1] - ck[b], page_size):
            t = torch.arange(p0, min(p0 + page_size, ck[b + 1] - ck[b]))
            keep = t[held(b, t)]
            if not len(keep):
                row.append(0)
                continue
            page = torch.full_like(pages[0], garbage)
            page[keep - p0, :, 0] = k[ck[b] + keep][:, heads]
            page[keep - p0, :, 1] = v[ck[b] + keep][:, heads]
            row.append(len(pages))
            pages.append(page)
        rows.append(row)
    table = torch.zeros(len(rows), max(len(r) for r in rows) + 1, dtype=torch.int32)
    for b, row in enumerate(rows):
        table[b, :len(row)] = torch.tensor(row, dtype=torch.int32)
    cache = torch.stack(pages)
    return cache[..., 0, :], cache[..., 1, :], table


# (history, new, HQ, HKV, D, retrieval heads, full KV heads, main page, window page, sink, window, dense)
SPLIT_CASES = [
    ([300, 0, 17], [45, 200, 63], 8, 4, 16, [0, 5], [0, 2], 48, 112, 4, 33, 0),
    ([300, 0, 17], [45, 200, 63], 8, 4, 16, [5], [2, 0], 16, 48, 4, 20, 0),     # full views out of head order
    ([130, 0, 60], [20, 90, 30], 8, 2, 32, [1], [0], 112, 16, 4, 40, 100),      # dense sequences
]


def _compact_parts(case, batch, garbage, device="cpu"):
    hist, new, hq, hkv, d, heads, full, main_page, window_page, sink, window, dense = case
    _, k, v, _, cu_k = batch[:5]
    window_heads = [g for g in range(hkv) if g not in full]
    main = _split_paged(k, v, cu_k, full, main_page, lambda b, t: torch.ones_like(t, dtype=torch.bool), garbage)
    # The window view holds sinks, the window, and every token of a sequence that may run dense.
    window_kv = _split_paged(k, v, cu_k, window_heads, window_page,
                             lambda b, t: (t < sink) | (t > hist[b] - window) | (hist[b] + 1 < dense), garbage)
    return [_part(full, *(x.to(device) for x in main), False, device),
            _part(window_heads, *(x.to(device) for x in window_kv), True, device)]


@pytest.mark.parametrize("fn", [headwise_prefill_torch, headwise_prefill], ids=["torch", "fa3-emulated"])
@pytest.mark.parametrize("case", SPLIT_CASES, ids=["P48-Pw112", "unordered-P16-Pw48", "dense-P112-Pw16"])
def test_compact_kv_layout(seed, fake_fa3, fn, case):
    """Full and window views whose out-of-window pages are garbage null blocks give the dense result.

    The torch path never reads unheld keys (NaN there). FA3 loads whole key tiles and masks scores, so
    the keys of a window's boundary tile must be finite: vLLM's null block stays zero and a freed page
    holds another request's K/V, both finite; here they hold 1000."""
    hist, new, hq, hkv, d, heads, full, main_page, window_page, sink, window, dense = case
    batch = _paged_batch(hist, new, hq, hkv, d, 16, "NHD", torch.float16, "cpu")
    q, k, v, cu_q, cu_k, seqused_k = batch[:6]
    garbage = float("nan") if fn is headwise_prefill_torch else 1000.0
    plan = PrefillHeads.build(heads, hq, hkv)
    out = torch.full_like(q, float("nan"))
    fn(q, _compact_parts(case, batch, garbage), cu_q, seqused_k, int(cu_q.diff().max()), int(seqused_k.max()),
       plan, sink, window, d ** -0.5, out, dense_threshold=dense)
    expected = rtpurbo_prefill_ref(q, k, v, cu_q, cu_k, heads, sink, window, dense, d ** -0.5)
    torch.testing.assert_close(out.float(), expected, atol=2e-3, rtol=2e-3)


def test_layer_kv_parts_follow_the_units():
    """A layer whose full KV heads straddle two units and whose window heads share one: three parts."""
    from rtpurbo_vllm.head_layout import HeadLayout
    from rtpurbo_vllm.kv_cache import KVLayout
    from rtpurbo_vllm.kv_cache.layer_kv import LayerKV

    heads = HeadLayout.from_lists(8, 4, [[0, 5, 6], [1, 2, 3], [0, 4, 6, 7]])
    layout = KVLayout.build(heads, head_size=16, window=64)
    names = tuple(f"model.layers.{i}.self_attn.attn" for i in range(3))
    parts = {layer: [(p.kind, p.kv_heads) for p in LayerKV(layout, layer, names).parts] for layer in range(3)}
    assert all(sorted(h for _, hs in p for h in hs) == [0, 1, 2, 3] for p in parts.values())
    assert {kind for p in parts.values() for kind, _ in p} == {"full", "window"}
    for layer, layer_parts in parts.items():
        full = [h for kind, hs in layer_parts if kind == "full" for h in hs]
        assert full == list(heads.retrieval_kv_heads(layer))


@pytest.mark.gpu
@pytest.mark.parametrize("case", SPLIT_CASES, ids=["P48-Pw112", "unordered-P16-Pw48", "dense-P112-Pw16"])
def test_compact_kv_layout_fa3(seed, fa3, case):
    """Full and window views with the real FlashAttention-3 (bf16, D=128); garbage as on a GPU: zeros."""
    hist, new, hq, hkv, _, heads, full, main_page, window_page, sink, window, dense = case
    case = (hist, new, hq, hkv, 128, heads, full, main_page, window_page, sink, window, dense)
    d = 128
    batch = _paged_batch(hist, new, hq, hkv, d, 16, "NHD", torch.bfloat16, "cpu")
    q, k, v, cu_q, cu_k, seqused_k = batch[:6]
    plan = PrefillHeads.build(heads, hq, hkv, device="cuda")
    out = torch.full_like(q, float("nan")).cuda()
    headwise_prefill(q.cuda(), _compact_parts(case, batch, 0.0, "cuda"), cu_q.cuda(), seqused_k.cuda(),
                     int(cu_q.diff().max()), int(seqused_k.max()), plan, sink, window, d ** -0.5, out,
                     dense_threshold=dense)
    expected = rtpurbo_prefill_ref(q, k, v, cu_q, cu_k, heads, sink, window, dense, d ** -0.5)
    torch.testing.assert_close(out.float().cpu(), expected, atol=1.5e-2, rtol=1e-2)


@pytest.mark.gpu
def test_fp8_kv_fa3(seed, fa3):
    """FP8 K/V views (FA3 descales Q, K and V) against the reference over the dequantised K/V."""
    from rtpurbo_vllm.triton_kernels.paged_heads import quantize_fp8, to_float

    hist, new, hq, hkv, d, heads = [300, 0], [45, 200], 8, 2, 128, [1, 6]
    batch = _paged_batch(hist, new, hq, hkv, d, 16, "NHD", torch.bfloat16, "cpu")
    q, k, v, cu_q, cu_k, seqused_k, block_table, key_cache, value_cache = batch
    k_scale, v_scale = torch.tensor([0.5]), torch.tensor([2.0])
    k8, v8 = quantize_fp8(key_cache, k_scale, torch.float8_e4m3fn), quantize_fp8(value_cache, v_scale, torch.float8_e4m3fn)
    k_seen, v_seen = to_float(quantize_fp8(k, k_scale), k_scale), to_float(quantize_fp8(v, v_scale), v_scale)
    plan = PrefillHeads.build(heads, hq, hkv, device="cuda")
    out = torch.full_like(q, float("nan")).cuda()
    parts = [KVPart(k8.cuda(), v8.cuda(), block_table.cuda(), tuple(range(hkv)))]
    headwise_prefill(q.cuda(), parts, cu_q.cuda(), seqused_k.cuda(), int(cu_q.diff().max()), int(seqused_k.max()),
                     plan, 4, 64, d ** -0.5, out, k_scale=k_scale.cuda(), v_scale=v_scale.cuda(),
                     q_scale=torch.ones(1, device="cuda"))
    expected = rtpurbo_prefill_ref(q, k_seen, v_seen, cu_q, cu_k, heads, 4, 64, 0, d ** -0.5)
    err = (out.float().cpu() - expected).norm() / expected.norm()
    assert err < 0.05, err
