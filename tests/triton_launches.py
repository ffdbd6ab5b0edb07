"""Records the Triton kernel launches the CPU tests make, and compiles them for a GPU target on the CPU.

Under ``TRITON_INTERPRET=1`` every ``@triton.jit`` kernel runs in Triton's interpreter, which skips the
GPU compiler (MLIR passes, LLVM, ptxas): a kernel can pass every interpreter test and still fail to
compile on the GPU. :class:`LaunchRecorder` wraps the interpreter's launch entry point and keeps one
description per distinct specialisation (kernel, argument dtypes, which ints equal 1 or are multiples
of 16, constexpr values); :func:`compile_launches` replays them with ``JITFunction.warmup`` in a
process without the interpreter and a stand-in driver whose current target is the given GPU (default
Hopper, sm_90), so Triton's real compiler runs down to the cubin exactly as a launch on that GPU
would, without a GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch


def describe(value):
    """A JSON-able stand-in for one launch argument: tensors by dtype (alignment 16 assumed, as for
    PyTorch's CUDA allocations), everything else by value."""
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    raise TypeError(f"cannot describe a launch argument of type {type(value).__name__}")


def _shape_key(value):
    """What Triton specialises a launch on for one described argument."""
    if isinstance(value, bool) or not isinstance(value, int):
        return json.dumps(value, sort_keys=True)
    return f"int:{value == 1}:{value % 16 == 0}:{-2**31 <= value < 2**31}"


class LaunchRecorder:
    """Wraps ``InterpretedFunction.run`` (every interpreted kernel launch) while installed."""

    def __init__(self):
        self.launches: dict[str, dict] = {}
        self._original = None

    def install(self) -> None:
        from triton.runtime.interpreter import InterpretedFunction

        original = self._original = InterpretedFunction.run
        recorder = self

        def run(fn_self, *args, grid, warmup, **kwargs):
            recorder.record(fn_self.fn, args, kwargs)
            return original(fn_self, *args, grid=grid, warmup=warmup, **kwargs)

        InterpretedFunction.run = run

    def uninstall(self) -> None:
        if self._original is not None:
            from triton.runtime.interpreter import InterpretedFunction

            InterpretedFunction.run = self._original
            self._original = None

    def record(self, fn, args, kwargs) -> None:
        if not fn.__module__.startswith("rtpurbo_vllm."):
            return
        launch = {"module": fn.__module__, "name": fn.__name__, "args": [describe(a) for a in args],
                  "kwargs": {k: describe(v) for k, v in kwargs.items()}}
        key = json.dumps([launch["module"], launch["name"], [_shape_key(a) for a in launch["args"]],
                          {k: _shape_key(v) for k, v in launch["kwargs"].items()}], sort_keys=True)
        self.launches.setdefault(key, launch)

    def compile_all(self, arch: int = 90) -> list[dict]:
        """:func:`compile_launches` of every recorded launch."""
        return compile_launches(list(self.launches.values()), arch)


REPLAY = r'''
import importlib, json, sys, traceback
import torch
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import MockTensor

arch, launches = int(sys.argv[1]), json.load(sys.stdin)

class TargetOnlyDriver:
    """Enough of a Triton driver for JITFunction.warmup: a current device, stream and target."""
    def get_current_device(self): return 0
    def get_current_stream(self, device=None): return 0
    def get_current_target(self): return GPUTarget("cuda", arch, 32)

driver.set_active(TargetOnlyDriver())

def value(v):
    if isinstance(v, dict):
        dtype = getattr(torch, v.get("tensor", v.get("dtype")))
        return MockTensor(dtype) if "tensor" in v else dtype
    return v

failures = []
for launch in launches:
    kernel = getattr(importlib.import_module(launch["module"]), launch["name"])
    try:
        kernel.warmup(*map(value, launch["args"]), grid=(1,), **{k: value(v) for k, v in launch["kwargs"].items()})
    except Exception as exc:
        failures.append({"kernel": f"{launch['module']}.{launch['name']}", "args": launch["args"],
                         "kwargs": launch["kwargs"], "error": "".join(traceback.format_exception_only(exc))[-4000:]})
print("\nRTPURBO-COMPILE-RESULT " + json.dumps(failures))
'''


def compile_launches(launches: list[dict], arch: int = 90, timeout: float = 1800) -> list[dict]:
    """Compiles every launch for ``cuda:arch`` in a fresh process without the interpreter; returns the
    failures (kernel, arguments, the compiler's error), an empty list when all compiled."""
    import os

    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-P", "-c", REPLAY, str(arch)], input=json.dumps(launches),
                          capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=Path(__file__).resolve().parent)
    if done.returncode != 0:
        raise RuntimeError(f"the replay process failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    result = [line for line in done.stdout.splitlines() if line.startswith("RTPURBO-COMPILE-RESULT ")]
    return json.loads(result[-1].split(" ", 1)[1])
