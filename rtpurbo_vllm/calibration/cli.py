"""``rtpurbo-calibrate``: the console script of the calibration pipeline.

An explicit table (:data:`COMMANDS`) maps each subcommand to a function adding its arguments and a
function running it; every run function imports its library module only when called, so
``--help`` never imports torch or transformers.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from typing import Callable, Sequence

from rtpurbo_vllm.calibration.train_config import INITS, TrainConfig

EPILOG = """examples:
  rtpurbo-calibrate heads ./Qwen3-8B --out ./calib --ratio 0.15 --probe-tokens 16384 --data ./fineweb_sample/
  rtpurbo-calibrate train-indexer ./Qwen3-8B --heads ./calib/heads.json --out ./calib/indexer \\
      --data ./fineweb_sample/ --seq-len 32768 --steps 600
  rtpurbo-calibrate train-indexer ./Qwen3-8B --heads ./calib/heads.json --out ./calib/indexer --resume
  rtpurbo-calibrate export ./Qwen3-8B --heads ./calib/heads.json --indexer ./calib/indexer   # -> ./Qwen3-8B/rtpurbo
  rtpurbo-calibrate evaluate ./Qwen3-8B --artifact ./Qwen3-8B/rtpurbo --data ./fineweb_sample/ --out ./calib/eval
  rtpurbo-calibrate heads ./Llama-3-8B --out ./calib --kv-heads-per-layer 1   # best KV group of every layer
  rtpurbo-calibrate synthesize ./llama3-8b-dummy --ratio 0.15 --by-kv-group   # random artifact, benchmarks only
"""


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="local model folder (Llama, Mistral, Qwen2 or Qwen3 "
                        "transformers checkpoint with its tokenizer)")


def _add_runtime(group: argparse._ArgumentGroup, seed: int) -> None:
    group.add_argument("--device", metavar="DEVICE", default=None,
                       help="torch device, e.g. cuda, cuda:1, cpu (default: cuda when available; bf16 on "
                            "CUDA, fp32 on CPU)")
    group.add_argument("--seed", metavar="INT", type=int, default=seed,
                       help=f"random seed; the same seed repeats the run exactly (default {seed})")


def _add_data(group: argparse._ArgumentGroup, what: str) -> None:
    group.add_argument("--data", metavar="PATH", default=None,
                       help=f"{what}: a text file or a folder of .txt/.md files (default: built-in "
                            "synthetic text of random tokens with recurring spans)")


def _add_selection(p: argparse.ArgumentParser) -> None:
    sel = p.add_argument_group("selection")
    how = sel.add_mutually_exclusive_group()
    how.add_argument("--ratio", metavar="FRACTION", type=float, default=None,
                     help="share of all query heads to select, ranked globally across layers (default 0.15)")
    how.add_argument("--count", metavar="N", type=int, default=None, help="number of query heads to select")
    sel.add_argument("--by-kv-group", action="store_true",
                     help="rank whole KV groups by their best query head and select whole groups until the "
                          "ratio/count is met, so each KV head is all-retrieval or all-local")
    sel.add_argument("--kv-heads-per-layer", metavar="N", type=int, default=None,
                     help="per-layer KV budget: every layer may use only its N KV groups with the highest "
                          "best-query-head score; alone it selects every query head of those groups, with "
                          "--ratio/--count the top heads among them (the split KV layout then keeps N KV heads "
                          "per layer in full instead of the most any layer needs)")


def _selection(args: argparse.Namespace) -> dict:
    """ratio/count/by_kv_group/kv_heads_per_layer for the library: ``--ratio`` defaults to 0.15 unless
    ``--count`` or ``--kv-heads-per-layer`` decides the number of heads."""
    from rtpurbo_vllm.calibration.heads import DEFAULT_RATIO

    ratio = args.ratio
    if ratio is None and args.count is None and args.kv_heads_per_layer is None:
        ratio = DEFAULT_RATIO
    return {"ratio": ratio, "count": args.count, "by_kv_group": args.by_kv_group,
            "kv_heads_per_layer": args.kv_heads_per_layer}


def _add_heads_args(p: argparse.ArgumentParser) -> None:
    _add_model(p)
    _add_selection(p)
    probe = p.add_argument_group("probes")
    probe.add_argument("--probe-tokens", metavar="N", type=int, default=4096,
                       help="tokens per needle-copy probe document (default 4096; longer separates better)")
    probe.add_argument("--num-probes", metavar="N", type=int, default=4, help="probes averaged (default 4)")
    probe.add_argument("--needle-tokens", metavar="N", type=int, default=64,
                       help="tokens of the needle span that appears twice (default 64)")
    _add_data(probe, "filler and needle text")
    probe.add_argument("--needle-data", metavar="PATH", default=None,
                       help="text file or folder the needles are cut from instead of --data: text whose spans "
                            "occur once (records, code, ids), so the second copy has one earlier match")
    out = p.add_argument_group("output and runtime")
    out.add_argument("--out", metavar="DIR", required=True,
                     help="folder for heads.json, head_scores.json/.csv and head_heatmap.png")
    out.add_argument("--report-context", metavar="TOKENS", type=int, default=None,
                     help="context length at which the predicted KV capacity of the compact KV layout is "
                          "printed (default: the model's max_position_embeddings, else 131072)")
    _add_runtime(out, seed=0)


def _run_heads(args: argparse.Namespace) -> None:
    from rtpurbo_vllm.calibration.heads import find_heads, format_kv_capacity

    result = find_heads(args.model, args.out, **_selection(args), report_context=args.report_context,
                        probe_tokens=args.probe_tokens, num_probes=args.num_probes,
                        needle_tokens=args.needle_tokens, data=args.data,
                        needle_data=args.needle_data, seed=args.seed, device=args.device)
    per_layer = ", ".join(f"L{i}:{h}" for i, h in enumerate(result.heads.retrieval_heads) if h)
    print(f"{result.heads.settings['num_selected']} retrieval heads ({per_layer})")
    for name, path in result.paths.items():
        print(f"  {name}: {path}")
    print(format_kv_capacity(result.heads.settings["kv_capacity"]))


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from_defaults = _train_defaults()
    _add_model(p)
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--heads", metavar="HEADS_FILE", required=True,
                    help="heads.json written by `heads` (or its folder); must match MODEL")
    io.add_argument("--out", metavar="DIR", required=True, help="checkpoint folder (step-NNNNNN subfolders)")
    io.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    io.add_argument("--checkpoint-every", metavar="STEPS", type=int, default=100,
                    help="save a checkpoint every this many steps, and at the end (default 100)")
    _add_data(io, "training text (its first 90%%)")
    opt = p.add_argument_group("training")
    for flag, key, typ, help_ in (
            ("--steps", "steps", int, "optimiser steps, one sequence each"),
            ("--lr", "lr", float, "peak AdamW learning rate"),
            ("--warmup-steps", "warmup_steps", int, "linear warm-up steps from 0, then cosine decay"),
            ("--weight-decay", "weight_decay", float, "AdamW weight decay"),
            ("--max-grad-norm", "max_grad_norm", float, "gradient-norm clip"),
            ("--seq-len", "seq_len", int, "tokens per training sequence"),
            ("--queries-per-seq", "queries_per_seq", int,
             "query positions sampled per sequence (from its second half) for the KL loss"),
            ("--index-dim", "index_dim", int, "rows of each indexer projection (DI)")):
        opt.add_argument(flag, metavar=typ.__name__.upper(), type=typ, default=from_defaults[key],
                         help=f"{help_} (default {from_defaults[key]})")
    opt.add_argument("--init", metavar="KIND", choices=INITS, default=from_defaults["init"],
                     help="initial projections: lowfreq (lowest-frequency RoPE channels) or random "
                          f"(default {from_defaults['init']})")
    rt = p.add_argument_group("runtime")
    _add_runtime(rt, seed=from_defaults["seed"])
    rt.add_argument("--no-progress", action="store_true", help="no progress bar")


def _train_defaults() -> dict:
    return asdict(TrainConfig())


def _run_train(args: argparse.Namespace) -> None:
    from rtpurbo_vllm.calibration.train_indexer import train_indexer

    config = TrainConfig(**{k: getattr(args, k) for k in _train_defaults()})
    ckpt = train_indexer(args.model, args.heads, args.out, config, data=args.data,
                         checkpoint_every=args.checkpoint_every, resume=args.resume, device=args.device,
                         progress=not args.no_progress)
    print(f"step {ckpt.step}: loss {ckpt.state['losses'][-1]:.4f} (first {ckpt.state['losses'][0]:.4f}); "
          f"checkpoint {ckpt.path}")


def _add_evaluate_args(p: argparse.ArgumentParser) -> None:
    _add_model(p)
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--artifact", metavar="DIR", required=True, help="artifact folder (e.g. MODEL/rtpurbo)")
    io.add_argument("--out", metavar="DIR", required=True, help="folder for evaluate.json and evaluate.md")
    _add_data(io, "held-out text (its last 10%%)")
    ev = p.add_argument_group("measurement")
    ev.add_argument("--num-seqs", metavar="N", type=int, default=4, help="held-out sequences (default 4)")
    ev.add_argument("--seq-len", metavar="N", type=int, default=4096, help="tokens per sequence (default 4096)")
    ev.add_argument("--queries-per-seq", metavar="N", type=int, default=32,
                    help="decode-like query positions per sequence, from its second half (default 32)")
    ev.add_argument("--index-key-dtype", metavar="DTYPE", choices=("float32", "bfloat16", "fp8_e4m3", "fp8_e5m2"),
                    default="float32",
                    help="float32, bfloat16, fp8_e4m3 or fp8_e5m2: round the index keys to this storage dtype "
                         "(no scale) before routing, to measure "
                         "what storing them so costs (default float32: as computed)")
    _add_runtime(ev, seed=1234)


def _run_evaluate(args: argparse.Namespace) -> None:
    from rtpurbo_vllm.calibration.evaluate import evaluate_artifact, write_report
    from rtpurbo_vllm.outputs import check_writable_dir

    check_writable_dir(args.out)
    report = evaluate_artifact(args.model, args.artifact, data=args.data, num_seqs=args.num_seqs,
                               seq_len=args.seq_len, queries_per_seq=args.queries_per_seq, seed=args.seed,
                               device=args.device, index_key_dtype=args.index_key_dtype)
    paths = write_report(report, args.out)
    s = report["summary"]
    print(f"decode (top_p {report['params']['top_p']}): recall {s['recall']['mean']:.3f} "
          f"(min {s['recall']['min']:.3f}), blocks kept {s['blocks_kept']['mean']:.3f}; prefill (prefill_top_p "
          f"{report['params']['prefill_top_p']}): recall {s['prefill_recall']['mean']:.3f} (tile p10, worst head "
          f"{s['prefill_recall_p10']['min']:.3f}), blocks kept {s['prefill_blocks_kept']['mean']:.3f}; over "
          f"{s['num_retrieval_heads']} heads; {paths['markdown']}")


def _add_sparsity(p: argparse.ArgumentParser) -> None:
    sp = p.add_argument_group("sparsity settings (stored in the artifact)")
    sp.add_argument("--sink-tokens", metavar="N", type=int, default=4, help="sink tokens of local heads (default 4)")
    sp.add_argument("--window", metavar="N", type=int, default=8192,
                    help="sliding window of local heads, current token included (default 8192)")
    sp.add_argument("--top-p", metavar="P", type=float, default=0.9,
                    help="indexer mass retrieval heads keep at decode, in (0, 1] (default 0.9)")
    sp.add_argument("--prefill-top-p", metavar="P", type=float, default=1.0,
                    help="indexer mass each query tile of a retrieval head keeps at prefill, besides its sink "
                         "and diagonal blocks, in (0, 1]; 1 = dense retrieval prefill (default 1.0)")
    sp.add_argument("--block-size", metavar="N", type=int, default=64, help="tokens per selection block (default 64)")
    sp.add_argument("--dense-threshold", metavar="N", type=int, default=16384,
                    help="sequences shorter than this run dense; 0 = always sparse (default 16384)")


SPARSITY_OPTIONS = {"sink_tokens": "--sink-tokens", "window": "--window", "top_p": "--top-p",
                    "prefill_top_p": "--prefill-top-p", "block_size": "--block-size",
                    "dense_threshold": "--dense-threshold"}


def _sparsity(args: argparse.Namespace):
    """The sparsity options as ``SparsityParams``, checked against the rules the kernels need.

    Raises:
        ArtifactError: a value the kernels cannot run, naming the option.
    """
    from rtpurbo_vllm.artifacts import SparsityParams
    from rtpurbo_vllm.artifacts.validate import check_params

    params = SparsityParams(**{name: getattr(args, name) for name in SPARSITY_OPTIONS})
    check_params(params, where="", names=SPARSITY_OPTIONS)
    return params


def _add_export_args(p: argparse.ArgumentParser) -> None:
    _add_model(p)
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--heads", metavar="HEADS_FILE", required=True, help="heads.json written by `heads`")
    io.add_argument("--indexer", metavar="CKPT", required=True,
                    help="train-indexer --out folder (its newest checkpoint) or one step-NNNNNN folder")
    io.add_argument("--out", metavar="DIR", default=None,
                    help="artifact folder (default MODEL/rtpurbo); written atomically, then validated")
    _add_sparsity(p)


def _run_export(args: argparse.Namespace) -> None:
    from rtpurbo_vllm.calibration.export import export_artifact

    path = export_artifact(args.model, args.heads, args.indexer, args.out, _sparsity(args))
    print(f"artifact written and validated: {path}")


def _add_synthesize_args(p: argparse.ArgumentParser) -> None:
    _add_model(p)
    _add_selection(p)
    out = p.add_argument_group("output")
    out.add_argument("--out", metavar="DIR", default=None,
                     help="artifact folder (default MODEL/rtpurbo); written atomically, then validated")
    out.add_argument("--seed", metavar="INT", type=int, default=0, help="random seed (default 0)")
    out.add_argument("--report-context", metavar="TOKENS", type=int, default=None,
                     help="context length at which the predicted KV capacity of the compact KV layout is "
                          "printed (default: the model's max_position_embeddings, else 131072)")
    _add_sparsity(p)


def _run_synthesize(args: argparse.Namespace) -> None:
    from transformers import AutoConfig

    from rtpurbo_vllm.artifacts import load_artifact
    from rtpurbo_vllm.calibration.heads import default_report_context, predict_kv_capacity
    from rtpurbo_vllm.calibration.synthesize import synthesize_artifact

    path = synthesize_artifact(args.model, args.out, **_selection(args), seed=args.seed, params=_sparsity(args))
    artifact = load_artifact(path)
    layout, model = artifact.layout, artifact.model
    context = args.report_context or default_report_context(AutoConfig.from_pretrained(args.model, local_files_only=True))
    capacity = predict_kv_capacity(layout.retrieval_heads, model.num_heads, model.num_kv_heads, model.head_dim,
                                   context, artifact.params)
    print(f"synthetic artifact (random heads and indexer; dummy-weight benchmarks only): {path}\n"
          f"  {layout.num_retrieval_heads} retrieval query heads; the compact KV layout keeps "
          f"{capacity['full_kv_heads']} of {capacity['kv_heads']} KV heads in full "
          f"({capacity['full_units']} full units): predicted KV capacity at {context} tokens vs FLASH_ATTN "
          f"{capacity['capacity_ratio']:.2f}x (bf16 KV), {capacity['fp8_capacity_ratio']:.2f}x (fp8 KV)")


# name -> (help, add arguments, run)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None]]] = {
    "heads": ("find retrieval heads with needle-copy probes", _add_heads_args, _run_heads),
    "train-indexer": ("train the 16-dim indexer of the retrieval heads (stage 1)", _add_train_args, _run_train),
    "evaluate": ("measure the attention mass inside the indexer's top-p blocks", _add_evaluate_args, _run_evaluate),
    "export": ("write and validate the artifact folder", _add_export_args, _run_export),
    "synthesize": ("write a random artifact for a dummy-weight model (benchmarks only)", _add_synthesize_args,
                   _run_synthesize),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rtpurbo-calibrate", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert a dense model into an RTPurbo artifact: heads -> train-indexer -> export "
                    "(-> evaluate). See docs/CALIBRATION.md.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_, add_args, _run) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_, description=help_, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one subcommand; a ``ValueError`` (bad input) prints ``error: ...`` and returns 2."""
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command][2](args)
    except ValueError as exc:
        print(f"rtpurbo-calibrate {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
