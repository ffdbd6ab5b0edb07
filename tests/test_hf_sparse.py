"""The Hugging Face reference runner: RTPurbo attention with nothing dropped equals the model itself."""

import pytest
import torch
import transformers

from rtpurbo_vllm.artifacts import ModelFingerprint, RTPurboArtifact, SparsityParams
from rtpurbo_vllm.hf_sparse import DecodeStats, ablated_heads_attention, rtpurbo_reference_attention


def small_model(seed: int):
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=512, attn_implementation="eager")
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def artifact_for(model, retrieval_heads, **params) -> RTPurboArtifact:
    cfg = model.config
    indexer = tuple((torch.randn(len(h), 16, cfg.head_dim), torch.randn(len(h), 16, cfg.head_dim))
                    for h in retrieval_heads)
    return RTPurboArtifact(model=ModelFingerprint.from_hf_config(cfg),
                           retrieval_heads=tuple(tuple(h) for h in retrieval_heads),
                           params=SparsityParams(**params), indexer=indexer)


def greedy(model, ids, steps):
    """``steps`` greedy tokens, never stopping early (a random model may pick its EOS id first)."""
    out = model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits)


def test_nothing_dropped_equals_dense(seed):
    model = small_model(seed)
    ids = torch.randint(1, 97, (1, 83))
    dense_seq, dense_logits = greedy(model, ids, 6)
    artifact = artifact_for(model, [[1], [0, 3]], sink_tokens=4, window=1000, top_p=1.0, block_size=16,
                            dense_threshold=0)
    stats = DecodeStats()
    with rtpurbo_reference_attention(model, artifact, stats):
        seq, logits = greedy(model, ids, 6)
    assert model.config._attn_implementation == "eager"
    assert torch.equal(seq, dense_seq)
    torch.testing.assert_close(logits, dense_logits, rtol=1e-4, atol=1e-4)
    assert stats.kept_block_share == 1.0 and stats.local_token_share == 1.0


def test_sparse_settings_change_attention_and_count_kept_blocks(seed):
    model = small_model(seed)
    ids = torch.randint(1, 97, (1, 300))
    artifact = artifact_for(model, [[2], [1]], sink_tokens=4, window=32, top_p=0.5, block_size=16,
                            dense_threshold=0)
    stats = DecodeStats()
    with rtpurbo_reference_attention(model, artifact, stats):
        greedy(model, ids, 3)
    # 3 new tokens = prefill + 2 decode steps (301 and 302 keys); 2 layers x 1 retrieval head, each
    # over ceil(301 / 16) = ceil(302 / 16) = 19 blocks.
    assert stats.total_blocks == 2 * 2 * 19
    assert 0 < stats.kept_blocks < stats.total_blocks
    # Local heads: 3 per layer, 4 sinks + 32-token window each.
    assert stats.local_tokens == 2 * 2 * 3 * 36
    assert stats.context_tokens == 2 * 3 * (301 + 302)


@pytest.mark.parametrize("num_q, num_k, sink, window, threshold", [
    (700, 700, 4, 100, 0), (700, 700, 0, 1, 0), (300, 1000, 4, 256, 0), (1, 600, 4, 64, 0),
    (700, 700, 4, 100, 701), (500, 500, 600, 50, 0), (500, 500, 4, 10_000, 0)],
    ids=["prefill", "window-1-no-sinks", "chunk-after-history", "one-query", "below-dense-threshold",
         "sinks-cover-all", "window-covers-all"])
def test_prefill_equals_the_reference(seed, num_q, num_k, sink, window, threshold):
    """The fused, chunked prefill of the runner computes rtpurbo_prefill_ref."""
    from rtpurbo_vllm.hf_sparse import _prefill
    from rtpurbo_vllm.reference import rtpurbo_prefill_ref

    q, k, v = torch.randn(num_q, 8, 16), torch.randn(num_k, 2, 16), torch.randn(num_k, 2, 16)
    run = one_layer_run(sink_tokens=sink, window=window, dense_threshold=threshold)
    cu_q, cu_k = torch.tensor([0, num_q], dtype=torch.int32), torch.tensor([0, num_k], dtype=torch.int32)
    want = rtpurbo_prefill_ref(q, k, v, cu_q, cu_k, [1, 6], sink, window, threshold, 0.25)
    torch.testing.assert_close(_prefill(run, 0, q, k, v, 0.25), want, rtol=1e-5, atol=1e-5)


def one_layer_run(**params):
    """What the runner holds for a one-layer model of 8 query / 2 KV heads of 16 channels, retrieval
    heads 1 and 6."""
    from rtpurbo_vllm.hf_sparse import _Run
    from rtpurbo_vllm.rope import RopeSpec

    rope = RopeSpec(head_size=16, rotary_dim=16, max_position=4096, base=10000.0, is_neox_style=True, scaling=None)
    model = ModelFingerprint(architecture="LlamaForCausalLM", num_layers=1, num_heads=8, num_kv_heads=2,
                             head_dim=16, rope=rope)
    artifact = RTPurboArtifact(model=model, retrieval_heads=((1, 6),), params=SparsityParams(**params),
                               indexer=((torch.randn(2, 16, 16), torch.randn(2, 16, 16)),))
    return _Run(artifact, rope, None)


@pytest.mark.parametrize("num_q, num_k", [(1300, 1300), (700, 1500)], ids=["prefill", "chunk-after-history"])
def test_sparse_prefill_equals_the_reference(seed, num_q, num_k):
    """prefill_top_p < 1: the retrieval heads see the keys sparse_prefill_visible_ref keeps for the
    whole chunk (tiles of TILE_Q rows, though the runner computes them in slices); the local heads are
    unchanged. At 1.0 the prefill is the dense one."""
    from rtpurbo_vllm.hf_sparse import _prefill
    from rtpurbo_vllm.rope import invert_rope
    from rtpurbo_vllm.triton_kernels.headwise_attention import masked_attention
    from rtpurbo_vllm.triton_kernels.index_keys import index_project_ref
    from rtpurbo_vllm.triton_kernels.sparse_prefill import TILE_Q, sparse_prefill_visible_ref

    q, k, v = torch.randn(num_q, 8, 16), torch.randn(num_k, 2, 16), torch.randn(num_k, 2, 16)
    settings = dict(sink_tokens=4, window=100, block_size=64, dense_threshold=0)
    run = one_layer_run(prefill_top_p=0.7, **settings)
    w_q, w_k = run.artifact.indexer[0]
    positions = torch.arange(num_k)
    q_idx = index_project_ref(invert_rope(q[:, [1, 6]], positions[num_k - num_q:], run.rope), w_q)
    k_idx = index_project_ref(invert_rope(k, positions, run.rope)[:, [0, 1]], w_k)
    _, visible = sparse_prefill_visible_ref(q_idx, k_idx, 0.7, 4, 64, TILE_Q)
    causal_keys = (positions[num_k - num_q:] + 1).sum()
    assert visible.sum() < 0.8 * 2 * causal_keys, "too little dropped to test the sparse prefill"
    want, _ = masked_attention(q[:, [1, 6]], k[:, [0, 1]], v[:, [0, 1]], visible, 0.25)
    got = _prefill(run, 0, q, k, v, 0.25)
    torch.testing.assert_close(got[:, [1, 6]], want, rtol=1e-4, atol=1e-4)
    dense = _prefill(one_layer_run(prefill_top_p=1.0, **settings), 0, q, k, v, 0.25)
    local = [0, 2, 3, 4, 5, 7]
    torch.testing.assert_close(got[:, local], dense[:, local])
    assert (got[:, [1, 6]] - dense[:, [1, 6]]).abs().max() > 1e-2


def test_ablation_zeroes_only_the_named_heads(seed):
    model = small_model(seed)
    ids = torch.randint(1, 97, (1, 40))
    with torch.no_grad():
        dense = model(ids).logits
        with ablated_heads_attention(model, {}):
            same = model(ids).logits
        with ablated_heads_attention(model, {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}):
            ablated = model(ids).logits
    torch.testing.assert_close(same, dense, rtol=1e-5, atol=1e-5)
    # With every head's output zeroed the attention blocks only add their o_proj bias (none here).
    model.model.layers[0].self_attn.forward = lambda hidden_states, **kw: (torch.zeros_like(hidden_states), None)
    model.model.layers[1].self_attn.forward = model.model.layers[0].self_attn.forward
    with torch.no_grad():
        no_attention = model(ids).logits
    torch.testing.assert_close(ablated, no_attention, rtol=1e-5, atol=1e-5)


def test_refuses_artifact_without_indexer(seed):
    model = small_model(seed)
    artifact = RTPurboArtifact(model=ModelFingerprint.from_hf_config(model.config),
                               retrieval_heads=((0,), (1,)))
    with pytest.raises(ValueError, match="no indexer"):
        rtpurbo_reference_attention(model, artifact)
