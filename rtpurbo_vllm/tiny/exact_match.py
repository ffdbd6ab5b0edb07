"""Exact match of a tiny-task model, dense and through RTPurbo's reference, at one context length.

    python -m rtpurbo_vllm.tiny.exact_match --model DIR --context 16384 --prompts 20 \
        [--dense] [--prefill-top-p 1.0 0.95 0.9]

The prompts are :func:`~rtpurbo_vllm.tiny.task.make_prompt`'s of ``--context`` tokens with 8 pairs,
the queried pair at least half the context back, seeds ``--seed``, ``--seed + 1``, ... (the final
check of :mod:`rtpurbo_vllm.tiny.train` uses the same). ``--dense`` scores the model's own attention
(:func:`~rtpurbo_vllm.tiny.train.evaluate`, one teacher-forced forward per prompt, which decides
greedy decoding); each ``--prefill-top-p`` value scores greedy generation under
:func:`~rtpurbo_vllm.hf_sparse.rtpurbo_reference_attention` with the model's artifact
(``DIR/rtpurbo``), its ``params.prefill_top_p`` replaced by the value: sparse prefill of the retrieval
heads below 1, then top-p decode. One line per setting: accuracy, the share of selection blocks
the decode kept, and seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Sequence

import torch

from rtpurbo_vllm.tiny.task import make_prompt, score

N_PAIRS = 8


def rtpurbo_exact_match(model, artifact, context_len: int, n_prompts: int, seed: int,
                        prefill_top_p: float) -> tuple[float, float]:
    """``(accuracy, decode kept-block share)`` of greedy generation through the RTPurbo reference
    with ``artifact``'s ``prefill_top_p`` replaced, on the module's prompts."""
    from rtpurbo_vllm.hf_sparse import DecodeStats, rtpurbo_reference_attention

    params = dataclasses.replace(artifact.params, prefill_top_p=prefill_top_p)
    artifact = dataclasses.replace(artifact, params=params)
    stats, correct = DecodeStats(), 0
    for k in range(n_prompts):
        prompt = make_prompt(seed + k, context_len, N_PAIRS, min_distance=context_len // 2)
        ids = torch.tensor([prompt.ids])
        with torch.no_grad(), rtpurbo_reference_attention(model, artifact, stats):
            out = model.generate(ids, max_new_tokens=len(prompt.answer), do_sample=False)
        correct += score(prompt.answer, out[0, ids.shape[1]:].tolist())
    return correct / n_prompts, stats.kept_block_share


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model folder (its artifact in MODEL/rtpurbo)")
    parser.add_argument("--context", type=int, required=True, help="prompt length in tokens")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--seed", type=int, default=2_000_000, help="first prompt seed")
    parser.add_argument("--dense", action="store_true", help="score dense attention")
    parser.add_argument("--prefill-top-p", type=float, nargs="*", default=[],
                        help="score RTPurbo with these prefill_top_p values")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM

    from rtpurbo_vllm.artifacts import find_artifact_dir, load_artifact
    from rtpurbo_vllm.tiny.train import evaluate

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    head = f"{args.model}, {args.prompts} prompts of {args.context} tokens (pair >= {args.context // 2} back)"
    if args.dense:
        start = time.time()
        acc = evaluate(model, args.context, args.prompts, args.seed, N_PAIRS, args.context // 2, batch=1)
        print(f"{head}: dense exact match {acc:.2f} ({time.time() - start:.0f} s)", flush=True)
    if args.prefill_top_p:
        artifact = load_artifact(find_artifact_dir(args.model), hf_config=model.config)
        for p in args.prefill_top_p:
            start = time.time()
            acc, kept = rtpurbo_exact_match(model, artifact, args.context, args.prompts, args.seed, p)
            print(f"{head}: RTPurbo prefill_top_p {p} exact match {acc:.2f}, decode blocks kept "
                  f"{kept:.3f} ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
