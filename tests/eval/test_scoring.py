"""Scoring (rtpurbo_vllm.eval.scoring) and reports (rtpurbo_vllm.eval.report) on hand-made samples."""

import json

import pytest

from rtpurbo_vllm.eval.client import Completion, Endpoint
from rtpurbo_vllm.eval.report import build_results, render_markdown, write_results
from rtpurbo_vllm.eval.scoring import normalize, recall_all, score, summarize
from rtpurbo_vllm.eval.tasks import Sample

ENV = {"date": "2026-08-16T10:15:30+00:00", "seed": 0, "lengths": [1024, 2048], "metadata": {"gpu": "H100"}}


def _sample(task, length, index, answers):
    return Sample(task=task, length=length, index=index, prompt=f"{task} {index}", answers=tuple(answers),
                  num_tokens=length - 2, max_tokens=16)


def test_recall_all_is_the_share_of_answers_found():
    assert normalize("  The  ANSWER\nis ") == "the answer is"
    assert recall_all(["1234567"], "The number is 1234567.") == 1.0
    assert recall_all(["9 3 8"], " 9  3\n8 .") == 1.0                 # spacing of a digit-splitting tokenizer
    assert recall_all(["9 3 8"], "9 3 7 .") == 0.0
    assert recall_all(["alpha", "beta", "gamma", "delta"], "Beta, ALPHA and delta") == 0.75


def test_failed_requests_score_zero_and_count_as_errors():
    s = _sample("niah_single", 1024, 0, ["42"])
    assert score(s, Completion("42")) == 1.0
    assert score(s, Completion("42", error="HTTP 500: boom", kind="http")) == 0.0
    samples = [_sample("niah_single", 1024, i, ["42"]) for i in range(4)] + [_sample("vt", 1024, 0, ["a", "b"])]
    completions = [Completion("42", prompt_tokens=1023), Completion("no"),
                   Completion("", error="no answer within 5 s", kind="timeout"),
                   Completion("", error="HTTP 400: bad", kind="http"), Completion("a only")]
    rows = summarize(samples, completions)
    assert rows == [
        {"task": "niah_single", "length": 1024, "n": 4, "accuracy": 0.25, "errors": 2, "timeouts": 1,
         "prompt_tokens": 1022.0, "server_prompt_tokens": 1023.0},
        {"task": "vt", "length": 1024, "n": 1, "accuracy": 0.5, "errors": 0, "timeouts": 0,
         "prompt_tokens": 1022.0, "server_prompt_tokens": None}]


def test_comparison_report_side_by_side(tmp_path):
    samples = [_sample(t, n, i, ["42"]) for t in ("niah_single", "vt") for n in (1024, 2048) for i in range(2)]
    good = [Completion("42", latency_s=0.1 * i) for i in range(len(samples))]
    bad = [Completion("42")] * 4 + [Completion("0")] * 3 + [Completion("", error="HTTP 400: x|y", kind="http")]
    endpoints = [Endpoint("rtpurbo", "http://a/v1", "m"), Endpoint("flash", "http://b/v1", "m")]
    results = build_results(ENV, endpoints, samples, [good, bad])
    rows = {(r["task"], r["length"]): r for r in results["comparison"]}
    assert rows["niah_single", 1024] == {"task": "niah_single", "length": 1024, "n": 2, "rtpurbo": 1.0,
                                         "flash": 1.0, "diff": 0.0, "errors rtpurbo": 0, "errors flash": 0}
    assert rows["vt", 2048]["diff"] == -1.0 and rows["vt", 2048]["errors flash"] == 1
    assert rows["mean", 2048]["flash"] == 0.5 and rows["mean", 2048]["n"] == 4
    assert results["failures"] == [{"endpoint": "flash", "task": "vt", "length": 2048, "index": 1, "kind": "http",
                                    "attempts": 1, "error": "HTTP 400: x|y"}]
    assert results["endpoints"][0]["latency_s"] == {"p50": 0.3, "p90": 0.7, "p99": 0.7, "max": 0.7}
    assert results["samples"][7]["outputs"]["flash"]["score"] == 0.0

    md = render_markdown(results)
    assert "## Accuracy, rtpurbo vs flash (diff = flash - rtpurbo)" in md
    assert "| vt | 2048 | 2 | 1.000 | 0.000 | -1.000 | 0 | 1 |" in md
    assert "- metadata: gpu=H100" in md and "HTTP 400: x\\|y" in md and "## Failed requests (1; each scored 0)" in md

    paths = write_results(results, tmp_path / "out")
    assert paths["json"].name == "eval-20260816T101530-rtpurbo-vs-flash.json"
    assert json.loads(paths["json"].read_text()) == results
    assert paths["markdown"].read_text() == md
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths.values())


def test_single_endpoint_report_has_one_table():
    samples = [_sample("niah_single", 1024, 0, ["42"])]
    results = build_results(ENV, [Endpoint("127.0.0.1:8000", "http://127.0.0.1:8000/v1", "m")], samples,
                            [[Completion("42")]])
    assert results["comparison"] is None and results["failures"] == []
    md = render_markdown(results)
    assert "## Accuracy of 127.0.0.1:8000" in md and "Failed requests" not in md
    assert "| mean | 1024 | 1 | 1.000 | 0 | 0 | - | - |" in md


def test_endpoint_specs():
    assert Endpoint.parse("rtpurbo=http://127.0.0.1:8000") == Endpoint("rtpurbo", "http://127.0.0.1:8000/v1")
    assert Endpoint.parse("http://h:1/v1/", "m") == Endpoint("h:1", "http://h:1/v1", "m")
    with pytest.raises(ValueError, match="NAME="):
        Endpoint.parse("localhost:8000")
