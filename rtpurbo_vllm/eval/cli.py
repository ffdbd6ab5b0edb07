"""``rtpurbo-eval``: the console script of the long-context accuracy suite.

A thin layer over :mod:`rtpurbo_vllm.eval.runner`: it parses the arguments into an
:class:`~rtpurbo_vllm.eval.runner.EvalConfig`, runs :func:`~rtpurbo_vllm.eval.runner.run_eval` and
prints the markdown report. transformers, aiohttp and tqdm are imported only when a run starts,
so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from rtpurbo_vllm.eval.client import API_CHOICES, ClientConfig, Endpoint
from rtpurbo_vllm.eval.report import render_markdown
from rtpurbo_vllm.eval.runner import DEFAULT_LENGTHS, EvalConfig, run_eval
from rtpurbo_vllm.eval.tasks import TASKS, TEMPLATE_CHOICES, TINY_TASKS, VOCAB_CHOICES

EPILOG = """examples:
  # the same model served twice: RTPurbo and dense FlashAttention, on two ports
  vllm serve ./Qwen3-8B --attention-backend RTPURBO --port 8000
  vllm serve ./Qwen3-8B --attention-backend FLASH_ATTN --port 8001
  rtpurbo-eval --compare rtpurbo=http://127.0.0.1:8000 flash=http://127.0.0.1:8001 \\
      --tokenizer ./Qwen3-8B --lengths 8k,32k,64k --samples 50

  # one endpoint, chat API, two tasks, a label recorded in the report
  rtpurbo-eval --endpoint http://127.0.0.1:8000 --tokenizer ./Qwen3-8B --api chat \\
      --tasks niah_multikey,vt --metadata gpu=H100 top_p=0.9

  # the tiny test model, RTPurbo against dense (terse templates and the tiny word source are
  # picked automatically; the default tasks are the two it is trained for: niah_single,niah_multikey)
  vllm serve rtpurbo_vllm/tiny/model --attention-backend RTPURBO --port 8000
  vllm serve rtpurbo_vllm/tiny/model --attention-backend FLASH_ATTN --port 8001
  rtpurbo-eval --compare rtpurbo=http://127.0.0.1:8000 flash=http://127.0.0.1:8001 \\
      --tokenizer rtpurbo_vllm/tiny/model --lengths 1k,2k --samples 50

tasks:
""" + "\n".join(f"  {name:<16} {spec.description}" for name, spec in TASKS.items()) + """

Lengths count the tokens of the prompt text with --tokenizer (the server adds BOS and, with
--api chat, the chat template). Failed requests score 0 and are listed in the report.
See docs/EVAL.md.
"""


def _int_list(text: str) -> tuple[int, ...]:
    """``4096,8k,1K`` -> ``(4096, 8192, 1024)``."""
    try:
        return tuple(int(p[:-1]) * 1024 if p[-1:] in "kK" else int(p) for p in text.split(",") if p)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers (e.g. 4096,8k)")


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rtpurbo-eval", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Long-context accuracy of OpenAI-compatible servers on seeded RULER-style tasks "
                    "(needle in a haystack, variable tracking, common/frequent words), sized in tokens of "
                    "the served model's tokenizer. Two endpoints get identical prompts and a side-by-side table.")
    ep = parser.add_argument_group("endpoints (one of --endpoint, --compare)")
    which = ep.add_mutually_exclusive_group(required=True)
    which.add_argument("--endpoint", metavar="[NAME=]URL", action="append",
                       help="server base URL, e.g. rtpurbo=http://127.0.0.1:8000 (/v1 is appended if missing); "
                            "give it twice to compare two servers. NAME labels the report (default host:port)")
    which.add_argument("--compare", metavar="[NAME=]URL", nargs=2,
                       help="two servers queried with identical prompts, shown side by side with the "
                            "difference (second minus first)")
    ep.add_argument("--model", metavar="NAME", default=None,
                    help="served model name (default: the first model of each server's /v1/models)")
    ep.add_argument("--api", metavar="API", choices=API_CHOICES, default="completions",
                    help="completions (/v1/completions, the prompt as is) or chat (/v1/chat/completions, the "
                         "prompt as one user message) (default completions)")
    ep.add_argument("--api-key", metavar="KEY", default=None,
                    help="bearer token, for servers started with --api-key (default none)")

    tasks = parser.add_argument_group("tasks")
    tasks.add_argument("--tokenizer", metavar="PATH", required=True,
                       help="local folder of the served model's tokenizer (usually the model folder); prompt "
                            "lengths are counted with it")
    tasks.add_argument("--tasks", metavar="LIST", type=_name_list, default=None,
                       help=f"comma-separated tasks (default: all the templates can phrase, i.e. all of "
                            f"{','.join(TASKS)} with ruler templates, all but cwe,fwe with terse ones; "
                            f"{','.join(TINY_TASKS)} for the tiny model)")
    tasks.add_argument("--lengths", metavar="LIST", type=_int_list, default=DEFAULT_LENGTHS,
                       help="comma-separated context lengths in tokens; k = 1024 "
                            f"(default {','.join(map(str, DEFAULT_LENGTHS))})")
    tasks.add_argument("--samples", metavar="N", type=int, default=20,
                       help="samples per task and length (default 20)")
    tasks.add_argument("--seed", metavar="INT", type=int, default=0,
                       help="the same seed and tokenizer give the same prompts (default 0)")
    tasks.add_argument("--vocab", metavar="SOURCE", choices=VOCAB_CHOICES, default="auto",
                       help="filler and key words: builtin (an English word list), tokenizer (whole words of "
                            "the tokenizer's vocabulary), tiny (the tiny model's key words and skip-bigram "
                            "filler, as in its training documents; its tokenizer only), or auto (tiny for the "
                            "tiny model's tokenizer, else builtin unless the tokenizer cannot encode it) "
                            "(default auto)")
    tasks.add_argument("--template", metavar="SET", choices=TEMPLATE_CHOICES, default="auto",
                       help="ruler (RULER's English instructions), terse (only key/value/query, digits and "
                            "': . ,': 'key sigma 9 3 8 .' needles asked by 'query key sigma', the tiny model's "
                            "format; needle and vt tasks only), or auto (ruler when the tokenizer encodes it) "
                            "(default auto)")
    tasks.add_argument("--max-tokens", metavar="N", type=int, default=None,
                       help="generation budget of every request (default RULER's per task: 128 needle, 30 vt, "
                            "120 cwe, 50 fwe; terse needle tasks 8 with one value asked, 24 with four)")

    req = parser.add_argument_group("requests")
    req.add_argument("--concurrency", metavar="N", type=int, default=16,
                     help="requests in flight per server (default 16)")
    req.add_argument("--timeout", metavar="SECONDS", type=float, default=600.0,
                     help="limit per request attempt; a timeout is reported, not retried (default 600)")
    req.add_argument("--retries", metavar="N", type=int, default=3,
                     help="retries after a connection error, HTTP 429 or 5xx; other 4xx are not retried "
                          "(default 3)")
    req.add_argument("--backoff", metavar="SECONDS", type=float, default=1.0,
                     help="wait before the first retry, doubled for each next one (default 1)")

    out = parser.add_argument_group("output")
    out.add_argument("--out", metavar="DIR", default="eval_results",
                     help="folder for eval-<date>-<names>.json and .md, written atomically (default eval_results)")
    out.add_argument("--metadata", metavar="KEY=VALUE", type=_key_value, nargs="+", default=[],
                     help="labels recorded in the report's environment block, e.g. gpu=H100 commit=abc123")
    out.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """The :class:`EvalConfig` of parsed arguments (validation happens there).

    Raises:
        ValueError: an invalid endpoint or setting.
    """
    specs = args.compare or args.endpoint
    client = ClientConfig(api=args.api, concurrency=args.concurrency, timeout_s=args.timeout,
                          retries=args.retries, backoff_s=args.backoff, api_key=args.api_key)
    return EvalConfig(endpoints=tuple(Endpoint.parse(s, args.model) for s in specs), tokenizer=args.tokenizer,
                      tasks=args.tasks, lengths=args.lengths, num_samples=args.samples, seed=args.seed,
                      vocab=args.vocab, template=args.template, max_tokens=args.max_tokens, client=client,
                      out_dir=args.out, metadata=dict(args.metadata), progress=not args.no_progress)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the suite and prints the markdown report; returns 0. A ``ValueError`` (bad input, a
    server that is down) prints ``rtpurbo-eval: error: ...`` and returns 2. Failed requests do not
    change the return code: they are scored 0 and listed."""
    args = build_parser().parse_args(argv)
    try:
        results, paths = run_eval(config_from_args(args))
    except ValueError as exc:
        print(f"rtpurbo-eval: error: {exc}", file=sys.stderr)
        return 2
    print(render_markdown(results))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
