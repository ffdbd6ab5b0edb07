"""headwise_sparse_decode (Triton) against paged_sparse_decode_ref on PagedHeads layouts.

Layouts: the one-unit full layout (``PagedHeads.single``, every KV head of the layer in one tensor) and
scattered ones: a layer's KV heads spread over several unit tensors of two kinds (full and window) with
different page sizes, spare slots holding other layers' garbage, the window kind's pages outside the
sinks and the window mapped to a garbage null page 0. bf16/fp16 and fp8 (uint8 / float8_e4m3fn bytes
with per-layer scales) units. Small cases run on the CPU under ``TRITON_INTERPRET=1``; realistic sizes,
int64 page offsets and CUDA-graph capture/replay are marked ``gpu``.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import importlib  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from rtpurbo_vllm.cuda_graphs import capture  # noqa: E402
from rtpurbo_vllm.triton_kernels import launch  # noqa: E402
from rtpurbo_vllm.triton_kernels.block_topp import expand_block_mask  # noqa: E402
from rtpurbo_vllm.triton_kernels.headwise_attention import attention_mask  # noqa: E402
from rtpurbo_vllm.triton_kernels.paged_heads import PagedHeads, PageTable, to_float  # noqa: E402
from rtpurbo_vllm.triton_kernels.sparse_decode import kernel as _kernel_module  # noqa: E402
from rtpurbo_vllm.triton_kernels.sparse_decode import (paged_sparse_decode_ref,  # noqa: E402
                                                       sparse_decode_ref)



import rtpurbo_paged_layouts as PL  # noqa: E402  (registered by tests/conftest.py)
KindSpec = PL.KindSpec

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRET and type(_kernel_module._split_kernel).__name__ != "InterpretedFunction":
    # Something imported the kernels before TRITON_INTERPRET was set (Triton picks the mode when a
    # function is decorated): decorate them again, in place, for the interpreter.
    importlib.reload(_kernel_module)
allocate_sparse_decode_workspace = _kernel_module.allocate_sparse_decode_workspace
headwise_sparse_decode = _kernel_module.headwise_sparse_decode
DEVICE = "cpu" if INTERPRET else "cuda"
SEQ_LENS = [1, 5, 63, 64, 65, 200, 515]
# Selection modes, cycled over (sequence, retrieval head) so every case meets each of them.
MODES = ("random", "forced", "all", "empty")
FP8 = (torch.uint8, torch.float8_e4m3fn)


# ----------------------------------------------------------------------------------------------------
# Input builders.


def _selection(seq_lens, num_ret, block_size, sink_tokens, max_blocks):
    """(selected, num_selected, keep_blocks per sequence) in the block top-p op's output format."""
    selected = torch.full((len(seq_lens), num_ret, max_blocks), -1, dtype=torch.int32)
    num_selected = torch.zeros(len(seq_lens), num_ret, dtype=torch.int32)
    keep_blocks = []
    for b, n in enumerate(seq_lens):
        nb = math.ceil(n / block_size)
        keep = torch.zeros(num_ret, nb, dtype=torch.bool)
        for r in range(num_ret):
            mode = MODES[(b + r) % len(MODES)]
            if mode == "all":
                keep[r] = True
            elif mode != "empty" and nb > 0:
                keep[r, -1] = True                                    # the query's own block
                keep[r, :math.ceil(sink_tokens / block_size)] = True  # sink blocks
                if mode == "random":
                    keep[r] |= torch.rand(nb) < 0.4
            ids = keep[r].nonzero().flatten()
            selected[b, r, :len(ids)] = ids.int()
            num_selected[b, r] = len(ids)
        keep_blocks.append(keep)
    return selected, num_selected, keep_blocks


def _dense_selection(seq_lens, selected, num_selected, keep_blocks, block_size, dense_threshold):
    """What block top-p selects for a dense sequence (``L < dense_threshold``): every block."""
    for b, n in enumerate(seq_lens):
        if n < dense_threshold:
            nb = math.ceil(n / block_size)
            keep_blocks[b][:] = True
            selected[b, :, :nb] = torch.arange(nb, dtype=torch.int32)
            num_selected[b] = nb


def _single_unit(seq_lens, page_size, num_kv_heads, head_dim, dtype, device, extra_pages=3, min_page=0):
    """The one-tensor layout: ``[num_pages, P, HKV, 2D]`` random K|V, shuffled non-contiguous page ids,
    table rows padded with foreign pages. Returns (kv PagedHeads, [PageTable], cache)."""
    pages_per_seq = [math.ceil(n / page_size) for n in seq_lens]
    max_pages = max(max(pages_per_seq), 1) + 1
    num_pages = min_page + sum(pages_per_seq) + extra_pages
    cache = torch.randn(num_pages, page_size, num_kv_heads, 2 * head_dim, device=device).to(dtype)
    perm = (min_page + torch.randperm(num_pages - min_page)).tolist()
    block_table = torch.randint(min_page, num_pages, (len(seq_lens), max_pages), dtype=torch.int32)
    for b, n in enumerate(pages_per_seq):
        block_table[b, :n] = torch.tensor(perm[:n], dtype=torch.int32)
        perm = perm[n:]
    kv = PagedHeads.single(cache)
    return kv, [kv.table(0, block_table.to(device))], cache


def _scales(kv_dtype, device):
    if kv_dtype in FP8:
        return (torch.tensor([0.03], device=device), torch.tensor([0.011], device=device))
    return None, None


def _call(q, kv, tables, seq_lens, ret, selected, num_selected, block_size, sink, window, workspace, out, lse,
          dense=0, k_scale=None, v_scale=None):
    headwise_sparse_decode(q, kv, tables, seq_lens, ret, selected, num_selected, block_size, sink, window,
                           q.shape[2] ** -0.5, workspace, out, lse, dense_threshold=dense, k_scale=k_scale,
                           v_scale=v_scale)


def _check(q, kv, tables, seq_lens, ret, selected, num_selected, block_size, sink, window, out, lse, dense=0,
           k_scale=None, v_scale=None, atol=2e-2, rtol=2e-2):
    ref_out, ref_lse = paged_sparse_decode_ref(q, kv, tables, seq_lens, ret, selected, num_selected, block_size,
                                               sink, window, q.shape[2] ** -0.5, dense, k_scale, v_scale)
    assert not out.isnan().any(), "unwritten or garbage output entries"
    assert not lse.isnan().any(), "unwritten lse entries"
    torch.testing.assert_close(out.float(), ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-3)
    rel = (out.float() - ref_out).norm() / ref_out.norm().clamp_min(1e-30)
    assert rel < 1e-2, f"relative error {rel:.2e}"
    return ref_out, ref_lse


def _workspace(batch, num_heads, head_dim, num_splits, device):
    # Slots to spare, so the batch gets exactly S = num_splits (a power of two) splits.
    ws = allocate_sparse_decode_workspace(batch + 2, num_heads, head_dim, splits_per_seq=num_splits,
                                          max_splits=num_splits, device=device)
    assert ws.splits_for_batch(batch) == num_splits
    ws.partial_out.fill_(float("nan"))
    ws.partial_lse.fill_(float("nan"))
    return ws


def _run_case(seq_lens, num_heads, num_kv_heads, head_dim, page_size, block_size, sink_tokens, window,
              retrieval_heads, dtype=torch.bfloat16, num_splits=8, device=DEVICE, min_page=0,
              max_blocks=None, atol=2e-2, rtol=2e-2, workspace=None):
    """The one-unit full layout."""
    q = torch.randn(len(seq_lens), num_heads, head_dim, dtype=dtype, device=device)
    kv, tables, _ = _single_unit(seq_lens, page_size, num_kv_heads, head_dim, dtype, device, min_page=min_page)
    if max_blocks is None:
        max_blocks = max(math.ceil(max(seq_lens) / block_size), 1) + 1
    selected, num_selected, _ = _selection(seq_lens, len(retrieval_heads), block_size, sink_tokens, max_blocks)
    selected, num_selected = selected.to(device), num_selected.to(device)
    ret = torch.tensor(retrieval_heads, dtype=torch.int32, device=device)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    workspace = workspace or _workspace(len(seq_lens), num_heads, head_dim, num_splits, device)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((len(seq_lens), num_heads), float("nan"), device=device)
    _call(q, kv, tables, seq_lens_t, ret, selected, num_selected, block_size, sink_tokens, window, workspace, out,
          lse)
    _check(q, kv, tables, seq_lens, retrieval_heads, selected, num_selected, block_size, sink_tokens, window, out,
           lse, atol=atol, rtol=rtol)


def _run_scattered(seq_lens, hq, head_kind, head_dim, kinds, ret, sink, window, kv_dtype=torch.bfloat16,
                   q_dtype=torch.bfloat16, num_splits=4, dense=0, block_size=64, device=DEVICE):
    """A scattered layout; returns everything for further checks."""
    k_scale, v_scale = _scales(kv_dtype, device)
    keeps = [None, PL.kept_window(seq_lens, sink, window, dense)][:len(kinds)]
    lay, stored = PL.paged_kv(seq_lens, head_kind, head_dim, kv_dtype, kinds, device, keeps, k_scale, v_scale)
    q = torch.randn(len(seq_lens), hq, head_dim, dtype=q_dtype, device=device)
    max_blocks = math.ceil(max(seq_lens) / block_size) + 1
    selected, num_selected, keep_blocks = _selection(seq_lens, len(ret), block_size, sink, max_blocks)
    _dense_selection(seq_lens, selected, num_selected, keep_blocks, block_size, dense)
    selected, num_selected = selected.to(device), num_selected.to(device)
    ret_t = torch.tensor(ret, dtype=torch.int32, device=device)
    ws = _workspace(len(seq_lens), hq, head_dim, num_splits, device)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((len(seq_lens), hq), float("nan"), device=device)
    _call(q, lay.paged, lay.tables, torch.tensor(seq_lens, dtype=torch.int32, device=device), ret_t, selected,
          num_selected, block_size, sink, window, ws, out, lse, dense, k_scale, v_scale)
    ref_out, _ = _check(q, lay.paged, lay.tables, seq_lens, ret, selected, num_selected, block_size, sink, window,
                        out, lse, dense, k_scale, v_scale)
    return dict(q=q, out=out, lse=lse, ref_out=ref_out, stored=stored, keep_blocks=keep_blocks, lay=lay,
                k_scale=k_scale, v_scale=v_scale)


def _dense_reference(q, stored, seq_lens, ret, keep_blocks, block_size, sink, window, dense, k_scale, v_scale):
    """float32 out from sparse_decode_ref on the logical (contiguous, dequantised) K/V of each sequence."""
    outs = []
    for b, n in enumerate(seq_lens):
        k, v = (to_float(x, s).to(q.device) for x, s in zip(stored[b], (k_scale, v_scale)))
        keep = attention_mask(1, n, sink, n if n < dense else window, q.device).expand(q.shape[1], n).clone()
        if ret:
            keep[ret] = expand_block_mask(keep_blocks[b].to(q.device), n, block_size)
        outs.append(sparse_decode_ref(q[b], k, v, keep, q.shape[2] ** -0.5)[0])
    return torch.stack(outs)


# ----------------------------------------------------------------------------------------------------
# One-unit full layout (the former k_cache/v_cache signature's coverage).

# (id, HQ, HKV, D, P, sink, window, retrieval heads, dtype, num_splits)
CASES = [
    ("HQ4-HKV4-D64-P16-sink4-win32", 4, 4, 64, 16, 4, 32, [1, 3], torch.bfloat16, 8),
    ("HQ8-HKV2-D128-P64-sink0-win100", 8, 2, 128, 64, 0, 100, [0, 5, 6], torch.bfloat16, 4),
    ("HQ5-HKV1-D64-P64-sink4-win1000", 5, 1, 64, 64, 4, 1000, [2], torch.float16, 32),
    ("HQ8-HKV2-D64-P16-sink0-win1000", 8, 2, 64, 16, 0, 1000, [7, 1], torch.bfloat16, 2),
    ("HQ5-HKV1-D128-P16-sink4-win1-noret", 5, 1, 128, 16, 4, 1, [], torch.bfloat16, 8),
    ("HQ4-HKV4-D64-P16-allret", 4, 4, 64, 16, 4, 48, [0, 1, 2, 3], torch.float16, 8),
]


@pytest.mark.parametrize("case", [pytest.param(c[1:], id=c[0]) for c in CASES])
def test_mixed_batch(seed, case):
    hq, hkv, d, p, sink, window, ret, dtype, splits = case
    _run_case(SEQ_LENS, hq, hkv, d, p, 64, sink, window, ret, dtype=dtype, num_splits=splits)


@pytest.mark.parametrize("local_programs", [1, 28])
def test_fewer_local_splits(seed, local_programs, monkeypatch):
    """The KV-group units cut their window into fewer splits than the retrieval units (7 sequences x 2 KV
    heads: S_local 1, and 2 of 8), in one launch: the combine merges each head's own splits."""
    monkeypatch.setitem(_kernel_module.CONFIG, "local_programs_per_sm", local_programs)
    monkeypatch.setattr(_kernel_module, "sm_count", lambda device: 1)
    _run_case(SEQ_LENS, 8, 2, 64, 16, 64, 4, 200, [0, 5], num_splits=8)


def test_local_splits_for(monkeypatch):
    monkeypatch.setitem(_kernel_module.CONFIG, "local_programs_per_sm", 0)
    assert _kernel_module.local_splits_for(4, 8, 64, num_sms=132) == 64
    monkeypatch.setitem(_kernel_module.CONFIG, "local_programs_per_sm", 2)
    assert [_kernel_module.local_splits_for(b, 8, 64, num_sms=128) for b in (1, 3, 4, 32, 64)] == [32, 8, 8, 1, 1]
    assert _kernel_module.local_splits_for(1, 8, 16, num_sms=128) == 16
    assert [_kernel_module.local_splits_for(b, 8, 64, num_sms=132) for b in (1, 4)] == [32, 8]    # 264 programs
    assert _kernel_module.sm_count(torch.device("cpu")) == _kernel_module.NOMINAL_SMS


@pytest.mark.parametrize("page_size, block_size", [pytest.param(128, 64, id="P128-BS64"),
                                                   pytest.param(16, 32, id="P16-BS32")])
def test_page_and_block_sizes(seed, page_size, block_size):
    _run_case([3, 130, 300], 8, 2, 64, page_size, block_size, 4, 70, [3, 4], num_splits=4)



# ----------------------------------------------------------------------------------------------------
# Scattered layouts: KV heads over several unit tensors of two kinds.

u8, f8, bf16, fp16 = torch.uint8, torch.float8_e4m3fn, torch.bfloat16, torch.float16
# (id, HQ, head kinds (one per KV head), D, kinds, retrieval heads, sink, window, dense, KV dtype, q dtype)
SCATTERED = [
    ("HKV4-full2units-P16-window2units-P80", 8, [0, 1, 0, 1], 64, [KindSpec(16, 2, 2), KindSpec(80, 2, 3)],
     [0, 5], 4, 70, 0, bf16, bf16),
    ("HKV3-full1unit-P32-window2units-P16-dense", 6, [1, 0, 1], 128, [KindSpec(32, 1, 2), KindSpec(16, 2, 1)],
     [2, 3], 4, 40, 100, bf16, bf16),
    ("HKV4-full3units-P80-fp16", 8, [0, 0, 0, 0], 64, [KindSpec(80, 3, 2)], [1, 6, 7], 0, 100, 0, fp16, fp16),
    ("HKV2-window-only-P16-noret", 4, [1, 1], 64, [KindSpec(16, 1, 1), KindSpec(16, 3, 1)], [], 4, 33, 0,
     bf16, bf16),
    ("HKV4-fp8u8-full2units-P16-window2units-P32", 8, [0, 1, 1, 0], 64, [KindSpec(16, 2, 3), KindSpec(32, 2, 2)],
     [1, 7], 4, 70, 0, u8, bf16),
    ("HKV2-fp8e4m3-full-P80-window-P16-fp16q-dense", 4, [0, 1], 128, [KindSpec(80, 1, 2), KindSpec(16, 2, 2)],
     [0], 4, 40, 100, f8, fp16),
]


@pytest.mark.parametrize("case", [pytest.param(c[1:], id=c[0]) for c in SCATTERED])
def test_scattered_layout(seed, case):
    """Every head's K/V read through base + offset in its own unit tensor and kind's block table; the
    window kind's null page 0 and every unheld slot are garbage (NaN / random fp8 bytes)."""
    hq, head_kind, d, kinds, ret, sink, window, dense, kv_dtype, q_dtype = case
    r = _run_scattered(SEQ_LENS, hq, head_kind, d, kinds, ret, sink, window, kv_dtype, q_dtype, dense=dense)
    assert len({u.data_ptr() for u in r["lay"].paged.units}) == sum(k.num_units for k in kinds)
    # The paged reference equals attention over the logical contiguous K/V (checks gather and the layout).
    dense_out = _dense_reference(r["q"], r["stored"], SEQ_LENS, ret, r["keep_blocks"], 64, sink, window, dense,
                                 r["k_scale"], r["v_scale"])
    torch.testing.assert_close(r["ref_out"], dense_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_dtype", [u8, f8])
def test_fp8_single_unit_against_unquantised(seed, kv_dtype):
    """fp8 units in the one-tensor layout: the kernel matches the dequantising reference to bf16 accuracy
    and the unquantised attention to fp8 accuracy (e4m3 keeps 3 mantissa bits: <= 2^-4 relative per value)."""
    seq_lens, hq, hkv, d, p, bs, sink, window, ret = [1, 70, 300], 8, 2, 64, 16, 64, 4, 100, [2, 5]
    k_scale, v_scale = torch.tensor([0.02], device=DEVICE), torch.tensor([0.01], device=DEVICE)
    lay, stored = PL.paged_kv(seq_lens, [0] * hkv, d, kv_dtype, [KindSpec(p, 1, hkv)], DEVICE, None, k_scale,
                              v_scale)
    q = torch.randn(len(seq_lens), hq, d, dtype=torch.bfloat16, device=DEVICE)
    selected, num_selected, keep_blocks = _selection(seq_lens, len(ret), bs, sink, 6)
    ws = _workspace(len(seq_lens), hq, d, 4, DEVICE)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((len(seq_lens), hq), float("nan"), device=DEVICE)
    _call(q, lay.paged, lay.tables, torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
          torch.tensor(ret, dtype=torch.int32, device=DEVICE), selected.to(DEVICE), num_selected.to(DEVICE), bs, sink,
          window, ws, out, lse, 0, k_scale, v_scale)
    _check(q, lay.paged, lay.tables, seq_lens, ret, selected, num_selected, bs, sink, window, out, lse, 0,
           k_scale, v_scale)
    # The unquantised values: what was quantised (paged_kv draws k ~ 2 N(0,1), v ~ N(0,1) in bf16 and
    # quantises them); reconstruct them to bound the end-to-end fp8 error.
    exact = [(to_float(k, k_scale), to_float(v, v_scale)) for k, v in stored]
    approx = _dense_reference(q, stored, seq_lens, ret, keep_blocks, bs, sink, window, 0, k_scale, v_scale)
    torch.testing.assert_close(out.float(), approx, atol=2e-2, rtol=2e-2)
    assert all(x[0].abs().max() <= 448 * 0.02 + 1e-6 for x in exact)


def test_fp8_queries_beyond_fp16_saturate(seed):
    """Over fp8 K/V the dots run in fp16: query entries beyond fp16's range (bf16 reaches 3e38) saturate
    at +-65504 instead of turning into inf and NaN outputs; the result is the reference's for the
    saturated queries. Scores reach ~1e5 here, where float32 rounds to ~0.01 and the kernel (``k_scale``
    in the score scale) and the reference (``k_scale`` in K) round differently: two keys within a few
    units of each other get weights a few per cent apart, hence ``atol`` 0.1 (a wrong saturation moves
    outputs by O(1))."""
    seq_lens, hq, hkv, d, p, bs, sink, window, ret = [70, 300], 4, 2, 64, 16, 64, 4, 100, [1]
    k_scale, v_scale = torch.tensor([0.02], device=DEVICE), torch.tensor([0.01], device=DEVICE)
    lay, _ = PL.paged_kv(seq_lens, [0] * hkv, d, u8, [KindSpec(p, 1, hkv)], DEVICE, None, k_scale, v_scale)
    q = torch.randn(len(seq_lens), hq, d, dtype=torch.bfloat16, device=DEVICE)
    q[:, :, :3] = torch.tensor([1e5, -3e5, 7e4], dtype=torch.bfloat16)
    selected, num_selected, _ = _selection(seq_lens, len(ret), bs, sink, 6)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((len(seq_lens), hq), float("nan"), device=DEVICE)
    args = (torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
            torch.tensor(ret, dtype=torch.int32, device=DEVICE), selected.to(DEVICE), num_selected.to(DEVICE), bs,
            sink, window)
    _call(q, lay.paged, lay.tables, *args, _workspace(len(seq_lens), hq, d, 4, DEVICE), out, lse, 0, k_scale, v_scale)
    _check(q.clamp(-65504, 65504), lay.paged, lay.tables, seq_lens, ret, selected, num_selected, bs, sink, window,
           out, lse, 0, k_scale, v_scale, atol=0.1)


def test_fp8_error_bound_against_bf16(seed):
    """The same K/V stored as bf16 and as fp8: outputs differ by what e4m3 rounding allows."""
    seq_lens, hq, hkv, d, p, bs, sink, window, ret = [200, 515], 4, 2, 64, 32, 64, 4, 100, [1]
    k = torch.randn(sum(seq_lens), hkv, d)
    v = torch.randn(sum(seq_lens), hkv, d)
    k_scale, v_scale = torch.tensor([4.0 / 448], device=DEVICE), torch.tensor([4.0 / 448], device=DEVICE)
    q = torch.randn(len(seq_lens), hq, d, dtype=torch.bfloat16, device=DEVICE)
    selected, num_selected, _ = _selection(seq_lens, len(ret), bs, sink, 10)
    outs = {}
    for dtype in (bf16, u8):
        lay = PL.build(seq_lens, [0] * hkv, 2 * d, dtype, [KindSpec(p, 2, 1)], DEVICE)
        cu = 0
        for b, n in enumerate(seq_lens):
            ks, vs = (PL.store_values(x[cu:cu + n], dtype, s) for x, s in ((k, k_scale), (v, v_scale)))
            for h in range(hkv):
                lay.fill(b, h, torch.cat([ks[:, h], vs[:, h]], -1).to(DEVICE))
            cu += n
        out = torch.full_like(q, float("nan"))
        lse = torch.full((len(seq_lens), hq), float("nan"), device=DEVICE)
        _call(q, lay.paged, lay.tables, torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
              torch.tensor(ret, dtype=torch.int32, device=DEVICE), selected.to(DEVICE), num_selected.to(DEVICE), bs,
              sink, window, _workspace(2, hq, d, 4, DEVICE), out, lse,
              k_scale=k_scale if dtype == u8 else None, v_scale=v_scale if dtype == u8 else None)
        outs[dtype] = out.float()
    rel = (outs[u8] - outs[bf16]).norm() / outs[bf16].norm()
    assert rel < 0.06, f"fp8 vs bf16 relative error {rel:.3f}"
    assert rel > 1e-4, "fp8 path looks unquantised"


def test_reuse_same_tensors_new_values(seed):
    """CUDA-graph style: one descriptor and one set of PageTables (views of persistent buffers); new
    seq_lens, block tables, selections, cache contents and queries written in place between calls."""
    hq, head_kind, d, bs, sink, window = 8, [0, 1, 1, 0], 64, 64, 4, 50
    kinds = [KindSpec(16, 2, 2), KindSpec(32, 2, 2)]
    batch, max_len = 4, 400
    lens_a, lens_b = [400, 1, 130, 64], [65, 399, 0, 257]
    # Persistent buffers sized for max_len.
    lay_a, _ = PL.paged_kv([max_len] * batch, head_kind, d, bf16, kinds, DEVICE,
                           [None, PL.kept_window([max_len] * batch, sink, window)], spare_pages=4 * batch)
    kv = lay_a.paged
    tables = lay_a.tables
    max_blocks = math.ceil(max_len / bs)
    q = torch.empty(batch, hq, d, dtype=bf16, device=DEVICE)
    seq_lens = torch.zeros(batch, dtype=torch.int32, device=DEVICE)
    ret = torch.tensor([0, 6], dtype=torch.int32, device=DEVICE)
    selected = torch.full((batch, 2, max_blocks), -1, dtype=torch.int32, device=DEVICE)
    num_selected = torch.zeros(batch, 2, dtype=torch.int32, device=DEVICE)
    ws = _workspace(batch, hq, d, 4, DEVICE)
    out = torch.empty_like(q)
    lse = torch.empty(batch, hq, device=DEVICE)
    for lens in (lens_a, lens_b):
        # New contents: a fresh layout's tables and unit contents copied into the persistent tensors.
        keep = PL.kept_window(lens, sink, window)
        fresh, _ = PL.paged_kv([max(n, 1) for n in lens], head_kind, d, bf16, kinds, DEVICE, [None, keep])
        PL.copy_into(lay_a, fresh)
        q.copy_(torch.randn_like(q))
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        sel, nsel, _ = _selection(lens, 2, bs, sink, max_blocks)
        selected.copy_(sel)
        num_selected.copy_(nsel)
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        _call(q, kv, tables, seq_lens, ret, selected, num_selected, bs, sink, window, ws, out, lse)
        _check(q, kv, tables, lens, [0, 6], selected, num_selected, bs, sink, window, out, lse)


@pytest.mark.parametrize("local_programs", [0, 8])
@pytest.mark.parametrize("ret", [[0, 6], [], list(range(8))], ids=["two", "none", "all"])
def test_select_step_between_the_launches(seed, ret, local_programs, monkeypatch):
    """With a ``select`` step the KV-group units launch after it (with ``local_programs`` 8, S_local 2
    of S 4 splits in a launch of their own size), then the retrieval units: the output is the
    one-launch op's on the filled selection, bit for bit (scattered layout, window kind, ragged
    lengths; no retrieval heads, and retrieval heads only)."""
    monkeypatch.setitem(_kernel_module.CONFIG, "local_programs_per_sm", local_programs)
    monkeypatch.setattr(_kernel_module, "sm_count", lambda device: 1)        # local_programs bounds the launch
    hq, head_kind, d, bs, sink, window = 8, [0, 1, 1, 0], 64, 64, 4, 50
    if len(ret) == hq:
        head_kind = [0] * 4
    kinds = [KindSpec(16, 2, 2), KindSpec(32, 2, 2)]
    lens = [400, 1, 130, 65]
    lay, _ = PL.paged_kv(lens, head_kind, d, bf16, kinds, DEVICE, [None, PL.kept_window(lens, sink, window)])
    max_blocks = math.ceil(max(lens) / bs)
    q = torch.randn(len(lens), hq, d, dtype=bf16, device=DEVICE)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    ret_t = torch.tensor(ret, dtype=torch.int32, device=DEVICE)
    sel, nsel, _ = _selection(lens, len(ret), bs, sink, max_blocks)
    sel, nsel = sel.to(DEVICE), nsel.to(DEVICE)
    outs = []
    for staged in (False, True):
        selected = torch.full_like(sel, -7) if staged else sel.clone()
        num_selected = torch.full_like(nsel, -7) if staged else nsel.clone()
        out = torch.full_like(q, float("nan"))
        lse = torch.full((len(lens), hq), float("nan"), device=DEVICE)
        calls = []

        def select():
            calls.append(1)
            selected.copy_(sel)
            num_selected.copy_(nsel)

        headwise_sparse_decode(q, lay.paged, lay.tables, seq_lens, ret_t, selected, num_selected, bs, sink, window,
                               d ** -0.5, _workspace(len(lens), hq, d, 4, DEVICE), out, lse,
                               select=select if staged else None)
        assert calls == ([1] if staged else [])
        _check(q, lay.paged, lay.tables, lens, ret, selected, num_selected, bs, sink, window, out, lse)
        outs.append((out, lse))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_splits_for_batch():
    ws = allocate_sparse_decode_workspace(8, 2, 16, splits_per_seq=4, max_splits=64)
    assert [ws.splits_for_batch(b) for b in (1, 2, 3, 5, 8)] == [32, 16, 8, 4, 4]
    assert allocate_sparse_decode_workspace(8, 2, 16, splits_per_seq=4, max_splits=8).splits_for_batch(1) == 8
    with pytest.raises(ValueError):
        ws.splits_for_batch(33)


def test_small_batch_gets_more_splits(seed):
    """A workspace for 16 sequences at 8 splits each runs a batch of 2 with S = 64: over 32 splits per
    head, so the combine takes several passes."""
    ws = allocate_sparse_decode_workspace(16, 8, 64, splits_per_seq=8, device=DEVICE)
    assert ws.splits_for_batch(2) == 64
    _run_case([515, 4500], 8, 2, 64, 16, 64, 4, 5000, [2, 5], workspace=ws)   # 36 splits of 128 tokens


def test_padding_entries_write_zero(seed):
    """CUDA-graph padding: sequences of length 0 get output 0 and LSE -inf on every head."""
    b, hq, hkv, d = 3, 4, 2, 64
    q = torch.randn(b, hq, d, dtype=torch.bfloat16, device=DEVICE)
    kv, tables, _ = _single_unit([70, 1, 1], 16, hkv, d, torch.bfloat16, DEVICE)
    seq_lens = torch.tensor([70, 0, 0], dtype=torch.int32, device=DEVICE)
    ret = torch.tensor([1], dtype=torch.int32, device=DEVICE)
    selected = torch.tensor([[[0, 1]], [[0, -1]], [[-1, -1]]], dtype=torch.int32, device=DEVICE)
    num_selected = torch.tensor([[2], [1], [0]], dtype=torch.int32, device=DEVICE)
    ws = allocate_sparse_decode_workspace(b, hq, d, 4, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((b, hq), float("nan"), device=DEVICE)
    headwise_sparse_decode(q, kv, tables, seq_lens, ret, selected, num_selected, 64, 4, 16, 0.125, ws, out, lse)
    assert torch.equal(out[1:].float(), torch.zeros(2, hq, d, device=DEVICE))
    assert (lse[1:] == float("-inf")).all()
    assert not out[0].isnan().any() and torch.isfinite(lse[0]).all()


def test_strided_views(seed):
    """q/out as head slices of wider rows; units as slot slices of wider tensors (non-contiguous units)
    and a block table that is a column slice of a wider buffer."""
    seq_lens, hq, hkv, d, p = [40, 129], 4, 2, 64, 16
    wide = [torch.randn(30, p, 3, 2 * d, device=DEVICE).to(torch.bfloat16) for _ in range(2)]
    units = [w[:, :, 1:3] for w in wide]                     # [30, P, 2, 2D], page stride 3 * 2D
    kv = PagedHeads.from_units(units, [1, 0], [0, 1], [0, 0])
    table_buf = torch.randperm(30, dtype=torch.int32)[:24].view(2, 12).to(DEVICE)
    tables = [kv.table(0, table_buf[:, 1:11])]
    q_wide = torch.randn(2, hq + 2, d, dtype=torch.bfloat16, device=DEVICE)
    q = q_wide[:, 1:hq + 1]
    out_wide = torch.full((2, hq + 3, d), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    out = out_wide[:, 2:hq + 2]
    selected, num_selected, _ = _selection(seq_lens, 1, 64, 4, 4)
    ws = allocate_sparse_decode_workspace(2, hq, d, 4, device=DEVICE)
    lse = torch.full((2, hq), float("nan"), device=DEVICE)
    headwise_sparse_decode(q, kv, tables, torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
                           torch.tensor([2], dtype=torch.int32, device=DEVICE), selected.to(DEVICE),
                           num_selected.to(DEVICE), 64, 4, 50, d ** -0.5, ws, out, lse)
    _check(q, kv, tables, seq_lens, [2], selected, num_selected, 64, 4, 50, out, lse)
    assert out_wide[:, :2].isnan().all() and out_wide[:, hq + 2:].isnan().all(), "wrote outside the view"


def test_bad_arguments():
    q = torch.randn(2, 4, 64, dtype=torch.bfloat16, device=DEVICE)
    cache = torch.randn(8, 16, 2, 128, device=DEVICE).to(torch.bfloat16)
    kv = PagedHeads.single(cache)
    bt = torch.zeros(2, 4, dtype=torch.int32, device=DEVICE)
    tables = [kv.table(0, bt)]
    sl = torch.ones(2, dtype=torch.int32, device=DEVICE)
    ret = torch.tensor([1], dtype=torch.int32, device=DEVICE)
    sel = torch.zeros(2, 1, 4, dtype=torch.int32, device=DEVICE)
    nsel = torch.ones(2, 1, dtype=torch.int32, device=DEVICE)
    ws = allocate_sparse_decode_workspace(2, 4, 64, 4, device=DEVICE)
    out = torch.empty_like(q)
    args = [q, kv, tables, sl, ret, sel, nsel, 64, 4, 16, 0.125, ws, out]
    headwise_sparse_decode(*args)   # valid as given
    fp8_kv = PagedHeads.single(torch.zeros(8, 16, 2, 128, dtype=torch.uint8, device=DEVICE))
    for i, bad in [(0, q.float()), (2, [kv.table(0, bt.long())]), (2, [PageTable(bt, 32, 4096, 256)]), (2, []),
                   (3, sl[:1]), (5, sel[:, :, None]), (6, nsel.long()),
                   (11, allocate_sparse_decode_workspace(1, 4, 64, 1, device=DEVICE)),  # 1 slot, 2 sequences
                   (11, allocate_sparse_decode_workspace(2, 8, 64, 4, device=DEVICE)), (12, out[:1]),
                   (1, PagedHeads.single(torch.randn(8, 16, 3, 128, device=DEVICE).to(torch.bfloat16))),
                   (1, PagedHeads.single(torch.randn(8, 16, 2, 64, device=DEVICE).to(torch.bfloat16))),
                   (1, fp8_kv)]:   # fp8 without scales
        with pytest.raises(ValueError):
            headwise_sparse_decode(*args[:i], bad, *args[i + 1:])
    window_only = PagedHeads.from_units([cache], [0, 0], [0, 1], [1, 1])   # retrieval heads need kind 0
    with pytest.raises(ValueError, match="kind-0"):
        headwise_sparse_decode(q, window_only, [None, window_only.table(1, bt)], *args[3:])
    if not q.is_cuda:
        with pytest.raises(ValueError, match="side_stream runs CUDA tensors only"):
            headwise_sparse_decode(*args, select=lambda: None, side_stream=object())


# ----------------------------------------------------------------------------------------------------
# GPU: realistic sizes, int64 offsets, CUDA graphs.

GPU_NUM_HEADS, GPU_NUM_KV_HEADS, GPU_HEAD_DIM = 32, 8, 128
GPU_RETRIEVAL = [3, 9, 17, 24, 30]   # 5/32 ~ 15 %


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET, reason="realistic sizes need the compiled kernel (unset TRITON_INTERPRET)")
@pytest.mark.parametrize("batch, page_size, num_splits", [pytest.param(1, 16, 32, id="B1-P16-S32"),
                                                          pytest.param(1, 64, 64, id="B1-P64-S64"),
                                                          pytest.param(1, 16, 256, id="B1-P16-S256"),
                                                          pytest.param(32, 16, 32, id="B32-P16-S32")])
def test_gpu_realistic(seed, batch, page_size, num_splits):
    lens = torch.randint(32 * 1024, 128 * 1024 + 1, (batch,)).tolist()
    lens[0] = 128 * 1024 - 7
    _run_case(lens, GPU_NUM_HEADS, GPU_NUM_KV_HEADS, GPU_HEAD_DIM, page_size, 64, 4, 8192, GPU_RETRIEVAL,
              dtype=torch.bfloat16, num_splits=num_splits, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET, reason="realistic sizes need the compiled kernel (unset TRITON_INTERPRET)")
@pytest.mark.parametrize("kv_dtype", [bf16, u8])
def test_gpu_scattered_realistic(seed, kv_dtype):
    """8 KV heads over 3 full units (P16) and 2 window units (P32), 16K tokens, bf16 and fp8."""
    lens = [16 * 1024 - 3, 9000, 1]
    head_kind = [0, 1, 0, 1, 1, 0, 1, 1]   # KV heads of GPU_RETRIEVAL (0, 2, 4, 6, 7) ... made full below
    for h in {r // 4 for r in GPU_RETRIEVAL}:
        head_kind[h] = 0
    _run_scattered(lens, GPU_NUM_HEADS, head_kind, GPU_HEAD_DIM, [KindSpec(16, 3, 3), KindSpec(32, 2, 3)],
                   GPU_RETRIEVAL, 4, 2048, kv_dtype, bf16, num_splits=32, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET, reason="needs the compiled kernel (unset TRITON_INTERPRET)")
def test_gpu_int64_page_offsets(seed):
    """Pages whose element offset exceeds 2**31 (P=16, HKV=8, 2D=256: page 65536 and beyond)."""
    _run_case([3000, 700], GPU_NUM_HEADS, GPU_NUM_KV_HEADS, GPU_HEAD_DIM, 16, 64, 4, 1024, GPU_RETRIEVAL,
              device="cuda", min_page=70_000)


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET, reason="needs the compiled kernel (unset TRITON_INTERPRET)")
@pytest.mark.parametrize("kv_dtype", [bf16, u8])
@pytest.mark.parametrize("side_stream, pdl, local_programs",
                         [(False, 0, 0), (True, 0, 0), (True, 1, 0), (True, 0, 32)],
                         ids=["one-stream", "side-stream", "side-stream-pdl",
                              "side-stream-local-bound"])
def test_gpu_cuda_graph_replay(seed, kv_dtype, side_stream, pdl, local_programs, monkeypatch):
    """Capture once, then change q, seq_lens, block tables, selections and cache contents and replay.
    With ``side_stream`` the captured call forks the KV-group units onto a side stream while a select
    step (a copy of the staged selection) and the retrieval units run on the capture stream, the side
    stream's launch after the select step, with fewer splits than the retrieval units' when
    ``local_programs`` bounds them; with ``pdl`` the kernels launch with programmatic dependent launch
    (the combine after both branches)."""
    monkeypatch.setitem(launch.CONFIG, "pdl", pdl)
    monkeypatch.setitem(_kernel_module.CONFIG, "local_programs_per_sm", local_programs)
    monkeypatch.setattr(_kernel_module, "sm_count", lambda device: 1)        # local_programs bounds the launch
    batch, hq, hkv, d, bs, sink, window = 8, GPU_NUM_HEADS, GPU_NUM_KV_HEADS, GPU_HEAD_DIM, 64, 4, 2048
    max_len = 20_000
    head_kind = [0 if h in {r // 4 for r in GPU_RETRIEVAL} else 1 for h in range(hkv)]
    kinds = [KindSpec(16, 2, 4), KindSpec(32, 2, 4)]
    k_scale, v_scale = _scales(kv_dtype, "cuda")
    # Spare pages: a window of unaligned start spans one page more than the persistent layout's.
    lay, _ = PL.paged_kv([max_len] * batch, head_kind, d, kv_dtype, kinds, "cuda",
                         [None, PL.kept_window([max_len] * batch, sink, window)], k_scale, v_scale,
                         spare_pages=4 * batch)
    kv, tables = lay.paged, lay.tables
    max_blocks = math.ceil(max_len / bs)
    q = torch.randn(batch, hq, d, dtype=torch.bfloat16, device="cuda")
    seq_lens = torch.full((batch,), 100, dtype=torch.int32, device="cuda")
    ret = torch.tensor(GPU_RETRIEVAL, dtype=torch.int32, device="cuda")
    selected = torch.full((batch, len(GPU_RETRIEVAL), max_blocks), -1, dtype=torch.int32, device="cuda")
    num_selected = torch.zeros(batch, len(GPU_RETRIEVAL), dtype=torch.int32, device="cuda")
    ws = allocate_sparse_decode_workspace(batch, hq, d, device="cuda")
    out = torch.empty_like(q)
    lse = torch.empty(batch, hq, device="cuda")

    staged = (selected.clone(), num_selected.clone())
    stream = torch.cuda.Stream() if side_stream else None

    def select():
        selected.copy_(staged[0])
        num_selected.copy_(staged[1])

    def call():
        headwise_sparse_decode(q, kv, tables, seq_lens, ret, selected, num_selected, bs, sink, window, d ** -0.5, ws,
                               out, lse, k_scale=k_scale, v_scale=v_scale, select=select if side_stream else None,
                               side_stream=stream)

    graph = capture(call)
    for lens in ([1, 64, 65, 2047, 2048, 2049, 19_999, 20_000], [max_len - i * 999 for i in range(batch)]):
        fresh, _ = PL.paged_kv(lens, head_kind, d, kv_dtype, kinds, "cuda",
                               [None, PL.kept_window(lens, sink, window)], k_scale, v_scale)
        PL.copy_into(lay, fresh)
        q.copy_(torch.randn_like(q))
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        sel, nsel, _ = _selection(lens, len(GPU_RETRIEVAL), bs, sink, max_blocks)
        (staged[0] if side_stream else selected).copy_(sel)
        (staged[1] if side_stream else num_selected).copy_(nsel)
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _check(q, kv, tables, lens, GPU_RETRIEVAL, selected, num_selected, bs, sink, window, out, lse, 0, k_scale,
               v_scale)
