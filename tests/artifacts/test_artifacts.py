"""Artifact format: round trip, one test per validation failure, atomic writes, folder lookup."""

import json
import math
import os
from pathlib import Path
from dataclasses import replace

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import rtpurbo_vllm.artifacts.io as artifact_io
from rtpurbo_vllm.artifacts import (
    CONFIG_FILE,
    DEFAULT_DIRNAME,
    INDEXER_FILE,
    ArtifactError,
    ModelFingerprint,
    Provenance,
    RTPurboArtifact,
    SparsityParams,
    find_artifact_dir,
    load_artifact,
    save_artifact,
)

NUM_LAYERS, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, INDEX_DIM = 4, 8, 2, 16, 16


def qwen3_config(**overrides):
    kwargs = dict(num_hidden_layers=NUM_LAYERS, num_attention_heads=NUM_HEADS, num_key_value_heads=NUM_KV_HEADS,
                  head_dim=HEAD_DIM, hidden_size=64, intermediate_size=128, vocab_size=256,
                  architectures=["Qwen3ForCausalLM"])
    return transformers.Qwen3Config(**{**kwargs, **overrides})


def llama3_scaled_config():
    return transformers.LlamaConfig(
        num_hidden_layers=NUM_LAYERS, num_attention_heads=NUM_HEADS, num_key_value_heads=NUM_KV_HEADS,
        hidden_size=NUM_HEADS * HEAD_DIM, intermediate_size=128, vocab_size=256, architectures=["LlamaForCausalLM"],
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})


def random_artifact(hf_config, dtype=torch.float32, with_indexer=True) -> RTPurboArtifact:
    """Random retrieval heads (layer 0 has none, so zero-row tensors are covered) and random weights."""
    model = ModelFingerprint.from_hf_config(hf_config)
    heads = [()] + [tuple(sorted(torch.randperm(model.num_heads)[:int(torch.randint(1, model.num_heads + 1, ()))]
                                 .tolist())) for _ in range(model.num_layers - 1)]
    indexer = tuple((torch.randn(len(h), INDEX_DIM, model.head_dim).to(dtype),
                     torch.randn(len(h), INDEX_DIM, model.head_dim).to(dtype)) for h in heads)
    return RTPurboArtifact(
        model=model, retrieval_heads=heads,
        params=SparsityParams(sink_tokens=4, window=512, top_p=0.85, prefill_top_p=0.95, block_size=64,
                              index_dim=INDEX_DIM, dense_threshold=1024),
        provenance=Provenance(data="fineweb-sample", steps=600, seed=int(torch.randint(0, 2**31, ())),
                              tool="test", tool_version="0", extra={"lr": 1e-3, "scores": [0.5, 0.25]}),
        indexer=indexer if with_indexer else None)


@pytest.fixture
def saved(tmp_path, seed):
    """A valid artifact saved under ``tmp_path/model/rtpurbo``; returns (artifact, folder)."""
    artifact = random_artifact(qwen3_config())
    return artifact, save_artifact(artifact, tmp_path / "model" / DEFAULT_DIRNAME)


def edit_config(folder, edit):
    path = folder / CONFIG_FILE
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def edit_tensors(folder, edit):
    path = folder / INDEXER_FILE
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------
# Round trip
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("make_config", [qwen3_config, llama3_scaled_config], ids=["qwen3", "llama3-scaled-rope"])
def test_round_trip(tmp_path, seed, dtype, make_config):
    hf_config = make_config()
    artifact = random_artifact(hf_config, dtype)
    folder = save_artifact(artifact, tmp_path / DEFAULT_DIRNAME)
    assert listing(folder) == [INDEXER_FILE, CONFIG_FILE]
    assert listing(tmp_path) == [DEFAULT_DIRNAME]  # no staging leftovers
    loaded = load_artifact(folder, hf_config=hf_config)
    assert loaded == artifact
    assert loaded.indexer[1][0].dtype == dtype and loaded.indexer[0][0].shape == (0, INDEX_DIM, HEAD_DIM)
    assert loaded.layout == artifact.layout
    assert loaded.model.rope == ModelFingerprint.from_hf_config(hf_config).rope


def test_round_trip_without_indexer(tmp_path, seed):
    artifact = random_artifact(qwen3_config(), with_indexer=False)
    folder = save_artifact(artifact, tmp_path / DEFAULT_DIRNAME)
    assert listing(folder) == [CONFIG_FILE]
    assert load_artifact(folder, require_indexer=False) == artifact
    with pytest.raises(ArtifactError, match="has no indexer.*require_indexer=False"):
        load_artifact(folder)


def test_config_json_is_readable(saved):
    artifact, folder = saved
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["format_version"] == 1 and config["has_indexer"] is True
    assert config["retrieval_heads"] == [list(h) for h in artifact.retrieval_heads]
    assert config["model"]["rope"] == artifact.model.rope.to_dict()


@pytest.mark.parametrize("params", [SparsityParams(sink_tokens=0), SparsityParams(dense_threshold=0),
                                    SparsityParams(top_p=1.0), SparsityParams(prefill_top_p=0.01)],
                         ids=["no-sinks", "always-sparse", "top_p=1", "prefill_top_p=0.01"])
def test_boundary_params_are_accepted(tmp_path, seed, params):
    artifact = RTPurboArtifact(ModelFingerprint.from_hf_config(qwen3_config()), [()] * NUM_LAYERS, params)
    assert load_artifact(save_artifact(artifact, tmp_path / "a"), require_indexer=False).params == params


def test_an_artifact_written_before_prefill_top_p_loads_with_its_default(saved):
    """Keys added after format 1 (``ADDED_AFTER_FORMAT_1``) may be missing; the field keeps its default."""
    artifact, folder = saved
    edit_config(folder, _del("params", "prefill_top_p"))
    loaded = load_artifact(folder)
    assert loaded.params.prefill_top_p == SparsityParams.prefill_top_p == 1.0
    assert loaded == replace(artifact, params=replace(artifact.params, prefill_top_p=1.0))


def test_the_committed_tiny_artifacts_carry_prefill_top_p():
    from rtpurbo_vllm.tiny import tiny_kv1_artifact_dir, tiny_model_dir

    for folder in (tiny_model_dir() / DEFAULT_DIRNAME, tiny_kv1_artifact_dir()):
        assert json.loads((folder / CONFIG_FILE).read_text())["params"]["prefill_top_p"] == 1.0
        assert load_artifact(folder).params.prefill_top_p == 1.0


# ---------------------------------------------------------------------------------------------
# One test per failure kind (loading)
# ---------------------------------------------------------------------------------------------
def _set(section, key, value):
    return lambda c: (c[section] if section else c).__setitem__(key, value)


def _del(section, key):
    return lambda c: (c[section] if section else c).pop(key)


def _heads(layer, heads):
    return lambda c: c["retrieval_heads"].__setitem__(layer, heads)


CONFIG_FAILURES = [
    ("format-version-newer", _set(None, "format_version", 2), "unknown format_version 2.*upgrade"),
    ("format-version-unknown", _set(None, "format_version", "1"), "unknown format_version '1'"),
    ("missing-top-level-key", _del(None, "params"), r"the top level lacks the keys \['params'\]"),
    ("missing-model-key", _del("model", "head_dim"), r"model lacks the keys \['head_dim'\]"),
    ("missing-provenance-key", _del("provenance", "seed"), r"provenance lacks the keys \['seed'\]"),
    ("missing-params-key", _del("params", "top_p"), r"params lacks the keys \['top_p'\]"),
    ("unknown-top-level-key", _set(None, "heads", []), r"the top level has unknown keys \['heads'\]"),
    ("unknown-params-key", _set("params", "top_k", 4), r"params has unknown keys \['top_k'\]"),
    ("wrong-type-int", _set("params", "window", "8192"), "params.window is '8192' .*expected an integer"),
    ("wrong-type-bool-for-int", _set("params", "block_size", True), "params.block_size is True"),
    ("wrong-type-bool", _set(None, "has_indexer", "yes"), "has_indexer is 'yes'"),
    ("wrong-type-section", _set(None, "params", [4, 8192]), "params is .*expected a JSON object"),
    ("wrong-type-layer", _heads(1, 3), r"retrieval_heads\[1\] is 3 .*expected a list"),
    ("bad-rope", _set("model", "rope", {"base": 1.0}), "model.rope .* not a valid RoPE"),
    ("non-positive-size", _set("model", "head_dim", 0), "model.head_dim is 0, must be positive"),
    ("heads-not-multiple-of-kv", _set("model", "num_kv_heads", 3), "num_heads=8 is not a multiple of.*=3"),
    ("layer-count", lambda c: c["retrieval_heads"].append([]), "retrieval_heads has 5 layers but model.num_layers is 4"),
    ("head-out-of-range", _heads(2, [1, NUM_HEADS]), r"head ids \[8\] out of range \[0, 8\)"),
    ("head-negative", _heads(2, [-1, 1]), r"head ids \[-1\] out of range"),
    ("head-duplicate", _heads(2, [1, 1]), "duplicate head ids"),
    ("head-unsorted", _heads(2, [5, 1]), "is not sorted"),
    ("head-not-int", _heads(2, [1.0]), "non-integer head id"),
    ("top-p-zero", _set("params", "top_p", 0), r"params.top_p is 0, must be in \(0, 1\]"),
    ("top-p-above-one", _set("params", "top_p", 1.5), r"params.top_p is 1.5, must be in \(0, 1\]"),
    ("top-p-nan", _set("params", "top_p", math.nan), r"params.top_p is nan, must be in \(0, 1\]"),
    ("prefill-top-p-zero", _set("params", "prefill_top_p", 0), r"params.prefill_top_p is 0, must be in \(0, 1\]"),
    ("prefill-top-p-above-one", _set("params", "prefill_top_p", 1.01), r"params.prefill_top_p is 1.01, must be in"),
    ("prefill-top-p-string", _set("params", "prefill_top_p", "0.9"),
     "params.prefill_top_p is '0.9' .*expected a number"),
    ("window-zero", _set("params", "window", 0), r"params.window is 0, must be in \[1, 2147483647\]"),
    ("window-beyond-int64", _set("params", "window", 2**63), r"params.window is 9223372036854775808, must be in"),
    ("block-size-negative", _set("params", "block_size", -64), "params.block_size is -64, must be a power of two"),
    ("block-size-48", _set("params", "block_size", 48), r"params.block_size is 48, must be a power of two in \[1, 1024\]"),
    ("block-size-huge", _set("params", "block_size", 2**40), "params.block_size is 1099511627776, must be a power"),
    ("index-dim-zero", _set("params", "index_dim", 0), r"params.index_dim is 0, must be a power of two in \[16, 256\]"),
    ("index-dim-8", _set("params", "index_dim", 8), "params.index_dim is 8, must be a power of two"),
    ("index-dim-24", _set("params", "index_dim", 24), "params.index_dim is 24, must be a power of two"),
    ("sink-negative", _set("params", "sink_tokens", -1), r"params.sink_tokens is -1, must be in \[0, 2147483647\]"),
    ("sink-beyond-int64", _set("params", "sink_tokens", 2**63), "params.sink_tokens is 9223372036854775808"),
    ("dense-threshold-negative", _set("params", "dense_threshold", -1), "params.dense_threshold is -1, must be in"),
    ("dense-threshold-beyond-int64", _set("params", "dense_threshold", 2**64), "params.dense_threshold is 18446744073709551616"),
]


@pytest.mark.parametrize("edit, message", [c[1:] for c in CONFIG_FAILURES], ids=[c[0] for c in CONFIG_FAILURES])
def test_config_failure(saved, edit, message):
    _, folder = saved
    edit_config(folder, edit)
    with pytest.raises(ArtifactError, match=message) as err:
        load_artifact(folder)
    assert "fix:" in str(err.value)


def _set_tensor(name, make):
    return lambda t: t.__setitem__(name, make(t))


TENSOR_FAILURES = [
    ("missing-tensor", lambda t: t.pop("layers.2.w_k"), r"missing tensors \['layers.2.w_k'\]"),
    ("extra-tensor", _set_tensor("layers.4.w_q", lambda t: t["layers.1.w_q"].clone()), r"unexpected tensors \['layers.4.w_q'\]"),
    ("wrong-shape", _set_tensor("layers.1.w_q", lambda t: t["layers.1.w_q"][..., :-1].contiguous()),
     "layers.1.w_q has shape .*expected"),
    ("wrong-index-dim", _set_tensor("layers.0.w_k", lambda t: torch.zeros(0, INDEX_DIM + 1, HEAD_DIM)),
     "layers.0.w_k has shape"),
    ("dtype-float64", _set_tensor("layers.3.w_k", lambda t: t["layers.3.w_k"].double()),
     "layers.3.w_k has dtype torch.float64"),
    ("dtype-int", _set_tensor("layers.3.w_q", lambda t: t["layers.3.w_q"].to(torch.int8)), "layers.3.w_q has dtype torch.int8"),
    ("nan", _set_tensor("layers.2.w_q", lambda t: t["layers.2.w_q"].index_fill(1, torch.tensor([0]), math.nan)),
     "layers.2.w_q holds NaN or Inf"),
    ("inf", _set_tensor("layers.3.w_k", lambda t: t["layers.3.w_k"].index_fill(2, torch.tensor([1]), -math.inf)),
     "layers.3.w_k holds NaN or Inf"),
]


@pytest.mark.parametrize("edit, message", [c[1:] for c in TENSOR_FAILURES], ids=[c[0] for c in TENSOR_FAILURES])
def test_tensor_failure(saved, edit, message):
    _, folder = saved
    edit_tensors(folder, edit)
    with pytest.raises(ArtifactError, match=message) as err:
        load_artifact(folder)
    assert "fix:" in str(err.value)


def test_missing_folder(tmp_path):
    with pytest.raises(ArtifactError, match="artifact folder .*does not exist; fix:"):
        load_artifact(tmp_path / "nowhere")


def test_missing_config_file(saved):
    _, folder = saved
    (folder / CONFIG_FILE).unlink()
    with pytest.raises(ArtifactError, match=f"{CONFIG_FILE} is missing; fix:"):
        load_artifact(folder)


def test_missing_indexer_file(saved):
    _, folder = saved
    (folder / INDEXER_FILE).unlink()
    with pytest.raises(ArtifactError, match=f"indexer file .*{INDEXER_FILE} is missing; fix:.*has_indexer is true"):
        load_artifact(folder)


@pytest.mark.parametrize("text, message", [("{not json", "is not readable JSON"), ("[1, 2]", "must hold a JSON object"),
                                           ("\udcff".encode("utf-8", "surrogateescape"), "is not readable JSON")],
                         ids=["syntax", "not-an-object", "not-utf8"])
def test_unreadable_config(saved, text, message):
    _, folder = saved
    path = folder / CONFIG_FILE
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ArtifactError, match=message):
        load_artifact(folder)


def test_unreadable_indexer(saved):
    _, folder = saved
    (folder / INDEXER_FILE).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ArtifactError, match="not a readable safetensors file"):
        load_artifact(folder)


def test_require_indexer_refuses_headwise_only(saved):
    _, folder = saved
    edit_config(folder, _set(None, "has_indexer", False))
    with pytest.raises(ArtifactError, match="has no indexer"):
        load_artifact(folder)
    assert load_artifact(folder, require_indexer=False).indexer is None


MODEL_MISMATCHES = [
    ("layers", dict(num_hidden_layers=NUM_LAYERS + 1), "num_layers: artifact 4, model 5"),
    ("heads", dict(num_attention_heads=16, hidden_size=128), "num_heads: artifact 8, model 16"),
    ("kv-heads", dict(num_key_value_heads=4), "num_kv_heads: artifact 2, model 4"),
    ("head-dim", dict(head_dim=32), "head_dim: artifact 16, model 32"),
    ("rope-theta", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6}), "rope: artifact"),
    ("rope-scaling", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                           "original_max_position_embeddings": 32768}), "rope: artifact"),
    ("architecture", dict(architectures=["Qwen3MoeForCausalLM"]), "architecture: artifact 'Qwen3ForCausalLM'"),
]


@pytest.mark.parametrize("overrides, message", [c[1:] for c in MODEL_MISMATCHES], ids=[c[0] for c in MODEL_MISMATCHES])
def test_model_mismatch(saved, overrides, message):
    _, folder = saved
    with pytest.raises(ArtifactError, match=f"made for a different model .*{message}.*fix:"):
        load_artifact(folder, hf_config=qwen3_config(**overrides))


def test_unsupported_model_rope(saved):
    _, folder = saved
    bad = qwen3_config(rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
                                        "long_factor": [2.0] * 8, "original_max_position_embeddings": 4096})
    with pytest.raises(ArtifactError, match="cannot fingerprint the model.*longrope"):
        load_artifact(folder, hf_config=bad)


# ---------------------------------------------------------------------------------------------
# Saving: validation first, atomic replace
# ---------------------------------------------------------------------------------------------
SAVE_FAILURES = [
    ("bad-param", lambda a: replace(a, params=SparsityParams(top_p=2.0)), "top_p is 2.0"),
    ("numpy-like-int", lambda a: replace(a, params=SparsityParams(window=8192.0)), "params.window is 8192.0"),
    ("extra-not-json", lambda a: replace(a, provenance=Provenance(extra={"f": object()})), "not strict JSON"),
    ("extra-nan", lambda a: replace(a, provenance=Provenance(extra={"loss": math.nan})), "not strict JSON"),
    ("indexer-layer-count", lambda a: replace(a, indexer=a.indexer[:-1]), "missing tensors"),
    ("indexer-not-tensor", lambda a: replace(a, indexer=((a.indexer[0][0], [[0.0]]),) + a.indexer[1:]),
     "layers.0.w_k has dtype list"),
]


@pytest.mark.parametrize("change, message", [c[1:] for c in SAVE_FAILURES], ids=[c[0] for c in SAVE_FAILURES])
def test_save_validates_first(tmp_path, seed, change, message):
    artifact = change(random_artifact(qwen3_config()))
    with pytest.raises(ArtifactError, match=message):
        save_artifact(artifact, tmp_path / DEFAULT_DIRNAME)
    assert listing(tmp_path) == []


def _failing_save_file(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"half a file")
    raise RuntimeError("disk on fire")


def test_failed_write_leaves_nothing(tmp_path, seed, monkeypatch):
    monkeypatch.setattr(artifact_io, "save_file", _failing_save_file)
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_artifact(random_artifact(qwen3_config()), tmp_path / DEFAULT_DIRNAME)
    assert listing(tmp_path) == []


def test_failed_write_keeps_existing_artifact(saved, monkeypatch):
    old, folder = saved
    monkeypatch.setattr(artifact_io, "save_file", _failing_save_file)
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_artifact(random_artifact(qwen3_config()), folder)
    assert listing(folder.parent) == [DEFAULT_DIRNAME]
    assert load_artifact(folder) == old


def test_failed_final_rename_restores_existing_artifact(saved, monkeypatch):
    old, folder = saved
    real_rename = os.rename

    def rename(src, dst):
        if ".partial-" in os.fspath(src):
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(artifact_io.os, "rename", rename)
    with pytest.raises(ArtifactError, match="No space left on device.*nothing was changed; fix:"):
        save_artifact(random_artifact(qwen3_config()), folder)
    monkeypatch.undo()
    assert listing(folder.parent) == [DEFAULT_DIRNAME]
    assert load_artifact(folder) == old


def test_replace_existing_artifact(saved):
    _, folder = saved
    new = random_artifact(qwen3_config(), dtype=torch.bfloat16)
    assert save_artifact(new, folder) == folder
    assert listing(folder.parent) == [DEFAULT_DIRNAME]
    assert load_artifact(folder) == new


def test_a_linked_artifact_folder_is_written_through(saved, tmp_path):
    """``model/rtpurbo -> ../store/v1``: the artifact in store/v1 is replaced, the link stays, nothing is
    left next to either."""
    _, real = saved
    store = tmp_path / "store"
    store.mkdir()
    real.rename(store / "v1")
    link = tmp_path / "model" / DEFAULT_DIRNAME
    link.symlink_to(Path("..") / "store" / "v1", target_is_directory=True)
    new = random_artifact(qwen3_config(), dtype=torch.bfloat16)
    assert save_artifact(new, link) == link
    assert link.is_symlink() and load_artifact(link) == new and load_artifact(store / "v1") == new
    assert listing(tmp_path / "model") == [DEFAULT_DIRNAME] and listing(store) == ["v1"]


def test_a_dangling_link_is_written_through(tmp_path, seed):
    link = tmp_path / "rtpurbo"
    link.symlink_to(tmp_path / "store" / "v2")
    artifact = random_artifact(qwen3_config())
    save_artifact(artifact, link)
    assert link.is_symlink() and load_artifact(tmp_path / "store" / "v2") == artifact


def test_headwise_only_replaces_artifact_with_indexer(saved):
    _, folder = saved
    new = random_artifact(qwen3_config(), with_indexer=False)
    save_artifact(new, folder)
    assert listing(folder) == [CONFIG_FILE]


def test_refuses_to_replace_a_foreign_folder(tmp_path, seed):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ArtifactError, match=r"not part of an RTPurbo artifact \(\['config.json'\]\).*fix:"):
        save_artifact(random_artifact(qwen3_config()), tmp_path)
    assert listing(tmp_path) == ["config.json"]


def test_refuses_to_replace_a_file(tmp_path, seed):
    (tmp_path / DEFAULT_DIRNAME).write_text("x")
    with pytest.raises(ArtifactError, match="exists and is not a folder; fix:"):
        save_artifact(random_artifact(qwen3_config()), tmp_path / DEFAULT_DIRNAME)


def test_output_under_a_file_is_not_writable(tmp_path, seed):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ArtifactError, match="is not a writable folder.*fix: choose a writable output folder"):
        save_artifact(random_artifact(qwen3_config()), tmp_path / "weights.bin" / DEFAULT_DIRNAME)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_output_folder(tmp_path, seed):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(ArtifactError, match="is not a writable folder .*Permission denied.*fix:"):
            save_artifact(random_artifact(qwen3_config()), parent / DEFAULT_DIRNAME)
        assert listing(parent) == []
    finally:
        parent.chmod(0o755)


def test_saved_folder_permissions_follow_umask(saved):
    _, folder = saved
    umask = os.umask(0)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask


# ---------------------------------------------------------------------------------------------
# find_artifact_dir
# ---------------------------------------------------------------------------------------------
def test_find_default_folder(saved):
    _, folder = saved
    assert find_artifact_dir(folder.parent) == folder


def test_find_missing_default_says_how_to_make_one(tmp_path):
    with pytest.raises(ArtifactError, match=f"{DEFAULT_DIRNAME} does not exist; fix: create one with `rtpurbo-calibrate"):
        find_artifact_dir(tmp_path)


def test_find_override_wins(saved, tmp_path):
    _, folder = saved
    other = tmp_path / "elsewhere"
    other.mkdir()
    assert find_artifact_dir(folder.parent, override=other) == other


def test_find_missing_override(saved, tmp_path):
    _, folder = saved
    with pytest.raises(ArtifactError, match="artifact folder .*missing-dir does not exist; fix:"):
        find_artifact_dir(folder.parent, override=tmp_path / "missing-dir")
