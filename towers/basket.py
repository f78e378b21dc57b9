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

import itertools
from dataclasses import dataclass
from pathlib import Path
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


# --- serving: the basket tower behind the TwoTower interface -------------------------
BASKET_FORMAT = "ecomrec-basket-tower/1"
SERVED_MAX_LEN = 1000  # newest history events the served tower reads (a shop's long B2B histories)


def _bucket_seconds() -> np.ndarray:
    """(N_GAP_BUCKETS,) a representative gap in seconds of each time-gap bucket (0 = padding,
    1 = same instant, k >= 2: the geometric middle of its edges, the last one 1.5 years)."""
    from towers.sequences import _GAP_EDGES

    e = _GAP_EDGES.astype(np.float64)
    mids = [float(np.sqrt(a * b)) for a, b in itertools.pairwise(e)]
    return np.asarray([0.0, 0.0, *mids, 1.5 * 365 * 86400], np.float64)


def bag_from_batch(items: np.ndarray, event_type: np.ndarray, gap: np.ndarray) -> ItemBag:
    """The :class:`ItemBag` of a padded :class:`~towers.sequences.SequenceBatch` as of just
    after each row's newest event (the serving "now", as the buy-again mode's).

    Invoices are runs of events at the same instant (gap bucket 1); counts are exact,
    ages are the sum of each later event's gap-bucket middle (:func:`_bucket_seconds`), so
    they are approximate within a bucket: the served tower is evaluated in this form
    (``training.protocol``), so the numbers it reports are the served ones. A row without
    a purchase reads its views and carts instead (a browsing customer's products stand in
    for a basket; the tower has nothing else to go on)."""
    from intake.schema import EVENT_TYPE_IDS

    pur, ret = EVENT_TYPE_IDS["purchase"], EVENT_TYPE_IDS["return"]
    mid = _bucket_seconds()
    items = np.asarray(items, np.int64)
    b, t = items.shape
    real = items > 0  # (B, T)
    g = mid[np.clip(gap, 0, len(mid) - 1)] * real  # (B, T) seconds since the previous event
    # age of event i = the later events' gaps (+1 s: "now" is just after the newest event)
    after = np.flip(np.cumsum(np.flip(g, 1), 1), 1) - g + 1.0  # (B, T)
    invoice = np.cumsum(gap > 1, axis=1)  # (B, T) invoice number of every event
    bought = real & (event_type == pur)
    # nothing bought yet: the viewed / carted products stand in
    m = np.where(bought.any(1, keepdims=True), bought, real & (event_type != ret))  # (B, T)
    rows, cols = np.nonzero(m)
    s, inv, age = items[rows, cols], invoice[rows, cols], after[rows, cols]
    n1 = int(items.max(initial=0)) + 1
    key = rows * n1 + s  # (row, item)
    # distinct (row, item, invoice), then per (row, item): invoices and the newest one's age
    pair, first = np.unique(key * (t + 2) + inv, return_index=True)
    k, start, cnt = np.unique(pair // (t + 2), return_index=True, return_counts=True)
    newest = first[start + cnt - 1]
    row_of = k // n1
    return ItemBag(
        np.searchsorted(row_of, np.arange(b + 1)).astype(np.int64),
        (k % n1).astype(np.int64),
        cnt.astype(np.int64),
        np.round(age[newest]).astype(np.int64),
    )


class BasketServed(nn.Module):
    """A trained :class:`BasketTower` with the interface of :class:`towers.model.TwoTower`
    that indexing, serving and segments use (``item_table``, ``item_vectors``, ``encode``,
    ``dim``, ``n_items``, ``item_cfg``, ``item_tower.known``), so a basket run is served
    like every other family (``towers.inference.load_run``).

    The explore score ``scale * (u . E_out[j] + b_j)`` is a dot product of ``[u, 1]`` and
    ``y_j = [E_out[j], b_j]`` (D+1). The index ranks by cosine, so both sides are lifted
    (a MIPS-to-cosine transform) into 2(D+1) dimensions: items
    ``[y / M, sqrt(1 - |y|^2 / M^2) * y / |y|]`` (unit norm, ``M`` the largest item norm),
    users ``[w / |w|, 0]`` (``w = [u, 1]``): the cosine order of every user equals the
    tower's score order (:func:`towers.factor.mips_lift`: the usual one-dimensional lift
    crowds the items near one pole, HNSW recall@10 0.60 on Online Retail; this one 0.995).
    Items never bought in training (``known`` 0) get zero vectors: no trained vector.
    """

    def __init__(self, tower: BasketTower, known: np.ndarray, max_len: int = SERVED_MAX_LEN):
        from towers.factor import _NoContent
        from towers.item_tower import ItemTowerConfig

        super().__init__()
        self.tower = tower.eval()
        self.n_items = tower.n_items
        self.max_len = max_len
        k = torch.as_tensor(np.asarray(known, np.float32))  # (N+1,)
        k[0] = 0.0
        d = 2 * (tower.cfg.dim + 1)
        self.item_tower = _NoContent(k, d)
        self.item_cfg = ItemTowerConfig(
            dim=d, use_text=False, use_brand=False, use_category=False, use_price=False
        )

    @property
    def dim(self) -> int:
        """Vector width in the index: 2 (D + 1) (the bias, then the lift)."""
        return 2 * (int(self.tower.cfg.dim) + 1)

    @torch.no_grad()
    def item_table(self) -> torch.Tensor:
        """(N+1, 2(D+1)) lifted unit item vectors; row 0 and unknown items are zeros."""
        from towers.factor import mips_lift

        y = torch.cat([self.tower.out_emb.weight, self.tower.out_bias.unsqueeze(1)], 1)
        return mips_lift(y * self.item_tower.known.unsqueeze(1))  # (N+1, 2(D+1))

    def item_vectors(self, table: torch.Tensor | None = None) -> torch.Tensor:
        """(N+1, 2(D+1)) unit item vectors (the table is already unit norm)."""
        return self.item_table() if table is None else table

    @torch.no_grad()
    def encode(
        self,
        items: torch.Tensor,  # (B, T) int64, 0 = padding
        event_type: torch.Tensor,  # (B, T)
        gap: torch.Tensor,  # (B, T) time-gap buckets
        lengths: torch.Tensor,  # (B,)
        table: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, 2(D+1)) unit user vectors ``[w / |w|, 0]``, ``w = [u, 1]`` (a row with
        views or carts only reads those, :func:`bag_from_batch`; a row without any event
        is zeroed by the encoders: cold start)."""
        bag = bag_from_batch(items.cpu().numpy(), event_type.cpu().numpy(), gap.cpu().numpy())
        u = self.tower.user_vectors(self.tower.bag_tensors(bag))  # (B, D)
        w = torch.cat([u, torch.ones_like(u[:, :1])], 1)  # (B, D+1)
        w = nn.functional.normalize(w, dim=-1, eps=1e-12)
        return torch.cat([w, torch.zeros_like(w)], 1)  # (B, 2(D+1))

    @staticmethod
    def normalise(x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x, dim=-1, eps=1e-12)


def save_basket_served(
    path: str | Path, model: BasketServed, item_ids: list[str], meta: dict
) -> None:
    """Atomically write a served basket tower (weights, config, known mask, external ids)."""
    from dataclasses import asdict

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "format": BASKET_FORMAT,
        "cfg": asdict(model.tower.cfg),
        "n_items": model.n_items,
        "state": model.tower.state_dict(),
        "known": model.item_tower.known.cpu(),
        "max_len": model.max_len,
        "item_ids": list(item_ids),
        "meta": meta,
    }
    tmp = p.with_suffix(p.suffix + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(p)


def load_basket_served(path: str | Path) -> tuple[BasketServed, list[str], dict]:
    """(model, external item ids, meta) of a file written by :func:`save_basket_served`."""
    from ecomrec.config import from_dict
    from ecomrec.errors import ModelError, NotFoundError

    p = Path(path)
    if not p.exists():
        raise NotFoundError(f"no basket tower at {p}")
    blob = torch.load(p, map_location="cpu", weights_only=False)
    if not isinstance(blob, dict) or blob.get("format") != BASKET_FORMAT:
        raise ModelError(f"{p} is not an ecomrec basket tower")
    tower = BasketTower(from_dict(BasketTowerConfig, blob["cfg"]), int(blob["n_items"]))
    tower.load_state_dict(blob["state"])
    model = BasketServed(tower, blob["known"].numpy(), int(blob["max_len"]))
    model.eval()
    return model, list(blob["item_ids"]), dict(blob["meta"])
