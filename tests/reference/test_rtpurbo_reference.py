"""rtpurbo_prefill_ref / rtpurbo_decode_ref: one layer of RTPurbo attention against independent masks."""

import pytest
import torch
import torch.nn.functional as F

from rtpurbo_vllm.reference import rtpurbo_decode_keep_ref, rtpurbo_decode_ref, rtpurbo_prefill_ref
from rtpurbo_vllm.triton_kernels.block_topp import block_topp_ref

DI = 16

# (sequence lengths, HQ, HKV, D, retrieval heads)
CASES = [
    ([1, 63, 200], 4, 4, 16, [2]),
    ([515, 65, 111], 8, 2, 64, [0, 5]),
    ([200, 1, 515], 5, 1, 16, [1, 3]),
    ([111, 200], 4, 4, 16, []),
]


def _ids(case):
    lengths, hq, hkv, d, heads = case
    return "len{}-HQ{}-HKV{}-D{}-ret{}".format("_".join(map(str, lengths)), hq, hkv, d,
                                               "_".join(map(str, heads)) or "none")


PARAMS = [pytest.param(c, id=_ids(c)) for c in CASES]


def _decode_batch(lengths, hq, hkv, d, heads):
    """Post-RoPE q/k/v, pre-RoPE q/k and indexer weights for one decode step of each sequence."""
    total = sum(lengths)
    cu_k = torch.tensor([0] + lengths).cumsum(0).int()
    q, k, v = torch.randn(len(lengths), hq, d), torch.randn(total, hkv, d), torch.randn(total, hkv, d)
    q_pre, k_pre = torch.randn(len(lengths), hq, d), torch.randn(total, hkv, d)
    w_q, w_k = torch.randn(len(heads), DI, d) * d ** -0.5, torch.randn(len(heads), DI, d) * d ** -0.5
    return q, k, v, cu_k, q_pre, k_pre, w_q, w_k


def _sdpa(q, k, v, scale, attn_mask):
    """[Tq, HQ, D] from torch's SDPA, KV heads repeated for GQA; attn_mask [HQ, Tq, Tk] bool."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=attn_mask, scale=scale)
    return out.transpose(0, 1)


def _sink_window(n, sink, window):
    """[n] bool: the keys a decode query at position n - 1 sees on a local head."""
    j = torch.arange(n)
    return (j >= n - window) | (j < sink)


@pytest.mark.parametrize("case", PARAMS)
def test_decode_dense_settings_equal_dense(seed, case):
    lengths, hq, hkv, d, heads = case
    q, k, v, cu_k, q_pre, k_pre, w_q, w_k = _decode_batch(*case)
    out = rtpurbo_decode_ref(q, k, v, cu_k, q_pre, k_pre, heads, w_q, w_k, sink_tokens=4,
                             window=max(lengths), top_p=1.0, block_size=64, dense_threshold=0, scale=d ** -0.5)
    for b, n in enumerate(lengths):
        k0, k1 = cu_k[b], cu_k[b + 1]
        expected = _sdpa(q[b][None], k[k0:k1], v[k0:k1], d ** -0.5, torch.ones(hq, 1, n, dtype=torch.bool))
        torch.testing.assert_close(out[b], expected[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("block_size", [64, 16])
@pytest.mark.parametrize("case", PARAMS)
def test_decode_realistic(seed, case, block_size):
    lengths, hq, hkv, d, heads = case
    sink, window, top_p, threshold = 4, 48, 0.9, 100
    batch = _decode_batch(*case)
    q, k, v, cu_k, q_pre, k_pre, w_q, w_k = batch
    before = [t.clone() for t in batch]
    args = (cu_k, q_pre, k_pre, heads, w_q, w_k, sink, window, top_p, block_size, threshold)
    keep = rtpurbo_decode_keep_ref(*args)
    out = rtpurbo_decode_ref(q, k, v, *args, d ** -0.5)
    assert keep.shape == (hq, sum(lengths)) and out.shape == (len(lengths), hq, d)
    retrieval_dropped = False
    for b, n in enumerate(lengths):
        k0, k1 = cu_k[b], cu_k[b + 1]
        expected = torch.ones(hq, n, dtype=torch.bool)
        if n >= threshold:
            expected[:] = _sink_window(n, sink, window)
            for r, h in enumerate(heads):
                # Indexer scores written out head by head: (W_q q_pre) . (W_k k_pre of h's KV head).
                q_idx = w_q[r] @ q_pre[b, h]
                k_idx = k_pre[k0:k1, h // (hq // hkv)] @ w_k[r].T
                keep_blocks = block_topp_ref((k_idx @ q_idx)[None], top_p, block_size, sink)[0]
                expected[h] = keep_blocks[torch.arange(n) // block_size]
                retrieval_dropped |= not expected[h].all()
        assert torch.equal(keep[:, k0:k1], expected)
        attended = _sdpa(q[b][None], k[k0:k1], v[k0:k1], d ** -0.5, expected[:, None])[0]
        torch.testing.assert_close(out[b], attended, atol=1e-5, rtol=1e-4)
    if heads and max(lengths) >= 8 * block_size:
        assert retrieval_dropped, "top-p kept every block: the case does not exercise the selection"
    for t, t0 in zip(batch, before):
        assert torch.equal(t, t0)


@pytest.mark.parametrize("threshold", [pytest.param(0, id="all-headwise"), pytest.param(100, id="thr100"),
                                       pytest.param(10**9, id="all-dense")])
@pytest.mark.parametrize("case", PARAMS)
def test_decode_matches_prefill_last_position(seed, case, threshold):
    lengths, hq, hkv, d, heads = case
    sink, window = 4, 48
    q, k, v, cu_k, q_pre, k_pre, w_q, w_k = _decode_batch(*case)
    q_all = torch.randn(sum(lengths), hq, d)
    q_all[cu_k[1:].long() - 1] = q  # the decode queries are the prefill's last queries
    prefill = rtpurbo_prefill_ref(q_all, k, v, cu_k, cu_k, heads, sink, window, threshold, d ** -0.5)
    decode = rtpurbo_decode_ref(q, k, v, cu_k, q_pre, k_pre, heads, w_q, w_k, sink, window, top_p=1.0,
                                block_size=64, dense_threshold=threshold, scale=d ** -0.5)
    torch.testing.assert_close(decode, prefill[cu_k[1:].long() - 1], atol=1e-5, rtol=1e-4)


# (history per sequence, new queries per sequence, HQ, HKV, retrieval heads)
PREFILL_CASES = [([0, 0, 0], [63, 200, 1], 4, 4, [2]), ([10, 0, 400], [1, 111, 115], 8, 2, [0, 5]),
                 ([0, 137], [65, 63], 5, 1, [1, 3])]


@pytest.mark.parametrize("case", [pytest.param(c, id="hist{}-new{}-HQ{}-HKV{}".format(
    "_".join(map(str, c[0])), "_".join(map(str, c[1])), *c[2:4])) for c in PREFILL_CASES])
def test_prefill_threshold(seed, case):
    hist, new, hq, hkv, heads = case
    d, sink, window, threshold = 16, 4, 48, 100
    seqlens = [h + n for h, n in zip(hist, new)]
    cu_q = torch.tensor([0] + new).cumsum(0).int()
    cu_k = torch.tensor([0] + seqlens).cumsum(0).int()
    q, k, v = torch.randn(sum(new), hq, d), torch.randn(sum(seqlens), hkv, d), torch.randn(sum(seqlens), hkv, d)
    out = rtpurbo_prefill_ref(q, k, v, cu_q, cu_k, heads, sink, window, threshold, d ** -0.5)
    for b, (h, n) in enumerate(zip(hist, new)):
        i = torch.arange(h, h + n)[:, None]  # absolute query positions
        j = torch.arange(h + n)[None, :]
        causal = j <= i
        local = causal & ((i - j < window) | (j < sink))
        is_retrieval = torch.tensor([x in heads or h + n < threshold for x in range(hq)])
        mask = torch.where(is_retrieval[:, None, None], causal, local)
        expected = _sdpa(q[cu_q[b]:cu_q[b + 1]], k[cu_k[b]:cu_k[b + 1]], v[cu_k[b]:cu_k[b + 1]], d ** -0.5, mask)
        torch.testing.assert_close(out[cu_q[b]:cu_q[b + 1]], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("heads, num_weights", [pytest.param([1, 1], 2, id="duplicate"),
                                                pytest.param([4], 1, id="out-of-range"),
                                                pytest.param([0, 2], 1, id="weights-mismatch")])
def test_bad_retrieval_heads(heads, num_weights):
    q, k, v, cu_k, q_pre, k_pre, _, _ = _decode_batch([100], 4, 2, 16, [])
    w = torch.randn(num_weights, DI, 16)
    with pytest.raises(ValueError):
        rtpurbo_decode_ref(q, k, v, cu_k, q_pre, k_pre, heads, w, w, 4, 8, 0.9, 64, 0, 0.25)
    if num_weights == len(heads):
        with pytest.raises(ValueError):
            rtpurbo_prefill_ref(torch.randn(100, 4, 16), k, v, cu_k, cu_k, heads, 4, 8, 0, 0.25)
