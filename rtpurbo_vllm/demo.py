"""``rtpurbo-demo``: RTPurbo on the built-in tiny model, on the CPU, in about a minute.

The tiny model (:mod:`rtpurbo_vllm.tiny`) was trained here on long-context key-value retrieval and
calibrated with ``rtpurbo-calibrate`` (its artifact sits in the model folder). The demo answers the
same prompts twice — with the model's dense attention and with RTPurbo attention from the exact
PyTorch reference (:mod:`rtpurbo_vllm.hf_sparse`) — and prints task accuracy next to what RTPurbo
read: the share of selection blocks the retrieval heads kept and the share of the context the
local heads saw.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence


def run_demo(num_prompts: int = 20, context_len: int = 2048, seed: int = 0) -> dict:
    """Dense vs RTPurbo accuracy on ``num_prompts`` tiny-task prompts of ``context_len`` tokens."""
    import torch

    from rtpurbo_vllm.artifacts import find_artifact_dir, load_artifact
    from rtpurbo_vllm.hf_sparse import DecodeStats, rtpurbo_reference_attention
    from rtpurbo_vllm.tiny import load_tiny_model, tiny_model_dir
    from rtpurbo_vllm.tiny.task import make_prompt, score

    torch.set_grad_enabled(False)
    model, _ = load_tiny_model()
    artifact = load_artifact(find_artifact_dir(tiny_model_dir()), hf_config=model.config)
    prompts = [make_prompt(seed + i, context_len) for i in range(num_prompts)]
    stats = DecodeStats()
    correct = {"dense": 0, "rtpurbo": 0}
    start = time.perf_counter()
    for prompt in prompts:
        ids = torch.tensor([prompt.ids])
        steps = len(prompt.answer)
        dense = model.generate(ids, max_new_tokens=steps, do_sample=False)[0, ids.shape[1]:].tolist()
        with rtpurbo_reference_attention(model, artifact, stats):
            sparse = model.generate(ids, max_new_tokens=steps, do_sample=False)[0, ids.shape[1]:].tolist()
        correct["dense"] += score(prompt.answer, dense)
        correct["rtpurbo"] += score(prompt.answer, sparse)
    p = artifact.params
    return {
        "prompts": num_prompts, "context_tokens": context_len,
        "accuracy_dense": correct["dense"] / num_prompts,
        "accuracy_rtpurbo": correct["rtpurbo"] / num_prompts,
        "retrieval_heads": artifact.layout.num_retrieval_heads,
        "query_heads": artifact.layout.num_layers * artifact.layout.num_heads,
        "kept_block_share": stats.kept_block_share, "local_context_share": stats.local_token_share,
        "settings": {"sink_tokens": p.sink_tokens, "window": p.window, "top_p": p.top_p,
                     "block_size": p.block_size},
        "seconds": time.perf_counter() - start,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rtpurbo-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", metavar="N", type=int, default=20, help="prompts to answer (default 20)")
    parser.add_argument("--context", metavar="TOKENS", type=int, default=2048,
                        help="prompt length in tokens (default 2048)")
    parser.add_argument("--seed", metavar="INT", type=int, default=0, help="first prompt seed (default 0)")
    args = parser.parse_args(argv)
    r = run_demo(args.prompts, args.context, args.seed)
    s = r["settings"]
    print(f"tiny model, {r['prompts']} key-value retrieval prompts of {r['context_tokens']} tokens "
          f"({r['seconds']:.0f} s)")
    print(f"  RTPurbo: {r['retrieval_heads']} of {r['query_heads']} query heads are retrieval heads; local heads "
          f"see {s['sink_tokens']} sinks + {s['window']} tokens; top-p {s['top_p']} over {s['block_size']}-token "
          f"blocks")
    print(f"  accuracy   dense {r['accuracy_dense']:.0%}   RTPurbo {r['accuracy_rtpurbo']:.0%}")
    print(f"  RTPurbo decode read {r['kept_block_share']:.0%} of the blocks on retrieval heads and "
          f"{r['local_context_share']:.0%} of the context on local heads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
