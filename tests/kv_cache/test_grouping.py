"""A whole model's specs through vLLM's real grouping and KV-cache config code (engine-core side)."""

import importlib.util
import pathlib

import pytest
import torch

from rtpurbo_vllm.kv_cache import FULL, INDEX, WINDOW, KVLayout, RTPurboFullSpec, RTPurboIndexSpec, SinkWindowSpec

GIB = 1 << 30
_spec = importlib.util.spec_from_file_location("layout_cases", pathlib.Path(__file__).with_name("test_layout.py"))
layout_cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(layout_cases)


def capacity(vllm_config, specs, budget):
    from vllm.v1.core.kv_cache_utils import get_kv_cache_capacity, get_kv_cache_configs

    config = get_kv_cache_configs(vllm_config, [specs], [budget])[0]
    return config, get_kv_cache_capacity(vllm_config, config)


@pytest.mark.parametrize("selection", ["global15", "kvgroup15", "n1"])
def test_llama3_8b_groups_without_padding_and_capacity_vs_dense(make_config, kv, selection):
    layout = KVLayout.build(layout_cases.llama8b_heads(selection), head_size=128, window=8192, sink_tokens=4,
                            dense_threshold=16384)
    max_len, budget = 131072, 40 * GIB
    specs = kv.model_specs(layout)
    vllm_config = make_config(max_len)
    config, (tokens, concurrency) = capacity(vllm_config, specs, budget)

    kinds = [type(g.kv_cache_spec) for g in config.kv_cache_groups]
    assert kinds == [RTPurboFullSpec, SinkWindowSpec, RTPurboIndexSpec]
    g = layout.unit_count
    assert all(len(grp.layer_names) == g for grp in config.kv_cache_groups)          # no padding layers
    assert set(config.kv_cache_groups[0].layer_names) == set(layout.unit_names(kv.layer_names(32), FULL))
    pages = {grp.kv_cache_spec.page_size_bytes for grp in config.kv_cache_groups}
    assert pages == {layout.blocks.page_size_bytes}                                    # no page padding
    assert [grp.kv_cache_spec.block_size for grp in config.kv_cache_groups] == list(layout.blocks.block_sizes)
    # g tensors, each shared by one full, one window and one index unit.
    assert len(config.kv_cache_tensors) == g and all(len(t.shared_by) == 3 for t in config.kv_cache_tensors)
    assert config.num_blocks == budget // (layout.blocks.page_size_bytes * g)

    _, (dense_tokens, dense_concurrency) = capacity(make_config(max_len), kv.dense_specs(32, 8, 128), budget)
    ratio = concurrency / dense_concurrency
    print(f"\n{selection}: dense {dense_tokens:,} tokens ({dense_concurrency:.2f} x {max_len}), RTPurbo "
          f"{tokens:,} tokens ({concurrency:.2f} x {max_len}) -> {ratio:.2f}x in vLLM's start-up arithmetic "
          f"(window reserve for {vllm_config.max_in_flight_tokens} in-flight tokens); {layout.summary()}")
    # What a decoding sequence holds (the capacity under load) is the layout's own count.
    held = sum(-(-min(max_len, n) // grp.kv_cache_spec.block_size) for grp, n in zip(
        config.kv_cache_groups, (max_len, 8192 + 4 + layout.units[WINDOW].block_size, max_len)))
    assert layout.bytes_per_sequence(max_len) <= held * layout.blocks.page_size_bytes * g * 1.01
    assert ratio > 0.85 * layout.capacity_ratio(max_len) * 0.7


@pytest.mark.parametrize("selection, kv_dtype, name", [("global15", torch.bfloat16, "compact"),
                                                       ("n1", torch.uint8, "compact"),
                                                       ("kvgroup15", torch.bfloat16, "full")])
def test_vllm_bytes_per_sequence_is_the_start_up_need(make_config, kv, selection, kv_dtype, name):
    """``vllm_bytes_per_sequence`` (the capacity report's figure) is what vLLM's start-up check needs for one
    sequence of ``max_model_len``: a pool of exactly that many bytes starts, one block less refuses."""
    layout = KVLayout.build(layout_cases.llama8b_heads(selection), name=name, head_size=128, kv_dtype=kv_dtype,
                            index_dtype=torch.bfloat16, window=4096, sink_tokens=4, dense_threshold=8192)
    max_len = 20000
    need = layout.vllm_bytes_per_sequence(max_len, make_config(max_len).max_in_flight_tokens)
    assert need % layout.bytes_per_block == 0
    blocks = need // layout.bytes_per_block
    config = make_config(max_len)
    config.cache_config.num_gpu_blocks_override = blocks
    assert capacity(config, kv.model_specs(layout), 40 * GIB)[0].num_blocks == blocks
    config = make_config(max_len)
    config.cache_config.num_gpu_blocks_override = blocks - 1
    with pytest.raises(ValueError, match="To serve at least one request with the model's max seq len"):
        capacity(config, kv.model_specs(layout), 40 * GIB)


def test_tensor_parallel_ranks_declare_identical_specs(make_config, kv):
    from vllm.v1.core.kv_cache_utils import get_kv_cache_configs

    heads = layout_cases.llama8b_heads("global15", seed=7)
    layouts = [KVLayout.build(heads, head_size=128, window=8192, tp_rank=r, tp_size=2) for r in range(2)]
    specs = [kv.model_specs(x) for x in layouts]
    assert specs[0] == specs[1]
    configs = get_kv_cache_configs(make_config(32768), specs, [8 * GIB, 8 * GIB])
    assert configs[0].num_blocks == configs[1].num_blocks
    assert len(configs[0].kv_cache_groups) == 3


@pytest.mark.parametrize("name", ["full", "compact"])
def test_without_window_units_everything_is_one_uniform_group(make_config, kv, name):
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs

    from rtpurbo_vllm.head_layout import HeadLayout

    layout = KVLayout.build(HeadLayout.from_lists(8, 2, [[0, 5], [1, 4, 7]]), name=name, head_size=128)
    assert not layout.has(WINDOW)
    config, _ = capacity(make_config(4096), kv.model_specs(layout), GIB)
    assert len(config.kv_cache_groups) == 1
    group = config.kv_cache_groups[0].kv_cache_spec
    assert isinstance(group, UniformTypeKVCacheSpecs) and len(group.kv_cache_specs) == 4
    slots = layout.units[INDEX].slots
    assert group.page_size_bytes == 2 * (16 * 2 * 2 * 128 * 2 + 16 * slots * 16 * 2)


def test_specs_are_registered_and_picklable(make_config):
    import pickle

    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from rtpurbo_vllm.kv_cache import FullPrefixManager, SinkWindowManager, register_kv_cache_specs, unit_spec

    register_kv_cache_specs()
    register_kv_cache_specs()   # idempotent
    layout = KVLayout.build(layout_cases.llama8b_heads("n1"), head_size=128, window=8192, sink_tokens=4)
    window, index, full = (unit_spec(layout.units[k], layout) for k in (WINDOW, INDEX, FULL))
    assert KVCacheSpecRegistry.get_manager_class(window) is SinkWindowManager
    assert KVCacheSpecRegistry.get_manager_class(index) is FullPrefixManager
    assert KVCacheSpecRegistry.get_manager_class(full) is FullPrefixManager
    assert pickle.loads(pickle.dumps(window)) == window and window.sink_tokens == 4
    assert window.merge([window, window]) == window and window.dtype == torch.bfloat16
    p = window.block_size
    cap = window.max_admission_blocks_per_request(2048, 131072)
    assert cap == -(-(8191 + 2048) // p) + 1 + 1                                    # window + sink block
    config = make_config(131072)
    assert window.max_memory_usage_bytes(config) == window.max_admission_blocks_per_request(
        config.max_in_flight_tokens, 131072) * window.page_size_bytes
    assert window.max_admission_blocks_per_request(2048, 100) == -(-100 // p)   # never above the whole sequence


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


@pytest.mark.parametrize("name, selection", [("compact", "kvgroup15"), ("full", "global15")])
def test_bytes_per_block_is_vllms_pool_per_block(make_config, kv, name, selection):
    from vllm.v1.core.kv_cache_utils import get_kv_cache_configs

    layout = KVLayout.build(layout_cases.llama8b_heads(selection), name=name, head_size=128, window=8192)
    config = get_kv_cache_configs(make_config(32768), [kv.model_specs(layout)], [8 * GIB])[0]
    pool = sum(t.size for t in config.kv_cache_tensors)
    assert pool == config.num_blocks * layout.bytes_per_block
