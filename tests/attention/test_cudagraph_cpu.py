"""CUDA-graph capture and replay of pure-decode steps, emulated on the CPU with the real builder and impl.

vLLM (both model runners) captures a padded pure-decode step once -- ``build_for_cudagraph_capture``,
then the whole forward under capture -- and afterwards only replays it: each later step of the same
padded size it refills its persistent input buffers in place, calls ``build`` (the graph never sees
the returned object) and replays the captured launches, with the Python values and tensor addresses
frozen at capture.

The emulation: :class:`Runner` owns persistent buffers like vLLM's (``query_start_loc``,
``seq_lens``, ``positions`` and, per KV-cache group, a block table and a slot mapping; padded
requests get ``seq_len`` 0, the null block 0 and slot -1, padded positions stay stale). "Capture"
builds with ``build_for_cudagraph_capture`` and runs the forward; "replay" refills the buffers for
another batch of the same padded size, calls ``build`` and runs the forward **with the captured
metadata objects**, i.e. exactly the launches the graph holds. Were any tensor the impl reads
allocated per step, the replay would read the capture step's batch and miss the reference. The test
also checks that ``build`` hands out the same addresses at replay as at capture, and that every
tensor a kernel launch reads is a view of persistent memory (runner buffers, builder workspace,
caches, the layer's plan, the layer's static inputs/outputs).

Padded rows: no cache entry is written for them and their output is finite (0 for ``seq_len`` 0).
"""

import dataclasses
import importlib.util
import os
import pathlib

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("CPU integration test (the GPU runs the gpu-marked end-to-end tests)", allow_module_level=True)
os.environ.setdefault("TRITON_INTERPRET", "1")

_path = pathlib.Path(__file__).with_name("test_backend_cpu.py")
cpu = importlib.util.module_from_spec(importlib.util.spec_from_file_location("rtpurbo_backend_cpu_helpers", _path))
cpu.__spec__.loader.exec_module(cpu)

from rtpurbo_vllm.rope import RopeSpec, apply_rope  # noqa: E402
from rtpurbo_vllm.triton_kernels.index_keys import index_keys_ref  # noqa: E402

D = cpu.D
MAX_REQS = 8            # the runner's capacity (max_num_seqs of the emulated runner's buffers)
# Padded tokens' positions are left over from earlier steps: never a current position (max_model_len is
# 1024), but inside the 2048-row RoPE table, as they were real positions once (index_queries refuses
# positions outside its table).
STALE_POSITION = 2047
# Cached tokens per decode request (each step schedules one new token per request), and the capture size.
STEP_A, STEP_B, PADDED = [36, 129, 19], [140, 0, 57, 88], 4


def tensors_of(obj, path="md"):
    """``(path, tensor)`` of every tensor reachable from metadata (dataclasses, dicts, tuples)."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from tensors_of(getattr(obj, f.name), f"{path}.{f.name}")
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from tensors_of(value, f"{path}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from tensors_of(value, f"{path}[{i}]")


def address(t: torch.Tensor):
    return t.data_ptr(), tuple(t.shape), t.stride(), t.dtype


class Runner:
    """vLLM's persistent inputs of pure-decode steps, refilled in place each step (V1/V2 padding rules)."""

    def __init__(self, page_sizes: dict[str, int], max_model_len: int):
        self.page_sizes = page_sizes
        self.max_model_len = max_model_len
        self.query_start_loc = torch.zeros(MAX_REQS + 1, dtype=torch.int32)
        self.seq_lens = torch.zeros(MAX_REQS, dtype=torch.int32)
        self.positions = torch.zeros(MAX_REQS, dtype=torch.int64)
        self.block_tables = {g: torch.zeros(MAX_REQS, -(-max_model_len // p), dtype=torch.int32)
                             for g, p in page_sizes.items()}
        self.slot_mappings = {g: torch.zeros(MAX_REQS, dtype=torch.int64) for g in page_sizes}

    def buffers(self):
        return [self.query_start_loc, self.seq_lens, self.positions, *self.block_tables.values(),
                *self.slot_mappings.values()]

    def step(self, cached: list[int], tables: dict, padded: int, pad_seq_len: int = 0) -> dict:
        """Fills the buffers for one decode token per request; returns each group's common metadata."""
        from vllm.v1.attention.backend import CommonAttentionMetadata

        n = len(cached)
        pos = torch.tensor(cached)
        self.seq_lens[:n] = pos.int() + 1
        self.seq_lens[n:] = pad_seq_len
        self.query_start_loc[:n + 1] = torch.arange(n + 1, dtype=torch.int32)
        self.query_start_loc[n + 1:] = n
        self.positions[:n] = pos
        self.positions[n:] = STALE_POSITION
        common = {}
        for g, page in self.page_sizes.items():
            table, slots = self.block_tables[g], self.slot_mappings[g]
            table.zero_()                               # padded rows: the null block
            table[:n, :tables[g].shape[1]] = tables[g]
            slots.fill_(-1)
            slots[:n] = table[torch.arange(n), pos // page].long() * page + pos % page
            common[g] = CommonAttentionMetadata(
                query_start_loc=self.query_start_loc[:padded + 1], query_start_loc_cpu=self.query_start_loc[:padded + 1],
                seq_lens=self.seq_lens[:padded], num_reqs=padded, num_actual_tokens=padded, max_query_len=1,
                max_seq_len=self.max_model_len, block_table_tensor=table[:padded], slot_mapping=slots[:padded],
                positions=self.positions[:padded])
        return common


class Setup:
    """Engine, layers, their caches, the builders of every KV-cache group and a runner."""

    def __init__(self, tmp_path, case, kv_layout, dense_threshold=0):
        from rtpurbo_vllm.attention.builder import RTPurboMetadataBuilder
        from rtpurbo_vllm.kv_cache.side_layers import INDEX_SUFFIX, WINDOW_SUFFIX

        self.case = case
        self.split = kv_layout == "split"
        self.engine = cpu.make_engine(tmp_path, case, dense_threshold, kv_layout)
        self.engine.scheduler_config.max_num_seqs = MAX_REQS
        self.layers = cpu.make_layers(self.engine, case)
        self.names = [layer.layer_name for layer in self.layers]
        self.rope = RopeSpec.from_hf_config(self.engine.model_config.hf_text_config)
        context = self.engine.compilation_config.static_forward_context
        main_spec = self.layers[0].get_kv_cache_spec(self.engine)
        # group -> (spec, layer names, builder)
        self.groups = {"main": (main_spec, self.names,
                                RTPurboMetadataBuilder(main_spec, self.names, self.engine, torch.device("cpu")))}
        self.window_kept = None
        if self.split:
            for suffix in (INDEX_SUFFIX, WINDOW_SUFFIX):
                layer = context.get(f"{self.names[0]}.{suffix}")
                if layer is None:
                    continue
                spec = layer.get_kv_cache_spec(self.engine)
                names = [f"{name}.{suffix}" for name in self.names]
                builder = layer.get_attn_backend().get_builder_cls()(spec, names, self.engine, torch.device("cpu"))
                self.groups[suffix] = (spec, names, builder)
                if suffix == WINDOW_SUFFIX:
                    self.window_kept = spec.sliding_window
        self.index_group = INDEX_SUFFIX if self.split else "main"
        self.runner = Runner({g: spec.block_size for g, (spec, _, _) in self.groups.items()},
                             self.engine.model_config.max_model_len)
        self.num_pages = {g: 2 + sum(-(-(c + 1) // spec.block_size) for c in STEP_A + STEP_B + [0] * MAX_REQS)
                          for g, (spec, _, _) in self.groups.items()}
        # Per layer: persistent caches and static forward inputs / outputs (a graph's are static too).
        HQ, HKV, _ = case
        self.per_layer = []
        for layer in self.layers:
            impl = layer.impl
            caches = {"main": cpu.nan_cache(self.num_pages["main"], main_spec.block_size, main_spec.num_kv_heads)}
            if WINDOW_SUFFIX in self.groups:
                spec = self.groups[WINDOW_SUFFIX][0]
                window_layer = context[f"{layer.layer_name}.{WINDOW_SUFFIX}"]
                window_layer.kv_cache = cpu.nan_cache(self.num_pages[WINDOW_SUFFIX], spec.block_size, spec.num_kv_heads)
                caches[WINDOW_SUFFIX] = window_layer.kv_cache
            index = impl.plan.index_cache
            page = self.groups[self.index_group][0].block_size
            index.kv_cache = torch.full((self.num_pages[self.index_group], page, index.num_slots * index.index_dim),
                                        float("nan"), dtype=torch.bfloat16)
            caches["index"] = index.kv_cache
            io = {name: torch.zeros(MAX_REQS, heads, D, dtype=torch.bfloat16)
                  for name, heads in (("query", HQ), ("key", HKV), ("value", HKV), ("output", HQ))}
            self.per_layer.append((caches, io))

    def cache_views(self, layer_idx):
        """``[(name, K view, V view, group, KV heads of the cache, held)]`` and the paged index view."""
        from rtpurbo_vllm.kv_cache.side_layers import WINDOW_SUFFIX, split_key_value

        HQ, HKV, RETRIEVAL = self.case
        impl = self.layers[layer_idx].impl
        caches, _ = self.per_layer[layer_idx]
        full_heads = impl.plan.split.full_kv_heads if self.split else torch.arange(HKV)
        views = [("main", *split_key_value(caches["main"]), "main", full_heads, None)]
        if WINDOW_SUFFIX in caches:
            kept = self.window_kept
            views.append(("window", *split_key_value(caches[WINDOW_SUFFIX]), WINDOW_SUFFIX,
                          impl.plan.split.window_kv_heads, lambda c, t: (t < cpu.PARAMS.sink_tokens) | (t > c - kept)))
        paged_index = impl.plan.index_cache.paged_view()[:, :, :len(RETRIEVAL[layer_idx])]
        return views, paged_index

    def tables(self, cached):
        """Fresh shuffled pages of every group for a step's requests (window pages without a held
        token: the null block 0)."""
        tables = {}
        for g, (spec, _, _) in self.groups.items():
            page = spec.block_size
            held = None
            if g == "rtp_window":
                held = lambda c, t: (t < cpu.PARAMS.sink_tokens) | (t > c - self.window_kept)  # noqa: E731
            ids = (torch.randperm(self.num_pages[g] - 1) + 1).tolist()
            width = max(-(-(c + 1) // page) for c in cached)
            table = torch.zeros(len(cached), width, dtype=torch.int32)
            for b, c in enumerate(cached):
                for i in range(-(-(c + 1) // page)):
                    t = torch.arange(i * page, min((i + 1) * page, c + 1))
                    table[b, i] = ids.pop() if held is None or bool(held(c, t).any()) else 0
            tables[g] = table
        return tables

    def build(self, common, capture):
        """Every group's metadata keyed by layer name (the forward context), and the main group's."""
        attn_metadata = {}
        for g, (_, names, builder) in self.groups.items():
            md = (builder.build_for_cudagraph_capture(common[g]) if capture
                  else builder.build(0, common[g]))
            attn_metadata.update({name: md for name in names})
        return attn_metadata, attn_metadata[self.names[0]]

    def prepare(self, cached, padded, pad_seq_len=0):
        """A step: sequences per request and layer, caches reset (NaN, null block 0 zero as vLLM
        allocates it) and holding each request's history, runner buffers filled; returns
        ``(sequences, common metadata per group)``."""
        HQ, HKV, RETRIEVAL = self.case
        tables = self.tables(cached)
        seqs = []
        for layer_idx, layer in enumerate(self.layers):
            caches, _ = self.per_layer[layer_idx]
            for cache in caches.values():
                cache.fill_(float("nan"))
                cache[0] = 0
            views, paged_index = self.cache_views(layer_idx)
            kv_heads = torch.tensor([h // (HQ // HKV) for h in RETRIEVAL[layer_idx]])
            w_k = layer.impl.plan.w_k
            layer_seqs = []
            for b, c in enumerate(cached):
                n, pos = c + 1, torch.arange(c + 1)
                q_pre = torch.randn(n, HQ, D, dtype=torch.bfloat16)
                k_pre = torch.randn(n, HKV, D, dtype=torch.bfloat16)
                v = torch.randn(n, HKV, D, dtype=torch.bfloat16)
                q, k = apply_rope(q_pre, pos, self.rope), apply_rope(k_pre, pos, self.rope)
                layer_seqs.append((q_pre, q, k_pre, k, v))
                t = torch.arange(c)
                for _, key_cache, value_cache, g, heads, held in views:
                    kept = t if held is None else t[held(c, t)]
                    page = self.groups[g][0].block_size
                    p, o = tables[g][b, kept // page].long(), kept % page
                    key_cache[p, o], value_cache[p, o] = k[kept][:, heads], v[kept][:, heads]
                page = self.groups[self.index_group][0].block_size
                p, o = tables[self.index_group][b, t // page].long(), t % page
                paged_index[p, o] = index_keys_ref(k[:c], t, self.rope, kv_heads, w_k).to(torch.bfloat16)
            seqs.append(layer_seqs)
        return seqs, self.runner.step(cached, tables, padded, pad_seq_len), tables

    def forward(self, layer_idx, seqs, cached, padded, attn_metadata, md):
        """Loads the step's new tokens into the layer's static inputs (padded rows: random, as the
        model computes something for them) and runs the impl; returns the output rows ``[:padded]``."""
        from vllm.forward_context import set_forward_context

        layer = self.layers[layer_idx]
        caches, io = self.per_layer[layer_idx]
        for name in ("query", "key", "value"):
            io[name].normal_()
        io["output"].fill_(float("nan"))
        for b, (c, (_, q, _, k, v)) in enumerate(zip(cached, seqs[layer_idx])):
            io["query"][b], io["key"][b], io["value"][b] = q[c], k[c], v[c]
        with set_forward_context(attn_metadata, self.engine):
            layer.impl.forward(layer, io["query"][:padded], io["key"][:padded], io["value"][:padded],
                               caches["main"], md, io["output"][:padded])
        return io["output"][:padded]

    def check_output(self, layer_idx, seqs, cached, out, md):
        """Real rows against the reference (over the kernel's kept blocks where they tie), padded rows finite."""
        impl = self.layers[layer_idx].impl
        heads = self.case[2][layer_idx]
        ws = md.decode.workspace
        for b, (q_pre, q, k_pre, k, v) in enumerate(seqs[layer_idx]):
            kernel_blocks = [ws.selected[b, r, :ws.num_selected[b, r]].tolist() for r in range(len(heads))]
            want = cpu.decode_reference(q[-1], k, v, q_pre[-1], k_pre, heads, impl.plan.w_q, impl.plan.w_k,
                                        impl.params, impl.scale, kernel_blocks)
            torch.testing.assert_close(out[b].float(), want, atol=0.03, rtol=0.03,
                                       msg=f"layer {layer_idx} request {b} (cached {cached[b]})")
        assert torch.isfinite(out[len(cached):]).all()

    def snapshot(self, layer_idx):
        caches, _ = self.per_layer[layer_idx]
        return {name: cache.clone() for name, cache in caches.items()}

    def check_writes(self, layer_idx, before, cached, tables):
        """The forward wrote exactly the new tokens' slots (padded rows: nothing)."""
        caches, _ = self.per_layer[layer_idx]
        groups = {"main": "main", "rtp_window": "rtp_window", "index": self.index_group}
        for name, cache in caches.items():
            old, new = before[name], cache
            if old.dim() == 4:   # K|V caches: logical [N, H, P, 2D] -> physical [N, P, H, 2D]
                old, new = old.transpose(1, 2), new.transpose(1, 2)
            same = (old == new) | (old.isnan() & new.isnan())
            changed = (~same).flatten(2).any(-1).nonzero().tolist()
            page = self.groups[groups[name]][0].block_size
            want = sorted([int(tables[groups[name]][b, c // page]), c % page] for b, c in enumerate(cached))
            assert sorted(changed) == want, (name, changed, want)


def launch_recorder(monkeypatch):
    """Records the tensors of every kernel launch of the impl: ``[(launcher, [(arg, tensor)])]``."""
    import rtpurbo_vllm.attention.impl as impl_module

    calls = []

    def wrap(name):
        fn = getattr(impl_module, name)

        def recorded(*args, **kwargs):
            calls.append((name, list(tensors_of(list(args), "args")) + list(tensors_of(kwargs, "kwargs"))))
            return fn(*args, **kwargs)
        monkeypatch.setattr(impl_module, name, recorded)

    for name in ("_write_kv", "write_index_keys", "index_queries", "block_topp", "headwise_sparse_decode"):
        wrap(name)
    return calls


def persistent_storages(setup: Setup) -> set[int]:
    """Storage addresses that live across steps: runner buffers, the builder's workspace, caches,
    the layers' plans and RoPE tables, the layers' static inputs/outputs."""
    found = [*setup.runner.buffers(), *(t for _, t in tensors_of(setup.groups["main"][2].workspace))]
    for layer, (caches, io) in zip(setup.layers, setup.per_layer):
        found += [*caches.values(), *io.values(), layer.impl.rope_table]
        found += [t for _, t in tensors_of(layer.impl.plan)]
    return {t.untyped_storage().data_ptr() for t in found}


def gathered(split, name, path):
    """The split layout's K/V of the layer's full (window) heads, gathered inside the forward from
    its inputs (a graph recomputes them at replay)."""
    return split and name == "_write_kv" and path in ("args[0]", "args[1]")


@pytest.mark.parametrize("kv_layout", ["full", "split"])
def test_capture_then_replay_another_batch(tmp_path, cpu_platform, seed, monkeypatch, kv_layout):
    """Capture a padded decode step (3 requests in a graph of 4), replay it for another batch of
    4 (one a one-token sequence): same addresses, reference outputs, only the new tokens written."""
    setup = Setup(tmp_path, cpu.CASES["hkv4"], kv_layout)
    calls = launch_recorder(monkeypatch)

    def forward(layer_idx, seqs, cached, attn_metadata, md):
        calls.clear()
        out = setup.forward(layer_idx, seqs, cached, PADDED, attn_metadata, md)
        return out, list(calls)

    # Capture.
    seqs_a, common_a, tables_a = setup.prepare(STEP_A, PADDED)
    captured, md_a = setup.build(common_a, capture=True)
    assert md_a.decode is not None and md_a.prefill is None and md_a.num_decode_tokens == PADDED
    capture_launches = []
    for i in range(len(setup.layers)):
        before = setup.snapshot(i)
        out, launches = forward(i, seqs_a, STEP_A, captured, md_a)
        capture_launches.append(launches)
        setup.check_output(i, seqs_a, STEP_A, out, md_a)
        assert (out[len(STEP_A):] == 0).all()            # padded row: seq_len 0, nothing kept
        setup.check_writes(i, before, STEP_A, tables_a)

    # Replay: vLLM refills its buffers and calls build(); the graph keeps the captured objects.
    seqs_b, common_b, tables_b = setup.prepare(STEP_B, PADDED)
    replay, md_b = setup.build(common_b, capture=False)
    got = {name: dict(tensors_of(md, name)) for name, md in replay.items()}
    want = {name: dict(tensors_of(md, name)) for name, md in captured.items()}
    assert got.keys() == want.keys()
    for name in got:
        assert got[name].keys() == want[name].keys(), name
        for path in got[name]:
            assert address(got[name][path]) == address(want[name][path]), path
    eager_launches = []
    for i in range(len(setup.layers)):
        before = setup.snapshot(i)
        out, _ = forward(i, seqs_b, STEP_B, captured, md_a)          # the captured launches
        setup.check_output(i, seqs_b, STEP_B, out, md_a)
        setup.check_writes(i, before, STEP_B, tables_b)
        replayed = out.clone()
        out, launches = forward(i, seqs_b, STEP_B, replay, md_b)     # what an eager step would run
        eager_launches.append(launches)
        torch.testing.assert_close(out, replayed, atol=0, rtol=0)

    # Every tensor a kernel reads lives across steps, and the replay-time build gives the launches
    # the addresses of the captured ones.
    persistent = persistent_storages(setup)
    for launches in capture_launches:
        assert {name for name, _ in launches} >= {"_write_kv", "write_index_keys", "index_queries", "block_topp",
                                                  "headwise_sparse_decode"}
        for name, args in launches:
            for path, t in args:
                assert gathered(setup.split, name, path) or t.untyped_storage().data_ptr() in persistent, \
                    (name, path, tuple(t.shape))

    def signature(launches):
        return [(name, [(path, address(t)) for path, t in args if not gathered(setup.split, name, path)])
                for name, args in launches]
    assert [signature(x) for x in capture_launches] == [signature(x) for x in eager_launches]


@pytest.mark.parametrize("kv_layout", ["full", "split"])
@pytest.mark.parametrize("pad_seq_len", [0, 1])
def test_padded_rows_write_nothing_and_stay_finite(tmp_path, cpu_platform, seed, kv_layout, pad_seq_len):
    """Two requests padded to the runner's 8 rows; padded rows have slot -1, the null block and
    ``seq_len`` 0 (vLLM) or 1: no cache entry is written for them, their outputs are finite, the
    real rows match the reference."""
    setup = Setup(tmp_path, cpu.CASES["hkv4"], kv_layout)
    cached = [40, 3]
    seqs, common, tables = setup.prepare(cached, MAX_REQS, pad_seq_len)
    attn_metadata, md = setup.build(common, capture=True)
    for i in range(len(setup.layers)):
        before = setup.snapshot(i)
        out = setup.forward(i, seqs, cached, MAX_REQS, attn_metadata, md)
        setup.check_writes(i, before, cached, tables)
        setup.check_output(i, seqs, cached, out, md)
        if pad_seq_len == 0:
            assert (out[len(cached):] == 0).all()
        ws = md.decode.workspace
        num_retrieval = len(setup.case[2][i])
        assert (ws.num_selected[len(cached):MAX_REQS, :num_retrieval] == pad_seq_len).all()


def test_builder_declares_single_token_decode_capture(tmp_path, cpu_platform, seed):
    from vllm.v1.attention.backend import AttentionCGSupport

    from rtpurbo_vllm.attention.builder import RTPurboMetadataBuilder
    from rtpurbo_vllm.kv_cache.side_layers import SideCacheMetadataBuilder

    setup = Setup(tmp_path, cpu.CASES["hkv2"], "full")
    spec = setup.groups["main"][0]
    assert (RTPurboMetadataBuilder.get_cudagraph_support(setup.engine, spec)
            == AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE)
    # The side layers launch nothing: they never lower the engine's minimum.
    assert SideCacheMetadataBuilder.get_cudagraph_support(setup.engine, spec) == AttentionCGSupport.ALWAYS
    # More decodes than the workspace serves are refused with a clear message.
    builder = setup.groups["main"][2]
    runner = Runner({"main": spec.block_size}, setup.engine.model_config.max_model_len)
    common = runner.step([5] * 2, {"main": torch.ones(2, 1, dtype=torch.int32)}, 2)["main"]
    builder.max_decodes = 1
    with pytest.raises(RuntimeError, match="max_num_seqs=1"):
        builder.build(0, common)
