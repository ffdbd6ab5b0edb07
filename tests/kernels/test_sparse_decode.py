"""headwise_sparse_decode (Triton) against sparse_decode_ref on the gathered contiguous K/V.

Small cases run on the CPU under ``TRITON_INTERPRET=1``; realistic sizes, int64 page offsets and
CUDA-graph capture/replay are marked ``gpu``.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import importlib  # noqa: E402

from rtpurbo_vllm.cuda_graphs import capture  # noqa: E402
from rtpurbo_vllm.triton_kernels.block_topp import expand_block_mask  # noqa: E402
from rtpurbo_vllm.triton_kernels.headwise_attention import attention_mask  # noqa: E402
from rtpurbo_vllm.triton_kernels.sparse_decode import kernel as _kernel_module  # noqa: E402
from rtpurbo_vllm.triton_kernels.sparse_decode import sparse_decode_ref  # noqa: E402

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


# ----------------------------------------------------------------------------------------------------
# Input builders.


def _paged_cache(seq_lens, page_size, num_kv_heads, head_dim, dtype, device, extra_pages=3, min_page=0):
    """Random K/V caches with shuffled, non-contiguous page ids; table rows padded with foreign pages."""
    pages_per_seq = [math.ceil(n / page_size) for n in seq_lens]
    max_pages = max(max(pages_per_seq), 1) + 1
    num_pages = min_page + sum(pages_per_seq) + extra_pages
    k_cache = torch.randn(num_pages, page_size, num_kv_heads, head_dim, dtype=dtype, device=device)
    v_cache = torch.randn(num_pages, page_size, num_kv_heads, head_dim, dtype=dtype, device=device)
    perm = (min_page + torch.randperm(num_pages - min_page)).tolist()
    block_table = torch.randint(min_page, num_pages, (len(seq_lens), max_pages), dtype=torch.int32)
    for b, n in enumerate(pages_per_seq):
        block_table[b, :n] = torch.tensor(perm[:n], dtype=torch.int32)
        perm = perm[n:]
    return k_cache, v_cache, block_table.to(device)


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


def _gather(cache, block_table_row, n, page_size):
    t = torch.arange(n, device=cache.device)
    return cache[block_table_row[t // page_size].long(), t % page_size]          # [n, HKV, D]


def _reference(q, k_cache, v_cache, block_table, seq_lens, retrieval_heads, keep_blocks, block_size,
               sink_tokens, window, scale):
    """float32 out [B, HQ, D] and lse [B, HQ] from sparse_decode_ref per sequence."""
    page_size = k_cache.shape[1]
    outs, lses = [], []
    for b, n in enumerate(seq_lens):
        k = _gather(k_cache, block_table[b], n, page_size)
        v = _gather(v_cache, block_table[b], n, page_size)
        keep = attention_mask(1, n, sink_tokens, window, q.device).expand(q.shape[1], n).clone()
        if len(retrieval_heads):
            keep[retrieval_heads] = expand_block_mask(keep_blocks[b].to(q.device), n, block_size)
        out, lse = sparse_decode_ref(q[b], k, v, keep, scale)
        outs.append(out)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def _run_case(seq_lens, num_heads, num_kv_heads, head_dim, page_size, block_size, sink_tokens, window,
              retrieval_heads, dtype=torch.bfloat16, num_splits=8, device=DEVICE, min_page=0,
              max_blocks=None, atol=2e-2, rtol=2e-2, workspace=None):
    q = torch.randn(len(seq_lens), num_heads, head_dim, dtype=dtype, device=device)
    k_cache, v_cache, block_table = _paged_cache(seq_lens, page_size, num_kv_heads, head_dim, dtype,
                                                 device, min_page=min_page)
    if max_blocks is None:
        max_blocks = max(math.ceil(max(seq_lens) / block_size), 1) + 1
    selected, num_selected, keep_blocks = _selection(seq_lens, len(retrieval_heads), block_size, sink_tokens,
                                                     max_blocks)
    ret = torch.tensor(retrieval_heads, dtype=torch.int32, device=device)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    scale = head_dim ** -0.5
    if workspace is None:
        # Slots to spare, so the batch gets exactly S = num_splits (a power of two) splits.
        workspace = allocate_sparse_decode_workspace(len(seq_lens) + 2, num_heads, head_dim,
                                                     splits_per_seq=num_splits, max_splits=num_splits, device=device)
        assert workspace.splits_for_batch(len(seq_lens)) == num_splits
    workspace.partial_out.fill_(float("nan"))
    workspace.partial_lse.fill_(float("nan"))
    out = torch.full_like(q, float("nan"))
    lse = torch.full((len(seq_lens), num_heads), float("nan"), device=device)
    headwise_sparse_decode(q, k_cache, v_cache, block_table, seq_lens_t, ret, selected.to(device),
                           num_selected.to(device), block_size, sink_tokens, window, scale, workspace, out, lse)
    ref_out, ref_lse = _reference(q, k_cache, v_cache, block_table, seq_lens, retrieval_heads, keep_blocks,
                                  block_size, sink_tokens, window, scale)
    assert not out.isnan().any(), "unwritten output entries"
    assert not lse.isnan().any(), "unwritten lse entries"
    torch.testing.assert_close(out.float(), ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-3)
    rel = (out.float() - ref_out).norm() / ref_out.norm().clamp_min(1e-30)
    assert rel < 1e-2, f"relative error {rel:.2e}"


# ----------------------------------------------------------------------------------------------------
# Interpreter / small-size cases.

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


@pytest.mark.parametrize("page_size, block_size", [pytest.param(128, 64, id="P128-BS64"),
                                                   pytest.param(16, 32, id="P16-BS32")])
def test_page_and_block_sizes(seed, page_size, block_size):
    _run_case([3, 130, 300], 8, 2, 64, page_size, block_size, 4, 70, [3, 4], num_splits=4)


def _split_layout(k_cache, v_cache, block_table, seq_lens, full_kv_heads, main_page, window_page, sink_tokens,
                  keep_from):
    """The split KV layout of a dense paged cache (what ``kv_cache.install_kv_layout`` gives the impl).

    Main cache: the ``full_kv_heads`` of every token, pages of ``main_page`` tokens. Window cache: the
    other KV heads, pages of ``window_page`` tokens, holding only tokens ``t < sink_tokens`` or
    ``t >= keep_from[b]``; pages with no such token are vLLM's null block 0, and every unheld slot
    (block 0 included) is NaN. Returns ``(kv_slots, main (k, v, table), window (k, v, table))``.
    """
    num_kv_heads, page_size = k_cache.shape[2], k_cache.shape[1]
    window_heads = [g for g in range(num_kv_heads) if g not in full_kv_heads]
    slots = [full_kv_heads.index(g) if g in full_kv_heads else -1 - window_heads.index(g)
             for g in range(num_kv_heads)]

    k_cache, v_cache, block_table, device = k_cache.cpu(), v_cache.cpu(), block_table.cpu(), k_cache.device

    def repage(heads, new_page, held):
        tables, pages = [], [torch.full((new_page, len(heads), 2, k_cache.shape[3]), float("nan"),
                                        dtype=k_cache.dtype)]
        for b, n in enumerate(seq_lens):
            t = torch.arange(n)
            k = k_cache[block_table[b, t // page_size].long().cpu(), t % page_size][:, heads]
            v = v_cache[block_table[b, t // page_size].long().cpu(), t % page_size][:, heads]
            row = []
            for p0 in range(0, max(n, 1), new_page):
                toks = torch.arange(p0, min(p0 + new_page, n))
                mask = held(b, toks)
                if not mask.any():
                    row.append(0)
                    continue
                page = torch.full_like(pages[0], float("nan"))
                page[toks[mask] - p0, :, 0] = k[toks[mask]]
                page[toks[mask] - p0, :, 1] = v[toks[mask]]
                row.append(len(pages))
                pages.append(page)
            tables.append(row)
        order = torch.randperm(len(pages) - 1) + 1        # shuffle the real pages, block 0 stays null
        cache = torch.stack(pages)[torch.cat([torch.zeros(1, dtype=torch.long), torch.argsort(order) + 1])]
        width = max(len(r) for r in tables) + 1
        table = torch.zeros(len(seq_lens), width, dtype=torch.int32)
        for b, row in enumerate(tables):
            table[b, :len(row)] = torch.tensor([0 if p == 0 else int(order[p - 1]) for p in row], dtype=torch.int32)
        cache = cache.to(device)
        return cache[..., 0, :], cache[..., 1, :], table.to(device)

    main = repage(list(full_kv_heads), main_page, lambda b, t: torch.ones_like(t, dtype=torch.bool))
    window = repage(window_heads, window_page, lambda b, t: (t < sink_tokens) | (t >= keep_from[b]))
    return torch.tensor(slots, dtype=torch.int32, device=device), main, window


# (id, HQ, HKV, full KV heads, main page, window page, sink, window, retrieval heads, dense_threshold)
SPLIT_CASES = [
    ("HKV4-full13-P48-Pw112", 8, 4, [1, 3], 48, 112, 4, 70, [2, 3, 7], 0),
    ("HKV4-full0-promoted-P16-Pw48", 8, 4, [0, 2], 16, 48, 4, 33, [1], 0),
    ("HKV2-full1-P112-Pw16-dense", 4, 2, [1], 112, 16, 4, 40, [2, 3], 100),
]


@pytest.mark.parametrize("case", [pytest.param(c[1:], id=c[0]) for c in SPLIT_CASES])
def test_split_kv_layout(seed, case):
    """Full KV heads from a main cache, window KV heads from a window cache whose out-of-window
    pages are NaN (block 0): the same result as the dense cache."""
    hq, hkv, full, main_page, window_page, sink, window, ret, dense = case
    seq_lens, head_dim, block_size, dtype = [1, 5, 63, 64, 65, 200, 515], 64, 64, torch.bfloat16
    q = torch.randn(len(seq_lens), hq, head_dim, dtype=dtype, device=DEVICE)
    k_cache, v_cache, block_table = _paged_cache(seq_lens, 16, hkv, head_dim, dtype, DEVICE)
    max_blocks = math.ceil(max(seq_lens) / block_size) + 1
    selected, num_selected, keep_blocks = _selection(seq_lens, len(ret), block_size, sink, max_blocks)
    if dense:   # what block top-p selects for a dense sequence: every block
        for b, n in enumerate(seq_lens):
            if n < dense:
                nb = math.ceil(n / block_size)
                keep_blocks[b][:] = True
                selected[b, :, :nb] = torch.arange(nb, dtype=torch.int32)
                num_selected[b] = nb
    keep_from = [0 if n < dense else n - window for n in seq_lens]
    kv_slots, (mk, mv, mt), window_cache = _split_layout(k_cache, v_cache, block_table, seq_lens, full,
                                                         main_page, window_page, sink, keep_from)
    workspace = allocate_sparse_decode_workspace(len(seq_lens), hq, head_dim, splits_per_seq=4, max_splits=4,
                                                 device=DEVICE)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((len(seq_lens), hq), float("nan"), device=DEVICE)
    headwise_sparse_decode(q, mk, mv, mt, torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
                           torch.tensor(ret, dtype=torch.int32, device=DEVICE), selected.to(DEVICE),
                           num_selected.to(DEVICE), block_size, sink, window, head_dim ** -0.5, workspace, out, lse,
                           dense_threshold=dense, kv_slots=kv_slots, window_cache=window_cache)
    want = [n if n < dense else window for n in seq_lens]
    ref_out, ref_lse = zip(*(_reference(q[b:b + 1], k_cache, v_cache, block_table[b:b + 1], [n], ret,
                                        [keep_blocks[b]], block_size, sink, w, head_dim ** -0.5)
                             for b, (n, w) in enumerate(zip(seq_lens, want))))
    torch.testing.assert_close(out.float(), torch.cat(ref_out), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, torch.cat(ref_lse), atol=1e-3, rtol=1e-3)


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
    k_cache, v_cache, block_table = _paged_cache([70, 1, 1], 16, hkv, d, torch.bfloat16, DEVICE)
    seq_lens = torch.tensor([70, 0, 0], dtype=torch.int32, device=DEVICE)
    ret = torch.tensor([1], dtype=torch.int32, device=DEVICE)
    selected = torch.tensor([[[0, 1]], [[0, -1]], [[-1, -1]]], dtype=torch.int32, device=DEVICE)
    num_selected = torch.tensor([[2], [1], [0]], dtype=torch.int32, device=DEVICE)
    ws = allocate_sparse_decode_workspace(b, hq, d, 4, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((b, hq), float("nan"), device=DEVICE)
    headwise_sparse_decode(q, k_cache, v_cache, block_table, seq_lens, ret, selected, num_selected, 64, 4, 16,
                           0.125, ws, out, lse)
    assert torch.equal(out[1:].float(), torch.zeros(2, hq, d, device=DEVICE))
    assert (lse[1:] == float("-inf")).all()
    assert not out[0].isnan().any() and torch.isfinite(lse[0]).all()


def test_strided_views(seed):
    """q/out as head slices of wider rows and caches as views of one [2, ...] kv_cache tensor."""
    seq_lens, hq, hkv, d, p = [40, 129], 4, 2, 64, 16
    kv = torch.randn(2, 30, p, hkv, d, dtype=torch.bfloat16, device=DEVICE)
    k_cache, v_cache = kv[0], kv[1]
    block_table = torch.randperm(30, dtype=torch.int32)[:20].view(2, 10).to(DEVICE)
    q_wide = torch.randn(2, hq + 2, d, dtype=torch.bfloat16, device=DEVICE)
    q = q_wide[:, 1:hq + 1]
    out_wide = torch.full((2, hq + 3, d), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    out = out_wide[:, 2:hq + 2]
    selected, num_selected, keep_blocks = _selection(seq_lens, 1, 64, 4, 4)
    ws = allocate_sparse_decode_workspace(2, hq, d, 4, device=DEVICE)
    headwise_sparse_decode(q, k_cache, v_cache, block_table, torch.tensor(seq_lens, dtype=torch.int32,
                           device=DEVICE), torch.tensor([2], dtype=torch.int32, device=DEVICE),
                           selected.to(DEVICE), num_selected.to(DEVICE), 64, 4, 50, 0.125, ws, out)
    ref, _ = _reference(q, k_cache, v_cache, block_table, seq_lens, [2], keep_blocks, 64, 4, 50, 0.125)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    assert out_wide[:, :2].isnan().all() and out_wide[:, hq + 2:].isnan().all(), "wrote outside the view"


def test_bad_arguments():
    q = torch.randn(2, 4, 64, dtype=torch.bfloat16, device=DEVICE)
    cache = torch.randn(8, 16, 2, 64, dtype=torch.bfloat16, device=DEVICE)
    bt = torch.zeros(2, 4, dtype=torch.int32, device=DEVICE)
    sl = torch.ones(2, dtype=torch.int32, device=DEVICE)
    ret = torch.tensor([1], dtype=torch.int32, device=DEVICE)
    sel = torch.zeros(2, 1, 4, dtype=torch.int32, device=DEVICE)
    nsel = torch.ones(2, 1, dtype=torch.int32, device=DEVICE)
    ws = allocate_sparse_decode_workspace(2, 4, 64, 4, device=DEVICE)
    out = torch.empty_like(q)
    args = [q, cache, cache, bt, sl, ret, sel, nsel, 64, 4, 16, 0.125, ws, out]
    headwise_sparse_decode(*args)   # valid as given
    for i, bad in [(0, q.float()), (3, bt.long()), (4, sl[:1]), (6, sel[:, :, None]), (7, nsel.long()),
                   (12, allocate_sparse_decode_workspace(1, 4, 64, 1, device=DEVICE)),  # 1 slot, 2 sequences
                   (12, allocate_sparse_decode_workspace(2, 8, 64, 4, device=DEVICE)), (13, out[:1]),
                   (1, torch.randn(8, 16, 3, 64, dtype=torch.bfloat16, device=DEVICE))]:
        with pytest.raises(ValueError):
            headwise_sparse_decode(*args[:i], bad, *args[i + 1:])


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
@pytest.mark.skipif(INTERPRET, reason="needs the compiled kernel (unset TRITON_INTERPRET)")
def test_gpu_int64_page_offsets(seed):
    """Pages whose element offset exceeds 2**31 (P=16, HKV=8, D=128: page 131072 and beyond)."""
    _run_case([3000, 700], GPU_NUM_HEADS, GPU_NUM_KV_HEADS, GPU_HEAD_DIM, 16, 64, 4, 1024, GPU_RETRIEVAL,
              device="cuda", min_page=140_000)


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET, reason="needs the compiled kernel (unset TRITON_INTERPRET)")
def test_gpu_cuda_graph_replay(seed):
    """Capture once, then change q, seq_lens, block tables, selections and cache contents and replay."""
    batch, hq, hkv, d, p, bs, sink, window = 8, GPU_NUM_HEADS, GPU_NUM_KV_HEADS, GPU_HEAD_DIM, 16, 64, 4, 2048
    max_len = 20_000
    max_blocks, max_pages = math.ceil(max_len / bs), math.ceil(max_len / p)
    num_pages = batch * max_pages + 8
    k_cache = torch.randn(num_pages, p, hkv, d, dtype=torch.bfloat16, device="cuda")
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(batch, hq, d, dtype=torch.bfloat16, device="cuda")
    block_table = torch.zeros(batch, max_pages, dtype=torch.int32, device="cuda")
    seq_lens = torch.zeros(batch, dtype=torch.int32, device="cuda")
    ret = torch.tensor(GPU_RETRIEVAL, dtype=torch.int32, device="cuda")
    selected = torch.full((batch, len(GPU_RETRIEVAL), max_blocks), -1, dtype=torch.int32, device="cuda")
    num_selected = torch.zeros(batch, len(GPU_RETRIEVAL), dtype=torch.int32, device="cuda")
    ws = allocate_sparse_decode_workspace(batch, hq, d, device="cuda")
    out = torch.empty_like(q)
    lse = torch.empty(batch, hq, device="cuda")

    def fill(lens):
        """New contents for every input buffer; returns the keep-block masks."""
        q.copy_(torch.randn_like(q))
        k_cache.copy_(torch.randn_like(k_cache))
        v_cache.copy_(torch.randn_like(v_cache))
        block_table.copy_(torch.randperm(num_pages, device="cuda")[:batch * max_pages].view(batch, max_pages))
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        sel, nsel, keep_blocks = _selection(lens, len(GPU_RETRIEVAL), bs, sink, max_blocks)
        selected.copy_(sel)
        num_selected.copy_(nsel)
        return keep_blocks

    def call():
        headwise_sparse_decode(q, k_cache, v_cache, block_table, seq_lens, ret, selected, num_selected, bs, sink,
                               window, d ** -0.5, ws, out, lse)

    fill([100] * batch)
    graph = capture(call)

    for lens in ([1, 64, 65, 2047, 2048, 2049, 19_999, 20_000], [max_len - i * 999 for i in range(batch)]):
        keep_blocks = fill(lens)
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref_out, ref_lse = _reference(q, k_cache, v_cache, block_table, lens, GPU_RETRIEVAL, keep_blocks, bs, sink,
                                      window, d ** -0.5)
        assert not out.isnan().any() and not lse.isnan().any()
        torch.testing.assert_close(out.float(), ref_out, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-3)
