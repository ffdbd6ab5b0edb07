"""Finding, loading and (atomically) saving RTPurbo artifact folders.

Only JSON and safetensors are read; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rtpurbo_vllm.artifacts.schema import (
    CONFIG_FILE,
    DEFAULT_DIRNAME,
    INDEXER_FILE,
    ArtifactError,
    ModelFingerprint,
    RTPurboArtifact,
)
from rtpurbo_vllm.artifacts.validate import (
    RECREATE,
    check_config_dict,
    check_has_indexer,
    check_indexer_names,
    check_matches_model,
    require_dir,
    require_file,
    validate_artifact,
    validate_config,
    validate_indexer,
)

# A list of integers as json.dumps(indent=...) writes it: one number per line.
_INT_LIST = re.compile(r"\[\n\s*-?\d+(?:,\n\s*-?\d+)*\n\s*\]")
_INT = re.compile(r"-?\d+")


def find_artifact_dir(model_dir: str | os.PathLike, override: str | os.PathLike | None = None) -> Path:
    """The artifact folder of a model: ``override`` if given, else ``<model_dir>/rtpurbo``.

    ``model_dir`` must be a local folder (for a Hub model id, pass the downloaded snapshot folder).

    Raises:
        ArtifactError: the folder does not exist (the message says how to make one).
    """
    if override is not None:
        path = Path(override)
        require_dir(path, "the RTPurbo artifact folder", f"pass the folder that holds {CONFIG_FILE}, or no "
                    f"override to use <model_dir>/{DEFAULT_DIRNAME}")
        return path
    path = Path(model_dir) / DEFAULT_DIRNAME
    require_dir(path, "no RTPurbo artifact for this model: the folder",
                f"create one with `rtpurbo-calibrate heads|train-indexer|export {model_dir} ...` (docs/CALIBRATION.md; "
                f"export writes {path}), or import an "
                f"RTP-LLM headwise_config with rtpurbo_vllm.artifacts.import_rtp_llm_headwise and save it "
                f"there, or give the artifact folder explicitly")
    return path


def load_artifact(directory: str | os.PathLike, *, hf_config: Any = None,
                  require_indexer: bool = True) -> RTPurboArtifact:
    """Reads and validates an artifact folder.

    Args:
        directory: the folder holding ``rtpurbo_config.json`` (and ``indexer.safetensors``).
        hf_config: the served model's transformers config; when given, the artifact's fingerprint
            (architecture, layers, heads, head_dim, RoPE) must match it.
        require_indexer: refuse a head-wise-only artifact (``has_indexer`` false).

    Returns:
        The artifact; indexer tensors are on the CPU in their stored dtype.

    Raises:
        ArtifactError: any problem, with the fix in the message.
    """
    directory = Path(directory)
    require_dir(directory, "the RTPurbo artifact folder",
                f"pass the folder written by `rtpurbo-calibrate` (by default <model_dir>/{DEFAULT_DIRNAME})")
    config = read_json(directory / CONFIG_FILE, "the RTPurbo config", RECREATE)
    check_config_dict(config)
    artifact = RTPurboArtifact.from_config_dict(config)
    validate_config(artifact)
    if hf_config is not None:
        check_matches_model(artifact.model, ModelFingerprint.from_hf_config(hf_config))
    if require_indexer:
        check_has_indexer(config["has_indexer"], directory)
    if not config["has_indexer"]:
        return artifact
    path = directory / INDEXER_FILE
    require_file(path, "the indexer file", f"{CONFIG_FILE} says has_indexer is true; restore the file or {RECREATE}")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"the indexer file {path} is not a readable safetensors file ({exc}); "
                            f"fix: {RECREATE}") from exc
    check_indexer_names(tensors.keys(), artifact.model.num_layers)
    artifact = artifact.with_indexer_tensors(tensors)
    validate_indexer(artifact)
    return artifact


def read_json(path: Path, what: str, fix: str) -> Any:
    """Parses the JSON file ``path`` (``what`` and ``fix`` word the errors)."""
    require_file(path, what, fix)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{what} {path} is not readable JSON ({exc}); fix: {fix}") from exc


def save_artifact(artifact: RTPurboArtifact, directory: str | os.PathLike) -> Path:
    """Validates ``artifact`` and writes it to the folder ``directory`` (created with its parents).

    The files are written to a hidden sibling folder, flushed to disk, and only then renamed to
    ``directory``: a failed write removes that folder and leaves ``directory`` as it was. An existing
    artifact folder (one holding nothing but artifact files) is moved aside, replaced and deleted; a
    folder holding anything else is refused. A symbolic link to a folder is written through: the
    folder it points to is replaced and the link is kept. A process killed mid-write can leave a
    hidden ``.<name>.partial-*`` folder next to the written folder; it is never read and can be deleted.

    Returns:
        ``directory`` as an absolute path (a link stays a link).

    Raises:
        ArtifactError: the artifact is invalid, the folder cannot be replaced or is not writable.
    """
    validate_artifact(artifact)
    given = Path(directory).absolute()
    target = given.resolve() if given.is_symlink() else given
    _check_replaceable(target)
    staging = _sibling(target, "partial")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as exc:
        raise ArtifactError(f"cannot write the RTPurbo artifact to {target}: {target.parent} is not a writable "
                            f"folder ({exc.strerror or exc}); fix: choose a writable output folder or fix "
                            f"its permissions") from exc
    try:
        _write_files(artifact, staging)
        _move_into_place(staging, target)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):
            raise ArtifactError(f"writing the RTPurbo artifact to {target} failed ({exc}); nothing was changed; "
                                f"fix: check free disk space and permissions in {target.parent}") from exc
        raise
    return given


def _check_replaceable(target: Path) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise ArtifactError(f"{target} exists and is not a folder; fix: remove it or choose another output folder")
    foreign = sorted(p.name for p in target.iterdir() if p.name not in (CONFIG_FILE, INDEXER_FILE))
    if foreign:
        raise ArtifactError(f"{target} exists and holds files that are not part of an RTPurbo artifact "
                            f"({foreign[:5]}), so it is not replaced; fix: choose a new or empty folder "
                            f"(by default <model_dir>/{DEFAULT_DIRNAME})")


def _sibling(target: Path, tag: str) -> Path:
    return target.with_name(f".{target.name}.{tag}-{uuid.uuid4().hex[:12]}")


def _write_files(artifact: RTPurboArtifact, folder: Path) -> None:
    config_path = folder / CONFIG_FILE
    text = json.dumps(artifact.to_config_dict(), indent=2, allow_nan=False)
    # One line per list of integers (e.g. a layer's retrieval heads); raw newlines never occur in JSON strings.
    text = _INT_LIST.sub(lambda m: "[" + ", ".join(_INT.findall(m.group(0))) + "]", text)
    config_path.write_text(text + "\n", encoding="utf-8")
    _fsync(config_path)
    if artifact.indexer is not None:
        # Own contiguous CPU copies: safetensors refuses tensors that share storage.
        tensors = {name: t.detach().to("cpu", copy=True).contiguous()
                   for name, t in artifact.indexer_tensors().items()}
        save_file(tensors, folder / INDEXER_FILE, metadata={"format": "pt"})
        _fsync(folder / INDEXER_FILE)
    _fsync(folder)


def _move_into_place(staging: Path, target: Path) -> None:
    if target.exists():
        old = _sibling(target, "old")
        os.rename(target, old)
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, target)
    _fsync(target.parent)


def _fsync(path: Path) -> None:
    """Flushes a file's or a folder's content (a folder: its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
