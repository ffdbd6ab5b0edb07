"""sparse_prefill (Triton) against paged_sparse_prefill_ref on PagedHeads layouts.

Batches mix fresh sequences and chunked prefills (a chunk after cached tokens, starting inside a
selection block and inside a query tile), lengths that are multiples of nothing, GQA (HQ / HKV = 4) with 1-3 retrieval heads
of different KV heads (and two sharing one), K/V and index keys scattered over two unit tensors each
with spare slots and garbage (NaN, random fp8 bytes) everywhere no token lives. Checked per case: the
kept block sets equal the reference's exactly (masses made tie-free by a per-block random strength; a
cut the float error could flip is checked against the top-p contract instead, and rarely happens),
the output and LSE of the retrieval heads, and every other entry of ``out`` / ``lse`` left NaN.
``top_p = 1`` equals dense causal attention (:func:`rtpurbo_vllm.reference.rtpurbo_prefill_ref`);
exact ties go to the lower block ids. Small cases run on the CPU under ``TRITON_INTERPRET=1``;
realistic sizes are marked ``gpu``.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import importlib  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from rtpurbo_vllm.reference import rtpurbo_prefill_ref  # noqa: E402
from rtpurbo_vllm.triton_kernels.paged_heads import PageTable, gather, to_float  # noqa: E402
from rtpurbo_vllm.triton_kernels.sparse_prefill import kernel as _kernel_module  # noqa: E402
from rtpurbo_vllm.triton_kernels import topp_search as _topp_module  # noqa: E402
from rtpurbo_vllm.triton_kernels.sparse_prefill import (chunk_tiles, paged_sparse_prefill_ref,  # noqa: E402
                                                        plan_sparse_prefill, sparse_prefill_visible_ref,
                                                        tile_block_mass_ref, tile_forced_blocks)
from rtpurbo_vllm.triton_kernels.sparse_prefill.plan import TILE_INDEX, TILE_SEQ  # noqa: E402


import rtpurbo_paged_layouts as PL  # noqa: E402  (registered by tests/conftest.py)
KindSpec = PL.KindSpec

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRET and type(_kernel_module._attend_kernel).__name__ != "InterpretedFunction":
    # Something imported the kernels before TRITON_INTERPRET was set: define them again for the interpreter
    # (the device functions of topp_search first, which the kernel module imports by name).
    importlib.reload(_topp_module)
    importlib.reload(_kernel_module)
from rtpurbo_vllm.triton_kernels.sparse_prefill import make_sparse_prefill_workspace  # noqa: E402
sparse_prefill = _kernel_module.sparse_prefill
DEVICE = "cpu" if INTERPRET else "cuda"
# The interpreter converts size-1 arrays to Python ints (NumPy >= 1.25 warns, once per loop bound).
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
DI = 16
u8, f8, bf16, fp16 = torch.uint8, torch.float8_e4m3fn, torch.bfloat16, torch.float16
# (cached tokens, chunk rows) per sequence: fresh ones, chunks after history starting mid-block, a
# one-row chunk, a short chunk after a long history.
SEQS = [(0, 37), (75, 50), (130, 1), (0, 100), (203, 67), (460, 21)]
BORDER = 1e-4   # a top-p cut closer than this (kept mass vs top_p, or masses either side) may flip


# ----------------------------------------------------------------------------------------------------
# Inputs.


def _index_keys(seq_len, num_ret, block_size):
    """``[L, HR, DI]`` float32 index keys: Gaussian keys scaled per block by a random strength, so block
    masses spread out and never tie."""
    strength = 0.3 + 1.2 * torch.rand(math.ceil(seq_len / block_size), num_ret, 1)
    return torch.randn(seq_len, num_ret, DI) * strength.repeat_interleave(block_size, 0)[:seq_len]


def _problem(seqs, hq, hkv, head_dim, heads, page_size, index_page_size, block_size, kv_dtype=bf16, q_dtype=bf16,
             k_scale=None, v_scale=None, index_dtype=bf16, q_idx_dtype=torch.float32):
    """Everything one call needs, with K/V over two units of kind 0 and the index keys over two units
    (``index_dtype`` u8: fp8 bytes, stored unscaled)."""
    seq_lens = [c + n for c, n in seqs]
    num_ret = len(heads)
    lay, stored = PL.paged_kv(seq_lens, [0] * hkv, head_dim, kv_dtype, [KindSpec(page_size, 2, hkv)], DEVICE,
                              k_scale=k_scale, v_scale=v_scale)
    index = PL.build(seq_lens, [0] * num_ret, DI, index_dtype, [KindSpec(index_page_size, 2, num_ret)], DEVICE)
    for b, n in enumerate(seq_lens):
        keys = PL.store_values(_index_keys(n, num_ret, block_size), index_dtype, 1.0)
        for r in range(num_ret):
            index.fill(b, r, keys[:, r].to(DEVICE))
    num_tokens = sum(n for _, n in seqs)
    return dict(
        q=torch.randn(num_tokens, hq, head_dim, dtype=q_dtype, device=DEVICE),
        kv=lay.paged, kv_tables=lay.tables, index=index.paged, index_table=index.tables[0],
        q_idx=torch.randn(num_tokens, num_ret, DI, device=DEVICE).to(q_idx_dtype),
        cu_seqlens_q=torch.tensor([0] + [n for _, n in seqs], dtype=torch.int32).cumsum(0).int().to(DEVICE),
        seqused_k=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        heads=torch.tensor(heads, dtype=torch.int32, device=DEVICE),
        k_scale=k_scale, v_scale=v_scale, stored=stored)


def _run(p, top_p, sink_tokens, block_size, tile_q, dense_threshold=0, lse_layout="rows", wave_tiles=64):
    """Calls the kernel on NaN-filled ``out``/``lse`` (``lse_layout`` "heads": a ``[HQ, T]`` buffer
    passed transposed, as FA3 returns its LSE); returns (out, lse [T, HQ], kept, num_kept, plan)."""
    seqs_q = p["cu_seqlens_q"].diff().tolist()
    plan = plan_sparse_prefill(seqs_q, p["seqused_k"].tolist(), wave_tiles, tile_q, DEVICE)
    ws = make_sparse_prefill_workspace(wave_tiles + 3, len(p["heads"]) + 1, int(p["seqused_k"].max()) + 70,
                                       block_size, tile_q, DEVICE)
    for t in (ws.block_max, ws.block_sum):
        t.fill_(float("nan"))
    ws.kept.fill_(-7)
    ws.num_kept.fill_(-7)
    out = torch.full_like(p["q"], float("nan"))
    num_tokens, hq = p["q"].shape[:2]
    lse_buf = torch.full((num_tokens, hq) if lse_layout == "rows" else (hq, num_tokens), float("nan"), device=DEVICE)
    lse = lse_buf if lse_layout == "rows" else lse_buf.t()
    result = sparse_prefill(p["q"], p["kv"], p["kv_tables"], p["index"], p["index_table"], p["q_idx"],
                            p["cu_seqlens_q"], p["seqused_k"], p["heads"], plan, top_p, sink_tokens,
                            block_size, p["q"].shape[2] ** -0.5, ws, out, lse, dense_threshold=dense_threshold,
                            k_scale=p["k_scale"], v_scale=p["v_scale"])
    assert result[0] is out
    return out, lse, result[1], result[2], plan


def _reference(p, top_p, sink_tokens, block_size, tile_q, dense_threshold=0):
    return paged_sparse_prefill_ref(p["q"], p["kv"], p["kv_tables"], p["index"], p["index_table"], p["q_idx"],
                                    p["cu_seqlens_q"], p["seqused_k"], p["heads"], top_p, sink_tokens, block_size,
                                    p["q"].shape[2] ** -0.5, tile_q, dense_threshold, p["k_scale"], p["v_scale"])


# ----------------------------------------------------------------------------------------------------
# Checks.


def _cut_is_borderline(mass, forced, keep, top_p):
    """Whether float error could change the reference's greedy cut ``keep`` of one tile (``mass`` ``[NB]``
    float64): the kept mass, or the kept mass without its lightest optional block, within BORDER of
    top_p, or the lightest kept and the heaviest dropped optional blocks within BORDER (relative)."""
    optional, dropped = keep & ~forced, ~keep & ~forced
    kept_mass = float(mass[keep].sum())
    if abs(kept_mass - top_p) < BORDER:
        return True
    if optional.any():
        lightest = float(mass[optional].min())
        if abs(kept_mass - lightest - top_p) < BORDER:
            return True
        if dropped.any() and lightest - float(mass[dropped].max()) < BORDER * lightest:
            return True
    return False


def _check_contract(keep, mass, forced, top_p, where):
    """A top-p set of one tile: forced blocks kept, mass reached, minimal, greedy by mass."""
    assert keep[forced].all(), f"{where}: forced blocks dropped"
    kept_mass = float(mass[keep].sum())
    assert kept_mass >= top_p - 1e-5, f"{where}: kept mass {kept_mass} < top_p {top_p}"
    optional, dropped = keep & ~forced, ~keep & ~forced
    if optional.any():
        lightest = float(mass[optional].min())
        assert kept_mass - lightest < top_p + 1e-5, f"{where}: not minimal"
        if dropped.any():
            assert float(mass[dropped].max()) <= lightest * (1 + BORDER), f"{where}: not greedy"


def _check_selection(p, kept, num_kept, plan, ref_keep, top_p, sink_tokens, block_size, tile_q, dense_threshold=0):
    """Kernel kept lists (the plan's only wave) against the reference masks: exact where the cut is
    clear-cut, else :func:`_check_contract`. Returns how many tiles were compared exactly."""
    assert len(plan.waves) == 1, "compare the selection of single-wave plans"
    kept, num_kept = kept.cpu(), num_kept.cpu()
    tile_seqs, tile_indices = plan.tiles[0, TILE_SEQ].tolist(), plan.tiles[0, TILE_INDEX].tolist()
    cu = p["cu_seqlens_q"].tolist()
    expected = [(b, i) for b in range(len(cu) - 1)
                for i in range(len(chunk_tiles(cu[b + 1] - cu[b], int(p["seqused_k"][b]), tile_q)))]
    assert list(zip(tile_seqs, tile_indices))[:plan.waves[0].num_tiles] == expected
    exact = 0
    for t, (b, i) in enumerate(expected):
        seqlen_k = int(p["seqused_k"][b])
        tile = chunk_tiles(cu[b + 1] - cu[b], seqlen_k, tile_q)[i]
        k_idx = torch.stack([_index_keys_of(p, b, r, seqlen_k) for r in range(len(p["heads"]))], 1)
        rows = p["q_idx"][cu[b] + tile.row0:cu[b] + tile.row1].cpu()
        mass = tile_block_mass_ref(rows, k_idx[:tile.last_pos + 1], block_size).double()
        forced = tile_forced_blocks(tile, block_size, sink_tokens)
        for r in range(len(p["heads"])):
            where = f"seq {b} tile {i} head {r}"
            n = int(num_kept[t, r])
            ids = kept[t, r, :n]
            assert n >= int(forced.sum()) and (ids[1:] > ids[:-1]).all(), f"{where}: {ids.tolist()}"
            keep = torch.zeros(ref_keep[b].shape[2], dtype=torch.bool)
            keep[ids.long()] = True
            ref = ref_keep[b][r, i]
            if top_p >= 1 or seqlen_k < dense_threshold:
                assert keep[:mass.shape[1]].all() and not keep[mass.shape[1]:].any(), where
                exact += 1
                continue
            ref_nb = ref[:mass.shape[1]]
            if not _cut_is_borderline(mass[r], forced, ref_nb, top_p):
                assert torch.equal(keep, ref), \
                    f"{where}: kernel {ids.tolist()} != reference {ref.nonzero().flatten().tolist()}"
                exact += 1
                continue
            assert not keep[mass.shape[1]:].any(), f"{where}: blocks past the tile kept"
            _check_contract(keep[:mass.shape[1]], mass[r], forced, top_p, where)
    return exact


def _index_keys_of(p, b, r, seqlen_k):
    """``[L, DI]`` float32: retrieval head ``r``'s stored index keys of sequence ``b``."""
    return to_float(gather(p["index"], [p["index_table"]], b, r, torch.arange(seqlen_k))).cpu()


def _check_attention(p, out, lse, ref_out, ref_lse, atol=2e-2, rtol=2e-2):
    """Retrieval heads' rows against the reference; every other entry of ``out`` and ``lse`` still NaN."""
    heads = p["heads"].long()
    rows = int(p["cu_seqlens_q"][-1])
    got = out[:rows, heads].float()
    assert not got.isnan().any(), "unwritten output rows"
    torch.testing.assert_close(got, ref_out[:rows], atol=atol, rtol=rtol)
    rel = (got - ref_out[:rows]).norm() / ref_out[:rows].norm()
    assert rel < 1e-2, f"relative error {rel:.2e}"
    torch.testing.assert_close(lse[:rows, heads], ref_lse[:rows], atol=2e-3, rtol=2e-3)
    others = torch.ones(out.shape[1], dtype=torch.bool)
    others[heads.cpu()] = False
    assert out[:, others.to(out.device)].isnan().all(), "wrote rows of non-retrieval heads"
    assert lse[:, others.to(out.device)].isnan().all(), "wrote LSEs of non-retrieval heads"
    assert out[rows:].isnan().all() and lse[rows:].isnan().all(), "wrote rows past cu_seqlens_q[-1]"


# ----------------------------------------------------------------------------------------------------
# Kernel vs reference.

# (id, HQ, HKV, D, retrieval heads, P, index P, BS, TILE_Q, sink, top_p, dense_threshold, KV dtype, q dtype, LSE)
CASES = [
    ("HR3-P16-BS16-T16-sink4-p0.9", 12, 3, 64, [2, 5, 11], 16, 16, 16, 16, 4, 0.9, 0, bf16, bf16, "rows"),
    ("HR2-P48-BS32-T32-sink0-p0.7-fp16", 8, 2, 64, [1, 6], 48, 16, 32, 32, 0, 0.7, 0, fp16, fp16, "heads"),
    ("HR1-P16-BS64-T16-sink70-p0.8-D128", 4, 1, 128, [3], 16, 48, 64, 16, 70, 0.8, 0, bf16, bf16, "rows"),
    ("HR2-sameKV-P48-BS16-T32-sink4-p0.5-dense100", 8, 2, 64, [4, 6], 48, 48, 16, 32, 4, 0.5, 100, bf16, bf16,
     "heads"),
]


@pytest.mark.parametrize("case", [pytest.param(c[1:], id=c[0]) for c in CASES])
def test_matches_reference(seed, case):
    hq, hkv, d, heads, page, index_page, bs, tile_q, sink, top_p, dense, kv_dtype, q_dtype, lse_layout = case
    p = _problem(SEQS, hq, hkv, d, heads, page, index_page, bs, kv_dtype, q_dtype)
    out, lse, kept, num_kept, plan = _run(p, top_p, sink, bs, tile_q, dense, lse_layout)
    ref_out, ref_lse, ref_keep = _reference(p, top_p, sink, bs, tile_q, dense)
    exact = _check_selection(p, kept, num_kept, plan, ref_keep, top_p, sink, bs, tile_q, dense)
    tiles = sum(len(chunk_tiles(n, c + n, tile_q)) for c, n in SEQS) * len(heads)
    assert exact >= 0.9 * tiles, f"only {exact} of {tiles} tiles compared exactly"
    _check_attention(p, out, lse, ref_out, ref_lse)
    tiles = [t for c, n in SEQS for t in chunk_tiles(n, c + n, tile_q)]
    shares = [float(num_kept[i, r]) / math.ceil((t.last_pos + 1) / bs) for i, t in enumerate(tiles)
              for r in range(len(heads))]
    assert min(shares) < 1.0, "nothing was dropped: the case does not test sparsity"


@pytest.mark.parametrize("config", [
    pytest.param(dict(blocks_per_prog=2, score_sub=16, select_chunk=4, kv_tile=16, stages=2, search_bits=4,
                      score_warps=2), id="sub16-chunk4-kvtile16-bits4-warps2"),
    pytest.param(dict(kv_tile=128, select_chunk=8, search_bits=2, score_warps=4), id="kvtile128-chunk8-bits2-warps4"),
])
def test_launch_configs(seed, monkeypatch, config):
    """Other launch knobs give the same result: several score programs per tile of 2 or 4 warps, blocks
    scored in sub-chunks (online merge), rows longer than the selection's register chunk (re-read from the
    workspace), KV tiles smaller than a block and KV tiles spanning several blocks, and a k-ary
    threshold search of 4 and 2 bits per step."""
    monkeypatch.setattr(_kernel_module, "CONFIG", {**_kernel_module.CONFIG, **config})
    seqs = [(40, 290), (75, 50), (203, 67)]          # 19 tiles of 16 rows, up to 11 blocks of 32 keys
    p = _problem(seqs, 8, 2, 64, [1, 6], 16, 48, 32)
    out, lse, kept, num_kept, plan = _run(p, 0.8, 4, 32, 16)
    ref_out, ref_lse, ref_keep = _reference(p, 0.8, 4, 32, 16)
    _check_selection(p, kept, num_kept, plan, ref_keep, 0.8, 4, 32, 16)
    _check_attention(p, out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("tile_q, block_size", [(16, 32), (64, 16)])
def test_top_p_one_is_dense_causal(seed, tile_q, block_size):
    """top_p = 1 keeps every block: dense causal attention, against the layer reference on the logical K/V."""
    hq, hkv, d, heads = 8, 2, 64, [0, 7]
    p = _problem(SEQS, hq, hkv, d, heads, 16, 16, block_size)
    out, lse, kept, num_kept, plan = _run(p, 1.0, 4, block_size, tile_q)
    k = torch.cat([s[0] for s in p["stored"]]).to(DEVICE)
    v = torch.cat([s[1] for s in p["stored"]]).to(DEVICE)
    cu_k = torch.tensor([0] + p["seqused_k"].tolist()).cumsum(0).int()
    dense = rtpurbo_prefill_ref(p["q"], k, v, p["cu_seqlens_q"].cpu(), cu_k, heads, 4, 8, 0, d ** -0.5)
    torch.testing.assert_close(out[:, heads].float(), dense[:, heads], atol=2e-2, rtol=2e-2)
    ref_out, ref_lse, ref_keep = _reference(p, 1.0, 4, block_size, tile_q)
    _check_attention(p, out, lse, ref_out, ref_lse)
    _check_selection(p, kept, num_kept, plan, ref_keep, 1.0, 4, block_size, tile_q)


@pytest.mark.parametrize("kv_dtype", [u8, f8])
def test_fp8_units(seed, kv_dtype):
    """fp8 K/V (uint8 bytes or float8_e4m3fn) with per-layer scales: the kernel matches the reference
    that dequantises ``fp8 * scale``."""
    k_scale, v_scale = torch.tensor([0.02], device=DEVICE), torch.tensor([0.011], device=DEVICE)
    p = _problem(SEQS[1:4], 8, 2, 64, [2, 5], 16, 48, 32, kv_dtype, bf16, k_scale, v_scale)
    out, lse, kept, num_kept, plan = _run(p, 0.8, 4, 32, 32)
    ref_out, ref_lse, ref_keep = _reference(p, 0.8, 4, 32, 32)
    _check_selection(p, kept, num_kept, plan, ref_keep, 0.8, 4, 32, 32)
    _check_attention(p, out, lse, ref_out, ref_lse)
    assert all(to_float(k, k_scale).abs().max() <= 448 * 0.02 + 1e-6 for k, _ in p["stored"])


@pytest.mark.parametrize("q_idx_dtype, index_dtype", [(torch.float32, u8), (bf16, bf16), (bf16, u8), (fp16, bf16)],
                         ids=["f32-fp8", "bf16-bf16", "bf16-fp8", "fp16-bf16"])
def test_index_dtypes(seed, q_idx_dtype, index_dtype):
    """Index queries in the model dtype and index keys in fp8 units (as ``write_index_keys`` stores them
    with an fp8 KV cache) or 16-bit: scored in the queries' 16-bit dtype where the keys share it or are fp8,
    else in float32; the tiles select what the reference selects on the stored values, and attend the same."""
    p = _problem(SEQS[1:4], 8, 2, 64, [2, 5], 16, 48, 32, index_dtype=index_dtype, q_idx_dtype=q_idx_dtype)
    out, lse, kept, num_kept, plan = _run(p, 0.8, 4, 32, 32)
    ref_out, ref_lse, ref_keep = _reference(p, 0.8, 4, 32, 32)
    _check_selection(p, kept, num_kept, plan, ref_keep, 0.8, 4, 32, 32)
    _check_attention(p, out, lse, ref_out, ref_lse)


def test_several_waves(seed):
    """A batch of more tiles than the workspace holds runs in waves (23 tiles of up to 16 rows in waves
    of at most 16, a sequence's tiles split between two): the output equals the reference."""
    p = _problem(SEQS, 8, 2, 64, [1, 6], 16, 48, 32)
    out, lse, kept, num_kept, plan = _run(p, 0.8, 4, 32, 16, wave_tiles=16)
    assert [w.num_tiles for w in plan.waves] == [16, 7]
    ref_out, ref_lse, _ = _reference(p, 0.8, 4, 32, 16)
    _check_attention(p, out, lse, ref_out, ref_lse)


def test_exact_ties_go_to_lower_block_ids(seed):
    """Zero index queries give every key the same score: full blocks tie exactly, and the greedy fill
    takes them in id order. Sequence: 200 cached + 64 new rows, BS 32, tiles of 32 rows, no sinks."""
    p = _problem([(200, 64)], 4, 1, 64, [1], 16, 16, 32)
    p["q_idx"].zero_()
    out, lse, kept, num_kept, plan = _run(p, 0.5, 0, 32, 32)
    # Tiles cut at multiples of 32. Tile 0: rows at 200..223, 224 keys (blocks 0-6 of 32 keys); the
    # diagonal blocks 5-6 (from position 169) hold 64/224, and each other block 32/224: two more reach
    # 128/224 >= 0.5. Tile 1: rows at 224..255, 256 keys; diagonal blocks 6-7 hold 64/256; two more reach
    # 128/256. Tile 2: rows at 256..263, 264 keys (block 8 of 8); diagonal blocks 7-8 hold 40/264; three
    # more reach 136/264.
    expected = [[0, 1, 5, 6], [0, 1, 6, 7], [0, 1, 2, 7, 8]]
    assert [kept[i, 0, :int(num_kept[i, 0])].tolist() for i in range(3)] == expected
    ref_out, ref_lse, ref_keep = _reference(p, 0.5, 0, 32, 32)
    assert [ref_keep[0][0, i].nonzero().flatten().tolist() for i in range(3)] == expected
    _check_attention(p, out, lse, ref_out, ref_lse)


def test_empty_batch_and_no_rows(seed):
    """B = 0 launches nothing; a sequence with no new rows has no tile and writes nothing."""
    p = _problem([(40, 0), (10, 20)], 4, 1, 64, [2], 16, 16, 16)
    out, lse, kept, num_kept, plan = _run(p, 0.9, 4, 16, 16)
    assert plan.tiles[0, TILE_SEQ, :2].tolist() == [1, 1] and (num_kept[:2] > 0).all()
    ref_out, ref_lse, _ = _reference(p, 0.9, 4, 16, 16)
    _check_attention(p, out, lse, ref_out, ref_lse)
    empty = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    ws = make_sparse_prefill_workspace(16, 1, 64, 16, 16, DEVICE)
    q = p["q"][:0]
    result = sparse_prefill(q, p["kv"], [PageTable(p["kv_tables"][0].block_table[:0], *_geometry(p["kv_tables"][0]))],
                            p["index"], PageTable(p["index_table"].block_table[:0], *_geometry(p["index_table"])),
                            p["q_idx"][:0], empty, empty[:0], p["heads"], plan_sparse_prefill([], [], 16, 16, DEVICE),
                            0.9, 4, 16, 0.125, ws, torch.empty_like(q))
    assert result[1].shape == (0, 1, 4) and result[2].shape == (0, 1)


def test_tiles_follow_positions_not_chunk_boundaries(seed):
    """The same sequence prefilled whole and in chunks cut anywhere (a prefix-cache hit ending inside a
    tile, chunks of any length): every tile no chunk boundary cuts keeps the same blocks."""
    seq_len, tile_q, block_size, top_p = 300, 32, 16, 0.7
    q_idx, k_idx = torch.randn(seq_len, 2, DI), torch.randn(seq_len, 2, DI)
    whole, _ = sparse_prefill_visible_ref(q_idx, k_idx, top_p, 4, block_size, tile_q)
    compared = 0
    for cuts in ([0, 45, 150, 300], [0, 208, 211, 300]):
        for c0, c1 in zip(cuts[:-1], cuts[1:]):
            keep, _ = sparse_prefill_visible_ref(q_idx[c0:c1], k_idx[:c1], top_p, 4, block_size, tile_q)
            for i, tile in enumerate(chunk_tiles(c1 - c0, c1, tile_q)):
                j = tile.first_pos // tile_q
                assert tile.last_pos // tile_q == j, f"tile {i} of chunk [{c0}, {c1}) spans two aligned runs"
                if tile.first_pos == j * tile_q and tile.last_pos == min((j + 1) * tile_q, seq_len) - 1:
                    assert torch.equal(keep[:, i], whole[:, j, :keep.shape[2]]), f"chunk [{c0}, {c1}) tile {i}"
                    compared += 1
    assert compared == 17
    seen = [math.ceil(min((j + 1) * tile_q, seq_len) / block_size) for j in range(whole.shape[1])]
    assert any(int(whole[r, j].sum()) < n for r in range(2) for j, n in enumerate(seen)), \
        "nothing was dropped: the case does not test the selection"


def _geometry(table):
    return table.page_size, table.page_stride, table.token_stride


def test_bad_arguments(seed):
    p = _problem([(10, 20)], 4, 1, 64, [2], 16, 16, 16)
    ws = make_sparse_prefill_workspace(16, 1, 30, 16, 16, DEVICE)
    out = torch.empty_like(p["q"])
    plan = plan_sparse_prefill([20], [30], 16, 16, DEVICE)
    args = [p["q"], p["kv"], p["kv_tables"], p["index"], p["index_table"], p["q_idx"], p["cu_seqlens_q"],
            p["seqused_k"], p["heads"], plan, 0.9, 4, 16, 0.125, ws, out]
    sparse_prefill(*args)   # valid as given
    small = make_sparse_prefill_workspace(16, 1, 16, 16, 16, DEVICE)           # too few blocks
    other_tiles = plan_sparse_prefill([20], [30], 16, 32, DEVICE)              # tiles of 32 rows
    wide = plan_sparse_prefill([20], [30], 32, 16, DEVICE)                     # waves wider than the workspace
    for i, bad in [(0, p["q"].float()), (2, []), (5, p["q_idx"][:, :, :8]), (6, p["cu_seqlens_q"].long()),
                   (7, p["seqused_k"][:0]), (8, p["heads"].long()), (9, other_tiles), (9, wide), (9, None),
                   (10, 0.0), (12, 48), (12, 8), (14, small), (15, out[:, :2]), (3, p["kv"])]:
        with pytest.raises(ValueError):
            sparse_prefill(*args[:i], bad, *args[i + 1:])
    with pytest.raises(ValueError, match="power of two"):
        make_sparse_prefill_workspace(16, 1, 30, 16, 24, DEVICE)
    with pytest.raises(ValueError, match="k_scale"):
        fp8 = _problem([(10, 20)], 4, 1, 64, [2], 16, 16, 16, u8, bf16, torch.tensor([0.1]), torch.tensor([0.1]))
        sparse_prefill(fp8["q"], fp8["kv"], fp8["kv_tables"], *args[3:])


# ----------------------------------------------------------------------------------------------------
# GPU: realistic sizes.


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET, reason="realistic sizes need the compiled kernel (unset TRITON_INTERPRET)")
@pytest.mark.parametrize("tile_q, kv_dtype", [(128, bf16), (64, bf16), (128, u8)])
def test_gpu_realistic(seed, tile_q, kv_dtype):
    """Chunks of 2-3K rows after up to 6K cached tokens, HQ 32 / HKV 8, D 128, 3 retrieval heads, index
    queries in bf16 as the backend computes them."""
    seqs = [(0, 3000), (6001, 2048), (777, 1)]
    scales = (torch.tensor([0.02], device=DEVICE), torch.tensor([0.011], device=DEVICE)) if kv_dtype == u8 \
        else (None, None)
    p = _problem(seqs, 32, 8, 128, [3, 17, 30], 16, 16, 64, kv_dtype, bf16, *scales, q_idx_dtype=bf16)
    out, lse, kept, num_kept, plan = _run(p, 0.9, 4, 64, tile_q, wave_tiles=128)
    ref_out, ref_lse, ref_keep = _reference(p, 0.9, 4, 64, tile_q)
    _check_selection(p, kept, num_kept, plan, ref_keep, 0.9, 4, 64, tile_q)
    _check_attention(p, out, lse, ref_out, ref_lse)
