"""HERBS graph combiner (METHODS.md §3, "Combiner"): kept tokens of all stages -> merged logits Y_m.

tokens ``(B, S, F)`` -> pool to ``J`` nodes -> adjacency ``A = A_learned + alpha tanh(q_i - k_j)``
(q, k: 1x1 projections averaged over channels) -> one graph convolution ``conv1x1(H) A`` with BN
-> pool to one node -> dropout -> linear to C.

Node pooling (``combiner_pool``):

- ``linear`` (official): a Linear over the token axis. It needs the same number of kept tokens
  ``S`` at every call, so the model must see the input size it was built for (or ``K_i`` given
  as counts); another ``S`` raises a ModelError.
- ``attention``: ``J`` learned queries attend over the tokens; works for any ``S``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from coarse2fine.errors import ConfigError, ModelError

POOLS = ("linear", "attention")


class AttentionPool(nn.Module):
    """``J`` learned queries, single-head scaled dot-product attention over the tokens."""

    def __init__(self, dim: int, num_nodes: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_nodes, dim) / math.sqrt(dim))
        self.key = nn.Linear(dim, dim)

    def forward(self, tokens: Tensor) -> Tensor:  # (B, S, F) -> (B, J, F)
        q = self.queries.to(tokens.dtype).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        return F.scaled_dot_product_attention(q, self.key(tokens), tokens)


class GraphCombiner(nn.Module):
    """Merges the kept tokens of all stages into one prediction (official ``GCNCombiner``)."""

    def __init__(
        self,
        dim: int,
        num_classes: int,
        num_nodes: int,
        *,
        pool: str = "linear",
        num_tokens: int | None = None,
        dropout: float = 0.1,
    ):
        super().__init__()
        if pool not in POOLS:
            raise ConfigError(f"herbs.combiner_pool = {pool!r}: expected one of {', '.join(POOLS)}")
        if num_nodes < 1:
            raise ConfigError(f"herbs.num_graph_nodes = {num_nodes}: expected >= 1")
        self.pool_mode = pool
        self.num_tokens = num_tokens
        if pool == "linear":
            if not num_tokens:
                raise ModelError("the linear combiner pooling needs the number of kept tokens")
            self.pool0 = nn.Linear(num_tokens, num_nodes)
        else:
            self.pool0 = AttentionPool(dim, num_nodes)
        self.adj = nn.Parameter(torch.eye(num_nodes) / 100 + 1 / 100)  # official initialisation
        qk = max(1, dim // 4)
        self.conv_q = nn.Conv1d(dim, qk, 1)
        self.conv_k = nn.Conv1d(dim, qk, 1)
        self.alpha = nn.Parameter(torch.zeros(1))
        self.conv = nn.Conv1d(dim, dim, 1)
        self.bn = nn.BatchNorm1d(dim)
        self.pool1 = nn.Linear(num_nodes, 1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        """``tokens``: ``(B, S, F)`` kept tokens of all stages -> merged logits ``(B, C)``."""
        if self.pool_mode == "linear":
            if tokens.shape[1] != self.num_tokens:
                raise ModelError(
                    f"HERBS combiner (combiner_pool='linear') was built for {self.num_tokens} kept tokens "
                    f"but got {tokens.shape[1]} (another input size?); use "
                    "herbs.combiner_pool=attention, or give herbs.num_selects as counts"
                )
            h = self.pool0(tokens.transpose(1, 2))  # (B, F, J)
        else:
            h = self.pool0(tokens).transpose(1, 2)  # (B, F, J)
        q = self.conv_q(h).mean(1)  # (B, J)
        k = self.conv_k(h).mean(1)
        adj = self.adj + self.alpha * torch.tanh(q.unsqueeze(-1) - k.unsqueeze(1))  # (B, J, J)
        h = self.bn(torch.matmul(self.conv(h), adj.to(h.dtype)))
        h = self.dropout(self.pool1(h).flatten(1))  # (B, F)
        return self.classifier(h)
