"""Calibration of the committed tiny retrieval model (``rtpurbo_vllm/tiny/model``): stable head finding
and an indexer that keeps >= 85 % of the attention mass inside its top-p(0.9) blocks after 300 steps."""

import pytest

from rtpurbo_vllm.artifacts import SparsityParams
from rtpurbo_vllm.calibration.capture import load_model
from rtpurbo_vllm.calibration.evaluate import evaluate_artifact
from rtpurbo_vllm.calibration.export import build_artifact
from rtpurbo_vllm.calibration.heads import find_heads
from rtpurbo_vllm.calibration.train_config import TrainConfig
from rtpurbo_vllm.calibration.train_indexer import train_indexer
from rtpurbo_vllm.tiny import tiny_model_dir
from rtpurbo_vllm.tiny.calibration_data import write_calibration_texts

TINY = tiny_model_dir()
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (TINY / "config.json").is_file(), reason="the tiny model is not built")]
RETRIEVAL = 5                                   # ~15 % of its 4 x 8 query heads


@pytest.fixture(scope="module")
def lm():
    return load_model(TINY, "cpu")


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """The tiny model's calibration text: filler (haystack), records (needles), task documents."""
    return write_calibration_texts(tmp_path_factory.mktemp("data"), num_docs=16)


def find(lm, texts, out, seed):
    return find_heads(lm, out, count=RETRIEVAL, probe_tokens=2048, num_probes=4, needle_tokens=24,
                      data=texts["filler"], needle_data=texts["records"], seed=seed).heads


@pytest.fixture(scope="module")
def heads(lm, texts, tmp_path_factory):
    return find(lm, texts, tmp_path_factory.mktemp("heads"), seed=0)


def test_head_finding_is_stable_across_probe_documents(lm, texts, heads, tmp_path):
    other = find(lm, texts, tmp_path, seed=1)

    def flat(h):
        return {(layer, head) for layer, hs in enumerate(h.retrieval_heads) for head in hs}

    overlap = len(flat(heads) & flat(other))
    print(f"top-{RETRIEVAL} heads {sorted(flat(heads))}; overlap with other probe documents: {overlap}")
    assert overlap >= RETRIEVAL - 1


def test_300_indexer_steps_keep_85_percent_of_the_attention_mass(lm, heads, texts, tmp_path):
    ckpt = train_indexer(lm, heads, tmp_path, TrainConfig(steps=300, seq_len=2048), data=texts["task"],
                         progress=False)
    params = SparsityParams(sink_tokens=4, window=256, top_p=0.9, block_size=64, dense_threshold=0)
    report = evaluate_artifact(lm, build_artifact(heads, ckpt.path, params), data=texts["task"], num_seqs=2,
                               seq_len=2048, queries_per_seq=16)
    s = report["summary"]
    print(f"loss {ckpt.state['losses'][0]:.3f} -> {ckpt.state['losses'][-1]:.3f}; recall {s['recall']}, "
          f"blocks kept {s['blocks_kept']}")
    assert s["recall"]["mean"] >= 0.85
