"""The RTPURBO builder and impl inside real vLLM classes, on the CPU (kernels under the Triton interpreter).

A hand-made step mixes decodes, a chunked prefill on top of cached tokens (a prefix hit or an earlier
chunk) and a fresh prefill, over shuffled pages. The impl writes the caches and attention output;
the test compares them with the exact reference of the whole sequences.

Both KV layouts run: ``full`` (one cache of every KV head, index keys in the same group) and
``split`` (``--additional-config '{"rtpurbo": {"kv_layout": "split"}}'``: main, window and index
caches, each with its own page size, block table and slot mapping, the side layers' metadata from
their real builder through the forward context). In the split layout, window pages that hold no
sink or window token are vLLM's null block 0, filled with NaN, and every unheld slot is NaN too.
"""

import dataclasses
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
from rtpurbo_vllm.triton_kernels.sparse_decode import sparse_decode_ref  # noqa: E402

D, PAGE = 64, 16
# (HQ, HKV, retrieval heads per layer). Split layout: "hkv2" keeps both KV heads in full (no window
# cache); "hkv4" keeps one (blocks main/window/index = 48/16/192 tokens).
CASES = {"hkv2": (4, 2, ((1,), (0, 3))), "hkv4": (8, 4, ((1,), (4, 5)))}
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


def make_engine(tmp_path, case, dense_threshold, kv_layout="full"):
    """A real VllmConfig for a small Llama whose folder holds a random RTPurbo artifact."""
    from vllm.config import CacheConfig, DeviceConfig, ModelConfig, VllmConfig

    HQ, HKV, RETRIEVAL = case

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=128,
                                      num_hidden_layers=len(RETRIEVAL), num_attention_heads=HQ,
                                      num_key_value_heads=HKV, head_dim=D, max_position_embeddings=2048,
                                      architectures=["LlamaForCausalLM"])
    config.save_pretrained(tmp_path)
    indexer = tuple((torch.randn(len(h), 16, D) / 4, torch.randn(len(h), 16, D) / 4) for h in RETRIEVAL)
    params = dataclasses.replace(PARAMS, dense_threshold=dense_threshold)
    save_artifact(RTPurboArtifact(model=ModelFingerprint.from_hf_config(config), retrieval_heads=RETRIEVAL,
                                  params=params, indexer=indexer), tmp_path / "rtpurbo")
    model_config = ModelConfig(model=str(tmp_path), dtype="bfloat16", max_model_len=1024, skip_tokenizer_init=True)
    return VllmConfig(model_config=model_config, device_config=DeviceConfig("cpu"),
                      cache_config=CacheConfig(block_size=PAGE),
                      additional_config={"rtpurbo": {"kv_layout": kv_layout}})


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


def manager_block_tables(vllm_config, num_blocks=128):
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
    vllm_config.scheduler_config.disable_hybrid_kv_cache_manager = False
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
    make_layers(engine, case)
    builder = RTPurboMetadataBuilder(spec, ["model.layers.0.self_attn.attn"], engine, torch.device("cpu"))
    md = builder.build(0, common_metadata(paged_group(PAGE)[0], PAGE))
    assert md.num_decode_tokens == 2 and md.num_actual_tokens == 77
    assert md.decode.seq_lens.tolist() == [37, 130]
    assert md.prefill.cu_seqlens_q.tolist() == [0, 30, 75]
    assert md.prefill.seq_lens.tolist() == [80, 45]
    assert md.positions[:3].tolist() == [36, 129, 50]
    assert builder.max_blocks == 1024 // PARAMS.block_size


def nan_cache(num_pages, page_size, num_kv_heads):
    """A FlashAttention-layout cache: physical ``[N, P, H, 2D]`` NaN, returned as the logical
    ``[N, H, P, 2D]`` view vLLM binds."""
    return torch.full((num_pages, page_size, num_kv_heads, 2 * D), float("nan"), dtype=torch.bfloat16
                      ).permute(0, 2, 1, 3)


def decode_reference(q, k, v, q_pre, k_pre, heads, w_q, w_k, p, scale, kernel_blocks, near_tie=0.02):
    """``[HQ, D]`` float32: the reference decode of one sequence (``q`` ``[HQ, D]``, ``k``/``v`` its keys).

    Block top-p runs on bf16 index keys in the kernel and on exact ones here, so a retrieval head may
    pick another block set when two blocks' masses tie within rounding. Where ``kernel_blocks[r]``
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
        scores = (w_k[r].float() @ k_pre[:, h // group].float().t()).t() @ (w_q[r].float() @ q_pre[h].float())
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


@pytest.mark.parametrize("kv_layout, blocks", [("full", "hand"), ("split", "hand"), ("split", "manager")])
def test_impl_matches_reference(tmp_path, cpu_platform, seed, case, dense_threshold, kv_layout, blocks):
    """``blocks``: hand-built block tables, or tables from vLLM's KV-cache manager (split layout with
    three groups only: with R == H there is one group)."""
    from vllm.forward_context import set_forward_context

    from rtpurbo_vllm.attention.builder import RTPurboMetadataBuilder
    from rtpurbo_vllm.kv_cache.side_layers import INDEX_SUFFIX, WINDOW_SUFFIX, split_key_value

    HQ, HKV, RETRIEVAL = case
    engine = make_engine(tmp_path, case, dense_threshold, kv_layout)
    layers = make_layers(engine, case)
    context = engine.compilation_config.static_forward_context
    names = [layer.layer_name for layer in layers]
    spec = RopeSpec.from_hf_config(engine.model_config.hf_text_config)
    split = kv_layout == "split"
    if blocks == "manager" and HKV == 2:
        pytest.skip("every KV head is full: one KV-cache group, covered with hand-built tables")
    managed, managed_pages = manager_block_tables(engine) if blocks == "manager" else (None, None)

    def group_tables(spec, held=None):
        """(block table, page count) of the group of ``spec``."""
        if managed is not None:
            return managed[type(spec).__name__], managed_pages
        return paged_group(spec.block_size, held)

    # The KV-cache groups as vLLM would form them from the layers' specs (same tables for every layer).
    main_spec = layers[0].get_kv_cache_spec(engine)
    main_table, main_pages = group_tables(main_spec)
    attn_metadata = {}
    md = RTPurboMetadataBuilder(main_spec, names, engine, torch.device("cpu")).build(
        0, common_metadata(main_table, main_spec.block_size))
    attn_metadata.update({name: md for name in names})
    side = {}   # suffix -> (spec, block table, pages, held)
    if split:
        index_layer = context.get(f"{names[0]}.{INDEX_SUFFIX}")
        window_layer = context.get(f"{names[0]}.{WINDOW_SUFFIX}")
        assert (window_layer is None) == (kv_layout == "split" and HKV == 2)
        for suffix, layer in ((INDEX_SUFFIX, index_layer), (WINDOW_SUFFIX, window_layer)):
            if layer is None:
                continue
            side_spec = layer.get_kv_cache_spec(engine)
            held = None
            if suffix == WINDOW_SUFFIX:
                kept = side_spec.sliding_window
                assert kept == max(PARAMS.window, dense_threshold - 1)
                held = (lambda b, t, kept=kept: (t < PARAMS.sink_tokens) | (t > BATCH[b][0] - kept))
            table, pages = group_tables(side_spec, held)
            side_names = [f"{name}.{suffix}" for name in names]
            builder = layer.get_attn_backend().get_builder_cls()(side_spec, side_names, engine, torch.device("cpu"))
            side_md = builder.build(0, common_metadata(table, side_spec.block_size))
            attn_metadata.update({name: side_md for name in side_names})
            side[suffix] = (side_spec, table, pages, held)
        if window_layer is not None and not dense_threshold:   # freed window pages (null block 0) are masked
            assert (side[WINDOW_SUFFIX][1][1, 1:6] == 0).all()

    for layer_idx, layer in enumerate(layers):
        impl = layer.impl
        # Whole sequences: pre-RoPE q/k, then post-RoPE as vLLM's attention receives them.
        seqs = []
        for cached, new in BATCH:
            n = cached + new
            pos = torch.arange(n)
            q_pre = torch.randn(n, HQ, D, dtype=torch.bfloat16)
            k_pre = torch.randn(n, HKV, D, dtype=torch.bfloat16)
            v = torch.randn(n, HKV, D, dtype=torch.bfloat16)
            seqs.append((q_pre, apply_rope(q_pre, pos, spec), k_pre, apply_rope(k_pre, pos, spec), v))
        # (K view [N, P, H_c, D], V view, block table, KV heads, held) per K/V cache.
        kv_cache = nan_cache(main_pages, main_spec.block_size, main_spec.num_kv_heads)
        full_heads = impl.plan.split.full_kv_heads if split else torch.arange(HKV)
        kv_caches = [(*split_key_value(kv_cache), main_table, full_heads, None)]
        if WINDOW_SUFFIX in side:
            window_spec, table, pages, held = side[WINDOW_SUFFIX]
            window_layer = context[f"{layer.layer_name}.{WINDOW_SUFFIX}"]
            window_layer.kv_cache = nan_cache(pages, window_spec.block_size, window_spec.num_kv_heads)
            kv_caches.append((*window_layer.key_value(), table, impl.plan.split.window_kv_heads, held))
        index_cache = impl.plan.index_cache
        index_spec, index_table, index_pages, _ = side.get(INDEX_SUFFIX, (None, main_table, main_pages, None))
        index_page = index_spec.block_size if split else main_spec.block_size
        index_cache.kv_cache = torch.full((index_pages, index_page, index_cache.num_heads * 16), float("nan"),
                                          dtype=torch.bfloat16)
        paged_index = index_cache.paged_view()[:, :, :len(RETRIEVAL[layer_idx])]
        kv_heads = torch.tensor([h // (HQ // HKV) for h in RETRIEVAL[layer_idx]])
        w_q, w_k = impl.plan.w_q, impl.plan.w_k

        def slots_of(table, page_size, b, t):
            return table[b, t // page_size].long(), t % page_size

        for b, ((cached, _), (_, _, _, k, v)) in enumerate(zip(BATCH, seqs)):   # the cached history
            t = torch.arange(cached)
            for key_cache, value_cache, table, heads, held in kv_caches:
                kept = t if held is None else t[held(b, t)]
                page, off = slots_of(table, key_cache.shape[1], b, kept)
                key_cache[page, off], value_cache[page, off] = k[kept][:, heads], v[kept][:, heads]
            page, off = slots_of(index_table, index_page, b, t)
            paged_index[page, off] = index_keys_ref(k[:cached], t, spec, kv_heads, w_k).to(torch.bfloat16)
        query = torch.cat([q[c:] for (c, _), (_, q, _, _, _) in zip(BATCH, seqs)])
        key = torch.cat([k[c:] for (c, _), (_, _, _, k, _) in zip(BATCH, seqs)])
        value = torch.cat([v[c:] for (c, _), (_, _, _, _, v) in zip(BATCH, seqs)])
        output = torch.full_like(query, float("nan"))
        with set_forward_context(attn_metadata, engine):
            impl.forward(layer, query, key, value, kv_cache, md, output)

        # Caches: every (held) token of every sequence is now in place.
        for b, (_, _, k_pre, k, v) in enumerate(seqs):
            t = torch.arange(k.shape[0])
            for key_cache, value_cache, table, heads, held in kv_caches:
                kept = t if held is None else t[held(b, t)]
                page, off = slots_of(table, key_cache.shape[1], b, kept)
                torch.testing.assert_close(key_cache[page, off], k[kept][:, heads])
                torch.testing.assert_close(value_cache[page, off], v[kept][:, heads])
            want = index_keys_ref(k, t, spec, kv_heads, w_k)
            page, off = slots_of(index_table, index_page, b, t)
            torch.testing.assert_close(paged_index[page, off].float(), want, atol=0.05, rtol=0.02)

        # Attention output against the reference on whole sequences (decodes first, as in BATCH).
        p = impl.params
        ws = md.decode.workspace
        row = 0
        for b, ((cached, new), (q_pre, q, k_pre, k, v)) in enumerate(zip(BATCH, seqs)):
            n = cached + new
            cu_k = torch.tensor([0, n], dtype=torch.int32)
            if new == 1:
                kernel_blocks = [ws.selected[b, r, :ws.num_selected[b, r]].tolist()
                                 for r in range(len(RETRIEVAL[layer_idx]))]
                want = decode_reference(q[-1], k, v, q_pre[-1], k_pre, RETRIEVAL[layer_idx], w_q, w_k, p,
                                        impl.scale, kernel_blocks)[None]
            else:
                want = rtpurbo_prefill_ref(q[cached:], k, v, torch.tensor([0, new], dtype=torch.int32), cu_k,
                                           RETRIEVAL[layer_idx], p.sink_tokens, p.window, p.dense_threshold,
                                           impl.scale)
            got = output[row:row + new].float()
            torch.testing.assert_close(got, want, atol=0.03, rtol=0.03, msg=f"layer {layer_idx} request {b}")
            row += new


def test_kv_layout_option(tmp_path, cpu_platform, seed):
    from rtpurbo_vllm.artifacts import ArtifactError
    from rtpurbo_vllm.attention.serving_config import kv_layout_for

    assert kv_layout_for(make_engine(tmp_path, CASES["hkv2"], 0)) == "full"
    engine = make_engine(tmp_path, CASES["hkv2"], 0, kv_layout="compact")
    with pytest.raises(ArtifactError, match=r"kv_layout' must be one of \['full', 'split'\], got 'compact'"):
        kv_layout_for(engine)
