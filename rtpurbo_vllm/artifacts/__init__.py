"""RTPurbo artifacts: the folder the calibration CLI writes and the vLLM backend loads.

Layout (by default ``<model_dir>/rtpurbo/``; see ``docs/ARTIFACTS.md``)::

    rtpurbo_config.json     format_version, model fingerprint, retrieval heads per layer,
                            sparsity params, has_indexer, provenance
    indexer.safetensors     layers.{i}.w_q / layers.{i}.w_k, each [HR_i, index_dim, head_dim]
                            (only when has_indexer is true)
"""

from rtpurbo_vllm.artifacts.io import find_artifact_dir, load_artifact, save_artifact
from rtpurbo_vllm.artifacts.rtp_llm import import_rtp_llm_headwise
from rtpurbo_vllm.artifacts.schema import (
    CONFIG_FILE,
    DEFAULT_DIRNAME,
    FORMAT_VERSION,
    INDEXER_FILE,
    SUPPORTED_DTYPES,
    ArtifactError,
    ModelFingerprint,
    Provenance,
    RTPurboArtifact,
    SparsityParams,
)

__all__ = [
    "CONFIG_FILE",
    "DEFAULT_DIRNAME",
    "FORMAT_VERSION",
    "INDEXER_FILE",
    "SUPPORTED_DTYPES",
    "ArtifactError",
    "ModelFingerprint",
    "Provenance",
    "RTPurboArtifact",
    "SparsityParams",
    "find_artifact_dir",
    "import_rtp_llm_headwise",
    "load_artifact",
    "save_artifact",
]
