"""Import of RTP-LLM's ``headwise_config`` (RTPurbo V1: retrieval/local head split, no indexer).

RTP-LLM reads it from the model's ``config.json``::

    "headwise_config": {
        "sink_token_num": 4,          # default 4
        "swa_token_num": 8192,        # default 8192
        "seqlen_threshold": 16384,    # head-wise attention only when kv_len >= this; default 16384
        "0": [0, 1, 0, ...],          # per layer (string key): one 0/1 flag per query head of the
        "1": [...],                   # whole layer (global, before tensor parallelism); 1 = retrieval
    }

A layer missing from the dict has all its heads retrieval (a warning is logged), as in RTP-LLM.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

from rtpurbo_vllm import __version__
from rtpurbo_vllm.artifacts.io import read_json
from rtpurbo_vllm.artifacts.schema import (
    ArtifactError,
    ModelFingerprint,
    Provenance,
    RTPurboArtifact,
    SparsityParams,
)
from rtpurbo_vllm.artifacts.validate import check_fingerprint, param_problem, validate_artifact
from rtpurbo_vllm.head_layout import HeadLayout

logger = logging.getLogger(__name__)

HEADWISE_KEY = "headwise_config"
# RTP-LLM's settings and their defaults (HeadWiseRuntimeConfig in its cuda_headwise_impl/headwise.py).
RTP_LLM_DEFAULTS = {"sink_token_num": 4, "swa_token_num": 8192, "seqlen_threshold": 16384}
# RTP-LLM setting -> (the SparsityParams field it becomes, what is added to it).
RTP_LLM_PARAMS = {"sink_token_num": ("sink_tokens", 0), "swa_token_num": ("window", 1),
                  "seqlen_threshold": ("dense_threshold", 0)}
# ModelFingerprint field -> its name in a transformers config.json.
HF_CONFIG_NAMES = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                   "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim"}


def import_rtp_llm_headwise(config_json_path_or_dict: str | os.PathLike | Mapping[str, Any],
                            hf_config: Any = None) -> RTPurboArtifact:
    """Turns an RTP-LLM ``headwise_config`` into a head-wise-only artifact (``has_indexer`` false).

    Args:
        config_json_path_or_dict: the model's ``config.json`` (a path, the model folder, or the parsed
            dict) holding the ``headwise_config`` key.
        hf_config: the model's transformers config; by default built from the same ``config.json``.

    Mapping: ``sink_token_num`` -> ``sink_tokens``; ``seqlen_threshold`` -> ``dense_threshold``;
    ``swa_token_num`` -> ``window = swa_token_num + 1``, because RTP-LLM's window (FlashInfer's
    ``window_left``) counts the keys *before* the query, while ``window`` includes the query itself.
    ``top_p``, ``block_size`` and ``index_dim`` keep their defaults (they need an indexer).

    Raises:
        ArtifactError: no ``headwise_config``; a setting that is not an integer or that maps to a
            value the kernels cannot run; a layer key that is not a string; a layer list whose length
            is not the model's query-head count or holding values other than 0/1; a layer key beyond
            the model's layers; or a model config that cannot be read or has impossible head counts.
            Each message names the input and its field.
    """
    if isinstance(config_json_path_or_dict, Mapping):
        config, source = dict(config_json_path_or_dict), "the given config dict"
    else:
        path = Path(config_json_path_or_dict)
        path = path / "config.json" if path.is_dir() else path
        config = read_json(path, "the model config", "pass the config.json of an RTP-LLM RTPurbo model")
        source = str(path)
    headwise = config.get(HEADWISE_KEY) if isinstance(config, dict) else None
    if not isinstance(headwise, Mapping):
        raise ArtifactError(f"{source} has no {HEADWISE_KEY!r} object; fix: pass the config.json of an RTP-LLM "
                            f"RTPurbo model (e.g. RTP-LLM/Qwen3-Coder-30B-A3B-Instruct-RTPurbo)")
    model = ModelFingerprint.from_hf_config(hf_config if hf_config is not None else _hf_config(config, source))
    check_fingerprint(model, where=source, names=HF_CONFIG_NAMES)
    settings = {key: _int_setting(headwise, key, default, source) for key, default in RTP_LLM_DEFAULTS.items()}
    retrieval_heads, missing = _retrieval_heads(headwise, model, source)
    params = {field: settings[key] + offset for key, (field, offset) in RTP_LLM_PARAMS.items()}
    artifact = RTPurboArtifact(
        model=model,
        retrieval_heads=retrieval_heads,
        params=SparsityParams(**params),
        provenance=Provenance(data=source, tool="rtpurbo_vllm.artifacts.import_rtp_llm_headwise",
                              tool_version=__version__,
                              extra={"source_format": f"rtp-llm {HEADWISE_KEY}", **settings,
                                     "layers_missing_in_source": missing}),
    )
    validate_artifact(artifact)
    return artifact


def _hf_config(config: Mapping[str, Any], source: str):
    from transformers import AutoConfig

    fields = {k: v for k, v in config.items() if k != HEADWISE_KEY}
    try:
        return AutoConfig.for_model(fields.pop("model_type", None), **fields)
    except Exception as exc:   # transformers' config classes validate with many exception types
        raise ArtifactError(f"cannot build a transformers config from {source} ({exc}); fix: pass "
                            f"hf_config=AutoConfig.from_pretrained(<model_dir>)") from exc


def _int_setting(headwise: Mapping[str, Any], key: str, default: int, source: str) -> int:
    value = headwise.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ArtifactError(f"{source}: {HEADWISE_KEY}.{key} is {value!r}, expected an integer; "
                            f"fix: set it to an integer (RTP-LLM's default is {default})")
    field, offset = RTP_LLM_PARAMS[key]
    rule = param_problem(field, value + offset)
    if rule is not None:
        mapped = f"{key} + {offset}" if offset else key
        raise ArtifactError(f"{source}: {HEADWISE_KEY}.{key} is {value!r}, but {field} = {mapped} {rule}; "
                            f"fix: set a valid {key} (RTP-LLM's default is {default})")
    return value


def _retrieval_heads(headwise: Mapping[str, Any], model: ModelFingerprint,
                     source: str) -> tuple[tuple[tuple[int, ...], ...], list[int]]:
    """Per layer the retrieval head ids, and the layers missing from ``headwise``."""
    layer_keys = [str(i) for i in range(model.num_layers)]
    not_str = [k for k in headwise if not isinstance(k, str)]
    if not_str:
        raise ArtifactError(f"{source}: {HEADWISE_KEY} has keys {not_str} that are not strings; fix: name layers "
                            f"by strings ('0', '1', ...), as config.json does")
    others = [k for k in headwise if k not in RTP_LLM_DEFAULTS and k not in layer_keys]
    beyond = [k for k in others if k.lstrip("-").isdigit()]
    if beyond:
        raise ArtifactError(f"{source}: {HEADWISE_KEY} has layers {beyond} but the model has {model.num_layers} "
                            f"layers (0..{model.num_layers - 1}); fix: use the headwise_config made for this model")
    if others:
        logger.warning("%s: ignoring unknown %s keys %s", source, HEADWISE_KEY, others)
    missing = [i for i, key in enumerate(layer_keys) if key not in headwise]
    if missing:
        logger.warning("%s: %s has no entry for layers %s; all their query heads become retrieval heads "
                       "(as in RTP-LLM)", source, HEADWISE_KEY, missing)
    masks = []
    for layer, key in enumerate(layer_keys):
        flags = headwise.get(key, [1] * model.num_heads)
        where = f"{source}: {HEADWISE_KEY}[{key!r}]"
        if not isinstance(flags, list) or any(f not in (0, 1) for f in flags):
            raise ArtifactError(f"{where} must be a list of 0/1 flags (1 = retrieval), got {flags!r}; "
                                f"fix: one 0 or 1 per query head")
        if len(flags) != model.num_heads:
            tp = (f"; {len(flags)} looks like one rank's slice of a {model.num_heads // len(flags)}-way "
                  f"tensor-parallel split" if flags and model.num_heads % len(flags) == 0 else "")
            raise ArtifactError(f"{where} has {len(flags)} flags but the model has {model.num_heads} query heads "
                                f"per layer{tp}; fix: RTP-LLM lists cover ALL query heads of a layer (global, "
                                f"before tensor parallelism), give one flag per query head")
        masks.append(flags)
    return HeadLayout.from_masks(masks, model.num_kv_heads).retrieval_heads, missing
