"""The process harness of the benchmarks and GPU end-to-end tests (``rtpurbo_vllm.bench.server``) on the
CPU: fake servers on 127.0.0.1 that start, fail to start, ignore SIGTERM or leave an engine-like child
behind are always stopped, with every process they started."""

import sys
import textwrap
import time

import psutil
import pytest

from rtpurbo_vllm.bench import server


# ---------------------------------------------------------------------------------------------------
# Server lifecycle
# ---------------------------------------------------------------------------------------------------

FAKE_SERVER = textwrap.dedent("""
    import http.server, signal, subprocess, sys, time
    mode, port, pidfile = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if mode == "exit":
        sys.exit(3)
    # A child that outlives a plain kill of the server, like vLLM's engine core process.
    engine = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                               "signal.SIG_IGN); time.sleep(120)"])
    open(pidfile, "w").write(str(engine.pid))
    if mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if mode == "never-healthy":
        time.sleep(120)

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

    http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
""")


def _fake_server(tmp_path, mode):
    port = server.free_port()
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    return [sys.executable, str(script), mode, str(port), str(tmp_path / "engine.pid")], port


def _gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("mode", ["healthy", "ignore-term"])
def test_server_is_stopped_when_the_body_fails(tmp_path, mode):
    argv, port = _fake_server(tmp_path, mode)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="bench failed"):
        with server.running_server(argv, port, tmp_path / "server.log", tmp_path, startup_timeout=20,
                               stop_timeout=0.5) as child:
            assert child.alive()
            engine = int((tmp_path / "engine.pid").read_text())
            raise RuntimeError("bench failed")
    assert not child.alive() and _gone(engine)
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("mode, error", [("exit", "exited with code 3"), ("never-healthy", "not healthy within")])
def test_server_is_stopped_when_it_never_gets_healthy(tmp_path, monkeypatch, mode, error):
    argv, port = _fake_server(tmp_path, mode)
    started = []
    monkeypatch.setattr(server, "Child", lambda *args, _cls=server.Child: started.append(_cls(*args)) or started[-1])
    with pytest.raises((RuntimeError, TimeoutError), match=error):
        with server.running_server(argv, port, tmp_path / "server.log", tmp_path, startup_timeout=2, stop_timeout=0.5):
            pytest.fail("the body must not run")
    assert len(started) == 1 and not started[0].alive()
    if mode == "never-healthy":
        assert _gone(int((tmp_path / "engine.pid").read_text()))


def test_command_timeout_stops_the_command(tmp_path):
    rc = server.run_command([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "c.log", tmp_path,
                        timeout=0.5, stop_timeout=1)
    assert rc == 124
