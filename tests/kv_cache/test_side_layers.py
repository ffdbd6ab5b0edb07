"""install_kv_layout on real vLLM Attention layers (CPU backend): the worker collects the planned specs,
the engine groups them, and vLLM's MRv2 allocation binds caches of the documented shapes."""

import pytest
import torch

from rtpurbo_vllm.head_layout import HeadLayout
from rtpurbo_vllm.kv_cache import KVLayoutPlan, RTPurboFullSpec, RTPurboIndexSpec, SinkWindowSpec
from rtpurbo_vllm.kv_cache.side_layers import (
    INDEX_SUFFIX,
    WINDOW_SUFFIX,
    RTPurboPlannedIndexCache,
    RTPurboWindowCache,
    install_kv_layout,
)

HQ, HKV, D, B = 8, 2, 64, 200


@pytest.fixture
def cpu_platform():
    from vllm import platforms
    from vllm.platforms.cpu import CpuPlatform

    previous = platforms.current_platform
    platforms.current_platform = CpuPlatform()
    yield
    platforms.current_platform = previous


def test_install_collect_group_and_bind(make_config, kv, cpu_platform):
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.model_executor.models.utils import extract_layer_index
    from vllm.v1.core.kv_cache_utils import get_kv_cache_configs
    from vllm.v1.worker.gpu.attn_utils import get_kv_cache_spec, init_attn_backend, init_kv_cache

    plan = KVLayoutPlan.build(HeadLayout.from_lists(HQ, HKV, [[0, 1, 2, 3], [1, 2]]), head_size=D,
                              window=64, sink_tokens=4)
    config = make_config(1024)
    with set_current_vllm_config(config):
        layers = [Attention(HQ, D, D ** -0.5, HKV, cache_config=config.cache_config, prefix=kv.layer_name(i))
                  for i in range(2)]
        caches = [install_kv_layout(layer, plan, config) for layer in layers]
        with pytest.raises(RuntimeError, match="already installed"):
            install_kv_layout(layers[0], plan, config)
        specs = get_kv_cache_spec(config)

    names = [kv.layer_name(0), kv.layer_name(1)]
    names += [f"{n}.{s}" for n in names for s in (WINDOW_SUFFIX, INDEX_SUFFIX)]
    assert sorted(specs) == sorted(names)
    assert [extract_layer_index(n) for n in specs] == [0, 1, 0, 0, 1, 1]
    assert isinstance(specs[names[0]], RTPurboFullSpec) and specs[names[0]].num_kv_heads == 1
    assert isinstance(specs[f"{names[1]}.{WINDOW_SUFFIX}"], SinkWindowSpec)
    assert isinstance(specs[f"{names[1]}.{INDEX_SUFFIX}"], RTPurboIndexSpec)
    assert type(layers[1]).get_kv_cache_spec is Attention.get_kv_cache_spec    # the class is untouched
    assert caches[0].full_kv_index.tolist() == [0] and caches[0].window_kv_index.tolist() == [1]
    assert isinstance(caches[1].window, RTPurboWindowCache) and isinstance(caches[1].index, RTPurboPlannedIndexCache)

    config.cache_config.num_gpu_blocks_override = B
    kv_config = get_kv_cache_configs(config, [specs], [1 << 30])[0]
    assert len(kv_config.kv_cache_groups) == 3
    with set_current_vllm_config(config):
        groups, _, kernel_block_sizes = init_attn_backend(kv_config, config, torch.device("cpu"))
        runner_caches: list = []
        bound = init_kv_cache(runner_caches, config.compilation_config.static_forward_context, kv_config,
                              groups, torch.device("cpu"), "auto", kernel_block_sizes, config)
    window, index = caches[1].window, caches[1].index
    assert window.kv_cache is bound[window.prefix]
    assert tuple(window.kv_cache.shape) == (B, 1, 16, 2 * D)                  # [B, H-R, Pw, 2D]
    k, v = window.key_value()
    assert tuple(k.shape) == (B, 16, 1, D) and k.data_ptr() != v.data_ptr()
    assert tuple(index.kv_cache.shape) == (B, 32, 16 * 4)                     # [B, Pi, DI*n]
    assert tuple(index.paged_view().shape) == (B, 32, 4, 16)
    # Layer 1's three caches share one allocation (one block id = one page in each group's slot).
    storage = {layers[1].kv_cache.untyped_storage().data_ptr(), window.kv_cache.untyped_storage().data_ptr(),
               index.kv_cache.untyped_storage().data_ptr()}
    assert len(storage) == 1
