"""Scoring of model outputs and per-(task, length) summaries.

A sample's score is in [0, 1]. A request that failed (HTTP error, timeout, connection error, bad
response) scores 0 and counts as an error: failures lower the accuracy and are never dropped.
"""

from __future__ import annotations

from typing import Callable, Sequence

from rtpurbo_vllm.eval.client import Completion
from rtpurbo_vllm.eval.tasks import Sample


def normalize(text: str) -> str:
    """Lower case, whitespace collapsed to single spaces."""
    return " ".join(text.lower().split())


def recall_all(answers: Sequence[str], output: str) -> float:
    """Share of ``answers`` found in ``output`` as substrings, after :func:`normalize` (RULER's
    ``string_match_all``)."""
    out = normalize(output)
    return sum(normalize(a) in out for a in answers) / len(answers)


METRICS: dict[str, Callable[[Sequence[str], str], float]] = {"recall_all": recall_all}
"""Scoring rules by the name a :class:`~rtpurbo_vllm.eval.tasks.Sample` carries in ``metric``."""


def score(sample: Sample, completion: Completion) -> float:
    """The sample's score for ``completion``; 0 for a failed request."""
    if completion.error is not None:
        return 0.0
    return METRICS[sample.metric](sample.answers, completion.text)


def summarize(samples: Sequence[Sample], completions: Sequence[Completion]) -> list[dict]:
    """One row per (task, length), in first-seen order.

    Returns:
        rows with ``task``, ``length``, ``n`` (samples), ``accuracy`` (mean score, failures as 0),
        ``errors`` (failed requests, timeouts included), ``timeouts``, ``prompt_tokens`` (mean
        tokens of the prompt text) and ``server_prompt_tokens`` (mean ``usage.prompt_tokens`` of the
        answers that report it, which adds BOS and any chat template; ``None`` if none do).
    """
    groups: dict[tuple[str, int], list[tuple[Sample, Completion]]] = {}
    for s, c in zip(samples, completions, strict=True):
        groups.setdefault((s.task, s.length), []).append((s, c))
    rows = []
    for (task, length), pairs in groups.items():
        served = [c.prompt_tokens for _, c in pairs if c.prompt_tokens is not None]
        rows.append({"task": task, "length": length, "n": len(pairs),
                     "accuracy": sum(score(s, c) for s, c in pairs) / len(pairs),
                     "errors": sum(c.error is not None for _, c in pairs),
                     "timeouts": sum(c.kind == "timeout" for _, c in pairs),
                     "prompt_tokens": round(sum(s.num_tokens for s, _ in pairs) / len(pairs), 1),
                     "server_prompt_tokens": round(sum(served) / len(served), 1) if served else None})
    return rows
