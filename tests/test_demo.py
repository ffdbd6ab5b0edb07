"""rtpurbo-demo: the CPU main job runs end to end."""

from rtpurbo_vllm.demo import run_pipeline_demo


def test_pipeline_demo_reports_indexer_recall(tmp_path):
    summary = run_pipeline_demo(str(tmp_path), steps=4, seq_len=256)
    assert summary["num_retrieval_heads"] == 3
    assert 0.0 < summary["recall"]["mean"] <= 1.0 and 0.0 < summary["blocks_kept"]["mean"] <= 1.0
