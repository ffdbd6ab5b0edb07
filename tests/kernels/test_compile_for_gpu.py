"""Every Triton kernel launch the CPU tests made compiles for Hopper (sm_90), on the CPU.

The interpreter runs kernels without Triton's GPU compiler, so the other tests cannot see a kernel that
the compiler rejects (Triton 3.6's layout pass once rejected the sink-merge kernel for an int64 index
argument, found only on the GPU). ``tests/conftest.py`` records each distinct launch specialisation of
the session; this test, moved to the end of the session, compiles all of them for ``cuda:90`` down to
the cubin (``tests/triton_launches.py``). Run alone it has nothing to compile and skips.
"""

import json

import pytest


def test_recorded_launches_compile_for_hopper(triton_launch_recorder):
    launches = triton_launch_recorder.launches
    if not launches:
        pytest.skip("no Triton launch recorded (GPU machine, or run without the kernel tests)")
    kernels = sorted({f"{v['module']}.{v['name']}" for v in launches.values()})
    print(f"compiling {len(launches)} launch specialisations of {len(kernels)} kernels for sm_90")
    failures = triton_launch_recorder.compile_all(arch=90)
    assert not failures, "kernels that do not compile for sm_90:\n" + "\n\n".join(
        f"{f['kernel']}\n  args {json.dumps(f['args'])}\n  kwargs {json.dumps(f['kwargs'])}\n{f['error']}"
        for f in failures)
