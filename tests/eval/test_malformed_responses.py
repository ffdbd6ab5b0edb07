"""Malformed server answers against the client and ``rtpurbo-eval``: each becomes that sample's
``bad_response`` error and the report is still written.

The server is a raw asyncio socket server on 127.0.0.1 (not an HTTP framework), so that it can send
what no framework would: bytes that are not HTTP, invalid UTF-8, a redirect loop, odd JSON.
"""

import asyncio
import json
import socket
import threading

import pytest

from rtpurbo_vllm.eval.cli import main
from rtpurbo_vllm.eval.client import ClientConfig, Endpoint, complete_all, resolve_model
from rtpurbo_vllm.eval.tasks import TaskGenerator, load_tokenizer
from tests.eval.test_client import LENGTHS, TASKS, tokenizer_dir  # noqa: F401  (a fixture)

FAST = dict(timeout_s=5.0, retries=2, backoff_s=0.01, concurrency=2)


def http(status: int, body: bytes | str | object, headers: dict[str, str] | None = None) -> bytes:
    """A raw HTTP/1.1 response; a body that is not bytes or str is sent as JSON."""
    if not isinstance(body, (bytes, str)):
        body = json.dumps(body)
    body = body.encode() if isinstance(body, str) else body
    head = {"Content-Type": "application/json", "Content-Length": str(len(body)), "Connection": "close",
            **(headers or {})}
    reason = {200: "OK", 302: "Found"}.get(status, "Error")
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{k}: {v}" for k, v in head.items()), "", ""]
    return "\r\n".join(lines).encode() + body


def completion(text: str, usage: object = None) -> dict:
    return {"choices": [{"index": 0, "text": text}], "usage": {"prompt_tokens": 3} if usage is None else usage}


class RawServer:
    """Answers each request with ``reply(method, path, json_body)`` -> raw bytes, one request per
    connection; bound to a free port of 127.0.0.1, served from a background thread."""

    def __init__(self, reply):
        self.reply = reply
        self.requests = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            method, path = head.split(b" ")[:2]
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            body = json.loads(await reader.readexactly(length)) if length else None
            self.requests += 1
            writer.write(self.reply(method.decode(), path.decode(), body))
            await writer.drain()
        finally:
            writer.close()

    def __enter__(self) -> "RawServer":
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % sock.getsockname()[1]
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, sock=sock), self._loop).result(10)
        return self

    def __exit__(self, *exc) -> None:
        async def stop():
            self._server.close()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


MALFORMED = [
    ("invalid-utf8", http(200, b'{"choices": [{"text": "\xff\xfe"}]}'), "not UTF-8 JSON"),
    ("not-json", http(200, "<html>busy</html>"), "not UTF-8 JSON"),
    ("not-http", b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "not a valid HTTP answer"),
    ("redirect-loop", http(302, "", {"Location": "/v1/completions"}), "not a valid HTTP answer"),
    ("body-a-list", http(200, [1, 2]), "the body is a JSON list"),
    ("no-choices", http(200, {"choices": []}), "choices is not a non-empty list"),
    ("text-a-number", http(200, {"choices": [{"text": 7}]}), "choices[0].text is not a string"),
    ("usage-a-list", http(200, completion("ok", usage=[1])), "usage is a list"),
    ("prompt-tokens-a-string", http(200, completion("ok", usage={"prompt_tokens": "12"})),
     "usage.prompt_tokens is '12'"),
    ("prompt-tokens-nan", http(200, '{"choices": [{"text": "ok"}], "usage": {"prompt_tokens": NaN}}'),
     "usage.prompt_tokens is nan"),
    ("prompt-tokens-negative", http(200, completion("ok", usage={"prompt_tokens": -1})),
     "usage.prompt_tokens is -1"),
]


@pytest.mark.parametrize("raw, message", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_answer_is_the_samples_error(raw, message):
    """The bad answer is reported as ``bad_response`` (not retried), the good one next to it is kept
    (a redirect is followed as a GET without a body, which gets the same redirect)."""
    def reply(method, path, body):
        return raw if body is None or body["prompt"] == "bad" else http(200, completion(f"echo {body['prompt']}"))

    with RawServer(reply) as server:
        bad, good = complete_all(Endpoint.parse(server.url, "m"), [("bad", 8), ("good", 8)],
                                 ClientConfig(**FAST), progress=False)
    assert (bad.kind, bad.attempts, bad.text) == ("bad_response", 1, "")
    assert message in bad.error
    assert (good.text, good.error, good.prompt_tokens) == ("echo good", None, 3)


def test_chat_content_must_be_a_string():
    with RawServer(lambda *_: http(200, {"choices": [{"message": {"content": ["x"]}}]})) as server:
        (out,) = complete_all(Endpoint.parse(server.url, "m"), [("p", 8)], ClientConfig(api="chat", **FAST),
                              progress=False)
    assert out.kind == "bad_response" and "message.content is not a string" in out.error


@pytest.mark.parametrize("models, message", [
    ([{"id": "m"}], "not an OpenAI model list: [{\"id\": \"m\"}]"),
    ('"m"', "not an OpenAI model list: \"m\""),               # a JSON string
    ({"data": None}, "not an OpenAI model list"),
    ({"data": [{"id": 3}, "m"]}, "no model listed"),
], ids=["a-list", "a-string", "data-null", "no-usable-id"])
def test_malformed_model_list_is_a_clear_error(models, message):
    with RawServer(lambda *_: http(200, models)) as server:
        with pytest.raises(ValueError, match="cannot list the models") as info:
            resolve_model(Endpoint.parse(server.url), ClientConfig(**FAST))
    assert message in str(info.value) and "pass --model" in str(info.value)


def test_cli_writes_the_report_despite_a_malformed_answer(tokenizer_dir, tmp_path, capsys):  # noqa: F811
    """Three good answers, then one in invalid UTF-8, then a non-HTTP reply: exit 0, a report with
    the good scores and two listed failures."""
    gen = TaskGenerator(load_tokenizer(tokenizer_dir))
    samples = gen.generate(TASKS.split(","), LENGTHS, 2, seed=7)
    answers = {s.prompt: " , ".join(s.answers) for s in samples}
    order = [s.prompt for s in samples]

    def reply(method, path, body):
        if path == "/v1/models":
            return http(200, {"data": [{"id": "fake"}]})
        index = order.index(body["prompt"])
        if index == 3:
            return http(200, b'{"choices": [{"text": "\xff"}]}')
        if index == 4:
            return b"garbage\r\n\r\n"
        return http(200, completion(answers[body["prompt"]], usage={"prompt_tokens": 5}))

    with RawServer(reply) as server:
        args = ["--endpoint", f"raw={server.url}", "--tokenizer", tokenizer_dir, "--tasks", TASKS,
                "--lengths", ",".join(map(str, LENGTHS)), "--samples", "2", "--seed", "7", "--concurrency", "1",
                "--max-tokens", "8", "--backoff", "0.01", "--out", str(tmp_path), "--no-progress"]
        assert main(args) == 0
    (path,) = tmp_path.glob("eval-*-raw.json")
    results = json.loads(path.read_text())
    assert [(f["index"], f["kind"]) for f in results["failures"]] == [(1, "bad_response"), (0, "bad_response")]
    assert sum(o["outputs"]["raw"]["score"] for o in results["samples"]) == len(samples) - 2
    assert "not UTF-8 JSON" in path.with_suffix(".md").read_text()
    assert "Failed requests (2" in capsys.readouterr().out


def test_cli_checks_the_output_folder_before_any_request(tokenizer_dir, tmp_path, capsys):  # noqa: F811
    (tmp_path / "file").write_text("x")
    with RawServer(lambda *_: http(200, {"data": [{"id": "fake"}]})) as server:
        args = ["--endpoint", server.url, "--tokenizer", tokenizer_dir, "--tasks", "niah_single",
                "--lengths", "300", "--samples", "1", "--out", str(tmp_path / "file" / "sub"), "--no-progress"]
        assert main(args) == 2
        assert server.requests == 0
    err = capsys.readouterr().err
    assert f"rtpurbo-eval: error: output folder {tmp_path / 'file' / 'sub'} is not writable" in err
    assert "is a file" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
