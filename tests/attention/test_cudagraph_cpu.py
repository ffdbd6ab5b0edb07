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

from rtpurbo_vllm.kv_cache.side_layers import unit_tensor  # noqa: E402
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
    """Engine, layers, their cache units, the builders of every KV-cache group and a runner."""

    def __init__(self, tmp_path, case, kv_layout, dense_threshold=0):
        from rtpurbo_vllm.attention.builder import RTPurboMetadataBuilder
        from rtpurbo_vllm.kv_cache.side_layers import UnitMetadataBuilder

        self.case = case
        self.engine = cpu.make_engine(tmp_path, case, dense_threshold, kv_layout)
        self.engine.scheduler_config.max_num_seqs = MAX_REQS
        self.layers = cpu.make_layers(self.engine, case)
        self.names = tuple(layer.layer_name for layer in self.layers)
        self.layout = layout = self.layers[0].impl.kv.layout
        self.rope = RopeSpec.from_hf_config(self.engine.model_config.hf_text_config)
        context = self.engine.compilation_config.static_forward_context
        # KV-cache groups: one per kind with window units, else one for everything.
        self.group_of = {kind: kind if layout.has("window") else "full" for kind in layout.units}
        page = {g: layout.units[g].block_size for g in set(self.group_of.values())}
        self.runner = Runner(page, self.engine.model_config.max_model_len)
        self.num_pages = {g: 2 + sum(-(-(c + 1) // p) for c in STEP_A + STEP_B + [0] * MAX_REQS)
                          for g, p in page.items()}
        cpu.bind_units(self.engine, layout, self.names, {k: self.num_pages[g] for k, g in self.group_of.items()})
        self.units = {name: context[name].kv_cache for kind in layout.units
                      for name in layout.unit_names(self.names, kind)}
        for layer in self.layers:           # as the builder's first build does once vLLM bound the caches
            layer.impl.bind_kv_cache()
        # group -> [(builder, layer names)]: the RTPURBO layers' builder and the side units'.
        main_spec = self.layers[0].get_kv_cache_spec(self.engine)
        self.groups = {g: [] for g in page}
        self.groups["full"].append((RTPurboMetadataBuilder(main_spec, list(self.names), self.engine,
                                                           torch.device("cpu")), self.names))
        for kind in layout.units:
            side = [n for n in layout.unit_names(self.names, kind) if n not in self.names]
            if side:
                spec = context[side[0]].get_kv_cache_spec(self.engine)
                self.groups[self.group_of[kind]].append(
                    (UnitMetadataBuilder(spec, side, self.engine, torch.device("cpu")), side))
        HQ, HKV, _ = case
        self.io = [{name: torch.zeros(MAX_REQS, heads, D, dtype=torch.bfloat16)
                    for name, heads in (("query", HQ), ("key", HKV), ("value", HKV), ("output", HQ))}
                   for _ in self.layers]

    def held(self, kind):
        """Which tokens a unit of ``kind`` holds for a request of ``c`` cached tokens (None: all)."""
        if kind != "window":
            return None
        return lambda c, t: (t < cpu.PARAMS.sink_tokens) | (t > c - cpu.PARAMS.window)

    def tables(self, cached):
        """Fresh shuffled pages of every group for a step's requests (window pages without a held
        token: the null block 0)."""
        tables = {}
        for g in self.groups:
            page = self.layout.units[g].block_size
            held = self.held(g)
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
        """Every group's metadata keyed by layer name (the forward context), and the layers' own."""
        attn_metadata = {}
        for g, builders in self.groups.items():
            for builder, names in builders:
                md = (builder.build_for_cudagraph_capture(common[g]) if capture else builder.build(0, common[g]))
                attn_metadata.update({name: md for name in names})
        return attn_metadata, attn_metadata[self.names[0]]

    def slots(self, kind, tables, b, t):
        page = self.layout.units[kind].block_size
        return tables[self.group_of[kind]][b, t // page].long() * page + t % page

    def prepare(self, cached, padded, pad_seq_len=0):
        """A step: sequences per request and layer, units reset (NaN, null block 0 zero as vLLM
        allocates it) and holding each request's history, runner buffers filled; returns
        ``(sequences, common metadata per group, tables)``."""
        HQ, HKV, RETRIEVAL = self.case
        tables = self.tables(cached)
        for cache in self.units.values():
            cache.fill_(float("nan"))
            cache[0] = 0
        seqs = []
        for layer_idx, layer in enumerate(self.layers):
            kv = layer.impl.kv
            kv_heads = torch.tensor([h // (HQ // HKV) for h in RETRIEVAL[layer_idx]])
            layer_seqs = []
            for b, c in enumerate(cached):
                n, pos = c + 1, torch.arange(c + 1)
                q_pre = torch.randn(n, HQ, D, dtype=torch.bfloat16)
                k_pre = torch.randn(n, HKV, D, dtype=torch.bfloat16)
                v = torch.randn(n, HKV, D, dtype=torch.bfloat16)
                q, k = apply_rope(q_pre, pos, self.rope), apply_rope(k_pre, pos, self.rope)
                layer_seqs.append((q_pre, q, k_pre, k, v))
                t = torch.arange(c)
                for h in range(HKV):
                    kind = ("full", "window")[kv.kv.head_kind[h]]
                    held = self.held(kind)
                    keep = t if held is None else t[held(c, t)]
                    mappings = [torch.full((c,), -1, dtype=torch.long) for _ in range(2)]
                    mappings[kv.kv.head_kind[h]][keep] = self.slots(kind, tables, b, keep)
                    cpu.scatter(kv.kv, mappings, h, torch.cat([k[:c, h], v[:c, h]], -1))
                if kv.index is not None:
                    keys = index_keys_ref(k[:c], t, self.rope, kv_heads, layer.impl.heads.w_k).to(torch.bfloat16)
                    for r in range(len(RETRIEVAL[layer_idx])):
                        cpu.scatter(kv.index, [self.slots("index", tables, b, t)], r, keys[:, r])
            seqs.append(layer_seqs)
        return seqs, self.runner.step(cached, tables, padded, pad_seq_len), tables

    def forward(self, layer_idx, seqs, cached, padded, attn_metadata, md):
        """Loads the step's new tokens into the layer's static inputs (padded rows: random, as the
        model computes something for them) and runs the impl; returns the output rows ``[:padded]``."""
        from vllm.forward_context import set_forward_context

        layer = self.layers[layer_idx]
        io = self.io[layer_idx]
        for name in ("query", "key", "value"):
            io[name].normal_()
        io["output"].fill_(float("nan"))
        for b, (c, (_, q, _, k, v)) in enumerate(zip(cached, seqs[layer_idx])):
            io["query"][b], io["key"][b], io["value"][b] = q[c], k[c], v[c]
        with set_forward_context(attn_metadata, self.engine):
            layer.impl.forward(layer, io["query"][:padded], io["key"][:padded], io["value"][:padded],
                               layer.kv_cache, md, io["output"][:padded])
        return io["output"][:padded]

    def check_output(self, layer_idx, seqs, cached, tables, out, md):
        """Real rows against the reference (over the kernel's kept blocks where they tie, judged on the
        index keys and queries as stored, bf16), padded rows finite."""
        impl = self.layers[layer_idx].impl
        heads = self.case[2][layer_idx]
        ws = md.decode.workspace
        units = impl.kv.index
        for b, (q_pre, q, k_pre, k, v) in enumerate(seqs[layer_idx]):
            kernel_blocks = [ws.selected[b, r, :ws.num_selected[b, r]].tolist() for r in range(len(heads))]
            slots = self.slots("index", tables, b, torch.arange(cached[b] + 1))
            page = self.layout.units["index"].block_size
            scores = [units.units[units.head_unit[r]][slots // page, slots % page, units.head_slot[r]].float()
                      @ ws.index_queries[b, r].float() for r in range(len(heads))]
            want = cpu.decode_reference(q[-1], k, v, q_pre[-1], k_pre, heads, impl.heads.w_q, impl.heads.w_k,
                                        impl.params, impl.scale, kernel_blocks, index_scores=scores)
            torch.testing.assert_close(out[b].float(), want, atol=0.03, rtol=0.03,
                                       msg=f"layer {layer_idx} request {b} (cached {cached[b]})")
        assert torch.isfinite(out[len(cached):]).all()

    def snapshot(self):
        return {name: cache.clone() for name, cache in self.units.items()}

    def check_writes(self, layer_idx, before, cached, tables):
        """The forward wrote exactly its own heads' slots of the new tokens (padded rows: nothing)."""
        kv = self.layers[layer_idx].impl.kv
        want = set()
        for b, c in enumerate(cached):
            for h in range(kv.kv.num_heads):
                kind = ("full", "window")[kv.kv.head_kind[h]]
                slot = int(self.slots(kind, tables, b, torch.tensor(c)))
                page = self.layout.units[kind].block_size
                want.add((kv.kv_unit_names[kv.head_unit[h]], slot // page, slot % page, kv.head_slot[h]))
            for r in range(len(kv.index_head_unit)):
                slot = int(self.slots("index", tables, b, torch.tensor(c)))
                page = self.layout.units["index"].block_size
                want.add((kv.index_unit_names[kv.index_head_unit[r]], slot // page, slot % page,
                          kv.index_head_slot[r]))
        changed = set()
        for name, new in self.units.items():
            old = before[name]
            kind = next(k for k in self.layout.units if name in self.layout.unit_names(self.names, k))
            width = self.layout.units[kind].width
            old, new = unit_tensor(old, kind, width), unit_tensor(new, kind, width)      # [N, P, slots, width]
            same = (old == new) | (old.isnan() & new.isnan())
            changed |= {(name, *idx) for idx in map(tuple, (~same).any(-1).nonzero().tolist())}
        assert changed == want, (sorted(changed - want), sorted(want - changed))


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

    for name in LAUNCHERS:
        wrap(name)
    return calls


LAUNCHERS = ("kv_write", "write_index_keys", "block_topp", "headwise_sparse_decode")


def persistent_storages(setup: Setup) -> set[int]:
    """Storage addresses that live across steps: runner buffers, the builder's workspace, the cache
    units, the layers' head tensors, descriptors, scales and RoPE tables, their static inputs/outputs."""
    builder = setup.groups["full"][0][0]
    found = [*setup.runner.buffers(), *(t for _, t in tensors_of(builder.workspace)), *setup.units.values()]
    for layer, io in zip(setup.layers, setup.io):
        found += [*io.values(), layer.impl.rope_table, layer._k_scale, layer._v_scale]
        found += [t for _, t in tensors_of(layer.impl.heads)]
        found += [t for _, t in tensors_of(layer.impl.kv.kv)] + [t for _, t in tensors_of(layer.impl.kv.index)]
    return {t.untyped_storage().data_ptr() for t in found}


@pytest.mark.slow
@pytest.mark.parametrize("kv_layout", ["full", "compact"])
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
        before = setup.snapshot()
        out, launches = forward(i, seqs_a, STEP_A, captured, md_a)
        capture_launches.append(launches)
        setup.check_output(i, seqs_a, STEP_A, tables_a, out, md_a)
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
        before = setup.snapshot()
        out, _ = forward(i, seqs_b, STEP_B, captured, md_a)          # the captured launches
        setup.check_output(i, seqs_b, STEP_B, tables_b, out, md_a)
        setup.check_writes(i, before, STEP_B, tables_b)
        replayed = out.clone()
        out, launches = forward(i, seqs_b, STEP_B, replay, md_b)     # what an eager step would run
        eager_launches.append(launches)
        torch.testing.assert_close(out, replayed, atol=0, rtol=0)

    # Every tensor a kernel reads lives across steps, and the replay-time build gives the launches
    # the addresses of the captured ones.
    persistent = persistent_storages(setup)
    for launches in capture_launches:
        assert {name for name, _ in launches} == set(LAUNCHERS)
        for name, args in launches:
            for path, t in args:
                assert t.untyped_storage().data_ptr() in persistent, (name, path, tuple(t.shape))

    def signature(launches):
        return [(name, [(path, address(t)) for path, t in args]) for name, args in launches]
    assert [signature(x) for x in capture_launches] == [signature(x) for x in eager_launches]


@pytest.mark.slow
@pytest.mark.parametrize("kv_layout", ["full", "compact"])
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
        before = setup.snapshot()
        out = setup.forward(i, seqs, cached, MAX_REQS, attn_metadata, md)
        setup.check_writes(i, before, cached, tables)
        setup.check_output(i, seqs, cached, tables, out, md)
        if pad_seq_len == 0:
            assert (out[len(cached):] == 0).all()
        ws = md.decode.workspace
        num_retrieval = len(setup.case[2][i])
        assert (ws.num_selected[len(cached):MAX_REQS, :num_retrieval] == pad_seq_len).all()


def test_builder_declares_single_token_decode_capture(tmp_path, cpu_platform, seed):
    from vllm.v1.attention.backend import AttentionCGSupport

    from rtpurbo_vllm.attention.builder import RTPurboMetadataBuilder
    from rtpurbo_vllm.kv_cache.side_layers import UnitMetadataBuilder

    setup = Setup(tmp_path, cpu.CASES["hkv2"], "full")
    spec = setup.layers[0].get_kv_cache_spec(setup.engine)
    assert (RTPurboMetadataBuilder.get_cudagraph_support(setup.engine, spec)
            == AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE)
    # The side units launch nothing: they never lower the engine's minimum.
    assert UnitMetadataBuilder.get_cudagraph_support(setup.engine, spec) == AttentionCGSupport.ALWAYS
    # More decodes than the workspace serves are refused with a clear message.
    builder = setup.groups["full"][0][0]
    runner = Runner({"full": spec.block_size}, setup.engine.model_config.max_model_len)
    common = runner.step([5] * 2, {"full": torch.ones(2, 1, dtype=torch.int32)}, 2)["full"]
    builder.max_decodes = 1
    with pytest.raises(RuntimeError, match="max_num_seqs=1"):
        builder.build(0, common)
