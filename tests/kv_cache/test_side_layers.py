"""install_kv_layout on real vLLM Attention layers (CPU backend): the worker collects the planned specs,
the engine groups them, and vLLM's MRv2 allocation binds caches of the documented shapes."""

import pytest
import torch

from rtpurbo_vllm.head_layout import HeadLayout
from rtpurbo_vllm.kv_cache import FULL, INDEX, WINDOW, KVLayout, RTPurboFullSpec, RTPurboIndexSpec, SinkWindowSpec
from rtpurbo_vllm.kv_cache.layer_kv import LayerKV
from rtpurbo_vllm.kv_cache.side_layers import RTPurboCacheUnit, collected_specs, install_kv_layout

HQ, HKV, D, B = 8, 4, 64, 200


@pytest.fixture
def cpu_platform():
    from vllm import platforms
    from vllm.platforms.cpu import CpuPlatform

    previous = platforms.current_platform
    platforms.current_platform = CpuPlatform()
    yield
    platforms.current_platform = previous


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_install_collect_group_bind_and_address(make_config, kv, cpu_platform, kv_cache_dtype):
    """Three layers whose heads straddle units: the worker collects one spec per unit, the engine
    forms three groups without padding, vLLM's MRv2 allocation binds every unit, and each layer's
    :class:`LayerKV` reaches exactly its own heads' slots."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend
    from vllm.v1.core.kv_cache_utils import get_kv_cache_configs
    from vllm.v1.worker.gpu.attn_utils import get_kv_cache_spec, init_attn_backend, init_kv_cache

    heads = HeadLayout.from_lists(HQ, HKV, [[0, 1, 2, 3, 5], [1, 2], [0, 4, 8 - 1]])
    config = make_config(1024)
    config.cache_config.cache_dtype = kv_cache_dtype
    names = kv.layer_names(3)
    with set_current_vllm_config(config):
        # FlashAttention's layout, as RTPURBO's own backend declares it (the side K/V units use it too).
        layers = [Attention(HQ, D, D ** -0.5, HKV, cache_config=config.cache_config, prefix=name,
                            attn_backend=FlashAttentionBackend) for name in names]
        layout = KVLayout.build(heads, head_size=D, kv_dtype=layers[0].kv_cache_torch_dtype,
                                index_dtype=torch.bfloat16, window=64, sink_tokens=4)
        for layer in layers:
            install_kv_layout(layer, layout, names, config)
        with pytest.raises(RuntimeError, match="already installed"):
            install_kv_layout(layers[0], layout, names, config)
        specs = get_kv_cache_spec(config)

    g = layout.unit_count
    assert len(specs) == 3 * g and all(isinstance(specs[n], RTPurboFullSpec) for n in names)
    # What a model with this layout declares, without building the model (the capacity replay's specs).
    declared = collected_specs(layout, names, kv_cache_dtype, config)
    assert list(declared.items()) == list(specs.items())
    assert type(layers[1]).get_kv_cache_spec is Attention.get_kv_cache_spec    # the class is untouched
    context = config.compilation_config.static_forward_context
    side = [n for n in specs if n not in names]
    assert all(isinstance(context[n], RTPurboCacheUnit) for n in side)
    kinds = {type(specs[n]) for n in layout.unit_names(names, WINDOW)}, {type(specs[n]) for n in
                                                                         layout.unit_names(names, INDEX)}
    assert kinds == ({SinkWindowSpec}, {RTPurboIndexSpec})

    config.cache_config.num_gpu_blocks_override = B
    kv_config = get_kv_cache_configs(config, [specs], [1 << 30])[0]
    assert len(kv_config.kv_cache_groups) == 3 and all(len(grp.layer_names) == g for grp in kv_config.kv_cache_groups)
    with set_current_vllm_config(config):
        groups, _, kernel_block_sizes = init_attn_backend(kv_config, config, torch.device("cpu"))
        runner_caches: list = []
        init_kv_cache(runner_caches, context, kv_config, groups, torch.device("cpu"), kv_cache_dtype,
                      kernel_block_sizes, config)
    full, window, index = (layout.units[k] for k in (FULL, WINDOW, INDEX))
    assert tuple(layers[0].kv_cache.shape) == (B, full.slots, full.block_size, 2 * D)        # logical FA layout
    assert tuple(context[layout.unit_names(names, INDEX)[0]].kv_cache.shape) == (B, index.block_size,
                                                                                 index.slots * 16)
    # Every (layer, head) addresses its own slot: write a distinct value through each LayerKV, find it.
    written = set()
    for i in range(3):
        lkv = LayerKV(layout, i, names)
        lkv.bind(context)
        assert lkv.kv.num_heads == HKV and (lkv.index is None) == (not heads.retrieval_heads[i])
        for h in range(HKV):
            unit = lkv.kv.units[lkv.head_unit[h]]
            view = unit.view(torch.uint8) if unit.dtype == torch.uint8 else unit
            view[1, 0, lkv.head_slot[h]] = 10 * i + h + 1
            written.add((lkv.kv_unit_names[lkv.head_unit[h]], lkv.head_slot[h]))
        assert sorted(h for part in lkv.parts for h in part.kv_heads) == list(range(HKV))
    assert len(written) == 3 * HKV                                                          # no slot shared
    assert sum(window.slots for _ in range(g)) >= sum(HKV - len(heads.retrieval_kv_heads(i)) for i in range(3))
