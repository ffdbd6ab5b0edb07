"""block_topp (Triton) against block_topp_ref(index_scores_ref(...)) per sequence and retrieval head.

Small cases run on the CPU under ``TRITON_INTERPRET=1`` (the default set below, before Triton is
imported) and compiled on a GPU with ``TRITON_INTERPRET=0``; ``gpu`` cases (realistic lengths, a huge
page pool for int64 offsets, CUDA-graph capture/replay) need ``TRITON_INTERPRET=0``.

Float summation order differs between kernel and reference, so a selection is judged by
:func:`assert_selection_valid`: exact format, forced blocks kept, kept mass reaches ``top_p`` (within
``MASS_TOL``), minimal, greedy by mass, and equal to the reference's set whenever the reference's
decision is not borderline (:func:`reference_margin_is_comfortable`).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import importlib  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from rtpurbo_vllm.cuda_graphs import capture  # noqa: E402
from rtpurbo_vllm.triton_kernels import launch as launch_settings  # noqa: E402
from rtpurbo_vllm.triton_kernels.block_topp import (block_topp, block_topp_ref, index_scores_ref,  # noqa: E402
                                                    make_block_topp_workspace, paged_block_topp_ref,
                                                    paged_index_keys_ref)
from rtpurbo_vllm.triton_kernels.paged_heads import PagedHeads, to_float  # noqa: E402


import rtpurbo_paged_layouts as PL  # noqa: E402  (registered by tests/conftest.py)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
# The interpreter converts size-1 arrays to Python ints (NumPy >= 1.25 warns, once per loop bound).
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
runs_here = pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                               reason="needs TRITON_INTERPRET=1 or a CUDA GPU")
compiled_only = pytest.mark.skipif(INTERPRET, reason="needs the compiled kernel (TRITON_INTERPRET=0)")

MASS_TOL = 1e-5         # slack on "kept mass reaches top_p" and on minimality
COMFORT = 1e-4          # the reference's decision is clear-cut when its sums clear top_p by this much
GAP_RTOL = 1e-4         # ... and the block masses either side of its cut differ by this (relative)
POISON = -7             # outputs are prefilled with this; no entry may keep it

SMALL_LENS = [1, 63, 64, 65, 200, 515]
SEARCH_BITS = [1, 2, 4]  # bits per step of the selection's threshold search (1: binary search)


@pytest.fixture(params=SEARCH_BITS, ids=lambda bits: f"bits{bits}")
def search_bits(request, monkeypatch):
    """Runs the test with the selection's k-ary search at ``search_bits`` bits per step."""
    kernel = importlib.import_module("rtpurbo_vllm.triton_kernels.block_topp.kernel")
    monkeypatch.setattr(kernel, "CONFIG", {**kernel.CONFIG, "search_bits": request.param})
    return request.param


# ---------------------------------------------------------------------------------------------------
# Inputs


def make_keys(pattern, q, seq_len, block_size):
    """Index keys ``[T, HR, DI]`` float32 of one sequence, for query ``q`` ``[HR, DI]``.

    random: unit-ish Gaussian keys. peaked: faint background plus three hot blocks aligned with the
    query. flat: tiny keys, near-uniform mass. ties: keys repeat with period BS, so all full blocks
    have bit-identical masses.
    """
    hr, di = q.shape
    dev = q.device
    if pattern == "random":
        return torch.randn(seq_len, hr, di, device=dev) * 0.7
    if pattern == "flat":
        return torch.randn(seq_len, hr, di, device=dev) * 0.02
    if pattern == "ties":
        base = torch.randn(block_size, hr, di, device=dev)
        return base.repeat(math.ceil(seq_len / block_size), 1, 1)[:seq_len].contiguous()
    if pattern == "peaked":
        keys = torch.randn(seq_len, hr, di, device=dev) * 0.3
        num_blocks = math.ceil(seq_len / block_size)
        direction = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-6)                 # [HR, DI]
        for h in range(hr):
            for blk in torch.randperm(num_blocks)[:3].tolist():
                lo, hi = blk * block_size, min((blk + 1) * block_size, seq_len)
                amp = 2.0 + 2.0 * torch.rand(())
                keys[lo:hi, h] = direction[h] * amp + torch.randn(hi - lo, di, device=dev) * 0.1
        return keys
    raise ValueError(pattern)


def make_batch(seq_lens, hr, di, page_size, block_size, dtype, pattern, device, spare_pages=3,
               page_offset=0, num_units=None, keys=None, layout_out=None):
    """A paged decode batch: the HR heads' index keys scattered over ``num_units`` unit tensors (default
    3, or HR if fewer; 1 is the one-tensor layout) with spare slots, shuffled non-contiguous pages.

    Unused cache entries (spare pages and slots, the tail of each last page, the null page 0 that table
    entries past each sequence point at) hold NaN, so reading anything outside the sequences shows.
    ``page_offset`` shifts every used page id up (a large pool exercises int64 offsets). ``keys``: the
    keys to store instead of :func:`make_keys`'s; ``layout_out``: a list that receives the test Layout.

    ``dtype`` is the units' (uint8: fp8 bytes, keys stored unscaled as ``write_index_keys`` stores them;
    the queries then bf16).

    Returns:
        q_idx ``[B, HR, DI]``, index (PagedHeads), index_table (PageTable), seq_lens ``[B]`` int32,
        keys (list of ``[T, HR, DI]`` float32: the stored values).
    """
    num_units = num_units or min(3, hr)
    slots = hr if num_units == 1 else -(-hr // num_units) + 1
    lay = PL.build(seq_lens, [0] * hr, di, dtype, [PL.KindSpec(page_size, num_units, slots)], device,
                   spare_pages=spare_pages, min_page=page_offset)
    q_idx = torch.randn(len(seq_lens), hr, di, device=device)
    given, keys = keys, []
    for b, t in enumerate(seq_lens):
        k = PL.store_values(make_keys(pattern, q_idx[b], t, block_size) if given is None else given[b], dtype,
                            1.0).to(device)
        for r in range(hr):
            lay.fill(b, r, k[:, r])
        keys.append(to_float(k))
    if layout_out is not None:
        layout_out.append(lay)
    q_dtype = torch.bfloat16 if dtype in PL.FP8 else dtype
    return (q_idx.to(q_dtype), lay.paged, lay.tables[0], torch.tensor(seq_lens, dtype=torch.int32, device=device),
            keys)


def poisoned_outputs(batch, hr, max_blocks, device):
    return (torch.full((batch, hr, max_blocks), POISON, dtype=torch.int32, device=device),
            torch.full((batch, hr), POISON, dtype=torch.int32, device=device))


# ---------------------------------------------------------------------------------------------------
# Comparison


def true_block_mass(q, keys, block_size):
    """``[HR, NB]`` float64 block masses from float64 scores: the yardstick for both implementations."""
    probs = torch.softmax(torch.einsum("hi,thi->ht", q.double(), keys.double()), dim=-1)
    num_blocks = math.ceil(keys.shape[0] / block_size)
    probs = torch.nn.functional.pad(probs, (0, num_blocks * block_size - keys.shape[0]))
    return probs.view(q.shape[0], num_blocks, block_size).sum(-1)


def forced_blocks(num_blocks, sink_tokens, block_size):
    blocks = torch.arange(num_blocks)
    return (blocks < math.ceil(sink_tokens / block_size)) | (blocks == num_blocks - 1)


def reference_margin_is_comfortable(mass, ref_keep, forced, top_p):
    """Whether the reference's choice for one head is clear-cut under rounding.

    With the non-forced blocks in greedy order (mass descending, ties by id) and ``k`` of them kept, the
    decision is clear when: the k-th block was needed by more than ``COMFORT`` (``F + S_{k-1}`` below
    ``top_p - COMFORT``), stopping after it was right by more than ``COMFORT`` (``F + S_k`` above
    ``top_p + COMFORT``, when some block is left), and the masses either side of the cut differ by more
    than ``GAP_RTOL`` relative or are exactly equal (an exact tie is broken by id on both sides).

    Args:
        mass: ``[NB]`` float64 true block masses. ref_keep, forced: ``[NB]`` bool. top_p: float < 1.
    """
    candidates = (~forced).nonzero().flatten()
    order = candidates[torch.sort(mass[candidates], descending=True, stable=True).indices]
    sorted_mass = mass[order]
    k = int(ref_keep[order].sum())
    forced_mass = float(mass[forced].sum())
    taken = forced_mass + float(sorted_mass[:k].sum())
    if k > 0 and top_p - (taken - float(sorted_mass[k - 1])) <= COMFORT:
        return False
    if k == 0 and forced_mass - top_p <= COMFORT:
        return False
    if k < len(order):
        if taken - top_p <= COMFORT:
            return False
        if k > 0:
            last, first_left = float(sorted_mass[k - 1]), float(sorted_mass[k])
            if last != first_left and last - first_left <= GAP_RTOL * last:
                return False
    return True


def assert_selection_valid(selected, num_selected, mass, ref_keep, forced, top_p, where=""):
    """Checks one head's kernel output against the top-p contract and the reference.

    Args:
        selected: ``[max_blocks]`` int32 kernel ids. num_selected: int.
        mass: ``[NB]`` float64 true block masses. ref_keep, forced: ``[NB]`` bool.
    """
    num_blocks = mass.shape[0]
    assert 0 <= num_selected <= num_blocks, f"{where}: num_selected={num_selected} for {num_blocks} blocks"
    ids = selected[:num_selected]
    assert (selected[num_selected:] == -1).all(), f"{where}: padding not -1: {selected.tolist()}"
    assert ((ids >= 0) & (ids < num_blocks)).all(), f"{where}: ids out of range: {ids.tolist()}"
    assert (ids[1:] > ids[:-1]).all(), f"{where}: ids not strictly ascending: {ids.tolist()}"
    keep = torch.zeros(num_blocks, dtype=torch.bool)
    keep[ids.long()] = True
    if top_p >= 1.0:
        assert keep.all(), f"{where}: top_p=1 must keep every block, kept {ids.tolist()}"
        return
    assert keep[forced].all(), f"{where}: forced blocks {forced.nonzero().flatten().tolist()} not all in " \
                               f"{ids.tolist()}"
    kept_mass = float(mass[keep].sum())
    assert kept_mass >= top_p - MASS_TOL, f"{where}: kept mass {kept_mass} < top_p {top_p}"
    optional = keep & ~forced
    if optional.any():
        lightest = float(mass[optional].min())
        assert kept_mass - lightest < top_p + MASS_TOL, \
            f"{where}: not minimal, dropping a block of mass {lightest} still leaves {kept_mass - lightest}"
        dropped = ~keep & ~forced
        if dropped.any():
            heaviest_dropped = float(mass[dropped].max())
            assert heaviest_dropped <= lightest * (1 + GAP_RTOL), \
                f"{where}: dropped a block of mass {heaviest_dropped} but kept one of {lightest}"
            exact_tie = dropped & (mass == lightest)
            if exact_tie.any():
                first_dropped = int(exact_tie.nonzero()[0])
                last_kept = int((optional & (mass == lightest)).nonzero()[-1])
                assert first_dropped > last_kept, f"{where}: tie at mass {lightest} not broken by lower id"
    if reference_margin_is_comfortable(mass, ref_keep, forced, top_p):
        assert torch.equal(keep, ref_keep), \
            f"{where}: kernel {ids.tolist()} != reference {ref_keep.nonzero().flatten().tolist()}"


def check_against_reference(q_idx, keys, seq_lens, selected, num_selected, top_p, sink_tokens, block_size):
    """Runs the reference per sequence and :func:`assert_selection_valid` per head (on the CPU)."""
    selected, num_selected = selected.cpu(), num_selected.cpu()
    hr = q_idx.shape[1]
    for b, t in enumerate(seq_lens):
        if t == 0:
            assert (num_selected[b] == 0).all() and (selected[b] == -1).all(), f"seq {b}: empty not empty"
            continue
        q, k = q_idx[b].cpu(), keys[b].cpu()
        ref_keep = block_topp_ref(index_scores_ref(q, k), top_p, block_size, sink_tokens)   # [HR, NB]
        mass = true_block_mass(q, k, block_size)
        forced = forced_blocks(mass.shape[1], sink_tokens, block_size)
        for h in range(hr):
            # The reference must pass its own contract (checks the helper as much as the reference).
            assert_selection_valid(torch.cat([ref_keep[h].nonzero().flatten().int(),
                                              torch.full((selected.shape[2] - int(ref_keep[h].sum()),), -1,
                                                         dtype=torch.int32)]),
                                   int(ref_keep[h].sum()), mass[h], ref_keep[h], forced, top_p,
                                   where=f"reference seq {b} (T={t}) head {h}")
            assert_selection_valid(selected[b, h], int(num_selected[b, h]), mass[h], ref_keep[h], forced,
                                   top_p, where=f"seq {b} (T={t}) head {h}")


def run_case(seq_lens, hr, di, page_size, block_size, sink_tokens, top_p, pattern, dtype, device,
             max_batch=None, page_offset=0, num_units=None):
    q_idx, index, table, lens, keys = make_batch(seq_lens, hr, di, page_size, block_size, dtype, pattern, device,
                                                 page_offset=page_offset, num_units=num_units)
    max_blocks = math.ceil(max(max(seq_lens), 1) / block_size) + 1   # headroom: padding must be written
    workspace = make_block_topp_workspace(max_batch or len(seq_lens), hr, max_blocks, device)
    selected, num_selected = poisoned_outputs(len(seq_lens), hr, max_blocks, device)
    out = block_topp(q_idx, index, table, lens, top_p, sink_tokens, block_size, max_blocks, workspace,
                     selected=selected, num_selected=num_selected)
    assert out[0] is selected and out[1] is num_selected
    # The paged reference reads back exactly the keys stored (gather through units, slots, block table).
    for b, t in enumerate(seq_lens):
        assert torch.equal(paged_index_keys_ref(index, table, b, t).cpu(), keys[b].cpu())
    if len(seq_lens) <= 8 and top_p == 1.0:
        for b, keep in enumerate(paged_block_topp_ref(q_idx, index, table, seq_lens, top_p, sink_tokens, block_size)):
            assert keep is None or keep.all()
    check_against_reference(q_idx, keys, seq_lens, selected, num_selected, top_p, sink_tokens, block_size)


# ---------------------------------------------------------------------------------------------------
# Small cases (interpreter on CPU, compiled on GPU)

bf16, fp16, fp32, u8 = torch.bfloat16, torch.float16, torch.float32, torch.uint8    # u8: fp8 index keys

# (HR, P, BS, sink_tokens, top_p, pattern, dtype)
SMALL_CASES = [
    pytest.param(1, 16, 64, 4, 0.9, "random", bf16, id="HR1-P16-sink4-p0.9-random-bf16"),
    pytest.param(3, 64, 64, 0, 0.9, "peaked", bf16, id="HR3-P64-sink0-p0.9-peaked-bf16"),
    pytest.param(5, 16, 64, 4, 0.5, "peaked", fp16, id="HR5-P16-sink4-p0.5-peaked-fp16"),
    pytest.param(3, 16, 64, 0, 0.5, "flat", fp32, id="HR3-P16-sink0-p0.5-flat-fp32"),
    pytest.param(3, 64, 64, 4, 0.9, "flat", bf16, id="HR3-P64-sink4-p0.9-flat-bf16"),
    pytest.param(5, 64, 64, 4, 1.0, "random", bf16, id="HR5-P64-sink4-p1.0-random-bf16"),
    pytest.param(3, 16, 64, 4, 0.9, "ties", fp32, id="HR3-P16-sink4-p0.9-ties-fp32"),
    pytest.param(3, 64, 64, 0, 0.5, "ties", bf16, id="HR3-P64-sink0-p0.5-ties-bf16"),
    pytest.param(1, 64, 64, 70, 0.9, "peaked", fp32, id="HR1-P64-sink70(2 blocks)-p0.9-peaked-fp32"),
    pytest.param(3, 16, 32, 4, 0.9, "random", bf16, id="HR3-P16-BS32-sink4-p0.9-random-bf16"),
    pytest.param(3, 64, 16, 4, 0.5, "peaked", bf16, id="HR3-P64-BS16(P>BS)-sink4-p0.5-peaked-bf16"),
    pytest.param(3, 16, 64, 4, 0.9, "random", u8, id="HR3-P16-sink4-p0.9-random-fp8"),
    pytest.param(5, 64, 64, 4, 0.5, "peaked", u8, id="HR5-P64-sink4-p0.5-peaked-fp8"),
]


@runs_here
@pytest.mark.parametrize("hr, page_size, block_size, sink_tokens, top_p, pattern, dtype", SMALL_CASES)
def test_block_topp_small(seed, hr, page_size, block_size, sink_tokens, top_p, pattern, dtype):
    run_case(SMALL_LENS, hr, 16, page_size, block_size, sink_tokens, top_p, pattern, dtype, DEVICE)


@runs_here
def test_block_topp_search_bits(seed, search_bits):
    """Every search width selects as the reference does (blocks with tied masses)."""
    run_case(SMALL_LENS, 2, 16, 16, 64, 4, 0.5, "ties", fp32, DEVICE)


@runs_here
def test_block_topp_uniform_exact_ties(seed, search_bits):
    """q = 0 makes every score 0: all full blocks tie exactly and 1/8 + 3/8 hits top_p = 0.5 exactly."""
    q_idx, index, table, lens, keys = make_batch([512, 515], 2, 16, 16, 64, fp32, "random", DEVICE)
    q_idx.zero_()
    workspace = make_block_topp_workspace(2, 2, 9, DEVICE)
    selected, num_selected = poisoned_outputs(2, 2, 9, DEVICE)
    block_topp(q_idx, index, table, lens, 0.5, 0, 64, 9, workspace, selected, num_selected)
    # T=512: forced last block (1/8) + blocks 0, 1, 2 reach exactly 0.5 -- the reference's set too.
    assert selected[0].cpu().tolist() == [[0, 1, 2, 7, -1, -1, -1, -1, -1]] * 2
    check_against_reference(q_idx, keys, [512, 515], selected, num_selected, 0.5, 0, 64)


@runs_here
def test_block_topp_underflowing_blocks(seed, search_bits):
    """Blocks whose mass underflows to 0 are kept at top_p = 1 and dropped below it."""
    seq_lens = [515]
    k = torch.zeros(515, 1, 16)
    k[:64, 0, 0] = 200.0        # block 0 holds all the mass; every other block underflows to 0
    q_idx, index, table, lens, keys = make_batch(seq_lens, 1, 16, 16, 64, fp32, "random", DEVICE, keys=[k])
    q_idx.zero_()
    q_idx[0, 0, 0] = 1.0
    workspace = make_block_topp_workspace(1, 1, 9, DEVICE)
    for top_p, expect in [(1.0, list(range(9))), (0.999999, [0, 8])]:
        selected, num_selected = poisoned_outputs(1, 1, 9, DEVICE)
        block_topp(q_idx, index, table, lens, top_p, 0, 64, 9, workspace, selected, num_selected)
        assert selected[0, 0].cpu().tolist()[:len(expect)] == expect
        assert int(num_selected[0, 0]) == len(expect)
        check_against_reference(q_idx, [k], seq_lens, selected, num_selected, top_p, 0, 64)


@runs_here
def test_block_topp_empty_rows_and_reuse(seed):
    """seq_len 0 (a padded batch row) selects nothing; a workspace for a larger batch is reused. The
    selection reads a row's stats up to the workspace's width and drops what lies past the row's blocks
    (a max above every score and a NaN sum here, then the previous batch's stats)."""
    workspace = make_block_topp_workspace(4, 3, 9, DEVICE)
    workspace.block_max.fill_(3e38)
    workspace.block_sum.fill_(float("nan"))
    for seq_lens in ([330, 200, 515], [515, 0, 64], [0, 130, 1]):
        q_idx, index, table, lens, keys = make_batch(seq_lens, 3, 16, 16, 64, bf16, "peaked", DEVICE)
        selected, num_selected = poisoned_outputs(3, 3, 9, DEVICE)
        block_topp(q_idx, index, table, lens, 0.9, 4, 64, 9, workspace, selected, num_selected)
        check_against_reference(q_idx, keys, seq_lens, selected, num_selected, 0.9, 4, 64)


@runs_here
def test_block_topp_float32_queries_bf16_cache(seed):
    """q_idx may be float32 (the index-query kernel's output) over a bf16 cache."""
    seq_lens = [200, 515]
    q_idx, index, table, lens, keys = make_batch(seq_lens, 2, 16, 16, 64, bf16, "peaked", DEVICE)
    q_idx = q_idx.float() + 0.01 * torch.randn(q_idx.shape, device=DEVICE)   # not bf16-representable
    workspace = make_block_topp_workspace(2, 2, 9, DEVICE)
    selected, num_selected = poisoned_outputs(2, 2, 9, DEVICE)
    block_topp(q_idx, index, table, lens, 0.9, 4, 64, 9, workspace, selected, num_selected)
    check_against_reference(q_idx, keys, seq_lens, selected, num_selected, 0.9, 4, 64)


@runs_here
@pytest.mark.parametrize("bits, top_p, pattern", [(1, 0.9, "peaked"), (2, 0.9, "random"), (2, 0.5, "ties"),
                                                  (4, 0.5, "ties"), (4, 1.0, "flat")])
def test_block_topp_long_and_short_rows_of_one_batch(seed, monkeypatch, bits, top_p, pattern):
    """The selection keeps a row's masses in registers when it has at most CHUNK blocks and re-reads the
    workspace chunk by chunk otherwise, decided per row (max_blocks, i.e. max_model_len, does not push a
    short row onto the slow path). A 4-block chunk puts both kinds of row in one small batch; the search
    takes ``bits`` bits per step."""
    kernel = importlib.import_module("rtpurbo_vllm.triton_kernels.block_topp.kernel")
    monkeypatch.setattr(kernel, "CONFIG", {**kernel.CONFIG, "search_bits": bits, "select_chunk": 4})
    # 2, 4 and 5 blocks (<= and > CHUNK), 9 blocks (several chunks, ragged), an empty row; max_blocks 10.
    run_case([100, 256, 257, 515, 0], 3, 16, 16, 64, 4, top_p, pattern, fp32, DEVICE)


@runs_here
@pytest.mark.parametrize("blocks_per_prog", [1, 8])
def test_block_topp_stats_blocks_per_program(seed, monkeypatch, blocks_per_prog):
    """The blocks one stats program scores change how the scoring is cut, never the stats: the selection
    matches the reference, with sequences that end inside a program's blocks."""
    kernel = importlib.import_module("rtpurbo_vllm.triton_kernels.block_topp.kernel")
    monkeypatch.setattr(kernel, "CONFIG", {**kernel.CONFIG, "stats_blocks_per_prog": blocks_per_prog})
    run_case([100, 515, 1100, 1], 3, 16, 16, 64, 4, 0.9, "peaked", fp32, DEVICE)


def greedy_topp(mass, forced, top_p):
    """``[NB]`` bool: the forced blocks plus the greedy prefix (mass descending, ties by id) reaching
    ``top_p``, every block if even all fall short; ``mass`` float64."""
    keep = forced.clone()
    total = float(mass[forced].sum())
    order = sorted((~forced).nonzero().flatten().tolist(), key=lambda j: (-float(mass[j]), j))
    for j in order:
        if total >= top_p:
            break
        keep[j] = True
        total += float(mass[j])
    return keep if total >= top_p else torch.ones_like(keep)


def crafted_block_stats():
    """Per-block stats ``(block_max, block_sum)`` of rows that stress the threshold search (BS = 1).

    0: masses ``block_sum / 64`` exact in float32, with ties (several blocks of 8/64) and every partial
    sum exact, so the kept set is known exactly, also where ``F + S`` hits ``top_p`` exactly.
    1: masses around 1/11 that differ by one or two ulps (and some tie): the search ends on adjacent
    bit patterns. 2: masses over many binades, down to subnormals and zeros (underflow).
    """
    exact = ([0.0] * 11, [4, 8, 8, 2, 8, 1, 8, 4, 2, 3, 16])
    ulps = ([0.0] * 11, [1.0 + c * 2.0**-23 for c in (3, 0, 5, 5, 1, 2, 9, 4, 5, 0, 7)])
    wide = ([0.0, -3.0, -20.0, -50.0, -87.0, -100.0, -103.9, -150.0, -200.0, -1.0, -5.0],
            [1.0, 1.5, 2.0, 1.25, 3.0, 1.0, 1.0, 2.0, 1.0, 1.75, 1.0])
    return [exact, ulps, wide]


@runs_here
@pytest.mark.parametrize("chunk, top_ps", [(16, (0.25, 0.5, 0.6875, 0.999999, 1.0)), (4, (0.25, 0.6875, 1.0))],
                         ids=["registers", "reread"])
def test_select_search_bits_agree(chunk, top_ps):
    """The selection kernel on crafted block stats: every search width keeps exactly the blocks of the
    binary search, which (on row 0's exact masses) are the greedy reference's; rows of 11 blocks stay in
    registers (chunk 16) or are re-read chunk by chunk (chunk 4). Widths of 4 and 8 bits (16 and 256
    thresholds) are wider than the last steps' brackets. At top_p 0.25 the forced blocks alone reach it
    in rows 0 and 2 (the search's bracket starts above every candidate)."""
    kernel = importlib.import_module("rtpurbo_vllm.triton_kernels.block_topp.kernel")
    rows = crafted_block_stats()
    batch, max_blocks, sink = len(rows), 12, 1
    ws = make_block_topp_workspace(batch, 1, max_blocks, DEVICE)
    ws.block_max.zero_()
    ws.block_sum.zero_()
    for b, (b_max, b_sum) in enumerate(rows):
        ws.block_max[b, 0, :len(b_max)] = torch.tensor(b_max)
        ws.block_sum[b, 0, :len(b_sum)] = torch.tensor(b_sum)
    lens = torch.tensor([len(r[0]) for r in rows], dtype=torch.int32, device=DEVICE)
    for top_p in top_ps:
        results = {}
        for bits in (1, 2, 4, 8):
            selected, num_selected = poisoned_outputs(batch, 1, max_blocks, DEVICE)
            kernel._select_kernel[(1, batch)](
                lens, ws.block_max, ws.block_sum, selected, num_selected, *ws.block_max.stride()[:2],
                *selected.stride()[:2], *num_selected.stride(), top_p, 0, sink, max_blocks,
                BLOCK_SIZE=1, CHUNK=chunk, SEARCH_BITS=bits, PDL=False, num_warps=4)
            results[bits] = (selected.cpu(), num_selected.cpu())
        for bits in (2, 4, 8):
            assert torch.equal(results[bits][0], results[1][0]) and torch.equal(results[bits][1], results[1][1]), \
                f"top_p {top_p}: {bits} bits per step keep {results[bits][0][:, 0].tolist()}, the binary search " \
                f"{results[1][0][:, 0].tolist()}"
        selected, num_selected = results[1]
        for b, (b_max, b_sum) in enumerate(rows):
            nb = len(b_max)
            b_max, b_sum = torch.tensor(b_max, dtype=torch.float64), torch.tensor(b_sum, dtype=torch.float64)
            mass = b_sum * torch.exp(b_max - b_max.max())
            mass /= mass.sum()
            forced = (torch.arange(nb) < sink) | (torch.arange(nb) == nb - 1)
            want = greedy_topp(mass, forced, top_p)
            if b == 0:
                got = selected[b, 0, :int(num_selected[b, 0])].tolist()
                assert got == want.nonzero().flatten().tolist(), f"top_p {top_p}: kept {got}"
            assert_selection_valid(selected[b, 0], int(num_selected[b, 0]), mass, want, forced, top_p,
                                   where=f"top_p {top_p} row {b}")


@runs_here
@pytest.mark.parametrize("num_units", [1, 4])
def test_block_topp_unit_layouts(seed, num_units):
    """The one-tensor layout (1 unit, slot r for head r's place in it) and 5 heads over 4 units."""
    run_case([1, 64, 130, 515], 5, 16, 32, 64, 4, 0.9, "peaked", bf16, DEVICE, num_units=num_units)


@runs_here
def test_block_topp_dense_threshold(seed):
    """Sequences shorter than dense_threshold keep every block; longer ones are selected by top-p."""
    seq_lens = [100, 515, 300]
    q_idx, index, table, lens, keys = make_batch(seq_lens, 3, 16, 80, 64, bf16, "peaked", DEVICE)
    workspace = make_block_topp_workspace(3, 3, 9, DEVICE)
    selected, num_selected = poisoned_outputs(3, 3, 9, DEVICE)
    block_topp(q_idx, index, table, lens, 0.5, 4, 64, 9, workspace, selected, num_selected, dense_threshold=301)
    assert num_selected[0].tolist() == [2, 2, 2] and num_selected[2].tolist() == [5, 5, 5]
    check_against_reference(q_idx[1:2], keys[1:2], seq_lens[1:2], selected[1:2], num_selected[1:2], 0.5, 4, 64)
    want = paged_block_topp_ref(q_idx, index, table, seq_lens, 0.5, 4, 64, dense_threshold=301)
    assert want[0].all() and want[2].all()


def test_block_topp_rejects_bad_arguments():
    q = torch.zeros(2, 3, 16, device=DEVICE)
    index = PagedHeads.single(torch.zeros(4, 16, 3, 16, device=DEVICE))
    table = index.table(0, torch.zeros(2, 4, dtype=torch.int32, device=DEVICE))
    lens = torch.ones(2, dtype=torch.int32, device=DEVICE)
    ws = make_block_topp_workspace(2, 3, 4, DEVICE)
    with pytest.raises(ValueError, match="top_p"):
        block_topp(q, index, table, lens, 0.0, 4, 64, 4, ws)
    with pytest.raises(ValueError, match="power of two"):
        block_topp(q, index, table, lens, 0.9, 4, 48, 4, ws)
    with pytest.raises(TypeError, match="int32"):
        block_topp(q, index, index.table(0, table.block_table.long()), lens, 0.9, 4, 64, 4, ws)
    with pytest.raises(TypeError, match="float"):
        block_topp(q.int(), index, table, lens, 0.9, 4, 64, 4, ws)
    with pytest.raises(ValueError, match="workspace"):
        block_topp(q, index, table, lens, 0.9, 4, 64, 8, ws)
    with pytest.raises(ValueError, match="HR, DI"):
        block_topp(q, PagedHeads.single(torch.zeros(4, 16, 2, 16, device=DEVICE)), table, lens, 0.9, 4, 64, 4, ws)
    with pytest.raises(ValueError, match="page_size"):
        block_topp(q, index, PL.PageTable(table.block_table, 32, 16 * 3 * 16, 3 * 16), lens, 0.9, 4, 64, 4, ws)
    two_kinds = PagedHeads.from_units([torch.zeros(4, 16, 2, 16, device=DEVICE), torch.zeros(4, 16, 1, 16, device=DEVICE)],
                                      [0, 0, 1], [0, 1, 0], [0, 0, 1])
    with pytest.raises(ValueError, match="one cache kind"):
        block_topp(q, two_kinds, table, lens, 0.9, 4, 64, 4, ws)


# ---------------------------------------------------------------------------------------------------
# GPU: realistic sizes, int64 offsets, CUDA graphs

LARGE_LENS = [32768, 65537, 100003, 131072]
LARGE_MAX_BLOCKS = 131072 // 64


@pytest.mark.gpu
@compiled_only
@pytest.mark.parametrize("page_size, top_p, pattern", [
    pytest.param(16, 0.9, "peaked", id="P16-p0.9-peaked"),
    pytest.param(64, 0.9, "random", id="P64-p0.9-random"),
    pytest.param(64, 0.5, "peaked", id="P64-p0.5-peaked"),
    pytest.param(16, 1.0, "random", id="P16-p1.0-random"),
])
def test_block_topp_gpu_large(seed, page_size, top_p, pattern):
    run_case(LARGE_LENS, 8, 16, page_size, 64, 4, top_p, pattern, torch.bfloat16, "cuda")


@pytest.mark.gpu
@compiled_only
def test_block_topp_gpu_int64_offsets(seed):
    """Pages past 2**31 elements into the cache: page * stride overflows int32."""
    hr, di, page_size = 8, 16, 64
    page_offset = 2**31 // (page_size * hr * di) + 8       # ~4.3 GB of bf16 cache below the used pages
    run_case([5000, 777], hr, di, page_size, 64, 4, 0.9, "peaked", torch.bfloat16, "cuda",
             page_offset=page_offset)


@pytest.mark.gpu
@compiled_only
@pytest.mark.parametrize("pdl", [0, 1], ids=["plain", "pdl"])
def test_block_topp_gpu_cuda_graph_replay(seed, pdl, monkeypatch):
    """Capture once; new seq_lens, queries, cache contents and block tables; replay; compare (with ``pdl``
    the two kernels launch with programmatic dependent launch)."""
    monkeypatch.setitem(launch_settings.CONFIG, "pdl", pdl)
    hr, di, page_size, block_size, sink, top_p = 8, 16, 16, 64, 4, 0.9
    max_len = 65536
    max_blocks = max_len // block_size
    batch = 4
    first = [70, 1, 4096, 333]
    second = [max_len, 0, 12345, 64]
    static = []
    q_s, index, table, lens_s, _ = make_batch([max_len] * batch, hr, di, page_size, block_size, torch.bfloat16,
                                              "random", "cuda", layout_out=static)
    workspace = make_block_topp_workspace(batch, hr, max_blocks, "cuda")
    selected, num_selected = poisoned_outputs(batch, hr, max_blocks, "cuda")
    lens_s.copy_(torch.tensor(first, dtype=torch.int32))

    def launch():
        block_topp(q_s, index, table, lens_s, top_p, sink, block_size, max_blocks, workspace, selected, num_selected)

    graph = capture(launch)

    for seq_lens, pattern in ((first, "random"), (second, "peaked")):
        fresh = []
        q_idx, _, _, lens, keys = make_batch(seq_lens, hr, di, page_size, block_size, torch.bfloat16, pattern,
                                             "cuda", layout_out=fresh)
        PL.copy_into(static[0], fresh[0])
        q_s.copy_(q_idx)
        lens_s.copy_(lens)
        selected.fill_(POISON)
        num_selected.fill_(POISON)
        graph.replay()
        torch.cuda.synchronize()
        check_against_reference(q_idx, keys, seq_lens, selected, num_selected, top_p, sink, block_size)
