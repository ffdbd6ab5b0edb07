"""The stage-1 training recipe (paper notes §3.5): hyper-parameters and the learning-rate schedule.

Torch-free, so the CLI can show the defaults without importing torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

INITS = ("lowfreq", "random")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (a resumed run must use the same values)."""

    steps: int = 600
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seq_len: int = 8192
    queries_per_seq: int = 64
    index_dim: int = 16
    init: str = "lowfreq"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.warmup_steps < 0 or self.queries_per_seq < 1 or self.index_dim < 1:
            raise ValueError(f"need steps >= 1, warmup_steps >= 0, queries_per_seq >= 1, index_dim >= 1; got {self}")
        if self.seq_len < 2:
            raise ValueError(f"--seq-len must be at least 2, got {self.seq_len}")
        if self.init not in INITS:
            raise ValueError(f"--init must be one of {INITS}, got {self.init!r}")

    def lr_at(self, step: int) -> float:
        """Learning rate of optimiser step ``step`` (0-based): linear warm-up, then cosine to 0."""
        warmup = min(self.warmup_steps, self.steps)
        if step < warmup:
            return self.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, self.steps - warmup)
        return self.lr * 0.5 * (1 + math.cos(math.pi * progress))
