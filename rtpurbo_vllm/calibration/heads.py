"""Retrieval-head finding: needle-copy scores (Eq.3), global ranking, selection, reports.

Each query head h gets ``R_h = mean_{t in N_post} sum_{j in N_pre} A_h(t, j)``: the attention mass
the second needle copy puts on the first, averaged over several probes. Heads are ranked globally
over all layers; the top ones (``ratio`` of all query heads, or ``count``) are retrieval heads. With
``by_kv_group`` whole KV groups are ranked by their best query head and taken until the target
count of query heads is reached, so every KV head is either fully retrieval or fully local and the
KV-cache saving is known in advance.

The *heads file* (JSON, :data:`HEADS_FILE`) carries the model fingerprint, the per-layer retrieval
heads and the scores; ``train-indexer`` and ``export`` read it and refuse it for another model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from rtpurbo_vllm.artifacts import ArtifactError, ModelFingerprint
from rtpurbo_vllm.artifacts.validate import check_matches_model
from rtpurbo_vllm import outputs
from rtpurbo_vllm.calibration.capture import LoadedModel, attention_rows, capture_pre_rope, resolve_model
from rtpurbo_vllm.calibration.data import TokenSource
from rtpurbo_vllm.calibration.probes import DEFAULT_NEEDLE_TOKENS, NeedleProbe, make_probes

HEADS_FILE = "heads.json"
SCORES_JSON, SCORES_CSV, HEATMAP_PNG = "head_scores.json", "head_scores.csv", "head_heatmap.png"
HEADS_FORMAT = "rtpurbo-heads"
HEADS_FORMAT_VERSION = 1
DEFAULT_RATIO = 0.15
# Attention rows are computed for at most this many (head, query, key) entries at once.
_MAX_ROW_ELEMENTS = 1 << 25


def probe_scores(lm: LoadedModel, probe: NeedleProbe) -> torch.Tensor:
    """Eq.3 on one probe: ``[L, HQ]`` float32 (CPU), each head's mean attention mass from the second
    needle copy's tokens onto the first copy."""
    scores = torch.zeros(lm.num_layers, lm.num_heads)
    rows = torch.tensor(list(probe.second))
    first = slice(probe.first.start, probe.first.stop)
    chunk = max(1, _MAX_ROW_ELEMENTS // (len(rows) * len(probe.ids)))

    def on_layer(layer: int, q_pre: torch.Tensor, k_pre: torch.Tensor) -> None:
        for h0 in range(0, lm.num_heads, chunk):
            heads = torch.arange(h0, min(h0 + chunk, lm.num_heads))
            attn = attention_rows(q_pre[rows.to(q_pre.device)][:, heads.to(q_pre.device)], k_pre, rows, heads, lm)
            scores[layer, heads] = attn[:, :, first].sum(-1).mean(-1).cpu()         # [chunk]

    capture_pre_rope(lm, torch.tensor(probe.ids), on_layer)
    return scores


def retrieval_scores(lm: LoadedModel, probes: Sequence[NeedleProbe]) -> torch.Tensor:
    """``[L, HQ]`` float32: :func:`probe_scores` averaged over ``probes``."""
    return torch.stack([probe_scores(lm, p) for p in probes]).mean(0)


def target_count(num_query_heads: int, ratio: float | None, count: int | None) -> int:
    """How many query heads to select: ``count`` when given, else ``round(ratio * num_query_heads)``
    (at least 1).

    Raises:
        ValueError: neither given, or out of range.
    """
    if count is not None:
        if not 1 <= count <= num_query_heads:
            raise ValueError(f"--count must be in [1, {num_query_heads}] (the model's query heads), got {count}")
        return count
    if ratio is None or not 0 < ratio <= 1:
        raise ValueError(f"--ratio must be in (0, 1], got {ratio}")
    return max(1, round(ratio * num_query_heads))


def select_heads(scores: torch.Tensor, num_kv_heads: int, ratio: float | None = DEFAULT_RATIO,
                 count: int | None = None, by_kv_group: bool = False) -> list[list[int]]:
    """Global top heads of ``scores`` ``[L, HQ]``; ties go to the lower (layer, head).

    Args:
        scores: ``[L, HQ]`` float, higher = more retrieval-like.
        num_kv_heads: HKV (for ``by_kv_group``).
        ratio, count: the target number of query heads (``count`` wins; see :func:`target_count`).
        by_kv_group: rank KV groups by their best query head and take whole groups until at least
            the target number of query heads is selected.

    Returns:
        Per layer, the sorted retrieval query-head ids.
    """
    num_layers, num_heads = scores.shape
    target = target_count(num_layers * num_heads, ratio, count)
    group = num_heads // num_kv_heads
    if by_kv_group:
        ranked = scores.float().reshape(num_layers, num_kv_heads, group).amax(-1).flatten()
    else:
        ranked, group = scores.float().flatten(), 1
    order = torch.sort(ranked, descending=True, stable=True).indices[: -(-target // group)]
    selected: list[list[int]] = [[] for _ in range(num_layers)]
    per_layer = num_heads // group
    for idx in order.tolist():
        layer, unit = divmod(idx, per_layer)
        selected[layer] += range(unit * group, (unit + 1) * group)
    return [sorted(heads) for heads in selected]


@dataclass(frozen=True)
class HeadsFile:
    """The content of a heads file.

    Attributes:
        model: fingerprint of the model the heads were found on.
        retrieval_heads: per layer, sorted retrieval query-head ids.
        scores: ``[L][HQ]`` needle-copy scores.
        settings: how they were found (selection and probe settings; free-form JSON).
    """

    model: ModelFingerprint
    retrieval_heads: list[list[int]]
    scores: list[list[float]]
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"format": HEADS_FORMAT, "format_version": HEADS_FORMAT_VERSION, "model": self.model.to_dict(),
                "retrieval_heads": self.retrieval_heads, "settings": self.settings, "scores": self.scores}

    def save(self, path: str | os.PathLike) -> Path:
        return outputs.write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike, hf_config=None) -> HeadsFile:
        """Reads a heads file (a ``heads.json`` or the folder holding it); when ``hf_config`` is given the
        file must have been made for that model.

        Raises:
            ValueError: unreadable, not a heads file, or made for another model.
        """
        path = Path(path)
        path = path / HEADS_FILE if path.is_dir() else path
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the heads file {path} ({exc}); fix: pass the {HEADS_FILE} written "
                             f"by `rtpurbo-calibrate heads`") from exc
        if not isinstance(d, dict) or d.get("format") != HEADS_FORMAT or d.get("format_version") != HEADS_FORMAT_VERSION:
            raise ValueError(f"{path} is not a version-{HEADS_FORMAT_VERSION} heads file; fix: pass the "
                             f"{HEADS_FILE} written by `rtpurbo-calibrate heads`")
        try:
            heads = cls(ModelFingerprint.from_dict(d["model"]), d["retrieval_heads"], d["scores"], d["settings"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"the heads file {path} is malformed ({exc!r}); fix: re-run `rtpurbo-calibrate "
                             f"heads`") from exc
        if hf_config is not None:
            try:
                check_matches_model(heads.model, ModelFingerprint.from_hf_config(hf_config))
            except ArtifactError as exc:
                raise ValueError(f"the heads file {path} was made for a different model: {exc}") from exc
        return heads


def score_table(scores: torch.Tensor, retrieval_heads: Sequence[Sequence[int]], num_kv_heads: int) -> list[dict]:
    """One row per query head: layer, head, kv_head, score, global rank (1 = highest), retrieval flag."""
    num_layers, num_heads = scores.shape
    order = torch.sort(scores.flatten(), descending=True, stable=True).indices.tolist()
    rank = {idx: r + 1 for r, idx in enumerate(order)}
    return [{"layer": layer, "head": head, "kv_head": head // (num_heads // num_kv_heads),
             "score": float(scores[layer, head]), "rank": rank[layer * num_heads + head],
             "retrieval": head in retrieval_heads[layer]}
            for layer in range(num_layers) for head in range(num_heads)]


def plot_heatmap(scores: torch.Tensor, retrieval_heads: Sequence[Sequence[int]], path: str | os.PathLike,
                 title: str) -> Path:
    """PNG heat map of ``scores`` ``[L, HQ]`` (layers down, heads across); retrieval heads are boxed."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_layers, num_heads = scores.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * num_heads + 2), max(3.0, 0.3 * num_layers + 1.5)))
    im = ax.imshow(scores.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    for layer, heads in enumerate(retrieval_heads):
        for head in heads:
            ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="needle-copy score R_h")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return outputs.write_bytes(path, buf.getvalue())


@dataclass(frozen=True)
class HeadsResult:
    """What :func:`find_heads` produced: the heads file content and the paths written."""

    heads: HeadsFile
    paths: dict[str, Path]


def find_heads(model: str | os.PathLike | LoadedModel, out_dir: str | os.PathLike, *,
               ratio: float | None = DEFAULT_RATIO, count: int | None = None, by_kv_group: bool = False,
               probe_tokens: int = 4096, num_probes: int = 4, needle_tokens: int = DEFAULT_NEEDLE_TOKENS,
               data: str | os.PathLike | None = None, needle_data: str | os.PathLike | None = None,
               seed: int = 0, device: str | None = None) -> HeadsResult:
    """The ``heads`` command: scores every query head on needle-copy probes, selects the retrieval
    heads and writes ``heads.json``, ``head_scores.{json,csv}`` and ``head_heatmap.png`` to ``out_dir``.
    Filler comes from ``data``, needles from ``needle_data`` (default: ``data`` as well).

    Raises:
        ValueError: bad selection settings, a probe shorter than needed, an unsupported model or an
            unwritable ``out_dir`` (all checked before the model runs).
    """
    out_dir = outputs.ensure_writable_dir(out_dir)
    lm = resolve_model(model, device)
    target_count(lm.num_layers * lm.num_heads, ratio, count)
    source = TokenSource.create(lm.tokenizer, data, "train")
    needles = None if needle_data is None else TokenSource.create(lm.tokenizer, needle_data, "train")
    probes = make_probes(source, num_probes, probe_tokens, seed, needle_tokens, needle_source=needles)
    scores = retrieval_scores(lm, probes)
    selected = select_heads(scores, lm.num_kv_heads, ratio, count, by_kv_group)
    settings = {"ratio": ratio, "count": count, "by_kv_group": by_kv_group, "probe_tokens": probe_tokens,
                "num_probes": num_probes, "needle_tokens": needle_tokens, "data": source.description,
                "needle_data": (needles or source).description,
                "seed": seed, "num_selected": sum(map(len, selected))}
    heads = HeadsFile(ModelFingerprint.from_hf_config(lm.hf_config), selected, scores.tolist(), settings)
    table = score_table(scores, selected, lm.num_kv_heads)
    name = getattr(lm.hf_config, "_name_or_path", "") or lm.hf_config.architectures[0]
    paths = {"heads": heads.save(out_dir / HEADS_FILE),
             "scores_json": outputs.write_json(out_dir / SCORES_JSON, table),
             "scores_csv": outputs.write_csv(out_dir / SCORES_CSV, table),
             "heatmap": plot_heatmap(scores, selected, out_dir / HEATMAP_PNG,
                                     f"{Path(name).name}: {settings['num_selected']} retrieval heads boxed "
                                     f"({num_probes} probes x {probe_tokens} tokens)")}
    return HeadsResult(heads, paths)
