"""Stage 1, domain pretraining: self-supervised next-item or masked-item prediction.

The loss is computed on real (non-padding) positions only: hidden states are gathered
at those positions before any logits exist, so a batch of mostly short sequences
costs what its events cost, not ``B x max_len`` rows of a 12k-way softmax.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from ecomrec.errors import ConfigError
from towers.model import TwoTower


@dataclass(frozen=True)
class OptimConfig:
    """Optimisation settings shared by both stages."""

    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.02
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    patience: int = 5  # epochs without a better validation NDCG@10 before stopping
    temperature: float = 0.07
    softmax: Literal["full", "sampled"] = "full"
    n_negatives: int = 1024  # sampled softmax: popularity-sampled negatives per batch
    logq: bool = True  # subtract log sampling probability (popularity) from sampled logits

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("epochs >= 0, batch_size >= 1 and lr > 0 are required")
        if self.temperature <= 0:
            raise ConfigError("temperature must be > 0")


@dataclass(frozen=True)
class PretrainConfig(OptimConfig):
    """Stage 1: ``next`` (causal towers) or ``masked`` (bidirectional towers) item prediction."""

    enabled: bool = True
    objective: Literal["next", "masked"] = "next"
    mask_prob: float = 0.2
    mask_last_prob: float = 0.2  # share of sequences whose newest item is masked (as at inference)


def softmax_loss(
    h: torch.Tensor,  # (M, D) L2-normalised query vectors at real positions
    y: torch.Tensor,  # (M,) target item ids >= 1
    vn: torch.Tensor,  # (N+1, D) L2-normalised item vectors
    cfg: OptimConfig,
    log_pop: torch.Tensor | None,  # (N+1,) log popularity (sampling distribution), -inf at 0
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """Cross-entropy of the targets: full softmax over the catalogue, or in-batch +
    popularity-sampled negatives with logQ correction (``cfg.softmax == "sampled"``)."""
    if cfg.softmax == "full":
        logits = h @ vn.T / cfg.temperature  # (M, N+1)
        logits[:, 0] = -torch.inf
        return nn.functional.cross_entropy(logits, y)
    assert log_pop is not None
    probs = log_pop.exp()
    neg = torch.multinomial(probs, cfg.n_negatives, replacement=True, generator=gen)  # (S,)
    cand, inv = torch.unique(torch.cat([y, neg]), return_inverse=True)  # (C,)
    label = inv[: len(y)]  # (M,)
    logits = h @ vn[cand].T / cfg.temperature  # (M, C)
    if cfg.logq:
        logits = logits - log_pop[cand].unsqueeze(0)
    return nn.functional.cross_entropy(logits, label)


def next_item_loss(
    model: TwoTower,
    batch: dict[str, torch.Tensor],
    cfg: OptimConfig,
    log_pop: torch.Tensor | None = None,
    positions: Literal["all", "last"] = "all",
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """Causal objective: every real position predicts the following item."""
    items, lengths = batch["items"], batch["lengths"]
    table = model.item_table()  # (N+1, D)
    h = model.sequence_hidden(table, items, batch["event_type"], batch["gap"], lengths)  # (B,T,D)
    tgt = items[:, 1:]  # (B, T-1)
    real = tgt > 0  # (B, T-1)
    if positions == "last":
        t_idx = torch.arange(tgt.shape[1], device=items.device).unsqueeze(0)
        real = real & (t_idx == (lengths - 2).unsqueeze(1))
    hq = model.normalise(h[:, :-1][real])  # (M, D)
    y = tgt[real]  # (M,)
    return softmax_loss(hq, y, model.item_vectors(table), cfg, log_pop, gen)


def masked_item_loss(
    model: TwoTower,
    batch: dict[str, torch.Tensor],
    cfg: PretrainConfig,
    gen: torch.Generator,
    log_pop: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bidirectional objective (BERT4Rec-style): predict randomly masked items."""
    ut = model.user_tower
    if ut.mask_vec is None:
        raise ConfigError("objective 'masked' needs user.attention = 'bidirectional'")
    items, lengths = batch["items"], batch["lengths"]
    table = model.item_table()  # (N+1, D)
    real = items > 0  # (B, T)
    r = torch.rand(items.shape, generator=gen, device=items.device)
    masked = real & (r < cfg.mask_prob)
    last = torch.arange(items.shape[1], device=items.device).unsqueeze(0) == (
        lengths - 1
    ).unsqueeze(1)
    pick_last = torch.rand(lengths.shape, generator=gen, device=items.device) < cfg.mask_last_prob
    masked = masked | (last & pick_last.unsqueeze(1))
    # at least one masked position per sequence
    none = ~masked.any(1)
    masked = masked | (last & none.unsqueeze(1))
    vecs = table[items]  # (B, T, D)
    vecs = torch.where(masked.unsqueeze(-1), ut.mask_vec.to(vecs.dtype), vecs)
    h = ut.hidden_states(vecs, batch["event_type"], batch["gap"], lengths)  # (B, T, D)
    hq = model.normalise(h[masked])  # (M, D)
    y = items[masked]  # (M,)
    return softmax_loss(hq, y, model.item_vectors(table), cfg, log_pop, gen)


def log_popularity(counts: np.ndarray, device: torch.device) -> torch.Tensor:
    """(N+1,) log of the smoothed popularity distribution; padding gets -inf."""
    c = counts.astype(np.float64) + 1.0
    c[0] = 0.0
    p = c / c.sum()
    with np.errstate(divide="ignore"):
        lp = np.log(p)
    return torch.as_tensor(lp, dtype=torch.float32, device=device)
