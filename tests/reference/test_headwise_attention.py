"""headwise_attention_ref against independent dense attention, a brute-force mask, and chunked prefill."""

import pytest
import torch
import torch.nn.functional as F

from rtpurbo_vllm.triton_kernels.headwise_attention import attention_mask, headwise_attention_ref

# (history per sequence, new queries per sequence, HQ, HKV, D)
CASES = [
    ([0], [1], 4, 4, 16),
    ([0], [63], 8, 2, 64),
    ([0, 0, 0], [65, 111, 1], 5, 1, 16),
    ([10, 0, 137], [1, 200, 63], 8, 2, 16),
    ([0, 452], [515, 63], 4, 4, 64),
]


def _ids(case):
    hist, new, hq, hkv, d = case
    return "hist{}-new{}-HQ{}-HKV{}-D{}".format("_".join(map(str, hist)), "_".join(map(str, new)), hq, hkv, d)


def _batch(hist, new, hq, hkv, d):
    seqlens_k = [h + n for h, n in zip(hist, new)]
    cu_q = torch.tensor([0] + new, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_k = torch.tensor([0] + seqlens_k, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    q = torch.randn(sum(new), hq, d)
    k = torch.randn(sum(seqlens_k), hkv, d)
    v = torch.randn(sum(seqlens_k), hkv, d)
    return q, k, v, cu_q, cu_k


def _sdpa(q, k, v, scale, attn_mask=None, is_causal=False):
    """[Tq, HQ, D] from torch's SDPA with the KV heads repeated for GQA."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    return out.transpose(0, 1)


@pytest.mark.parametrize("case", [pytest.param(c, id=_ids(c)) for c in CASES])
@pytest.mark.parametrize("mode", ["all_retrieval", "wide_window"])
def test_dense_equals_sdpa(seed, case, mode):
    hist, new, hq, hkv, d = case
    q, k, v, cu_q, cu_k = _batch(*case)
    scale = d ** -0.5
    if mode == "all_retrieval":
        retrieval, window = torch.ones(hq, dtype=torch.bool), 1
    else:
        retrieval, window = torch.zeros(hq, dtype=torch.bool), max(h + n for h, n in zip(hist, new))
    out, lse = headwise_attention_ref(q, k, v, cu_q, cu_k, retrieval, 4, window, scale)
    for b, (h, n) in enumerate(zip(hist, new)):
        qs, ks, vs = q[cu_q[b]:cu_q[b + 1]], k[cu_k[b]:cu_k[b + 1]], v[cu_k[b]:cu_k[b + 1]]
        # The full-sequence causal attention's last n rows are the chunk's rows (queries at the end).
        q_full = torch.cat([torch.randn(h, hq, d), qs])
        expected = _sdpa(q_full, ks, vs, scale, is_causal=True)[h:]
        torch.testing.assert_close(out[cu_q[b]:cu_q[b + 1]], expected, atol=1e-5, rtol=1e-4)
        s = torch.einsum("qhd,khd->hqk", q_full, ks.repeat_interleave(hq // hkv, 1)) * scale
        s = s.masked_fill(~torch.ones(h + n, h + n, dtype=torch.bool).tril(), float("-inf"))
        torch.testing.assert_close(lse[cu_q[b]:cu_q[b + 1]], s.logsumexp(-1).T[h:], atol=1e-5, rtol=1e-5)


def _brute_force_mask(seqlen_q, seqlen_k, sink_tokens, window):
    rows = []
    for qi in range(seqlen_q):
        pos = seqlen_k - seqlen_q + qi
        rows.append([j <= pos and (pos - j < window or j < sink_tokens) for j in range(seqlen_k)])
    return torch.tensor(rows, dtype=torch.bool).reshape(seqlen_q, seqlen_k)


# (seqlen_q, seqlen_k, sink_tokens, window)
MASK_CASES = [(1, 1, 4, 1), (63, 63, 4, 16), (5, 111, 0, 8), (65, 200, 4, 64), (1, 200, 70, 1),
              (111, 111, 4, 200), (3, 65, 64, 1)]


@pytest.mark.parametrize("case", [pytest.param(c, id="q{}-k{}-sink{}-win{}".format(*c)) for c in MASK_CASES])
def test_local_mask_brute_force(seed, case):
    seqlen_q, seqlen_k, sink, window = case
    expected = _brute_force_mask(*case)
    assert torch.equal(attention_mask(seqlen_q, seqlen_k, sink, window), expected)
    assert torch.equal(attention_mask(seqlen_q, seqlen_k), _brute_force_mask(seqlen_q, seqlen_k, 0, seqlen_k))
    # Local heads (0 and 2) attend exactly over the brute-force mask, retrieval heads (1 and 3) densely.
    hq, hkv, d = 4, 2, 16
    q, k, v = torch.randn(seqlen_q, hq, d), torch.randn(seqlen_k, hkv, d), torch.randn(seqlen_k, hkv, d)
    cu_q = torch.tensor([0, seqlen_q], dtype=torch.int32)
    cu_k = torch.tensor([0, seqlen_k], dtype=torch.int32)
    retrieval = torch.tensor([False, True, False, True])
    out, _ = headwise_attention_ref(q, k, v, cu_q, cu_k, retrieval, sink, window, 0.3)
    dense = _brute_force_mask(seqlen_q, seqlen_k, 0, seqlen_k)
    expected = _sdpa(q, k, v, 0.3, attn_mask=torch.stack([expected, dense, expected, dense]))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


# (sequence lengths, chunk size, HQ, HKV)
CHUNK_CASES = [([200, 65, 1], 1, 4, 4), ([111, 200], 7, 8, 2), ([515, 63, 111], 64, 5, 1),
               ([515, 200], 100, 8, 2)]


@pytest.mark.parametrize("case", [pytest.param(c, id="len{}-chunk{}-HQ{}-HKV{}".format(
    "_".join(map(str, c[0])), *c[1:])) for c in CHUNK_CASES])
def test_chunked_equals_one_shot(seed, case):
    lengths, chunk, hq, hkv = case
    d, sink, window = 16, 4, 48
    q, k, v, cu_q, cu_k = _batch([0] * len(lengths), lengths, hq, hkv, d)
    retrieval = torch.arange(hq) % 3 == 1
    one_shot, one_shot_lse = headwise_attention_ref(q, k, v, cu_q, cu_k, retrieval, sink, window, 0.25)
    # Each step takes the next chunk of every unfinished sequence; keys grow to the chunk's end.
    outs, lses = [[] for _ in lengths], [[] for _ in lengths]
    for start in range(0, max(lengths), chunk):
        live = [b for b, n in enumerate(lengths) if start < n]
        ends = [min(start + chunk, lengths[b]) for b in live]
        step_q = torch.cat([q[cu_q[b] + start:cu_q[b] + e] for b, e in zip(live, ends)])
        step_k = torch.cat([k[cu_k[b]:cu_k[b] + e] for b, e in zip(live, ends)])
        step_v = torch.cat([v[cu_k[b]:cu_k[b] + e] for b, e in zip(live, ends)])
        step_cu_q = torch.tensor([0] + [e - start for e in ends]).cumsum(0).int()
        step_cu_k = torch.tensor([0] + ends).cumsum(0).int()
        out, lse = headwise_attention_ref(step_q, step_k, step_v, step_cu_q, step_cu_k, retrieval, sink,
                                          window, 0.25)
        for i, b in enumerate(live):
            outs[b].append(out[step_cu_q[i]:step_cu_q[i + 1]])
            lses[b].append(lse[step_cu_q[i]:step_cu_q[i + 1]])
    torch.testing.assert_close(torch.cat([torch.cat(o) for o in outs]), one_shot, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat([torch.cat(x) for x in lses]), one_shot_lse, atol=1e-5, rtol=1e-5)


def test_does_not_modify_inputs(seed):
    q, k, v, cu_q, cu_k = _batch([3, 0], [60, 5], 8, 2, 16)
    before = [t.clone() for t in (q, k, v, cu_q, cu_k)]
    retrieval = torch.tensor([True, False] * 4)
    headwise_attention_ref(q.to(torch.bfloat16), k, v, cu_q, cu_k, retrieval, 4, 8, 0.25)
    headwise_attention_ref(q, k, v, cu_q, cu_k, retrieval, 4, 8, 0.25)
    for t, b in zip((q, k, v, cu_q, cu_k), before):
        assert torch.equal(t, b)


@pytest.mark.parametrize("sink, window", [pytest.param(4, 0, id="window0"), pytest.param(-1, 8, id="sink-1")])
def test_bad_arguments(sink, window):
    q, k, v, cu_q, cu_k = _batch([0], [5], 4, 4, 16)
    with pytest.raises(ValueError):
        headwise_attention_ref(q, k, v, cu_q, cu_k, torch.zeros(4, dtype=torch.bool), sink, window, 0.25)
