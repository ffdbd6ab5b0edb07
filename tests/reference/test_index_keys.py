"""index_project_ref: one matrix-vector product per retrieval head and token."""

import pytest
import torch

from rtpurbo_vllm.triton_kernels.index_keys import index_project_ref


@pytest.mark.parametrize("t, hr, d", [pytest.param(1, 1, 16, id="T1-HR1-D16"),
                                      pytest.param(65, 3, 64, id="T65-HR3-D64")])
def test_index_project(seed, t, hr, d):
    x, w = torch.randn(t, hr, d), torch.randn(hr, 16, d)
    before = (x.clone(), w.clone())
    out = index_project_ref(x, w)
    assert out.shape == (t, hr, 16) and out.dtype == torch.float32
    expected = torch.stack([x[:, h] @ w[h].T for h in range(hr)], dim=1)
    torch.testing.assert_close(out, expected)
    assert torch.equal(x, before[0]) and torch.equal(w, before[1])
    torch.testing.assert_close(index_project_ref(x.bfloat16(), w), index_project_ref(x.bfloat16().float(), w))
