"""A tiny Llama model trained from scratch on synthetic long-context key-value retrieval.

It is the test subject of the head finding, indexer training and serving tests: 4 layers x 8 query
heads (2 KV heads, head_dim 64), a 366-token vocabulary, trained by :mod:`rtpurbo_vllm.tiny.train`
on the task of :mod:`rtpurbo_vllm.tiny.task`. The trained folder is committed next to this file
(``model/``, with its RTPurbo artifact in ``model/rtpurbo/`` and a second one calibrated with a KV
budget of one retrieval KV head per layer in ``model/rtpurbo-kv1/``, for the split KV layout);
``python -m rtpurbo_vllm.tiny.train --out rtpurbo_vllm/tiny/model`` reproduces the weights (about 15
minutes on 2 CPU cores), and ``docs/CALIBRATION.md`` the artifacts.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path


def tiny_model_dir() -> Path:
    """The committed Hugging Face folder of the trained model (config, weights, tokenizer)."""
    return Path(__file__).resolve().parent / "model"


def tiny_kv1_artifact_dir() -> Path:
    """The tiny model's artifact made with ``rtpurbo-calibrate heads --kv-heads-per-layer 1``: retrieval
    heads L1:[4, 5, 6, 7] (one KV group), so the split KV layout keeps one KV head per layer whole and
    the other as sinks + window."""
    return tiny_model_dir() / "rtpurbo-kv1"


@lru_cache(maxsize=None)
def load_tiny_model(dtype: str = "float32"):
    """``(model, tokenizer)`` from :func:`tiny_model_dir`, loaded once per ``dtype`` and cached.

    The model is a ``LlamaForCausalLM`` in eval mode on the CPU with SDPA attention; callers share
    it and must not modify it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(tiny_model_dir())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                                 attn_implementation="sdpa")
    return model.eval(), AutoTokenizer.from_pretrained(path)
