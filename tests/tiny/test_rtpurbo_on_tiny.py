"""RTPurbo on the calibrated tiny model: its retrieval heads are real, and sparse attention keeps accuracy.

- Ablation: zeroing the retrieval heads that calibration found breaks the task; zeroing as many
  other heads does not.
- Accuracy: the exact reference of RTPurbo (local heads: sinks + window; retrieval heads: top-p blocks
  of the trained indexer) answers within 2 points of dense attention at a context where top-p keeps
  under 25% of the blocks and the window covers under 25% of the context; with the shipped artifact
  and with the one calibrated under a KV budget of one retrieval KV head per layer (``rtpurbo-kv1``).
"""

import random

import pytest
import torch

from rtpurbo_vllm.artifacts import find_artifact_dir, load_artifact
from rtpurbo_vllm.hf_sparse import DecodeStats, ablated_heads_attention, rtpurbo_reference_attention
from rtpurbo_vllm.tiny import load_tiny_model, tiny_kv1_artifact_dir, tiny_model_dir
from rtpurbo_vllm.tiny.task import make_prompt, score

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (tiny_model_dir() / "rtpurbo").is_dir(),
                       reason="the trained tiny model and its artifact are not in this checkout"),
]
CONTEXT = 2048
NUM_PROMPTS = 50          # one prompt = 2 points


@pytest.fixture(scope="module")
def tiny():
    model, _ = load_tiny_model()
    artifact = load_artifact(find_artifact_dir(tiny_model_dir()), hf_config=model.config)
    prompts = [make_prompt(10_000 + i, CONTEXT) for i in range(NUM_PROMPTS)]
    return model, artifact, prompts


@pytest.fixture(autouse=True)
def no_grad():
    """Inference only, and autograd as it was for the tests after these."""
    with torch.no_grad():
        yield


def accuracy(model, prompts, context=None) -> float:
    correct = 0
    for prompt in prompts:
        ids = torch.tensor([prompt.ids])
        if context is None:
            out = model.generate(ids, max_new_tokens=len(prompt.answer), do_sample=False)
        else:
            with context():
                out = model.generate(ids, max_new_tokens=len(prompt.answer), do_sample=False)
        correct += score(prompt.answer, out[0, ids.shape[1]:].tolist())
    return correct / len(prompts)


def test_ablating_retrieval_heads_breaks_the_task_and_other_heads_do_not(tiny):
    model, artifact, prompts = tiny
    prompts = prompts[:20]
    dense = accuracy(model, prompts)
    found = {layer: list(heads) for layer, heads in enumerate(artifact.retrieval_heads) if heads}
    count = artifact.layout.num_retrieval_heads
    others = [(layer, h) for layer in range(artifact.layout.num_layers)
              for h in range(artifact.layout.num_heads) if h not in artifact.retrieval_heads[layer]]
    chosen = random.Random(0).sample(others, count)
    other = {layer: [h for l2, h in chosen if l2 == layer] for layer, _ in chosen}
    without_found = accuracy(model, prompts, lambda: ablated_heads_attention(model, found))
    without_other = accuracy(model, prompts, lambda: ablated_heads_attention(model, other))
    print(f"dense {dense:.2f}, without the {count} retrieval heads {without_found:.2f}, "
          f"without {count} other heads {without_other:.2f}")
    assert dense >= 0.8                  # the model answers ~87-90 % of 2048-token prompts
    assert without_found <= 0.3
    assert without_other >= dense - 0.15


@pytest.fixture(scope="module")
def dense_accuracy(tiny):
    model, _, prompts = tiny
    return accuracy(model, prompts)


@pytest.mark.parametrize("artifact_dir", ["shipped", "kv1"])
def test_sparse_attention_keeps_accuracy(tiny, dense_accuracy, artifact_dir):
    model, artifact, prompts = tiny
    if artifact_dir == "kv1":
        artifact = load_artifact(tiny_kv1_artifact_dir(), hf_config=model.config)
        kv_groups = [{h // artifact.layout.group_size for h in heads} for heads in artifact.retrieval_heads]
        assert max(len(groups) for groups in kv_groups) == 1      # one retrieval KV head per layer at most
    assert artifact.params.window < 0.25 * CONTEXT
    stats = DecodeStats()
    sparse = accuracy(model, prompts, lambda: rtpurbo_reference_attention(model, artifact, stats))
    print(f"{artifact_dir}: dense {dense_accuracy:.2f}, RTPurbo {sparse:.2f}, blocks kept "
          f"{stats.kept_block_share:.3f}, local context {stats.local_token_share:.3f}")
    assert stats.kept_block_share < 0.25
    assert stats.local_token_share < 0.25
    assert sparse >= dense_accuracy - 0.02
