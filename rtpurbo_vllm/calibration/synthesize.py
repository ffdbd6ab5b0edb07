"""Synthetic artifacts for models with dummy weights (benchmarks, memory measurements).

A model served with ``--load-format dummy`` has random weights and no real retrieval heads, but the
serving path still needs an artifact of the right shape. This draws the retrieval heads at random
(with the same ratio / count / KV-group / per-layer KV budget rules as ``heads``) and a random indexer. Its provenance
says it is synthetic; never use one for accuracy measurements.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from rtpurbo_vllm.artifacts import (
    DEFAULT_DIRNAME,
    ModelFingerprint,
    Provenance,
    RTPurboArtifact,
    SparsityParams,
    load_artifact,
    save_artifact,
)
from rtpurbo_vllm.calibration.heads import DEFAULT_RATIO, select_heads


def synthetic_artifact(hf_config, *, ratio: float | None = DEFAULT_RATIO, count: int | None = None,
                       by_kv_group: bool = False, kv_heads_per_layer: int | None = None, seed: int = 0,
                       params: SparsityParams = SparsityParams()) -> RTPurboArtifact:
    """An artifact with random retrieval heads (:func:`select_heads` on uniform random scores) and a
    random ``[HR, DI, D]`` fp32 indexer per layer."""
    model = ModelFingerprint.from_hf_config(hf_config)
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(model.num_layers, model.num_heads, generator=generator)          # [L, HQ]
    heads = select_heads(scores, model.num_kv_heads, ratio, count, by_kv_group, kv_heads_per_layer)

    def weights(n: int) -> torch.Tensor:
        return torch.randn(n, params.index_dim, model.head_dim, generator=generator) / math.sqrt(model.head_dim)

    indexer = tuple((weights(len(h)), weights(len(h))) for h in heads)
    provenance = Provenance(data="synthetic: random retrieval heads and indexer (dummy-weight benchmarks only)",
                            steps=0, seed=seed, tool="rtpurbo-calibrate synthesize",
                            extra={"ratio": ratio, "count": count, "by_kv_group": by_kv_group,
                                   "kv_heads_per_layer": kv_heads_per_layer})
    return RTPurboArtifact(model, tuple(tuple(h) for h in heads), params, provenance, indexer)


def synthesize_artifact(model_dir: str | os.PathLike, out: str | os.PathLike | None = None, **kwargs) -> Path:
    """The ``synthesize`` command: writes ``out`` (default ``<model_dir>/rtpurbo``) and loads it back."""
    from rtpurbo_vllm.calibration.capture import check_supported, load_config

    hf_config = load_config(model_dir)
    check_supported(hf_config)
    target = save_artifact(synthetic_artifact(hf_config, **kwargs),
                           Path(model_dir) / DEFAULT_DIRNAME if out is None else out)
    load_artifact(target, hf_config=hf_config)
    return target
