"""Capture of pre-RoPE q/k, probes, head scores (Eq.3) against HF's own attention, selection, heads file."""

import json
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen3Config, Qwen3ForCausalLM
from transformers.models.llama import modeling_llama
from transformers.models.qwen3 import modeling_qwen3

from rtpurbo_vllm.calibration.capture import attention_rows, capture_pre_rope, check_supported, wrap_model
from rtpurbo_vllm.calibration.data import TokenSource
from rtpurbo_vllm.calibration.heads import (
    HeadsFile,
    budget_groups,
    find_heads,
    format_kv_capacity,
    kv_capacity_report,
    probe_scores,
    select_heads,
)
from rtpurbo_vllm.calibration.probes import make_probes, min_probe_tokens
from rtpurbo_vllm.rope import apply_rope
from rtpurbo_vllm.tiny.tokenizer import build_tokenizer

TOK = build_tokenizer()
SIZES = dict(vocab_size=len(TOK), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, initializer_range=0.2,
             bos_token_id=TOK.bos_token_id, eos_token_id=TOK.eos_token_id, pad_token_id=TOK.pad_token_id)
MODELS = {"llama": (LlamaConfig, LlamaForCausalLM, modeling_llama),
          "qwen3": (Qwen3Config, Qwen3ForCausalLM, modeling_qwen3)}


def _model(kind: str, **overrides):
    config_cls, model_cls, _ = MODELS[kind]
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**SIZES, **overrides}))
    model.set_attn_implementation("eager")
    return wrap_model(model, TOK)


@pytest.mark.parametrize("kind", list(MODELS))
def test_pre_rope_capture_matches_what_hf_rotates(kind, monkeypatch):
    lm = _model(kind, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    used = []
    original = MODELS[kind][2].apply_rotary_pos_emb

    def spy(q, k, cos, sin, *args, **kwargs):
        q_rot, k_rot = original(q, k, cos, sin, *args, **kwargs)
        used.append((q_rot[0].transpose(0, 1), k_rot[0].transpose(0, 1)))               # [T, H, D]
        return q_rot, k_rot

    monkeypatch.setattr(MODELS[kind][2], "apply_rotary_pos_emb", spy)
    ids = torch.randint(4, len(TOK), (100,))
    got = {}
    capture_pre_rope(lm, ids, lambda layer, q, k: got.__setitem__(layer, (q.clone(), k.clone())))
    used.clear()                                      # the capture stops before the last layer's RoPE
    lm.model(input_ids=ids[None])
    assert sorted(got) == [0, 1] and len(used) == 2
    pos = torch.arange(100)
    for layer, (q_pre, k_pre) in got.items():
        assert q_pre.shape == (100, 8, 16) and k_pre.shape == (100, 2, 16)
        torch.testing.assert_close(apply_rope(q_pre, pos, lm.rope), used[layer][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(apply_rope(k_pre, pos, lm.rope), used[layer][1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", list(MODELS))
def test_attention_rows_equal_hf_attention(kind):
    lm = _model(kind)
    ids = torch.randint(4, len(TOK), (80,))
    hf = lm.model(input_ids=ids[None], output_attentions=True).attentions                 # L x [1, HQ, T, T]
    pos = torch.tensor([0, 5, 41, 79])
    heads = torch.tensor([1, 6])

    def check(layer, q_pre, k_pre):
        rows = attention_rows(q_pre[pos][:, heads], k_pre, pos, heads, lm)               # [2, 4, T]
        torch.testing.assert_close(rows, hf[layer][0][heads][:, pos], atol=1e-5, rtol=1e-4)

    capture_pre_rope(lm, ids, check)


def test_capture_stops_after_last_requested_layer():
    lm = _model("llama", num_hidden_layers=3)
    seen = []
    capture_pre_rope(lm, torch.randint(4, len(TOK), (20,)), lambda layer, q, k: seen.append(layer), layers=[1])
    assert seen == [1]


def test_unsupported_models_are_refused():
    with pytest.raises(ValueError, match="not supported.*LlamaForCausalLM, MistralForCausalLM"):
        check_supported(type("Cfg", (), {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})())
    with pytest.raises(ValueError, match="sliding-window"):
        check_supported(MistralConfig(sliding_window=4096, architectures=["MistralForCausalLM"]))
    lm = wrap_model(MistralForCausalLM(MistralConfig(**{**SIZES, "sliding_window": None})), TOK)
    assert lm.num_kv_heads == 2


def test_probes_hold_the_needle_twice_and_are_seeded():
    source = TokenSource.create(TOK)
    probes = make_probes(source, 3, 400, seed=7, needle_tokens=32)
    assert probes == make_probes(source, 3, 400, seed=7, needle_tokens=32)
    assert len({tuple(p.ids) for p in probes}) == 3
    for p in probes:
        assert len(p.ids) == 400 and p.ids[0] == TOK.bos_token_id
        assert [p.ids[i] for i in p.first] == [p.ids[i] for i in p.second]
        assert p.first.start == 16 and p.second.stop == 400 - 16
    with pytest.raises(ValueError, match=f"--probe-tokens 100 is shorter than needed.*{min_probe_tokens(32)}"):
        make_probes(source, 1, 100, seed=0, needle_tokens=32)


def test_probes_from_a_text_file(tmp_path):
    words = TOK.convert_ids_to_tokens(list(range(20, 120)))
    rng = random.Random(0)
    (tmp_path / "a.txt").write_text(" ".join(rng.choice(words) for _ in range(3000)))
    source = TokenSource.create(TOK, tmp_path, "train")
    assert "train split" in source.description
    assert all(len(p.ids) == 500 for p in make_probes(source, 2, 500, seed=1))
    with pytest.raises(ValueError, match="shorter than the"):
        make_probes(TokenSource.create(TOK, tmp_path / "a.txt", "heldout"), 1, 500, seed=1)
    with pytest.raises(ValueError, match="does not exist"):
        TokenSource.create(TOK, tmp_path / "missing")


@pytest.mark.parametrize("kind", list(MODELS))
def test_head_scores_equal_brute_force_full_attention(kind):
    lm = _model(kind)
    probe = make_probes(TokenSource.create(TOK), 1, 240, seed=3, needle_tokens=24)[0]
    attn = lm.model(input_ids=torch.tensor(probe.ids)[None], output_attentions=True).attentions
    brute = torch.stack([
        a[0][:, probe.second.start:probe.second.stop, probe.first.start:probe.first.stop].sum(-1).mean(-1)
        for a in attn])                                                                 # [L, HQ]
    torch.testing.assert_close(probe_scores(lm, probe), brute, atol=1e-5, rtol=1e-4)


def test_selection_by_ratio_count_and_kv_group():
    scores = torch.tensor([[0.1, 0.9, 0.2, 0.3], [0.8, 0.0, 0.05, 0.7]])             # L=2, HQ=4, HKV=2
    assert select_heads(scores, 2, count=3) == [[1], [0, 3]]
    assert select_heads(scores, 2, ratio=0.25) == [[1], [0]]                           # round(0.25 * 8) = 2
    assert select_heads(scores, 2, ratio=0.5) == [[1, 3], [0, 3]]
    # Groups: L0 {0,1}:0.9 {2,3}:0.3, L1 {0,1}:0.8 {2,3}:0.7; 3 heads need 2 whole groups.
    assert select_heads(scores, 2, count=3, by_kv_group=True) == [[0, 1], [0, 1]]
    assert select_heads(scores, 2, count=5, by_kv_group=True) == [[0, 1], [0, 1, 2, 3]]
    assert select_heads(torch.zeros(2, 4), 2, count=2) == [[0, 1], []]                 # ties: lower first
    assert select_heads(scores, 2, ratio=0.9, count=1) == [[1], []]                   # count wins
    for bad in ({"ratio": None}, {"ratio": 0.0}, {"ratio": 1.5}, {"count": 0}, {"count": 9}):
        with pytest.raises(ValueError, match="--ratio|--count"):
            select_heads(scores, 2, **bad)


def test_selection_with_a_per_layer_kv_budget():
    # L=3, HQ=4, HKV=2 (groups {0,1}, {2,3}); best per group: L0 0.9 | 0.3, L1 0.8 | 0.7, L2 0.5 | 0.5 (tie).
    scores = torch.tensor([[0.1, 0.9, 0.2, 0.3], [0.8, 0.0, 0.05, 0.7], [0.5, 0.4, 0.1, 0.5]])
    assert budget_groups(scores, 2, 1).tolist() == [[True, False], [True, False], [True, False]]  # tie: lower
    # Alone: every query head of each layer's best group (free: that KV head is kept in full anyway).
    assert select_heads(scores, 2, None, None, kv_heads_per_layer=1) == [[0, 1], [0, 1], [0, 1]]
    assert select_heads(scores, 2, None, None, kv_heads_per_layer=2) == [[0, 1, 2, 3]] * 3
    # With a count: the global ranking restricted to those groups (L1's 0.7 in group 1 is not allowed).
    assert select_heads(scores, 2, count=3, kv_heads_per_layer=1) == [[1], [0], [0]]
    assert select_heads(scores, 2, ratio=0.25, kv_heads_per_layer=1) == [[1], [0], [0]]    # round(0.25 * 12) = 3
    assert select_heads(scores, 2, count=4, kv_heads_per_layer=2) == [[1], [0, 3], [0]]    # = the global top 4
    # With --by-kv-group: whole allowed groups, best first, until the count is met.
    assert select_heads(scores, 2, count=3, by_kv_group=True, kv_heads_per_layer=1) == [[0, 1], [0, 1], []]
    assert select_heads(scores, 2, None, None, by_kv_group=True, kv_heads_per_layer=1) == [[0, 1]] * 3
    # Every layer uses at most N KV heads, whatever the global ranking prefers.
    for n, count in ((1, 6), (2, 12)):
        heads = select_heads(scores, 2, count=count - 1, kv_heads_per_layer=n)
        assert sum(map(len, heads)) == count - 1 and all(len({h // 2 for h in layer}) <= n for layer in heads)
    # GQA ratio 1 (HQ == HKV): a KV group is one query head, so N KV heads = N query heads per layer.
    mha = torch.tensor([[0.3, 0.1, 0.2], [0.0, 0.5, 0.5]])
    assert select_heads(mha, 3, None, None, kv_heads_per_layer=1) == [[0], [1]]
    assert select_heads(mha, 3, None, None, kv_heads_per_layer=2) == [[0, 2], [1, 2]]
    assert select_heads(mha, 3, count=3, kv_heads_per_layer=2) == [[0], [1, 2]]          # 0.5, 0.5, 0.3
    # Errors name the fix.
    for bad in (0, 3):
        with pytest.raises(ValueError, match=r"--kv-heads-per-layer must be in \[1, 2\].*got " + str(bad)):
            select_heads(scores, 2, None, None, kv_heads_per_layer=bad)
    with pytest.raises(ValueError, match=r"--count 7 asks for 7 query heads but --kv-heads-per-layer 1 allows at "
                                         r"most 6 .*fix: leave out --ratio/--count"):
        select_heads(scores, 2, count=7, kv_heads_per_layer=1)
    with pytest.raises(ValueError, match=r"--ratio 0.75 asks for 9"):
        select_heads(scores, 2, ratio=0.75, kv_heads_per_layer=1)
    with pytest.raises(ValueError, match="--ratio"):                         # no budget: a target is needed
        select_heads(scores, 2, None, None)


def test_kv_capacity_prediction_shows_the_trade_off():
    """Llama-3-8B shape (32 layers, 32 query / 8 KV heads, D=128): fewer full KV heads, more capacity."""
    scores = torch.rand(32, 32, generator=torch.Generator().manual_seed(0))
    budget = select_heads(scores, 8, None, None, kv_heads_per_layer=1)
    report = kv_capacity_report(scores, 8, 128, budget, 131072, kv_heads_per_layer=1)
    rows = {r["selection"]: r for r in report["rows"]}
    chosen, global_, two = (rows["selected (1 KV head per layer)"], rows["global top 128 query heads"],
                            rows["--kv-heads-per-layer 2 (all query heads of the groups)"])
    assert (chosen["query_heads"], chosen["full_kv_heads"], chosen["kv_heads"]) == (128, 32, 256)
    assert two["full_kv_heads"] == 64 and global_["full_kv_heads"] > 64
    assert chosen["capacity_ratio"] > 4 > two["capacity_ratio"] > global_["capacity_ratio"] > 1.5
    assert chosen["fp8_capacity_ratio"] > 3.5
    assert report["window"] == 8192 and report["context"] == 131072
    text = format_kv_capacity(report)
    assert "at 131072 tokens" in text and "32/256 full KV heads" in text and f"{chosen['capacity_ratio']:.2f}x" in text


def test_find_heads_writes_outputs_and_heads_file_checks_the_model(tmp_path):
    lm = _model("llama")
    result = find_heads(lm, tmp_path, count=3, probe_tokens=240, num_probes=2, needle_tokens=24)
    assert sum(map(len, result.heads.retrieval_heads)) == 3
    assert {p.name for p in tmp_path.iterdir()} == {"heads.json", "head_scores.json", "head_scores.csv",
                                                    "head_heatmap.png"}
    table = json.loads((tmp_path / "head_scores.json").read_text())
    assert len(table) == 16 and sum(r["retrieval"] for r in table) == 3
    assert sorted(r["rank"] for r in table) == list(range(1, 17))
    assert (tmp_path / "head_scores.csv").read_text().startswith("layer,head,kv_head,score,rank,retrieval\n")
    assert (tmp_path / "head_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    loaded = HeadsFile.load(tmp_path, lm.hf_config)
    assert loaded.retrieval_heads == result.heads.retrieval_heads
    other = _model("qwen3")
    with pytest.raises(ValueError, match="heads file .* was made for a different model"):
        HeadsFile.load(tmp_path / "heads.json", other.hf_config)
    with pytest.raises(ValueError, match="shorter than needed"):
        find_heads(lm, tmp_path, probe_tokens=100)
