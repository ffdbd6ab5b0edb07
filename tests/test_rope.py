"""rtpurbo_vllm.rope against vLLM 0.26's own rotary embeddings, built from real transformers configs."""

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config
from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.transformers_utils.config import patch_rope_parameters, set_default_rope_theta

from rtpurbo_vllm.rope import RopeSpec, apply_rope, invert_rope, rope_cos_sin

CHUNK_START, CHUNK_LEN, NUM_SCATTERED = 1000, 37, 10  # T = 47 tokens
NUM_HEADS, NUM_KV_HEADS = 5, 2


def _rope(rope_type="default", rope_theta=1e4, **params):
    """A transformers-v5 ``rope_parameters`` dict."""
    return {"rope_type": rope_type, "rope_theta": rope_theta, **params}


def _case(case_id, make_config, is_neox_style=True):
    return pytest.param(make_config, is_neox_style, id=case_id)


LLAMA3_1 = _rope(  # Llama-3.1
    "llama3",
    5e5,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)
QWEN_YARN = _rope("yarn", 1e6, factor=4.0, original_max_position_embeddings=32768)
QWEN2_0_5B = dict(hidden_size=896, num_attention_heads=14, num_key_value_heads=2)  # head_dim 64

# Each factory returns a fresh config, as vLLM's loader would read it from config.json.
CASES = [
    _case("llama-default", lambda: LlamaConfig(rope_parameters=_rope(rope_theta=5e5))),
    _case("llama-gptj", lambda: LlamaConfig(rope_parameters=_rope()), is_neox_style=False),
    _case(
        "llama-partial-0.5",
        lambda: LlamaConfig(head_dim=96, rope_parameters=_rope(partial_rotary_factor=0.5)),
    ),
    _case(
        "llama-partial-0.4-gptj",
        lambda: LlamaConfig(head_dim=80, rope_parameters=_rope(partial_rotary_factor=0.4)),
        is_neox_style=False,
    ),
    _case("llama-linear", lambda: LlamaConfig(rope_parameters=_rope("linear", factor=4.0))),
    _case("llama-dynamic", lambda: LlamaConfig(rope_parameters=_rope("dynamic", factor=2.0))),
    _case(
        "llama-dynamic-trained-1024",
        lambda: LlamaConfig(rope_parameters=_rope("dynamic", factor=2.0, max_trained_positions=1024)),
    ),
    _case("llama-llama3", lambda: LlamaConfig(max_position_embeddings=131072, rope_parameters={**LLAMA3_1})),
    _case("qwen2-default", lambda: Qwen2Config(**QWEN2_0_5B, max_position_embeddings=32768)),
    _case(
        "qwen2-yarn",
        lambda: Qwen2Config(**QWEN2_0_5B, max_position_embeddings=131072, rope_parameters={**QWEN_YARN}),
    ),
    _case(
        "qwen3-default",
        lambda: Qwen3Config(max_position_embeddings=40960, rope_parameters=_rope(rope_theta=1e6)),
    ),
    _case("qwen3-yarn", lambda: Qwen3Config(max_position_embeddings=131072, rope_parameters={**QWEN_YARN})),
    _case(
        "qwen3-yarn-partial-attn_factor-notruncate",
        lambda: Qwen3Config(
            max_position_embeddings=65536,
            rope_parameters={
                **QWEN_YARN,
                "factor": 2.0,
                "partial_rotary_factor": 0.75,
                "attn_factor": 0.9,
                "beta_fast": 16,
                "truncate": False,
            },
        ),
    ),
    _case("qwen3-llama3", lambda: Qwen3Config(max_position_embeddings=131072, rope_parameters={**LLAMA3_1})),
    _case("mistral-default", lambda: MistralConfig(rope_parameters=_rope(rope_theta=1e6))),
    _case(
        "mistral-yarn",
        lambda: MistralConfig(
            max_position_embeddings=131072,
            rope_parameters=_rope("yarn", 1e6, factor=16.0, original_max_position_embeddings=8192),
        ),
    ),
]


@pytest.fixture(scope="module", autouse=True)
def vllm_config():
    """vLLM's CustomOps (the rotary embeddings) can only be built inside a current vLLM config."""
    with set_current_vllm_config(VllmConfig(device_config=DeviceConfig("cpu"))):
        yield


def _build(make_config, is_neox_style, dtype=torch.float32):
    """(RopeSpec, vLLM rotary embedding) for one case; the vLLM side mirrors vLLM's config loading
    (patch_rope_parameters) and the get_rope call in llama.py / mistral.py / qwen2.py / qwen3.py."""
    config = make_config()
    patch_rope_parameters(config)
    if config.model_type in ("qwen2", "qwen3"):
        set_default_rope_theta(config, default_theta=1000000)
    if config.model_type == "qwen2":
        head_dim = config.hidden_size // config.num_attention_heads
    else:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = get_rope(
        head_dim,
        max_position=config.max_position_embeddings,
        is_neox_style=is_neox_style,
        rope_parameters=config.rope_parameters,
        dtype=dtype,
    )
    spec = dataclasses.replace(RopeSpec.from_hf_config(config), is_neox_style=is_neox_style)
    return spec, rope


def _positions(rope):
    """[T] int64: a prefill chunk starting at CHUNK_START, then scattered decode positions (any order)."""
    scattered = torch.randint(0, rope.cos_sin_cache.shape[0], (NUM_SCATTERED,))
    return torch.cat([torch.arange(CHUNK_START, CHUNK_START + CHUNK_LEN), scattered])


def _qk(spec, num_tokens, dtype):
    """Random q [T, NUM_HEADS, D] and k [T, NUM_KV_HEADS, D]."""
    q = torch.randn(num_tokens, NUM_HEADS, spec.head_size, dtype=dtype)
    k = torch.randn(num_tokens, NUM_KV_HEADS, spec.head_size, dtype=dtype)
    return q, k


@pytest.mark.parametrize("make_config, is_neox_style", CASES)
def test_spec_matches_vllm_rope(make_config, is_neox_style):
    spec, rope = _build(make_config, is_neox_style)
    assert (spec.head_size, spec.rotary_dim, spec.base, spec.is_neox_style) == (
        rope.head_size,
        rope.rotary_dim,
        rope.base,
        rope.is_neox_style,
    )
    assert RopeSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.parametrize("make_config, is_neox_style", CASES)
def test_cos_sin_equal_vllm_cache(make_config, is_neox_style, seed):
    spec, rope = _build(make_config, is_neox_style)
    positions = _positions(rope)
    cos, sin = rope_cos_sin(spec, positions)
    ref_cos, ref_sin = rope.cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
    assert cos.dtype == sin.dtype == torch.float32
    assert cos.shape == (len(positions), spec.rotary_dim // 2)
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=0)
    torch.testing.assert_close(sin, ref_sin, rtol=0, atol=0)


@pytest.mark.parametrize("make_config, is_neox_style", CASES)
def test_apply_matches_vllm_fp32(make_config, is_neox_style, seed):
    spec, rope = _build(make_config, is_neox_style)
    positions = _positions(rope)
    q, k = _qk(spec, len(positions), torch.float32)
    ref_q, ref_k = rope.forward_native(positions, q.clone(), k.clone())
    torch.testing.assert_close(apply_rope(q, positions, spec), ref_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(apply_rope(k, positions, spec), ref_k, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("make_config, is_neox_style", CASES)
def test_apply_matches_vllm_bf16(make_config, is_neox_style, seed):
    """vLLM rounds cos/sin to bf16 and rotates in bf16; apply_rope computes in fp32, so the two differ
    by a few bf16 ulps."""
    spec, rope = _build(make_config, is_neox_style, dtype=torch.bfloat16)
    positions = _positions(rope)
    q, _ = _qk(spec, len(positions), torch.bfloat16)
    ref_q, _ = rope.forward_native(positions, q.clone(), None)
    out = apply_rope(q, positions, spec)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref_q, rtol=1.6e-2, atol=3e-2)


@pytest.mark.parametrize(
    "dtype, tol",
    [pytest.param(torch.float32, 1e-5, id="fp32"), pytest.param(torch.bfloat16, 3e-2, id="bf16")],
)
@pytest.mark.parametrize("make_config, is_neox_style", CASES)
def test_invert_undoes_vllm(make_config, is_neox_style, dtype, tol, seed):
    spec, rope = _build(make_config, is_neox_style, dtype=dtype)
    positions = _positions(rope)
    q, k = _qk(spec, len(positions), dtype)
    rot_q, rot_k = rope.forward_native(positions, q.clone(), k.clone())
    pre_q, pre_k = invert_rope(rot_q, positions, spec), invert_rope(rot_k, positions, spec)
    assert pre_q.dtype == pre_k.dtype == dtype
    torch.testing.assert_close(pre_q, q, rtol=tol, atol=tol)
    torch.testing.assert_close(pre_k, k, rtol=tol, atol=tol)


def test_legacy_config_fields():
    """Pre-v5 transformers configs: rope_theta, rope_scaling with "type", partial_rotary_factor."""
    legacy = SimpleNamespace(
        model_type="llama",
        hidden_size=4096,
        num_attention_heads=32,
        head_dim=None,
        max_position_embeddings=32768,
        rope_theta=1e6,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192},
        partial_rotary_factor=0.5,
    )
    spec = RopeSpec.from_hf_config(legacy)
    assert (spec.head_size, spec.rotary_dim, spec.base) == (128, 64, 1e6)
    assert dict(spec.scaling) == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 8192,
        "extrapolation_factor": 1,
        "attn_factor": 1,
        "beta_fast": 32,
        "beta_slow": 1,
        "apply_yarn_scaling": True,
        "truncate": True,
    }


def test_plain_rope_has_no_scaling():
    config = Qwen3Config(head_dim=64, max_position_embeddings=40960, rope_parameters=_rope(rope_theta=1e6))
    spec = RopeSpec.from_hf_config(config)
    assert spec == RopeSpec(
        head_size=64, rotary_dim=64, max_position=40960, base=1e6, is_neox_style=True, scaling=None
    )
    assert RopeSpec.from_dict(spec.to_dict()) == spec


def test_unsupported_rope_type_raises():
    longrope = _rope(
        "longrope", short_factor=[1.0] * 64, long_factor=[2.0] * 64, original_max_position_embeddings=1024
    )
    config = LlamaConfig(rope_parameters=longrope)
    supported = "supported: default, linear, dynamic, yarn, llama3"
    with pytest.raises(ValueError, match=rf"unsupported rope_type 'longrope'; {supported}"):
        RopeSpec.from_hf_config(config)
