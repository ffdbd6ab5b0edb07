"""The start-up warm-up (``rtpurbo_vllm.attention.warmup``) on the CPU, with the real builder, impl and caches.

1. It runs every kernel of the serving path (decode and prefill; top-p below 1 and 1), for the full and
   compact KV layouts, bf16 and fp8 caches, and leaves every cache byte as it was.
2. The kernel variants a sequence of differently sized real steps launches (Triton's own
   specialisation keys, ``tests/triton_launches.py``) are all among those the warm-up launched; without
   the kernels' ``do_not_specialize`` annotations they would not be.
3. The builder warms up at its first build, once, and only on a GPU.

The GPU prefill (``headwise_prefill``: FA3 calls and the sink-merge kernel) runs here with FA3 replaced
by a stub that checks its arguments and returns zeros, so the sink merge's launches are recorded too.
The decode workspace gets 2 split slots per sequence (at most 4 splits) instead of 32 (64), which
keeps the interpreter fast and still gives two split counts ``S`` over ``MAX_REQS`` decodes.
"""

import dataclasses
import functools
import importlib.util
import os
import pathlib
import sys
import types

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("CPU integration test (a GPU compiles for real)", allow_module_level=True)
os.environ.setdefault("TRITON_INTERPRET", "1")

_path = pathlib.Path(__file__).with_name("test_backend_cpu.py")
cpu = importlib.util.module_from_spec(importlib.util.spec_from_file_location("rtpurbo_backend_cpu_warmup", _path))
cpu.__spec__.loader.exec_module(cpu)

import rtpurbo_vllm.attention.builder as builder_module  # noqa: E402
import rtpurbo_vllm.attention.impl as impl_module  # noqa: E402
import rtpurbo_vllm.attention.prefill as prefill_module  # noqa: E402
from rtpurbo_vllm.attention.prefill import headwise_prefill  # noqa: E402
from rtpurbo_vllm.attention.warmup import WarmupStep, step_metadata, warm_up, warmup_steps  # noqa: E402
from rtpurbo_vllm.kv_cache.layout import FULL, INDEX, WINDOW  # noqa: E402
from rtpurbo_vllm.triton_kernels.sparse_decode import allocate_sparse_decode_workspace  # noqa: E402

D = cpu.D
CASE = cpu.CASES["hkv4"]        # 8 query / 4 KV heads; 1, 2 and 3 retrieval heads in 3 layers
MAX_REQS = 8                    # max_num_seqs: split counts 4 (1-4 decodes) and 2 (5-8 decodes)
NUM_PAGES = 96
SERVING_KERNELS = {"_kv_write_kernel", "_index_vectors_kernel", "_block_stats_kernel",
                   "_select_kernel", "_split_kernel", "_combine_kernel", "_merge_sinks_kernel"}
SPARSE_PREFILL_KERNELS = {"_score_kernel", "_attend_kernel"}   # and its own _select_kernel
# Real steps, (cached, new) tokens per request, decodes first, of many request, token and decode counts:
# pure decodes of both split counts, mixed steps, prefills under and over the window (24 tokens; 4
# sinks, 16-token pages, max_model_len 1024), token counts divisible by 16 and not.
REAL_STEPS = [
    [(40, 1)],
    [(40, 1), (7, 1), (99, 1)],
    [(12, 1)] * 6,
    [(36, 1), (129, 1), (50, 30), (0, 45)],
    [(3, 1), (30, 16)],
    [(0, 2)],
    [(900, 17)],
    [(5, 1), (6, 1), (7, 1), (0, 33)],
    [(20, 1)] * MAX_REQS,
]


@pytest.fixture
def small_splits(monkeypatch):
    monkeypatch.setattr(builder_module, "allocate_sparse_decode_workspace",
                        functools.partial(allocate_sparse_decode_workspace, splits_per_seq=2, max_splits=4))


@pytest.fixture
def gpu_prefill(monkeypatch):
    """The impl runs the GPU prefill on CPU tensors, FA3 stubbed; yields the kinds of FA3 call made."""
    calls = []

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k, block_table,
                               softmax_scale, causal, fa_version, out=None, window_size=None,
                               return_softmax_lse=False, q_descale=None, k_descale=None, v_descale=None):
        assert fa_version == 3 and causal and k.shape == v.shape and q.shape[2] == k.shape[3]
        assert q.shape[1] % k.shape[2] == 0 and cu_seqlens_q[-1] == q.shape[0] and max_seqlen_q >= 1
        assert cu_seqlens_q.dtype == seqused_k.dtype == torch.int32 and seqused_k.is_contiguous()
        assert block_table.dtype == torch.int32 and block_table.shape[0] == seqused_k.shape[0]
        assert block_table.shape[1] * k.shape[1] >= max_seqlen_k      # the table covers max_seqlen_k keys
        assert (q_descale is not None) == (q.dtype == torch.float8_e4m3fn)
        calls.append("windowed" if window_size else "causal")
        out = torch.zeros(q.shape, dtype=q.dtype) if out is None else out.zero_()
        return (out, torch.zeros(q.shape[1], q.shape[0])) if return_softmax_lse else out

    fa = types.ModuleType("vllm.vllm_flash_attn")
    fa.flash_attn_varlen_func = flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "vllm.vllm_flash_attn", fa)
    monkeypatch.setattr(impl_module, "headwise_prefill_torch", headwise_prefill)
    yield calls


@pytest.fixture
def recorder(triton_launch_recorder):
    if not triton_launch_recorder.installed:
        pytest.skip("Triton launches are recorded only under TRITON_INTERPRET=1 without a GPU")
    return triton_launch_recorder


class Served:
    """The layers of a small model as vLLM serves them: caches bound (random contents), the RTPURBO
    builder and the side units' builders, and vLLM's persistent per-step buffers."""

    def __init__(self, tmp_path, kv_layout, kv_cache_dtype="auto"):
        self.engine = cpu.make_engine(tmp_path, CASE, 0, kv_layout, kv_cache_dtype)
        self.engine.scheduler_config.max_num_seqs = MAX_REQS
        self.layers = cpu.make_layers(self.engine, CASE)
        self.layout = self.layers[0].impl.kv.layout
        self.bind_caches()
        max_tokens = 1024
        self.query_start_loc = torch.zeros(MAX_REQS + 1, dtype=torch.int32)
        self.seq_lens = torch.zeros(MAX_REQS, dtype=torch.int32)
        self.positions = torch.zeros(max_tokens, dtype=torch.int64)
        max_len = self.engine.model_config.max_model_len
        self.tables = {kind: torch.zeros(MAX_REQS, -(-max_len // s.block_size), dtype=torch.int32)
                       for kind, s in self.layout.units.items()}
        self.slots = {kind: torch.zeros(max_tokens, dtype=torch.int64) for kind in self.layout.units}

    def bind_caches(self):
        """What vLLM does once it allocated a KV cache: binds fresh unit tensors (random contents) and makes
        the RTPURBO builder and the side units' builders for them."""
        from rtpurbo_vllm.attention.builder import RTPurboMetadataBuilder
        from rtpurbo_vllm.kv_cache.side_layers import UnitMetadataBuilder

        names = tuple(layer.layer_name for layer in self.layers)
        kv = self.layers[0].impl.kv
        cpu.bind_units(self.engine, self.layout, names, {kind: NUM_PAGES for kind in self.layout.units})
        context = self.engine.compilation_config.static_forward_context
        self.units = {name: context[name].kv_cache for kind in self.layout.units
                      for name in self.layout.unit_names(names, kind)}
        for cache in self.units.values():
            if cache.dtype == torch.uint8:
                cache.copy_(torch.randint(0, 256, cache.shape, dtype=torch.uint8))
            else:
                cache.normal_()
        self.builder = RTPurboMetadataBuilder(self.layers[0].get_kv_cache_spec(self.engine), list(names), self.engine,
                                              torch.device("cpu"))
        self.side = {name: (kind, UnitMetadataBuilder(context[name].get_kv_cache_spec(self.engine), [name],
                                                      self.engine, torch.device("cpu")))
                     for name, kind in ((kv.window_group, WINDOW), (kv.index_group, INDEX)) if name is not None}

    def cache_bytes(self):
        return {name: cache.contiguous().view(torch.uint8).clone() for name, cache in self.units.items()}

    def step(self, batch, pad=3):
        """One real step of ``batch`` ((cached, new) per request, decodes first) over fresh pages, with
        the model's q/k/v as vLLM hands them over (views of one qkv tensor) and ``pad`` padding tokens."""
        from vllm.forward_context import set_forward_context
        from vllm.v1.attention.backend import CommonAttentionMetadata

        num_reqs, query_lens = len(batch), [new for _, new in batch]
        seq_lens = [cached + new for cached, new in batch]
        num_tokens = sum(query_lens)
        self.query_start_loc[:num_reqs + 1] = torch.tensor([0] + query_lens).cumsum(0)
        self.seq_lens[:num_reqs] = torch.tensor(seq_lens)
        pos = torch.cat([torch.arange(c, c + n) for c, n in batch])
        self.positions[:num_tokens] = pos
        req = torch.repeat_interleave(torch.arange(num_reqs), torch.tensor(query_lens))
        common = {}
        for kind, shape in self.layout.units.items():
            page, table, slots = shape.block_size, self.tables[kind], self.slots[kind]
            table.zero_()
            first = 1
            for b, n in enumerate(seq_lens):
                pages = -(-n // page)
                table[b, :pages] = torch.arange(first, first + pages)
                first += pages
            assert first <= NUM_PAGES
            slots[:num_tokens] = table[req, pos // page].long() * page + pos % page
            common[kind] = CommonAttentionMetadata(
                query_start_loc=self.query_start_loc[:num_reqs + 1],
                query_start_loc_cpu=self.query_start_loc[:num_reqs + 1].clone(), seq_lens=self.seq_lens[:num_reqs],
                num_reqs=num_reqs, num_actual_tokens=num_tokens, max_query_len=max(query_lens),
                max_seq_len=max(seq_lens), block_table_tensor=table[:num_reqs], slot_mapping=slots[:num_tokens],
                positions=self.positions[:num_tokens])
        md = self.builder.build(0, common[FULL])
        groups = {layer.layer_name: md for layer in self.layers}
        groups.update({name: unit_builder.build(0, common[kind]) for name, (kind, unit_builder) in self.side.items()})
        hq, hkv, _ = CASE
        qkv = torch.randn(num_tokens + pad, (hq + 2 * hkv) * D, dtype=torch.bfloat16)
        q, k, v = qkv.split([hq * D, hkv * D, hkv * D], dim=-1)
        out = torch.empty(num_tokens + pad, hq * D, dtype=torch.bfloat16).view(-1, hq, D)
        with set_forward_context(groups, self.engine):
            for layer in self.layers:
                layer.impl.forward(layer, q.view(-1, hq, D), k.view(-1, hkv, D), v.view(-1, hkv, D), layer.kv_cache,
                                   md, out)


def kernels(launched):
    return {v.kernel.rsplit(".", 1)[1] for v, _ in launched}


@pytest.mark.slow
@pytest.mark.parametrize("kv_layout, kv_cache_dtype, top_p", [
    ("full", "auto", 0.8), ("full", "auto", 1.0), ("compact", "auto", 0.8), ("compact", "fp8", 1.0),
    ("full", "fp8_e4m3", 0.8)])
def test_warm_up_runs_every_kernel_and_writes_no_cache(tmp_path, cpu_platform, monkeypatch, seed, small_splits,
                                                       gpu_prefill, recorder, kv_layout, kv_cache_dtype, top_p):
    monkeypatch.setattr(cpu, "PARAMS", dataclasses.replace(cpu.PARAMS, top_p=top_p))
    served = Served(tmp_path, kv_layout, kv_cache_dtype)
    if kv_layout == "compact":
        assert served.layout.has(WINDOW)
    before = served.cache_bytes()
    with recorder.variants() as launched:
        warm_up(served.builder)
    after = served.cache_bytes()
    assert all(torch.equal(before[name], after[name]) for name in before), "the warm-up wrote a cache"
    assert kernels(launched) == SERVING_KERNELS
    assert {"windowed", "causal"} <= set(gpu_prefill)
    # It also serves the real steps afterwards (the builder's workspace is scratch).
    served.step(REAL_STEPS[3])


@pytest.mark.slow
@pytest.mark.parametrize("kv_layout, prefill_top_p", [("full", 1.0), ("compact", 1.0), ("compact", 0.5)])
def test_real_steps_launch_only_variants_the_warm_up_compiled(tmp_path, cpu_platform, monkeypatch, seed, small_splits,
                                                               gpu_prefill, recorder, kv_layout, prefill_top_p):
    """``prefill_top_p < 1``: the retrieval heads' sparse prefill kernels too. The real steps of more query
    rows than any warm-up step (70 here) run the local heads' windows per run of local heads, the warm-up
    per whole GQA group: the sink merge must not compile a variant per run."""
    monkeypatch.setattr(cpu, "PARAMS", dataclasses.replace(cpu.PARAMS, prefill_top_p=prefill_top_p))
    monkeypatch.setattr(prefill_module, "EXACT_RUNS_MIN_TOKENS", 70)
    served = Served(tmp_path, kv_layout)
    with recorder.variants() as launched:
        warm_up(served.builder)
    warmed, warmed_plain = {v for v, _ in launched}, {p for _, p in launched}
    with recorder.variants() as launched:
        for batch in REAL_STEPS:
            served.step(batch)
    real, real_plain = {v for v, _ in launched}, {p for _, p in launched}
    assert kernels(launched) == SERVING_KERNELS | (SPARSE_PREFILL_KERNELS if prefill_top_p < 1 else set())

    def explain(variant):
        same_kernel = [w for w in warmed if w.kernel == variant.kernel]
        closest = min(same_kernel, key=lambda w: len(variant.differences(w)), default=None)
        return f"{variant.kernel}: " + ("never warmed" if closest is None else
                                        "; ".join(variant.differences(closest)) + " (real != closest warmed)")
    missing = real - warmed
    assert not missing, "variants the warm-up did not compile:\n" + "\n".join(map(explain, missing))
    # Without the kernels' annotations the real steps would need variants the warm-up never launched.
    assert real_plain - warmed_plain


def test_first_build_warms_up_once_on_a_gpu(tmp_path, cpu_platform, monkeypatch):
    served = Served(tmp_path, "full")
    warmed = []
    monkeypatch.setattr(builder_module, "warm_up", warmed.append)
    page = served.layout.units[FULL].block_size
    common = step_metadata(WarmupStep(1), page, torch.device("cpu"))
    served.builder.build(0, common)
    assert warmed == [] and served.layers[0].impl.kv.is_bound            # the CPU compiles nothing
    other = builder_module.RTPurboMetadataBuilder(served.layers[0].get_kv_cache_spec(served.engine),
                                                  [served.layers[0].layer_name], served.engine, torch.device("cpu"))
    other.device = torch.device("cuda")                                   # what the first build looks at
    other.build(0, common)
    other.build(0, common)
    assert warmed == [other]


def test_metadata_less_forward_warms_up_once_the_caches_exist(tmp_path, cpu_platform, monkeypatch):
    """The V1 model runner without full CUDA graphs builds no metadata before the first request; its
    dummy runs after the caches are allocated warm up instead (the profiling run, before, does not)."""
    served = Served(tmp_path, "full")
    warmed = []
    monkeypatch.setattr(builder_module, "warm_up", warmed.append)
    served.builder.device = torch.device("cuda")                          # what prepare looks at
    layer, (hq, hkv, _) = served.layers[0], CASE
    q, k = torch.zeros(3, hq, D, dtype=torch.bfloat16), torch.zeros(3, hkv, D, dtype=torch.bfloat16)
    out = torch.ones_like(q)
    layer.impl.forward(layer, q, k, k, torch.tensor([]), None, out)         # the profiling run: no caches yet
    assert warmed == [] and not out.any()
    for _ in range(2):
        layer.impl.forward(layer, q, k, k, layer.kv_cache, None, out)
    assert warmed == [served.builder] and served.layers[-1].impl.kv.is_bound
    served.builder.build(0, step_metadata(WarmupStep(1), served.layout.units[FULL].block_size, torch.device("cpu")))
    assert warmed == [served.builder]                                      # the first build: already prepared


def test_layers_follow_the_caches_vllm_binds_last(tmp_path, cpu_platform, small_splits):
    """vLLM's V1 model runner measures its CUDA graphs' memory on a minimal KV cache, with builders of its
    own, frees that cache, then binds the real one and makes new builders. The layers must address the
    real cache from the new builders' first build on (on a GPU, writing into the freed one is an illegal
    memory access)."""
    def written_units(step):
        before = served.cache_bytes()
        served.step(step)
        return {name for name, cache in served.cache_bytes().items() if not torch.equal(cache, before[name])}

    served = Served(tmp_path, "compact")
    step = [(40, 1), (0, 17)]
    profiling = served.units
    written = written_units(step)                      # the profiling builders, the minimal cache
    names = tuple(layer.layer_name for layer in served.layers)
    kinds = {name: kind for kind in served.layout.units for name in served.layout.unit_names(names, kind)}
    assert {kinds[name] for name in written} == {FULL, WINDOW, INDEX}
    profiling_bytes = served.cache_bytes()
    served.bind_caches()                               # the real cache, new builders
    assert written_units(step) == written
    assert all(torch.equal(cache.contiguous().view(torch.uint8), profiling_bytes[name])
               for name, cache in profiling.items())


def test_warmup_steps_cover_every_split_count():
    workspace = allocate_sparse_decode_workspace(256, 4, 64)
    steps = warmup_steps(256, workspace.splits_for_batch, 40960)
    assert steps == [WarmupStep(1, ((2, 2), (2, 40960))), WarmupStep(0, ((2, 2),)),
                     WarmupStep(1, ((17, 17), (17, 40960))), WarmupStep(0, ((17, 17),)), WarmupStep(1), WarmupStep(129)]
    assert {workspace.splits_for_batch(b) for b in range(1, 257)} == {64, 32}
    md = step_metadata(steps[0], 16, torch.device("cpu"))
    assert md.slot_mapping.tolist() == [-1] * 5 and not md.block_table_tensor.any()
    assert md.block_table_tensor.shape == (3, 2560) and md.positions.tolist() == [0, 0, 1, 40958, 40959]
    assert md.query_start_loc.tolist() == [0, 1, 3, 5] and md.max_seq_len == 40960
