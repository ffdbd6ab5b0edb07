"""rtpurbo-demo: the CPU main job runs end to end."""

import pytest

from rtpurbo_vllm.demo import run_pipeline_demo


def test_pipeline_demo_reports_indexer_recall(tmp_path):
    summary = run_pipeline_demo(str(tmp_path), steps=4, seq_len=256)
    assert summary["num_retrieval_heads"] == 3
    assert 0.0 < summary["recall"]["mean"] <= 1.0 and 0.0 < summary["blocks_kept"]["mean"] <= 1.0


def test_tiny_model_demo_compares_dense_and_rtpurbo():
    from rtpurbo_vllm.demo import run_demo
    from rtpurbo_vllm.tiny import tiny_model_dir

    if not (tiny_model_dir() / "rtpurbo").is_dir():
        pytest.skip("the trained tiny model is not in this checkout")
    r = run_demo(num_prompts=2, context_len=1024, progress=False)
    assert r["prompts"] == 2 and r["context_tokens"] == 1024
    assert 0.0 <= r["accuracy_dense"] <= 1.0 and 0.0 <= r["accuracy_rtpurbo"] <= 1.0
    assert 0.0 < r["kept_block_share"] < 1.0 and 0.0 < r["local_context_share"] < 1.0
