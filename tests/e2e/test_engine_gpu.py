"""The RTPURBO backend inside a real vLLM engine on the GPU (marked ``gpu``; CI skips it).

A small Llama with random (Hugging Face initialised) weights is written to disk with a synthetic
artifact. With settings under which RTPurbo keeps everything (top-p 1, a window longer than every
sequence) the engine must give FLASH_ATTN's greedy tokens; with sparse settings it must serve a
mixed batch of long and short prompts with chunked prefill and prefix caching.
"""

import json

import pytest


pytestmark = pytest.mark.gpu

VOCAB = 2048     # the random Llama's vocabulary (conftest.py)

NEAR_TIE = 0.1   # nats: where greedy paths part, the two tokens must be this close under FLASH_ATTN


@pytest.fixture(autouse=True)
def spawn_workers(monkeypatch):
    # pytest's process has touched CUDA (collection), so vLLM's engine core must be spawned, not forked.
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "spawn")


@pytest.fixture(scope="module")
def model_dir(random_llama):
    return random_llama


def write_artifact(model_dir, **params):
    from transformers import AutoConfig

    from rtpurbo_vllm.artifacts import SparsityParams, save_artifact
    from rtpurbo_vllm.calibration.synthesize import synthetic_artifact

    target = model_dir / "rtpurbo"
    if target.exists():
        import shutil

        shutil.rmtree(target)
    artifact = synthetic_artifact(AutoConfig.from_pretrained(model_dir), ratio=0.25, seed=0,
                                  params=SparsityParams(**params))
    save_artifact(artifact, target)


def generate(greedy_outputs, model_dir, backend, prompts, max_tokens=8, logprobs=None, **engine_args):
    return greedy_outputs(model_dir, [prompts], max_tokens, logprobs=logprobs, attention_backend=backend,
                          enforce_eager=True, gpu_memory_utilization=0.3, max_model_len=16384,
                          max_logprobs=VOCAB, **engine_args)[0]


def test_dense_settings_match_flash_attn(model_dir, greedy_outputs, random_prompts, first_parting):
    write_artifact(model_dir, sink_tokens=4, window=16384, top_p=1.0, block_size=64, dense_threshold=0)
    batch = random_prompts([37, 700, 3000, 5000])
    want = generate(greedy_outputs, model_dir, "FLASH_ATTN", batch, logprobs=VOCAB)   # whole vocabulary
    got = generate(greedy_outputs, model_dir, "RTPURBO", batch)
    report = []
    for fa, (rtp_tokens, _) in zip(want, got):
        # greedy paths may part only at a near-tie under FLASH_ATTN
        same, gap = first_parting(fa, rtp_tokens)
        report.append({"identical_prefix": same, "logprob_gap_at_split": gap})
    print(json.dumps({"flash_attn": [t for t, _ in want], "rtpurbo": [t for t, _ in got], "report": report}))
    assert all(r["logprob_gap_at_split"] is None or r["logprob_gap_at_split"] < NEAR_TIE for r in report)
    assert sum(r["identical_prefix"] == 8 for r in report) >= 2


def test_sparse_mixed_batch_chunked_prefill_and_prefix_cache(model_dir, greedy_outputs, random_prompts):
    write_artifact(model_dir, sink_tokens=4, window=512, top_p=0.9, block_size=64, dense_threshold=0)
    long_prompts = random_prompts([9000, 6000, 3000], seed=1)
    shared = long_prompts[0][:4096]
    batch = (long_prompts + random_prompts([5, 60], seed=2)
             + [shared + p for p in random_prompts([300, 40], seed=3)])
    got = [t for t, _ in generate(greedy_outputs, model_dir, "RTPURBO", batch, max_tokens=16,
                                  enable_prefix_caching=True, max_num_batched_tokens=2048,
                                  enable_chunked_prefill=True)]
    assert [len(t) for t in got] == [16] * len(batch)
    assert all(0 <= tok < VOCAB for t in got for tok in t)
