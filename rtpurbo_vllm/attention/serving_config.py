"""Where a serving process finds the model's RTPurbo artifact, and the one loaded copy per process.

The artifact folder is ``<model_dir>/rtpurbo`` unless ``--additional-config '{"rtpurbo": {"artifact":
"/path"}}'`` names another. A model without a valid artifact refuses to start with a message that
says what is missing and how to make it.
"""

from __future__ import annotations

import os
from pathlib import Path

from rtpurbo_vllm.artifacts import ArtifactError, RTPurboArtifact, find_artifact_dir, load_artifact

ADDITIONAL_CONFIG_KEY = "rtpurbo"
_KNOWN_KEYS = {"artifact"}
_LOADED: dict[Path, RTPurboArtifact] = {}


def artifact_dir_for(vllm_config) -> Path:
    """The artifact folder this engine serves with (not yet validated)."""
    options = (vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY, {})
    if not isinstance(options, dict) or set(options) - _KNOWN_KEYS:
        raise ArtifactError(f"--additional-config '{ADDITIONAL_CONFIG_KEY}' must be an object with keys "
                            f"{sorted(_KNOWN_KEYS)}, got {options!r}")
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
