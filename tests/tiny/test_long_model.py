"""The committed long-context tiny model: files, loading, config, and its RTPurbo artifact validates.

No long forward passes here (16K-token prompts take tens of seconds on a CPU core); the accuracy
measurements are recorded in ``rtpurbo_vllm/tiny/__init__.py`` and ``docs/CALIBRATION.md``.
"""

import json

import pytest
import torch

from rtpurbo_vllm.tiny import tiny_long_model_dir

FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
         "tokenizer_config.json", "special_tokens_map.json", "training_heads.json"]
CONTEXT = 16384


@pytest.fixture(scope="module")
def long_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(tiny_long_model_dir())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval(), AutoTokenizer.from_pretrained(path)


def test_committed_folder():
    folder = tiny_long_model_dir()
    for name in FILES:
        assert (folder / name).is_file(), name
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 20 * 2**20, size
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["dtype"] == "bfloat16"
    assert cfg["max_position_embeddings"] >= 2 * CONTEXT and cfg["rope_parameters"]["rope_theta"] >= 1e6


def test_loads_and_answers_a_short_prompt(long_model):
    """Loads with its tokenizer (same ids as the task) and answers one 256-token prompt."""
    from rtpurbo_vllm.tiny.task import make_prompt, score

    model, tok = long_model
    prompt = make_prompt(0, context_len=256, n_pairs=2)
    assert tok.encode(prompt.text) == prompt.ids
    assert tok.model_max_length == model.config.max_position_embeddings
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt.ids]), max_new_tokens=3, do_sample=False)
    assert score(prompt.answer, out[0, len(prompt.ids):].tolist())


def test_artifact_validates(long_model):
    """The artifact loads against the model's config; the local heads' window is at most 1/8 of 16K."""
    from rtpurbo_vllm.artifacts import find_artifact_dir, load_artifact

    model, _ = long_model
    artifact = load_artifact(find_artifact_dir(tiny_long_model_dir()), hf_config=model.config)
    assert artifact.has_indexer and artifact.layout.num_retrieval_heads > 0
    assert artifact.params.sink_tokens == 4 and artifact.params.window <= CONTEXT // 8
    assert artifact.params.prefill_top_p == 1.0
