"""Processes of the benchmarks and the GPU end-to-end tests: ``vllm serve`` started, waited on and
stopped, other ``vllm`` commands run to completion, and a server's ``/metrics`` read.

Every child writes stdout and stderr to a log file, runs in its own process group (so a stop reaches
vLLM's engine-core and worker processes) with :func:`child_env`, and is stopped by pid: SIGTERM to
its group, SIGKILL after a timeout, then SIGKILL to any descendant still running. A server is
reached on 127.0.0.1 only, with no proxy.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

HOST = "127.0.0.1"
# Prometheus names of /metrics (vllm/v1/metrics/loggers.py; a counter gains "_total") -> the keys kept.
SERVER_METRICS = {"vllm:num_preemptions_total": "preemptions", "vllm:kv_cache_usage_perc": "kv_cache_usage"}


def vllm_command() -> list[str]:
    """vLLM's CLI through this interpreter: works where vLLM is only on ``PYTHONPATH`` (no ``vllm``
    script); ``-P`` keeps the working folder, and so this repository's top-level ``triton_kernels``
    folder, off ``sys.path``."""
    return [sys.executable, "-P", "-m", "vllm.entrypoints.cli.main"]


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every child: plain log lines, unbuffered, no proxy for 127.0.0.1 (the
    ``vllm bench serve`` client honours proxy variables) and, unless set, ``VLLM_USE_FLASHINFER_SAMPLER=0``
    (the sampler is not what is measured, and FlashInfer's JIT build of it adds minutes to every engine
    start on a fresh machine); then ``extra``."""
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY", ""), HOST, "localhost"]))
    return {"VLLM_USE_FLASHINFER_SAMPLER": "0", **os.environ, "VLLM_LOGGING_COLOR": "0", "NO_COLOR": "1",
            "PYTHONUNBUFFERED": "1", "NO_PROXY": no_proxy, "no_proxy": no_proxy, **(extra or {})}


def _own_process_group() -> dict[str, Any]:
    """``Popen`` arguments that start the child as the leader of a new process group."""
    if sys.version_info >= (3, 11):
        return {"process_group": 0}
    return {"preexec_fn": os.setpgrp}


class Child:
    """A child process in its own process group, stdout and stderr in ``log`` (its first line is the
    command); :meth:`stop` ends it and its descendants."""

    def __init__(self, argv: list[str], log: Path, cwd: Path, env: Mapping[str, str] | None = None):
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as handle:
            handle.write(shlex.join(argv) + "\n")
            handle.flush()
            self.popen = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, cwd=cwd, env=child_env(env),
                                          stdin=subprocess.DEVNULL, **_own_process_group())
        self.log = log
        self._descendants: dict[int, Any] = {}

    def alive(self) -> bool:
        return self.popen.poll() is None

    def note_descendants(self) -> None:
        """Remembers the processes it started (vLLM's engine core), to stop them even if it dies first."""
        import psutil

        with contextlib.suppress(psutil.NoSuchProcess):
            for proc in psutil.Process(self.popen.pid).children(recursive=True):
                self._descendants[proc.pid] = proc

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float) -> None:
        """SIGTERM to its process group (vLLM then shuts its engine processes down), SIGKILL after
        ``timeout`` seconds; then the same for any descendant still running. Only these processes."""
        import psutil

        if self.alive():
            self.note_descendants()
            self._signal_group(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.popen.wait()
        self._signal_group(signal.SIGKILL)          # members left once the leader is gone
        _, left = psutil.wait_procs(list(self._descendants.values()), timeout=timeout)
        for proc in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(left, timeout=timeout)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def _get(url: str, timeout: float) -> tuple[int, str]:
    """``GET url`` with no proxy: ``(status, body)``; raises ``OSError`` when it cannot connect."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as response:
        return response.status, response.read().decode(errors="replace")


def wait_healthy(child: Child, port: int, timeout: float) -> None:
    """Polls ``http://127.0.0.1:port/health`` (every 0.1 s, backing off to 2 s) until 200; raises
    ``RuntimeError`` when ``child`` exits and ``TimeoutError`` after ``timeout`` seconds."""
    deadline, poll = time.monotonic() + timeout, 0.1
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"the server exited with code {child.popen.returncode} before it was healthy; "
                               f"last lines of {child.log}:\n{child.tail()}")
        with contextlib.suppress(OSError):
            if _get(f"http://{HOST}:{port}/health", timeout=5)[0] == 200:
                return
        time.sleep(poll)
        poll = min(2.0, poll * 1.5)
    raise TimeoutError(f"the server was not healthy within {timeout:.0f} s; last lines of {child.log}:\n"
                       f"{child.tail()}")


@contextlib.contextmanager
def running_server(argv: list[str], port: int, log: Path, cwd: Path, startup_timeout: float,
                   stop_timeout: float, env: Mapping[str, str] | None = None) -> Iterator[Child]:
    """Starts the server ``argv`` (listening on ``port``), waits for health and yields it; always stops
    it on the way out."""
    child = Child(argv, log, cwd, env)
    try:
        wait_healthy(child, port, startup_timeout)
        child.note_descendants()
        yield child
    finally:
        child.stop(stop_timeout)


def run_command(argv: list[str], log: Path, cwd: Path, timeout: float, stop_timeout: float) -> int:
    """Runs one command to completion; its exit code, or 124 when stopped after ``timeout`` seconds."""
    child = Child(argv, log, cwd)
    try:
        return child.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        return 124
    finally:
        child.stop(stop_timeout)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def parse_server_metrics(text: str, names: Mapping[str, str] = SERVER_METRICS) -> dict[str, float]:
    """The metrics kept from a server's Prometheus ``/metrics`` text, each summed over label sets and
    stored under its key in ``names`` (Prometheus name -> key); a metric the text lacks is left out. By
    default ``preemptions`` (``vllm:num_preemptions_total``) and ``kv_cache_usage``
    (``vllm:kv_cache_usage_perc``, a share in [0, 1]; 0 once every request's blocks are back in the pool)."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]     # "name{labels} value" or "name value"
        if line.startswith("#") or name not in names:
            continue
        value = float(line.rsplit(" ", 1)[-1])
        found[names[name]] = found.get(names[name], 0.0) + value
    return found


def server_metrics(port: int, names: Mapping[str, str] = SERVER_METRICS) -> dict[str, float]:
    """:func:`parse_server_metrics` of ``http://127.0.0.1:port/metrics`` (empty if it cannot be read)."""
    try:
        return parse_server_metrics(_get(f"http://{HOST}:{port}/metrics", timeout=10)[1], names)
    except OSError:
        return {}


INTERRUPTED = "interrupted (Ctrl-C or SIGTERM, e.g. a timeout)"
"""The error a benchmark records for the run or phase that :func:`stop_on_sigterm`'s interrupt cut short."""


def stop_on_sigterm() -> None:
    """Makes SIGTERM (a job manager's stop, ``timeout``) unwind like Ctrl-C, so every ``finally`` runs and
    every server is stopped on the way out."""

    def interrupt(signum, frame) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def post_all(port: int, path: str, bodies: Sequence[Mapping[str, Any]], *, concurrency: int = 16,
             timeout: float = 600.0) -> list[dict[str, Any]]:
    """POSTs each JSON body to ``http://127.0.0.1:port{path}`` (e.g. ``/v1/completions``) through the
    evaluation's OpenAI-API client (:mod:`rtpurbo_vllm.eval.client`: its timeouts and retries), at most
    ``concurrency`` at once, and returns the parsed replies in the order of ``bodies``.

    Raises:
        RuntimeError: a request failed (the first failure is named).
    """
    import asyncio

    import aiohttp

    from rtpurbo_vllm.eval.client import ClientConfig, _call

    config = ClientConfig(concurrency=concurrency, timeout_s=timeout)
    url = f"http://{HOST}:{port}{path}"

    async def send_all() -> list[tuple[dict | None, Any]]:
        gate = asyncio.Semaphore(concurrency)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:
            async def one(body: Mapping[str, Any]):
                async with gate:
                    return await _call(http, "POST", url, dict(body), config)

            return list(await asyncio.gather(*(one(body) for body in bodies)))

    replies = []
    for body, outcome in asyncio.run(send_all()):
        if outcome.error is not None:
            raise RuntimeError(f"POST {url} failed: {outcome.error}")
        replies.append(body)
    return replies


@contextlib.contextmanager
def metric_peaks(port: int, names: Mapping[str, str], interval: float = 0.5) -> Iterator[dict[str, float]]:
    """Reads ``/metrics`` every ``interval`` seconds in a background thread while the body runs; yields a
    dict that holds, under each key of ``names``, the highest value seen (e.g. the most requests
    running at once: ``{"vllm:num_requests_running": "max_running"}``), complete once the body is done."""
    import threading

    peaks: dict[str, float] = {}
    done = threading.Event()

    def sample() -> None:
        while True:
            for key, value in server_metrics(port, names).items():
                peaks[key] = max(peaks.get(key, value), value)
            if done.wait(interval):
                return

    thread = threading.Thread(target=sample, name="metric-peaks", daemon=True)
    thread.start()
    try:
        yield peaks
    finally:
        done.set()
        thread.join()
