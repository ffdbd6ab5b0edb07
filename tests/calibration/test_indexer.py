"""Stage-1 indexer training (loss, init, checkpoints, resume), export round trip, evaluate report."""

import json

import pytest
import safetensors.torch
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rtpurbo_vllm.artifacts import ArtifactError, SparsityParams, load_artifact
from rtpurbo_vllm.calibration import train_indexer as ti
from rtpurbo_vllm.calibration.capture import wrap_model
from rtpurbo_vllm.calibration.evaluate import METRICS, evaluate_artifact, render_markdown, write_report
from rtpurbo_vllm.calibration.export import build_artifact, export_artifact
from rtpurbo_vllm.calibration.heads import HeadsFile, find_heads
from rtpurbo_vllm.calibration.train_config import TrainConfig
from rtpurbo_vllm.rope import RopeSpec
from rtpurbo_vllm.tiny.tokenizer import build_tokenizer

TOK = build_tokenizer()
SMALL = TrainConfig(steps=6, warmup_steps=2, seq_len=256, queries_per_seq=16, lr=1e-2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random 2-layer Llama (GQA 4, peaky attention) saved with the tiny tokenizer."""
    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(TOK), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, initializer_range=0.2,
        bos_token_id=TOK.bos_token_id, eos_token_id=TOK.eos_token_id)).save_pretrained(path)
    TOK.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lm(model_dir):
    return wrap_model(LlamaForCausalLM.from_pretrained(model_dir), TOK)


@pytest.fixture(scope="module")
def heads_dir(lm, tmp_path_factory):
    path = tmp_path_factory.mktemp("heads")
    find_heads(lm, path, count=4, probe_tokens=240, num_probes=1, needle_tokens=24)
    return path


def _train(lm, heads_dir, out, config=SMALL, **kw):
    return ti.train_indexer(lm, heads_dir, out, config, progress=False, **kw)


def test_lowfreq_channels_pick_the_slowest_rope_pairs():
    spec = RopeSpec(head_size=16, rotary_dim=16, max_position=2048, base=10000.0, is_neox_style=True, scaling=None)
    assert ti.lowfreq_channels(spec, 4).tolist() == [6, 7, 14, 15]     # NeoX pairs (i, i + 8), slowest i = 7, 6
    partial = RopeSpec(16, 8, 2048, 10000.0, True, None)                 # channels 8..15 are not rotated
    assert ti.lowfreq_channels(partial, 10).tolist() == [3, 7, *range(8, 16)]
    gptj = RopeSpec(16, 16, 2048, 10000.0, False, None)
    assert ti.lowfreq_channels(gptj, 4).tolist() == [12, 13, 14, 15]


def test_loss_decreases_and_lowfreq_init_beats_random(lm, heads_dir, tmp_path):
    config = TrainConfig(steps=30, warmup_steps=3, seq_len=256, queries_per_seq=16, lr=1e-2)
    losses = _train(lm, heads_dir, tmp_path / "a", config).state["losses"]
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])
    random_first = _train(lm, heads_dir, tmp_path / "b", TrainConfig(**{**vars(SMALL), "init": "random", "steps": 1}))
    assert losses[0] < 0.5 * random_first.state["losses"][0]      # same first sequence, same queries


def test_resume_reproduces_an_uninterrupted_run_exactly(lm, heads_dir, tmp_path, monkeypatch):
    full = _train(lm, heads_dir, tmp_path / "full", checkpoint_every=3)
    save = ti._save_checkpoint

    def save_then_die(out_dir, step, state, tensors):
        save(out_dir, step, state, tensors)
        raise KeyboardInterrupt

    monkeypatch.setattr(ti, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _train(lm, heads_dir, tmp_path / "cut", checkpoint_every=3)
    monkeypatch.setattr(ti, "_save_checkpoint", save)
    assert [p.name for p in (tmp_path / "cut").iterdir()] == ["step-000003"]
    with pytest.raises(ValueError, match="already holds the checkpoint step-000003.*--resume"):
        _train(lm, heads_dir, tmp_path / "cut", checkpoint_every=3)
    with pytest.raises(ValueError, match="other settings.*config"):
        _train(lm, heads_dir, tmp_path / "cut", TrainConfig(**{**vars(SMALL), "lr": 5e-3}), resume=True)
    resumed = _train(lm, heads_dir, tmp_path / "cut", checkpoint_every=3, resume=True)
    assert resumed.step == full.step == 6 and resumed.state["losses"] == full.state["losses"]
    assert resumed.tensors.keys() == full.tensors.keys()
    assert all(torch.equal(resumed.tensors[k], full.tensors[k]) for k in full.tensors)
    assert [p.name for p in (tmp_path / "cut").iterdir()] == ["step-000006"]


def test_an_interrupted_checkpoint_write_leaves_nothing(lm, heads_dir, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError):
        _train(lm, heads_dir, tmp_path, TrainConfig(**{**vars(SMALL), "steps": 1}))
    assert list(tmp_path.iterdir()) == []


def test_export_round_trip_and_evaluate_report(model_dir, lm, heads_dir, tmp_path):
    ckpt = _train(lm, heads_dir, tmp_path / "train")
    params = SparsityParams(sink_tokens=4, window=256, top_p=0.9, block_size=32, dense_threshold=0)
    out = export_artifact(model_dir, heads_dir / "heads.json", tmp_path / "train", tmp_path / "art", params)
    artifact = load_artifact(out, hf_config=lm.hf_config)
    built = build_artifact(HeadsFile.load(heads_dir), ckpt.path, params)
    assert artifact.params == built.params == params and artifact.retrieval_heads == built.retrieval_heads
    assert artifact.model == built.model and artifact.provenance.extra == built.provenance.extra
    saved, trained = artifact.indexer_tensors(), built.indexer_tensors()
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)
    assert saved["layers.0.w_q"].shape[1:] == (16, 16)
    assert artifact.provenance.steps == 6 and artifact.provenance.extra["train_config"]["lr"] == 1e-2

    report = evaluate_artifact(lm, out, num_seqs=2, seq_len=200, queries_per_seq=8)
    assert report["summary"]["num_retrieval_heads"] == 4 and len(report["heads"]) == 4
    for m in METRICS:
        assert set(report["summary"][m]) == {"mean", "min", "p10", "p50"}
        assert all(0 < row[m] <= 1 + 1e-6 for row in report["heads"])
    assert all(row["recall"] >= 0.0 for row in report["heads"]) and report["params"] == params.to_dict()
    # prefill_top_p 1.0 (the default): every visible block of every tile is kept, all of the mass.
    assert all(row["prefill_blocks_kept"] == 1 and row["prefill_recall_p10"] == pytest.approx(1)
               for row in report["heads"])
    assert report["prefill_tile_q"] == 128
    paths = write_report(report, tmp_path / "eval")
    assert json.loads(paths["json"].read_text()) == report
    markdown = render_markdown(report)
    assert "| recall |" in markdown and "| prefill_recall |" in markdown and "prefill_top_p 1.0" in markdown
    assert paths["markdown"].read_text() == markdown
    # Index keys stored as fp8 e4m3 (no scale): the same routing measured on the rounded keys.
    fp8 = evaluate_artifact(lm, out, num_seqs=2, seq_len=200, queries_per_seq=8, index_key_dtype="fp8_e4m3")
    assert report["index_key_dtype"] == "float32" and fp8["index_key_dtype"] == "fp8_e4m3"
    assert "index keys in fp8_e4m3" in render_markdown(fp8)
    assert fp8["summary"]["recall"]["mean"] == pytest.approx(report["summary"]["recall"]["mean"], abs=0.05)
    with pytest.raises(ValueError, match="unknown index key dtype 'int8'; choose one of float32, bfloat16"):
        evaluate_artifact(lm, out, num_seqs=1, seq_len=200, queries_per_seq=8, index_key_dtype="int8")


def test_evaluate_measures_the_sparse_prefill_selection(lm):
    """Per query tile, the prefill metrics apply the sparse prefill's selection (per key of its KV head,
    the max over the tile's rows of the index logit, causal for its last row; sink and diagonal blocks
    forced) to the real attention rows of the tile; at prefill_top_p 1.0 every visible block and all of
    the mass is kept."""
    from rtpurbo_vllm.calibration.capture import attention_rows, capture_retrieval
    from rtpurbo_vllm.calibration.evaluate import layer_prefill_routing
    from rtpurbo_vllm.triton_kernels.sparse_prefill import TILE_Q, tile_topp_ref

    torch.manual_seed(0)
    heads, num_tokens, block_size = [1, 4, 6], 300, 16
    w_q, w_k = torch.randn(2, len(heads), 16, lm.head_dim).unbind(0)
    captured = capture_retrieval(lm, [[], heads], torch.randint(3, len(TOK), (num_tokens,)).tolist(),
                                 torch.arange(num_tokens))
    q_pre, k_pre = captured.q_pre[1], captured.k_pre[1]
    dense = layer_prefill_routing(lm, heads, q_pre, k_pre, w_q, w_k, 1.0, block_size, 4)
    assert dense["tile_recall"].shape == (len(heads), 3)                     # tiles of 128, 128, 44 rows
    torch.testing.assert_close(dense["tile_recall"], torch.ones(len(heads), 3))
    assert torch.equal(dense["tile_kept"], dense["tile_visible"])
    assert dense["tile_visible"][0].tolist() == [8, 16, 19]                  # ceil((last_pos + 1) / 16)
    sparse = layer_prefill_routing(lm, heads, q_pre, k_pre, w_q, w_k, 0.5, block_size, 4)
    assert (sparse["tile_kept"] < sparse["tile_visible"])[:, 1:].all()
    # The last tile by hand: each key scores its max logit over rows 256..299; each head reads its KV head.
    rows = torch.arange(2 * TILE_Q, num_tokens)
    kv = torch.tensor(heads) // (lm.num_heads // lm.num_kv_heads)
    q_idx = torch.einsum("qhd,hid->qhi", q_pre[rows].float(), w_q)                         # [44, HR, DI]
    logits = torch.einsum("qhi,thd,hid->hqt", q_idx, k_pre[:, kv].float(), w_k)             # [HR, 44, 300]
    probs = logits.amax(1).softmax(-1)
    mass = torch.nn.functional.pad(probs, (0, 4)).view(len(heads), 19, block_size).sum(-1)
    forced = torch.zeros(19, dtype=torch.bool)
    forced[[0, 15, 16, 17, 18]] = True                                       # sink block; blocks over [241, 299]
    keep = tile_topp_ref(mass, forced, 0.5)
    real = attention_rows(q_pre[rows], k_pre, rows, torch.tensor(heads), lm)                 # [HR, 44, 300]
    torch.testing.assert_close(sparse["tile_kept"][:, 2], keep.sum(-1).float())
    kept_mass = (real * keep.repeat_interleave(block_size, -1)[:, None, :num_tokens]).sum(-1).mean(-1)
    torch.testing.assert_close(sparse["tile_recall"][:, 2], kept_mass)
    assert (kept_mass < 1).all()


def test_export_refuses_bad_inputs(model_dir, lm, heads_dir, tmp_path):
    _train(lm, heads_dir, tmp_path / "train", TrainConfig(**{**vars(SMALL), "steps": 1}))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="not a writable folder"):
        export_artifact(model_dir, heads_dir, tmp_path / "train", tmp_path / "file" / "art")
    with pytest.raises(ValueError, match="no indexer checkpoint"):
        export_artifact(model_dir, heads_dir, tmp_path, tmp_path / "art")
    other = tmp_path / "heads2"
    find_heads(lm, other, count=2, probe_tokens=240, num_probes=1, needle_tokens=24)
    with pytest.raises(ValueError, match="trained for other retrieval heads"):
        export_artifact(model_dir, other, tmp_path / "train", tmp_path / "art")
    with pytest.raises(ArtifactError, match="top_p"):
        export_artifact(model_dir, heads_dir, tmp_path / "train", tmp_path / "art", SparsityParams(top_p=1.5))
    assert not (tmp_path / "art").exists()
