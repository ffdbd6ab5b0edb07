"""The random-weight Llama the engine tests serve."""

import pytest
import torch

VOCAB = 2048      # the test files' prompts draw ids below this


@pytest.fixture(scope="module")
def random_llama(tmp_path_factory):
    """A 4-layer Llama (8 query / 2 KV heads, d = 64, Hugging Face-initialised weights, bf16) written
    to a fresh folder, once per test module; returns the folder."""
    import transformers

    path = tmp_path_factory.mktemp("llama")
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=512, intermediate_size=1024,
                                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                                      head_dim=64, max_position_embeddings=16384, initializer_range=0.08,
                                      architectures=["LlamaForCausalLM"], torch_dtype="bfloat16")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path
