"""Assemble the artifact folder from a heads file and an indexer checkpoint, write it atomically and
validate it by loading it back against the model's config (``docs/ARTIFACTS.md``)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from rtpurbo_vllm.artifacts import DEFAULT_DIRNAME, Provenance, RTPurboArtifact, SparsityParams, load_artifact, save_artifact
from rtpurbo_vllm.calibration.heads import HeadsFile
from rtpurbo_vllm.calibration.train_indexer import load_checkpoint


def build_artifact(heads: HeadsFile, checkpoint_dir: str | os.PathLike,
                   params: SparsityParams = SparsityParams()) -> RTPurboArtifact:
    """The artifact of ``heads`` with the indexer of a checkpoint (``params.index_dim`` is taken from it).

    Raises:
        ValueError: the checkpoint was trained for other heads or another model.
    """
    ckpt = load_checkpoint(checkpoint_dir)
    if ckpt.state["retrieval_heads"] != heads.retrieval_heads or ckpt.state["model"] != heads.model.to_dict():
        raise ValueError(f"the indexer checkpoint {ckpt.path} was trained for other retrieval heads or another "
                         f"model than the heads file; fix: pass the heads file given to train-indexer")
    config = ckpt.state["config"]
    provenance = Provenance(
        data=ckpt.state["data"], steps=ckpt.step, seed=config["seed"], tool="rtpurbo-calibrate",
        extra={"train_config": config, "final_loss": ckpt.state["losses"][-1], "heads_settings": heads.settings})
    return RTPurboArtifact(heads.model, heads.retrieval_heads, replace(params, index_dim=config["index_dim"]),
                           provenance, ckpt.indexer())


def export_artifact(model_dir: str | os.PathLike, heads: str | os.PathLike, indexer: str | os.PathLike,
                    out: str | os.PathLike | None = None, params: SparsityParams = SparsityParams()) -> Path:
    """The ``export`` command: writes ``out`` (default ``<model_dir>/rtpurbo``) and loads it back.

    Raises:
        ValueError: unsupported model, heads file or checkpoint of another model, invalid params, or
            an output folder that cannot be written (``ArtifactError``, a ``ValueError``).
    """
    from rtpurbo_vllm.calibration.capture import check_supported, load_config

    hf_config = load_config(model_dir)
    check_supported(hf_config)
    artifact = build_artifact(HeadsFile.load(heads, hf_config), indexer, params)
    target = save_artifact(artifact, Path(model_dir) / DEFAULT_DIRNAME if out is None else out)
    load_artifact(target, hf_config=hf_config)
    return target
