"""merge_sinks (Triton) against merge_sinks_ref on fresh random inputs.

Awkward shapes: GQA ratios 1, 3 and 4, a head size that is not a power of two, pages of 2 tokens (the
sinks span pages) and of 48, several sequences with chunked-prefill offsets, a fresh prefill, a
sequence to leave alone (``seqused_k = 0``) and rows that see no sink. Rows outside the merge must be
left bit-identical. Small cases run on the CPU under ``TRITON_INTERPRET=1``; a realistic size is
marked ``gpu``.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

from rtpurbo_vllm.triton_kernels.sink_merge import merge_sinks, merge_sinks_ref  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def make_case(seqlens_q, seqused_k, num_heads, num_kv_heads, head_size, page_size, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    batch = len(seqlens_q)
    max_pages = max(-(-max(seqused_k) // page_size), 1)
    num_pages = batch * max_pages + 3
    table = torch.randperm(num_pages, generator=g)[:batch * max_pages].view(batch, max_pages).int()
    cu = torch.tensor([0, *torch.tensor(seqlens_q).cumsum(0).tolist()], dtype=torch.int32)
    num_tokens = int(cu[-1])
    kv = torch.randn(2, num_pages, page_size, num_kv_heads, head_size, generator=g)
    rand = lambda *shape: torch.randn(*shape, generator=g)                            # noqa: E731
    case = dict(query=rand(num_tokens, num_heads, head_size).to(dtype), key_cache=kv[0].to(dtype),
                value_cache=kv[1].to(dtype), cu_seqlens_q=cu, seqused_k=torch.tensor(seqused_k, dtype=torch.int32),
                block_table=table,
                token_seqs=torch.repeat_interleave(torch.arange(batch), torch.tensor(seqlens_q)),
                out=rand(num_tokens, num_heads, head_size).to(dtype),
                lse=(2 * rand(num_heads, num_tokens) + 3).float())
    return {k: v.to(DEVICE) for k, v in case.items()}


CASES = [  # seqlens_q, seqused_k, HQ, HKV, D, P
    ([5, 1, 30], [40, 17, 30], 8, 2, 16, 2),           # chunks on history, single row, fresh prefill
    ([7, 12, 3], [7, 0, 50], 6, 2, 24, 48),            # seqused 0: left alone; D not a power of two
    ([37], [100], 4, 4, 32, 16),                       # MHA, rows across two program tiles
    ([2, 9], [9, 9], 3, 1, 16, 2),                     # MQA, the whole sequence in the window
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sinks", [1, 4])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"q{c[0]}-k{c[1]}-h{c[2]}x{c[3]}-d{c[4]}-p{c[5]}")
def test_kernel_matches_reference(case, sinks, dtype, seed):
    seqlens_q, seqused_k, hq, hkv, d, p = case
    args = make_case(seqlens_q, seqused_k, hq, hkv, d, p, dtype, seed)
    window, scale = 8, d ** -0.5
    want, got = args["out"].clone(), args["out"].clone()
    merge_sinks_ref(**{**args, "out": want}, sink_tokens=sinks, window=window, scale=scale)
    merge_sinks(**{**args, "out": got}, sink_tokens=sinks, window=window, scale=scale)
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])
    untouched = (want == args["out"]).all(dim=-1).all(dim=-1)                          # rows with no sink
    assert torch.equal(got[untouched], args["out"][untouched])
    assert not untouched.all()


def test_fp8_cache_scales_come_from_the_device(seed):
    """An fp8 cache's keys and values times its scales, read by the kernel from 1-element tensors."""
    args = make_case([5, 1, 30], [40, 17, 30], 8, 2, 16, 2, torch.bfloat16, seed)
    for name in ("key_cache", "value_cache"):
        args[name] = args[name].to(torch.float8_e4m3fn)
    scales = {"k_scale": torch.tensor([0.5], device=DEVICE), "v_scale": torch.tensor([3.0], device=DEVICE)}
    want, got = args["out"].clone(), args["out"].clone()
    merge_sinks_ref(**{**args, "out": want}, sink_tokens=4, window=8, scale=0.25, **scales)
    merge_sinks(**{**args, "out": got}, sink_tokens=4, window=8, scale=0.25, **scales)
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[torch.bfloat16], rtol=TOL[torch.bfloat16])
    unscaled = args["out"].clone()
    merge_sinks_ref(**{**args, "out": unscaled}, sink_tokens=4, window=8, scale=0.25)
    assert not torch.equal(unscaled, want)
    with pytest.raises(ValueError, match="both k_scale and v_scale"):
        merge_sinks(**{**args, "out": got}, sink_tokens=4, window=8, scale=0.25, k_scale=scales["k_scale"])


def test_reference_equals_full_softmax_over_window_and_sinks(seed):
    """The reference's merge equals one softmax over the window keys plus the visible sinks."""
    torch.manual_seed(seed)
    d, window, sinks, n = 16, 5, 2, 20
    q, k, v = torch.randn(n, 1, d), torch.randn(n, 1, d), torch.randn(n, 1, d)
    pos, keys = torch.arange(n)[:, None], torch.arange(n)[None, :]
    in_window = (keys <= pos) & (pos - keys < window)
    s = (q[:, 0] @ k[:, 0].T) * d ** -0.5
    win = s.masked_fill(~in_window, float("-inf"))
    out_win, lse = win.softmax(-1) @ v[:, 0], win.logsumexp(-1)
    full = s.masked_fill(~(in_window | ((keys < sinks) & (keys <= pos))), float("-inf"))
    want = full.softmax(-1) @ v[:, 0]
    got = out_win[:, None].clone()
    merge_sinks_ref(q, k[None], v[None], torch.tensor([0, n], dtype=torch.int32), torch.tensor([n], dtype=torch.int32),
                    torch.tensor([[0]], dtype=torch.int32), torch.zeros(n, dtype=torch.long), sinks, window,
                    d ** -0.5, got, lse[None])
    torch.testing.assert_close(got[:, 0], want, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_kernel_matches_reference_at_a_realistic_size(seed):
    args = make_case([3000, 1, 4096], [9000, 20000, 4096], 32, 8, 128, 64, torch.bfloat16, seed)
    want, got = args["out"].clone(), args["out"].clone()
    merge_sinks_ref(**{**args, "out": want}, sink_tokens=4, window=2048, scale=128 ** -0.5)
    merge_sinks(**{**args, "out": got}, sink_tokens=4, window=2048, scale=128 ** -0.5)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
