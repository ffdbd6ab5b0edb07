"""Shared by the benchmark scripts' tests: the fake ``vllm`` command (``fake_vllm.py``) and a parse of
commands by the installed vLLM's own command line."""

import importlib.util
import json
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Runs ``vllm`` main on each command with the subcommands' work replaced by a probe that records the
# parsed arguments named in argv[2]; prints them as one JSON list.
_PARSE_WITH_VLLM = textwrap.dedent("""
    import json, sys
    from vllm import platforms
    if platforms.current_platform.is_unspecified():   # no GPU here: vLLM's CPU platform builds the parsers
        from vllm.platforms.cpu import CpuPlatform
        platforms.current_platform = CpuPlatform()
    import vllm.entrypoints.cli.serve as serve
    from vllm.entrypoints.cli.benchmark.latency import BenchmarkLatencySubcommand
    from vllm.entrypoints.cli.benchmark.serve import BenchmarkServingSubcommand
    from vllm.entrypoints.cli.main import main
    commands, keys, parsed = json.loads(sys.argv[1]), json.loads(sys.argv[2]), []
    probe = staticmethod(lambda args: parsed.append({k: getattr(args, k, None) for k in keys}))
    serve.ServeSubcommand.cmd = probe
    BenchmarkLatencySubcommand.cmd = probe
    BenchmarkServingSubcommand.cmd = probe
    for argv in commands:
        sys.argv = ["vllm", *argv]
        main()
    print(json.dumps(parsed, default=str))
""")


@pytest.fixture
def fake_vllm() -> str:
    """The ``--vllm`` command (shell-quoted) of the fake vLLM of ``fake_vllm.py``."""
    return shlex.join([sys.executable, str(Path(__file__).with_name("fake_vllm.py"))])


@pytest.fixture
def parse_with_vllm(tmp_path):
    """``parse(commands, keys)``: each command (argv without the ``vllm`` prefix) parsed by the installed
    vLLM's CLI main, as a dict of the argument names ``keys`` (values JSON-able or strings)."""

    def parse(commands: list[list[str]], keys: list[str]) -> list[dict]:
        proc = subprocess.run([sys.executable, "-P", "-c", _PARSE_WITH_VLLM, json.dumps(commands), json.dumps(keys)],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    return parse



@pytest.fixture
def load_benchmark(monkeypatch):
    """``load_benchmark(NAME)``: ``benchmarks/NAME.py`` imported as module ``NAME`` (in ``sys.modules`` for
    the test)."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[2] / "benchmarks"
                                                      / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)
        spec.loader.exec_module(module)
        return module
    return load
