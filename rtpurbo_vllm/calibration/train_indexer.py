"""Stage 1 of RTPurbo (paper notes §3.4-3.5): fit the 16-dim indexer of each retrieval head.

The model is frozen; only ``W^Q``/``W^K`` (``[HR, DI, D]`` per layer, float32) train. Each step
takes one sequence, samples ``queries_per_seq`` query positions in its second half and, per
retrieval head, minimises the forward KL from the real attention row (post-RoPE, scaled, causal) to
the indexer's softmax over ``(W^Q q_pre) . (W^K k_pre)``, averaged over the sampled queries and the
heads. Teacher rows are computed per layer in head chunks for the sampled queries only, so a
32K-token sequence never needs an attention matrix; gradients are accumulated chunk by chunk.

Optimiser: AdamW (lr 1e-3, weight decay 0.01), linear warm-up from 0 over ``warmup_steps``, cosine
decay to 0, gradient-norm clip 1.0. The data and query positions of step ``s`` depend only on
``(seed, s)``, so a run resumed from a checkpoint repeats the uninterrupted run exactly.

Initialisation ``lowfreq`` (default): both projections select the ``DI`` lowest-frequency channels
(un-rotated channels first, then RoPE pairs by increasing frequency, pairs kept whole), scaled by
``sqrt(scale)``; the initial index score is then the low-frequency part of the real attention logit,
which carries the long-range semantic match (paper notes §3.1). ``random`` is a Gaussian baseline.

Checkpoints are folders ``step-NNNNNN`` (``state.safetensors`` + ``state.json``, no pickle), written
atomically every ``checkpoint_every`` steps and at the end; only the newest is kept.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from rtpurbo_vllm import outputs
from rtpurbo_vllm.artifacts.validate import param_problem
from rtpurbo_vllm.calibration.capture import LoadedModel, attention_rows, capture_retrieval, resolve_model
from rtpurbo_vllm.calibration.data import TokenSource, sample_sequence
from rtpurbo_vllm.calibration.heads import HeadsFile
from rtpurbo_vllm.calibration.train_config import TrainConfig
from rtpurbo_vllm.rope import RopeSpec, rope_cos_sin
from rtpurbo_vllm.triton_kernels.index_keys import index_project_ref

CHECKPOINT_FORMAT = "rtpurbo-indexer-checkpoint"
STATE_JSON, STATE_TENSORS = "state.json", "state.safetensors"
# Teacher and student rows are computed for at most this many (head, query, key) entries at once.
_MAX_ROW_ELEMENTS = 1 << 24


def lowfreq_channels(rope: RopeSpec, index_dim: int) -> torch.Tensor:
    """``[index_dim]`` int64: the head channels of lowest RoPE frequency (un-rotated channels first,
    then rotary pairs by increasing frequency, both channels of a pair together), ascending."""
    cos, sin = rope_cos_sin(rope, torch.ones(1, dtype=torch.long))
    freq = torch.atan2(sin[0], cos[0]).abs()                                         # [rotary_dim // 2]
    half = rope.rotary_dim // 2
    channels = torch.arange(rope.head_size)
    pair = torch.where(channels < rope.rotary_dim,
                       channels % half if rope.is_neox_style else channels // 2, -1)
    chan_freq = torch.where(pair >= 0, freq[pair.clamp(min=0)], torch.zeros(()))
    order = sorted(range(rope.head_size), key=lambda c: (float(chan_freq[c]), int(pair[c]), c))
    return torch.tensor(sorted(order[:index_dim]))


def init_projection(lm: LoadedModel, num_heads: int, index_dim: int, init: str,
                    generator: torch.Generator) -> torch.Tensor:
    """``[num_heads, index_dim, D]`` float32 (CPU) initial ``W^Q`` or ``W^K`` (see the module doc)."""
    if init == "random":
        return torch.randn(num_heads, index_dim, lm.head_dim, generator=generator) * lm.head_dim ** -0.5
    select = torch.zeros(index_dim, lm.head_dim)
    select[torch.arange(index_dim), lowfreq_channels(lm.rope, index_dim)] = lm.scale ** 0.5
    return select.expand(num_heads, -1, -1).clone()


def layer_kl(lm: LoadedModel, heads: list[int], q_pre: torch.Tensor, k_pre: torch.Tensor,
             query_pos: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor, loss_scale: float = 0.0) -> torch.Tensor:
    """Per-head KL(real attention || indexer softmax) of one layer, averaged over the queries.

    Args:
        heads: the layer's HR retrieval query heads.
        q_pre: ``[Q, HR, D]`` pre-RoPE queries of those heads at ``query_pos`` (``[Q]`` int64).
        k_pre: ``[T, HKV, D]`` pre-RoPE keys of the layer.
        w_q, w_k: ``[HR, DI, D]`` float32 indexer projections (may require grad).
        loss_scale: when > 0, ``loss_scale * kl.sum()`` is back-propagated chunk by chunk into
            ``w_q``/``w_k``'s gradients (so the graph of one head chunk at a time is alive).

    Returns:
        ``[HR]`` float32 (detached), KL per head in nats.
    """
    dev = w_q.device
    num_q, num_t = q_pre.shape[0], k_pre.shape[0]
    kv_of = torch.tensor(heads, device=dev) // (lm.num_heads // lm.num_kv_heads)      # [HR]
    future = torch.arange(num_t, device=dev)[None, :] > query_pos.to(dev)[:, None]   # [Q, T]
    chunk = max(1, _MAX_ROW_ELEMENTS // (num_q * num_t))
    out = torch.empty(len(heads), device=dev)
    for h0 in range(0, len(heads), chunk):
        sl = slice(h0, min(h0 + chunk, len(heads)))
        with torch.no_grad():
            teacher = attention_rows(q_pre[:, sl], k_pre, query_pos, torch.tensor(heads[sl]), lm)  # [h, Q, T]
        q_idx = index_project_ref(q_pre[:, sl].to(dev), w_q[sl])                                  # [Q, h, DI]
        k_idx = index_project_ref(k_pre[:, kv_of[sl]].to(dev), w_k[sl])                           # [T, h, DI]
        logits = torch.einsum("qhi,thi->hqt", q_idx, k_idx).masked_fill(future, float("-inf"))
        log_student = torch.log_softmax(logits, dim=-1).masked_fill(future, 0.0)          # [h, Q, T]
        kl = (torch.xlogy(teacher, teacher) - teacher * log_student).sum(-1).mean(-1)     # [h]
        if loss_scale > 0:
            (kl.sum() * loss_scale).backward()
        out[sl] = kl.detach()
    return out


@dataclass(frozen=True)
class Checkpoint:
    """A training checkpoint (also the final result of a run).

    Attributes:
        path: its ``step-NNNNNN`` folder.
        step: optimiser steps done.
        state: the ``state.json`` content (config, heads, model, losses, per-head KL).
        tensors: ``layers.{i}.w_q``/``layers.{i}.w_k`` (``[HR_i, DI, D]`` float32, every layer, 0 rows
            where there are no retrieval heads) and the AdamW moments ``optim.<name>.exp_avg[_sq]``.
    """

    path: Path
    step: int
    state: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    def indexer(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """Per layer ``(w_q, w_k)``, as :class:`~rtpurbo_vllm.artifacts.RTPurboArtifact` takes it."""
        return tuple((self.tensors[f"layers.{i}.w_q"], self.tensors[f"layers.{i}.w_k"])
                     for i in range(len(self.state["retrieval_heads"])))


def _step_dirs(out_dir: Path) -> list[Path]:
    return sorted(p for p in out_dir.glob("step-*") if p.is_dir() and (p / STATE_JSON).is_file())


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Reads a ``step-NNNNNN`` folder, or the newest one in a training output folder.

    Raises:
        ValueError: no checkpoint there, or it is not readable or incomplete (see :func:`check_checkpoint`).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / STATE_JSON).is_file():
        found = _step_dirs(path) if path.is_dir() else []
        if not found:
            raise ValueError(f"no indexer checkpoint in {path}; fix: pass the --out folder of "
                             f"`rtpurbo-calibrate train-indexer` or one of its step-NNNNNN folders")
        path = found[-1]
    try:
        state = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
        tensors = load_file(path / STATE_TENSORS)
    except (OSError, ValueError, SafetensorError) as exc:
        raise ValueError(f"the indexer checkpoint {path} is not readable ({exc}); fix: resume from or export "
                         f"another checkpoint") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an indexer checkpoint; fix: pass the --out folder of train-indexer")
    check_checkpoint(path, state, tensors)
    return Checkpoint(path, state["step"], state, tensors)


def check_checkpoint(path: Path, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """A checkpoint is complete: ``state.json`` has its keys with the right types, one finite loss per
    step done, the full training config; ``state.safetensors`` has ``layers.{i}.w_q``/``w_k`` for
    every layer and both AdamW moments, of the same shape, for every layer with retrieval heads.

    Raises:
        ValueError: naming the first missing or damaged entry.
    """
    def damaged(problem: str) -> ValueError:
        return ValueError(f"the indexer checkpoint {path} is damaged: {problem}; fix: resume from or export "
                          f"another checkpoint, or delete {path} and train again")

    types = {"step": int, "losses": list, "retrieval_heads": list, "model": dict, "config": dict, "data": str}
    for key, typ in types.items():
        if not isinstance(state.get(key), typ) or isinstance(state.get(key), bool):
            raise damaged(f"{STATE_JSON} has no {typ.__name__} {key!r}")
    step, losses = state["step"], state["losses"]
    if step < 1 or len(losses) != step or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in losses):
        raise damaged(f"{STATE_JSON} holds {len(losses)} losses for step {step}; expected one finite loss per step")
    missing = [k for k in asdict(TrainConfig()) if k not in state["config"]]
    if missing:
        raise damaged(f"{STATE_JSON} config lacks {missing}")
    if not all(isinstance(heads, list) for heads in state["retrieval_heads"]):
        raise damaged(f"{STATE_JSON} retrieval_heads is not a list of per-layer lists")
    for layer, heads in enumerate(state["retrieval_heads"]):
        for which in ("w_q", "w_k"):
            name = f"layers.{layer}.{which}"
            names = [name] + ([f"optim.{name}.exp_avg", f"optim.{name}.exp_avg_sq"] if heads else [])
            absent = [n for n in names if n not in tensors]
            if absent:
                raise damaged(f"{STATE_TENSORS} lacks {absent}")
            shapes = {tuple(tensors[n].shape) for n in names}
            if len(shapes) != 1 or tensors[name].dim() != 3 or tensors[name].shape[0] != len(heads):
                raise damaged(f"{STATE_TENSORS}: {name} and its AdamW moments have shapes {sorted(shapes)}, "
                              f"expected [{len(heads)}, DI, D] each")


def _save_checkpoint(out_dir: Path, step: int, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    target = out_dir / f"step-{step:06d}"
    with outputs.staged_dir(target) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / STATE_TENSORS,
                  metadata={"format": "pt"})
        (tmp / STATE_JSON).write_text(json.dumps(state, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    for old in _step_dirs(out_dir):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    return target


def train_indexer(model: str | os.PathLike | LoadedModel, heads: str | os.PathLike | HeadsFile,
                  out_dir: str | os.PathLike, config: TrainConfig = TrainConfig(), *,
                  data: str | os.PathLike | None = None, checkpoint_every: int = 100, resume: bool = False,
                  device: str | None = None, progress: bool = True) -> Checkpoint:
    """The ``train-indexer`` command: trains the indexer of the heads file's retrieval heads.

    Args:
        model: a model folder or an already loaded model.
        heads: the heads file (or its folder, or its content); must match the model.
        out_dir: checkpoint folder (``step-NNNNNN`` subfolders).
        config: the training settings.
        data: calibration text (file or folder) or None for synthetic text.
        checkpoint_every: save every this many steps (and at the end).
        resume: continue from the newest checkpoint in ``out_dir`` (same config required).
        device: ``cuda``/``cpu``/... (default: CUDA when available).
        progress: show a tqdm bar (loss, tokens/s, ETA).

    Returns:
        The final checkpoint.

    Raises:
        ValueError: bad settings, a missing model folder, a heads file of another model, an existing
            checkpoint without ``resume`` (or a checkpoint of other settings with it), an unwritable
            ``out_dir`` (nothing is created before the checks pass).
    """
    from tqdm.auto import tqdm

    if checkpoint_every < 1:
        raise ValueError(f"--checkpoint-every must be >= 1, got {checkpoint_every}")
    rule = param_problem("index_dim", config.index_dim)
    if rule is not None:
        raise ValueError(f"--index-dim is {config.index_dim}, {rule}; fix: e.g. --index-dim 16")
    out_dir = outputs.check_writable_dir(out_dir)
    lm = resolve_model(model, device)
    heads_file = heads if isinstance(heads, HeadsFile) else HeadsFile.load(heads, lm.hf_config)
    retrieval = heads_file.retrieval_heads
    if len(retrieval) != lm.num_layers or not any(retrieval):
        raise ValueError("the heads file selects no retrieval heads for this model; fix: re-run `heads`")
    source = TokenSource.create(lm.tokenizer, data, "train")
    dev = lm.device
    identity = {"retrieval_heads": retrieval, "model": heads_file.model.to_dict(), "config": asdict(config),
                "data": source.description}

    gen = torch.Generator().manual_seed(config.seed)
    params: dict[str, torch.nn.Parameter] = {}
    for layer, layer_heads in enumerate(retrieval):
        if layer_heads:
            for which in ("w_q", "w_k"):
                w = init_projection(lm, len(layer_heads), config.index_dim, config.init, gen)
                params[f"layers.{layer}.{which}"] = torch.nn.Parameter(w.to(dev))
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=config.weight_decay)
    start, losses = 0, []
    found = _step_dirs(out_dir)
    if found and not resume:
        raise ValueError(f"{out_dir} already holds the checkpoint {found[-1].name}; fix: pass --resume to continue "
                         f"it, or choose another --out folder")
    if found:
        ckpt = load_checkpoint(found[-1])
        mismatch = {k: (ckpt.state.get(k), v) for k, v in identity.items() if ckpt.state.get(k) != v}
        if mismatch:
            raise ValueError(f"cannot resume {ckpt.path}: it was made with other settings "
                             f"({', '.join(mismatch)} differ); fix: use the original settings or another --out")
        start, losses = ckpt.step, list(ckpt.state["losses"])
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(ckpt.tensors[name])
        optimizer.load_state_dict({"state": {i: {"step": torch.tensor(float(start)),
                                                 "exp_avg": ckpt.tensors[f"optim.{name}.exp_avg"].to(dev),
                                                 "exp_avg_sq": ckpt.tensors[f"optim.{name}.exp_avg_sq"].to(dev)}
                                             for i, name in enumerate(params)},
                                   "param_groups": optimizer.state_dict()["param_groups"]})

    num_heads_total = sum(map(len, retrieval))
    head_kl: dict[int, torch.Tensor] = {}
    bar = tqdm(total=config.steps, initial=start, desc="train-indexer", unit="step", disable=not progress)
    ckpt_path = found[-1] if found else None
    for step in range(start, config.steps):
        t0 = time.perf_counter()
        ids, query_pos = sample_sequence(source, config.seq_len, config.queries_per_seq, config.seed, step)
        captured = capture_retrieval(lm, retrieval, ids, query_pos)
        optimizer.zero_grad(set_to_none=True)
        for layer, layer_heads in enumerate(retrieval):
            if layer_heads:
                head_kl[layer] = layer_kl(lm, layer_heads, captured.q_pre[layer], captured.k_pre[layer], query_pos,
                                          params[f"layers.{layer}.w_q"], params[f"layers.{layer}.w_k"],
                                          loss_scale=1.0 / num_heads_total)
        torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm)
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(step)
        optimizer.step()
        loss = float(torch.cat(list(head_kl.values())).mean())
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{config.seq_len / (time.perf_counter() - t0):.0f}")
        bar.update(1)
        done = step + 1
        if done % checkpoint_every == 0 or done == config.steps:
            tensors = _all_layer_tensors(params, retrieval, config.index_dim, lm.head_dim)
            for name in params:
                tensors[f"optim.{name}.exp_avg"] = optimizer.state[params[name]]["exp_avg"]
                tensors[f"optim.{name}.exp_avg_sq"] = optimizer.state[params[name]]["exp_avg_sq"]
            state = {"format": CHECKPOINT_FORMAT, "step": done, **identity, "losses": losses,
                     "head_kl": {str(layer): kl.tolist() for layer, kl in head_kl.items()}}
            ckpt_path = _save_checkpoint(out_dir, done, state, tensors)
    bar.close()
    return load_checkpoint(ckpt_path)


def _all_layer_tensors(params: dict[str, torch.nn.Parameter], retrieval: list[list[int]], index_dim: int,
                       head_dim: int) -> dict[str, torch.Tensor]:
    """``layers.{i}.w_q``/``w_k`` for every layer, with ``[0, DI, D]`` tensors where HR is 0."""
    empty = torch.zeros(0, index_dim, head_dim)
    return {f"layers.{i}.{w}": params.get(f"layers.{i}.{w}", empty).detach()
            for i in range(len(retrieval)) for w in ("w_q", "w_k")}
