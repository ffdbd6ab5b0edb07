"""What a serving process serves with: the model's RTPurbo artifact (one loaded copy per process), its
sparsity settings after the serve-time overrides, and the KV layout.

The artifact folder is ``<model_dir>/rtpurbo`` unless ``--additional-config '{"rtpurbo": {"artifact":
"/path"}}'`` names another. A model without a valid artifact refuses to start with a message that
says what is missing and how to make it.

The KV layout (:mod:`rtpurbo_vllm.kv_cache`) is ``"compact"`` by default: full K/V only for the KV heads
of retrieval heads, sink + window K/V for the others. ``{"rtpurbo": {"kv_layout": "full"}}`` keeps every KV
head for every token; it is also the default where vLLM's hybrid KV-cache manager, which the compact
layout's window and index units need, is off (:func:`kv_layout_for`). :func:`serving_kv_layout` plans the
layout once per process (every layer installs its share of the same layout).

The index keys follow the K/V cache's precision: one byte per value (e4m3) with ``--kv-cache-dtype fp8``,
the model's dtype otherwise (:func:`~rtpurbo_vllm.kv_cache.index_key_dtype`). ``{"rtpurbo":
{"index_key_dtype": "model"}}`` keeps them in the model's dtype under an fp8 cache, ``"fp8_e4m3"`` stores
them in e4m3 under a bf16 one (measure the routing with ``rtpurbo-calibrate evaluate --index-key-dtype
fp8_e4m3`` first).

``{"rtpurbo": {"top_p": 0.85, "prefill_top_p": 0.95}}`` overrides the artifact's decode and prefill
top-p at serve time (:data:`PARAM_OVERRIDES`; each checked by the artifact's rules, ``PARAM_RULES``);
:func:`serving_params` gives the settings the backend runs with.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from vllm.logger import init_logger

from rtpurbo_vllm.artifacts import ArtifactError, RTPurboArtifact, SparsityParams, find_artifact_dir, load_artifact
from rtpurbo_vllm.artifacts.validate import check_params
from rtpurbo_vllm.kv_cache.layout import INDEX_KEY_DTYPES, KV_LAYOUTS, WINDOW, KVLayout, index_key_dtype

logger = init_logger(__name__)

ADDITIONAL_CONFIG_KEY = "rtpurbo"
DEFAULT_KV_LAYOUT = "compact"
# Sparsity settings a serving process may override: each is a number, taken instead of the artifact's.
PARAM_OVERRIDES = ("top_p", "prefill_top_p")
_KNOWN_KEYS = {"artifact", "kv_layout", "index_key_dtype", *PARAM_OVERRIDES}
_LOADED: dict[Path, RTPurboArtifact] = {}
_KV_LAYOUTS: dict[tuple, KVLayout] = {}


def _options(vllm_config) -> dict:
    options = (vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY, {})
    if not isinstance(options, dict) or set(options) - _KNOWN_KEYS:
        raise ArtifactError(f"--additional-config '{ADDITIONAL_CONFIG_KEY}' must be an object with keys "
                            f"{sorted(_KNOWN_KEYS)}, got {options!r}")
    return options


def kv_layout_for(vllm_config) -> str:
    """The KV-cache layout this engine serves with: ``"compact"`` (the default) or ``"full"``.

    The compact layout groups its full, window and index units through vLLM's hybrid KV-cache manager.
    Where that is off (``--disable-hybrid-kv-cache-manager``, or vLLM turned it off, e.g. for a KV
    connector without hybrid support) the default is ``"full"`` and an explicit ``"compact"`` is refused.
    """
    hybrid = not vllm_config.scheduler_config.disable_hybrid_kv_cache_manager
    options = _options(vllm_config)
    if "kv_layout" not in options and not hybrid:
        logger.info_once("RTPURBO: vLLM's hybrid KV-cache manager is off, so the KV layout is \"full\" (every "
                         "KV head keeps every token) instead of the default \"compact\"")
    layout = options.get("kv_layout", DEFAULT_KV_LAYOUT if hybrid else "full")
    if layout not in KV_LAYOUTS:
        raise ArtifactError(f"--additional-config '{ADDITIONAL_CONFIG_KEY}.kv_layout' must be one of "
                            f"{list(KV_LAYOUTS)}, got {layout!r}")
    if layout == "compact" and not hybrid:
        raise ArtifactError(f"--additional-config '{ADDITIONAL_CONFIG_KEY}.kv_layout' is \"compact\", which needs "
                            "vLLM's hybrid KV-cache manager, and it is off (--disable-hybrid-kv-cache-manager, or "
                            "a KV connector without hybrid support): drop that flag or serve with \"kv_layout\": "
                            "\"full\"")
    return layout


def index_key_dtype_for(vllm_config) -> str:
    """How this engine stores the index keys: ``"auto"`` (default, the K/V cache's precision), ``"model"``
    or ``"fp8_e4m3"`` (:data:`~rtpurbo_vllm.kv_cache.INDEX_KEY_DTYPES`)."""
    setting = _options(vllm_config).get("index_key_dtype", "auto")
    if setting not in INDEX_KEY_DTYPES:
        raise ArtifactError(f"--additional-config '{ADDITIONAL_CONFIG_KEY}.index_key_dtype' must be one of "
                            f"{list(INDEX_KEY_DTYPES)}, got {setting!r}")
    return setting


def artifact_dir_for(vllm_config) -> Path:
    """The artifact folder this engine serves with (not yet validated)."""
    options = _options(vllm_config)
    model_dir = vllm_config.model_config.model
    override = options.get("artifact")
    if override is None and not os.path.isdir(model_dir):
        raise ArtifactError(
            f"RTPURBO needs the RTPurbo artifact of {model_dir!r}, which is not a local folder; pass "
            f"--additional-config '{{\"{ADDITIONAL_CONFIG_KEY}\": {{\"artifact\": \"/path/to/rtpurbo\"}}}}' "
            "(make one with `rtpurbo-calibrate`)")
    return find_artifact_dir(model_dir, override)


def serving_artifact(vllm_config) -> RTPurboArtifact:
    """The validated artifact (with indexer) for ``vllm_config``'s model, loaded once per process."""
    directory = artifact_dir_for(vllm_config).resolve()
    if directory not in _LOADED:
        _LOADED[directory] = load_artifact(directory, hf_config=vllm_config.model_config.hf_text_config,
                                           require_indexer=True)
    return _LOADED[directory]


def serving_params(vllm_config) -> SparsityParams:
    """The sparsity settings this engine serves with: the artifact's, with the :data:`PARAM_OVERRIDES`
    of ``--additional-config`` applied.

    Raises:
        ArtifactError: an override that is not a number or breaks its rule (``PARAM_RULES``), naming
            ``--additional-config 'rtpurbo.<key>'``.
    """
    options = _options(vllm_config)
    names = {key: f"--additional-config '{ADDITIONAL_CONFIG_KEY}.{key}'" for key in PARAM_OVERRIDES}
    overrides = {key: options[key] for key in PARAM_OVERRIDES if key in options}
    for key, value in overrides.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ArtifactError(f"{names[key]} is {value!r}, must be a number; fix: pass a JSON number, "
                                f"e.g. {{\"{ADDITIONAL_CONFIG_KEY}\": {{\"{key}\": 0.9}}}}")
    params = dataclasses.replace(serving_artifact(vllm_config).params,
                                 **{key: float(value) for key, value in overrides.items()})
    check_params(params, where="", names=names)
    return params


def serving_kv_layout(vllm_config, artifact: RTPurboArtifact, name: str, kv_dtype: torch.dtype,
                      model_dtype: torch.dtype) -> KVLayout:
    """This rank's KV layout of ``artifact``'s model, planned once per process and configuration.

    Args:
        vllm_config: the engine config (block size: ``cache_config.block_size``).
        artifact: the serving artifact.
        name: ``"compact"`` or ``"full"``.
        kv_dtype: the K/V cache's torch dtype (``torch.uint8`` for fp8 caches).
        model_dtype: the model's activation dtype (the index keys' with a bf16/fp16 cache, unless
            :func:`index_key_dtype_for` says fp8).
    """
    from rtpurbo_vllm.attention.tp import tp_rank_and_size

    rank, size = tp_rank_and_size()
    block_unit = vllm_config.cache_config.block_size
    index_dtype = index_key_dtype(index_key_dtype_for(vllm_config), model_dtype, kv_dtype)
    key = (id(artifact), name, kv_dtype, index_dtype, rank, size, block_unit)
    if key not in _KV_LAYOUTS:
        layout = KVLayout.from_artifact(artifact, name=name, kv_dtype=kv_dtype, index_dtype=index_dtype,
                                        tp_rank=rank, tp_size=size, block_unit=block_unit)
        _KV_LAYOUTS[key] = layout
        if rank == 0:
            peak = (". vLLM's \"Maximum concurrency\" line sizes every request at its peak while it prefills "
                    "(window units: max(window, dense_threshold) tokens plus the tokens in flight), so more "
                    "requests decode at once than it says") if layout.has(WINDOW) else ""
            logger.info("RTPURBO %s%s", layout.summary(vllm_config.model_config.max_model_len), peak)
    return _KV_LAYOUTS[key]
