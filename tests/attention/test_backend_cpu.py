"""The RTPURBO builder and impl inside real vLLM classes, on the CPU (kernels under the Triton interpreter).

A hand-made step mixes decodes, a chunked prefill on top of cached tokens (a prefix hit or an earlier
chunk) and a fresh prefill, over shuffled pages. The impl writes the caches and attention output;
the test compares them with the exact reference of the whole sequences.

Both KV layouts run, bf16 and fp8 caches: ``full`` (the default: one unit of every KV head per layer,
index units in the same KV-cache group) and ``compact`` (full, window and index units, each kind with
its own page size, block table and slot mapping, the units' metadata from their real builder through
the forward context; a layer's heads spread over several units). Window pages that hold no sink or
window token are vLLM's null block 0, filled with NaN, and every unheld slot is NaN too.
"""

import dataclasses
import logging
import os

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("CPU integration test (the GPU runs the gpu-marked end-to-end tests)", allow_module_level=True)
os.environ.setdefault("TRITON_INTERPRET", "1")

import transformers  # noqa: E402

from rtpurbo_vllm.artifacts import ModelFingerprint, RTPurboArtifact, SparsityParams, save_artifact  # noqa: E402
from rtpurbo_vllm.reference import rtpurbo_decode_keep_ref, rtpurbo_prefill_ref  # noqa: E402
from rtpurbo_vllm.rope import RopeSpec, apply_rope  # noqa: E402
from rtpurbo_vllm.triton_kernels.block_topp import expand_block_mask  # noqa: E402
from rtpurbo_vllm.triton_kernels.index_keys import index_keys_ref  # noqa: E402
from rtpurbo_vllm.triton_kernels.paged_heads import gather, quantize_fp8, scatter, to_float  # noqa: E402
from rtpurbo_vllm.triton_kernels.headwise_attention import masked_attention  # noqa: E402
from rtpurbo_vllm.triton_kernels.sparse_decode import sparse_decode_ref  # noqa: E402
from rtpurbo_vllm.triton_kernels.sparse_prefill import sparse_prefill_visible_ref  # noqa: E402

D, PAGE = 64, 16
# (HQ, HKV, retrieval heads per layer). Compact layout: "hkv2" keeps both KV heads in full (no window
# units); "hkv4" one full and three window KV heads per layer over three layers, whose heads share
# and straddle units.
CASES = {"hkv2": (4, 2, ((1,), (0, 3))), "hkv4": (8, 4, ((1,), (4, 5), (0, 6, 7)))}
PARAMS = SparsityParams(sink_tokens=4, window=24, top_p=0.8, block_size=16, index_dim=16, dense_threshold=0)
# (cached tokens, new tokens) per request, decodes first as vLLM orders them.
BATCH = [(36, 1), (129, 1), (50, 30), (0, 45)]


@pytest.fixture(params=[0, 100], ids=["sparse-everywhere", "dense-below-100"])
def dense_threshold(request):
    """With 100 the sequences of 37, 45 and 80 tokens run dense, the 130-token one sparse."""
    return request.param


@pytest.fixture(params=["hkv2", "hkv4"])
def case(request):
    return CASES[request.param]


def make_engine(tmp_path, case, dense_threshold, kv_layout="full", kv_cache_dtype="auto", prefill_top_p=None,
                index_key_dtype="auto"):
    """A real VllmConfig for a small Llama whose folder holds a random RTPurbo artifact."""
    from vllm.config import CacheConfig, DeviceConfig, ModelConfig, VllmConfig

    HQ, HKV, RETRIEVAL = case

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=128,
                                      num_hidden_layers=len(RETRIEVAL), num_attention_heads=HQ,
                                      num_key_value_heads=HKV, head_dim=D, max_position_embeddings=2048,
                                      architectures=["LlamaForCausalLM"])
    config.save_pretrained(tmp_path)
    indexer = tuple((torch.randn(len(h), 16, D) / 4, torch.randn(len(h), 16, D) / 4) for h in RETRIEVAL)
    params = dataclasses.replace(PARAMS, dense_threshold=dense_threshold,
                                 prefill_top_p=PARAMS.prefill_top_p if prefill_top_p is None else prefill_top_p)
    save_artifact(RTPurboArtifact(model=ModelFingerprint.from_hf_config(config), retrieval_heads=RETRIEVAL,
                                  params=params, indexer=indexer), tmp_path / "rtpurbo")
    model_config = ModelConfig(model=str(tmp_path), dtype="bfloat16", max_model_len=1024, skip_tokenizer_init=True)
    vllm_config = VllmConfig(model_config=model_config, device_config=DeviceConfig("cpu"),
                             cache_config=CacheConfig(block_size=PAGE, cache_dtype=kv_cache_dtype),
                             additional_config={"rtpurbo": {"kv_layout": kv_layout,
                                                            "index_key_dtype": index_key_dtype}})
    # As on a GPU: vLLM turns its hybrid KV-cache manager off on a CPU platform.
    vllm_config.scheduler_config.disable_hybrid_kv_cache_manager = False
    return vllm_config


@pytest.fixture
def engine(tmp_path, cpu_platform, seed, case, dense_threshold):
    return make_engine(tmp_path, case, dense_threshold)


def make_layers(vllm_config, case):
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.attention.attention import Attention

    from rtpurbo_vllm.attention.backend import RTPurboAttentionBackend

    HQ, HKV, RETRIEVAL = case
    with set_current_vllm_config(vllm_config):
        layers = [Attention(HQ, D, D ** -0.5, HKV, cache_config=vllm_config.cache_config,
                            prefix=f"model.layers.{i}.self_attn.attn", attn_backend=RTPurboAttentionBackend)
                  for i in range(len(RETRIEVAL))]
        for layer in layers:
            layer.process_weights_after_loading(torch.bfloat16)
    return layers


def bind_units(vllm_config, layout, names, pages: dict):
    """Binds every unit of ``layout`` (NaN-filled, ``pages[kind]`` pages) as vLLM would."""
    context = vllm_config.compilation_config.static_forward_context
    for kind, shape in layout.units.items():
        for name in layout.unit_names(tuple(names), kind):
            if kind == "index":          # NaN: 0x7F bytes for fp8 index units
                cache = torch.full((pages[kind], shape.block_size, shape.slots * shape.width),
                                   0x7F if shape.dtype == torch.uint8 else float("nan"), dtype=shape.dtype)
            else:
                cache = nan_cache(pages[kind], shape.block_size, shape.slots, shape.dtype)
            context[name].kv_cache = cache


def paged_group(page_size, held=None):
    """One KV-cache group's block table ``[B, max_pages]`` int32 and page count, for pages of
    ``page_size`` tokens: shuffled ids from 1 up; a page with no token ``t`` that ``held(b, t)``
    accepts is vLLM's null block 0 (a freed window page)."""
    rows = [[held is None or bool(held(b, torch.arange(i, min(i + page_size, c + n))).any())
             for i in range(0, c + n, page_size)] for b, (c, n) in enumerate(BATCH)]
    ids = (torch.randperm(sum(map(sum, rows))) + 1).tolist()
    table = torch.zeros(len(BATCH), max(map(len, rows)), dtype=torch.int32)
    for b, row in enumerate(rows):
        for i, real in enumerate(row):
            table[b, i] = ids.pop() if real else 0
    return table, len(ids) + 1 + int(table.max())


def manager_block_tables(vllm_config, num_blocks=1024):
    """The step's block tables from vLLM's real ``KVCacheManager`` over the specs the layers declare
    (RTPurbo's sink-keeping window and prefix-trimming managers), keyed by spec class name, and the
    page count. Earlier steps prefill the decodes' prompts and the first 50-token chunk of the
    chunked prefill; this step schedules the decode tokens, the second chunk and the fresh prompt."""
    import importlib.util
    import pathlib

    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

    path = pathlib.Path(__file__).parents[1] / "kv_cache" / "conftest.py"
    helpers = importlib.util.module_from_spec(importlib.util.spec_from_file_location("kv_cache_helpers", path))
    helpers.__spec__.loader.exec_module(helpers)
    context = vllm_config.compilation_config.static_forward_context
    specs = {name: layer.get_kv_cache_spec(vllm_config) for name, layer in context.items()
             if isinstance(layer, AttentionLayerBase)}
    kv = helpers.Engine(vllm_config, specs, num_blocks)
    requests = []
    for i, (cached, new) in enumerate(BATCH):
        request = kv.request(f"r{i}", [1000 * i + t for t in range(cached + (new > 1) * new)])
        if new == 1:
            assert kv.admit(request) == 0 and kv.decode(request)
        else:
            assert kv.admit(request, first_chunk=cached or None) == 0 and (not cached or kv.step(request, new))
        assert request.num_computed_tokens == cached + new
        requests.append(request)
    tables = {}
    for name in kv.groups:
        rows = [[block.block_id for block in kv.blocks(r, name)] for r in requests]
        table = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.int32)
        for b, row in enumerate(rows):
            table[b, :len(row)] = torch.tensor(row, dtype=torch.int32)
        tables[name] = table
    return tables, num_blocks


def common_metadata(block_table, page_size):
    from vllm.v1.attention.backend import CommonAttentionMetadata

    query_lens = [new for _, new in BATCH]
    seq_lens = [cached + new for cached, new in BATCH]
    query_start = torch.tensor([0] + query_lens).cumsum(0).int()
    positions = torch.cat([torch.arange(cached, cached + new) for cached, new in BATCH])
    slots = torch.cat([block_table[b, pos // page_size].long() * page_size + pos % page_size
                       for b, pos in enumerate(torch.arange(c, c + n) for c, n in BATCH)])
    return CommonAttentionMetadata(
        query_start_loc=query_start, query_start_loc_cpu=query_start, seq_lens=torch.tensor(seq_lens).int(),
        num_reqs=len(BATCH), num_actual_tokens=int(query_start[-1]), max_query_len=max(query_lens),
        max_seq_len=max(seq_lens), block_table_tensor=block_table, slot_mapping=slots,
        positions=positions)


def test_builder_splits_decodes_and_prefills(engine, case):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from rtpurbo_vllm.attention.builder import RTPurboMetadataBuilder

    spec = FullAttentionSpec(block_size=PAGE, num_kv_heads=case[1], head_size=D, dtype=torch.bfloat16)
    layers = make_layers(engine, case)
    layout = layers[0].impl.kv.layout
    bind_units(engine, layout, [layer.layer_name for layer in layers], {kind: 8 for kind in layout.units})
    builder = RTPurboMetadataBuilder(spec, ["model.layers.0.self_attn.attn"], engine, torch.device("cpu"))
    md = builder.build(0, common_metadata(paged_group(PAGE)[0], PAGE))
    assert md.num_decode_tokens == 2 and md.num_actual_tokens == 77
    assert md.decode.seq_lens.tolist() == [37, 130]
    assert md.prefill.cu_seqlens_q.tolist() == [0, 30, 75]
    assert md.prefill.seq_lens.tolist() == [80, 45]
    assert md.positions[:3].tolist() == [36, 129, 50]
    assert builder.max_blocks == 1024 // PARAMS.block_size
    assert layers[0].impl.kv.is_bound and not layers[1].impl.kv.is_bound     # the builder's own layers


def nan_cache(num_pages, page_size, num_kv_heads, dtype=torch.bfloat16):
    """A FlashAttention-layout cache: physical ``[N, P, H, 2D]`` NaN (0x7F bytes for fp8), returned as
    the logical ``[N, H, P, 2D]`` view vLLM binds."""
    shape = (num_pages, page_size, num_kv_heads, 2 * D)
    cache = torch.full(shape, 0x7F, dtype=dtype) if dtype == torch.uint8 else torch.full(shape, float("nan"),
                                                                                           dtype=dtype)
    return cache.permute(0, 2, 1, 3)


def decode_reference(q, k, v, q_pre, k_pre, heads, w_q, w_k, p, scale, kernel_blocks, near_tie=0.03,
                     index_scores=None):
    """``[HQ, D]`` float32: the reference decode of one sequence (``q`` ``[HQ, D]``, ``k``/``v`` its keys).

    Block top-p runs on bf16 index keys in the kernel and on exact ones here, so a retrieval head may
    pick another block set when two blocks' masses tie within rounding. ``index_scores`` (per retrieval
    head ``[n]``): judge the kernel's blocks on these scores instead of exact ones (fp8 index keys, whose
    rounding moves masses by more than a tie). Where ``kernel_blocks[r]``
    (the kernel's kept blocks of head ``r``) differs from the reference's, it is accepted if it is a
    top-p set of the exact masses up to ``near_tie`` (holds the forced blocks, reaches ``top_p`` and
    would fall below it without its lightest optional block), and the reference attends over it.
    """
    n = k.shape[0]
    cu_k = torch.tensor([0, n], dtype=torch.int32)
    keep = rtpurbo_decode_keep_ref(cu_k, q_pre[None], k_pre, heads, w_q.float(), w_k.float(), p.sink_tokens,
                                   p.window, p.top_p, p.block_size, p.dense_threshold)          # [HQ, n]
    group = q.shape[0] // k.shape[1]
    num_blocks = -(-n // p.block_size)
    for r, h in enumerate(heads):
        ref_blocks = sorted(set((keep[h].nonzero().flatten() // p.block_size).tolist()))
        if kernel_blocks[r] == ref_blocks:
            continue
        scores = (w_k[r].float() @ k_pre[:, h // group].float().t()).t() @ (w_q[r].float() @ q_pre[h].float()) \
            if index_scores is None else index_scores[r]
        mass = torch.zeros(num_blocks).index_add_(0, torch.arange(n) // p.block_size, torch.softmax(scores, 0))
        forced = set(range(-(-p.sink_tokens // p.block_size))) | {num_blocks - 1}
        chosen = mass[kernel_blocks[r]].sum()
        optional = [mass[b] for b in kernel_blocks[r] if b not in forced]
        assert forced <= set(kernel_blocks[r]) and chosen >= p.top_p - near_tie, (h, kernel_blocks[r], mass)
        assert not optional or chosen - min(optional) < p.top_p + near_tie, (h, kernel_blocks[r], mass)
        block_mask = torch.zeros(1, num_blocks, dtype=torch.bool)
        block_mask[0, kernel_blocks[r]] = True
        keep[h] = expand_block_mask(block_mask, n, p.block_size)[0]
    return sparse_decode_ref(q, k, v, keep, scale)[0]


@pytest.mark.parametrize("kv_layout, blocks, kv_cache_dtype, prefill_top_p, index_key_dtype", [
    ("full", "hand", "auto", 1.0, "auto"), ("compact", "hand", "auto", 1.0, "auto"),
    ("compact", "manager", "auto", 1.0, "auto"), ("compact", "hand", "fp8", 1.0, "auto"),
    ("full", "hand", "fp8_e4m3", 1.0, "auto"), ("full", "hand", "auto", 0.5, "auto"),
    ("compact", "hand", "fp8", 0.5, "auto"), ("compact", "hand", "fp8", 0.5, "model"),
    ("full", "hand", "auto", 0.5, "fp8_e4m3")])
def test_impl_matches_reference(tmp_path, cpu_platform, seed, monkeypatch, case, dense_threshold, kv_layout, blocks,
                                kv_cache_dtype, prefill_top_p, index_key_dtype):
    """``blocks``: hand-built block tables, or tables from vLLM's KV-cache manager (compact layout with
    three groups only: with every KV head full there is one group). FP8 caches: the reference reads
    K/V quantised as the cache stores them. ``prefill_top_p < 1``: the retrieval heads' prefill rows
    see, per query tile of 16 rows, the sink, diagonal and top-p blocks of the tile's index queries
    (the selection's inputs as the step computed and stored them). Index keys in one byte per value
    (``index_key_dtype`` fp8_e4m3, or auto with an fp8 cache): the decode's blocks judged on the scores
    of the stored keys."""
    from vllm.forward_context import set_forward_context

    from rtpurbo_vllm.attention import builder as builder_module
    from rtpurbo_vllm.attention.builder import RTPurboMetadataBuilder
    from rtpurbo_vllm.kv_cache.side_layers import UnitMetadataBuilder

    HQ, HKV, RETRIEVAL = case
    monkeypatch.setattr(builder_module, "TILE_Q", 16)       # several tiles per chunk
    engine = make_engine(tmp_path, case, dense_threshold, kv_layout, kv_cache_dtype, prefill_top_p, index_key_dtype)
    layers = make_layers(engine, case)
    names = tuple(layer.layer_name for layer in layers)
    layout = layers[0].impl.kv.layout
    spec = RopeSpec.from_hf_config(engine.model_config.hf_text_config)
    fp8 = kv_cache_dtype != "auto"
    fp8_index = index_key_dtype == "fp8_e4m3" or (fp8 and index_key_dtype == "auto")
    assert (layout.units["index"].dtype == torch.uint8) == fp8_index
    if blocks == "manager" and not layout.has("window"):
        pytest.skip("every KV head is full: one KV-cache group, covered with hand-built tables")
    managed, managed_pages = manager_block_tables(engine) if blocks == "manager" else (None, None)
    if kv_layout == "compact" and HKV == 4:
        assert any(len(layer.impl.kv.kv_units) > 2 for layer in layers)        # heads spread over units

    def held_window(b, t):
        cached = BATCH[b][0]
        return (t < PARAMS.sink_tokens) | (t > cached - PARAMS.window) | (cached + 1 < dense_threshold)

    # The KV-cache groups as vLLM forms them: per kind, its block table and pages.
    tables, pages, held = {}, {}, {}
    for kind, shape in layout.units.items():
        group_kind = "full" if not layout.has("window") else kind
        unit_spec_name = {"full": "RTPurboFullSpec", "window": "SinkWindowSpec", "index": "RTPurboIndexSpec"}[kind]
        held[kind] = held_window if kind == "window" else None
        if managed is not None:
            tables[kind], pages[kind] = managed[unit_spec_name], managed_pages
        elif group_kind != kind:          # one group: the index units share the full units' table
            tables[kind], pages[kind] = tables["full"], pages["full"]
        else:
            tables[kind], pages[kind] = paged_group(shape.block_size, held[kind])
    if layout.has("window") and managed is not None and not dense_threshold:
        assert (tables["window"][1, 1:6] == 0).all()          # freed window pages are the null block
    bind_units(engine, layout, names, pages)
    context = engine.compilation_config.static_forward_context
    attn_metadata = {}
    main_spec = layers[0].get_kv_cache_spec(engine)
    md = RTPurboMetadataBuilder(main_spec, list(names), engine, torch.device("cpu")).build(
        0, common_metadata(tables["full"], layout.units["full"].block_size))
    attn_metadata.update({name: md for name in names})
    for kind, shape in layout.units.items():
        side_names = [n for n in layout.unit_names(names, kind) if n not in names]
        if not side_names:
            continue
        unit_spec = context[side_names[0]].get_kv_cache_spec(engine)
        if kind == "window":
            assert unit_spec.sliding_window == PARAMS.window and unit_spec.dense_threshold == dense_threshold
        side_md = UnitMetadataBuilder(unit_spec, side_names, engine, torch.device("cpu")).build(
            0, common_metadata(tables[kind], shape.block_size))
        attn_metadata.update({name: side_md for name in side_names})

    for layer_idx, layer in enumerate(layers):
        impl, kv = layer.impl, layer.impl.kv
        assert kv.is_bound
        scales = (layer._k_scale, layer._v_scale)
        if fp8:
            layer._k_scale.fill_(0.5)
            layer._v_scale.fill_(2.0)
        # Whole sequences: pre-RoPE q/k, then post-RoPE as vLLM's attention receives them.
        seqs = []
        for cached, new in BATCH:
            n = cached + new
            pos = torch.arange(n)
            q_pre = torch.randn(n, HQ, D, dtype=torch.bfloat16)
            k_pre = torch.randn(n, HKV, D, dtype=torch.bfloat16)
            v = torch.randn(n, HKV, D, dtype=torch.bfloat16)
            seqs.append((q_pre, apply_rope(q_pre, pos, spec), k_pre, apply_rope(k_pre, pos, spec), v))
        kv_kinds = ("full", "window")
        kv_tables = [kv.kv.table(k, tables[kind]) if kv.kv.geometry[k:k + 1] not in ((), (None,)) else None
                     for k, kind in enumerate(kv_kinds)]
        index_table = kv.index.table(0, tables["index"]) if kv.index is not None else None
        kv_heads = torch.tensor([h // (HQ // HKV) for h in RETRIEVAL[layer_idx]])
        w_q, w_k = impl.heads.w_q, impl.heads.w_k

        def stored(x, scale):
            """What the cache holds for ``x`` (fp8: quantised), read back as the kernels read it."""
            return to_float(quantize_fp8(x, scale), scale) if fp8 else x.float()

        def stored_index_keys(x):
            """Index keys as the index units hold them: fp8 (unscaled) or bf16."""
            return quantize_fp8(x, 1.0) if fp8_index else x.to(torch.bfloat16)

        def slots_for(kind, b, t):
            page_size = layout.units[kind].block_size
            return tables[kind][b, t // page_size].long() * page_size + t % page_size

        for b, ((cached, _), (_, _, _, k, v)) in enumerate(zip(BATCH, seqs)):   # the cached history
            t = torch.arange(cached)
            for h in range(HKV):
                kind = kv_kinds[kv.kv.head_kind[h]]
                keep = t if held[kind] is None else t[held[kind](b, t)]
                mappings = [torch.full((cached,), -1, dtype=torch.long) for _ in kv_kinds]
                mappings[kv.kv.head_kind[h]][keep] = slots_for(kind, b, keep)
                packed = torch.cat([k[:cached, h], v[:cached, h]], -1)
                if fp8:
                    packed = torch.cat([quantize_fp8(k[:cached, h], scales[0]), quantize_fp8(v[:cached, h], scales[1])], -1)
                scatter(kv.kv, mappings, h, packed)
            if kv.index is not None:
                keys = stored_index_keys(index_keys_ref(k[:cached], t, spec, kv_heads, w_k))
                for r in range(len(RETRIEVAL[layer_idx])):
                    scatter(kv.index, [slots_for("index", b, t)], r, keys[:, r])
        query = torch.cat([q[c:] for (c, _), (_, q, _, _, _) in zip(BATCH, seqs)])
        key = torch.cat([k[c:] for (c, _), (_, _, _, k, _) in zip(BATCH, seqs)])
        value = torch.cat([v[c:] for (c, _), (_, _, _, _, v) in zip(BATCH, seqs)])
        output = torch.full_like(query, float("nan"))
        with set_forward_context(attn_metadata, engine):
            impl.forward(layer, query, key, value, layer.kv_cache, md, output)
        if md.prefill.sparse is not None and kv.index is not None:
            assert md.prefill.sparse.plan.tile_q == 16
            # The prefill rows' index queries as the step left them (the rows after the decodes).
            prefill_index_queries = md.prefill.sparse.index_queries[:query.shape[0] - md.num_decode_tokens,
                                                                    :len(RETRIEVAL[layer_idx])]
            prefill_index_queries = prefill_index_queries.clone()

        # Caches: every (held) token of every sequence is now in place.
        for b, (_, _, k_pre, k, v) in enumerate(seqs):
            t = torch.arange(k.shape[0])
            for h in range(HKV):
                kind = kv_kinds[kv.kv.head_kind[h]]
                keep = t if held[kind] is None else t[held[kind](b, t)]
                got = gather(kv.kv, kv_tables, b, h, keep)
                torch.testing.assert_close(to_float(got[:, :D], scales[0]), stored(k[keep, h], scales[0]))
                torch.testing.assert_close(to_float(got[:, D:], scales[1]), stored(v[keep, h], scales[1]))
            if kv.index is not None:
                want = index_keys_ref(k, t, spec, kv_heads, w_k)
                assert kv.index.is_fp8 == fp8_index
                for r in range(len(RETRIEVAL[layer_idx])):
                    torch.testing.assert_close(to_float(gather(kv.index, [index_table], b, r, t)), want[:, r],
                                               atol=0.05, rtol=0.07 if fp8_index else 0.02)

        # Attention output against the reference on whole sequences (decodes first, as in BATCH),
        # over K/V as the cache stores them.
        p = impl.params
        ws = md.decode.workspace
        row = dropped = 0
        for b, ((cached, new), (q_pre, q, k_pre, k, v)) in enumerate(zip(BATCH, seqs)):
            n = cached + new
            k_seen, v_seen = stored(k, scales[0]), stored(v, scales[1])
            cu_k = torch.tensor([0, n], dtype=torch.int32)
            if new == 1:
                kernel_blocks = [ws.selected[b, r, :ws.num_selected[b, r]].tolist()
                                 for r in range(len(RETRIEVAL[layer_idx]))]
                scores = [to_float(gather(kv.index, [index_table], b, r, torch.arange(n)))
                          @ ws.index_queries[b, r].float() for r in range(len(RETRIEVAL[layer_idx]))]
                want = decode_reference(q[-1], k_seen, v_seen, q_pre[-1], k_pre, RETRIEVAL[layer_idx], w_q, w_k, p,
                                        impl.scale, kernel_blocks, index_scores=scores)[None]
            else:
                want = rtpurbo_prefill_ref(q[cached:], k_seen, v_seen, torch.tensor([0, new], dtype=torch.int32),
                                           cu_k, RETRIEVAL[layer_idx], p.sink_tokens, p.window, p.dense_threshold,
                                           impl.scale)
                if p.prefill_top_p < 1 and RETRIEVAL[layer_idx]:
                    heads = list(RETRIEVAL[layer_idx])
                    k_idx = torch.stack([to_float(gather(kv.index, [index_table], b, r, torch.arange(n)))
                                         for r in range(len(heads))], 1)
                    first = row - md.num_decode_tokens
                    q_idx = prefill_index_queries[first:first + new]
                    _, visible = sparse_prefill_visible_ref(q_idx, k_idx, p.prefill_top_p, p.sink_tokens,
                                                            p.block_size, 16, p.dense_threshold)
                    dropped += len(heads) * int((torch.arange(cached, n) + 1).sum()) - int(visible.sum())
                    kv_of = [h // (HQ // HKV) for h in heads]
                    want[:, heads], _ = masked_attention(q[cached:, heads], k_seen[:, kv_of], v_seen[:, kv_of],
                                                         visible, impl.scale)
            got = output[row:row + new].float()
            torch.testing.assert_close(got, want, atol=0.03, rtol=0.03, msg=f"layer {layer_idx} request {b}")
            row += new
        if p.prefill_top_p < 1 and RETRIEVAL[layer_idx] and not dense_threshold:
            assert dropped, "the sparse prefill kept every key: the case does not test it"


def test_kv_layout_option(tmp_path, cpu_platform, seed):
    """The compact layout is the default; with vLLM's hybrid KV-cache manager off the default is the full
    layout and an explicit compact one is refused, naming the flag and the way out."""
    from rtpurbo_vllm.artifacts import ArtifactError
    from rtpurbo_vllm.attention.serving_config import kv_layout_for

    assert kv_layout_for(make_engine(tmp_path, CASES["hkv2"], 0, kv_layout="full")) == "full"
    engine = make_engine(tmp_path, CASES["hkv2"], 0)
    engine.additional_config = {}
    assert kv_layout_for(engine) == "compact"
    engine.scheduler_config.disable_hybrid_kv_cache_manager = True
    assert kv_layout_for(engine) == "full"
    engine.additional_config = {"rtpurbo": {"kv_layout": "compact"}}
    with pytest.raises(ArtifactError, match=r"\"compact\", which needs vLLM's hybrid KV-cache manager, and it is "
                                            r"off \(--disable-hybrid-kv-cache-manager.*\"kv_layout\": \"full\""):
        kv_layout_for(engine)
    engine = make_engine(tmp_path, CASES["hkv2"], 0, kv_layout="split")
    with pytest.raises(ArtifactError, match=r"kv_layout' must be one of \['compact', 'full'\], got 'split'"):
        kv_layout_for(engine)


def test_index_key_dtype_option(tmp_path, cpu_platform, seed):
    """``index_key_dtype``: "auto" (the default: one byte per value, the index units uint8, with an fp8
    K/V cache, else the model's dtype), "model" (the model's dtype) or "fp8_e4m3" (one byte per value);
    anything else is refused naming the option and its values."""
    from rtpurbo_vllm.artifacts import ArtifactError
    from rtpurbo_vllm.attention.serving_config import index_key_dtype_for, serving_kv_layout, serving_artifact
    from rtpurbo_vllm.kv_cache import INDEX

    engine = make_engine(tmp_path, CASES["hkv2"], 0, kv_layout="compact", index_key_dtype="fp8_e4m3")
    assert index_key_dtype_for(engine) == "fp8_e4m3"
    layout = serving_kv_layout(engine, serving_artifact(engine), "compact", torch.bfloat16, torch.bfloat16)
    assert layout.units[INDEX].dtype == torch.uint8
    engine.additional_config = {"rtpurbo": {}}
    assert index_key_dtype_for(engine) == "auto"
    for kv_dtype, index_dtype in ((torch.uint8, torch.uint8), (torch.bfloat16, torch.bfloat16)):
        layout = serving_kv_layout(engine, serving_artifact(engine), "compact", kv_dtype, torch.bfloat16)
        assert layout.units[INDEX].dtype == index_dtype
    engine.additional_config = {"rtpurbo": {"index_key_dtype": "model"}}
    assert serving_kv_layout(engine, serving_artifact(engine), "compact", torch.uint8,
                             torch.bfloat16).units[INDEX].dtype == torch.bfloat16
    engine.additional_config = {"rtpurbo": {"index_key_dtype": "fp8"}}
    with pytest.raises(ArtifactError,
                       match=r"index_key_dtype' must be one of \['auto', 'model', 'fp8_e4m3'\], got 'fp8'"):
        index_key_dtype_for(engine)


def test_kv_layout_logged(tmp_path, cpu_platform, seed, caplog):
    """Planning the serving layout logs it once per process: its units, its capacity against FLASH_ATTN
    at ``max_model_len`` and, for the compact layout, why vLLM's own concurrency line says less."""
    from rtpurbo_vllm.attention.serving_config import serving_artifact, serving_kv_layout

    for name, peak in (("compact", True), ("full", False)):
        engine = make_engine(tmp_path / name, CASES["hkv2"], 0, kv_layout=name)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="rtpurbo_vllm.attention.serving_config"):
            for _ in range(2):
                layout = serving_kv_layout(engine, serving_artifact(engine), name, torch.bfloat16, torch.bfloat16)
        lines = [r.getMessage() for r in caplog.records if f"KV layout {name!r}" in r.getMessage()]
        assert len(lines) == 1, lines
        assert f"capacity vs FLASH_ATTN (same KV dtype) at 1024 tokens: {layout.capacity_ratio(1024):.2f}x" in lines[0]
        assert ("Maximum concurrency" in lines[0]) == peak


def test_sparsity_overrides(tmp_path, cpu_platform, seed):
    """``--additional-config '{"rtpurbo": {"top_p": ..., "prefill_top_p": ...}}'`` replaces the artifact's
    values for every layer; a value the artifact rules refuse names the option and the rule."""
    from rtpurbo_vllm.artifacts import ArtifactError
    from rtpurbo_vllm.attention.serving_config import serving_params

    engine = make_engine(tmp_path, CASES["hkv2"], 0)
    assert serving_params(engine) == PARAMS
    engine.additional_config = {"rtpurbo": {"top_p": 0.5, "prefill_top_p": 0.95}}
    assert serving_params(engine) == dataclasses.replace(PARAMS, top_p=0.5, prefill_top_p=0.95)
    assert all(layer.impl.params == serving_params(engine) for layer in make_layers(engine, CASES["hkv2"]))
    option = r"--additional-config 'rtpurbo.prefill_top_p' is"
    for value, message in ((0, rf"{option} 0.0, must be in \(0, 1\]"), (1.5, rf"{option} 1.5, must be in \(0, 1\]"),
                           ("0.9", rf"{option} '0.9', must be a number"), (True, rf"{option} True, must be a number")):
        engine.additional_config = {"rtpurbo": {"prefill_top_p": value}}
        with pytest.raises(ArtifactError, match=message):
            serving_params(engine)
    engine.additional_config = {"rtpurbo": {"decode_top_p": 0.9}}
    with pytest.raises(ArtifactError, match=r"keys \['artifact', 'index_key_dtype', 'kv_layout', "
                                                       r"'prefill_top_p', 'top_p'\]"):
        serving_params(engine)
