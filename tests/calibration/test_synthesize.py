"""`rtpurbo-calibrate synthesize`: random artifacts of the right shape for dummy-weight models."""

import pytest
import transformers

from rtpurbo_vllm.artifacts import load_artifact
from rtpurbo_vllm.calibration.cli import main


@pytest.fixture
def model_dir(tmp_path):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                                      architectures=["LlamaForCausalLM"])
    config.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("by_kv_group", [False, True], ids=["query-heads", "kv-groups"])
def test_synthesize_writes_valid_artifact(model_dir, by_kv_group):
    argv = ["synthesize", str(model_dir), "--ratio", "0.25", "--window", "512", "--seed", "3"]
    assert main(argv + (["--by-kv-group"] if by_kv_group else [])) == 0
    artifact = load_artifact(model_dir / "rtpurbo", hf_config=transformers.AutoConfig.from_pretrained(model_dir))
    assert artifact.params.window == 512 and artifact.has_indexer
    assert artifact.layout.num_retrieval_heads == 8                     # 25% of 4 x 8 query heads
    assert "synthetic" in artifact.provenance.data
    for layer, heads in enumerate(artifact.retrieval_heads):
        assert artifact.indexer[layer][0].shape == (len(heads), 16, 32)
        if by_kv_group:   # whole groups of 4 query heads
            assert all(sum(h // 4 == g for h in heads) in (0, 4) for g in range(2))


def test_synthesize_is_repeatable(model_dir, tmp_path):
    for out in ("a", "b"):
        assert main(["synthesize", str(model_dir), "--out", str(tmp_path / out), "--seed", "7"]) == 0
    a, b = (load_artifact(tmp_path / out) for out in ("a", "b"))
    assert a.retrieval_heads == b.retrieval_heads and a.indexer_tensors().keys() == b.indexer_tensors().keys()
    assert all((x == y).all() for x, y in zip(a.indexer_tensors().values(), b.indexer_tensors().values()))


def test_synthesize_with_a_per_layer_kv_budget(model_dir, tmp_path, capsys):
    """--kv-heads-per-layer N: retrieval heads only in N KV groups of each layer (all of their query heads
    alone, the top ratio among them with --ratio); recorded in the provenance."""
    assert main(["synthesize", str(model_dir), "--out", str(tmp_path / "a"), "--kv-heads-per-layer", "1",
                 "--report-context", "4096"]) == 0
    printed = capsys.readouterr().out
    assert "keeps 4 of 8 KV heads in full" in printed and "predicted KV capacity at 4096 tokens" in printed
    artifact = load_artifact(tmp_path / "a")
    assert artifact.layout.num_retrieval_heads == 4 * 4                      # 4 layers x one group of 4
    assert all(len(artifact.layout.retrieval_kv_heads(layer)) == 1 for layer in range(4))
    assert artifact.provenance.extra["kv_heads_per_layer"] == 1 and artifact.provenance.extra["ratio"] is None
    assert main(["synthesize", str(model_dir), "--out", str(tmp_path / "b"), "--kv-heads-per-layer", "1",
                 "--ratio", "0.25"]) == 0
    artifact = load_artifact(tmp_path / "b")
    assert artifact.layout.num_retrieval_heads == 8
    assert all(len(artifact.layout.retrieval_kv_heads(layer)) <= 1 for layer in range(4))
    assert main(["synthesize", str(model_dir), "--out", str(tmp_path / "c"), "--kv-heads-per-layer", "1",
                 "--ratio", "0.75"]) == 2
    assert "allows at most 16" in capsys.readouterr().err
