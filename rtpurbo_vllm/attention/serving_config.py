"""Where a serving process finds the model's RTPurbo artifact, and the one loaded copy per process.

The artifact folder is ``<model_dir>/rtpurbo`` unless ``--additional-config '{"rtpurbo": {"artifact":
"/path"}}'`` names another. A model without a valid artifact refuses to start with a message that
says what is missing and how to make it.

``{"rtpurbo": {"kv_layout": "split"}}`` selects the memory-saving KV layout (:mod:`rtpurbo_vllm.kv_cache`:
full K/V only for the KV heads of retrieval heads, sink + window K/V for the others); the default
``"full"`` keeps every KV head for every token.
"""

from __future__ import annotations

import os
from pathlib import Path

from rtpurbo_vllm.artifacts import ArtifactError, RTPurboArtifact, find_artifact_dir, load_artifact

ADDITIONAL_CONFIG_KEY = "rtpurbo"
_KNOWN_KEYS = {"artifact", "kv_layout"}
KV_LAYOUTS = ("full", "split")
_LOADED: dict[Path, RTPurboArtifact] = {}


def _options(vllm_config) -> dict:
    options = (vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY, {})
    if not isinstance(options, dict) or set(options) - _KNOWN_KEYS:
        raise ArtifactError(f"--additional-config '{ADDITIONAL_CONFIG_KEY}' must be an object with keys "
                            f"{sorted(_KNOWN_KEYS)}, got {options!r}")
    return options


def kv_layout_for(vllm_config) -> str:
    """The KV-cache layout this engine serves with: ``"full"`` (default) or ``"split"``."""
    layout = _options(vllm_config).get("kv_layout", "full")
    if layout not in KV_LAYOUTS:
        raise ArtifactError(f"--additional-config '{ADDITIONAL_CONFIG_KEY}.kv_layout' must be one of "
                            f"{list(KV_LAYOUTS)}, got {layout!r}")
    return layout


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
