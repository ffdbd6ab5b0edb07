"""One evaluation run: resolve the endpoints, generate the samples once, query every endpoint with
the same prompts, score, and write the report.

:class:`EvalConfig` holds and validates the settings; :func:`run_eval` is what ``rtpurbo-eval``
calls, and is usable from Python as is.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rtpurbo_vllm.eval.client import ClientConfig, Endpoint, complete_all, resolve_model
from rtpurbo_vllm.eval.tasks import TASKS, TaskGenerator, load_tokenizer
from rtpurbo_vllm.outputs import check_writable_dir

DEFAULT_LENGTHS = (4096, 8192, 16384)


@dataclass(frozen=True)
class EvalConfig:
    """Settings of a run.

    Attributes:
        endpoints: one endpoint, or two to compare on identical prompts (distinct names).
        tokenizer: local folder of the served model's tokenizer.
        tasks: task names (keys of :data:`~rtpurbo_vllm.eval.tasks.TASKS`); ``None`` runs the
            generator's :meth:`~rtpurbo_vllm.eval.tasks.TaskGenerator.default_tasks` (every task the
            templates can phrase; ``niah_single`` and ``niah_multikey`` for the tiny model).
        lengths: context lengths in tokens of the prompt text.
        num_samples: samples per (task, length).
        seed: the samples are a function of the seed (and tokenizer, vocab, template).
        vocab, template: see :class:`~rtpurbo_vllm.eval.tasks.TaskGenerator`.
        max_tokens: generation budget for every request; ``None`` keeps RULER's per-task budget.
        client: request settings.
        out_dir: folder for the JSON and markdown reports.
        metadata: free ``key: value`` pairs recorded in the environment block.
        progress: show progress bars.

    Raises:
        ValueError: a setting out of range, an unknown task, or two endpoints with one name
            (``vocab`` and ``template`` are checked by the generator).
    """

    endpoints: tuple[Endpoint, ...]
    tokenizer: str
    tasks: tuple[str, ...] | None = None
    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    num_samples: int = 20
    seed: int = 0
    vocab: str = "auto"
    template: str = "auto"
    max_tokens: int | None = None
    client: ClientConfig = field(default_factory=ClientConfig)
    out_dir: str = "eval_results"
    metadata: dict[str, str] = field(default_factory=dict)
    progress: bool = True

    def __post_init__(self) -> None:
        if len(self.endpoints) not in (1, 2):
            raise ValueError(f"{len(self.endpoints)} endpoints; fix: give one endpoint, or two to compare")
        if len({e.name for e in self.endpoints}) != len(self.endpoints):
            raise ValueError(f"both endpoints are named {self.endpoints[0].name!r}; fix: name them, e.g. "
                             "rtpurbo=http://127.0.0.1:8000 flash=http://127.0.0.1:8001")
        unknown = [t for t in self.tasks if t not in TASKS] if self.tasks is not None else []
        if unknown or self.tasks == ():
            raise ValueError(f"unknown tasks {unknown or '(none given)'}; fix: choose from {', '.join(TASKS)}")
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError(f"lengths {list(self.lengths)}; fix: positive token counts, e.g. 4096,8192")
        if self.num_samples < 1 or (self.max_tokens is not None and self.max_tokens < 1):
            raise ValueError(f"samples={self.num_samples}, max_tokens={self.max_tokens}; fix: both >= 1")


def environment(config: EvalConfig, generator: TaskGenerator) -> dict[str, Any]:
    """The report's environment block: date, versions, host, tokenizer and every run setting (the
    tasks as run, defaults resolved)."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "rtpurbo_vllm": _version("rtpurbo-vllm"), "vllm": _version("vllm"),
        "transformers": _version("transformers"), "python": platform.python_version(),
        "host": platform.node(), "tokenizer": str(Path(config.tokenizer).resolve()), **generator.describe(),
        "seed": config.seed, "tasks": list(config.tasks or generator.default_tasks()), "lengths": list(config.lengths),
        "samples_per_task_length": config.num_samples, "api": config.client.api,
        "max_tokens": config.max_tokens or "per task", "concurrency": config.client.concurrency,
        "timeout_s": config.client.timeout_s, "retries": config.client.retries,
        "backoff_s": config.client.backoff_s, "metadata": dict(config.metadata),
    }


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def run_eval(config: EvalConfig) -> tuple[dict[str, Any], dict[str, Path]]:
    """Runs the evaluation; returns the results dict and the written files (``json``, ``markdown``).

    The output folder is checked and the endpoints are resolved first (an unwritable ``out_dir`` or a
    server that is down fails the run before any request); after that, failed requests and malformed
    responses are scored 0 and reported, never raised.

    Raises:
        ValueError: ``out_dir`` cannot be written, an endpoint's model list cannot be fetched, the
            tokenizer cannot be loaded or cannot encode the tasks, or a length is too short for a task.
    """
    from rtpurbo_vllm.eval.report import build_results, write_results

    check_writable_dir(config.out_dir)
    endpoints = [resolve_model(e, config.client) for e in config.endpoints]
    generator = TaskGenerator(load_tokenizer(config.tokenizer), vocab=config.vocab, template=config.template)
    tasks = config.tasks or generator.default_tasks()
    samples = generator.generate(tasks, config.lengths, config.num_samples, config.seed, config.progress)
    requests = [(s.prompt, config.max_tokens or s.max_tokens) for s in samples]
    completions = [complete_all(e, requests, config.client, config.progress) for e in endpoints]
    results = build_results(environment(config, generator), endpoints, samples, completions)
    return results, write_results(results, config.out_dir)
