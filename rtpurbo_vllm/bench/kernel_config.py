"""The Triton kernels' launch settings (each kernel module's ``CONFIG``, read at every launch), set from a
benchmark's command line as ``KERNEL.KEY=VALUE`` so that one GPU call can time several settings.

    python3 -P benchmarks/bench_attention.py --decode 128 512 --batch 1 4 --config sparse_decode.warps=8
    python3 -P benchmarks/bench_attention.py --prefill --decode 128 --batch 1 --config launch.pdl=1
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import Any

KERNELS = {"index_keys": "index_keys.kernel", "block_topp": "block_topp.kernel",
           "sparse_decode": "sparse_decode.kernel", "sparse_prefill": "sparse_prefill.kernel", "launch": "launch"}
"""Name on the command line -> module under ``rtpurbo_vllm.triton_kernels`` whose ``CONFIG`` can be set
(``launch``: programmatic dependent launch of the decode chain, ``launch.pdl=1``)."""
SWITCHES = {("launch", "pdl")}
"""Settings that are on (1) or off (0)."""
ZERO_IS_LAUNCHERS_CHOICE = {("sparse_decode", "local_programs_per_sm"), ("block_topp", "select_warps")}
"""Settings where 0 leaves the value to the launcher (``local_programs_per_sm``: no bound; ``select_warps``: by the
row's chunk); every other setting is a positive integer."""


def kernel_module(name: str):
    """The module that holds ``name``'s ``CONFIG``."""
    return importlib.import_module(f"rtpurbo_vllm.triton_kernels.{KERNELS[name]}")


def kernel_configs() -> dict[str, dict[str, Any]]:
    """``{kernel: its CONFIG}``, the live dicts (changing one changes the next launch)."""
    return {name: kernel_module(name).CONFIG for name in KERNELS}


def parse_overrides(items: list[str]) -> dict[str, dict[str, int]]:
    """``["KERNEL.KEY=VALUE", ...]`` (VALUE a positive integer, 0 / 1 for a :data:`SWITCHES` setting, or a
    non-negative one for a :data:`ZERO_IS_LAUNCHERS_CHOICE` setting) as ``{KERNEL: {KEY: VALUE}}``; raises
    ``ValueError`` naming the first bad item and what is allowed."""
    configs, overrides = kernel_configs(), {}
    for item in items:
        target, sep, text = item.partition("=")
        kernel, dot, key = target.partition(".")
        if not sep or not dot or kernel not in configs:
            raise ValueError(f"--config {item!r}: expected KERNEL.KEY=VALUE with KERNEL one of {', '.join(KERNELS)}")
        if key not in configs[kernel]:
            raise ValueError(f"--config {item!r}: {kernel} has no setting {key!r}; its settings are "
                             f"{', '.join(sorted(configs[kernel]))}")
        try:
            value = int(text)
        except ValueError:
            value = -1
        if (kernel, key) in SWITCHES and value not in (0, 1):
            raise ValueError(f"--config {item!r}: {kernel}.{key} is a switch, 0 (off) or 1 (on)")
        if (kernel, key) in ZERO_IS_LAUNCHERS_CHOICE and value < 0:
            raise ValueError(f"--config {item!r}: the value must be a non-negative integer (0: the launcher's choice)")
        if (kernel, key) not in SWITCHES | ZERO_IS_LAUNCHERS_CHOICE and value < 1:
            raise ValueError(f"--config {item!r}: the value must be a positive integer")
        overrides.setdefault(kernel, {})[key] = value
    return overrides


def apply_overrides(overrides: dict[str, dict[str, int]]) -> dict[str, dict[str, Any]]:
    """Sets ``overrides`` (from :func:`parse_overrides`) for the rest of the process; returns a copy of
    every kernel's settings as they now are."""
    configs = kernel_configs()
    for kernel, values in overrides.items():
        configs[kernel].update(values)
    return {name: dict(config) for name, config in configs.items()}


@contextlib.contextmanager
def applied(overrides: dict[str, dict[str, int]]) -> Iterator[dict[str, dict[str, Any]]]:
    """:func:`apply_overrides` for the body only: every kernel's settings are as before afterwards."""
    saved = {name: dict(config) for name, config in kernel_configs().items()}
    try:
        yield apply_overrides(overrides)
    finally:
        for name, config in kernel_configs().items():
            config.clear()
            config.update(saved[name])
