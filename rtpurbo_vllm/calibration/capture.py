"""The frozen model's pre-RoPE q/k and its real attention rows, read from a transformers model.

Forward hooks on each decoder layer's attention read the q/k the model hands to its rotary
embedding: the ``q_proj``/``k_proj`` outputs (Llama, Mistral, Qwen2) or the ``q_norm``/``k_norm``
outputs (Qwen3: after the per-head RMSNorm, before RoPE). Post-RoPE q/k are recomputed with
:func:`rtpurbo_vllm.rope.apply_rope`, which equals vLLM's RoPE, and the attention the model uses is
recomputed from them (full causal attention with the layer's own softmax scale), so no
``[HQ, T, T]`` matrix ever leaves the model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from rtpurbo_vllm.rope import RopeSpec, apply_rope

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")

# (layer, q_pre [T, HQ, D], k_pre [T, HKV, D]) -> None; tensors in the model dtype on its device.
LayerCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


class _StopForward(Exception):
    """Raised by a hook after the last requested layer, to skip the rest of the forward pass."""


@dataclass(frozen=True)
class LoadedModel:
    """A frozen causal LM ready for capture.

    Attributes:
        model: the transformers model, ``eval()`` and ``requires_grad_(False)``.
        tokenizer: its tokenizer.
        rope: the model's RoPE as vLLM builds it.
        scale: softmax scale of the attention (``self_attn.scaling``).
        num_layers, num_heads, num_kv_heads, head_dim: L, HQ, HKV, D.
    """

    model: torch.nn.Module
    tokenizer: object
    rope: RopeSpec
    scale: float
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def hf_config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def check_supported(hf_config) -> None:
    """Refuses configs that are not one of :data:`SUPPORTED_ARCHITECTURES` with full attention.

    Raises:
        ValueError: another architecture, or a model with sliding-window layers.
    """
    arch = (getattr(hf_config, "architectures", None) or [getattr(hf_config, "model_type", "?")])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"architecture {arch!r} is not supported by rtpurbo-calibrate; supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    sliding = "sliding_attention" in (getattr(hf_config, "layer_types", None) or ())
    if sliding or (hf_config.model_type == "mistral" and hf_config.sliding_window is not None):
        raise ValueError(f"{arch} uses sliding-window attention (sliding_window={hf_config.sliding_window}); "
                         "RTPurbo calibration needs full-attention layers; fix: use a checkpoint whose "
                         "config sets sliding_window to null (Mistral) or use_sliding_window to false")


def default_device(device: str | None) -> torch.device:
    """``device`` if given, else ``cuda`` when available, else ``cpu``."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_config(model_dir: str | os.PathLike):
    """The transformers config of the local model folder ``model_dir`` (nothing is downloaded: a
    Hub id must be downloaded first).

    Raises:
        ValueError: ``model_dir`` is not a folder holding a readable ``config.json``.
    """
    from transformers import AutoConfig

    path = Path(model_dir)
    fix = ("fix: pass the local folder of a transformers checkpoint (config.json, weights, tokenizer); models "
           "are never downloaded, so fetch a Hub model first, e.g. with "
           "huggingface_hub.snapshot_download('ORG/NAME', local_dir=DIR)")
    if not path.is_dir():
        raise ValueError(f"model folder {path} {'is not a folder' if path.exists() else 'does not exist'}; {fix}")
    if not (path / "config.json").is_file():
        raise ValueError(f"model folder {path} has no config.json; {fix}")
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the model config {path / 'config.json'} ({exc}); {fix}") from exc


def load_model(model_dir: str | os.PathLike, device: str | None = None) -> LoadedModel:
    """Loads a local model folder frozen, bf16 on CUDA and fp32 on the CPU.

    Raises:
        ValueError: not a local model folder (see :func:`load_config`), or the architecture is not
            supported (checked before loading weights).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_config = load_config(model_dir)
    check_supported(hf_config)
    dev = default_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa",
                                                 local_files_only=True)
    return wrap_model(model.to(dev), AutoTokenizer.from_pretrained(model_dir, local_files_only=True))


def resolve_model(model: str | os.PathLike | LoadedModel, device: str | None = None) -> LoadedModel:
    """``model`` itself when already loaded, else :func:`load_model` of the folder."""
    return model if isinstance(model, LoadedModel) else load_model(model, device)


def wrap_model(model: torch.nn.Module, tokenizer=None) -> LoadedModel:
    """Freezes an already-built transformers model (e.g. a random-weight test model) for capture.

    Raises:
        ValueError: the architecture is not supported.
    """
    cfg = model.config
    cfg.architectures = cfg.architectures or [type(model).__name__]
    check_supported(cfg)
    model.eval().requires_grad_(False)
    rope = RopeSpec.from_hf_config(cfg)
    attn = _layers(model)[0].self_attn
    return LoadedModel(model, tokenizer, rope, float(attn.scaling), cfg.num_hidden_layers,
                       cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads,
                       rope.head_size)


def _layers(model: torch.nn.Module) -> Sequence[torch.nn.Module]:
    return model.model.layers


def capture_pre_rope(lm: LoadedModel, input_ids: torch.Tensor, on_layer: LayerCallback,
                     layers: Sequence[int] | None = None) -> None:
    """Runs the model on one sequence and hands each layer's pre-RoPE q/k to ``on_layer``.

    Args:
        lm: the loaded model.
        input_ids: ``[T]`` int64 token ids (moved to the model's device).
        on_layer: called as ``on_layer(layer, q_pre, k_pre)`` with ``q_pre`` ``[T, HQ, D]`` and
            ``k_pre`` ``[T, HKV, D]`` in the model dtype, in layer order, during the forward pass.
        layers: the layers to report (default all); the pass stops after the last of them.
    """
    wanted = sorted(set(range(lm.num_layers) if layers is None else layers))
    if not wanted:
        return
    pending: dict[int, torch.Tensor] = {}
    handles = []

    def q_hook(layer):
        def hook(_module, _args, out):
            pending[layer] = out.reshape(-1, lm.num_heads, lm.head_dim)
        return hook

    def k_hook(layer):
        def hook(_module, _args, out):
            k_pre = out.reshape(-1, lm.num_kv_heads, lm.head_dim)
            on_layer(layer, pending.pop(layer), k_pre)
            if layer == wanted[-1]:
                raise _StopForward
        return hook

    for layer in wanted:
        attn = _layers(lm.model)[layer].self_attn
        q_mod, k_mod = (attn.q_norm, attn.k_norm) if hasattr(attn, "q_norm") else (attn.q_proj, attn.k_proj)
        handles += [q_mod.register_forward_hook(q_hook(layer)), k_mod.register_forward_hook(k_hook(layer))]
    try:
        with torch.no_grad():
            lm.model(input_ids=input_ids.to(lm.device)[None], use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class RetrievalCapture:
    """What the indexer loss and evaluation need from one sequence: per layer with retrieval heads,
    their pre-RoPE queries at the sampled positions (``q_pre[layer]`` ``[Q, HR, D]``) and the layer's
    pre-RoPE keys (``k_pre[layer]`` ``[T, HKV, D]``), in the model dtype on its device."""

    q_pre: dict[int, torch.Tensor] = field(default_factory=dict)
    k_pre: dict[int, torch.Tensor] = field(default_factory=dict)


def capture_retrieval(lm: LoadedModel, retrieval_heads: list[list[int]], ids: list[int],
                      query_pos: torch.Tensor) -> RetrievalCapture:
    """Runs the frozen model once on ``ids`` and keeps, for the query positions ``query_pos`` (``[Q]``
    int64) and the per-layer ``retrieval_heads``, the :class:`RetrievalCapture`."""
    captured = RetrievalCapture()
    layers = [layer for layer, heads in enumerate(retrieval_heads) if heads]

    def on_layer(layer: int, q_pre: torch.Tensor, k_pre: torch.Tensor) -> None:
        heads = torch.tensor(retrieval_heads[layer], device=q_pre.device)
        captured.q_pre[layer] = q_pre[query_pos.to(q_pre.device)][:, heads].clone()
        captured.k_pre[layer] = k_pre.clone()

    capture_pre_rope(lm, torch.tensor(ids), on_layer, layers)
    return captured


def attention_rows(q_pre: torch.Tensor, k_pre: torch.Tensor, query_pos: torch.Tensor, heads: torch.Tensor,
                   lm: LoadedModel) -> torch.Tensor:
    """The model's real (causal, post-RoPE, scaled, softmaxed) attention rows of some queries.

    Args:
        q_pre: ``[Q, HQ', D]`` pre-RoPE queries at positions ``query_pos`` of the query heads ``heads``.
        k_pre: ``[T, HKV, D]`` pre-RoPE keys of the whole sequence (positions ``0..T-1``).
        query_pos: ``[Q]`` int64 positions of the queries (``< T``).
        heads: ``[HQ']`` int64 query-head ids of the columns of ``q_pre``.
        lm: the model (RoPE, scale, GQA group size).

    Returns:
        ``[HQ', Q, T]`` float32; entries for keys after a query's position are 0.
    """
    positions = torch.arange(k_pre.shape[0], device=k_pre.device)
    k = apply_rope(k_pre.float(), positions, lm.rope)                                # [T, HKV, D]
    q = apply_rope(q_pre.float(), query_pos.to(q_pre.device), lm.rope)              # [Q, HQ', D]
    k = k[:, heads.to(k.device) // (lm.num_heads // lm.num_kv_heads)]                # [T, HQ', D]
    logits = torch.einsum("qhd,thd->hqt", q, k) * lm.scale                           # [HQ', Q, T]
    future = positions[None, :] > query_pos.to(positions.device)[:, None]            # [Q, T]
    return torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)
