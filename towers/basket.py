"""The transaction-log two-tower model: a customer's basket of own items -> user vector.

On a shop's purchase log (invoices of many items, long histories, targets = what the
customer buys in the next weeks) the order inside a history says little and the
item-item co-purchase signal says most (EASE's strength). This tower keeps the two-tower
shape (user vector . item vector, servable from a vector index) with a user tower built
for that signal:

```
ItemBag (towers.sequences.item_bag: distinct own items, invoices per item, age)
   weight = exp(w_age[age bucket] + w_count[count bucket])            (learned, starts at 1)
   u0 = sum_i weight_i * E_in[item_i]                                   (B, D)
   u  = u0 + MLP(u0)                                  (residual; last layer starts at zero)
explore score(u, j) = scale * (u . E_out[j] + b_j)    == [u, 1] . [E_out[j], b_j] (ANN-servable)
repeat score(u, j)  = r_age[age bucket of j] + r_count[count bucket of j]   (own items only)
```

``E_in`` / ``E_out`` start from a rank-D factorisation of EASE's item-item weights fitted on
the training log (co-purchase initialisation), so epoch 0 already scores like a low-rank
EASE; training on "next window's purchases" then moves it to the real task. The repeat
head is the buy-again half of a repeat/explore mixture: it scores the customer's own
items by how often and how recently they were bought (the new-items protocol masks them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from ecomrec.errors import ConfigError
from towers.sequences import N_AGE_BUCKETS, N_COUNT_BUCKETS, ItemBag


@dataclass(frozen=True)
class BasketTowerConfig:
    """Shape of the transaction-log two-tower model."""

    dim: int = 256
    init: Literal["ease", "random"] = "ease"  # co-purchase (EASE) initialisation of E_in/E_out
    ease_l2: float = 200.0  # lambda of the EASE fit used for the initialisation
    mlp: bool = True  # residual MLP on the pooled basket vector
    learn_weights: bool = True  # learned age/count weights of own items (else all 1)
    repeat_head: bool = True  # own-item (buy-again) score
    logit_scale: float = 10.0  # initial softmax scale of the explore score
    input_dropout: float = 0.0  # training: drop this share of a basket's own items

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ConfigError("basket.dim must be >= 1")
        if self.ease_l2 <= 0:
            raise ConfigError("basket.ease_l2 must be > 0")
        if not 0.0 <= self.input_dropout < 1.0:
            raise ConfigError("basket.input_dropout must be in [0, 1)")


class BasketTower(nn.Module):
    """User tower over an :class:`ItemBag`, item tower = output embeddings + bias."""

    def __init__(self, cfg: BasketTowerConfig, n_items: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_items = n_items
        d = cfg.dim
        self.in_emb = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.out_emb = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.out_bias = nn.Parameter(torch.zeros(n_items + 1))
        nn.init.normal_(self.in_emb.weight, std=0.02)
        nn.init.normal_(self.out_emb.weight, std=0.02)
        self.w_age = nn.Embedding(N_AGE_BUCKETS, 1)
        self.w_count = nn.Embedding(N_COUNT_BUCKETS, 1)
        self.r_age = nn.Embedding(N_AGE_BUCKETS, 1)
        self.r_count = nn.Embedding(N_COUNT_BUCKETS, 1)
        for e in (self.w_age, self.w_count, self.r_age, self.r_count):
            nn.init.zeros_(e.weight)
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d)) if cfg.mlp else None
        if self.mlp is not None:
            last = self.mlp[2]
            assert isinstance(last, nn.Linear)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        self.log_scale = nn.Parameter(torch.tensor(float(np.log(cfg.logit_scale))))

    @torch.no_grad()
    def init_from_ease(self, b: np.ndarray, seed: int = 0) -> None:
        """E_in = U sqrt(S), E_out = V sqrt(S) from a rank-``dim`` SVD of EASE weights ``b``."""
        torch.manual_seed(seed)
        bt = torch.from_numpy(b).float()  # (N+1, N+1)
        q = min(self.cfg.dim, bt.shape[0] - 1)
        u, s, v = torch.svd_lowrank(bt, q=q, niter=6)  # (N+1, q), (q,), (N+1, q)
        root = s.clamp(min=0).sqrt()
        self.in_emb.weight.zero_()
        self.out_emb.weight.zero_()
        self.in_emb.weight[:, :q] = u * root
        self.out_emb.weight[:, :q] = v * root
        # scores of the init are EASE scores (x . B); a softmax scale that spreads them
        self.log_scale.fill_(float(np.log(self.cfg.logit_scale)))

    def bag_tensors(self, bag: ItemBag) -> dict[str, torch.Tensor]:
        """Tensors of one :class:`ItemBag` (the only input of :meth:`user_vectors`)."""
        return {
            "rows": torch.from_numpy(bag.rows()),
            "items": torch.from_numpy(bag.items),
            "age": torch.from_numpy(bag.age_bucket()),
            "count": torch.from_numpy(bag.count_bucket()),
            "batch": torch.tensor(len(bag)),
        }

    def user_vectors(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, D) user vectors (unnormalised: EASE-like scores grow with evidence)."""
        b = int(t["batch"])
        e = self.in_emb(t["items"])  # (nnz, D)
        if self.cfg.learn_weights:
            w = torch.exp(self.w_age(t["age"]) + self.w_count(t["count"]))  # (nnz, 1)
            e = e * w
        if self.training and self.cfg.input_dropout > 0:
            keep = torch.rand(e.shape[0], 1) >= self.cfg.input_dropout  # (nnz, 1)
            e = e * keep / (1.0 - self.cfg.input_dropout)
        u = e.new_zeros(b, e.shape[1]).index_add(0, t["rows"], e)  # (B, D)
        if self.mlp is not None:
            u = u + self.mlp(u)
        return u

    def item_vectors(self) -> torch.Tensor:
        """(N+1, D) output item vectors (row 0 padding)."""
        return self.out_emb.weight

    def scores(self, t: dict[str, torch.Tensor], repeat: bool) -> torch.Tensor:
        """(B, N+1) logits: explore score for every item, + repeat score on own items."""
        u = self.user_vectors(t)  # (B, D)
        s = (u @ self.out_emb.weight.T + self.out_bias) * self.log_scale.exp()  # (B, N+1)
        if repeat and self.cfg.repeat_head:
            r = (self.r_age(t["age"]) + self.r_count(t["count"])).squeeze(1)  # (nnz,)
            s = s.index_put((t["rows"], t["items"]), r, accumulate=True)
        return s
