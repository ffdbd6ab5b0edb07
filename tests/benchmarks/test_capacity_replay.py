"""rtpurbo_vllm.bench.capacity_replay: vLLM's own scheduler, KV-cache manager and pool sizing replayed on
the CPU. FLASH_ATTN holds what its pool's blocks give whole sequences; the compact layout, whose window
units keep sinks + window, holds about its arithmetic ratio more; vLLM's logged figures come out for the
pool; nothing is preempted; too few requests give a lower bound."""

import pytest
import torch
import transformers

from rtpurbo_vllm.artifacts.schema import SparsityParams
from rtpurbo_vllm.bench.capacity_replay import ReplaySettings, dense_specs, replay_held, replay_vllm_config
from rtpurbo_vllm.calibration.synthesize import synthetic_artifact
from rtpurbo_vllm.kv_cache import KVLayout
from rtpurbo_vllm.kv_cache.side_layers import collected_specs

LAYERS, CONTEXT, OUTPUT = 4, 2048, 256
# FLASH_ATTN's pool holds 3.5 requests of CONTEXT + OUTPUT tokens (4 layers x 4 KV heads x 32 x K|V x bf16).
DENSE_TOKEN_BYTES = LAYERS * 4 * 32 * 2 * 2
SETTINGS = ReplaySettings(context=CONTEXT, output_tokens=OUTPUT, max_num_batched_tokens=512, max_num_seqs=64,
                          kv_memory_bytes=round(3.5 * (CONTEXT + OUTPUT) * DENSE_TOKEN_BYTES))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=256, num_hidden_layers=LAYERS,
                             num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=8192,
                             architectures=["LlamaForCausalLM"]).save_pretrained(path)
    return path


def test_dense_pool_holds_whole_sequences(model_dir):
    config = replay_vllm_config(model_dir, SETTINGS)
    got = replay_held(config, dense_specs(config), SETTINGS)
    # Each request holds its prompt's blocks plus the decode tokens' (null block aside).
    per_request = -(-(CONTEXT + 1) // 16)
    assert got["held_requests"] in ((got["num_blocks"] - 1) // per_request, (got["num_blocks"] - 1) // per_request - 1)
    assert got["held_requests"] == 3 and not got["all_admitted"] and got["preemptions"] == 0
    assert got["max_concurrency"] == pytest.approx(3.5, abs=0.05) and got["num_requests"] == 13
    assert got["kv_cache_tokens"] == pytest.approx(3.5 * (CONTEXT + OUTPUT), rel=0.01)


def test_compact_layout_holds_its_arithmetic(model_dir):
    """One retrieval KV head per layer, window 256: the window units keep sinks + window of the others."""
    params = SparsityParams(window=256, sink_tokens=4, dense_threshold=0)
    artifact = synthetic_artifact(transformers.AutoConfig.from_pretrained(model_dir), ratio=None,
                                  kv_heads_per_layer=1, params=params)
    layout = KVLayout.from_artifact(artifact, kv_dtype=torch.bfloat16, index_dtype=torch.bfloat16)
    config = replay_vllm_config(model_dir, SETTINGS)
    names = tuple(f"model.layers.{i}.self_attn.attn" for i in range(LAYERS))
    got = replay_held(config, collected_specs(layout, names, "auto", config), SETTINGS)
    dense_config = replay_vllm_config(model_dir, SETTINGS)
    dense = replay_held(dense_config, dense_specs(dense_config), SETTINGS)
    arithmetic = layout.capacity_ratio(CONTEXT) * 3.5
    assert got["preemptions"] == 0 and not got["all_admitted"]
    assert 0.85 * arithmetic <= got["held_requests"] <= arithmetic and got["held_requests"] > 2 * dense["held_requests"]


def test_too_few_requests_give_a_lower_bound(model_dir):
    config = replay_vllm_config(model_dir, SETTINGS)
    got = replay_held(config, dense_specs(config), SETTINGS, num_requests=2)
    assert got["all_admitted"] and got["held_requests"] == 2 and got["num_requests"] == 2
