"""`rtpurbo-calibrate` through main([...]): the whole pipeline into tmp folders, help, and user errors."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, Qwen3Config, Qwen3ForCausalLM

from rtpurbo_vllm.artifacts import load_artifact
from rtpurbo_vllm.calibration.cli import COMMANDS, build_parser, main
from rtpurbo_vllm.tiny.tokenizer import build_tokenizer

TOK = build_tokenizer()


def _save_qwen3(path, layers=2):
    torch.manual_seed(1)
    Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(TOK), hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, initializer_range=0.2,
        bos_token_id=TOK.bos_token_id, eos_token_id=TOK.eos_token_id)).save_pretrained(path)
    TOK.save_pretrained(path)
    return str(path)


def test_pipeline_end_to_end(tmp_path, capsys):
    model = _save_qwen3(tmp_path / "qwen3")
    out = tmp_path / "calib"
    assert main(["heads", model, "--out", str(out), "--ratio", "0.25", "--by-kv-group", "--probe-tokens", "240",
                 "--num-probes", "2", "--needle-tokens", "24", "--device", "cpu"]) == 0
    heads = json.loads((out / "heads.json").read_text())
    assert sum(map(len, heads["retrieval_heads"])) == 2 and heads["settings"]["by_kv_group"]
    assert main(["train-indexer", model, "--heads", str(out / "heads.json"), "--out", str(out / "indexer"),
                 "--steps", "4", "--warmup-steps", "1", "--seq-len", "160", "--queries-per-seq", "8",
                 "--checkpoint-every", "2", "--no-progress", "--seed", "3"]) == 0
    assert [p.name for p in (out / "indexer").iterdir()] == ["step-000004"]
    assert main(["export", model, "--heads", str(out), "--indexer", str(out / "indexer"), "--sink-tokens", "4",
                 "--window", "64", "--block-size", "32", "--top-p", "0.8", "--prefill-top-p", "0.9",
                 "--dense-threshold", "0"]) == 0
    artifact = load_artifact(tmp_path / "qwen3" / "rtpurbo")                       # the default location
    assert artifact.params.window == 64 and artifact.params.top_p == 0.8 and artifact.provenance.seed == 3
    assert artifact.params.prefill_top_p == 0.9
    assert main(["evaluate", model, "--artifact", str(tmp_path / "qwen3" / "rtpurbo"), "--out", str(out / "eval"),
                 "--num-seqs", "1", "--seq-len", "160", "--queries-per-seq", "4"]) == 0
    report = json.loads((out / "eval" / "evaluate.json").read_text())
    assert report["summary"]["num_retrieval_heads"] == 2 and report["params"]["block_size"] == 32
    assert all(0 < row["prefill_blocks_kept"] <= 1 for row in report["heads"])
    printed = capsys.readouterr().out
    assert "2 retrieval heads" in printed and "artifact written and validated" in printed
    assert "decode (top_p 0.8): recall" in printed and "prefill (prefill_top_p 0.9): recall" in printed


def test_heads_with_a_per_layer_kv_budget(tmp_path, capsys):
    """--kv-heads-per-layer 1 alone: both query heads of the best KV group of each layer; the setting and the
    predicted capacity (selected vs global) go to heads.json and the printed report."""
    model = _save_qwen3(tmp_path / "qwen3")
    out = tmp_path / "calib"
    assert main(["heads", model, "--out", str(out), "--kv-heads-per-layer", "1", "--report-context", "65536",
                 "--probe-tokens", "240", "--num-probes", "1", "--needle-tokens", "24", "--device", "cpu"]) == 0
    heads = json.loads((out / "heads.json").read_text())
    settings = heads["settings"]
    assert settings["kv_heads_per_layer"] == 1 and settings["ratio"] is None and settings["num_selected"] == 4
    assert heads["retrieval_heads"] in ([[0, 1], [0, 1]], [[0, 1], [2, 3]], [[2, 3], [0, 1]], [[2, 3], [2, 3]])
    scores = torch.tensor(heads["scores"])
    for layer, chosen in enumerate(heads["retrieval_heads"]):      # the group holding the layer's best head
        assert int(scores[layer].argmax()) // 2 == chosen[0] // 2
    capacity = settings["kv_capacity"]
    assert capacity["context"] == 65536 and capacity["rows"][0]["selection"] == "selected (1 KV head per layer)"
    assert capacity["rows"][0]["full_kv_heads"] == 2 and capacity["rows"][0]["query_heads"] == 4
    printed = capsys.readouterr().out
    assert "4 retrieval heads" in printed and "predicted KV capacity of the compact KV layout" in printed
    assert "at 65536 tokens" in printed and "2/4 full KV heads" in printed
    assert any(r["selection"] == "global top 4 query heads" for r in capacity["rows"]) == \
        ("global top 4 query heads" in printed)
    # With --count: the top heads inside the budget; the default report context is max_position_embeddings.
    assert main(["heads", model, "--out", str(tmp_path / "c"), "--kv-heads-per-layer", "1", "--count", "3",
                 "--probe-tokens", "240", "--num-probes", "1", "--needle-tokens", "24", "--device", "cpu"]) == 0
    heads = json.loads((tmp_path / "c" / "heads.json").read_text())
    assert heads["settings"]["num_selected"] == 3 and heads["settings"]["kv_capacity"]["context"] == 1024
    assert all(len({h // 2 for h in layer}) <= 1 for layer in heads["retrieval_heads"])
    # Impossible combinations stop before the model runs, naming the fix.
    assert main(["heads", model, "--out", str(tmp_path / "x"), "--kv-heads-per-layer", "3"]) == 2
    assert "--kv-heads-per-layer must be in [1, 2]" in capsys.readouterr().err
    assert main(["heads", model, "--out", str(tmp_path / "x"), "--kv-heads-per-layer", "1", "--count", "5"]) == 2
    err = capsys.readouterr().err
    assert "allows at most 4" in err and "fix: leave out --ratio/--count" in err


def test_user_errors_exit_2_with_a_message(tmp_path, capsys):
    other = _save_qwen3(tmp_path / "other", layers=3)
    model = _save_qwen3(tmp_path / "model")
    assert main(["heads", model, "--out", str(tmp_path / "h"), "--probe-tokens", "50"]) == 2
    assert "shorter than needed" in capsys.readouterr().err
    assert main(["heads", model, "--out", str(tmp_path / "h"), "--count", "1", "--probe-tokens", "240",
                 "--num-probes", "1", "--needle-tokens", "24"]) == 0
    assert main(["train-indexer", other, "--heads", str(tmp_path / "h"), "--out", str(tmp_path / "t")]) == 2
    assert "made for a different model" in capsys.readouterr().err
    (tmp_path / "gpt2").mkdir()
    GPT2Config().save_pretrained(tmp_path / "gpt2")
    assert main(["heads", str(tmp_path / "gpt2"), "--out", str(tmp_path / "g")]) == 2
    assert "'gpt2' is not supported" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main(["heads", model, "--out", str(tmp_path / "file" / "x")]) == 2
    assert "not writable" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["heads", model, "--out", "x", "--ratio", "0.1", "--count", "3"])      # mutually exclusive


def test_help_is_instant_and_complete():
    code = ("import sys; from rtpurbo_vllm.calibration.cli import build_parser; build_parser(); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert list(sub.choices) == list(COMMANDS) == ["heads", "train-indexer", "evaluate", "export", "synthesize"]
    for name, subparser in sub.choices.items():
        assert subparser.epilog
        for action in subparser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, (name, action.dest)
                assert action.metavar or action.nargs == 0, (name, action.dest)
    assert "(default 600)" in sub.choices["train-indexer"].format_help()
