"""PagedHeads / PageTable (triton_kernels/paged_heads.py): layout checks, offsets, gather/scatter, fp8
helpers, and the cross-tensor ``base + offset`` addressing every kernel relies on (checked here on a tiny
Triton kernel, under ``TRITON_INTERPRET=1`` on CPU tensors and compiled on a GPU)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from rtpurbo_vllm.triton_kernels.paged_heads import (PagedHeads, PageTable, gather, quantize_fp8,  # noqa: E402
                                                     scatter, to_float)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"


@triton.jit
def _copy_heads_kernel(base_ptr, offsets_ptr, out_ptr, W: tl.constexpr):
    """Program h: reads head h's first vector through ``base + offsets[h]``, writes it to ``out[h]`` and
    writes ``-x`` back in place (both directions of the addressing)."""
    h = tl.program_id(0)
    off = tl.load(offsets_ptr + h)
    cols = tl.arange(0, W)
    x = tl.load(base_ptr + off + cols)
    tl.store(out_ptr + h * W + cols, x)
    tl.store(base_ptr + off + cols, -x)


def test_cross_tensor_base_plus_offset_addressing():
    """Separately allocated tensors reached through the first one's pointer and int64 element offsets
    (negative ones too, when a unit lies below the base in memory)."""
    units = [torch.randn(3, 16, 2, 32, device=DEVICE) for _ in range(4)]
    kv = PagedHeads.from_units(units, [3, 0, 2, 1, 3], [1, 0, 0, 1, 0])
    out = torch.empty(kv.num_heads, 32, device=DEVICE)
    before = [u.clone() for u in units]
    _copy_heads_kernel[(kv.num_heads,)](kv.kernel_base(), kv.offsets, out, W=32)
    for h in range(kv.num_heads):
        want = before[kv.head_unit[h]][0, 0, kv.head_slot[h]]
        assert torch.equal(out[h], want)
        assert torch.equal(units[kv.head_unit[h]][0, 0, kv.head_slot[h]], -want)


def test_from_units_offsets_geometry_and_kinds():
    a = torch.zeros(4, 16, 2, 32, dtype=torch.bfloat16, device=DEVICE)
    b = torch.zeros(6, 32, 3, 32, dtype=torch.bfloat16, device=DEVICE)
    kv = PagedHeads.from_units([b, a], [0, 1, 1], [1, 0, 1], [1, 0, 0])
    assert kv.geometry == ((16, 16 * 2 * 32, 2 * 32), (32, 32 * 3 * 32, 3 * 32))
    elem = a.element_size()
    rel = (a.data_ptr() - b.data_ptr()) // elem
    assert kv.offsets.tolist() == [32, rel, rel + 32]
    assert kv.kinds.tolist() == [1, 0, 0] and kv.offsets.dtype == torch.int64 and kv.kinds.dtype == torch.int32
    assert kv.num_heads == 3 and kv.num_kinds == 2 and kv.width == 32 and not kv.is_fp8
    assert kv.offset_align == (16 if all(o % 16 == 0 for o in kv.offsets.tolist()) else kv.offset_align)
    assert all(o % kv.offset_align == 0 for o in kv.offsets.tolist())
    t = kv.table(1, torch.zeros(2, 5, dtype=torch.int32, device=DEVICE))
    assert (t.page_size, t.page_stride, t.token_stride) == (32, 32 * 3 * 32, 3 * 32)
    single = PagedHeads.single(a)
    assert single.head_unit == (0, 0) and single.head_slot == (0, 1) and single.offsets.tolist() == [0, 32]
    fp8 = PagedHeads.single(torch.zeros(2, 16, 1, 8, dtype=torch.uint8, device=DEVICE))
    assert fp8.is_fp8 and fp8.kernel_base().dtype == torch.float8_e4m3fn


def test_from_units_rejects_bad_layouts():
    a = torch.zeros(4, 16, 2, 32, dtype=torch.bfloat16)
    b = torch.zeros(4, 32, 2, 32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="one dtype"):
        PagedHeads.from_units([a, a.half()], [0, 1], [0, 0], [0, 0])
    with pytest.raises(ValueError, match="slot"):
        PagedHeads.from_units([a], [0], [2], [0])
    with pytest.raises(ValueError, match="unit 3 out of range"):
        PagedHeads.from_units([a], [3], [0], [0])
    with pytest.raises(ValueError, match="share unit"):
        PagedHeads.from_units([a], [0, 0], [1, 1], [0, 0])
    with pytest.raises(ValueError, match="one kind"):
        PagedHeads.from_units([a], [0, 0], [0, 1], [0, 1])
    with pytest.raises(ValueError, match="differ"):
        PagedHeads.from_units([a, b], [0, 1], [0, 0], [0, 0])
    with pytest.raises(ValueError, match="width"):
        PagedHeads.from_units([a, torch.zeros(4, 16, 2, 16, dtype=torch.bfloat16)], [0, 1], [0, 0], [0, 1])
    with pytest.raises(ValueError, match="last"):
        PagedHeads.from_units([a.transpose(2, 3)], [0], [0], [0])
    with pytest.raises(ValueError, match="one entry per head"):
        PagedHeads.from_units([a], [0, 0], [0], [0, 0])
    kv = PagedHeads.from_units([a, b], [0, 1], [0, 0], [0, 1])
    good = [kv.table(0, torch.zeros(2, 3, dtype=torch.int32)), kv.table(1, torch.zeros(2, 3, dtype=torch.int32))]
    kv.check_tables(good, 2)
    with pytest.raises(ValueError, match="2 kinds"):
        kv.check_tables(good[:1], 2)
    with pytest.raises(ValueError, match="page_size"):
        kv.check_tables([good[1], good[1]], 2)
    with pytest.raises(ValueError, match="B=3"):
        kv.check_tables(good, 3)
    with pytest.raises(ValueError, match="kind 2"):
        kv.table(2, good[0].block_table)


def test_gather_scatter_roundtrip(seed):
    """scatter then gather through two kinds with their own page sizes and block tables."""
    u0 = torch.full((5, 16, 2, 8), float("nan"))
    u1 = torch.full((4, 32, 1, 8), float("nan"))
    kv = PagedHeads.from_units([u0, u1], [1, 0, 0], [0, 1, 0], [1, 0, 0])
    bt0 = torch.tensor([[3, 1, 4]], dtype=torch.int32)
    bt1 = torch.tensor([[2, 0]], dtype=torch.int32)
    tables = [kv.table(0, bt0), kv.table(1, bt1)]
    tokens = torch.arange(40)
    maps = [bt0[0, tokens // 16].long() * 16 + tokens % 16, bt1[0, tokens // 32].long() * 32 + tokens % 32]
    maps[1][32:] = -1          # kind 1 keeps only the first 32 tokens
    values = torch.randn(kv.num_heads, 40, 8)
    for h in range(kv.num_heads):
        scatter(kv, maps, h, values[h])
    for h in range(kv.num_heads):
        n = 32 if kv.head_kind[h] == 1 else 40
        assert torch.equal(gather(kv, tables, 0, h, tokens[:n]), values[h, :n])
    assert u1[0].isnan().all() and u0[0].isnan().all() and u0[2].isnan().all(), "wrote outside the mapped pages"


def test_fp8_helpers():
    x = torch.tensor([0.0, 1.0, -3.3, 1000.0, -1000.0, 1e-4])
    q = quantize_fp8(x, torch.tensor([0.5]))
    assert q.dtype == torch.uint8
    assert torch.equal(q.view(torch.float8_e4m3fn).float(), (x / 0.5).clamp(-448, 448).to(torch.float8_e4m3fn).float())
    assert to_float(q, torch.tensor([0.5]))[3].item() == 448 * 0.5
    assert quantize_fp8(x, 2.0, torch.float8_e4m3fn).dtype == torch.float8_e4m3fn
    assert torch.equal(to_float(x.bfloat16()), x.bfloat16().float())


def test_page_table_is_plain_data():
    bt = torch.zeros(2, 3, dtype=torch.int32)
    t = PageTable(bt, 16, 1024, 64)
    assert t.block_table is bt
    with pytest.raises(AttributeError):
        t.page_size = 32
