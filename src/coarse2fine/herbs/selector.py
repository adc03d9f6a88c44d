"""HERBS background suppression: the selector (METHODS.md §3, "Background suppression").

Per image and stage, tokens are ranked by confidence and the top ``K_i`` are kept:

- ``rank_by="official"``: softmax probability of the class that the image-level mean prediction
  picks (the public code);
- ``rank_by="paper"``: each token's maximum softmax score (the paper's text).

``K_i`` is a count (``>= 1``) or a fraction (``< 1``) of the stage's tokens, resolved at every
call, so fractions follow the input size. Ranking is one ``argsort`` + ``gather`` over the whole
batch (the official code loops over images).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from coarse2fine.errors import ConfigError, ModelError

# Official K_i at Swin-L 384 px: 256, 128, 64, 32 of 2304, 576, 144, 144 tokens (METHODS.md §3).
OFFICIAL_FRACTIONS = (256 / 2304, 128 / 576, 64 / 144, 32 / 144)
RANKINGS = ("official", "paper")


class Selection(NamedTuple):
    """What the selector keeps and drops for one stage."""

    kept: Tensor  # (B, K, F) features of the kept tokens
    kept_logits: Tensor  # (B, K, C)
    dropped_logits: Tensor  # (B, N - K, C)
    kept_index: Tensor  # (B, K) token indices, most confident first
    dropped_index: Tensor  # (B, N - K)


def default_num_selects(num_stages: int) -> list[float]:
    """The official fractions for the last ``num_stages`` stages (repeating the first if more)."""
    fr = list(OFFICIAL_FRACTIONS)
    while len(fr) < num_stages:
        fr.insert(0, fr[0])
    return fr[len(fr) - num_stages :]


def check_num_selects(spec: Sequence[float]) -> list[float]:
    """Validate ``herbs.num_selects``: positive counts (integers) or fractions in (0, 1)."""
    out = []
    for i, v in enumerate(spec):
        v = float(v)
        if v <= 0 or (v >= 1 and not v.is_integer()):
            raise ConfigError(
                f"herbs.num_selects[{i}] = {v!r}: expected a token count (integer >= 1) "
                "or a fraction in (0, 1)"
            )
        out.append(v)
    return out


def resolve_count(spec: float, num_tokens: int, stage: str) -> int:
    """``K_i`` for a stage of ``num_tokens`` tokens; a count above that is a ModelError."""
    k = int(spec) if spec >= 1 else max(1, round(spec * num_tokens))
    if k > num_tokens:
        raise ModelError(
            f"HERBS selector: stage {stage!r} has {num_tokens} tokens but herbs.num_selects asks "
            f"to keep {k}; "
            f"use a count <= {num_tokens} or a fraction"
        )
    return k


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, index[b, j], :]`` for ``x`` of shape ``(B, N, D)`` and ``index`` ``(B, K)``."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def token_scores(logits: Tensor, rank_by: str) -> Tensor:
    """Confidence of each token ``(B, N)`` from its class logits ``(B, N, C)``."""
    probs = logits.float().softmax(-1)
    if rank_by == "paper":
        return probs.amax(-1)
    picked = logits.float().mean(1).argmax(-1)  # class of the image-level mean prediction
    return torch.gather(probs, 2, picked.view(-1, 1, 1).expand(-1, probs.shape[1], 1)).squeeze(-1)


class Selector(nn.Module):
    """Keeps the ``K_i`` most confident tokens of each stage (no parameters)."""

    def __init__(self, num_selects: Sequence[float], stage_names: Sequence[str], rank_by: str = "official"):
        super().__init__()
        if rank_by not in RANKINGS:
            raise ConfigError(f"herbs.rank_by = {rank_by!r}: expected one of {', '.join(RANKINGS)}")
        if len(num_selects) != len(stage_names):
            raise ConfigError(
                f"herbs.num_selects has {len(num_selects)} entries for {len(stage_names)} stages "
                f"{list(stage_names)}"
            )
        self.num_selects = check_num_selects(num_selects)
        self.stage_names = list(stage_names)
        self.rank_by = rank_by

    def counts(self, token_counts: Sequence[int]) -> list[int]:
        return [
            resolve_count(s, n, name) for s, n, name in zip(self.num_selects, token_counts, self.stage_names)
        ]

    def select(self, feats: Tensor, logits: Tensor, k: int) -> Selection:
        with torch.no_grad():
            order = torch.argsort(token_scores(logits, self.rank_by), dim=1, descending=True)
        kept_index, dropped_index = order[:, :k], order[:, k:]
        return Selection(
            kept=gather_tokens(feats, kept_index),
            kept_logits=gather_tokens(logits, kept_index),
            dropped_logits=gather_tokens(logits, dropped_index),
            kept_index=kept_index,
            dropped_index=dropped_index,
        )

    def forward(self, feats: Sequence[Tensor], logits: Sequence[Tensor]) -> list[Selection]:
        """``feats[i]``: ``(B, N_i, F)``; ``logits[i]``: ``(B, N_i, C)`` of the same tokens."""
        ks = self.counts([int(f.shape[1]) for f in feats])  # int(): constants when traced (ONNX export)
        return [self.select(f, lg, k) for f, lg, k in zip(feats, logits, ks)]
