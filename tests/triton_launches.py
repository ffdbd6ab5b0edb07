"""Records the Triton kernel launches the CPU tests make, and compiles them for a GPU target on the CPU.

Under ``TRITON_INTERPRET=1`` every ``@triton.jit`` kernel runs in Triton's interpreter, which skips the
GPU compiler (MLIR passes, LLVM, ptxas): a kernel can pass every interpreter test and still fail to
compile on the GPU. :class:`LaunchRecorder` wraps the interpreter's launch entry point and keeps one
description per distinct :class:`Variant`, the key Triton compiles a kernel for (:func:`variant`:
Triton's own binder on the launch's arguments, honouring the kernel's ``do_not_specialize`` and
``do_not_specialize_on_alignment``); :func:`compile_launches` replays them with ``JITFunction.warmup``
in processes without the interpreter and a stand-in driver whose current target is the given GPU
(default Hopper, sm_90), so Triton's real compiler runs down to the cubin exactly as a launch on that
GPU would, without a GPU. :meth:`LaunchRecorder.variants` collects the variants launched inside a
block (the warm-up test compares those of real steps with the warm-up's).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch


def describe(value):
    """A JSON-able stand-in for one launch argument: tensors by dtype (and ``"aligned": False`` when the
    data pointer is not a multiple of 16 bytes, which Triton specialises on), everything else by value."""
    if isinstance(value, torch.Tensor):
        found = {"tensor": str(value.dtype).removeprefix("torch.")}
        return found if value.data_ptr() % 16 == 0 else {**found, "aligned": False}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    raise TypeError(f"cannot describe a launch argument of type {type(value).__name__}")


@dataclass(frozen=True)
class Variant:
    """What Triton compiles one kernel for: per parameter, in order, ``(name, type:specialisation)``
    (``"i32:D"`` an int divisible by 16, ``"i32:None"`` an int not specialised on, ``"constexpr:1"`` an
    int equal to 1 or a constexpr's value, ``"*bf16:D"`` a 16-byte aligned pointer, ...), and the launch
    options (``num_warps``, ...). Two launches with equal variants run one compiled kernel."""

    kernel: str
    parameters: tuple[tuple[str, str], ...]
    options: tuple[tuple[str, str], ...]

    def differences(self, other: "Variant") -> list[str]:
        """``name: mine != other's`` for each parameter or option that differs."""
        return [f"{name}: {a} != {b}" for (name, a), (_, b) in zip(self.parameters + self.options,
                                                                   other.parameters + other.options) if a != b]


@functools.cache
def _binder(fn, do_not_specialize: tuple, do_not_specialize_on_alignment: tuple):
    """Triton's own argument binder of ``fn`` (``JITFunction.run`` derives its cache key from what it
    returns), with CUDA's integer and pointer specialisation (the base backend's, which CUDA keeps)."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import KernelParam, create_function_from_signature

    signature = inspect.signature(fn)
    params = [KernelParam(i, p, i in do_not_specialize or p.name in do_not_specialize,
                          i in do_not_specialize_on_alignment or p.name in do_not_specialize_on_alignment)
              for i, p in enumerate(signature.parameters.values())]
    return create_function_from_signature(signature, params, BaseBackend), tuple(signature.parameters)


def variant(kernel, args, kwargs, annotations: bool = True) -> Variant:
    """The :class:`Variant` a launch of ``kernel`` (an interpreted ``@triton.jit`` function) with these
    arguments compiles on a GPU; ``annotations=False`` ignores the kernel's ``do_not_specialize`` and
    ``do_not_specialize_on_alignment`` (what it would be without them)."""
    own = getattr(kernel, "kwargs", {}) if annotations else {}
    binder, names = _binder(kernel.fn, tuple(own.get("do_not_specialize") or ()),
                            tuple(own.get("do_not_specialize_on_alignment") or ()))
    _, specialization, options = binder(*args, **kwargs)
    return Variant(f"{kernel.fn.__module__}.{kernel.fn.__name__}",
                   tuple((name, f"{kind}:{value}") for name, (kind, value) in zip(names, specialization)),
                   tuple(sorted((k, str(v)) for k, v in options.items())))


class LaunchRecorder:
    """Wraps ``InterpretedFunction.run`` (every interpreted kernel launch) while installed."""

    def __init__(self):
        self.launches: dict[Variant, dict] = {}
        self._scopes: list[list[tuple[Variant, Variant]]] = []
        self._original = None

    @property
    def installed(self) -> bool:
        return self._original is not None

    def install(self) -> None:
        from triton.runtime.interpreter import InterpretedFunction

        original = self._original = InterpretedFunction.run
        recorder = self

        def run(fn_self, *args, grid, warmup, **kwargs):
            recorder.record(fn_self, args, kwargs)
            return original(fn_self, *args, grid=grid, warmup=warmup, **kwargs)

        InterpretedFunction.run = run

    def uninstall(self) -> None:
        if self._original is not None:
            from triton.runtime.interpreter import InterpretedFunction

            InterpretedFunction.run = self._original
            self._original = None

    def record(self, kernel, args, kwargs) -> None:
        if not kernel.fn.__module__.startswith("rtpurbo_vllm."):
            return
        key = variant(kernel, args, kwargs)
        for scope in self._scopes:
            scope.append((key, variant(kernel, args, kwargs, annotations=False)))
        if key not in self.launches:
            self.launches[key] = {"module": kernel.fn.__module__, "name": kernel.fn.__name__,
                                  "args": [describe(a) for a in args],
                                  "kwargs": {k: describe(v) for k, v in kwargs.items()}}

    @contextlib.contextmanager
    def variants(self):
        """Yields a list that collects, for every launch in the body, ``(variant, variant without the
        kernel's specialisation annotations)`` (:func:`variant`)."""
        if not self.installed:
            raise RuntimeError("the launch recorder is not installed (it records under TRITON_INTERPRET=1 "
                               "on a machine without a GPU)")
        scope: list[tuple[Variant, Variant]] = []
        self._scopes.append(scope)
        try:
            yield scope
        finally:
            self._scopes.remove(scope)


REPLAY = r'''
import importlib, json, sys, traceback
import torch
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import MockTensor

arch, launches = int(sys.argv[1]), json.load(sys.stdin)
SHARED_BYTES_PER_BLOCK = 232448   # sm_90's opt-in maximum of dynamic shared memory per block (227 KB)

class TargetOnlyDriver:
    """Enough of a Triton driver for JITFunction.warmup: a current device, stream and target."""
    def get_current_device(self): return 0
    def get_current_stream(self, device=None): return 0
    def get_current_target(self): return GPUTarget("cuda", arch, 32)

driver.set_active(TargetOnlyDriver())

class UnalignedMockTensor(MockTensor):
    """A tensor argument whose data pointer is not 16-byte aligned."""
    @staticmethod
    def data_ptr(): return 8

def value(v):
    if isinstance(v, dict):
        dtype = getattr(torch, v.get("tensor", v.get("dtype")))
        if "tensor" not in v:
            return dtype
        return MockTensor(dtype) if v.get("aligned", True) else UnalignedMockTensor(dtype)
    return v

failures = []
for launch in launches:
    kernel = getattr(importlib.import_module(launch["module"]), launch["name"])
    try:
        compiled = kernel.warmup(*map(value, launch["args"]), grid=(1,),
                                 **{k: value(v) for k, v in launch["kwargs"].items()})
        error = None
        if compiled.metadata.shared > SHARED_BYTES_PER_BLOCK:
            error = (f"needs {compiled.metadata.shared} bytes of shared memory per program, more than the "
                     f"{SHARED_BYTES_PER_BLOCK} a Hopper SM gives one block: fewer stages or smaller tiles")
    except Exception as exc:
        error = "".join(traceback.format_exception_only(exc))[-4000:]
    if error:
        failures.append({"kernel": f"{launch['module']}.{launch['name']}", "args": launch["args"],
                         "kwargs": launch["kwargs"], "error": error})
print("\nRTPURBO-COMPILE-RESULT " + json.dumps(failures))
'''


def compile_launches(launches: list[dict], arch: int = 90, processes: int = 1, timeout: float = 1800) -> list[dict]:
    """Compiles every launch for ``cuda:arch`` in fresh processes without the interpreter, ``processes`` of
    them at once (the launches dealt out in turn); returns the failures (kernel, arguments, the compiler's
    error, or a shared-memory need over the SM's per-block limit, which a GPU would refuse at launch; a
    replay process that dies or outlives ``timeout`` seconds is one failure for its share of the
    launches), an empty list when all compiled."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    env = {**os.environ, "TRITON_INTERPRET": "0"}

    def replay(group: list[dict]) -> list[dict]:
        try:
            done = subprocess.run([sys.executable, "-P", "-c", REPLAY, str(arch)], input=json.dumps(group),
                                  capture_output=True, text=True, env=env, timeout=timeout,
                                  cwd=Path(__file__).resolve().parent)
        except subprocess.TimeoutExpired:
            error = f"the replay process of {len(group)} launches did not finish within {timeout} s"
        else:
            if done.returncode == 0:
                result = [line for line in done.stdout.splitlines() if line.startswith("RTPURBO-COMPILE-RESULT ")]
                return json.loads(result[-1].split(" ", 1)[1])
            error = (f"the replay process of {len(group)} launches failed (exit {done.returncode}):\n"
                     f"{done.stderr[-4000:]}")
        return [{"kernel": "(the replay process)", "args": [], "kwargs": {}, "error": error}]

    processes = max(1, processes)
    groups = [group for group in (launches[i::processes] for i in range(processes)) if group]
    with ThreadPoolExecutor(max(1, len(groups))) as pool:
        return [failure for failures in pool.map(replay, groups) for failure in failures]


def describe_failure(failure: dict) -> str:
    """One failure of :func:`compile_launches` as text: the kernel, its arguments, the compiler's error."""
    return (f"{failure['kernel']}\n  args {json.dumps(failure['args'])}\n  kwargs {json.dumps(failure['kwargs'])}\n"
            f"{failure['error']}")
