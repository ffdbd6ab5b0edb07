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


@pytest.fixture(scope="session")
def random_prompts():
    """``make(lengths, seed=0)``: one prompt of random token ids (1 <= id < VOCAB) per length."""
    def make(lengths, seed=0):
        g = torch.Generator().manual_seed(seed)
        return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]
    return make


@pytest.fixture(scope="session")
def greedy_outputs():
    """``run(model_dir, batches, max_tokens, logprobs=None, check=None, **engine_args)``: one fresh
    ``vllm.LLM`` (no tokenizer) generates greedily for each batch of prompts in ``batches`` (one
    ``generate`` call per batch); returns, per batch, ``[(token ids, [{token id: logprob} per step])]``.
    ``check(llm)`` runs first (e.g. to inspect the resolved config); the engine is freed afterwards so
    the next one finds the GPU memory."""
    import gc

    def run(model_dir, batches, max_tokens, logprobs=None, check=None, **engine_args):
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        llm = LLM(model=str(model_dir), skip_tokenizer_init=True, seed=0, **engine_args)
        if check is not None:
            check(llm)
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, detokenize=False,
                                logprobs=logprobs)
        results = []
        for prompts in batches:
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
            results.append([(list(o.outputs[0].token_ids),
                             [{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs or []])
                            for o in outs])
        # The engine core gc.freeze()s what it allocates at start-up: only its shutdown unfreezes it and
        # tears down the distributed state, so an in-process engine gives its GPU memory back.
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        torch.cuda.empty_cache()
        return results
    return run


def parting(want, got):
    """Where two greedy paths part: ``(step, logprob gap)`` with the gap ``logprob(want[step]) -
    logprob(got[step])`` under ``want``'s engine (``want`` = (tokens, whole-vocabulary logprobs per
    step)); ``(len, None)`` if the paths are identical."""
    tokens, logprobs = want
    step = next((i for i, (a, b) in enumerate(zip(tokens, got)) if a != b), len(tokens))
    if step == len(tokens):
        return step, None
    return step, logprobs[step][tokens[step]] - logprobs[step][got[step]]


@pytest.fixture(scope="session")
def first_parting():
    """:func:`parting` (a fixture, because the suite imports test modules in importlib mode)."""
    return parting
