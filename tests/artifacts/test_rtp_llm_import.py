"""Import of RTP-LLM's ``headwise_config`` from a model's config.json."""

import json
import logging

import pytest
import torch
import transformers

from rtpurbo_vllm.artifacts import (
    ArtifactError,
    SparsityParams,
    import_rtp_llm_headwise,
    load_artifact,
    save_artifact,
)

NUM_LAYERS, NUM_HEADS, NUM_KV_HEADS = 3, 8, 2


def random_masks():
    """One random 0/1 list over ALL query heads per layer."""
    return [torch.randint(0, 2, (NUM_HEADS,)).tolist() for _ in range(NUM_LAYERS)]


def rtp_config_json(masks, **settings):
    """An RTP-LLM model config.json (as a dict): a real Qwen3 config plus ``headwise_config``."""
    config = transformers.Qwen3Config(
        num_hidden_layers=NUM_LAYERS, num_attention_heads=NUM_HEADS, num_key_value_heads=NUM_KV_HEADS, head_dim=16,
        hidden_size=64, intermediate_size=128, vocab_size=256, architectures=["Qwen3ForCausalLM"]).to_dict()
    config["headwise_config"] = {**settings, **{str(i): m for i, m in enumerate(masks) if m is not None}}
    return config


def test_import_from_dict(seed):
    masks = random_masks()
    artifact = import_rtp_llm_headwise(rtp_config_json(masks, sink_token_num=2, swa_token_num=4096,
                                                       seqlen_threshold=32768))
    assert artifact.retrieval_heads == tuple(tuple(h for h, f in enumerate(m) if f) for m in masks)
    # RTP-LLM's window counts the keys before the query; ours includes the query.
    assert artifact.params == SparsityParams(sink_tokens=2, window=4097, dense_threshold=32768)
    assert not artifact.has_indexer and artifact.indexer is None
    assert artifact.model.num_layers == NUM_LAYERS and artifact.model.architecture == "Qwen3ForCausalLM"
    assert artifact.provenance.extra["swa_token_num"] == 4096


def test_defaults_follow_rtp_llm(seed):
    params = import_rtp_llm_headwise(rtp_config_json(random_masks())).params
    assert (params.sink_tokens, params.window, params.dense_threshold) == (4, 8193, 16384)


@pytest.mark.parametrize("as_folder", [False, True], ids=["config.json", "model-folder"])
def test_import_from_path_and_round_trip(tmp_path, seed, as_folder):
    masks = random_masks()
    (tmp_path / "config.json").write_text(json.dumps(rtp_config_json(masks)))
    artifact = import_rtp_llm_headwise(tmp_path if as_folder else tmp_path / "config.json")
    assert artifact.provenance.data == str(tmp_path / "config.json")
    folder = save_artifact(artifact, tmp_path / "rtpurbo")
    assert load_artifact(folder, require_indexer=False) == artifact


def test_explicit_hf_config(seed):
    masks = random_masks()
    full = rtp_config_json(masks)
    hf_config = transformers.Qwen3Config(**{k: v for k, v in full.items() if k != "headwise_config"})
    artifact = import_rtp_llm_headwise({"headwise_config": full["headwise_config"]}, hf_config=hf_config)
    assert artifact.layout.num_heads == NUM_HEADS


def test_missing_layer_means_all_retrieval_with_warning(seed, caplog):
    masks = random_masks()
    masks[1] = None
    with caplog.at_level(logging.WARNING, logger="rtpurbo_vllm.artifacts.rtp_llm"):
        artifact = import_rtp_llm_headwise(rtp_config_json(masks))
    assert artifact.retrieval_heads[1] == tuple(range(NUM_HEADS))
    assert "no entry for layers [1]" in caplog.text
    assert artifact.provenance.extra["layers_missing_in_source"] == [1]


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_global_lists_are_tp_agnostic(seed, tp_size):
    """Each rank's heads equal RTP-LLM's slice ``flags[head_num*rank : head_num*(rank+1)]``."""
    masks = random_masks()
    layout = import_rtp_llm_headwise(rtp_config_json(masks)).layout
    per_rank = NUM_HEADS // tp_size
    for rank in range(tp_size):
        local = layout.for_rank(rank, tp_size)
        for layer, mask in enumerate(masks):
            rank_flags = mask[per_rank * rank: per_rank * (rank + 1)]
            assert local.retrieval_heads[layer] == tuple(h for h, f in enumerate(rank_flags) if f)


def test_per_rank_list_is_refused(seed):
    masks = random_masks()
    masks[2] = masks[2][: NUM_HEADS // 2]
    with pytest.raises(ArtifactError, match=r"\['2'\] has 4 flags but the model has 8 query heads per layer; "
                                            r"4 looks like one rank's slice of a 2-way tensor-parallel split.*"
                                            r"fix: .*ALL query heads"):
        import_rtp_llm_headwise(rtp_config_json(masks))


@pytest.mark.parametrize("flags", [[0, 2] + [0] * (NUM_HEADS - 2), "01010101", [0.5] * NUM_HEADS],
                         ids=["value-2", "string", "fraction"])
def test_flags_must_be_zero_or_one(seed, flags):
    masks = random_masks()
    masks[0] = flags
    with pytest.raises(ArtifactError, match=r"\['0'\] must be a list of 0/1 flags.*fix:"):
        import_rtp_llm_headwise(rtp_config_json(masks))


def test_layer_beyond_model_is_refused(seed):
    config = rtp_config_json(random_masks())
    config["headwise_config"][str(NUM_LAYERS)] = [1] * NUM_HEADS
    with pytest.raises(ArtifactError, match=r"has layers \['3'\] but the model has 3 layers.*fix:"):
        import_rtp_llm_headwise(config)


def test_unknown_key_is_ignored_with_warning(seed, caplog):
    config = rtp_config_json(random_masks())
    config["headwise_config"]["note"] = "v1"
    with caplog.at_level(logging.WARNING, logger="rtpurbo_vllm.artifacts.rtp_llm"):
        import_rtp_llm_headwise(config)
    assert "ignoring unknown headwise_config keys ['note']" in caplog.text


@pytest.mark.parametrize("settings, message", [
    (dict(swa_token_num="8192"), "swa_token_num is '8192', expected an integer"),
    (dict(sink_token_num=-1), r"headwise_config.sink_token_num is -1, but sink_tokens = sink_token_num must be in \[0, "),
    (dict(seqlen_threshold=-5), "headwise_config.seqlen_threshold is -5, but dense_threshold = seqlen_threshold"),
    (dict(swa_token_num=-1), r"headwise_config.swa_token_num is -1, but window = swa_token_num \+ 1 must be in \[1, "),
    (dict(swa_token_num=10**30), "headwise_config.swa_token_num is 1000000000000000000000000000000, but window"),
    (dict(sink_token_num=2**63), "headwise_config.sink_token_num is 9223372036854775808"),
], ids=["not-int", "negative-sink", "negative-threshold", "negative-window", "huge-window", "sink-beyond-int64"])
def test_bad_settings(seed, settings, message):
    with pytest.raises(ArtifactError, match=message):
        import_rtp_llm_headwise(rtp_config_json(random_masks(), **settings))


def test_bad_settings_never_name_a_file_the_user_did_not_give(seed, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(rtp_config_json(random_masks(), swa_token_num=-1)))
    with pytest.raises(ArtifactError) as info:
        import_rtp_llm_headwise(path)
    assert str(info.value).startswith(f"{path}: headwise_config.swa_token_num is -1")
    assert "rtpurbo_config.json" not in str(info.value)


def _with(key, value):
    def edit(config):
        config[key] = value
    return edit


def _int_layer_key(config):
    config["headwise_config"][0] = config["headwise_config"].pop("0")


@pytest.mark.parametrize("edit, message", [
    (_with("num_attention_heads", 0), "num_attention_heads is 0, must be positive"),
    (_with("num_attention_heads", "eight"), "cannot build a transformers config .*num_attention_heads"),
    (_with("num_key_value_heads", 3), "num_attention_heads=8 is not a multiple of num_key_value_heads=3"),
    (_with("num_hidden_layers", 0), "(?s)cannot build a transformers config .*num_hidden_layers"),
    (_int_layer_key, r"headwise_config has keys \[0\] that are not strings"),
], ids=["no-heads", "heads-a-string", "kv-not-dividing", "no-layers", "int-layer-key"])
def test_bad_model_config_is_an_artifact_error_naming_the_field(seed, edit, message):
    config = rtp_config_json(random_masks())
    edit(config)
    with pytest.raises(ArtifactError, match=message) as info:
        import_rtp_llm_headwise(config)
    assert str(info.value).startswith("the given config dict: ") or "cannot build" in str(info.value)
    assert "fix:" in str(info.value)


def test_no_headwise_config(seed):
    config = rtp_config_json(random_masks())
    del config["headwise_config"]
    with pytest.raises(ArtifactError, match="has no 'headwise_config' object; fix:"):
        import_rtp_llm_headwise(config)


def test_unusable_model_config(seed):
    config = {"headwise_config": rtp_config_json(random_masks())["headwise_config"]}
    with pytest.raises(ArtifactError, match="cannot build a transformers config.*fix: pass hf_config"):
        import_rtp_llm_headwise(config)
