"""A whole model's specs through vLLM's real grouping and KV-cache config code (engine-core side)."""

import pytest
import torch

from rtpurbo_vllm.head_layout import HeadLayout
from rtpurbo_vllm.kv_cache import KVLayoutPlan, RTPurboFullSpec, RTPurboIndexSpec, SinkWindowSpec

GIB = 1 << 30


def llama8b_plan(tp_rank=0, tp_size=1):
    """Llama-3-8B's shape with 15 % retrieval heads spread one or two KV groups per layer."""
    heads = []
    for layer in range(32):
        groups = [layer % 8] + ([(layer + 3) % 8] if layer % 4 == 0 else [])   # 40 groups, R = 2
        heads.append(sorted(4 * g + j for g in groups for j in range(4))[: 4 if layer % 4 else 6])
    layout = HeadLayout.from_lists(32, 8, heads)
    return KVLayoutPlan.build(layout, head_size=128, window=8192, sink_tokens=4, tp_rank=tp_rank, tp_size=tp_size)


def capacity(vllm_config, specs, budget):
    from vllm.v1.core.kv_cache_utils import get_kv_cache_capacity, get_kv_cache_configs

    config = get_kv_cache_configs(vllm_config, [specs], [budget])[0]
    return config, get_kv_cache_capacity(vllm_config, config)


def test_llama3_8b_groups_and_capacity_vs_dense(make_config, kv):
    plan = llama8b_plan()
    assert plan.num_full_kv_heads == 2 and plan.index_width >= 6
    max_len, budget = 131072, 40 * GIB
    specs = kv.model_specs(plan)
    vllm_config = make_config(max_len)
    config, (tokens, concurrency) = capacity(vllm_config, specs, budget)

    kinds = [type(g.kv_cache_spec) for g in config.kv_cache_groups]
    assert kinds == [RTPurboFullSpec, SinkWindowSpec, RTPurboIndexSpec]
    assert all(len(g.layer_names) == 32 for g in config.kv_cache_groups)            # no padding layers
    assert config.kv_cache_groups[0].layer_names == [kv.layer_name(i) for i in range(32)]
    pages = {g.kv_cache_spec.page_size_bytes for g in config.kv_cache_groups}
    assert pages == {plan.blocks.page_size_bytes}                                      # no page padding
    assert [g.kv_cache_spec.block_size for g in config.kv_cache_groups] == list(plan.blocks.block_sizes)
    # One tensor per layer index, shared by that layer's full, window and index caches.
    assert len(config.kv_cache_tensors) == 32
    assert all(len(t.shared_by) == 3 for t in config.kv_cache_tensors)
    assert config.num_blocks == budget // (plan.blocks.page_size_bytes * 32)

    dense_config, (dense_tokens, dense_concurrency) = capacity(make_config(max_len), kv.dense_specs(32, 8, 128),
                                                               budget)
    assert len(dense_config.kv_cache_groups) == 1
    ratio = concurrency / dense_concurrency
    print(f"\nLlama-3-8B shape, {budget // GIB} GiB KV budget, max_model_len {max_len}: dense "
          f"{dense_tokens:,} tokens ({dense_concurrency:.2f} x {max_len}), RTPurbo layout {tokens:,} tokens "
          f"({concurrency:.2f} x {max_len}) -> {ratio:.2f}x; plan: {plan.capacity_ratio(max_len):.2f}x without "
          f"vLLM's window reserve for {vllm_config.max_in_flight_tokens} in-flight tokens")
    # vLLM reserves whole blocks and, in the window, the in-flight tokens of a chunked prefill.
    in_flight = vllm_config.max_in_flight_tokens
    assert plan.vllm_bytes_per_sequence(max_len, in_flight) == \
        config.kv_cache_groups[0].kv_cache_spec.page_size_bytes * 32 * sum(
            -(-g.kv_cache_spec.max_memory_usage_bytes(vllm_config) // g.kv_cache_spec.page_size_bytes)
            for g in config.kv_cache_groups)
    assert ratio == pytest.approx(plan.vllm_capacity_ratio(max_len, in_flight), rel=1e-3)
    assert plan.vllm_capacity_ratio(max_len, in_flight) < plan.capacity_ratio(max_len)
    assert ratio > 2.5


def test_tensor_parallel_ranks_declare_identical_specs(make_config, kv):
    from vllm.v1.core.kv_cache_utils import get_kv_cache_configs

    plans = [llama8b_plan(r, 2) for r in range(2)]
    specs = [kv.model_specs(p) for p in plans]
    assert specs[0] == specs[1]
    configs = get_kv_cache_configs(make_config(32768), specs, [8 * GIB, 8 * GIB])
    assert configs[0].num_blocks == configs[1].num_blocks
    assert len(configs[0].kv_cache_groups) == 3


def test_all_heads_full_is_one_uniform_group(make_config, kv):
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs

    plan = KVLayoutPlan.build(HeadLayout.from_lists(8, 2, [[0, 5], [1, 4, 7]]), head_size=128)
    assert not plan.has_window_cache
    config, _ = capacity(make_config(4096), kv.model_specs(plan), GIB)
    assert len(config.kv_cache_groups) == 1
    group = config.kv_cache_groups[0].kv_cache_spec
    assert isinstance(group, UniformTypeKVCacheSpecs) and len(group.kv_cache_specs) == 4
    assert group.page_size_bytes == 2 * (16 * 2 * 2 * 128 * 2 + 16 * 3 * 16 * 2)


def test_specs_are_registered_and_picklable(make_config):
    import pickle

    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from rtpurbo_vllm.kv_cache import (
        FullPrefixManager,
        SinkWindowManager,
        full_spec,
        index_spec,
        register_kv_cache_specs,
        window_spec,
    )

    register_kv_cache_specs()
    register_kv_cache_specs()   # idempotent
    plan = llama8b_plan()
    window = window_spec(plan)
    assert KVCacheSpecRegistry.get_manager_class(window) is SinkWindowManager
    assert KVCacheSpecRegistry.get_manager_class(index_spec(plan)) is FullPrefixManager
    assert KVCacheSpecRegistry.get_manager_class(full_spec(plan)) is FullPrefixManager
    assert pickle.loads(pickle.dumps(window)) == window and window.sink_tokens == 4
    assert window.merge([window, window]) == window
    # Window blocks plus one sink block (block size 16: sinks fill block 0).
    assert window.block_size == 16 and window.dtype == torch.bfloat16
    cap = window.max_admission_blocks_per_request(2048, 131072)
    assert cap == -(-(8191 + 2048) // 16) + 1 + 1
    config = make_config(131072)
    assert window.max_memory_usage_bytes(config) == window.max_admission_blocks_per_request(
        config.max_in_flight_tokens, 131072) * window.page_size_bytes
    assert window.max_admission_blocks_per_request(2048, 100) == -(-100 // 16)   # never above the whole sequence


def test_plugin_registers_specs_and_keeps_builtins_in_a_fresh_process():
    import json
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import json, torch
        from vllm.plugins import load_general_plugins
        load_general_plugins()
        from vllm.v1.kv_cache_spec_registry import _REGISTRY_KVCACHESPEC_LIST as reg
        names = {cls.__name__: meta.manager_class.__name__ for cls, meta in reg.items()}
        print(json.dumps({"names": names, "cuda": torch.cuda.is_initialized()}))
    """)
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}
    env.pop("VLLM_PLUGINS", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["names"]["SinkWindowSpec"] == "SinkWindowManager"
    assert out["names"]["RTPurboIndexSpec"] == out["names"]["RTPurboFullSpec"] == "FullPrefixManager"
    assert out["names"]["SlidingWindowSpec"] == "SlidingWindowManager"       # built-ins still registered
    assert out["names"]["FullAttentionSpec"] == "FullAttentionManager"
    assert not out["cuda"]
