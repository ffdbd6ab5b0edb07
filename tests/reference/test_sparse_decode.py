"""sparse_decode_ref and sparse_decode_varlen_ref against torch's SDPA with the same keep mask."""

import pytest
import torch
import torch.nn.functional as F

from rtpurbo_vllm.triton_kernels.sparse_decode import sparse_decode_ref, sparse_decode_varlen_ref

# (T, HQ, HKV, D)
CASES = [(1, 4, 4, 16), (63, 8, 2, 64), (65, 5, 1, 16), (200, 8, 2, 16), (515, 4, 4, 64)]


def _sdpa_decode(q, k, v, scale, attn_mask=None):
    """[HQ, D] from torch's SDPA for one query, KV heads repeated for GQA; attn_mask [HQ, T] bool."""
    group = q.shape[0] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    out = F.scaled_dot_product_attention(q[:, None], k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=None if attn_mask is None else attn_mask[:, None], scale=scale)
    return out[:, 0]


def _random_keep(hq, t):
    keep = torch.rand(hq, t) < 0.3
    keep[:, -1] = True  # every head sees at least its own token
    return keep


@pytest.mark.parametrize("case", [pytest.param(c, id="T{}-HQ{}-HKV{}-D{}".format(*c)) for c in CASES])
def test_sparse_decode(seed, case):
    t, hq, hkv, d = case
    q, k, v = torch.randn(hq, d), torch.randn(t, hkv, d), torch.randn(t, hkv, d)
    scale = d ** -0.5
    out, lse = sparse_decode_ref(q, k, v, torch.ones(hq, t, dtype=torch.bool), scale)
    torch.testing.assert_close(out, _sdpa_decode(q, k, v, scale), atol=1e-5, rtol=1e-4)
    s = torch.einsum("hd,thd->ht", q, k.repeat_interleave(hq // hkv, 1)) * scale
    torch.testing.assert_close(lse, s.logsumexp(-1), atol=1e-5, rtol=1e-5)

    keep = _random_keep(hq, t)
    out, lse = sparse_decode_ref(q, k, v, keep, scale)
    torch.testing.assert_close(out, _sdpa_decode(q, k, v, scale, keep), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lse, s.masked_fill(~keep, float("-inf")).logsumexp(-1), atol=1e-5, rtol=1e-5)


def test_head_keeping_nothing_gives_zero_and_minus_inf(seed):
    q, k, v = torch.randn(4, 16), torch.randn(10, 2, 16), torch.randn(10, 2, 16)
    keep = torch.ones(4, 10, dtype=torch.bool)
    keep[2] = False
    out, lse = sparse_decode_ref(q, k, v, keep, 0.25)
    assert torch.equal(out[2], torch.zeros(16)) and lse[2] == float("-inf")
    assert torch.isfinite(out).all() and torch.isfinite(lse[[0, 1, 3]]).all()


@pytest.mark.parametrize("seqlens, hq, hkv", [pytest.param([1, 200, 63], 8, 2, id="len1_200_63-HQ8-HKV2"),
                                              pytest.param([515, 65], 5, 1, id="len515_65-HQ5-HKV1")])
def test_varlen_equals_per_sequence(seed, seqlens, hq, hkv):
    d, total = 16, sum(seqlens)
    q, k, v = torch.randn(len(seqlens), hq, d), torch.randn(total, hkv, d), torch.randn(total, hkv, d)
    keep = torch.cat([_random_keep(hq, n) for n in seqlens], dim=1)
    cu_k = torch.tensor([0] + seqlens).cumsum(0).int()
    before = [x.clone() for x in (q, k, v, keep)]
    out, lse = sparse_decode_varlen_ref(q, k, v, cu_k, keep, 0.25)
    assert out.dtype == lse.dtype == torch.float32
    for b in range(len(seqlens)):
        k0, k1 = cu_k[b], cu_k[b + 1]
        torch.testing.assert_close(out[b], _sdpa_decode(q[b], k[k0:k1], v[k0:k1], 0.25, keep[:, k0:k1]),
                                   atol=1e-5, rtol=1e-4)
    for x, y in zip((q, k, v, keep), before):
        assert torch.equal(x, y)


def test_bad_keep_shape():
    with pytest.raises(ValueError):
        sparse_decode_ref(torch.randn(4, 16), torch.randn(10, 2, 16), torch.randn(10, 2, 16),
                          torch.ones(4, 9, dtype=torch.bool), 0.25)
