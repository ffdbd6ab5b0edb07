"""`rtpurbo-calibrate` with bad input: a missing model folder, parameters the kernels cannot run, an
unwritable output, an artifact without retrieval heads and damaged checkpoints. Each is a one-line
``error: ...`` with exit code 2, found before the work, with nothing created."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from rtpurbo_vllm.artifacts import ModelFingerprint, RTPurboArtifact, SparsityParams, save_artifact
from rtpurbo_vllm.calibration.cli import main
from tests.calibration.test_cli import _save_qwen3


def _error(capsys, command: str) -> str:
    """The one error line of stderr (after any weight-loading progress bar)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.endswith("\n"), err
    line = err[:-1].split("\n")[-1].split("\r")[-1]
    assert line.startswith(f"rtpurbo-calibrate {command}: error: "), err
    return line


@pytest.mark.parametrize("model", ["missing", "Qwen/Qwen3-8B", "a-file"], ids=["missing", "hub-id", "a-file"])
def test_a_model_that_is_not_a_local_folder(tmp_path, capsys, monkeypatch, model):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "a-file").write_text("")
    (tmp_path / "heads.json").write_text("{}")
    commands = {
        "heads": ["--out", "h"],
        "train-indexer": ["--heads", "heads.json", "--out", "t"],
        "export": ["--heads", "heads.json", "--indexer", "t"],
        "evaluate": ["--artifact", "a", "--out", "e"],
        "synthesize": ["--out", "s"],
    }
    for command, args in commands.items():
        assert main([command, model, *args]) == 2
        err = _error(capsys, command)
        assert f"model folder {model} " in err and ("does not exist" in err or "is not a folder" in err)
        assert "never downloaded" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "heads.json"]


@pytest.mark.parametrize("option, value, message", [
    ("--block-size", "48", "--block-size is 48, must be a power of two in [1, 1024]"),
    ("--block-size", str(2**40), "--block-size is 1099511627776, must be a power of two"),
    ("--window", str(2**63), "--window is 9223372036854775808, must be in [1, 2147483647]"),
    ("--sink-tokens", str(2**63), "--sink-tokens is 9223372036854775808, must be in [0, 2147483647]"),
    ("--dense-threshold", "-1", "--dense-threshold is -1, must be in [0, 2147483647]"),
    ("--top-p", "nan", "--top-p is nan, must be in (0, 1]"),
    ("--prefill-top-p", "0", "--prefill-top-p is 0.0, must be in (0, 1] (1 = dense retrieval prefill); fix:"),
    ("--prefill-top-p", "1.5", "--prefill-top-p is 1.5, must be in (0, 1]"),
], ids=["block-48", "block-huge", "window-beyond-int64", "sink-beyond-int64", "threshold-negative", "top-p-nan",
        "prefill-top-p-zero", "prefill-top-p-above-one"])
def test_export_refuses_parameters_the_kernels_cannot_run(tmp_path, capsys, option, value, message):
    """Refused before the model, heads or checkpoint are even read."""
    args = [str(tmp_path / "no-model"), "--heads", "no-heads", "--indexer", "no-ckpt", option, value]
    assert main(["export", *args]) == 2
    assert message in _error(capsys, "export")
    assert main(["synthesize", str(tmp_path / "no-model"), option, value]) == 2
    assert message in _error(capsys, "synthesize")
    assert list(tmp_path.iterdir()) == []


def test_train_indexer_refuses_an_index_dim_the_kernels_cannot_run(tmp_path, capsys):
    assert main(["train-indexer", str(tmp_path / "m"), "--heads", "h", "--out", str(tmp_path / "t"),
                 "--index-dim", "12"]) == 2
    assert "--index-dim is 12, must be a power of two in [16, 256]" in _error(capsys, "train-indexer")
    assert list(tmp_path.iterdir()) == []


def test_evaluate_checks_its_output_and_the_retrieval_heads_first(tmp_path, capsys):
    from transformers import AutoConfig

    model = _save_qwen3(tmp_path / "qwen3")
    config = AutoConfig.from_pretrained(model)
    fingerprint = ModelFingerprint.from_hf_config(config)
    empty = torch.zeros(0, 16, fingerprint.head_dim)
    artifact = RTPurboArtifact(fingerprint, ((), ()), SparsityParams(), indexer=((empty, empty), (empty, empty)))
    folder = save_artifact(artifact, tmp_path / "no-retrieval")
    (tmp_path / "file").write_text("")
    assert main(["evaluate", model, "--artifact", str(folder), "--out", str(tmp_path / "file" / "eval")]) == 2
    assert f"output folder {tmp_path / 'file' / 'eval'} is not writable" in _error(capsys, "evaluate")
    assert main(["evaluate", model, "--artifact", str(folder), "--out", str(tmp_path / "eval")]) == 2
    assert "the artifact has no retrieval heads" in _error(capsys, "evaluate")
    assert not (tmp_path / "eval").exists()


def _damage_tensors(name):
    def damage(ckpt):
        tensors = load_file(ckpt / "state.safetensors")
        del tensors[name]
        save_file(tensors, ckpt / "state.safetensors")
    return damage


def _edit_state(edit):
    def damage(ckpt):
        state = json.loads((ckpt / "state.json").read_text())
        edit(state)
        (ckpt / "state.json").write_text(json.dumps(state))
    return damage


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model, its heads file and a two-step indexer checkpoint folder."""
    root = tmp_path_factory.mktemp("trained")
    model = _save_qwen3(root / "qwen3")
    heads = root / "heads.json"
    fingerprint = ModelFingerprint.from_hf_config(__import__("transformers").AutoConfig.from_pretrained(model))
    heads.write_text(json.dumps({"format": "rtpurbo-heads", "format_version": 1, "model": fingerprint.to_dict(),
                                 "retrieval_heads": [[0], [1, 2]], "scores": [[0.0] * 4, [0.0] * 4],
                                 "settings": {}}))
    assert main(["train-indexer", model, "--heads", str(heads), "--out", str(root / "ckpt"), "--steps", "2",
                 "--warmup-steps", "1", "--seq-len", "96", "--queries-per-seq", "4", "--no-progress"]) == 0
    return model, heads, root / "ckpt"


@pytest.mark.parametrize("damage, message", [
    (_damage_tensors("optim.layers.1.w_k.exp_avg_sq"), r"state.safetensors lacks ['optim.layers.1.w_k.exp_avg_sq']"),
    (_damage_tensors("layers.0.w_q"), "state.safetensors lacks ['layers.0.w_q'"),
    (_edit_state(lambda s: s.__setitem__("losses", [])), "state.json holds 0 losses for step 2"),
    (_edit_state(lambda s: s.pop("losses")), "state.json has no list 'losses'"),
    (_edit_state(lambda s: s["config"].pop("index_dim")), "state.json config lacks ['index_dim']"),
], ids=["no-optimizer-moment", "no-weights", "empty-loss-history", "no-loss-history", "no-index-dim"])
def test_damaged_checkpoint(trained, tmp_path, capsys, damage, message):
    import shutil

    model, heads, ckpt = trained
    out = tmp_path / "ckpt"
    shutil.copytree(ckpt, out)
    (step,) = out.iterdir()
    damage(step)
    assert main(["train-indexer", model, "--heads", str(heads), "--out", str(out), "--resume", "--steps", "3",
                 "--warmup-steps", "1", "--seq-len", "96", "--queries-per-seq", "4", "--no-progress"]) == 2
    err = _error(capsys, "train-indexer")
    assert f"the indexer checkpoint {step} is damaged: {message}" in err and "fix:" in err
    assert main(["export", model, "--heads", str(heads), "--indexer", str(out), "--out", str(tmp_path / "a")]) == 2
    assert message in _error(capsys, "export")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
