"""Checks on RTPurbo artifacts: one function per kind of failure, each raising
:class:`~rtpurbo_vllm.artifacts.schema.ArtifactError` with a message that names the problem and the fix.

:func:`check_config_dict` checks the structure of a parsed ``rtpurbo_config.json`` (version, keys,
value types); :func:`validate_artifact` checks an in-memory artifact completely (structure, values,
head ids, indexer tensors); :func:`check_matches_model` compares it with the served model.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Callable, Collection, Mapping

import torch

from rtpurbo_vllm.artifacts.schema import (
    CONFIG_FILE,
    FORMAT_VERSION,
    INDEXER_FILE,
    SUPPORTED_DTYPES,
    ArtifactError,
    ModelFingerprint,
    Provenance,
    RTPurboArtifact,
    SparsityParams,
    indexer_tensor_name,
)
from rtpurbo_vllm.head_layout import HeadLayout

RECREATE = "re-create the artifact with `rtpurbo-calibrate`"
_FIX_FIELD = f"fix: correct the field (docs/ARTIFACTS.md lists every field) or {RECREATE}"

# The keys of rtpurbo_config.json; a dataclass stands for a nested object with that class's fields.
_CONFIG_SCHEMA: dict[str, Any] = {
    "format_version": int,
    "model": ModelFingerprint,
    "retrieval_heads": list,
    "params": SparsityParams,
    "has_indexer": bool,
    "provenance": Provenance,
}
_SECTIONS = (ModelFingerprint, SparsityParams, Provenance)
# Per section, the fields added after format_version 1 was fixed: a file written before them lacks the
# key and loads with the field's default. Every other key is required; unknown keys are errors.
ADDED_AFTER_FORMAT_1: dict[type, frozenset[str]] = {SparsityParams: frozenset({"prefill_top_p"})}
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true/false", list: "a list",
               type(None): "null"}


# ---------------------------------------------------------------------------------------------
# Files and folders
# ---------------------------------------------------------------------------------------------
def require_dir(path: Path, what: str, fix: str) -> None:
    """``path`` must be an existing folder."""
    if not path.is_dir():
        problem = "is not a folder" if path.exists() else "does not exist"
        raise ArtifactError(f"{what} {path} {problem}; fix: {fix}")


def require_file(path: Path, what: str, fix: str) -> None:
    """``path`` must be an existing regular file."""
    if not path.is_file():
        problem = "is not a file" if path.exists() else "is missing"
        raise ArtifactError(f"{what} {path} {problem}; fix: {fix}")


# ---------------------------------------------------------------------------------------------
# Structure of rtpurbo_config.json
# ---------------------------------------------------------------------------------------------
def check_format_version(config: Mapping[str, Any]) -> None:
    """``format_version`` must be :data:`FORMAT_VERSION` (checked before any other key, since
    another version may have other keys)."""
    version = config.get("format_version")
    if version == FORMAT_VERSION and type(version) is int:
        return
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        fix = (f"fix: upgrade rtpurbo-vllm (this one reads format_version {FORMAT_VERSION}), "
               f"or {RECREATE} of this version")
    else:
        fix = f"fix: {RECREATE}"
    raise ArtifactError(f"{CONFIG_FILE}: unknown format_version {version!r} "
                        f"(supported: {FORMAT_VERSION}); {fix}")


def check_missing_keys(section: Mapping[str, Any], expected: Collection[str], where: str) -> None:
    missing = [k for k in expected if k not in section]
    if missing:
        raise ArtifactError(f"{CONFIG_FILE}: {where} lacks the keys {missing}; {_FIX_FIELD}")


def check_unknown_keys(section: Mapping[str, Any], expected: Collection[str], where: str) -> None:
    unknown = [k for k in section if k not in expected]
    if unknown:
        raise ArtifactError(f"{CONFIG_FILE}: {where} has unknown keys {unknown} (allowed: {list(expected)}); "
                            f"fix: remove them, or upgrade rtpurbo-vllm if a newer version wrote the file")


def check_value_type(value: Any, hint: Any, path: str) -> None:
    if not _is_json_instance(value, hint):
        raise ArtifactError(f"{CONFIG_FILE}: {path} is {value!r} ({type(value).__name__}), "
                            f"expected {_describe(hint)}; {_FIX_FIELD}")


def check_config_dict(config: Any) -> None:
    """The parsed ``rtpurbo_config.json`` has the known version and exactly the documented keys (those of
    :data:`ADDED_AFTER_FORMAT_1` may be missing), each with a value of the documented JSON type. Values
    are checked by :func:`validate_artifact`."""
    if not isinstance(config, dict):
        raise ArtifactError(f"{CONFIG_FILE} must hold a JSON object, not {type(config).__name__}; "
                            f"fix: {RECREATE}")
    check_format_version(config)
    _check_section(config, _CONFIG_SCHEMA, "")
    for layer, heads in enumerate(config["retrieval_heads"]):
        check_value_type(heads, list, f"retrieval_heads[{layer}]")


def _check_section(section: Any, schema: Mapping[str, Any], where: str, optional: Collection[str] = ()) -> None:
    """``section`` holds every key of ``schema`` but the ``optional`` ones, no other key, each of its type."""
    name = where or "the top level"
    check_value_type(section, dict, name)
    check_missing_keys(section, [k for k in schema if k not in optional], name)
    check_unknown_keys(section, schema, name)
    for key, hint in schema.items():
        path = f"{where}.{key}" if where else key
        if key not in section:
            continue
        if hint in _SECTIONS:
            _check_section(section[key], typing.get_type_hints(hint), path, ADDED_AFTER_FORMAT_1.get(hint, ()))
        else:
            check_value_type(section[key], hint, path)


def _is_json_instance(value: Any, hint: Any) -> bool:
    """isinstance for the JSON form of a field annotated ``hint`` (a dataclass becomes an object)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_is_json_instance(value, arg) for arg in typing.get_args(hint))
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    hint = typing.get_origin(hint) or hint
    if dataclasses.is_dataclass(hint):
        return isinstance(value, dict)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    return _TYPE_NAMES.get(hint, "a JSON object")


def check_json_serialisable(config: Mapping[str, Any]) -> None:
    """Strict JSON (no NaN/Infinity, no Python objects), e.g. in ``provenance.extra``."""
    try:
        json.dumps(config, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"{CONFIG_FILE}: the configuration is not strict JSON ({exc}); fix: use only "
                            "strings, finite numbers, booleans, null, lists and dicts (e.g. in provenance.extra)") from exc


# ---------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------
MAX_TOKENS = 2**31 - 1
"""Largest token count (``sink_tokens``, ``window``, ``dense_threshold``): the kernels compare them
with int32 sequence lengths."""
MIN_INDEX_DIM, MAX_INDEX_DIM = 16, 256
"""``index_dim`` bounds: ``tl.dot`` needs 16 or more, and the index kernels keep ``[32, DI]`` float32
tiles in registers."""
MAX_BLOCK_SIZE = 1024
"""Largest ``block_size``: the block top-p kernel scores one ``[block_size, DI]`` tile of index keys in
registers."""


def _power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


# Field of SparsityParams -> (rule on its value, the rule in words). What the kernels can run: the
# only place these limits are defined (the artifact validator, the calibration CLI, the RTP-LLM
# import and the serve-time overrides all use it; the backend loads artifacts through the validator).
PARAM_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "sink_tokens": (lambda v: 0 <= v <= MAX_TOKENS, f"must be in [0, {MAX_TOKENS}] (0 = no sink tokens)"),
    "window": (lambda v: 1 <= v <= MAX_TOKENS, f"must be in [1, {MAX_TOKENS}]"),
    "top_p": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "prefill_top_p": (lambda v: 0 < v <= 1, "must be in (0, 1] (1 = dense retrieval prefill)"),
    "block_size": (lambda v: _power_of_two(v) and v <= MAX_BLOCK_SIZE,
                   f"must be a power of two in [1, {MAX_BLOCK_SIZE}] (the block top-p kernel's tiles)"),
    "index_dim": (lambda v: _power_of_two(v) and MIN_INDEX_DIM <= v <= MAX_INDEX_DIM,
                  f"must be a power of two in [{MIN_INDEX_DIM}, {MAX_INDEX_DIM}] (the index kernels' tiles)"),
    "dense_threshold": (lambda v: 0 <= v <= MAX_TOKENS,
                        f"must be in [0, {MAX_TOKENS}] (0 = sparse at every length)"),
}


def param_problem(name: str, value: Any) -> str | None:
    """The rule of :data:`PARAM_RULES` that ``value`` breaks as the field ``name``, or ``None``."""
    ok, rule = PARAM_RULES[name]
    return None if ok(value) else rule


def check_params(params: SparsityParams, where: str = CONFIG_FILE, names: Mapping[str, str] | None = None) -> None:
    """Every field follows :data:`PARAM_RULES`.

    Args:
        where: the input named in messages (empty: none, e.g. for command-line options).
        names: how that input names each field (e.g. ``{"window": "--window"}``); by default
            ``params.<field>``, as in ``rtpurbo_config.json``.
    """
    for name in PARAM_RULES:
        value = getattr(params, name)
        rule = param_problem(name, value)
        if rule is not None:
            field_name = (names or {}).get(name, f"params.{name}")
            raise ArtifactError(f"{_located(where, field_name)} is {value!r}, {rule}; fix: set a valid value "
                                f"(default {getattr(SparsityParams, name)!r})")


def check_fingerprint(model: ModelFingerprint, where: str = CONFIG_FILE,
                      names: Mapping[str, str] | None = None) -> None:
    """Sizes are positive and the query heads split evenly over the KV heads.

    Args:
        where: the input named in messages.
        names: how that input names each field; by default ``model.<field>``, as in ``rtpurbo_config.json``.
    """
    def name(field_name: str) -> str:
        return (names or {}).get(field_name, f"model.{field_name}")

    fix = f"fix: {RECREATE} from the model's config" if where == CONFIG_FILE else "fix: correct the model's config"
    for field_name in ("num_layers", "num_heads", "num_kv_heads", "head_dim"):
        if getattr(model, field_name) <= 0:
            raise ArtifactError(f"{_located(where, name(field_name))} is {getattr(model, field_name)}, must be "
                                f"positive; {fix}")
    if model.num_heads % model.num_kv_heads:
        raise ArtifactError(f"{_located(where, name('num_heads'))}={model.num_heads} is not a multiple of "
                            f"{name('num_kv_heads')}={model.num_kv_heads}; {fix}")


def _located(where: str, field_name: str) -> str:
    return f"{where}: {field_name}" if where else field_name


def check_layer_count(model: ModelFingerprint, retrieval_heads: tuple[tuple[int, ...], ...]) -> None:
    if len(retrieval_heads) != model.num_layers:
        raise ArtifactError(f"{CONFIG_FILE}: retrieval_heads has {len(retrieval_heads)} layers but "
                            f"model.num_layers is {model.num_layers}; fix: give one list per layer "
                            f"(an empty list for a layer without retrieval heads) or {RECREATE}")


def check_head_ids(model: ModelFingerprint, retrieval_heads: tuple[tuple[int, ...], ...]) -> None:
    """Per layer: integer ids in ``[0, num_heads)``, no duplicates, ascending."""
    fix = f"fix: list global query-head ids, each once, in ascending order, or {RECREATE}"
    for layer, heads in enumerate(retrieval_heads):
        where = f"{CONFIG_FILE}: retrieval_heads[{layer}] = {list(heads)}"
        if not all(isinstance(h, int) and not isinstance(h, bool) for h in heads):
            raise ArtifactError(f"{where} holds a non-integer head id; {fix}")
        bad = [h for h in heads if not 0 <= h < model.num_heads]
        if bad:
            raise ArtifactError(f"{where} has head ids {bad} out of range [0, {model.num_heads}) "
                                f"(model.num_heads={model.num_heads}); {fix}")
        if len(set(heads)) != len(heads):
            raise ArtifactError(f"{where} has duplicate head ids; {fix}")
        if list(heads) != sorted(heads):
            raise ArtifactError(f"{where} is not sorted; {fix}")


# ---------------------------------------------------------------------------------------------
# Indexer tensors
# ---------------------------------------------------------------------------------------------
def check_indexer_names(names: Collection[str], num_layers: int) -> None:
    """Exactly ``layers.{i}.w_q`` and ``layers.{i}.w_k`` for ``i < num_layers``."""
    expected = [indexer_tensor_name(i, w) for i in range(num_layers) for w in ("w_q", "w_k")]
    missing = [n for n in expected if n not in names]
    if missing:
        raise ArtifactError(f"{INDEXER_FILE}: missing tensors {missing[:6]}{' ...' if len(missing) > 6 else ''} "
                            f"({len(missing)} of {len(expected)}); fix: every layer needs w_q and w_k (zero rows "
                            f"for a layer without retrieval heads); {RECREATE}")
    extra = sorted(set(names) - set(expected))
    if extra:
        raise ArtifactError(f"{INDEXER_FILE}: unexpected tensors {extra[:6]}{' ...' if len(extra) > 6 else ''} "
                            f"(the model has {num_layers} layers); fix: {RECREATE} for this model")


def check_indexer_dtypes(tensors: Mapping[str, Any]) -> None:
    allowed = [str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES]
    for name, t in tensors.items():
        dtype = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        if dtype not in SUPPORTED_DTYPES:
            raise ArtifactError(f"{INDEXER_FILE}: {name} has dtype {dtype}, supported: {allowed}; "
                                f"fix: convert the weights (e.g. .to(torch.bfloat16)) before saving")


def check_indexer_shapes(tensors: Mapping[str, torch.Tensor], layout: HeadLayout, params: SparsityParams,
                         head_dim: int) -> None:
    """``layers.{i}.w_*`` is ``[len(retrieval_heads[i]), index_dim, head_dim]``."""
    for layer, heads in enumerate(layout.retrieval_heads):
        want = (len(heads), params.index_dim, head_dim)
        for which in ("w_q", "w_k"):
            name = indexer_tensor_name(layer, which)
            if tuple(tensors[name].shape) != want:
                raise ArtifactError(
                    f"{INDEXER_FILE}: {name} has shape {list(tensors[name].shape)}, expected {list(want)} "
                    f"= [retrieval heads of layer {layer}, index_dim, head_dim]; fix: the indexer and "
                    f"{CONFIG_FILE} must come from the same calibration; {RECREATE}")


def check_indexer_finite(tensors: Mapping[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise ArtifactError(f"{INDEXER_FILE}: {name} holds NaN or Inf values; fix: the indexer training "
                                f"diverged, re-run it (e.g. lower the learning rate); {RECREATE}")


def check_has_indexer(artifact_has_indexer: bool, directory: Path) -> None:
    """Used when the caller needs the indexer (``require_indexer=True``)."""
    if not artifact_has_indexer:
        raise ArtifactError(
            f"the RTPurbo artifact at {directory} has no indexer (has_indexer is false: a head-wise-only "
            f"artifact, e.g. imported from RTP-LLM); fix: train the indexer with `rtpurbo-calibrate`, or "
            f"load it with require_indexer=False where head-wise-only mode is supported")


# ---------------------------------------------------------------------------------------------
# Whole artifact, and artifact vs. served model
# ---------------------------------------------------------------------------------------------
def validate_artifact(artifact: RTPurboArtifact) -> None:
    """Every check that does not need the served model."""
    validate_config(artifact)
    validate_indexer(artifact)


def validate_config(artifact: RTPurboArtifact) -> None:
    """Everything but the indexer tensors."""
    config = artifact.to_config_dict()
    check_config_dict(config)
    check_fingerprint(artifact.model)
    check_params(artifact.params)
    check_layer_count(artifact.model, artifact.retrieval_heads)
    check_head_ids(artifact.model, artifact.retrieval_heads)
    check_json_serialisable(config)


def validate_indexer(artifact: RTPurboArtifact) -> None:
    """The indexer tensors (nothing to do without an indexer); run :func:`validate_config` first."""
    if artifact.indexer is None:
        return
    tensors = artifact.indexer_tensors()
    check_indexer_names(tensors.keys(), artifact.model.num_layers)
    check_indexer_dtypes(tensors)
    check_indexer_shapes(tensors, artifact.layout, artifact.params, artifact.model.head_dim)
    check_indexer_finite(tensors)


def check_matches_model(artifact_model: ModelFingerprint, served_model: ModelFingerprint) -> None:
    """The artifact was made for the served model: same architecture, layer and head counts, head_dim
    and RoPE."""
    diffs = []
    for f in dataclasses.fields(ModelFingerprint):
        mine, theirs = getattr(artifact_model, f.name), getattr(served_model, f.name)
        if mine != theirs:
            if f.name == "rope":
                mine, theirs = mine.to_dict(), theirs.to_dict()
            diffs.append(f"{f.name}: artifact {mine!r}, model {theirs!r}")
    if diffs:
        raise ArtifactError(f"the RTPurbo artifact was made for a different model ({'; '.join(diffs)}); "
                            f"fix: run `rtpurbo-calibrate` for this model, or point the backend at the "
                            f"artifact made for it")
