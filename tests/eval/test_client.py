"""The client (rtpurbo_vllm.eval.client) and the ``rtpurbo-eval`` CLI against fake OpenAI-compatible
servers: real HTTP on 127.0.0.1, an aiohttp app on its own event loop in a background thread.

Each server answers according to a ``behaviour(prompt, attempt)`` function (``attempt`` counts the
requests for that prompt, from 1): a string is the completion text, an int an HTTP error status, a
float a number of seconds to sleep before answering.
"""

import asyncio
import json
import re
import socket
import threading
import time

import pytest
from aiohttp import web
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rtpurbo_vllm.eval.cli import main
from rtpurbo_vllm.eval.client import ClientConfig, Endpoint, complete_all, resolve_model
from rtpurbo_vllm.eval.tasks import TaskGenerator, load_tokenizer
from rtpurbo_vllm.eval.words import BUILTIN_WORDS

FAST = dict(timeout_s=5.0, retries=3, backoff_s=0.01, concurrency=4)


class FakeServer:
    """``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions`` on a free port of 127.0.0.1."""

    def __init__(self, behaviour, model="fake-model"):
        self.behaviour, self.model = behaviour, model
        self.prompts: list[str] = []          # every request's prompt, in arrival order
        self.max_tokens: list[int] = []       # and its generation budget
        self.in_flight = self.max_in_flight = 0

    async def _complete(self, request: web.Request) -> web.Response:
        body = await request.json()
        chat = "messages" in body
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        self.prompts.append(prompt)
        self.max_tokens.append(body.get("max_tokens"))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            action = self.behaviour(prompt, self.prompts.count(prompt))
            if isinstance(action, float):
                await asyncio.sleep(action)
                action = "late"
            if isinstance(action, int):
                return web.json_response({"error": {"message": f"fake {action}"}}, status=action)
            choice = {"message": {"role": "assistant", "content": action}} if chat else {"text": action}
            return web.json_response({"model": body["model"], "choices": [{"index": 0, **choice}],
                                      "usage": {"prompt_tokens": len(prompt.split()) + 1}})
        finally:
            self.in_flight -= 1

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def _start(self) -> None:
        app = web.Application()
        app.add_routes([web.get("/v1/models", self._models), web.post("/v1/completions", self._complete),
                        web.post("/v1/chat/completions", self._complete)])
        self._runner = web.AppRunner(app, handler_cancellation=True)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    def __enter__(self) -> "FakeServer":
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return "http://127.0.0.1:%d" % s.getsockname()[1]


def _run(server_url, prompts, api="completions", **overrides):
    config = ClientConfig(api=api, **{**FAST, **overrides})
    endpoint = resolve_model(Endpoint.parse(server_url), config)
    return complete_all(endpoint, [(p, 8) for p in prompts], config, progress=False)


def test_answers_come_back_in_order_for_both_apis():
    with FakeServer(lambda prompt, attempt: f"echo {prompt}") as server:
        for api in ("completions", "chat"):
            out = _run(server.url, ["a b", "c", "d e f"], api=api)
            assert [c.text for c in out] == ["echo a b", "echo c", "echo d e f"]
            assert [c.prompt_tokens for c in out] == [3, 2, 4]
            assert all(c.error is None and c.attempts == 1 for c in out)
        assert resolve_model(Endpoint.parse(server.url), ClientConfig()).model == "fake-model"


def test_5xx_and_429_are_retried_with_backoff():
    def behaviour(prompt, attempt):
        return (500 if prompt.startswith("flaky") else 429) if attempt < 3 else "ok"

    with FakeServer(behaviour) as server:
        out = _run(server.url, ["flaky", "busy"])
        assert [(c.text, c.error, c.attempts) for c in out] == [("ok", None, 3), ("ok", None, 3)]
        assert out[0].latency_s >= 0.01 + 0.02               # two back-off waits
        out = _run(server.url, ["flaky again"], retries=1)
        assert out[0].kind == "http" and out[0].attempts == 2
        assert out[0].error.startswith("HTTP 500") and "gave up after 2 attempts" in out[0].error


def test_4xx_is_not_retried_and_is_reported():
    with FakeServer(lambda prompt, attempt: 400) as server:
        (out,) = _run(server.url, ["too long"])
        assert (out.kind, out.attempts, out.text) == ("http", 1, "")
        assert out.error.startswith("HTTP 400") and "fake 400" in out.error
        assert server.prompts == ["too long"]


def test_slow_answer_is_a_timeout():
    with FakeServer(lambda prompt, attempt: 3.0 if prompt == "slow" else "ok") as server:
        start = time.perf_counter()
        slow, fast = _run(server.url, ["slow", "fast"], timeout_s=0.5)
        assert time.perf_counter() - start < 2.5
        assert (slow.kind, slow.attempts, slow.error) == ("timeout", 1, "no answer within 0.5 s")
        assert fast.text == "ok" and fast.error is None
        assert server.prompts.count("slow") == 1


def test_connection_errors_are_retried_then_reported():
    config = ClientConfig(**FAST)
    out = complete_all(Endpoint.parse(_closed_port_url(), "m"), [("p", 8)], config, progress=False)
    assert out[0].kind == "connection" and out[0].attempts == 4 and "gave up after 4 attempts" in out[0].error
    with pytest.raises(ValueError, match="cannot list the models"):
        resolve_model(Endpoint.parse(_closed_port_url()), config)


def test_concurrency_is_bounded():
    with FakeServer(lambda prompt, attempt: 0.05) as server:
        out = _run(server.url, [f"p{i}" for i in range(12)], concurrency=3)
        assert all(c.text == "late" for c in out)
        assert 2 <= server.max_in_flight <= 3


# -- the CLI end to end ------------------------------------------------------------------------------
TASKS = "niah_single,niah_multikey,vt"
LENGTHS = [300, 600]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A word-level tokenizer (digits split, built-in words, terse markers) saved to a folder."""
    vocab = ["<unk>", *"0123456789", "key", "value", "query", ":", ".", ",", *BUILTIN_WORDS[:300]]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    path = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)
    return str(path)


def _oracle(tokenizer_dir, seed):
    """``behaviour`` answering every prompt the CLI will send with all its expected strings."""
    gen = TaskGenerator(load_tokenizer(tokenizer_dir))
    answers = {s.prompt: " , ".join(s.answers) for s in gen.generate(TASKS.split(","), LENGTHS, 2, seed)}
    return lambda prompt, attempt: answers[prompt]


def _cli_args(tokenizer_dir, out_dir, *endpoints):
    return [*endpoints, "--tokenizer", tokenizer_dir, "--tasks", TASKS, "--lengths", ",".join(map(str, LENGTHS)),
            "--samples", "2", "--seed", "7", "--max-tokens", "8", "--backoff", "0.01", "--timeout", "5",
            "--out", str(out_dir), "--metadata", "note=test", "--no-progress"]


def test_cli_single_endpoint(tokenizer_dir, tmp_path, capsys):
    oracle = _oracle(tokenizer_dir, seed=7)
    first = {}

    def flaky_oracle(prompt, attempt):           # the first prompt fails once with a 503, then succeeds
        first.setdefault("prompt", prompt)
        return 503 if prompt == first["prompt"] and attempt == 1 else oracle(prompt, attempt)

    with FakeServer(flaky_oracle) as server:
        assert main(_cli_args(tokenizer_dir, tmp_path, "--endpoint", f"tiny={server.url}")) == 0
    (path,) = tmp_path.glob("eval-*-tiny.json")
    results = json.loads(path.read_text())
    assert [(r["task"], r["length"], r["n"], r["accuracy"], r["errors"]) for r in results["scores"]["tiny"]] == [
        (t, n, 2, 1.0, 0) for t in TASKS.split(",") for n in LENGTHS] + [("mean", n, 6, 1.0, 0) for n in LENGTHS]
    env = results["environment"]
    assert (env["seed"], env["lengths"], env["template"], env["metadata"]) == (7, LENGTHS, "terse", {"note": "test"})
    assert results["endpoints"][0]["model"] == "fake-model" and results["endpoints"][0]["retried"] == 1
    assert len(results["samples"]) == 12 and results["failures"] == []
    out = capsys.readouterr().out
    assert "## Accuracy of tiny" in out and str(path) in out
    assert path.with_suffix(".md").read_text() in out


def test_cli_compare_sends_identical_prompts(tokenizer_dir, tmp_path):
    oracle = _oracle(tokenizer_dir, seed=7)
    refused = TaskGenerator(load_tokenizer(tokenizer_dir)).sample("niah_multikey", LENGTHS[1], 1, seed=7).prompt

    def wrong(prompt, attempt):                      # fails vt, and refuses one niah_multikey prompt
        if re.search(r"query value \d+ : key$", prompt):
            return "nothing"
        return 400 if prompt == refused else oracle(prompt, attempt)

    with FakeServer(oracle) as good, FakeServer(wrong) as bad:
        args = _cli_args(tokenizer_dir, tmp_path, "--compare", f"rtpurbo={good.url}", f"flash={bad.url}")
        assert main(args) == 0
        assert sorted(good.prompts) == sorted(bad.prompts) and len(good.prompts) == 12
    (path,) = tmp_path.glob("eval-*-rtpurbo-vs-flash.json")
    results = json.loads(path.read_text())
    rows = {(r["task"], r["length"]): r for r in results["comparison"]}
    assert rows["niah_single", 300] == {"task": "niah_single", "length": 300, "n": 2, "rtpurbo": 1.0, "flash": 1.0,
                                       "diff": 0.0, "errors rtpurbo": 0, "errors flash": 0}
    assert rows["vt", 600]["flash"] == 0.0 and rows["vt", 600]["diff"] == -1.0
    assert rows["niah_multikey", 600]["flash"] == 0.5 and rows["niah_multikey", 600]["errors flash"] == 1
    assert [(f["endpoint"], f["task"], f["length"], f["index"], f["kind"]) for f in results["failures"]] == [
        ("flash", "niah_multikey", 600, 1, "http")]


def test_cli_reports_bad_input(tokenizer_dir, tmp_path, capsys):
    assert main(_cli_args(tokenizer_dir, tmp_path, "--endpoint", _closed_port_url())) == 2
    assert "cannot list the models" in capsys.readouterr().err
    with FakeServer(lambda prompt, attempt: "x") as server:
        args = _cli_args(tokenizer_dir, tmp_path, "--compare", server.url, server.url)
        assert main(args) == 2
        assert "name them" in capsys.readouterr().err
        assert main([*_cli_args(tokenizer_dir, tmp_path, "--endpoint", server.url), "--tasks", "cwe"]) == 2
        assert "leave cwe out of --tasks" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit):
        main(["--help"])


def test_cli_tiny_model_defaults(tmp_path):
    """``--tokenizer rtpurbo_vllm/tiny/model`` with no task options: the tiny model's two tasks in its
    own format, budget 8; an answer in the model's style (``9 3 8 . the``) scores 1."""
    from rtpurbo_vllm.tiny import tiny_model_dir

    tiny = str(tiny_model_dir())
    if not (tiny_model_dir() / "tokenizer.json").exists():
        pytest.skip("the tiny model is not trained in this checkout")
    gen = TaskGenerator(load_tokenizer(tiny))
    answers = {s.prompt: s.answers[0] for s in gen.generate(["niah_single", "niah_multikey"], [512], 2, seed=0)}

    def model(prompt, attempt):
        return f" {answers[prompt]} . the cat"

    def off_by_one(prompt, attempt):              # the first digit wrong
        first, rest = answers[prompt].split(" ", 1)
        return f" {(int(first) + 1) % 10} {rest} . the cat"

    with FakeServer(model) as good, FakeServer(off_by_one) as bad:
        args = ["--compare", f"rtpurbo={good.url}", f"flash={bad.url}", "--tokenizer", tiny, "--lengths", "512",
                "--samples", "2", "--out", str(tmp_path), "--no-progress"]
        assert main(args) == 0
        assert sorted(good.prompts) == sorted(answers) and set(good.max_tokens) == {8}
    (path,) = tmp_path.glob("eval-*-rtpurbo-vs-flash.json")
    results = json.loads(path.read_text())
    env = results["environment"]
    assert (env["template"], env["vocab"], env["filler"], env["tasks"]) == (
        "terse", "tiny", "skip-bigram", ["niah_single", "niah_multikey"])
    assert [(r["task"], r["rtpurbo"], r["flash"]) for r in results["comparison"]] == [
        ("niah_single", 1.0, 0.0), ("niah_multikey", 1.0, 0.0), ("mean", 1.0, 0.0)]
