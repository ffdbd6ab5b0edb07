"""``vllm serve`` with the calibrated tiny model: RTPURBO against FLASH_ATTN over the OpenAI API (``gpu``).

The tiny retrieval model (``rtpurbo_vllm/tiny/model``, artifact in ``model/rtpurbo``: 5 retrieval heads
of 32, local heads 4 sinks + a 256-token window) answers key-value lookups buried in 2048-token
documents. The window covers 12.5 % of that context and the indexer's top-p keeps under 25 % of the
blocks at the answer positions (measured by ``tests/tiny/test_rtpurbo_on_tiny.py`` with the exact
reference on the same prompts). Checked here, each server a real ``vllm serve`` process:

- completions and chat: RTPURBO's exact-match accuracy is within 2 points of FLASH_ATTN's (with the
  same KV-cache dtype) with the default (compact) KV layout, the full layout, the compact layout with
  the artifact ``model/rtpurbo-kv1`` (one retrieval KV head per layer, so the other KV head keeps only
  sinks + window), that on an fp8 KV cache, and the compact layout with the retrieval heads' sparse
  prefill (``prefill_top_p`` 0.95 through ``--additional-config``);
- a mixed batch (long and short prompts, shared prefixes) sent at once to a server with chunked
  prefill, prefix caching and a KV cache too small for all of it: vLLM preempts requests, reuses
  cached prefixes, and every answer equals the unconstrained server's (with the sparse prefill, whose
  selection follows where vLLM ends chunks: as many right answers);
- with two GPUs: tensor parallelism 2 gives TP=1's greedy answers; and the V1 model runner serves the
  same answers as the default (V2).

Logs of every server go to ``$RTPURBO_E2E_LOGS`` (default: pytest's tmp dir).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from rtpurbo_vllm.bench.server import HOST, free_port, post_all, running_server, server_metrics, vllm_command
from rtpurbo_vllm.tiny import tiny_kv1_artifact_dir, tiny_model_dir
from rtpurbo_vllm.tiny.task import make_prompt, score

pytestmark = pytest.mark.gpu

CONTEXT = 2048
NUM_PROMPTS = 50                  # one prompt = 2 points
MODEL = tiny_model_dir()


@contextlib.contextmanager
def serve(name: str, backend: str, *args: str, env: dict | None = None, tp: int = 1):
    """A ``vllm serve`` process of the tiny model (:func:`rtpurbo_vllm.bench.server.running_server`);
    yields its port, stops it and every process it started afterwards."""
    logs = Path(os.environ.get("RTPURBO_E2E_LOGS", "/tmp/rtpurbo_e2e_logs"))
    port = free_port()
    cmd = [*vllm_command(), "serve", str(MODEL), "--attention-backend", backend, "--port", str(port),
           "--host", HOST, "--max-model-len", "4096", "--gpu-memory-utilization", "0.15", "--seed", "0",
           "--tensor-parallel-size", str(tp), *args]
    with running_server(cmd, port, logs / f"{name}.log", logs, startup_timeout=420, stop_timeout=60, env=env):
        yield port


def completions(port: int, texts: list[str], max_tokens: int = 3) -> list[str]:
    bodies = [{"model": str(MODEL), "prompt": text, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
              for text in texts]
    return [reply["choices"][0]["text"] for reply in post_all(port, "/v1/completions", bodies, timeout=300)]


def chats(port: int, texts: list[str]) -> list[str]:
    bodies = [{"model": str(MODEL), "max_tokens": 3, "temperature": 0.0, "messages": [{"role": "user", "content": text}]}
              for text in texts]
    return [reply["choices"][0]["message"]["content"]
            for reply in post_all(port, "/v1/chat/completions", bodies, timeout=300)]


def metric(port: int, name: str) -> float:
    """Sum of a Prometheus counter over its label sets."""
    return server_metrics(port, {name: "value"}).get("value", 0.0)


def accuracy(prompts, answers: list[str]) -> float:
    return sum(score(p.answer_text, a) for p, a in zip(prompts, answers)) / len(prompts)


@pytest.fixture(scope="module")
def prompts():
    return [make_prompt(20_000 + i, CONTEXT) for i in range(NUM_PROMPTS)]


class Query(NamedTuple):
    text: str
    answer_text: str


@pytest.fixture(scope="module")
def mixed_batch() -> list[Query]:
    """Long and short prompts, and long prompts sharing a 1536-token prefix (prefix-cache hits; the
    queried pair is in the part after it)."""
    long = [make_prompt(30_000 + i, CONTEXT) for i in range(12)]
    short = [make_prompt(31_000 + i, 256, n_pairs=2) for i in range(12)]
    base = make_prompt(32_000, CONTEXT).text.split(" ")
    tails = [make_prompt(33_000 + i, 512, n_pairs=2) for i in range(8)]
    shared = [Query(" ".join(base[:1536] + tail.text.split(" ")), tail.answer_text) for tail in tails]
    return [Query(p.text, p.answer_text) for p in long + short] + shared


# RTPURBO's KV layouts and cache dtypes: the default (compact layout, the shipped artifact), the full
# layout, the compact layout with the artifact calibrated under a KV budget of one retrieval KV head
# per layer (window units hold most KV heads), that on an fp8 KV cache (compared with FLASH_ATTN on
# an fp8 cache too), and the compact layout with the retrieval heads' sparse prefill (prefill_top_p 0.95).
KV1 = str(tiny_kv1_artifact_dir())
COMPACT_KV1 = json.dumps({"rtpurbo": {"artifact": KV1, "kv_layout": "compact"}})
LAYOUTS = {
    "default": (),
    "full": ("--additional-config", json.dumps({"rtpurbo": {"kv_layout": "full"}})),
    "kv1": ("--additional-config", COMPACT_KV1),
    "fp8": ("--kv-cache-dtype", "fp8", "--additional-config", COMPACT_KV1),
    "sparse_prefill": ("--additional-config", json.dumps({"rtpurbo": {"kv_layout": "compact", "prefill_top_p": 0.95}})),
}


def answers(name: str, backend: str, prompts, mixed_batch, *args: str) -> dict[str, list[str]]:
    """Greedy answers of a ``backend`` server: completions and chat on ``prompts``, and the mixed batch."""
    with serve(name, backend, *args) as port:
        return {"completions": completions(port, [p.text for p in prompts]),
                "chat": chats(port, [p.text for p in prompts]),
                "mixed": completions(port, [q.text for q in mixed_batch])}


@pytest.fixture(scope="module")
def flash(prompts, mixed_batch):
    return answers("flash_attn", "FLASH_ATTN", prompts, mixed_batch)


@pytest.fixture(scope="module")
def flash_fp8(prompts, mixed_batch):
    return answers("flash_attn_fp8", "FLASH_ATTN", prompts, mixed_batch, "--kv-cache-dtype", "fp8")


_SERVED: dict[str, dict[str, list[str]]] = {}


@pytest.fixture
def served(layout, prompts, mixed_batch):
    """The RTPURBO server's answers for ``layout`` (one server per layout and module)."""
    if layout not in _SERVED:
        _SERVED[layout] = answers(f"rtpurbo_{layout}", "RTPURBO", prompts, mixed_batch, *LAYOUTS[layout])
    return _SERVED[layout]


@pytest.fixture
def rtpurbo(prompts, mixed_batch):
    if "default" not in _SERVED:
        _SERVED["default"] = answers("rtpurbo_default", "RTPURBO", prompts, mixed_batch)
    return _SERVED["default"]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("api", ["completions", "chat"])
def test_accuracy_within_two_points_of_flash_attn(request, prompts, served, layout, api):
    """Against FLASH_ATTN with the same KV-cache dtype."""
    flash = request.getfixturevalue("flash_fp8" if layout == "fp8" else "flash")
    dense, sparse = accuracy(prompts, flash[api]), accuracy(prompts, served[api])
    print(f"{api}, RTPURBO {layout}: FLASH_ATTN {dense:.2f}, RTPURBO {sparse:.2f} on {len(prompts)} prompts "
          f"of {CONTEXT} tokens")
    assert dense >= 0.8
    assert sparse >= dense - 0.02


PREEMPT_MAX_LEN, PREEMPT_BATCHED_TOKENS = 2304, 512


def preempt_pages(layout: str) -> int:
    """The fewest KV-cache blocks vLLM starts with in ``layout``: one request of ``PREEMPT_MAX_LEN`` tokens
    as its start-up check counts it (``KVLayout.vllm_bytes_per_sequence``: the window units' reserve for
    the two batches in flight of async scheduling); vLLM's pool holds ``blocks * units * page`` bytes."""
    from rtpurbo_vllm.artifacts import load_artifact
    from rtpurbo_vllm.kv_cache import KVLayout

    artifact = load_artifact(KV1 if layout in ("kv1", "fp8") else MODEL / "rtpurbo")
    kv_dtype = torch.uint8 if layout == "fp8" else torch.bfloat16
    plan = KVLayout.from_artifact(artifact, name="full" if layout == "full" else "compact", kv_dtype=kv_dtype,
                                  index_dtype=torch.bfloat16)
    need = plan.vllm_bytes_per_sequence(PREEMPT_MAX_LEN, 2 * PREEMPT_BATCHED_TOKENS)
    return -(-need // plan.bytes_per_block)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_mixed_batch_with_preemption_and_prefix_hits(served, mixed_batch, layout):
    """A KV cache too small for the 32 requests sent at once, which each generate 200 tokens: vLLM
    admits what the prompts need, then runs out of pages while decoding and must preempt and
    recompute; the 8 prompts sharing a 1536-token prefix hit the prefix cache. The answers (the first
    3 generated words) must equal the unconstrained server's (same layout), all but one. The sparse
    prefill is judged by right answers instead, no fewer than the unconstrained server's but one: a
    query tile that a chunk boundary cuts selects its blocks by the index scores of its rows in that
    chunk, so its answers follow where vLLM ended the chunks (here a 512-token step budget shared
    with the decodes, there the default)."""
    with serve(f"rtpurbo_preempt_{layout}", "RTPURBO", "--enforce-eager", "--block-size", "16",
               "--max-model-len", str(PREEMPT_MAX_LEN), "--num-gpu-blocks-override", str(preempt_pages(layout)),
               "--enable-prefix-caching", "--enable-chunked-prefill",
               "--max-num-batched-tokens", str(PREEMPT_BATCHED_TOKENS),
               "--max-num-seqs", "32", *LAYOUTS[layout]) as port:
        got = completions(port, [q.text for q in mixed_batch], max_tokens=200)
        preempted = metric(port, "vllm:num_preemptions_total")
        hits = metric(port, "vllm:prefix_cache_hits_total")
    differ = [i for i, (a, b) in enumerate(zip(got, served["mixed"])) if a.split()[:3] != b.split()[:3]]
    right, right_unconstrained = (sum(score(q.answer_text, a) for q, a in zip(mixed_batch, answers))
                                  for answers in (got, served["mixed"]))
    print(f"RTPURBO {layout}: preemptions {preempted:.0f}, prefix-cache hit tokens {hits:.0f}, "
          f"{len(got) - len(differ)}/{len(got)} answers equal to the unconstrained server's (not: {differ}); "
          f"right answers {right}, the unconstrained server's {right_unconstrained}")
    if layout == "sparse_prefill":
        assert right >= right_unconstrained - 1
    else:
        assert len(differ) <= 1
    assert preempted > 0
    assert hits > 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tensor_parallel_2_gives_the_same_answers(prompts, rtpurbo):
    with serve("rtpurbo_tp2", "RTPURBO", "--enforce-eager", tp=2) as port:
        got = completions(port, [p.text for p in prompts])
    same = sum(a == b for a, b in zip(got, rtpurbo["completions"]))
    print(f"TP=2 answers equal to TP=1 on {same}/{len(prompts)} prompts; accuracy {accuracy(prompts, got):.2f}")
    assert same >= len(prompts) - 1


def test_v1_model_runner_gives_the_same_answers(prompts, rtpurbo):
    with serve("rtpurbo_v1_runner", "RTPURBO", env={"VLLM_USE_V2_MODEL_RUNNER": "0"}) as port:
        got = completions(port, [p.text for p in prompts])
    same = sum(a == b for a, b in zip(got, rtpurbo["completions"]))
    print(f"V1 runner answers equal to V2 on {same}/{len(prompts)} prompts")
    assert same >= len(prompts) - 1
