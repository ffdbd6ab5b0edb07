"""Async client of an OpenAI-compatible server (``vllm serve``): ``/v1/completions`` or
``/v1/chat/completions``, greedy decoding.

At most ``concurrency`` requests are in flight. Each attempt has a wall-clock ``timeout_s``.
Connection errors, HTTP 429 and 5xx are retried up to ``retries`` times with exponential backoff
(``backoff_s``, doubled each time; a numeric ``Retry-After`` of a 429 is honoured). Other HTTP
errors (4xx) and timeouts are not retried: a 4xx will not change, and a timed-out long prompt
would only time out again. Every failure comes back as a :class:`Completion` with ``error`` and
``kind`` set, never as an exception, so that it can be counted and listed: that includes malformed
answers (a reply that is not HTTP, a redirect loop, a body that is not UTF-8 JSON, a JSON body
without the expected fields or with a ``usage`` that is not a count), which are ``bad_response``
and are not retried.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, replace
from typing import Any, Sequence
from urllib.parse import urlsplit

API_CHOICES = ("completions", "chat")
MAX_RETRY_AFTER_S = 60.0


@dataclass(frozen=True)
class Endpoint:
    """A server under test.

    Attributes:
        name: label in reports (``NAME=`` of the command line, else ``host:port``).
        url: base URL ending in ``/v1``.
        model: served model name; ``None`` until :func:`resolve_model` asks the server.
    """

    name: str
    url: str
    model: str | None = None

    @classmethod
    def parse(cls, spec: str, model: str | None = None) -> "Endpoint":
        """``[NAME=]URL``, e.g. ``rtpurbo=http://127.0.0.1:8000`` (``/v1`` is appended if missing).

        Raises:
            ValueError: the URL is not ``http(s)://host[:port][/path]``.
        """
        name, sep, url = spec.partition("=")
        if not sep or "://" in name:
            name, url = "", spec
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"endpoint {spec!r} is not [NAME=]http(s)://HOST:PORT; fix: e.g. "
                             "rtpurbo=http://127.0.0.1:8000")
        url = url.rstrip("/")
        if not url.endswith("/v1"):
            url += "/v1"
        return cls(name=name or parts.netloc, url=url, model=model)


@dataclass(frozen=True)
class ClientConfig:
    """How requests are sent (see the module docstring for the retry rules).

    Raises:
        ValueError: a value out of range.
    """

    api: str = "completions"
    concurrency: int = 16
    timeout_s: float = 600.0
    retries: int = 3
    backoff_s: float = 1.0
    api_key: str | None = None

    def __post_init__(self) -> None:
        if self.api not in API_CHOICES:
            raise ValueError(f"api={self.api!r}; fix: one of {', '.join(API_CHOICES)}")
        if self.concurrency < 1 or self.timeout_s <= 0 or self.retries < 0 or self.backoff_s < 0:
            raise ValueError(f"concurrency={self.concurrency}, timeout={self.timeout_s}, retries={self.retries}, "
                             f"backoff={self.backoff_s}; fix: concurrency >= 1, timeout > 0, retries >= 0, "
                             "backoff >= 0")


@dataclass(frozen=True)
class Completion:
    """The outcome of one request.

    Attributes:
        text: generated text ("" when the request failed).
        error: ``None`` on success, else what went wrong (``HTTP 400: ...``, ``no answer within 30 s``).
        kind: ``None``, ``"timeout"``, ``"http"``, ``"connection"`` or ``"bad_response"``.
        attempts: requests sent (1 + retries used).
        latency_s: wall-clock seconds over all attempts and back-off waits.
        prompt_tokens: ``usage.prompt_tokens`` the server reported, if any.
    """

    text: str
    error: str | None = None
    kind: str | None = None
    attempts: int = 1
    latency_s: float = 0.0
    prompt_tokens: int | None = None


def resolve_model(endpoint: Endpoint, config: ClientConfig) -> Endpoint:
    """``endpoint`` with ``model`` set: unchanged if given, else the first model of ``GET /v1/models``.

    Raises:
        ValueError: the model list cannot be fetched or is empty.
    """
    if endpoint.model is not None:
        return endpoint

    async def fetch() -> tuple[dict | None, Completion]:
        async with _http_client(config) as http:
            return await _call(http, "GET", endpoint.url + "/models", None, config)

    body, outcome = asyncio.run(fetch())
    models = _model_ids(body)
    if outcome.error is not None or not models:
        problem = outcome.error or ("no model listed" if isinstance(models, list) else
                                    f"not an OpenAI model list: {_excerpt(body)}")
        raise ValueError(f"cannot list the models of {endpoint.name} at {endpoint.url}/models "
                         f"({problem}); fix: check that the server is up, or pass --model")
    return replace(endpoint, model=models[0])


def _model_ids(body: Any) -> list[str] | None:
    """The ``id`` strings of a ``/v1/models`` body ``{"data": [{"id": ...}, ...]}``; ``None`` when the
    body does not have that form."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        return None
    return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str) and m["id"]]


def complete_all(endpoint: Endpoint, requests: Sequence[tuple[str, int]], config: ClientConfig,
                 progress: bool = True) -> list[Completion]:
    """Sends every ``(prompt, max_tokens)`` to ``endpoint`` (whose ``model`` must be set) and returns
    the completions in request order, failures included."""
    if endpoint.model is None:
        raise ValueError(f"endpoint {endpoint.name} has no model; fix: resolve_model() first")
    return asyncio.run(_complete_all(endpoint, requests, config, progress))


async def _complete_all(endpoint: Endpoint, requests: Sequence[tuple[str, int]], config: ClientConfig,
                        progress: bool) -> list[Completion]:
    from tqdm import tqdm

    path = "/completions" if config.api == "completions" else "/chat/completions"
    gate = asyncio.Semaphore(config.concurrency)
    bar = tqdm(total=len(requests), desc=endpoint.name, unit="req", disable=not progress)
    failed = 0

    async def one(http, prompt: str, max_tokens: int) -> Completion:
        nonlocal failed
        payload: dict[str, Any] = {"model": endpoint.model, "max_tokens": max_tokens, "temperature": 0.0}
        if config.api == "completions":
            payload["prompt"] = prompt
        else:
            payload["messages"] = [{"role": "user", "content": prompt}]
        async with gate:
            body, outcome = await _call(http, "POST", endpoint.url + path, payload, config)
        if outcome.error is None:
            outcome = _parse(body, outcome, config.api)
        failed += outcome.error is not None
        bar.update(1)
        bar.set_postfix(errors=failed, refresh=False)
        return outcome

    try:
        async with _http_client(config) as http:
            return list(await asyncio.gather(*(one(http, p, m) for p, m in requests)))
    finally:
        bar.close()


def _http_client(config: ClientConfig):
    import aiohttp

    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    return aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=config.concurrency))


async def _call(http, method: str, url: str, payload: dict | None,
                config: ClientConfig) -> tuple[dict | None, Completion]:
    """One request with retries: ``(parsed JSON body or None, outcome)``; ``outcome.text`` is empty."""
    import aiohttp

    start = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=config.timeout_s)
    error = kind = ""
    for attempt in range(1, config.retries + 2):
        wait = config.backoff_s * 2 ** (attempt - 1)
        try:
            async with http.request(method, url, json=payload, timeout=timeout) as resp:
                raw = await resp.read()
                if 200 <= resp.status < 300:
                    try:
                        return json.loads(raw), Completion("", attempts=attempt,
                                                           latency_s=time.perf_counter() - start)
                    except (ValueError, RecursionError) as exc:      # not UTF-8, not JSON, nested too deep
                        error, kind = f"response is not UTF-8 JSON ({exc}): {_excerpt(raw)}", "bad_response"
                        break
                error, kind = f"HTTP {resp.status}: {raw.decode('utf-8', 'replace')[:300]}", "http"
                if resp.status != 429 and resp.status < 500:
                    break
                retry_after = resp.headers.get("Retry-After", "")
                if resp.status == 429 and retry_after.replace(".", "", 1).isdigit():
                    wait = max(wait, min(float(retry_after), MAX_RETRY_AFTER_S))
        except asyncio.TimeoutError:
            error, kind = f"no answer within {config.timeout_s:g} s", "timeout"
            break
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            error, kind = f"{type(exc).__name__}: {exc}", "connection"
        except aiohttp.ClientError as exc:         # not an HTTP reply, too many redirects, bad headers
            error, kind = f"not a valid HTTP answer ({type(exc).__name__}: {exc})", "bad_response"
            break
        if attempt <= config.retries:
            await asyncio.sleep(wait)
    else:
        error += f" (gave up after {attempt} attempts)"
    return None, Completion("", error=error, kind=kind, attempts=attempt, latency_s=time.perf_counter() - start)


def _parse(body: Any, outcome: Completion, api: str) -> Completion:
    """``outcome`` with the generated text and ``usage.prompt_tokens`` of a successful response's JSON
    ``body``; a body of another form makes ``outcome`` a ``bad_response`` error naming the field."""
    problem = _completion_problem(body, api)
    if problem is not None:
        return replace(outcome, error=f"unexpected response ({problem}): {_excerpt(body)}", kind="bad_response")
    choice, usage = body["choices"][0], body.get("usage") or {}
    text = choice["text"] if api == "completions" else choice["message"].get("content") or ""
    return replace(outcome, text=text, prompt_tokens=usage.get("prompt_tokens"))


def _completion_problem(body: Any, api: str) -> str | None:
    """What makes ``body`` not an OpenAI completion of ``api``, or ``None``."""
    if not isinstance(body, dict):
        return f"the body is a JSON {type(body).__name__}, not an object"
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return "choices is not a non-empty list of objects"
    if api == "completions":
        if not isinstance(choices[0].get("text"), str):
            return "choices[0].text is not a string"
    else:
        message = choices[0].get("message")
        if not isinstance(message, dict) or not isinstance(message.get("content"), (str, type(None))):
            return "choices[0].message.content is not a string"
    usage = body.get("usage")
    if usage is not None and not isinstance(usage, dict):
        return f"usage is a {type(usage).__name__}, not an object"
    tokens = (usage or {}).get("prompt_tokens")
    if tokens is not None and (type(tokens) is not int or tokens < 0):
        return f"usage.prompt_tokens is {tokens!r}, not a token count"
    return None


def _excerpt(body: Any, limit: int = 200) -> str:
    """A short printable excerpt of a response body (bytes or parsed JSON), for error messages."""
    return repr(body[:limit]) if isinstance(body, bytes) else json.dumps(body)[:limit]
