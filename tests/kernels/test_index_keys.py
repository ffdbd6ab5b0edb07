"""write_index_keys / index_queries (Triton) against the fused PyTorch references.

Post-RoPE inputs come from :func:`rtpurbo_vllm.rope.apply_rope` on random pre-RoPE vectors, so each case
checks both that the kernel matches ``write_index_keys_ref`` / ``index_queries_ref`` on the same inputs
and that it recovers the projection of the *pre*-RoPE vectors. Outputs and caches start NaN-filled:
every slot a token maps to must be written, every other slot must stay NaN.

Small cases run on the CPU under ``TRITON_INTERPRET=1``; realistic sizes, int64 cache offsets and CUDA
graph capture/replay are marked ``gpu`` (run them with ``TRITON_INTERPRET=0``).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import dataclasses  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402
from typing import NamedTuple  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, Qwen3Config  # noqa: E402

from rtpurbo_vllm.cuda_graphs import capture  # noqa: E402
from rtpurbo_vllm.rope import RopeSpec, apply_rope, rope_cos_sin  # noqa: E402
from rtpurbo_vllm.triton_kernels.paged_heads import PagedHeads  # noqa: E402
from rtpurbo_vllm.triton_kernels.index_keys import kernel as index_keys_kernel  # noqa: E402
from rtpurbo_vllm.triton_kernels.index_keys import (  # noqa: E402
    IndexQueries,
    index_keys_ref, index_queries, index_queries_ref, rope_table, rope_table_length, write_index_keys,
    write_index_keys_ref)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
DI = 16
# Relative tolerance of the projection recovered from post-RoPE inputs rounded to the input dtype,
# measured against the largest |value| (rounding the post-RoPE vector perturbs each channel by <= 1/2 ulp).
RECOVERY_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


# ----------------------------------------------------------------------------------------------------
# RoPE variants, each from a real transformers config (as vLLM's loader would read config.json).


def _rope(rope_type="default", rope_theta=1e4, **params):
    """A transformers-v5 ``rope_parameters`` dict."""
    return {"rope_type": rope_type, "rope_theta": rope_theta, **params}


def _llama(head_dim, **rope):
    return LlamaConfig(head_dim=head_dim, max_position_embeddings=8192, rope_parameters=_rope(**rope))


ROPES = {
    "neox": lambda d: _llama(d, rope_theta=5e5),
    "gptj": lambda d: _llama(d),  # made GPT-J style below
    "partial0.5": lambda d: _llama(d, partial_rotary_factor=0.5),
    "linear": lambda d: _llama(d, rope_type="linear", factor=4.0),
    "partial0.5-gptj": lambda d: _llama(d, partial_rotary_factor=0.5),
    "yarn": lambda d: Qwen3Config(head_dim=d, max_position_embeddings=131072,
                                  rope_parameters=_rope("yarn", 1e6, factor=4.0,
                                                        original_max_position_embeddings=32768)),
    "llama3": lambda d: LlamaConfig(head_dim=d, max_position_embeddings=131072,
                                    rope_parameters=_rope("llama3", 5e5, factor=8.0, low_freq_factor=1.0,
                                                          high_freq_factor=4.0,
                                                          original_max_position_embeddings=8192)),
}


@functools.lru_cache(maxsize=None)
def _spec(rope: str, head_dim: int) -> RopeSpec:
    spec = RopeSpec.from_hf_config(ROPES[rope](head_dim))
    assert spec.head_size == head_dim
    return dataclasses.replace(spec, is_neox_style="gptj" not in rope)


@functools.lru_cache(maxsize=None)
def _table(spec: RopeSpec, device: str) -> torch.Tensor:
    """One table per model, as the backend would keep it."""
    return rope_table(spec, device)


# ----------------------------------------------------------------------------------------------------
# Cases.


class Case(NamedTuple):
    t: int
    hq: int
    hkv: int
    heads: tuple[int, ...]  # retrieval query heads; kv_heads = heads // (hq // hkv)
    d: int
    rope: str
    page: int
    dtype: torch.dtype

    @property
    def id(self) -> str:
        dt = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[self.dtype]
        heads = "_".join(map(str, self.heads))
        return f"T{self.t}-HQ{self.hq}-HKV{self.hkv}-R{heads}-D{self.d}-{self.rope}-P{self.page}-{dt}"


CASES = [
    Case(1, 4, 4, (2,), 64, "neox", 16, torch.bfloat16),
    Case(7, 8, 2, (1, 2, 6), 128, "gptj", 16, torch.float16),           # KV heads 0, 0, 1
    Case(65, 5, 1, (0, 3), 64, "partial0.5", 64, torch.bfloat16),       # both read KV head 0
    Case(65, 8, 2, (0, 1, 5), 128, "yarn", 64, torch.bfloat16),
    Case(7, 4, 4, (0, 3), 128, "partial0.5-gptj", 64, torch.bfloat16),
    Case(65, 4, 4, (1, 2, 3), 64, "neox", 16, torch.float32),           # tight recovery check
    Case(1, 5, 1, (1, 2, 4), 128, "yarn", 16, torch.float16),
    Case(7, 8, 2, (3,), 64, "llama3", 64, torch.bfloat16),
    Case(7, 4, 4, (0, 2), 96, "partial0.5", 16, torch.bfloat16),        # D not a power of two
    Case(7, 8, 2, (2, 3), 256, "yarn", 16, torch.bfloat16),             # largest head size
]


class Inputs(NamedTuple):
    spec: RopeSpec
    positions: torch.Tensor   # [T] int64
    q_pre: torch.Tensor       # [T, HQ, D] case dtype
    k_pre: torch.Tensor       # [T, HKV, D] case dtype
    query: torch.Tensor       # [T, HQ, D] post-RoPE, a view into a fused qkv buffer
    key: torch.Tensor         # [T, HKV, D] post-RoPE, a view into the same buffer
    heads: torch.Tensor       # [HR] int32
    kv_heads: torch.Tensor    # [HR] int32
    w_q: torch.Tensor         # [HR, DI, D] case dtype
    w_k: torch.Tensor         # [HR, DI, D] case dtype
    slot_mapping: torch.Tensor  # [T] int64, shuffled, some -1
    num_pages: int


def _slot_mapping(t, page, device, pad_frac=0.25, extra_pages=2, min_slot=0):
    """[T] int64 distinct shuffled slots over ``cdiv(T, P) + extra_pages`` pages, ~pad_frac of them -1."""
    num_pages = math.ceil(t / page) + extra_pages + min_slot // page
    slots = min_slot + torch.randperm(num_pages * page - min_slot)[:t]
    pad = torch.rand(t) < pad_frac
    if t > 1:
        pad[torch.randint(0, t, (1,))] = True  # at least one padding token
        pad[torch.randint(0, t, (1,))] = False  # at least one real token (may undo the line above)
    else:
        pad[:] = False
    slots[pad] = -1
    return slots.to(device), num_pages


def _inputs(case: Case, device=DEVICE) -> Inputs:
    spec = _spec(case.rope, case.d)
    n_pos = rope_table_length(spec)
    positions = torch.randint(0, n_pos, (case.t,), dtype=torch.int64)
    start = torch.randint(0, max(n_pos - case.t, 0) + 1, ())
    positions[: case.t // 2] = (start + torch.arange(case.t // 2)) % n_pos  # a prefill chunk
    q_pre = torch.randn(case.t, case.hq, case.d).to(case.dtype).to(device)
    k_pre = torch.randn(case.t, case.hkv, case.d).to(case.dtype).to(device)
    v = torch.randn(case.t, case.hkv * case.d).to(case.dtype).to(device)
    # Rotated on the kernel's device, as vLLM does (CPU and CUDA cos/sin may differ in the last ulp).
    q, k = apply_rope(q_pre, positions.to(device), spec), apply_rope(k_pre, positions.to(device), spec)
    # vLLM's q and k are views into the fused qkv projection output (token stride > HQ * D).
    qkv = torch.cat([q.flatten(1), k.flatten(1), v], dim=1)
    query = qkv[:, : case.hq * case.d].view(case.t, case.hq, case.d)
    key = qkv[:, case.hq * case.d: (case.hq + case.hkv) * case.d].view(case.t, case.hkv, case.d)
    heads = torch.tensor(case.heads, dtype=torch.int32)
    kv_heads = heads // (case.hq // case.hkv)
    hr = len(case.heads)
    w_q = (torch.randn(hr, DI, case.d) / math.sqrt(case.d)).to(case.dtype)
    w_k = (torch.randn(hr, DI, case.d) / math.sqrt(case.d)).to(case.dtype)
    slot_mapping, num_pages = _slot_mapping(case.t, case.page, device)
    return Inputs(spec, positions.to(device), q_pre, k_pre, query, key,
                  heads.to(device), kv_heads.to(device), w_q.to(device), w_k.to(device), slot_mapping, num_pages)


def _assert_recovered(got: torch.Tensor, x_pre: torch.Tensor, w: torch.Tensor, dtype: torch.dtype):
    """``got`` [T, HR, DI] is the projection of the pre-RoPE ``x_pre`` [T, HR, D] within RECOVERY_TOL."""
    want = torch.einsum("thd,hid->thi", x_pre.double(), w.double())  # float64: immune to TF32 settings
    scale = want.abs().max().clamp_min(1e-6)
    err = (got.double() - want).abs().max()
    assert err <= RECOVERY_TOL[dtype] * scale, f"max error {err:.3g} vs max |value| {scale:.3g}"


def _index_layout(num_pages, page, hr, dtype, device, num_units=3):
    """NaN-filled index units ``[num_pages, P, slots, DI]`` with the HR heads on random (unit, slot)s, spare
    slots left over (other layers'); ``num_units=1`` with ``slots=HR`` is the one-tensor layout."""
    num_units = min(num_units, hr)
    slots = hr if num_units == 1 else -(-hr // num_units) + 1
    units = [torch.full((num_pages, page, slots, DI), float("nan"), dtype=dtype, device=device)
             for _ in range(num_units)]
    places = [(u, sl) for u in range(num_units) for sl in range(slots)]
    order = torch.randperm(len(places)).tolist()
    return PagedHeads.from_units(units, [places[i][0] for i in order[:hr]], [places[i][1] for i in order[:hr]])


def _read_back(index, slots):
    """``[n, HR, DI]``: each head's entries at ``slots`` (``page * P + offset``)."""
    p = index.page_size(0)
    return torch.stack([index.units[index.head_unit[r]][slots // p, slots % p, index.head_slot[r]]
                        for r in range(index.num_heads)], dim=1)


def _written_mask(index, slot_mapping):
    """Per unit, ``[num_pages, P, slots]`` bool: the entries a write at ``slot_mapping`` touches."""
    masks = [torch.zeros(u.shape[:3], dtype=torch.bool, device=u.device) for u in index.units]
    slots = slot_mapping[slot_mapping >= 0]
    p = index.page_size(0)
    for r in range(index.num_heads):
        masks[index.head_unit[r]][slots // p, slots % p, index.head_slot[r]] = True
    return masks


def _assert_index_written(index, expected, slot_mapping, dtype):
    eps = max(torch.finfo(dtype).eps, 1e-5)  # 1 ulp of the cache dtype; the fp32 dot is good to ~1e-6
    for u, (got, want, written) in enumerate(zip(index.units, expected.units, _written_mask(index, slot_mapping))):
        assert not got[written].isnan().any(), f"unit {u}: a token's slot was not written"
        assert got[~written].isnan().all(), f"unit {u}: an entry no token maps to was written"
        torch.testing.assert_close(got[written].float(), want[written].float(), rtol=eps, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Interpreter tests.


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_index_queries(seed, case):
    x = _inputs(case)
    table = _table(x.spec, DEVICE)
    inputs = [x.query, x.positions, table, x.heads, x.w_q]
    before = [a.clone() for a in inputs]
    out = torch.full((case.t, len(case.heads), DI), float("nan"), device=DEVICE)
    ret = index_queries(*inputs, out, is_neox_style=x.spec.is_neox_style)
    assert ret is out
    assert all(torch.equal(a, b) for a, b in zip(inputs, before)), "inputs were modified"
    assert not out.isnan().any(), "some outputs were not written"
    ref = index_queries_ref(x.query, x.positions, x.spec, x.heads, x.w_q)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    _assert_recovered(out, x.q_pre[:, x.heads.long()], x.w_q, case.dtype)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_write_index_keys(seed, case):
    x = _inputs(case)
    table = _table(x.spec, DEVICE)
    hr = len(case.heads)
    index = _index_layout(x.num_pages, case.page, hr, case.dtype, DEVICE, num_units=1 + case.t % 3)
    expected = write_index_keys_ref(x.key, x.positions, x.spec, x.kv_heads, x.w_k, x.slot_mapping, index)
    inputs = [x.key, x.positions, table, x.kv_heads, x.w_k, x.slot_mapping]
    before = [a.clone() for a in inputs]
    ret = write_index_keys(*inputs, index, is_neox_style=x.spec.is_neox_style)
    assert ret is index
    assert all(torch.equal(a, b) for a, b in zip(inputs, before)), "inputs were modified"
    _assert_index_written(index, expected, x.slot_mapping, case.dtype)

    # Recovery of the pre-RoPE projection, read back through the slot mapping.
    valid = x.slot_mapping >= 0
    got = _read_back(index, x.slot_mapping[valid])
    _assert_recovered(got, x.k_pre[valid][:, x.kv_heads.long()], x.w_k, case.dtype)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES[:4]])
@pytest.mark.parametrize("decodes", [0, 1, "all"])
@pytest.mark.parametrize("per_token_up_to", [0, 1000], ids=["tiles", "per-token"])
def test_write_index_keys_with_queries(seed, monkeypatch, case, decodes, per_token_up_to):
    """Keys and the first TQ tokens' queries in one launch: the same bits as the two launches apart
    (queries into a buffer of their own dtype, bf16 here; rows past TQ untouched), with token tiles or one
    token per program for all three launches."""
    monkeypatch.setitem(index_keys_kernel.CONFIG, "per_token_up_to", per_token_up_to)
    x = _inputs(case)
    table = _table(x.spec, DEVICE)
    hr = len(case.heads)
    tq = case.t if decodes == "all" else min(decodes, case.t)
    index_apart = _index_layout(x.num_pages, case.page, hr, case.dtype, DEVICE, num_units=2)
    index_together = PagedHeads.from_units([u.clone() for u in index_apart.units], index_apart.head_unit,
                                           index_apart.head_slot)
    keys = [x.key, x.positions, table, x.kv_heads, x.w_k, x.slot_mapping]
    apart = torch.full((tq, hr, DI), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    write_index_keys(*keys, index_apart, is_neox_style=x.spec.is_neox_style)
    index_queries(x.query[:tq], x.positions[:tq], table, x.heads, x.w_q, apart, is_neox_style=x.spec.is_neox_style)
    together = torch.full((tq + 1, hr, DI), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    write_index_keys(*keys, index_together, is_neox_style=x.spec.is_neox_style,
                     queries=IndexQueries(x.query[:tq], x.heads, x.w_q, together[:tq]))
    assert torch.equal(together[:tq], apart) and together[tq:].isnan().all()
    for a, b in zip(index_apart.units, index_together.units):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def test_write_index_keys_queries_checked(seed):
    """Queries of more tokens than the keys', or of other shapes, are refused before any launch."""
    case = CASES[1]
    x = _inputs(case)
    table = _table(x.spec, DEVICE)
    hr = len(case.heads)
    index = _index_layout(x.num_pages, case.page, hr, case.dtype, DEVICE)
    keys = [x.key[:3], x.positions[:3], table, x.kv_heads, x.w_k, x.slot_mapping[:3]]
    out = torch.empty(4, hr, DI, device=DEVICE)
    with pytest.raises(ValueError, match="first TQ <= T=3 tokens"):
        write_index_keys(*keys, index, is_neox_style=False, queries=IndexQueries(x.query[:4], x.heads, x.w_q, out))
    with pytest.raises(ValueError, match="out must be a float"):
        write_index_keys(*keys, index, is_neox_style=False,
                         queries=IndexQueries(x.query[:2], x.heads, x.w_q, out[:2, :1]))
    with pytest.raises(ValueError, match="match the keys"):
        write_index_keys(*keys, index, is_neox_style=False,
                         queries=IndexQueries(x.query[:2], x.heads[:1], x.w_q[:1], out[:2, :1]))


def test_write_index_keys_all_padding_writes_nothing(seed):
    case = Case(7, 4, 4, (0, 1), 64, "neox", 16, torch.bfloat16)
    x = _inputs(case)
    index = _index_layout(x.num_pages, case.page, 2, case.dtype, DEVICE)
    write_index_keys(x.key, x.positions, _table(x.spec, DEVICE), x.kv_heads, x.w_k,
                     torch.full_like(x.slot_mapping, -1), index, is_neox_style=True)
    assert all(u.isnan().all() for u in index.units)


@pytest.mark.parametrize("case", [pytest.param(CASES[i], id=CASES[i].id) for i in (0, 3, 7)])
def test_write_index_keys_fp8(seed, case):
    """fp8 index units (uint8 bytes of float8_e4m3fn, vLLM's fp8 storage): keys stored unscaled, rounded
    to nearest even like :func:`quantize_fp8` (within one fp8 step where the float32 dot sits on a
    rounding boundary), saturated at +-448 instead of overflowing; untouched entries keep their bytes."""
    from rtpurbo_vllm.triton_kernels.paged_heads import to_float

    x = _inputs(case)
    hr = len(case.heads)
    unscaled = _index_layout(x.num_pages, case.page, hr, torch.float32, DEVICE)
    index = PagedHeads.from_units([torch.full(u.shape, 0xFF, dtype=torch.uint8, device=DEVICE)
                                   for u in unscaled.units], unscaled.head_unit, unscaled.head_slot)
    for w_k in (x.w_k, x.w_k * 1000.0):                        # the second overflows e4m3's range
        expected = write_index_keys_ref(x.key, x.positions, x.spec, x.kv_heads, w_k, x.slot_mapping, index)
        write_index_keys(x.key, x.positions, _table(x.spec, DEVICE), x.kv_heads, w_k, x.slot_mapping, index,
                         is_neox_style=x.spec.is_neox_style)
        for got, want, written in zip(index.units, expected.units, _written_mask(index, x.slot_mapping)):
            assert (got[~written] == 0xFF).all(), "an entry no token maps to was written"
            if not written.any():                                  # a unit of spare slots only
                continue
            g, w = to_float(got[written]), to_float(want[written])
            assert g.isfinite().all() and g.abs().max() <= 448
            torch.testing.assert_close(g, w, rtol=0.125, atol=2.0 ** -9)
            assert (g == w).float().mean() > 0.95


def test_fp32_cache_and_int64_head_ids(seed):
    """Cache dtype and head-id dtype are free: fp32 cache, int64 ids, fp32 W against bf16 keys."""
    case = Case(65, 8, 2, (2, 3, 7), 128, "yarn", 16, torch.bfloat16)
    x = _inputs(case)
    index = _index_layout(x.num_pages, case.page, 3, torch.float32, DEVICE)
    w_k, kv_heads = x.w_k.float(), x.kv_heads.long()
    expected = write_index_keys_ref(x.key, x.positions, x.spec, kv_heads, w_k, x.slot_mapping, index)
    write_index_keys(x.key, x.positions, _table(x.spec, DEVICE), kv_heads, w_k, x.slot_mapping, index,
                     is_neox_style=True)
    for got, want in zip(index.units, expected.units):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("rope", ["neox", "partial0.5-gptj", "linear", "yarn", "llama3"])
def test_rope_table_equals_vllm_cos_sin_cache(rope):
    """Same length and (fp32) values as the cos_sin_cache of vLLM's own rotary embedding."""
    pytest.importorskip("vllm")
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope
    from vllm.transformers_utils.config import patch_rope_parameters

    config = ROPES[rope](64)
    patch_rope_parameters(config)
    spec = _spec(rope, 64)
    with set_current_vllm_config(VllmConfig(device_config=DeviceConfig("cpu"))):
        vllm_rope = get_rope(64, max_position=config.max_position_embeddings, is_neox_style=spec.is_neox_style,
                             rope_parameters=config.rope_parameters, dtype=torch.float32)
    table = _table(spec, "cpu")
    assert rope_table_length(spec) == vllm_rope.cos_sin_cache.shape[0]
    assert table.dtype == torch.float32 and table.is_contiguous()
    torch.testing.assert_close(table, vllm_rope.cos_sin_cache, rtol=0, atol=0)
    positions = torch.tensor([0, 1, 4095, table.shape[0] - 1])
    assert torch.equal(table[positions], torch.cat(rope_cos_sin(spec, positions), dim=-1))
    assert rope_table(spec, "cpu", num_positions=10).shape == (10, spec.rotary_dim)


def test_bad_arguments_raise():
    case = Case(7, 4, 4, (0, 1), 64, "neox", 16, torch.bfloat16)
    x = _inputs(case, device="cpu")
    table = _table(x.spec, "cpu")
    out = torch.empty(7, 2, DI)
    index = PagedHeads.single(torch.empty(x.num_pages, 16, 2, DI, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out must be"):
        index_queries(x.query, x.positions, table, x.heads, x.w_q, out[:, :1], is_neox_style=True)
    with pytest.raises(ValueError, match="rope_table"):
        index_queries(x.query, x.positions, table.double(), x.heads, x.w_q, out, is_neox_style=True)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        index_queries(x.query.transpose(1, 2).contiguous().transpose(1, 2), x.positions, table, x.heads,
                      x.w_q, out, is_neox_style=True)
    with pytest.raises(ValueError, match="head ids"):
        index_queries(x.query, x.positions, table, x.heads[:1], x.w_q, out, is_neox_style=True)
    with pytest.raises(ValueError, match="index must hold"):
        write_index_keys(x.key, x.positions, table, x.kv_heads, x.w_k, x.slot_mapping,
                         PagedHeads.single(torch.empty(x.num_pages, 16, 1, DI, dtype=torch.bfloat16)),
                         is_neox_style=True)
    with pytest.raises(ValueError, match="index must hold"):
        write_index_keys(x.key, x.positions, table, x.kv_heads, x.w_k, x.slot_mapping,
                         PagedHeads.single(torch.zeros(x.num_pages, 16, 2, DI, dtype=torch.int32)),
                         is_neox_style=True)
    with pytest.raises(ValueError, match="one cache kind"):
        two = torch.empty(x.num_pages, 16, 1, DI, dtype=torch.bfloat16)
        write_index_keys(x.key, x.positions, table, x.kv_heads, x.w_k, x.slot_mapping,
                         PagedHeads.from_units([two, two.clone()], [0, 1], [0, 0], [0, 1]), is_neox_style=True)
    with pytest.raises(ValueError, match="slot_mapping"):
        write_index_keys(x.key, x.positions, table, x.kv_heads, x.w_k, x.slot_mapping[:3], index,
                         is_neox_style=True)
    with pytest.raises(TypeError, match="is_neox_style"):
        write_index_keys(x.key, x.positions, table, x.kv_heads, x.w_k, x.slot_mapping, index, is_neox_style=1)


@pytest.mark.parametrize("beyond", [0, 1, 1000], ids=["last-row+1", "last-row+2", "far"])
def test_query_positions_beyond_the_table_are_refused(beyond):
    """A table shorter than the positions would be clamped into (a wrong rotation): refused instead,
    while a table covering them gives the reference."""
    case = Case(7, 4, 4, (0, 1), 64, "neox", 16, torch.float32)
    x = _inputs(case, device="cpu")
    out = torch.empty(7, 2, DI)
    short = rope_table(x.spec, "cpu", num_positions=int(x.positions.max()) - beyond)
    with pytest.raises(ValueError, match=r"positions span \[\d+, \d+\] but the RoPE table has rows"):
        index_queries(x.query, x.positions, short, x.heads, x.w_q, out, is_neox_style=True)
    negative = x.positions.clone()
    negative[3] = -1
    with pytest.raises(ValueError, match=r"positions span \[-1, "):
        index_queries(x.query, negative, _table(x.spec, "cpu"), x.heads, x.w_q, out, is_neox_style=True)
    covering = rope_table(x.spec, "cpu", num_positions=int(x.positions.max()) + 1)
    index_queries(x.query, x.positions, covering, x.heads, x.w_q, out, is_neox_style=True)
    torch.testing.assert_close(out, index_queries_ref(x.query, x.positions, x.spec, x.heads, x.w_q),
                               rtol=1e-5, atol=1e-5)


def test_keys_beyond_the_table_come_out_nan(seed):
    """On a device nothing is read back: a position without a table row gives a NaN key, never a key
    rotated by a clamped angle; the others are exact."""
    case = Case(7, 4, 4, (0, 1), 64, "neox", 16, torch.float32)
    x = _inputs(case, device="cpu")
    last = int(x.positions[x.slot_mapping >= 0].max())
    short = rope_table(x.spec, "cpu", num_positions=last)            # no row for the last stored position
    index = _index_layout(x.num_pages, case.page, 2, torch.float32, "cpu")
    expected = write_index_keys_ref(x.key, x.positions, x.spec, x.kv_heads, x.w_k, x.slot_mapping, index)
    write_index_keys(x.key, x.positions, short, x.kv_heads, x.w_k, x.slot_mapping, index, is_neox_style=True)
    beyond = (x.positions >= last) & (x.slot_mapping >= 0)
    got, want = _read_back(index, x.slot_mapping[beyond]), _read_back(expected, x.slot_mapping[beyond])
    assert beyond.any() and got.isnan().all() and not want.isnan().any()
    inside = (x.positions < last) & (x.slot_mapping >= 0)
    torch.testing.assert_close(_read_back(index, x.slot_mapping[inside]), _read_back(expected, x.slot_mapping[inside]),
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# GPU tests: realistic sizes (Qwen3-8B-like layer), int64 cache offsets, CUDA-graph replay.

GPU_CASES = [
    pytest.param(Case(8192, 32, 8, (3, 4, 17, 18, 30), 128, "neox", 16, torch.bfloat16), id="T8192-neox-P16"),
    pytest.param(Case(8192, 32, 8, (0, 9, 10, 11, 31), 128, "yarn", 64, torch.bfloat16), id="T8192-yarn-P64"),
    pytest.param(Case(8192, 32, 8, (5, 6, 7, 20, 21), 128, "partial0.5-gptj", 64, torch.bfloat16),
                 id="T8192-partial-gptj-P64"),
]


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET, reason="realistic sizes need the compiled kernel (unset TRITON_INTERPRET)")
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_realistic(seed, case):
    x = _inputs(case, device="cuda")
    table = _table(x.spec, "cuda")
    hr = len(case.heads)
    out = torch.full((case.t, hr, DI), float("nan"), device="cuda")
    index_queries(x.query, x.positions, table, x.heads, x.w_q, out, is_neox_style=x.spec.is_neox_style)
    torch.testing.assert_close(out, index_queries_ref(x.query, x.positions, x.spec, x.heads, x.w_q),
                               rtol=1e-5, atol=1e-5)
    _assert_recovered(out, x.q_pre[:, x.heads.long()], x.w_q, case.dtype)

    index = _index_layout(x.num_pages, case.page, hr, case.dtype, "cuda")
    expected = write_index_keys_ref(x.key, x.positions, x.spec, x.kv_heads, x.w_k, x.slot_mapping, index)
    write_index_keys(x.key, x.positions, table, x.kv_heads, x.w_k, x.slot_mapping, index,
                     is_neox_style=x.spec.is_neox_style)
    _assert_index_written(index, expected, x.slot_mapping, case.dtype)


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET, reason="needs the compiled kernel (unset TRITON_INTERPRET)")
def test_gpu_int64_cache_offsets(seed):
    """A cache past 2**31 elements (4.3 GB bf16): slots near its end need int64 offsets."""
    case = Case(300, 8, 2, (1,), 128, "neox", 64, torch.bfloat16)
    x = _inputs(case, device="cuda")
    min_slot = (2**31 // DI) + 5 * case.page  # every written element is past 2**31
    slot_mapping, num_pages = _slot_mapping(case.t, case.page, "cuda", min_slot=min_slot)
    cache = torch.full((num_pages, case.page, 1, DI), float("nan"), dtype=case.dtype, device="cuda")
    assert cache.numel() > 2**31
    write_index_keys(x.key, x.positions, _table(x.spec, "cuda"), x.kv_heads, x.w_k, slot_mapping,
                     PagedHeads.single(cache), is_neox_style=True)
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    got = cache[slots // case.page, slots % case.page].float()
    want = index_keys_ref(x.key, x.positions, x.spec, x.kv_heads, x.w_k)[valid].to(case.dtype).float()
    torch.testing.assert_close(got, want, rtol=max(torch.finfo(case.dtype).eps, 1e-5), atol=1e-5)
    written = cache.flatten(0, 1)[:, 0, 0]
    assert int(written.isnan().logical_not().sum()) == int(valid.sum())


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET, reason="needs the compiled kernel (unset TRITON_INTERPRET)")
@pytest.mark.parametrize("t", [512, 4], ids=["tiles", "per-token"])
def test_gpu_cuda_graph_replay(seed, t):
    """Capture both ops once; refill the inputs' contents (new tokens, positions, slots) and replay: a
    prefill-sized launch (token tiles) and a decode-sized one (one token per program)."""
    case = Case(t, 32, 8, (3, 4, 17, 18, 30), 128, "yarn", 16, torch.bfloat16)
    first = _inputs(case, device="cuda")
    table = _table(first.spec, "cuda")
    hr = len(case.heads)
    bufs = {name: getattr(first, name).clone() for name in ("query", "key", "positions", "slot_mapping")}
    num_pages = first.num_pages + 4
    out = torch.full((case.t, hr, DI), float("nan"), device="cuda")
    index = _index_layout(num_pages, case.page, hr, case.dtype, "cuda")

    def run():
        index_queries(bufs["query"], bufs["positions"], table, first.heads, first.w_q, out,
                      is_neox_style=True)
        write_index_keys(bufs["key"], bufs["positions"], table, first.kv_heads, first.w_k,
                         bufs["slot_mapping"], index, is_neox_style=True)

    graph = capture(run)

    for _ in range(2):
        x = _inputs(case, device="cuda")
        # Same weights/heads as captured; fresh activations, positions and slots.
        for name in bufs:
            bufs[name].copy_(getattr(x, name))
        out.fill_(float("nan"))
        for u in index.units:
            u.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(
            out, index_queries_ref(bufs["query"], bufs["positions"], x.spec, first.heads, first.w_q),
            rtol=1e-5, atol=1e-5)
        expected = write_index_keys_ref(bufs["key"], bufs["positions"], x.spec, first.kv_heads, first.w_k,
                                        bufs["slot_mapping"], index)
        _assert_index_written(index, expected, bufs["slot_mapping"], case.dtype)
