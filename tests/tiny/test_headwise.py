"""Head-wise attention of the tiny model's training code (random weights, no trained model)."""

import pytest
import torch

from rtpurbo_vllm.tiny.train import LlamaForCausalLM, attention_mode, tiny_config, top_heads

RETRIEVAL = [[1], [], [0, 6], [3]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = LlamaForCausalLM(tiny_config()).eval()
    m.config._attn_implementation = "sdpa"
    return m


@pytest.mark.parametrize("length", [40, 300, 700])
def test_blockwise_local_attention_matches_the_masked_reference(model, length):
    """The blockwise prefill path equals the dense-mask path (taken when attention is recorded)."""
    ids = torch.randint(4, model.config.vocab_size, (2, length))
    with torch.no_grad():
        with attention_mode(model, RETRIEVAL):
            fast = model(input_ids=ids).logits
        with attention_mode(model, RETRIEVAL, record=range(length - 2, length)):
            reference = model(input_ids=ids).logits
        dense = model(input_ids=ids).logits
    torch.testing.assert_close(fast, reference, atol=1e-4, rtol=1e-4)
    if length <= 256:                                  # everything fits in the window
        torch.testing.assert_close(fast, dense, atol=1e-4, rtol=1e-4)
    else:
        assert (fast - dense).abs().max() > 1e-3


def test_local_heads_ignore_tokens_beyond_the_window(model):
    """With no retrieval head, a token reaches only 4 layers x 255 positions further (not a sink)."""
    ids = torch.randint(4, model.config.vocab_size, (1, 1300))
    changed = ids.clone()
    changed[0, 100] = 4 if ids[0, 100] != 4 else 5
    with torch.no_grad(), attention_mode(model, [[]] * 4):
        a, b = model(input_ids=ids).logits[0], model(input_ids=changed).logits[0]
    reach = 100 + 4 * 255
    assert torch.equal(a[reach + 1:], b[reach + 1:])
    assert not torch.equal(a[100:reach + 1], b[100:reach + 1])


def test_top_heads():
    scores = torch.zeros(4, 8)
    scores[1, 4], scores[3, 0], scores[1, 2] = 3.0, 2.0, 1.0
    assert top_heads(scores, 3) == [[], [2, 4], [], [0]]
