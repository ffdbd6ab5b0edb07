"""The tiny model answers ``rtpurbo-eval``'s prompts for its tokenizer (``slow``).

No server: the committed Hugging Face model (``rtpurbo_vllm.tiny.load_tiny_model``, dense SDPA
attention on the CPU) stands in for ``vllm serve``. Each prompt is encoded as the server would
(``<s>`` prepended), answered greedily, decoded, and scored by the suite's own scoring code.
"""

import pytest

from rtpurbo_vllm.eval.client import Completion
from rtpurbo_vllm.eval.scoring import score
from rtpurbo_vllm.eval.tasks import Sample, TaskGenerator
from rtpurbo_vllm.tiny import tiny_model_dir

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (tiny_model_dir() / "model.safetensors").exists(),
                                 reason="the tiny model is not trained in this checkout")]

NEW_TOKENS = 4                  # the three digits of a value and its "."


def answer(sample: Sample) -> Completion:
    """The tiny model's greedy completion of ``sample.prompt`` (what a completions request returns)."""
    import torch

    from rtpurbo_vllm.tiny import load_tiny_model

    model, tokenizer = load_tiny_model()
    ids = tokenizer(sample.prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=min(NEW_TOKENS, sample.max_tokens), do_sample=False)
    return Completion(text=tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


def test_tiny_model_answers_niah_single_at_1k():
    from rtpurbo_vllm.eval.tasks import load_tokenizer

    gen = TaskGenerator(load_tokenizer(str(tiny_model_dir())))
    samples = gen.generate(["niah_single"], [1024], 10, seed=0)
    scores = [score(s, answer(s)) for s in samples]
    print(f"niah_single at 1024 tokens: {scores}")
    assert sum(scores) / len(scores) >= 0.7
