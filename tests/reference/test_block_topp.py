"""index_scores_ref, token_topp_ref, block_topp_ref and expand_block_mask: properties and exact cases."""

import math

import pytest
import torch

from rtpurbo_vllm.triton_kernels.block_topp import (block_topp_ref, expand_block_mask, index_scores_ref,
                                                    token_topp_ref)

TOL = 1e-6  # float32 summation slack on masses

# (HR, T, BS, sink_tokens, top_p, score spread)
BLOCK_CASES = [
    (2, 1, 64, 4, 0.9, 1.0),
    (3, 63, 64, 4, 0.9, 3.0),
    (3, 65, 64, 4, 0.5, 3.0),
    (4, 515, 64, 4, 0.9, 4.0),
    (4, 515, 64, 0, 0.95, 2.0),
    (2, 200, 16, 70, 0.7, 4.0),
    (5, 1111, 64, 4, 0.3, 6.0),
    (2, 200, 1, 4, 0.9, 3.0),
]


def _block_mass(scores, block_size):
    probs = torch.softmax(scores.float(), -1)
    num_blocks = math.ceil(scores.shape[1] / block_size)
    return torch.stack([probs[:, i * block_size:(i + 1) * block_size].sum(-1) for i in range(num_blocks)], -1)


def _check_smallest_set(mass, keep, forced, top_p):
    """keep reaches top_p, holds forced, and no kept non-forced entry could be dropped or swapped."""
    assert keep[forced].all()
    for h in range(mass.shape[0]):
        kept_mass = mass[h][keep[h]].sum()
        assert kept_mass >= top_p - TOL
        optional_kept = mass[h][keep[h] & ~forced[h]]
        dropped = mass[h][~keep[h]]
        if len(optional_kept):
            # Minimal: dropping the lightest optional block falls short of top_p.
            assert kept_mass - optional_kept.min() < top_p + TOL
            # Greedy by mass: nothing dropped outweighs anything optional that was kept.
            if len(dropped):
                assert dropped.max() <= optional_kept.min()


@pytest.mark.parametrize("case", [pytest.param(c, id="HR{}-T{}-BS{}-sink{}-p{}-spread{}".format(*c))
                                  for c in BLOCK_CASES])
def test_block_topp_properties(seed, case):
    hr, t, bs, sink, top_p, spread = case
    scores = torch.randn(hr, t) * spread
    keep = block_topp_ref(scores, top_p, bs, sink)
    num_blocks = math.ceil(t / bs)
    assert keep.shape == (hr, num_blocks) and keep.dtype == torch.bool
    forced = torch.zeros(hr, num_blocks, dtype=torch.bool)
    forced[:, :math.ceil(sink / bs)] = True
    forced[:, -1] = True
    _check_smallest_set(_block_mass(scores, bs), keep, forced, top_p)
    assert torch.equal(block_topp_ref(scores, 1.0, bs, sink), torch.ones(hr, num_blocks, dtype=torch.bool))


@pytest.mark.parametrize("hr, t, top_p, spread", [pytest.param(2, 1, 0.9, 1.0, id="T1"),
                                                  pytest.param(3, 63, 0.9, 3.0, id="T63"),
                                                  pytest.param(4, 515, 0.5, 4.0, id="T515-p0.5"),
                                                  pytest.param(2, 200, 0.99, 1.0, id="T200-p0.99")])
def test_token_topp_properties(seed, hr, t, top_p, spread):
    scores = torch.randn(hr, t) * spread
    keep = token_topp_ref(scores, top_p)
    assert keep.shape == (hr, t) and keep.dtype == torch.bool
    _check_smallest_set(torch.softmax(scores, -1), keep, torch.zeros(hr, t, dtype=torch.bool), top_p)
    assert token_topp_ref(scores, 1.0).all()


def test_top_p_one_keeps_underflowing_tokens():
    scores = torch.tensor([[0.0, -200.0, -1e4, float("-inf")] * 40])  # 160 tokens, most with mass exactly 0
    assert token_topp_ref(scores, 1.0).all()
    assert block_topp_ref(scores, 1.0, 16, 0).all()
    assert not token_topp_ref(scores, 0.999999).all()


def test_ties_are_deterministic():
    # Uniform scores: every block has the same mass; the lower blocks win the ties.
    scores = torch.zeros(2, 512)
    expected = torch.tensor([True, True, True, False, False, False, False, True]).expand(2, 8)
    assert torch.equal(block_topp_ref(scores, 0.5, 64, 4), expected)          # sinks + 1, 2 + last
    assert torch.equal(block_topp_ref(scores, 0.5, 64, 0), expected)          # last + 0, 1, 2
    # Without sinks block 0 is not forced: a light block 0 is left out.
    scores[:, :64] = -30.0
    expected = torch.tensor([False, True, True, True, False, False, False, True]).expand(2, 8)
    assert torch.equal(block_topp_ref(scores, 0.5, 64, 0), expected)          # last + 1, 2, 3
    assert block_topp_ref(scores, 0.5, 64, 1)[:, 0].all()
    assert torch.equal(token_topp_ref(torch.zeros(1, 10), 0.5), torch.arange(10)[None] < 5)
    # Two tied heavy blocks (2 and 5) where only one is needed: the lower one is taken.
    scores = torch.full((1, 8 * 16), -30.0)
    scores[0, 2 * 16:3 * 16] = 0.0
    scores[0, 5 * 16:6 * 16] = 0.0
    assert block_topp_ref(scores, 0.4, 16, 0)[0].nonzero().flatten().tolist() == [2, 7]


def test_partial_last_block_is_forced():
    scores = torch.zeros(1, 65)
    scores[0, :64] = 10.0  # the lone token of block 1 carries almost no mass
    assert block_topp_ref(scores, 0.5, 64, 0).tolist() == [[True, True]]
    assert block_topp_ref(scores[:, :1], 0.5, 64, 0).tolist() == [[True]]


@pytest.mark.parametrize("top_p", [0.0, -0.1, 1.0 + 1e-6, 2.0, float("nan")])
def test_bad_top_p(top_p):
    scores = torch.randn(2, 100)
    with pytest.raises(ValueError):
        block_topp_ref(scores, top_p, 64, 4)
    with pytest.raises(ValueError):
        token_topp_ref(scores, top_p)


def test_inputs_not_modified(seed):
    scores = torch.randn(3, 200)
    before = scores.clone()
    block_topp_ref(scores, 0.9, 64, 4)
    token_topp_ref(scores, 0.9)
    assert torch.equal(scores, before)


@pytest.mark.parametrize("t, bs", [pytest.param(1, 64, id="T1"), pytest.param(64, 64, id="T64"),
                                   pytest.param(65, 64, id="T65"), pytest.param(111, 16, id="T111-BS16")])
def test_expand_block_mask(seed, t, bs):
    keep_blocks = torch.rand(3, math.ceil(t / bs)) < 0.5
    tokens = expand_block_mask(keep_blocks, t, bs)
    assert tokens.shape == (3, t)
    assert torch.equal(tokens, keep_blocks[:, torch.arange(t) // bs])
    with pytest.raises(ValueError):
        expand_block_mask(keep_blocks, t + bs, bs)


def test_index_scores(seed):
    q_idx, k_idx = torch.randn(3, 16), torch.randn(65, 3, 16)
    expected = torch.stack([k_idx[:, h] @ q_idx[h] for h in range(3)])
    torch.testing.assert_close(index_scores_ref(q_idx, k_idx), expected)
    assert index_scores_ref(q_idx.bfloat16(), k_idx.bfloat16()).dtype == torch.float32
