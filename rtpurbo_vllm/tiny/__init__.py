"""A tiny Llama model trained from scratch on synthetic long-context key-value retrieval.

It is the test subject of the head finding, indexer training and serving tests: 4 layers x 8 query
heads (2 KV heads, head_dim 64), a 366-token vocabulary, trained by :mod:`rtpurbo_vllm.tiny.train`
on the task of :mod:`rtpurbo_vllm.tiny.task`. The trained folder is committed next to this file
(``model/``, with its RTPurbo artifact in ``model/rtpurbo/`` and a second one calibrated with a KV
budget of one retrieval KV head per layer in ``model/rtpurbo-kv1/``, for the split KV layout);
``python -m rtpurbo_vllm.tiny.train --out rtpurbo_vllm/tiny/model`` reproduces the weights (about 15
minutes on 2 CPU cores), and ``docs/CALIBRATION.md`` the artifacts.

The *long model* (``long_model/``, :func:`tiny_long_model_dir`) is where prefill sparsity means
something: the same architecture with RoPE base 1e7 and ``max_position_embeddings`` 32768, the tiny
model's weights fine-tuned over the curriculum stages of 256 to 8192 tokens (seed 0, about 8
minutes on 2 CPU cores)::

    python -m rtpurbo_vllm.tiny.train --out rtpurbo_vllm/tiny/long_model --init-from rtpurbo_vllm/tiny/model \
        --first-len 256 --final-len 8192 --steps 500 --lr 1e-3 --rope-theta 1e7 --max-position 32768 \
        --seed 0 --eval-prompts 16 --eval-lens 8192

Dense exact match with the queried pair at least half the context back (``python -m
rtpurbo_vllm.tiny.exact_match --dense``): 1.00 at 8192 tokens and 1.00 at 16384 (20 prompts each;
the tiny model: 0.0 at 4096). Its artifact (``long_model/rtpurbo``: 5 retrieval heads, local heads
on 4 sinks + a 2048-token window, 1/8 of 16K) and RTPurbo's accuracy on it are in
``docs/CALIBRATION.md``. The fast CPU tests use the tiny model.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path


def tiny_model_dir() -> Path:
    """The committed Hugging Face folder of the trained model (config, weights, tokenizer)."""
    return Path(__file__).resolve().parent / "model"


def tiny_long_model_dir() -> Path:
    """The committed folder of the long-context model (``long_model/``, artifact in ``long_model/rtpurbo``)."""
    return Path(__file__).resolve().parent / "long_model"


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
