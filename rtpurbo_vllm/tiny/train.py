"""Trains the tiny Llama retrieval model from scratch on the CPU.

    python -m rtpurbo_vllm.tiny.train --out DIR [--steps N --seed S --final-len T]
        [--rope-theta B --max-position P --threads K --init-from MODEL_DIR --first-len T0]

A curriculum of growing context lengths (32 tokens up to ``--final-len``) over the key-value task
of :mod:`rtpurbo_vllm.tiny.task`. The loss is on the tokens that looking back predicts exactly
(answers and repeated filler spans), plus a smaller weight on filler (whose skip-bigram rule needs
the previous token). The result (bf16 ``model.safetensors``, ``config.json``,
``generation_config.json`` and the tokenizer files) is written to ``DIR``.

Also here: a head-wise attention mode (retrieval heads full causal, the rest sinks plus a sliding
window, as RTPurbo runs them), the needle-copy probe score per head, and the accuracy evaluation.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AttentionInterface, GenerationConfig, LlamaConfig, LlamaForCausalLM

from rtpurbo_vllm.tiny.task import (MAX_PAIRS, PAIR_LEN, QUERY_LEN, TARGET_ANSWER, TARGET_ECHO, TARGET_FILLER,
                                    VALUE_DIGITS, make_probe, make_prompt, make_training_example)
from rtpurbo_vllm.tiny.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB, save_tokenizer


ECHO_LEN = (4, 12)       # min, max tokens of an echo span
LOSS_WEIGHTS = {TARGET_ANSWER: 3.0, TARGET_ECHO: 1.0, TARGET_FILLER: 0.3}   # other tokens: 0


def tiny_config(rope_theta: float = 10000.0, max_position: int = 8192) -> LlamaConfig:
    """4 layers x 8 query heads (2 KV heads, head_dim 64) over a 128-wide residual stream.

    ``rope_theta`` is RoPE's base, ``max_position`` the ``max_position_embeddings``; the defaults
    are the tiny model's, the long model has ``1e7`` and ``32768``.
    """
    return LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=max_position, rope_theta=rope_theta, rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)


@dataclass(frozen=True)
class Stage:
    """One curriculum stage: ``fraction`` of all steps on ``batch`` documents of ``seq_len`` ids."""

    seq_len: int
    batch: int
    fraction: float


# Induction forms first on 32-token echo-only documents (after ~850 steps), then pairs and queries
# come in and the context grows to the final length. Shortening the 64-256 stages (tried: 0.06,
# 0.10, 0.10) left the key-value lookup unlearned. The long model (rope_theta 1e7) is the tiny
# model fine-tuned over the stages from 256 to 8192 tokens (``--init-from``, ``--first-len 256``):
# trained from scratch with rope_theta 1e6 or 1e7, the lookup was still unlearned after the 256 stage.
CURRICULUM = (Stage(32, 32, 0.33), Stage(64, 32, 0.08), Stage(128, 16, 0.17), Stage(256, 8, 0.17),
              Stage(512, 4, 0.10), Stage(1024, 2, 0.07), Stage(2048, 1, 0.05), Stage(4096, 1, 0.03),
              Stage(8192, 1, 0.02))


def curriculum(final_len: int, first_len: int = 32) -> list[Stage]:
    """The stages of :data:`CURRICULUM` from ``first_len`` up to ``final_len`` tokens, fractions
    renormalised to sum to 1."""
    stages = [s for s in CURRICULUM if first_len <= s.seq_len <= final_len]
    if not stages:
        raise ValueError(f"no curriculum stage lies in [{first_len}, {final_len}] tokens")
    total = sum(s.fraction for s in stages)
    return [Stage(s.seq_len, s.batch, s.fraction / total) for s in stages]


def training_batch(rng: random.Random, stage: Stage) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, kinds)``, both ``[batch, seq_len]``: documents and what predicts each token.

    ``kinds[b, t]`` is a ``TARGET_*`` of :func:`~rtpurbo_vllm.tiny.task.make_training_example` for
    the prediction of ``ids[b, t]`` from position ``t - 1``. Each document draws its number of pairs
    (= queries, up to one per 32 tokens and ``MAX_PAIRS``; none below 64 tokens), then fills about 40 % of the
    tokens left with echoes (all words below 64 tokens, 70 % digits from there on).
    """
    ids, kinds = [], []
    for _ in range(stage.batch):
        n_pairs = rng.randint(1, min(MAX_PAIRS, stage.seq_len // 32)) if stage.seq_len >= 64 else 0
        left = stage.seq_len - 1 - n_pairs * (PAIR_LEN + QUERY_LEN + VALUE_DIGITS + 1)
        n_echoes = max(1, int(0.6 * left) // (2 * ECHO_LEN[1]))
        echo_len = (ECHO_LEN[0], min(ECHO_LEN[1], left // (2 * n_echoes)))
        doc, targets = make_training_example(rng, stage.seq_len, n_pairs, n_pairs, n_echoes, echo_len,
                                             echo_digit_p=0.7 if n_pairs else 0.0)
        ids.append(doc)
        kinds.append(targets)
    return torch.tensor(ids), torch.tensor(kinds)


def _loss(model: LlamaForCausalLM, ids: torch.Tensor,
          kinds: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Next-token loss of ``ids`` ``[B, T]`` weighted by :data:`LOSS_WEIGHTS` of ``kinds``
    ``[B, T]``, and the accuracy on the answer tokens."""
    weights = torch.zeros(kinds.shape)
    for kind, weight in LOSS_WEIGHTS.items():
        weights[kinds == kind] = weight
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits[:, :-1].float()
    target, w = ids[:, 1:], weights[:, 1:]
    nll = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view_as(w)
    answer = kinds[:, 1:] == TARGET_ANSWER
    acc = (logits.argmax(-1) == target)[answer].float().mean().item() if answer.any() else 0.0
    return (nll * w).sum() / w.sum(), acc


def train(out_dir: str | Path, steps: int = 3000, seed: int = 0, final_len: int = 2048,
          lr: float = 3e-3, eval_prompts: int = 32, retrieval_heads: int = 5,
          headwise_from: int = 512, rope_theta: float = 10000.0, max_position: int = 8192,
          threads: int = 2, init_from: str | Path | None = None,
          first_len: int = 32) -> LlamaForCausalLM:
    """Trains a model with the curriculum from ``first_len`` up to ``final_len`` tokens and saves it
    to ``out_dir``: a fresh one, or with ``init_from`` the weights of that model folder (same shapes;
    the config is still :func:`tiny_config`'s, so ``rope_theta`` may differ from the folder's).

    Dense attention trains the stages below ``headwise_from`` tokens. Then, as RTPurbo does, the
    needle-copy probe (:func:`probe_scores`) picks the ``retrieval_heads`` best-scoring query heads
    and the remaining stages train head-wise: the picked heads full, every other head on 4 sinks
    plus a 256-token window (:func:`attention_mode`), so that retrieval lives in the picked heads
    and the others stay local. The picked heads are saved as ``training_heads.json``.
    ``rope_theta`` and ``max_position`` go to :func:`tiny_config`; ``threads`` is torch's CPU
    thread count.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    config = tiny_config(rope_theta, max_position)
    model = (LlamaForCausalLM(config) if init_from is None else
             LlamaForCausalLM.from_pretrained(str(init_from), config=config, dtype=torch.float32))
    model.config._attn_implementation = "sdpa"
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    warmup, decay_from = max(1, steps // 50), int(0.85 * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        1.0 - 0.9 * max(0, s - decay_from) / max(1, steps - decay_from)))
    stages = curriculum(final_len, first_len)
    bounds = [round(steps * sum(s.fraction for s in stages[:k + 1])) for k in range(len(stages))]
    start, tokens, picked = time.time(), 0, None
    headwise = ExitStack()
    bar = tqdm(range(steps), desc="train", dynamic_ncols=True)
    for step in bar:
        k = next(i for i, b in enumerate(bounds) if step < b)
        stage = stages[k]
        if picked is None and stage.seq_len >= headwise_from:
            model.eval()
            picked = top_heads(probe_scores(model, length=2 * headwise_from), retrieval_heads)
            tqdm.write(f"[{time.time() - start:6.0f}s] step {step}: probe picks retrieval heads "
                       f"{picked}; head-wise training from here")
            headwise.enter_context(attention_mode(model, picked))
            model.train()
        ids, kinds = training_batch(rng, stage)
        loss, acc = _loss(model, ids, kinds)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        tokens += ids.numel()
        bar.set_postfix(len=stage.seq_len, loss=f"{loss.item():.3f}", acc=f"{acc:.2f}",
                        tok_s=f"{tokens / (time.time() - start):.0f}")
        if step + 1 == bounds[k] and stage.seq_len >= 64:
            model.eval()
            n_pairs = min(8, stage.seq_len // 48)
            ev = evaluate(model, stage.seq_len, eval_prompts, seed + 1_000_000, n_pairs)
            tqdm.write(f"[{time.time() - start:6.0f}s] stage {stage.seq_len} done at step {step + 1}: "
                       f"exact match {ev:.2%} on {eval_prompts} prompts of {stage.seq_len} tokens "
                       f"with {n_pairs} pairs")
            model.train()
    headwise.close()
    model.eval()
    save_model(model, out_dir)
    if picked is not None:
        (Path(out_dir) / "training_heads.json").write_text(json.dumps(
            {"retrieval_heads": picked, "sinks": 4, "window": 256,
             "note": "heads kept full while training head-wise; all others were sink+window"},
            indent=2) + "\n")
    return model


def save_model(model: LlamaForCausalLM, out_dir: str | Path) -> None:
    """Writes the model (bf16 safetensors) and the tokenizer files to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                                               pad_token_id=PAD_ID, do_sample=False)
    model.to(torch.bfloat16).save_pretrained(str(out))
    model.float()
    tok = save_tokenizer(out, model.config.max_position_embeddings)
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token,
         "unk_token": tok.unk_token}, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Head-wise attention, probe scores and evaluation


@dataclass
class _AttentionMode:
    """State read by :func:`_tiny_attention`; set by :func:`attention_mode`."""

    retrieval: list[torch.Tensor] | None = None   # per layer, [H] bool; None = all heads full
    window: int = 256
    sinks: int = 4
    record: range | None = None                   # query rows whose attention is recorded
    recorded: dict[int, torch.Tensor] | None = None


_MODE = _AttentionMode()


def _local_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
                     window: int, sinks: int) -> torch.Tensor:
    """Causal attention to ``sinks`` sink tokens plus a ``window``-token sliding window, blockwise.

    ``query``/``key``/``value`` ``[B, H, T, D]`` (one KV head per query head) -> ``[B, H, T, D]``.
    Queries go in blocks of ``window`` rows; each block sees the sinks, the block before and itself,
    so the cost is ``O(T * window)`` instead of ``O(T^2)``.
    """
    B, H, T, D = query.shape
    W, nb = window, -(-T // window)
    pad = nb * W - T
    q = F.pad(query, (0, 0, 0, pad)).view(B, H, nb, W, D)

    def blocks(x: torch.Tensor) -> torch.Tensor:          # -> [B, H, nb, sinks + 2W, D]
        x = F.pad(x, (0, 0, W, pad)).view(B, H, nb + 1, W, D)   # one empty block in front
        sink = x[:, :, 1:2, :sinks].expand(B, H, nb, sinks, D)
        return torch.cat([sink, x[:, :, :-1], x[:, :, 1:]], dim=3).view(B, H, nb, sinks + 2 * W, D)

    i = torch.arange(nb)[:, None, None] * W + torch.arange(W)[None, :, None]   # query position
    p = i - i % W - W + torch.arange(2 * W)[None, None, :]                      # window key position
    s = torch.arange(sinks)[None, None, :]
    mask = torch.cat([(i - s >= W).expand(nb, W, sinks),      # sinks outside the window
                      (p >= 0) & (p <= i) & (i - p < W)], dim=2)
    out = F.scaled_dot_product_attention(q, blocks(key), blocks(value), attn_mask=mask, scale=scaling)
    return out.view(B, H, nb * W, D)[:, :, :T]


def _tiny_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
                    dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """Causal attention without padding; ``query`` ``[B, H, T, D]``, ``key``/``value``
    ``[B, HKV, S, D]`` (the last ``T`` of the ``S`` positions are the queries) -> ``[B, T, H, D]``.

    Local heads (not in ``_MODE.retrieval``) see the first ``sinks`` keys and the last ``window``
    keys up to themselves. With ``_MODE.record`` set, the post-softmax attention of those query rows
    is kept in ``_MODE.recorded[layer]`` as ``[B, H, len(record), S]``.
    """
    H, T, S = query.shape[1], query.shape[2], key.shape[2]
    if _MODE.record is None and (_MODE.retrieval is None or S <= _MODE.window) and T == S:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                             enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    if _MODE.record is None and T == S:                       # head-wise prefill: split the heads
        full = _MODE.retrieval[module.layer_idx]
        kv = torch.arange(H) // (H // key.shape[1])
        ret, loc = full.nonzero().flatten(), (~full).nonzero().flatten()
        outs = []                                             # (empty head sets crash SDPA)
        if len(ret):
            outs.append(F.scaled_dot_product_attention(query[:, ret], key[:, kv[ret]],
                                                       value[:, kv[ret]], is_causal=True,
                                                       scale=scaling))
        if len(loc):
            outs.append(_local_attention(query[:, loc], key[:, kv[loc]], value[:, kv[loc]],
                                         scaling, _MODE.window, _MODE.sinks))
        out = torch.cat(outs, dim=1)[:, torch.cat([ret, loc]).argsort()]
        return out.transpose(1, 2).contiguous(), None
    i = torch.arange(S - T, S)[:, None]
    j = torch.arange(S)[None, :]
    allowed = (j <= i).expand(H, T, S)
    if _MODE.retrieval is not None:
        local = (j <= i) & ((i - j < _MODE.window) | (j < _MODE.sinks))
        allowed = torch.where(_MODE.retrieval[module.layer_idx][:, None, None], allowed, local)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling,
                                         enable_gqa=True)
    if _MODE.record is not None:
        rows = list(_MODE.record)
        k = key.repeat_interleave(H // key.shape[1], dim=1)
        scores = (query[:, :, rows] @ k.transpose(2, 3)).float() * scaling
        scores = scores.masked_fill(~allowed[:, rows], float("-inf"))
        _MODE.recorded[module.layer_idx] = scores.softmax(-1)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("rtpurbo_tiny", _tiny_attention)


@contextmanager
def attention_mode(model: LlamaForCausalLM, retrieval: Sequence[Sequence[int]] | None = None,
                   window: int = 256, sinks: int = 4,
                   record: range | None = None) -> Iterator[dict[int, torch.Tensor]]:
    """Runs ``model`` with :func:`_tiny_attention` inside the block.

    Args:
        retrieval: per layer, the query heads that keep full attention; the others get ``sinks``
            sink tokens plus a ``window``-token sliding window. None keeps every head full.
        record: query rows whose attention probabilities are recorded.

    Yields:
        ``{layer: [B, H, len(record), S]}`` filled by the forward passes run in the block.
    """
    heads = model.config.num_attention_heads
    masks = None
    if retrieval is not None:
        masks = [torch.zeros(heads, dtype=torch.bool) for _ in retrieval]
        for mask, layer_heads in zip(masks, retrieval):
            mask[list(layer_heads)] = True
    global _MODE
    previous, impl = _MODE, model.config._attn_implementation
    _MODE = _AttentionMode(masks, window, sinks, record, {})
    model.config._attn_implementation = "rtpurbo_tiny"
    try:
        yield _MODE.recorded
    finally:
        _MODE = previous
        model.config._attn_implementation = impl


@torch.no_grad()
def probe_scores(model: LlamaForCausalLM, length: int = 2048, seed: int = 0) -> torch.Tensor:
    """``[L, H]`` needle-copy retrieval score per query head (paper Eq. 3).

    The mean over the second needle copy's tokens of the attention mass on the first copy, on one
    :func:`~rtpurbo_vllm.tiny.task.make_probe` document of ``length`` tokens.
    """
    probe = make_probe(seed, length)
    with attention_mode(model, record=probe.second) as recorded:
        model.model(input_ids=torch.tensor([probe.ids]))
    return torch.stack([recorded[layer][0, :, :, probe.first].sum(-1).mean(-1)
                        for layer in range(model.config.num_hidden_layers)])


def top_heads(scores: torch.Tensor, n: int) -> list[list[int]]:
    """The ``n`` heads of highest score in ``scores`` ``[L, H]``, as sorted per-layer lists."""
    heads = scores.shape[1]
    best = scores.flatten().topk(n).indices.tolist()
    return [sorted(h % heads for h in best if h // heads == layer)
            for layer in range(scores.shape[0])]


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, context_len: int, n_prompts: int = 32, seed: int = 1_000_000,
             n_pairs: int = 8, min_distance: int = 0,
             retrieval: Sequence[Sequence[int]] | None = None, window: int = 256,
             batch: int = 4) -> float:
    """Greedy exact-match accuracy on ``n_prompts`` prompts (seeds ``seed``, ``seed + 1``, ...).

    Greedy decoding gets an answer exactly right iff the argmax after the prompt and after each
    answer prefix is the next answer token, so one teacher-forced forward per prompt decides it.
    With ``retrieval`` given the model runs head-wise (see :func:`attention_mode`).
    """
    prompts = [make_prompt(seed + k, context_len, n_pairs, min_distance) for k in range(n_prompts)]
    correct = 0
    with attention_mode(model, retrieval, window) if retrieval is not None else nullcontext():
        for b in range(0, n_prompts, batch):
            chunk = prompts[b:b + batch]
            ids = torch.tensor([p.ids + p.answer for p in chunk])
            n = len(chunk[0].answer)
            hidden = model.model(input_ids=ids).last_hidden_state[:, -n - 1:-1]
            pred = model.lm_head(hidden).argmax(-1)
            correct += (pred == ids[:, -n:]).all(-1).sum().item()
    return correct / n_prompts


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder the trained model is written to")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--final-len", type=int, default=2048, help="longest curriculum stage")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-prompts", type=int, default=32)
    parser.add_argument("--rope-theta", type=float, default=10000.0, help="RoPE base")
    parser.add_argument("--max-position", type=int, default=8192, help="max_position_embeddings")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--init-from", help="model folder whose weights training starts from")
    parser.add_argument("--first-len", type=int, default=32, help="shortest curriculum stage")
    parser.add_argument("--retrieval-heads", type=int, default=5,
                        help="query heads kept full in head-wise training and the final check")
    parser.add_argument("--eval-lens", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1024, 2048, 4096], help="context lengths of the final check")
    args = parser.parse_args(argv)
    start = time.time()
    model = train(args.out, args.steps, args.seed, args.final_len, args.lr, args.eval_prompts,
                  args.retrieval_heads, rope_theta=args.rope_theta, max_position=args.max_position,
                  threads=args.threads, init_from=args.init_from, first_len=args.first_len)
    print(f"trained in {time.time() - start:.0f}s; saved to {args.out}")
    scores = probe_scores(model, length=min(2048, max(args.eval_lens)))
    retrieval = top_heads(scores, args.retrieval_heads)
    print("probe scores [layer, head]:\n" + "\n".join(
        " ".join(f"{v:.3f}" for v in row) for row in scores.tolist()))
    print(f"top {args.retrieval_heads} heads per layer: {retrieval}")
    for length in args.eval_lens:
        far = length // 2                  # the queried pair at least half the context back
        dense = evaluate(model, length, args.eval_prompts, 2_000_000, min_distance=far)
        sparse = evaluate(model, length, args.eval_prompts, 2_000_000, min_distance=far,
                          retrieval=retrieval)
        print(f"{length} tokens, pair >= {far} back: exact match dense {dense:.2%}, head-wise "
              f"(top-{args.retrieval_heads} full, rest 4 sinks + 256 window) {sparse:.2%}")


if __name__ == "__main__":
    main()
