"""The RTPURBO builder and impl inside real vLLM classes, on the CPU (kernels under the Triton interpreter).

A hand-made step mixes decodes, a chunked prefill on top of cached tokens (a prefix hit or an earlier
chunk) and a fresh prefill, over shuffled pages. The impl writes the caches and attention output;
the test compares them with the exact reference of the whole sequences.
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
from rtpurbo_vllm.reference import rtpurbo_decode_ref, rtpurbo_prefill_ref  # noqa: E402
from rtpurbo_vllm.rope import RopeSpec, apply_rope  # noqa: E402
from rtpurbo_vllm.triton_kernels.index_keys import index_keys_ref  # noqa: E402

HQ, HKV, D, PAGE = 4, 2, 64, 16
RETRIEVAL = ((1,), (0, 3))
PARAMS = SparsityParams(sink_tokens=4, window=24, top_p=0.8, block_size=16, index_dim=16, dense_threshold=0)
# (cached tokens, new tokens) per request, decodes first as vLLM orders them.
BATCH = [(36, 1), (129, 1), (50, 30), (0, 45)]


@pytest.fixture(scope="module")
def cpu_platform():
    from vllm import platforms
    from vllm.platforms.cpu import CpuPlatform

    previous = platforms.current_platform
    platforms.current_platform = CpuPlatform()
    yield
    platforms.current_platform = previous


@pytest.fixture(params=[0, 100], ids=["sparse-everywhere", "dense-below-100"])
def engine(request, tmp_path, cpu_platform, seed):
    """A real VllmConfig for a small Llama whose folder holds a random RTPurbo artifact.

    With ``dense_threshold`` 100 the sequences of 37, 45 and 80 tokens run dense, the 130-token one sparse.
    """
    from vllm.config import CacheConfig, DeviceConfig, ModelConfig, VllmConfig

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=128,
                                      num_hidden_layers=len(RETRIEVAL), num_attention_heads=HQ,
                                      num_key_value_heads=HKV, head_dim=D, max_position_embeddings=2048,
                                      architectures=["LlamaForCausalLM"])
    config.save_pretrained(tmp_path)
    indexer = tuple((torch.randn(len(h), 16, D) / 4, torch.randn(len(h), 16, D) / 4) for h in RETRIEVAL)
    params = dataclasses.replace(PARAMS, dense_threshold=request.param)
    save_artifact(RTPurboArtifact(model=ModelFingerprint.from_hf_config(config), retrieval_heads=RETRIEVAL,
                                  params=params, indexer=indexer), tmp_path / "rtpurbo")
    model_config = ModelConfig(model=str(tmp_path), dtype="bfloat16", max_model_len=1024, skip_tokenizer_init=True)
    return VllmConfig(model_config=model_config, device_config=DeviceConfig("cpu"),
                      cache_config=CacheConfig(block_size=PAGE))


def make_layers(vllm_config):
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.attention.attention import Attention

    from rtpurbo_vllm.attention.backend import RTPurboAttentionBackend

    with set_current_vllm_config(vllm_config):
        layers = [Attention(HQ, D, D ** -0.5, HKV, cache_config=vllm_config.cache_config,
                            prefix=f"model.layers.{i}.self_attn.attn", attn_backend=RTPurboAttentionBackend)
                  for i in range(len(RETRIEVAL))]
        for layer in layers:
            layer.process_weights_after_loading(torch.bfloat16)
    return layers


def disjoint_pages(num_pages):
    """Shuffled, non-overlapping page ids for each request of BATCH."""
    perm = torch.randperm(num_pages).int()
    counts = [-(-(c + n) // PAGE) for c, n in BATCH]
    return list(perm[:sum(counts)].split(counts))


def common_metadata(pages):
    from vllm.v1.attention.backend import CommonAttentionMetadata

    query_lens = [new for _, new in BATCH]
    seq_lens = [cached + new for cached, new in BATCH]
    query_start = torch.tensor([0] + query_lens).cumsum(0).int()
    positions = torch.cat([torch.arange(cached, cached + new) for cached, new in BATCH])
    slots = torch.cat([pages[b][positions_b // PAGE] * PAGE + positions_b % PAGE
                       for b, positions_b in enumerate(torch.arange(c, c + n) for c, n in BATCH)])
    max_pages = max(len(p) for p in pages)
    block_table = torch.zeros(len(BATCH), max_pages, dtype=torch.int32)
    for b, p in enumerate(pages):
        block_table[b, :len(p)] = p
    return CommonAttentionMetadata(
        query_start_loc=query_start, query_start_loc_cpu=query_start, seq_lens=torch.tensor(seq_lens).int(),
        num_reqs=len(BATCH), num_actual_tokens=int(query_start[-1]), max_query_len=max(query_lens),
        max_seq_len=max(seq_lens), block_table_tensor=block_table, slot_mapping=slots.long(),
        positions=positions)


def test_builder_splits_decodes_and_prefills(engine):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from rtpurbo_vllm.attention.builder import RTPurboMetadataBuilder

    pages = disjoint_pages(64)
    spec = FullAttentionSpec(block_size=PAGE, num_kv_heads=HKV, head_size=D, dtype=torch.bfloat16)
    make_layers(engine)
    builder = RTPurboMetadataBuilder(spec, ["model.layers.0.self_attn.attn"], engine, torch.device("cpu"))
    md = builder.build(0, common_metadata(pages))
    assert md.num_decode_tokens == 2 and md.num_actual_tokens == 77
    assert md.decode.seq_lens.tolist() == [37, 130]
    assert md.prefill.cu_seqlens_q.tolist() == [0, 30, 75]
    assert md.prefill.seq_lens.tolist() == [80, 45]
    assert md.positions[:3].tolist() == [36, 129, 50]
    assert builder.max_blocks == 1024 // PARAMS.block_size


def test_impl_matches_reference(engine, seed):
    from vllm.forward_context import set_forward_context  # noqa: F401  (impl reads only its arguments)
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from rtpurbo_vllm.attention.builder import RTPurboMetadataBuilder

    layers = make_layers(engine)
    spec = RopeSpec.from_hf_config(engine.model_config.hf_text_config)
    num_pages = 64
    pages = disjoint_pages(num_pages)
    cm = common_metadata(pages)
    builder = RTPurboMetadataBuilder(FullAttentionSpec(block_size=PAGE, num_kv_heads=HKV, head_size=D,
                                                       dtype=torch.bfloat16),
                                     [layer.layer_name for layer in layers], engine, torch.device("cpu"))
    md = builder.build(0, cm)
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
        # Physical cache [num_pages, P, HKV, 2D] seen through the logical [num_pages, HKV, P, 2D] view.
        kv_cache = torch.full((num_pages, PAGE, HKV, 2 * D), float("nan"), dtype=torch.bfloat16)
        kv_cache = kv_cache.permute(0, 2, 1, 3)
        key_cache, value_cache = kv_cache.transpose(1, 2).split(D, dim=-1)
        index_cache = impl.plan.index_cache
        index_cache.kv_cache = torch.full((num_pages, PAGE, len(RETRIEVAL[layer_idx]) * 16), float("nan"),
                                          dtype=torch.bfloat16)
        paged_index = index_cache.paged_view()
        kv_heads = torch.tensor([h // (HQ // HKV) for h in RETRIEVAL[layer_idx]])
        w_q, w_k = impl.plan.w_q, impl.plan.w_k
        for b, ((cached, _), (_, _, _, k, v)) in enumerate(zip(BATCH, seqs)):   # the cached history
            for t in range(cached):
                page, off = pages[b][t // PAGE], t % PAGE
                key_cache[page, off], value_cache[page, off] = k[t], v[t]
            keys = index_keys_ref(k[:cached], torch.arange(cached), spec, kv_heads, w_k)
            for t in range(cached):
                paged_index[pages[b][t // PAGE], t % PAGE] = keys[t].to(torch.bfloat16)
        query = torch.cat([q[c:] for (c, _), (_, q, _, _, _) in zip(BATCH, seqs)])
        key = torch.cat([k[c:] for (c, _), (_, _, _, k, _) in zip(BATCH, seqs)])
        value = torch.cat([v[c:] for (c, _), (_, _, _, _, v) in zip(BATCH, seqs)])
        output = torch.full_like(query, float("nan"))
        impl.forward(layer, query, key, value, kv_cache, md, output)

        # Caches: every token of every sequence is now in place.
        for b, (_, _, k_pre, k, v) in enumerate(seqs):
            n = k.shape[0]
            page_of = pages[b][torch.arange(n) // PAGE].long()
            off = torch.arange(n) % PAGE
            torch.testing.assert_close(key_cache[page_of, off], k)
            torch.testing.assert_close(value_cache[page_of, off], v)
            want = index_keys_ref(k, torch.arange(n), spec, kv_heads, w_k)
            torch.testing.assert_close(paged_index[page_of, off].float(), want, atol=0.05, rtol=0.02)

        # Attention output against the reference on whole sequences.
        p = impl.params
        row = 0
        for b, ((cached, new), (q_pre, q, k_pre, k, v)) in enumerate(zip(BATCH, seqs)):
            n = cached + new
            cu_k = torch.tensor([0, n], dtype=torch.int32)
            if new == 1:
                want = rtpurbo_decode_ref(q[-1:], k, v, cu_k, q_pre[-1:], k_pre, RETRIEVAL[layer_idx],
                                          w_q.float(), w_k.float(), p.sink_tokens, p.window, p.top_p,
                                          p.block_size, p.dense_threshold, impl.scale)
            else:
                want = rtpurbo_prefill_ref(q[cached:], k, v, torch.tensor([0, new], dtype=torch.int32), cu_k,
                                           RETRIEVAL[layer_idx], p.sink_tokens, p.window, p.dense_threshold,
                                           impl.scale)
            got = output[row:row + new].float()
            torch.testing.assert_close(got, want, atol=0.03, rtol=0.03, msg=f"layer {layer_idx} request {b}")
            row += new
