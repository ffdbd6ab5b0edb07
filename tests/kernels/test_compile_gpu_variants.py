"""The GPU-only variants of the paged kernels compile for Hopper (sm_90), on the CPU.

Under ``TRITON_INTERPRET=1`` some launches take interpreter-only branches (kv_write's and the index-key
write's bit-level fp8 encoder instead of the native fp32 -> fp8e4nv conversion; the sparse decode's
and sparse prefill's float32 dots for bf16), so the recorded launches that ``test_compile_for_gpu.py``
compiles never contain the GPU variant of those branches. Here the launchers run with the interpreter check patched to False and the kernels
replaced by a recorder, and the recorded GPU launches are compiled down to the cubin
(``tests/triton_launches.py``).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import importlib.util  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from rtpurbo_vllm.triton_kernels.kv_write import kernel as kv_write_kernel  # noqa: E402
from rtpurbo_vllm.triton_kernels.paged_heads import PagedHeads  # noqa: E402
from rtpurbo_vllm.triton_kernels.sparse_decode import kernel as decode_kernel  # noqa: E402
from rtpurbo_vllm.triton_kernels.sparse_prefill import kernel as prefill_kernel  # noqa: E402
from rtpurbo_vllm.triton_kernels.sparse_prefill import make_sparse_prefill_workspace, plan_sparse_prefill  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU check (a GPU machine runs these variants for real)")


def _launches_module():
    spec = importlib.util.spec_from_file_location("rtpurbo_triton_launches_variants",
                                                  pathlib.Path(__file__).parents[1] / "triton_launches.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, module: str, name: str, describe):
        self.module, self.name, self.describe, self.launches = module, name, describe, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append({"module": self.module, "name": self.name,
                                  "args": [self.describe(a) for a in args],
                                  "kwargs": {k: self.describe(v) for k, v in kwargs.items()}})
        return launch


def test_gpu_variants_compile_for_hopper(monkeypatch):
    tl_launches = _launches_module()
    kv_rec = _Recorder("rtpurbo_vllm.triton_kernels.kv_write.kernel", "_kv_write_kernel", tl_launches.describe)
    dec_rec = _Recorder("rtpurbo_vllm.triton_kernels.sparse_decode.kernel", "_split_kernel", tl_launches.describe)
    monkeypatch.setattr(kv_write_kernel, "interpreting", lambda: False)
    monkeypatch.setattr(kv_write_kernel, "_kv_write_kernel", kv_rec)
    monkeypatch.setattr(decode_kernel, "interpreting", lambda: False)
    monkeypatch.setattr(decode_kernel, "_split_kernel", dec_rec)
    monkeypatch.setattr(decode_kernel, "_combine_kernel", _Recorder("", "", tl_launches.describe))
    pf_rec = _Recorder("rtpurbo_vllm.triton_kernels.sparse_prefill.kernel", "_attend_kernel", tl_launches.describe)
    monkeypatch.setattr(prefill_kernel, "interpreting", lambda: False)
    monkeypatch.setattr(prefill_kernel, "_attend_kernel", pf_rec)
    monkeypatch.setattr(prefill_kernel, "_select_kernel", _Recorder("", "", tl_launches.describe))

    d, hkv, hq, p = 128, 2, 8, 16
    for dtype in (torch.uint8, torch.bfloat16):
        units = [torch.zeros(4, p, 2, 2 * d, dtype=dtype), torch.zeros(4, 2 * p, 1, 2 * d, dtype=dtype)]
        kv = PagedHeads.from_units(units, [0, 1], [1, 0], [0, 1])
        scales = (torch.ones(1), torch.ones(1)) if dtype == torch.uint8 else (None, None)
        key = torch.zeros(3, hkv, d, dtype=torch.bfloat16)
        kv_write_kernel.kv_write(key, key, kv, [torch.zeros(3, dtype=torch.long)] * 2, *scales)
        tables = [kv.table(k, torch.zeros(2, 4, dtype=torch.int32)) for k in (0, 1)]
        ws = decode_kernel.allocate_sparse_decode_workspace(2, hq, d, 4)
        q = torch.zeros(2, hq, d, dtype=torch.bfloat16)
        decode_kernel.headwise_sparse_decode(
            q, kv, tables, torch.ones(2, dtype=torch.int32), torch.tensor([1], dtype=torch.int32),
            torch.zeros(2, 1, 3, dtype=torch.int32), torch.ones(2, 1, dtype=torch.int32), 64, 4, 16,
            d ** -0.5, ws, torch.empty_like(q), k_scale=scales[0], v_scale=scales[1])
        index = PagedHeads.from_units([torch.zeros(4, p, 1, 16, dtype=torch.bfloat16)], [0], [0], [0])
        rows = torch.zeros(20, hq, d, dtype=torch.bfloat16)
        prefill_kernel.sparse_prefill(
            rows, kv, [kv.table(k, torch.zeros(1, 4, dtype=torch.int32)) for k in (0, 1)], index, index.table(0, torch.zeros(1, 4, dtype=torch.int32)),
            torch.zeros(20, 1, 16), torch.tensor([0, 20], dtype=torch.int32), torch.tensor([30], dtype=torch.int32),
            torch.tensor([1], dtype=torch.int32), plan_sparse_prefill([20], [30], 16, 16), 1.0, 4, 16,
            d ** -0.5, make_sparse_prefill_workspace(16, 1, 64, 16, 16), torch.empty_like(rows),
            k_scale=scales[0], v_scale=scales[1])
    # fp8 index keys: the index-key write's native fp32 -> fp8e4nv store (with a decode step's queries).
    from rtpurbo_vllm.triton_kernels.index_keys import kernel as index_kernel

    idx_rec = _Recorder("rtpurbo_vllm.triton_kernels.index_keys.kernel", "_index_vectors_kernel",
                        tl_launches.describe)
    monkeypatch.setattr(index_kernel, "interpreting", lambda: False)
    monkeypatch.setattr(index_kernel, "_index_vectors_kernel", idx_rec)
    index = PagedHeads.from_units([torch.zeros(4, p, 2, 16, dtype=torch.uint8)], [0, 0], [0, 1], [0, 0])
    queries = index_kernel.IndexQueries(torch.zeros(3, 2 * hkv, d, dtype=torch.bfloat16),
                                        torch.tensor([0, 2], dtype=torch.int32), torch.zeros(2, 16, d),
                                        torch.zeros(3, 2, 16, dtype=torch.bfloat16))
    index_kernel.write_index_keys(torch.zeros(3, hkv, d, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.long),
                                  torch.zeros(8, d), torch.tensor([0, 1], dtype=torch.int32), torch.zeros(2, 16, d),
                                  torch.zeros(3, dtype=torch.long), index, is_neox_style=True, queries=queries)
    assert [(lw["kwargs"]["FP8"], lw["kwargs"]["MANUAL_FP8"], lw["kwargs"]["QUERIES"])
            for lw in idx_rec.launches] == [(True, False, True)]
    assert [lw["kwargs"]["MANUAL_FP8"] for lw in kv_rec.launches] == [False, False]
    assert [lw["kwargs"]["FP8"] for lw in kv_rec.launches] == [True, False]
    assert [(lw["kwargs"]["UPCAST_DOT"], lw["kwargs"]["FP8"]) for lw in dec_rec.launches] == [(False, True),
                                                                                           (False, False)]
    assert [(lw["kwargs"]["UPCAST_DOT"], lw["kwargs"]["FP8"]) for lw in pf_rec.launches] == [(False, True),
                                                                                          (False, False)]
    failures = tl_launches.compile_launches(kv_rec.launches + idx_rec.launches + dec_rec.launches + pf_rec.launches,
                                            arch=90)
    assert not failures, "GPU variants that do not compile for sm_90:\n" + "\n\n".join(
        map(tl_launches.describe_failure, failures))


def test_pdl_variants_compile_for_hopper(monkeypatch):
    """With ``launch.pdl`` on, the decode chain's kernels (index keys with the index queries, block stats and
    selection, splits, combine) launch with programmatic dependent launch: a ``PDL`` variant that waits for the kernel before
    it, and ``launch_pdl``. Both compile for sm_90; off CUDA, PDL stays off whatever the setting."""
    from rtpurbo_vllm.triton_kernels import launch
    from rtpurbo_vllm.triton_kernels.block_topp import kernel as topp_kernel
    from rtpurbo_vllm.triton_kernels.index_keys import kernel as index_kernel

    monkeypatch.setitem(launch.CONFIG, "pdl", 1)
    assert not launch.pdl_launch(torch.device("cpu"))
    tl_launches = _launches_module()
    recorders = []
    for module, names in ((index_kernel, ["_index_vectors_kernel"]),
                          (topp_kernel, ["_block_stats_kernel", "_select_kernel"]),
                          (decode_kernel, ["_split_kernel", "_combine_kernel"])):
        monkeypatch.setattr(module, "pdl_launch", lambda device: True)
        for name in names:
            recorders.append(_Recorder(module.__name__, name, tl_launches.describe))
            monkeypatch.setattr(module, name, recorders[-1])
    monkeypatch.setattr(decode_kernel, "interpreting", lambda: False)

    d, hq, hkv, p, di, bs = 128, 8, 2, 16, 16, 64
    q = torch.zeros(2, hq, d, dtype=torch.bfloat16)
    heads = torch.tensor([1], dtype=torch.int32)
    q_idx = torch.zeros(2, 1, di, dtype=torch.bfloat16)
    index = PagedHeads.from_units([torch.zeros(4, p, 1, di, dtype=torch.bfloat16)], [0], [0], [0])
    index_kernel.write_index_keys(torch.zeros(2, hkv, d, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.long),
                                  torch.zeros(8, d), torch.tensor([0], dtype=torch.int32), torch.zeros(1, di, d),
                                  torch.zeros(2, dtype=torch.long), index, is_neox_style=True,
                                  queries=index_kernel.IndexQueries(q, heads, torch.zeros(1, di, d), q_idx))
    table = torch.zeros(2, 4, dtype=torch.int32)
    seq_lens = torch.ones(2, dtype=torch.int32)
    topp_kernel.block_topp(q_idx, index, index.table(0, table), seq_lens, 0.9, 4, bs, 3,
                           topp_kernel.make_block_topp_workspace(2, 1, 3, "cpu"))
    kv = PagedHeads.from_units([torch.zeros(4, p, hkv, 2 * d, dtype=torch.bfloat16)], [0, 0], [0, 1], [0, 0])
    decode_kernel.headwise_sparse_decode(
        q, kv, [kv.table(0, table)], seq_lens, heads, torch.zeros(2, 1, 3, dtype=torch.int32),
        torch.ones(2, 1, dtype=torch.int32), bs, 4, 16, d ** -0.5,
        decode_kernel.allocate_sparse_decode_workspace(2, hq, d, 4), torch.empty_like(q))
    launches = [lw for rec in recorders for lw in rec.launches]
    assert sorted({lw["name"] for lw in launches}) == sorted(rec.name for rec in recorders)
    assert all(lw["kwargs"]["PDL"] is True and lw["kwargs"]["launch_pdl"] is True for lw in launches)
    failures = tl_launches.compile_launches(launches, arch=90, processes=2)
    assert not failures, "PDL variants that do not compile for sm_90:\n" + "\n\n".join(
        map(tl_launches.describe_failure, failures))
