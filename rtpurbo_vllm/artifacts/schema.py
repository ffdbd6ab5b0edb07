"""The in-memory form of an RTPurbo artifact and its mapping to ``rtpurbo_config.json`` and the
tensor names of ``indexer.safetensors``.

Nothing here validates values; :mod:`rtpurbo_vllm.artifacts.validate` does, and
:mod:`rtpurbo_vllm.artifacts.io` calls it on every save and load. See ``docs/ARTIFACTS.md``.
"""

from __future__ import annotations

import datetime
import functools
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

import torch

from rtpurbo_vllm import __version__
from rtpurbo_vllm.head_layout import HeadLayout
from rtpurbo_vllm.rope import RopeSpec

FORMAT_VERSION = 1
CONFIG_FILE = "rtpurbo_config.json"
INDEXER_FILE = "indexer.safetensors"
DEFAULT_DIRNAME = "rtpurbo"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# A pair of indexer projections of one layer: (w_q, w_k), each [HR, index_dim, head_dim].
IndexerLayer = tuple[torch.Tensor, torch.Tensor]


class ArtifactError(ValueError):
    """An RTPurbo artifact cannot be written, read or used; the message names the problem and the fix."""


@dataclass(frozen=True)
class ModelFingerprint:
    """The model an artifact was made for; loading checks it against the served model's config.

    Attributes:
        architecture: ``hf_config.architectures[0]`` (``model_type`` when the config lists none).
        num_layers: decoder layers (L).
        num_heads: query heads per layer, before tensor parallelism (HQ).
        num_kv_heads: KV heads per layer, before tensor parallelism (HKV).
        head_dim: channels per head (D), as vLLM sizes its attention (``RopeSpec.head_size``).
        rope: the rotary embedding; the indexer reads pre-RoPE q/k, so a different RoPE is a
            different model for it.
    """

    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: RopeSpec

    @classmethod
    def from_hf_config(cls, hf_config) -> ModelFingerprint:
        """Reads a transformers config (multimodal configs: its text config).

        Raises:
            ArtifactError: the config lacks the attention sizes or has a RoPE rtpurbo-vllm cannot invert.
        """
        text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        try:
            rope = RopeSpec.from_hf_config(text)
            num_heads = int(text.num_attention_heads)
            num_layers = int(text.num_hidden_layers)
        except (AttributeError, ValueError, TypeError, ArithmeticError) as exc:
            raise ArtifactError(
                f"cannot fingerprint the model from its config ({type(hf_config).__name__}): {exc}; "
                "fix: RTPurbo supports decoder-only models with standard RoPE (see rtpurbo_vllm.rope)"
            ) from exc
        num_kv_heads = getattr(text, "num_key_value_heads", None) or num_heads
        architecture = (getattr(hf_config, "architectures", None) or [hf_config.model_type])[0]
        return cls(architecture, num_layers, num_heads, int(num_kv_heads), rope.head_size, rope)

    def to_dict(self) -> dict[str, Any]:
        return {**_shallow_dict(self), "rope": self.rope.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelFingerprint:
        """Inverse of :meth:`to_dict`; ``d`` must already have passed the key and type checks.

        Raises:
            ArtifactError: ``d["rope"]`` is not a valid :meth:`RopeSpec.to_dict` dict.
        """
        try:
            rope = RopeSpec.from_dict(dict(d["rope"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ArtifactError(
                f"model.rope in {CONFIG_FILE} is not a valid RoPE description ({exc!r}); "
                "fix: re-create the artifact with this version of rtpurbo-vllm"
            ) from exc
        return cls(**{**d, "rope": rope})


@dataclass(frozen=True)
class SparsityParams:
    """How the backend runs the heads (token counts are per sequence).

    Attributes:
        sink_tokens: leading tokens every local head always sees (0 = none).
        window: a local head sees the last ``window`` tokens, the current one included.
        top_p: a retrieval head keeps, at each decode step, the fewest selection blocks whose
            indexer-softmax mass reaches ``top_p``; in (0, 1].
        prefill_top_p: a retrieval head's prefill keeps, per query tile, the sink blocks, the tile's
            diagonal blocks and the fewest other blocks whose softmax mass, over the keys' index scores
            (each the max over the tile's rows), reaches ``prefill_top_p``
            (``rtpurbo_vllm.triton_kernels.sparse_prefill``); in (0, 1]. 1.0 keeps every block: the dense
            causal retrieval prefill, the exact fallback.
            The default stays 1.0: on the test models 0.9 loses no answers, but it keeps about 40 % of the
            attention mass there (``docs/CALIBRATION.md``), which a real model's answers may not survive.
        block_size: tokens per selection block of the top-p decode and prefill.
        index_dim: rows of each indexer projection (r).
        dense_threshold: sequences shorter than this run every head dense; 0 = always sparse.
    """

    sink_tokens: int = 4
    window: int = 8192
    top_p: float = 0.9
    prefill_top_p: float = 1.0
    block_size: int = 64
    index_dim: int = 16
    dense_threshold: int = 16384

    def to_dict(self) -> dict[str, Any]:
        return _shallow_dict(self)


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Provenance:
    """How the artifact was made (informational; never checked against anything).

    Attributes:
        data: the calibration data (a dataset name, path or description).
        steps: optimiser steps of the indexer training (None: no training, e.g. an import).
        seed: random seed of the calibration (None: not seeded / not applicable).
        date: ISO-8601 creation time (UTC by default).
        tool: what made the artifact.
        tool_version: its version.
        extra: free-form JSON-serialisable details (learning rate, head scores, source file, ...).
    """

    data: str = ""
    steps: int | None = None
    seed: int | None = None
    date: str = field(default_factory=_utc_now)
    tool: str = "rtpurbo-vllm"
    tool_version: str = __version__
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**_shallow_dict(self), "extra": dict(self.extra)}


def _shallow_dict(obj) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def indexer_tensor_name(layer: int, which: str) -> str:
    """``layers.{layer}.w_q`` or ``layers.{layer}.w_k`` (``which`` is ``"w_q"`` or ``"w_k"``)."""
    return f"layers.{layer}.{which}"


@dataclass(frozen=True, eq=False)
class RTPurboArtifact:
    """Everything the RTPurbo backend needs for one model.

    Attributes:
        model: the model the artifact was made for.
        retrieval_heads: per layer, the sorted global ids of the retrieval query heads (lists are
            turned into tuples).
        params: the sparsity settings.
        provenance: how it was made.
        indexer: per layer ``(w_q, w_k)``, each ``[HR_l, index_dim, head_dim]`` float32, bfloat16 or
            float16 on the CPU, where ``HR_l = len(retrieval_heads[l])`` (0 rows for a layer without
            retrieval heads) and row ``j`` belongs to query head ``retrieval_heads[l][j]``. The index
            score of head h is ``(w_q[j] @ q_pre) . (w_k[j] @ k_pre)`` on pre-RoPE q/k. None for a
            head-wise-only artifact (``has_indexer`` false).
    """

    model: ModelFingerprint
    retrieval_heads: tuple[tuple[int, ...], ...]
    params: SparsityParams = field(default_factory=SparsityParams)
    provenance: Provenance = field(default_factory=Provenance)
    indexer: tuple[IndexerLayer, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "retrieval_heads", tuple(tuple(layer) for layer in self.retrieval_heads))
        if self.indexer is not None:
            object.__setattr__(self, "indexer", tuple((w_q, w_k) for w_q, w_k in self.indexer))

    @property
    def has_indexer(self) -> bool:
        return self.indexer is not None

    @functools.cached_property
    def layout(self) -> HeadLayout:
        """The retrieval heads as a :class:`~rtpurbo_vllm.head_layout.HeadLayout` (global head ids)."""
        return HeadLayout(self.model.num_heads, self.model.num_kv_heads, self.retrieval_heads)

    def to_config_dict(self) -> dict[str, Any]:
        """The content of ``rtpurbo_config.json``."""
        return {
            "format_version": FORMAT_VERSION,
            "model": self.model.to_dict(),
            "retrieval_heads": [list(layer) for layer in self.retrieval_heads],
            "params": self.params.to_dict(),
            "has_indexer": self.has_indexer,
            "provenance": self.provenance.to_dict(),
        }

    @classmethod
    def from_config_dict(cls, config: Mapping[str, Any]) -> RTPurboArtifact:
        """Builds an artifact, without its indexer, from an ``rtpurbo_config.json`` dict that passed
        :func:`~rtpurbo_vllm.artifacts.validate.check_config_dict`."""
        return cls(
            model=ModelFingerprint.from_dict(config["model"]),
            retrieval_heads=config["retrieval_heads"],
            params=SparsityParams(**config["params"]),
            provenance=Provenance(**config["provenance"]),
        )

    def with_indexer_tensors(self, tensors: Mapping[str, torch.Tensor]) -> RTPurboArtifact:
        """A copy holding the indexer from ``tensors`` (inverse of :meth:`indexer_tensors`; every
        ``layers.{i}.w_q`` / ``layers.{i}.w_k`` must be present)."""
        return replace(self, indexer=tuple(
            (tensors[indexer_tensor_name(i, "w_q")], tensors[indexer_tensor_name(i, "w_k")])
            for i in range(len(self.retrieval_heads))))

    def indexer_tensors(self) -> dict[str, torch.Tensor]:
        """The content of ``indexer.safetensors``: ``layers.{i}.w_q`` / ``layers.{i}.w_k`` for every layer
        (empty when there is no indexer)."""
        tensors = {}
        for layer, (w_q, w_k) in enumerate(self.indexer or ()):
            tensors[indexer_tensor_name(layer, "w_q")] = w_q
            tensors[indexer_tensor_name(layer, "w_k")] = w_k
        return tensors

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RTPurboArtifact):
            return NotImplemented
        mine, theirs = self.indexer_tensors(), other.indexer_tensors()
        return (self.to_config_dict() == other.to_config_dict() and mine.keys() == theirs.keys()
                and all(mine[k].dtype == theirs[k].dtype and torch.equal(mine[k], theirs[k]) for k in mine))

    __hash__ = None  # holds tensors and a dict
