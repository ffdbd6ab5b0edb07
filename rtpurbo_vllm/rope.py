"""Recover pre-RoPE q/k from the post-RoPE q/k that vLLM's attention backend receives.

The cos/sin math follows vLLM 0.26 (``vllm/model_executor/layers/rotary_embedding/``) operation
for operation, so :func:`rope_cos_sin` equals the rows of vLLM's fp32 ``cos_sin_cache``.
Supported: NeoX and GPT-J (interleaved) style, partial rotary (the last ``head_size - rotary_dim``
channels pass through) and the ``rope_type`` values ``default``, ``linear``, ``dynamic`` (with
``factor``), ``yarn`` and ``llama3``. Torch only; vLLM is not imported.

vLLM rounds its cos/sin table to the model dtype and rotates in that dtype; here everything is fp32.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

_REQUIRED = object()

# Per rope_type, the parameters vLLM's get_rope reads and the defaults its rotary classes use.
_SCALING_PARAMS: dict[str, dict[str, object]] = {
    "linear": {"factor": _REQUIRED},
    # "max_trained_positions" defaults to max_position, filled in by _normalize_scaling.
    "dynamic": {"factor": _REQUIRED, "max_trained_positions": _REQUIRED},
    "yarn": {
        "factor": _REQUIRED,
        "original_max_position_embeddings": _REQUIRED,
        "extrapolation_factor": 1,
        "attn_factor": 1,
        "beta_fast": 32,
        "beta_slow": 1,
        "apply_yarn_scaling": True,
        "truncate": True,
    },
    "llama3": {
        "factor": _REQUIRED,
        "low_freq_factor": _REQUIRED,
        "high_freq_factor": _REQUIRED,
        "original_max_position_embeddings": _REQUIRED,
    },
}
SUPPORTED_ROPE_TYPES = ("default", *_SCALING_PARAMS)


@dataclass(frozen=True)
class RopeSpec:
    """The rotary embedding of one model, as vLLM builds it with ``get_rope``.

    Attributes:
        head_size: channels per head (D).
        rotary_dim: rotated leading channels (even, ``<= head_size``).
        max_position: ``max_position_embeddings`` of the config.
        base: ``rope_theta``.
        is_neox_style: NeoX (rotate halves) if True, GPT-J (rotate even/odd pairs) if False.
        scaling: sorted ``(key, value)`` pairs with ``rope_type`` and every parameter vLLM uses for it
            (defaults filled in), or None for plain RoPE.
    """

    head_size: int
    rotary_dim: int
    max_position: int
    base: float
    is_neox_style: bool
    scaling: tuple[tuple[str, object], ...] | None

    @classmethod
    def from_hf_config(cls, hf_config) -> RopeSpec:
        """Reads a Llama / Mistral / Qwen2 / Qwen3 transformers config (v5 ``rope_parameters`` or
        the older ``rope_scaling``, ``rope_theta``, ``partial_rotary_factor``)."""
        for attr in ("dual_chunk_attention_config", "llama_4_scaling"):
            if getattr(hf_config, attr, None) is not None:
                raise ValueError(f"{attr} changes q/k beyond RoPE; not supported")
        params = dict(
            getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
        )
        if "mrope_section" in params:
            raise ValueError("multimodal RoPE (mrope_section) is not supported")
        base = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
        if base is None:
            raise ValueError("config has no rope_theta")
        # vLLM's Qwen2 ignores config.head_dim.
        head_dim = None if hf_config.model_type == "qwen2" else getattr(hf_config, "head_dim", None)
        head_size = head_dim or hf_config.hidden_size // hf_config.num_attention_heads
        partial = params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None))
        max_position = hf_config.max_position_embeddings
        rope_type = params.get("rope_type", params.get("type", "default"))  # "type": older configs
        return cls(
            head_size=head_size,
            rotary_dim=params.get("rope_dim") or int(head_size * (partial or 1.0)),
            max_position=max_position,
            base=float(base),
            is_neox_style=True,
            scaling=_normalize_scaling(rope_type, params, max_position),
        )

    def to_dict(self) -> dict:
        """JSON-able form; ``scaling`` becomes a dict (or None)."""
        return {
            "head_size": self.head_size,
            "rotary_dim": self.rotary_dim,
            "max_position": self.max_position,
            "base": self.base,
            "is_neox_style": self.is_neox_style,
            "scaling": None if self.scaling is None else dict(self.scaling),
        }

    @classmethod
    def from_dict(cls, d: dict) -> RopeSpec:
        """Inverse of :meth:`to_dict`."""
        scaling = None if d["scaling"] is None else tuple(sorted(d["scaling"].items()))
        return cls(**{**d, "scaling": scaling})


def _normalize_scaling(
    rope_type: str, params: dict, max_position: int
) -> tuple[tuple[str, object], ...] | None:
    if rope_type == "default":
        return None
    if rope_type not in _SCALING_PARAMS:
        supported = ", ".join(SUPPORTED_ROPE_TYPES)
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {supported}")
    defaults = dict(_SCALING_PARAMS[rope_type])
    if rope_type == "dynamic":
        defaults["max_trained_positions"] = max_position
    missing = [k for k, v in defaults.items() if v is _REQUIRED and k not in params]
    if missing:
        raise ValueError(f"rope_type {rope_type!r} needs {missing}")
    normalized = {"rope_type": rope_type, **{k: params.get(k, v) for k, v in defaults.items()}}
    return tuple(sorted(normalized.items()))


def _base_inv_freq(base: float, rotary_dim: int, device: torch.device) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float, device=device) / rotary_dim))


@functools.lru_cache(maxsize=64)
def _freq_table(spec: RopeSpec, device: torch.device) -> tuple[torch.Tensor, float, float]:
    """Returns (inv_freq [rotary_dim // 2] fp32, position divisor, mscale) for ``spec``."""
    p = dict(spec.scaling or {})
    rope_type, rd = p.get("rope_type", "default"), spec.rotary_dim
    if rope_type == "linear":
        return _base_inv_freq(spec.base, rd, device), p["factor"], 1.0
    if rope_type == "dynamic":
        ratio = p["factor"] * spec.max_position / p["max_trained_positions"] - (p["factor"] - 1)
        return _base_inv_freq(spec.base * ratio ** (rd / (rd - 2)), rd, device), 1.0, 1.0
    if rope_type == "llama3":
        inv_freq = _base_inv_freq(spec.base, rd, device)
        orig, low, high = p["original_max_position_embeddings"], p["low_freq_factor"], p["high_freq_factor"]
        wave_len = 2 * math.pi / inv_freq
        smooth = (orig / wave_len - low) / (high - low) if low != high else 0
        scaled = inv_freq / p["factor"]
        inv_freq = torch.where(
            wave_len < orig / high,
            inv_freq,
            torch.where(wave_len > orig / low, scaled, (1 - smooth) * scaled + smooth * inv_freq),
        )
        return inv_freq, 1.0, 1.0
    if rope_type == "yarn":
        factor, orig = p["factor"], p["original_max_position_embeddings"]
        pos_freqs = spec.base ** (torch.arange(0, rd, 2, dtype=torch.float, device=device) / rd)

        def correction_dim(num_rotations: float) -> float:
            return (rd * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(spec.base))

        low, high = correction_dim(p["beta_fast"]), correction_dim(p["beta_slow"])
        if p["truncate"]:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, rd - 1)
        if low == high:
            high += 0.001
        ramp = (torch.arange(rd // 2, dtype=torch.float, device=device) - low) / (high - low)
        ramp = torch.clamp(ramp, 0, 1)
        mask = (1 - ramp) * p["extrapolation_factor"]
        inv_freq = (1.0 / (factor * pos_freqs)) * (1 - mask) + (1.0 / pos_freqs) * mask
        mscale = (0.1 * math.log(factor) + 1.0) if factor > 1 else 1.0
        mscale = mscale * p["attn_factor"] if p["apply_yarn_scaling"] else p["attn_factor"]
        return inv_freq, 1.0, float(mscale)
    return _base_inv_freq(spec.base, rd, device), 1.0, 1.0


def rope_cos_sin(spec: RopeSpec, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each [T, rotary_dim // 2] fp32, for integer ``positions`` [T]; YaRN's mscale is
    folded in as vLLM does, so ``cos**2 + sin**2 == mscale**2``."""
    inv_freq, divisor, mscale = _freq_table(spec, positions.device)
    freqs = (positions.to(torch.float) / divisor)[:, None] * inv_freq[None, :]
    return freqs.cos() * mscale, freqs.sin() * mscale


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """Multiplies each rotary pair of ``x`` [T, H, D] by [[cos, -sin], [sin, cos]] ([T, rotary_dim // 2]
    each); fp32 in and out."""
    rd = spec.rotary_dim
    cos, sin = cos[:, None, :], sin[:, None, :]
    rot, tail = x[..., :rd], x[..., rd:]
    if spec.is_neox_style:
        x1, x2 = rot[..., : rd // 2], rot[..., rd // 2 :]
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    o1, o2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    if spec.is_neox_style:
        rot = torch.cat((o1, o2), dim=-1)
    else:
        rot = torch.stack((o1, o2), dim=-1).flatten(-2)
    return torch.cat((rot, tail), dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """Rotates ``x`` [T, H, D] (any float dtype) at ``positions`` [T] like vLLM's rotary embedding;
    computed in fp32, returned in ``x.dtype``."""
    cos, sin = rope_cos_sin(spec, positions)
    return _rotate(x.float(), cos, sin, spec).to(x.dtype)


def invert_rope(x: torch.Tensor, positions: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """Pre-RoPE ``x`` [T, H, D] from post-RoPE ``x`` at ``positions`` [T]: the exact inverse of the
    2x2 map that apply_rope uses (transpose / (cos**2 + sin**2)), so YaRN's mscale is divided out.
    Computed in fp32, returned in ``x.dtype``."""
    cos, sin = rope_cos_sin(spec, positions)
    norm = cos * cos + sin * sin
    return _rotate(x.float(), cos / norm, -sin / norm, spec).to(x.dtype)
