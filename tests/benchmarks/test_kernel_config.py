"""rtpurbo_vllm.bench.kernel_config: KERNEL.KEY=VALUE launch settings from a benchmark's command line."""


import pytest

from rtpurbo_vllm.bench import kernel_config as kc


@pytest.fixture
def fresh_configs(monkeypatch):
    """Each kernel's CONFIG replaced by a copy for the test (apply_overrides changes them in place)."""
    for name in kc.KERNELS:
        module = kc.kernel_module(name)
        monkeypatch.setattr(module, "CONFIG", dict(module.CONFIG))
    return kc.kernel_configs()


def test_overrides_are_parsed_and_applied(fresh_configs):
    overrides = kc.parse_overrides(["block_topp.search_bits=2", "sparse_decode.warps=8", "block_topp.search_bits=4"])
    assert overrides == {"block_topp": {"search_bits": 4}, "sparse_decode": {"warps": 8}}
    before = {name: dict(config) for name, config in fresh_configs.items()}
    now = kc.apply_overrides(overrides)
    assert now["block_topp"] == {**before["block_topp"], "search_bits": 4}
    assert now["sparse_decode"]["warps"] == 8 and now["sparse_prefill"] == before["sparse_prefill"]
    assert kc.kernel_configs()["sparse_decode"]["warps"] == 8          # the live settings the launches read
    assert kc.apply_overrides({}) == now


def test_switches_take_zero():
    settings = ["launch.pdl=0", "sparse_decode.local_programs_per_sm=0"]
    assert kc.parse_overrides(settings) == {"launch": {"pdl": 0}, "sparse_decode": {"local_programs_per_sm": 0}}
    assert kc.parse_overrides(["launch.pdl=1"]) == {"launch": {"pdl": 1}}


@pytest.mark.parametrize("item, message", [
    ("nope.warps=8", "expected KERNEL.KEY=VALUE with KERNEL one of index_keys, block_topp, sparse_decode, sparse_prefill, "
                    "launch"),
    ("sparse_decode=8", "expected KERNEL.KEY=VALUE"),
    ("sparse_decode.warps", "expected KERNEL.KEY=VALUE"),
    ("sparse_decode.wraps=8",
     "sparse_decode has no setting 'wraps'; its settings are local_programs_per_sm, stages"),
    ("sparse_decode.warps=eight", "the value must be a positive integer"),
    ("sparse_decode.warps=0", "the value must be a positive integer"),
    ("launch.pdl=2", "launch.pdl is a switch, 0 (off) or 1 (on)"),
    ("launch.pdl=on", "launch.pdl is a switch"),
    ("sparse_decode.local_programs_per_sm=-1", "a non-negative integer (0: the launcher's choice)"),
    ("block_topp.select_warps=-1", "a non-negative integer"),
])
def test_bad_overrides_are_named(item, message):
    with pytest.raises(ValueError, match="--config") as error:
        kc.parse_overrides(["block_topp.search_bits=2", item])
    assert item in str(error.value) and message in str(error.value)


def test_applied_settings_last_for_the_body_only(fresh_configs):
    before = {name: dict(config) for name, config in fresh_configs.items()}
    with kc.applied({"launch": {"pdl": 1}, "block_topp": {"stats_blocks_per_prog": 8}}) as now:
        assert now["launch"]["pdl"] == 1 and kc.kernel_configs()["block_topp"]["stats_blocks_per_prog"] == 8
    assert {name: dict(config) for name, config in kc.kernel_configs().items()} == before
