"""Head-wise prefill attention: retrieval heads dense causal, local heads sinks plus a sliding window."""

from .reference import attention_mask, headwise_attention_ref, masked_attention

__all__ = ["attention_mask", "headwise_attention_ref", "masked_attention"]
