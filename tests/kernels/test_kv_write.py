"""kv_write (Triton) against kv_write_ref: a step's new K/V into a layer's K|V units.

Layouts scatter the layer's KV heads over several unit tensors of two kinds (full / window) with their
own page sizes and slot mappings; every slot no token maps to is garbage and must stay bit-identical.
bf16/fp16/fp32 units store the values rounded to their dtype, fp8 units (uint8 bytes or float8_e4m3fn)
vLLM's quantisation (``x / scale``, saturate to +-448, round to nearest even). Small cases run on the CPU
under ``TRITON_INTERPRET=1``; ``gpu`` cases need ``TRITON_INTERPRET=0``.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from rtpurbo_vllm.cuda_graphs import capture  # noqa: E402
from rtpurbo_vllm.triton_kernels.kv_write import kernel as _kernel_module  # noqa: E402
from rtpurbo_vllm.triton_kernels.kv_write import kv_write_ref  # noqa: E402
from rtpurbo_vllm.triton_kernels.paged_heads import PagedHeads, quantize_fp8  # noqa: E402


import rtpurbo_paged_layouts as PL  # noqa: E402  (registered by tests/conftest.py)
KindSpec = PL.KindSpec
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRET and type(_kernel_module._kv_write_kernel).__name__ != "InterpretedFunction":
    importlib.reload(_kernel_module)
kv_write = _kernel_module.kv_write
DEVICE = "cpu" if INTERPRET else "cuda"
u8, f8, bf16, fp16, fp32 = torch.uint8, torch.float8_e4m3fn, torch.bfloat16, torch.float16, torch.float32


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bits (NaN-safe exact comparison)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _assert_units_equal(got: PagedHeads, want: PagedHeads):
    for i, (a, b) in enumerate(zip(got.units, want.units)):
        diff = (_bits(a) != _bits(b))
        assert not diff.any(), f"unit {i}: {int(diff.sum())} entries differ, first at {diff.nonzero()[0].tolist()}"


def _step(lay, seq_lens, new_tokens, pad=3):
    """Slot mappings per kind of a step writing the last ``new_tokens[b]`` tokens of each sequence (then
    ``pad`` padding tokens, slot -1), as vLLM orders them."""
    maps = [[] for _ in lay.tables]
    for b, (n, m) in enumerate(zip(seq_lens, new_tokens)):
        tokens = torch.arange(n - m, n)
        for k in range(len(lay.tables)):
            maps[k].append(lay.slot_mapping(k, b, tokens))
    return [torch.cat(m + [torch.full((pad,), -1, dtype=torch.long)]).to(DEVICE) for m in maps]


def _run(head_kind, kinds, dtype, d=64, kv_dtype=bf16, seq_lens=(70, 1, 300, 161), new_tokens=(70, 1, 17, 1),
         scales=(0.05, 0.02), window=50, sink=4, key_scale=3.0):
    keeps = [None, PL.kept_window(list(seq_lens), sink, window)][:len(kinds)]
    lay = PL.build(list(seq_lens), head_kind, 2 * d, dtype, kinds, DEVICE, keeps)
    maps = _step(lay, seq_lens, new_tokens)
    t = maps[0].shape[0]
    key = (torch.randn(t, len(head_kind), d) * key_scale).to(kv_dtype).to(DEVICE)
    value = torch.randn(t, len(head_kind), d).to(kv_dtype).to(DEVICE)
    k_scale = torch.tensor([scales[0]], device=DEVICE)
    v_scale = torch.tensor([scales[1]], device=DEVICE)
    want = kv_write_ref(key, value, lay.paged, maps, k_scale, v_scale)
    before = (key.clone(), value.clone(), [m.clone() for m in maps])
    kv_write(key, value, lay.paged, maps, k_scale, v_scale)
    _assert_units_equal(lay.paged, want)
    assert torch.equal(key, before[0]) and torch.equal(value, before[1]), "inputs were modified"
    return lay, key, value, maps, k_scale, v_scale


CASES = [
    ("2kinds-P16x2units-P80x2units-bf16", [0, 1, 0, 1], [KindSpec(16, 2, 2), KindSpec(80, 2, 3)], bf16),
    ("2kinds-P32x1unit-P16x3units-fp16", [1, 0, 1, 1, 0], [KindSpec(32, 1, 3), KindSpec(16, 3, 1)], fp16),
    ("1kind-P80x3units-fp32", [0, 0, 0], [KindSpec(80, 3, 1)], fp32),
    ("window-only-P16x2units-bf16", [1, 1], [KindSpec(16, 1, 1), KindSpec(16, 2, 1)], bf16),
    ("fp8u8-2kinds-P16x2units-P32x2units", [0, 1, 1, 0], [KindSpec(16, 2, 3), KindSpec(32, 2, 2)], u8),
    ("fp8e4m3-2kinds-P80x1unit-P16x2units", [1, 0], [KindSpec(80, 1, 2), KindSpec(16, 2, 2)], f8),
]


@pytest.mark.parametrize("head_kind, kinds, dtype", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_kv_write_scattered(seed, head_kind, kinds, dtype):
    _run(head_kind, kinds, dtype)


@pytest.mark.parametrize("kv_dtype", [bf16, fp16])
def test_kv_write_fp8_from_fp16_and_bf16_inputs(seed, kv_dtype):
    _run([0, 1], [KindSpec(16, 1, 1), KindSpec(32, 1, 1)], u8, d=128, kv_dtype=kv_dtype)


def test_kv_write_single_unit_is_reshape_and_cache():
    """The one-tensor layout: exactly ``cache.flatten(0, 1)[slot] = key | value`` (vLLM's CPU write)."""
    num_pages, p, hkv, d, t = 9, 16, 3, 64, 40
    cache = PL.garbage_(torch.empty(num_pages, p, hkv, 2 * d, dtype=bf16, device=DEVICE))
    kv = PagedHeads.single(cache)
    slots = torch.randperm(num_pages * p)[:t]
    slots[::5] = -1
    slots = slots.to(DEVICE)
    key = torch.randn(t, hkv, d, dtype=bf16, device=DEVICE)
    value = torch.randn(t, hkv, d, dtype=bf16, device=DEVICE)
    want = cache.clone()
    valid = slots >= 0
    want.flatten(0, 1)[slots[valid]] = torch.cat([key, value], -1)[valid]
    kv_write(key, value, kv, [slots])
    assert torch.equal(_bits(cache), _bits(want))


def test_kv_write_strided_inputs(seed):
    """key/value as head slices of a fused qkv buffer; int32 slot mappings."""
    t, hq, hkv, d = 23, 4, 2, 64
    qkv = torch.randn(t, hq + 2 * hkv, d, dtype=bf16, device=DEVICE)
    key, value = qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]
    lay = PL.build([t, 5], [0, 1], 2 * d, bf16, [KindSpec(16, 1, 1), KindSpec(32, 1, 1)], DEVICE)
    maps = [lay.slot_mapping(k, 0, torch.arange(t)).to(DEVICE) for k in (0, 1)]
    maps[1] = maps[1].int()
    want = kv_write_ref(key, value, lay.paged, maps)
    kv_write(key, value, lay.paged, maps)
    _assert_units_equal(lay.paged, want)


def test_kv_write_reuse_same_tensors_new_values(seed):
    """CUDA-graph style: the same key/value/slot-mapping/scale tensors and layout, refilled in place."""
    seq_lens = [200, 57, 1]
    lay = PL.build(seq_lens, [1, 0, 1, 0], 128, u8, [KindSpec(16, 2, 2), KindSpec(32, 2, 2)], DEVICE,
                   [None, PL.kept_window(seq_lens, 4, 40)])
    t = 12
    key = torch.empty(t, 4, 64, dtype=bf16, device=DEVICE)
    value = torch.empty_like(key)
    maps = [torch.empty(t, dtype=torch.long, device=DEVICE) for _ in range(2)]
    ks, vs = torch.empty(1, device=DEVICE), torch.empty(1, device=DEVICE)
    for new, scales in (([1, 1, 1], (0.05, 0.1)), ([8, 1, 0], (0.3, 0.01))):
        for m, f in zip(maps, _step(lay, seq_lens, new, pad=t - sum(new))):
            m.copy_(f)
        key.copy_(torch.randn_like(key) * 4)
        value.copy_(torch.randn_like(value))
        ks.fill_(scales[0])
        vs.fill_(scales[1])
        want = kv_write_ref(key, value, lay.paged, maps, ks, vs)
        kv_write(key, value, lay.paged, maps, ks, vs)
        _assert_units_equal(lay.paged, want)


def test_fp8_encoding_is_vllms():
    """Every float8_e4m3fn code, the midpoints between neighbours (ties to even), values past 448 and
    tiny subnormals: the kernel's bytes equal ``quantize_fp8`` (torch's e4m3fn rounding after saturation)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    vals = codes.view(f8).float()
    finite = vals[~vals.isnan()].unique()
    mids = (finite[1:] + finite[:-1]) / 2
    extra = torch.tensor([448.0, 449.0, 464.0, 480.0, 1e6, -1e6, 2.0 ** -10, -2.0 ** -10, 2.0 ** -9 * 1.5,
                          2.0 ** -11, 2.0 ** -6 * 0.99, 0.0, -0.0, 1e-30])
    x = torch.cat([finite, mids, mids.nextafter(torch.tensor(1e9)), mids.nextafter(torch.tensor(-1e9)), extra])
    d = 64
    n = -(-x.numel() // d)
    x = torch.cat([x, torch.zeros(n * d - x.numel())]).view(n, 1, d)
    cache = torch.zeros(1, 16 * (-(-n // 16)), 1, 2 * d, dtype=u8, device=DEVICE)
    kv = PagedHeads.single(cache)
    one = torch.ones(1, device=DEVICE)
    kv_write(x.to(DEVICE), x.to(DEVICE), kv, [torch.arange(n, device=DEVICE)], one, one)
    got = cache[0, :n, 0, :d].cpu()
    want = quantize_fp8(x[:, 0], 1.0)
    bad = (got != want).nonzero()
    assert bad.numel() == 0, f"{bad.shape[0]} codes differ, e.g. x={x[bad[0, 0], 0, bad[0, 1]].item()!r}: " \
                             f"{got[tuple(bad[0])].item()} vs {want[tuple(bad[0])].item()}"


def test_kv_write_bad_arguments():
    cache = torch.zeros(4, 16, 2, 128, dtype=bf16, device=DEVICE)
    kv = PagedHeads.single(cache)
    key = torch.zeros(5, 2, 64, dtype=bf16, device=DEVICE)
    sm = torch.zeros(5, dtype=torch.long, device=DEVICE)
    kv_write(key, key, kv, [sm])
    with pytest.raises(ValueError, match="heads"):
        kv_write(key[:, :1], key[:, :1], kv, [sm])
    with pytest.raises(ValueError, match="slot_mappings"):
        kv_write(key, key, kv, [sm[:3]])
    with pytest.raises(ValueError, match="slot mappings"):
        kv_write(key, key, kv, [])
    with pytest.raises(ValueError, match="k_scale"):
        kv_write(key, key, PagedHeads.single(torch.zeros(4, 16, 2, 128, dtype=u8, device=DEVICE)), [sm])
    with pytest.raises(ValueError, match="dtype"):
        kv_write(key.int(), key.int(), kv, [sm])


# ----------------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET, reason="needs the compiled kernel (unset TRITON_INTERPRET)")
@pytest.mark.parametrize("dtype", [bf16, u8])
def test_gpu_cuda_graph_replay(seed, dtype):
    """Capture once; new K/V, slot mappings and unit contents in place; replay; compare."""
    head_kind, kinds = [0, 1, 1, 0, 1, 1, 0, 1], [KindSpec(16, 2, 2), KindSpec(32, 3, 2)]
    seq_lens, d = [3000, 2000, 1, 777], 128
    lay = PL.build(seq_lens, head_kind, 2 * d, dtype, kinds, "cuda", [None, PL.kept_window(seq_lens, 4, 1024)])
    t = 64
    key = torch.randn(t, len(head_kind), d, dtype=bf16, device="cuda")
    value = torch.randn_like(key)
    maps = [torch.full((t,), -1, dtype=torch.long, device="cuda") for _ in kinds]
    ks, vs = torch.tensor([0.01], device="cuda"), torch.tensor([0.02], device="cuda")
    graph = capture(lambda: kv_write(key, value, lay.paged, maps, ks, vs))
    for new in ([1, 1, 1, 1], [60, 1, 1, 2]):
        fresh = _step(lay, seq_lens, new, pad=t - sum(new))
        for m, f in zip(maps, fresh):
            m.copy_(f)
        key.copy_(torch.randn_like(key) * 3)
        value.copy_(torch.randn_like(value))
        for u in lay.paged.units:
            PL.garbage_(u)
        want = kv_write_ref(key, value, lay.paged, maps, ks, vs)
        graph.replay()
        torch.cuda.synchronize()
        _assert_units_equal(lay.paged, want)


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET, reason="needs the compiled kernel (unset TRITON_INTERPRET)")
def test_gpu_int64_offsets(seed):
    """Slots whose element offset exceeds 2**31 (one bf16 unit of 4.3 GB)."""
    p, hkv, d = 16, 8, 128
    num_pages = 2**31 // (p * hkv * 2 * d) + 64
    cache = torch.zeros(num_pages, p, hkv, 2 * d, dtype=bf16, device="cuda")
    kv = PagedHeads.single(cache)
    slots = torch.arange((num_pages - 8) * p, (num_pages - 8) * p + 50, device="cuda")
    key = torch.randn(50, hkv, d, dtype=bf16, device="cuda")
    value = torch.randn_like(key)
    kv_write(key, value, kv, [slots])
    got = cache.flatten(0, 1)[slots]
    assert torch.equal(got, torch.cat([key, value], -1))
