"""Calibration of the committed tiny retrieval model (``rtpurbo_vllm/tiny/model``): stable head finding
and an indexer that keeps >= 85 % of the attention mass inside its top-p(0.9) blocks after 300 steps."""

import random

import pytest

from rtpurbo_vllm.artifacts import SparsityParams
from rtpurbo_vllm.calibration.capture import load_model
from rtpurbo_vllm.calibration.evaluate import evaluate_artifact
from rtpurbo_vllm.calibration.export import build_artifact
from rtpurbo_vllm.calibration.heads import find_heads
from rtpurbo_vllm.calibration.train_config import TrainConfig
from rtpurbo_vllm.calibration.train_indexer import train_indexer
from rtpurbo_vllm.tiny import tiny_model_dir

TINY = tiny_model_dir()
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (TINY / "config.json").is_file(), reason="the tiny model is not built")]
RETRIEVAL = 5                                   # ~15 % of its 4 x 8 query heads


@pytest.fixture(scope="module")
def lm():
    return load_model(TINY, "cpu")


@pytest.fixture(scope="module")
def task_text(tmp_path_factory):
    """Key-value task documents of the tiny model as one text file (the calibration data)."""
    from rtpurbo_vllm.tiny.task import make_training_example
    from rtpurbo_vllm.tiny.tokenizer import VOCAB

    rng = random.Random(0)
    docs = [make_training_example(rng, 2048, 24, 24)[0] for _ in range(40)]
    path = tmp_path_factory.mktemp("data") / "tiny_task.txt"
    path.write_text("\n".join(" ".join(VOCAB[i] for i in ids[1:]) for ids in docs))
    return path


@pytest.fixture(scope="module")
def heads(lm, task_text, tmp_path_factory):
    return find_heads(lm, tmp_path_factory.mktemp("heads"), count=RETRIEVAL, probe_tokens=2048, num_probes=2,
                      data=task_text, seed=0).heads


def test_head_finding_is_stable_across_probe_documents(lm, heads, tmp_path):
    synthetic = find_heads(lm, tmp_path, count=RETRIEVAL, probe_tokens=2048, num_probes=2, seed=1).heads

    def flat(h):
        return {(layer, head) for layer, hs in enumerate(h.retrieval_heads) for head in hs}

    overlap = len(flat(heads) & flat(synthetic))
    print(f"top-{RETRIEVAL} overlap, task text (seed 0) vs synthetic text (seed 1): {overlap}")
    assert overlap >= RETRIEVAL - 1


def test_300_indexer_steps_keep_85_percent_of_the_attention_mass(lm, heads, task_text, tmp_path):
    ckpt = train_indexer(lm, heads, tmp_path, TrainConfig(steps=300, seq_len=1024, queries_per_seq=32),
                         data=task_text, progress=False)
    params = SparsityParams(sink_tokens=4, window=256, top_p=0.9, block_size=64, dense_threshold=0)
    report = evaluate_artifact(lm, build_artifact(heads, ckpt.path, params), data=task_text, num_seqs=2,
                               seq_len=2048, queries_per_seq=16)
    s = report["summary"]
    print(f"loss {ckpt.state['losses'][0]:.3f} -> {ckpt.state['losses'][-1]:.3f}; recall {s['recall']}, "
          f"blocks kept {s['blocks_kept']}")
    assert s["recall"]["mean"] >= 0.85
