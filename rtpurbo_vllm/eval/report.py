"""The results dict of an evaluation, its markdown rendering, and atomic JSON/markdown files.

:func:`build_results` makes the one source of truth; the JSON file is that dict and the markdown
file is rendered from it by :func:`render_markdown`.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

from rtpurbo_vllm.outputs import markdown_table, write_bytes, write_json
from rtpurbo_vllm.eval.client import Completion, Endpoint
from rtpurbo_vllm.eval.scoring import score, summarize
from rtpurbo_vllm.eval.tasks import Sample

MAX_FAILURES_SHOWN = 50
"""Failed requests listed in the markdown report (the JSON lists all)."""


def build_results(environment: dict[str, Any], endpoints: Sequence[Endpoint], samples: Sequence[Sample],
                  completions: Sequence[Sequence[Completion]]) -> dict[str, Any]:
    """The results dict of one run.

    Args:
        environment: run settings and versions (see :func:`rtpurbo_vllm.eval.runner.environment`).
        endpoints: one or two endpoints, models resolved.
        samples: the prompts, identical for every endpoint.
        completions: per endpoint, one completion per sample in the order of ``samples``.

    Returns:
        ``environment``; ``endpoints`` (name, url, model, request counts, latency percentiles);
        ``scores`` (per endpoint name, rows of :func:`~rtpurbo_vllm.eval.scoring.summarize` plus a
        ``mean`` row per length); ``comparison`` (with two endpoints: per task and length both
        accuracies and the second minus the first; else ``None``); ``failures`` (every failed
        request); ``samples`` (answers, outputs and scores, no prompts: they are reproducible
        from the environment's seed and tokenizer).
    """
    names = [e.name for e in endpoints]
    scores = {e.name: _with_means(summarize(samples, c)) for e, c in zip(endpoints, completions, strict=True)}
    return {
        "environment": environment,
        "endpoints": [_endpoint_summary(e, c) for e, c in zip(endpoints, completions)],
        "scores": scores,
        "comparison": _compare(names, scores) if len(endpoints) == 2 else None,
        "failures": [{"endpoint": e.name, "task": s.task, "length": s.length, "index": s.index, "kind": c.kind,
                      "attempts": c.attempts, "error": c.error}
                     for e, cs in zip(endpoints, completions) for s, c in zip(samples, cs) if c.error is not None],
        "samples": [{"task": s.task, "length": s.length, "index": s.index, "num_tokens": s.num_tokens,
                     "answers": list(s.answers), "meta": s.meta,
                     "outputs": {e.name: {"text": cs[i].text, "score": score(s, cs[i]), "error": cs[i].error,
                                          "kind": cs[i].kind, "attempts": cs[i].attempts,
                                          "latency_s": round(cs[i].latency_s, 3),
                                          "prompt_tokens": cs[i].prompt_tokens}
                                 for e, cs in zip(endpoints, completions)}}
                    for i, s in enumerate(samples)],
    }


def _with_means(rows: list[dict]) -> list[dict]:
    """``rows`` followed by one ``mean`` row per length: accuracy averaged over tasks, counts summed."""
    means = []
    for length in dict.fromkeys(r["length"] for r in rows):
        group = [r for r in rows if r["length"] == length]
        means.append({"task": "mean", "length": length, "n": sum(r["n"] for r in group),
                      "accuracy": sum(r["accuracy"] for r in group) / len(group),
                      "errors": sum(r["errors"] for r in group), "timeouts": sum(r["timeouts"] for r in group),
                      "prompt_tokens": None, "server_prompt_tokens": None})
    return rows + means


def _compare(names: Sequence[str], scores: dict[str, list[dict]]) -> list[dict]:
    """Side-by-side rows: ``task``, ``length``, ``n``, each endpoint's accuracy, ``diff`` (second
    minus first) and each endpoint's errors."""
    a, b = names
    other = {(r["task"], r["length"]): r for r in scores[b]}
    return [{"task": r["task"], "length": r["length"], "n": r["n"], a: r["accuracy"],
             b: other[r["task"], r["length"]]["accuracy"],
             "diff": other[r["task"], r["length"]]["accuracy"] - r["accuracy"],
             f"errors {a}": r["errors"], f"errors {b}": other[r["task"], r["length"]]["errors"]}
            for r in scores[a]]


def _endpoint_summary(endpoint: Endpoint, completions: Sequence[Completion]) -> dict[str, Any]:
    latencies = sorted(c.latency_s for c in completions)
    return {"name": endpoint.name, "url": endpoint.url, "model": endpoint.model, "requests": len(completions),
            "errors": sum(c.error is not None for c in completions),
            "timeouts": sum(c.kind == "timeout" for c in completions),
            "retried": sum(c.attempts > 1 for c in completions),
            "latency_s": {f"p{q}": round(_percentile(latencies, q), 3) for q in (50, 90, 99)}
            | {"max": round(latencies[-1], 3) if latencies else 0.0}}


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (0 for none)."""
    if not sorted_values:
        return 0.0
    return sorted_values[max(0, math.ceil(q / 100 * len(sorted_values)) - 1)]


def render_markdown(results: dict[str, Any]) -> str:
    """The report: environment, accuracy table(s), request statistics and failed requests."""
    env = results["environment"]
    lines = ["# rtpurbo-eval: long-context accuracy", ""]
    lines += [f"- {k}: {_inline(v)}" for k, v in env.items()]
    lines += [f"- endpoint {e['name']}: {e['url']} (model {e['model']})" for e in results["endpoints"]]
    if results["comparison"] is not None:
        a, b = (e["name"] for e in results["endpoints"])
        lines += ["", f"## Accuracy, {a} vs {b} (diff = {b} - {a})", "",
                  _table(results["comparison"])]
    else:
        (name, rows), = results["scores"].items()
        lines += ["", f"## Accuracy of {name}", "", _table(rows)]
    lines += ["", "## Requests", "",
              _table([{"endpoint": e["name"], "requests": e["requests"], "errors": e["errors"],
                       "timeouts": e["timeouts"], "retried": e["retried"],
                       **{f"latency {k} (s)": v for k, v in e["latency_s"].items()}}
                      for e in results["endpoints"]])]
    failures = results["failures"]
    if failures:
        lines += ["", f"## Failed requests ({len(failures)}; each scored 0)", "",
                  _table([{**f, "error": f["error"].replace("|", "\\|").replace("\n", " ")[:160]}
                          for f in failures[:MAX_FAILURES_SHOWN]])]
        if len(failures) > MAX_FAILURES_SHOWN:
            lines.append(f"\n... and {len(failures) - MAX_FAILURES_SHOWN} more (see the JSON file)")
    return "\n".join(lines) + "\n"


def _table(rows: Sequence[dict]) -> str:
    """A markdown table of ``rows`` with ``None`` shown as ``-``."""
    return markdown_table([{k: "-" if v is None else v for k, v in r.items()} for r in rows]).rstrip()


def _inline(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)


def write_results(results: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Writes ``<stem>.json`` and ``<stem>.md`` atomically into ``out_dir``; the stem is
    ``eval-<date>-<endpoint names>``. Returns their paths under the keys ``json`` and ``markdown``."""
    names = "-vs-".join(e["name"] for e in results["endpoints"])
    stamp = re.sub(r"[^0-9T]", "", results["environment"]["date"])[:15]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", f"eval-{stamp}-{names}")
    out = Path(out_dir)
    return {"json": write_json(out / f"{stem}.json", results),
            "markdown": write_bytes(out / f"{stem}.md", render_markdown(results).encode("utf-8", "backslashreplace"))}
