"""Retrieval-head finding: needle-copy scores (Eq.3), global ranking, selection, reports.

Each query head h gets ``R_h = mean_{t in N_post} sum_{j in N_pre} A_h(t, j)``: the attention mass
the second needle copy puts on the first, averaged over several probes. Heads are ranked globally
over all layers; the top ones (``ratio`` of all query heads, or ``count``) are retrieval heads. With
``by_kv_group`` whole KV groups are ranked by their best query head and taken until the target
count of query heads is reached, so every KV head is either fully retrieval or fully local and the
KV-cache saving is known in advance. With a per-layer KV budget (``kv_heads_per_layer`` N) every
layer may use only its N best KV groups (ranked by their best query head), so the split KV layout,
which pads every layer to the most retrieval KV heads of any layer, keeps N KV heads per layer in full.

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

from rtpurbo_vllm.artifacts import ArtifactError, ModelFingerprint, SparsityParams
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


def budget_groups(scores: torch.Tensor, num_kv_heads: int, kv_heads_per_layer: int) -> torch.Tensor:
    """``[L, HKV]`` bool: in every layer, the ``kv_heads_per_layer`` KV groups whose best query head
    scores highest (ties go to the lower KV head).

    Raises:
        ValueError: ``kv_heads_per_layer`` outside ``[1, HKV]``.
    """
    num_layers, num_heads = scores.shape
    if not 1 <= kv_heads_per_layer <= num_kv_heads:
        raise ValueError(f"--kv-heads-per-layer must be in [1, {num_kv_heads}] (the model's KV heads per "
                         f"layer), got {kv_heads_per_layer}")
    best = scores.float().reshape(num_layers, num_kv_heads, num_heads // num_kv_heads).amax(-1)    # [L, HKV]
    top = torch.sort(best, dim=1, descending=True, stable=True).indices[:, :kv_heads_per_layer]
    return torch.zeros(num_layers, num_kv_heads, dtype=torch.bool).scatter_(1, top, True)


def select_heads(scores: torch.Tensor, num_kv_heads: int, ratio: float | None = DEFAULT_RATIO,
                 count: int | None = None, by_kv_group: bool = False,
                 kv_heads_per_layer: int | None = None) -> list[list[int]]:
    """Global top heads of ``scores`` ``[L, HQ]``; ties go to the lower (layer, head).

    Args:
        scores: ``[L, HQ]`` float, higher = more retrieval-like.
        num_kv_heads: HKV.
        ratio, count: the target number of query heads (``count`` wins; see :func:`target_count`).
        by_kv_group: rank KV groups by their best query head and take whole groups until at least
            the target number of query heads is selected.
        kv_heads_per_layer: a per-layer KV budget N. Every layer may use only its N KV groups with the
            highest best-query-head score (:func:`budget_groups`), so the split KV layout keeps at
            most N KV heads per layer in full. With ``ratio`` and ``count`` both None, every query
            head of those groups is selected (``L * N * HQ/HKV`` heads: their KV heads are kept in full
            anyway); otherwise the global ranking (or ``by_kv_group``) runs over those groups only and
            the target must fit in them.

    Returns:
        Per layer, the sorted retrieval query-head ids.

    Raises:
        ValueError: bad ratio/count/budget, or a target larger than the budget allows (the message
            names the fix).
    """
    num_layers, num_heads = scores.shape
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads per layer are not a multiple of {num_kv_heads} KV heads")
    group = num_heads // num_kv_heads
    if kv_heads_per_layer is None:
        allowed = torch.ones(num_layers, num_kv_heads, dtype=torch.bool)
        target = target_count(num_layers * num_heads, ratio, count)
    else:
        allowed = budget_groups(scores, num_kv_heads, kv_heads_per_layer)
        if ratio is None and count is None:
            return [[h for h in range(num_heads) if allowed[layer, h // group]] for layer in range(num_layers)]
        target = target_count(num_layers * num_heads, ratio, count)
        limit = num_layers * kv_heads_per_layer * group
        if target > limit:
            asked = f"--count {count}" if count is not None else f"--ratio {ratio}"
            raise ValueError(f"{asked} asks for {target} query heads but --kv-heads-per-layer {kv_heads_per_layer} "
                             f"allows at most {limit} ({num_layers} layers x {kv_heads_per_layer} KV heads x "
                             f"{group} query heads); fix: leave out --ratio/--count to take every query head of "
                             f"the chosen KV groups, ask for at most {limit} heads, or raise --kv-heads-per-layer")
    if by_kv_group:
        ranked = scores.float().reshape(num_layers, num_kv_heads, group).amax(-1).flatten()
        usable = allowed.flatten()
    else:
        ranked, usable = scores.float().flatten(), allowed.repeat_interleave(group, dim=1).flatten()
        group = 1
    order = torch.sort(ranked, descending=True, stable=True).indices
    order = order[usable[order]][: -(-target // group)]
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
    return outputs.write_figure(path, fig)


def predict_kv_capacity(retrieval_heads: Sequence[Sequence[int]], num_heads: int, num_kv_heads: int,
                        head_dim: int, context: int, params: SparsityParams | None = None) -> dict[str, Any]:
    """What the default compact KV layout (one rank) makes of ``retrieval_heads``: the units it plans
    and the KV capacity at ``context`` tokens against vLLM's stock cache (FLASH_ATTN), with a bf16 and
    with an fp8 KV cache on both sides (:meth:`KVLayout.capacity_ratio`: whole blocks of a decoding
    sequence, without vLLM's chunked-prefill admission reserve).

    Sinks, window, dense threshold and DI come from ``params`` (default :class:`SparsityParams`); index
    keys as served by default (:func:`~rtpurbo_vllm.kv_cache.index_key_dtype`: bf16 beside a bf16 cache,
    e4m3 beside an fp8 one).
    """
    from rtpurbo_vllm.head_layout import HeadLayout
    from rtpurbo_vllm.kv_cache.layout import FULL, KVLayout, index_key_dtype

    params = params or SparsityParams()
    heads = HeadLayout.from_lists(num_heads, num_kv_heads, retrieval_heads)
    ratios = {}
    for name, kv_dtype in (("bf16", torch.bfloat16), ("fp8", torch.uint8)):
        layout = KVLayout.build(heads, head_size=head_dim, kv_dtype=kv_dtype,
                                index_dtype=index_key_dtype("auto", torch.bfloat16, kv_dtype),
                                index_dim=params.index_dim, sink_tokens=params.sink_tokens, window=params.window,
                                dense_threshold=params.dense_threshold)
        ratios[name] = round(layout.capacity_ratio(context), 3)
        if name == "bf16":
            full = layout.units[FULL]
            units = f"{full.count} x {full.slots}"
    return {"query_heads": sum(map(len, retrieval_heads)),
            "full_kv_heads": sum(len(heads.retrieval_kv_heads(l)) for l in range(heads.num_layers)),
            "kv_heads": num_kv_heads * heads.num_layers, "full_units": units,
            "capacity_ratio": ratios["bf16"], "fp8_capacity_ratio": ratios["fp8"]}


def kv_capacity_report(scores: torch.Tensor, num_kv_heads: int, head_dim: int,
                       selected: Sequence[Sequence[int]], context: int,
                       kv_heads_per_layer: int | None = None, params: SparsityParams | None = None) -> dict[str, Any]:
    """The memory trade-off of a selection: :func:`predict_kv_capacity` for ``selected`` and, for
    comparison, for the global top selection of as many query heads and for per-layer KV budgets of
    1 and 2 (those below HKV that differ from ``kv_heads_per_layer``).

    Returns:
        ``{"context", "window", "sink_tokens", "rows": [{"selection": label, **prediction}, ...]}``,
        the selected heads first.
    """
    params = params or SparsityParams()
    num_heads = scores.shape[1]
    chosen = [sorted(h) for h in selected]
    budget = (f"{kv_heads_per_layer} KV head{'s' if kv_heads_per_layer > 1 else ''} per layer" if kv_heads_per_layer
              else "no per-layer KV budget")
    candidates = [(f"selected ({budget})", chosen)]
    total = sum(map(len, chosen))
    if total:
        candidates.append((f"global top {total} query heads", select_heads(scores, num_kv_heads, count=total)))
    for n in (1, 2):
        if n < num_kv_heads and n != kv_heads_per_layer:
            candidates.append((f"--kv-heads-per-layer {n} (all query heads of the groups)",
                               select_heads(scores, num_kv_heads, None, None, kv_heads_per_layer=n)))
    rows, seen = [], []
    for label, heads in candidates:
        if heads in seen:
            continue
        seen.append(heads)
        rows.append({"selection": label,
                     **predict_kv_capacity(heads, num_heads, num_kv_heads, head_dim, context, params)})
    return {"context": context, "window": params.window, "sink_tokens": params.sink_tokens, "rows": rows}


def format_kv_capacity(report: dict[str, Any]) -> str:
    """The lines ``heads`` prints for :func:`kv_capacity_report`."""
    lines = [f"predicted KV capacity of the compact KV layout at {report['context']} tokens vs FLASH_ATTN with the "
             f"same KV dtype (local KV heads keep {report['sink_tokens']} sinks + {report['window']} tokens; "
             f"one rank):"]
    width = max(len(r["selection"]) for r in report["rows"])
    for r in report["rows"]:
        lines.append(f"  {r['selection']:<{width}}  {r['query_heads']:>5} query heads, {r['full_kv_heads']}/"
                     f"{r['kv_heads']} full KV heads in {r['full_units']} full units -> "
                     f"{r['capacity_ratio']:.2f}x (bf16 KV), {r['fp8_capacity_ratio']:.2f}x (fp8 KV)")
    return "\n".join(lines)


def default_report_context(hf_config) -> int:
    """The context ``heads`` reports capacity at: the model's ``max_position_embeddings``, else 128K."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    return int(getattr(text, "max_position_embeddings", None) or 131072)


@dataclass(frozen=True)
class HeadsResult:
    """What :func:`find_heads` produced: the heads file content and the paths written."""

    heads: HeadsFile
    paths: dict[str, Path]


def find_heads(model: str | os.PathLike | LoadedModel, out_dir: str | os.PathLike, *,
               ratio: float | None = DEFAULT_RATIO, count: int | None = None, by_kv_group: bool = False,
               kv_heads_per_layer: int | None = None, report_context: int | None = None,
               probe_tokens: int = 4096, num_probes: int = 4, needle_tokens: int = DEFAULT_NEEDLE_TOKENS,
               data: str | os.PathLike | None = None, needle_data: str | os.PathLike | None = None,
               seed: int = 0, device: str | None = None) -> HeadsResult:
    """The ``heads`` command: scores every query head on needle-copy probes, selects the retrieval
    heads and writes ``heads.json``, ``head_scores.{json,csv}`` and ``head_heatmap.png`` to ``out_dir``.
    Filler comes from ``data``, needles from ``needle_data`` (default: ``data`` as well).
    Selection: :func:`select_heads` (``kv_heads_per_layer`` with ``ratio=None, count=None`` takes every
    query head of each layer's best N KV groups). ``settings["kv_capacity"]`` holds
    :func:`kv_capacity_report` at ``report_context`` tokens (default :func:`default_report_context`).

    Raises:
        ValueError: bad selection settings, a probe shorter than needed, an unsupported model or an
            unwritable ``out_dir`` (all checked before the model runs).
    """
    out_dir = outputs.check_writable_dir(out_dir)
    lm = resolve_model(model, device)
    select_heads(torch.zeros(lm.num_layers, lm.num_heads), lm.num_kv_heads, ratio, count, by_kv_group,
                 kv_heads_per_layer)                                     # settings checked before the model runs
    context = report_context or default_report_context(lm.hf_config)
    if context < 1:
        raise ValueError(f"--report-context must be positive, got {context}")
    source = TokenSource.create(lm.tokenizer, data, "train")
    needles = None if needle_data is None else TokenSource.create(lm.tokenizer, needle_data, "train")
    probes = make_probes(source, num_probes, probe_tokens, seed, needle_tokens, needle_source=needles)
    scores = retrieval_scores(lm, probes)
    selected = select_heads(scores, lm.num_kv_heads, ratio, count, by_kv_group, kv_heads_per_layer)
    fingerprint = ModelFingerprint.from_hf_config(lm.hf_config)
    capacity = kv_capacity_report(scores, lm.num_kv_heads, fingerprint.head_dim, selected, context,
                                  kv_heads_per_layer)
    settings = {"ratio": ratio, "count": count, "by_kv_group": by_kv_group,
                "kv_heads_per_layer": kv_heads_per_layer, "probe_tokens": probe_tokens,
                "num_probes": num_probes, "needle_tokens": needle_tokens, "data": source.description,
                "needle_data": (needles or source).description,
                "seed": seed, "num_selected": sum(map(len, selected)), "kv_capacity": capacity}
    heads = HeadsFile(fingerprint, selected, scores.tolist(), settings)
    table = score_table(scores, selected, lm.num_kv_heads)
    name = getattr(lm.hf_config, "_name_or_path", "") or lm.hf_config.architectures[0]
    paths = {"heads": heads.save(out_dir / HEADS_FILE),
             "scores_json": outputs.write_json(out_dir / SCORES_JSON, table),
             "scores_csv": outputs.write_csv(out_dir / SCORES_CSV, table),
             "heatmap": plot_heatmap(scores, selected, out_dir / HEATMAP_PNG,
                                     f"{Path(name).name}: {settings['num_selected']} retrieval heads boxed"
                                     + (f", KV budget {kv_heads_per_layer} per layer" if kv_heads_per_layer else "")
                                     + f" ({num_probes} probes x {probe_tokens} tokens)")}
    return HeadsResult(heads, paths)
