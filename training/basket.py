"""Training of the transaction-log two-tower model (:mod:`towers.basket`).

Examples come from the training log itself: for a customer and one of their invoice
times ``c`` (not the first), the input is the :class:`~towers.sequences.ItemBag` of
everything bought before ``c`` and the targets are the distinct items bought in
``[c, c + window_days)`` — the same task the temporal benchmark asks (what will this
customer buy in the next weeks). ``targets = "new"`` drops items already in the bag from
targets and from the softmax (the new-items protocol); ``"all"`` keeps repurchases as
targets (the buy-again protocol, where the repeat head learns the own-item score).
Full softmax over the catalogue, multi-target cross-entropy, early stopping on
validation NDCG@10 (full ranking, the benchmark's own :func:`training.evaluation.evaluate`).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from ecomrec.config import from_dict
from ecomrec.errors import ConfigError, ModelError
from intake.schema import EVENT_TYPE_IDS
from towers.basket import BasketTower, BasketTowerConfig
from towers.ease import ease_weights
from towers.sequences import Interactions, bag_for_users, item_bag
from training.evaluation import evaluate
from training.retriever import read_retriever_meta, write_retriever_meta
from training.splits import Targets

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BasketTrainConfig:
    """Training of :class:`BasketTower` (saved with the weights)."""

    model: BasketTowerConfig = field(default_factory=BasketTowerConfig)
    dims: tuple[int, ...] = (256, 512)  # model.dim grid, chosen on validation (select_model)
    targets: Literal["new", "all"] = "new"  # new items only, or repurchases too (buy-again)
    window_days: int = 30  # targets: purchases in the window after the cutoff
    cutoffs_per_user: int = 50  # most recent invoice times used as cutoffs per customer
    epochs: int = 30
    patience: int = 2
    batch_size: int = 256
    lr: float = 3e-4
    weight_decay: float = 0.0
    anchor: float = 0.0  # L2 pull of the id embeddings toward their co-purchase init
    # buy-again mixture p = mix * p_repeat + (1 - mix) * p_explore: p_repeat = the customer's
    # own items by recency-weighted frequency (half-life below), p_explore = the tower's
    # softmax over the items not bought yet; mix is chosen on validation among mix_grid after training (targets="all")
    mix_grid: tuple[float, ...] = (0.0, 0.5, 0.9, 0.99, 0.999, 1.0)
    repeat_half_life_days: float = 90.0
    seed: int = 0
    threads: int = 1
    progress: bool = False

    def __post_init__(self) -> None:
        if self.window_days < 1 or self.cutoffs_per_user < 1 or self.epochs < 1:
            raise ConfigError("window_days, cutoffs_per_user and epochs must be >= 1")


@dataclass
class _Examples:
    users: np.ndarray  # (E,) int64
    cutoff: np.ndarray  # (E,) int64
    t_indptr: np.ndarray  # (E + 1,) int64
    t_items: np.ndarray  # (T,) int64


def make_examples(train: Interactions, cfg: BasketTrainConfig) -> _Examples:
    """(customer, cutoff, next-window targets) triples from the training log."""
    pur = EVENT_TYPE_IDS["purchase"]
    w = cfg.window_days * 86400
    users, cuts, indptr, titems = [], [], [0], []
    for u in range(1, train.n_users + 1):
        m = train.seq_event_type(u) == pur
        s, t = train.seq(u)[m].astype(np.int64), train.seq_ts(u)[m]
        if len(s) == 0:
            continue
        inv = np.unique(t)
        for c in inv[1:][-cfg.cutoffs_per_user :]:
            win = (t >= c) & (t < c + w)
            tg = np.unique(s[win])
            if cfg.targets == "new":
                tg = np.setdiff1d(tg, s[t < c], assume_unique=False)
            if len(tg) == 0:
                continue
            users.append(u)
            cuts.append(int(c))
            titems.append(tg)
            indptr.append(indptr[-1] + len(tg))
    if not users:
        raise ModelError("no training examples: every customer has a single invoice")
    return _Examples(
        np.asarray(users, np.int64),
        np.asarray(cuts, np.int64),
        np.asarray(indptr, np.int64),
        np.concatenate(titems).astype(np.int64),
    )


class BasketRetriever:
    """Retriever over :class:`BasketTower` (the two-tower model selected for transaction logs)."""

    name = "two-tower"
    refit_on_train_valid = True
    # chosen on validation NDCG@10 by the benchmark protocol (training.protocol)
    grid: ClassVar[list[dict[str, Any]]] = [
        {"model": {"dim": 256, "input_dropout": 0.0}},
        {"model": {"dim": 512, "input_dropout": 0.0}},
    ]

    def __init__(self, config: BasketTrainConfig = BasketTrainConfig()) -> None:
        self.config = config
        self.model: BasketTower | None = None
        self.history: list[dict[str, float]] = []
        self.train_seconds = 0.0
        self.best_epoch = 0  # chosen on validation (0 = the co-purchase initialisation)
        self._init: tuple[torch.Tensor, torch.Tensor] | None = None
        self.refit_epochs: int | None = None
        self.mix = 0.0  # repeat share of the buy-again mixture (chosen on validation)
        self.refit_mix: float | None = None  # fit without validation: train this many epochs

    # --- training ---------------------------------------------------------------------
    def fit(self, train: Interactions, valid: Targets | None = None) -> None:
        """Train with full softmax; keep the epoch with the best validation NDCG@10.

        Without ``valid`` (the refit on train+validation) it trains ``refit_epochs`` (the
        epoch chosen on validation by the previous fit) or ``config.epochs`` epochs."""
        cfg = self.config
        torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        t0 = time.perf_counter()
        # the bag is made of purchases only (as bag_for_users and the served tower read it)
        bought = train.filter(train.event_type == EVENT_TYPE_IDS["purchase"])
        model = BasketTower(cfg.model, train.n_items)
        if cfg.model.init == "ease":
            model.init_from_ease(ease_weights(bought.to_csr(binary=True), cfg.model.ease_l2))
        self.model = model
        ex = make_examples(bought, cfg)
        log.info("basket tower: %d examples from %d customers", len(ex.users), len(set(ex.users)))
        self._init = (
            (model.in_emb.weight.detach().clone(), model.out_emb.weight.detach().clone())
            if cfg.anchor > 0
            else None
        )
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        best, best_state, bad = -1.0, copy.deepcopy(model.state_dict()), 0
        exclude = cfg.targets == "new"
        if valid is not None:
            v = self._valid(train, valid, exclude)
            self.history.append({"epoch": 0, **v})
            best, best_state = v["ndcg@10"], copy.deepcopy(model.state_dict())
            log.info("basket tower epoch 0 (init) valid ndcg@10 %.4f", best)
        n_epochs = (
            cfg.epochs if valid is not None or self.refit_epochs is None else self.refit_epochs
        )
        for epoch in range(1, n_epochs + 1):
            model.train()
            order = rng.permutation(len(ex.users))
            tot, nb = 0.0, 0
            for start in tqdm(
                range(0, len(order), cfg.batch_size),
                disable=not cfg.progress,
                desc=f"epoch {epoch}",
                leave=False,
            ):
                idx = order[start : start + cfg.batch_size]
                loss = self._loss(bought, ex, idx, exclude)
                opt.zero_grad()
                loss.backward()
                opt.step()
                tot += float(loss.detach())
                nb += 1
            rec: dict[str, float] = {"epoch": epoch, "loss": tot / max(nb, 1)}
            if valid is not None:
                v = self._valid(train, valid, exclude)
                rec.update(v)
                if v["ndcg@10"] > best:
                    best, best_state, bad = v["ndcg@10"], copy.deepcopy(model.state_dict()), 0
                    self.best_epoch = epoch
                else:
                    bad += 1
            self.history.append(rec)
            log.info("basket tower epoch %d %s", epoch, {k: round(x, 4) for k, x in rec.items()})
            if valid is not None and bad >= cfg.patience:
                break
        if valid is not None:
            model.load_state_dict(best_state)
        else:
            self.best_epoch = n_epochs
        model.eval()
        if cfg.targets == "all":
            if valid is not None:
                self.mix = self._choose_mix(train, valid)
            elif self.refit_mix is not None:
                self.mix = self.refit_mix
        model.eval()
        self.train_seconds = time.perf_counter() - t0

    def _loss(
        self, train: Interactions, ex: _Examples, idx: np.ndarray, exclude: bool
    ) -> torch.Tensor:
        assert self.model is not None
        users = ex.users[idx]
        bag = item_bag(
            [train.seq(int(u)) for u in users],
            [train.seq_ts(int(u)) for u in users],
            ex.cutoff[idx],
        )
        t = self.model.bag_tensors(bag)
        logits = self.model.scores(t, repeat=not exclude)  # (B, N+1)
        mask = torch.zeros_like(logits, dtype=torch.bool)
        mask[:, 0] = True
        if exclude:
            mask[t["rows"], t["items"]] = True
        logp = torch.log_softmax(logits.masked_fill(mask, -torch.inf), dim=1)  # (B, N+1)
        lens = ex.t_indptr[idx + 1] - ex.t_indptr[idx]
        rows = torch.from_numpy(np.repeat(np.arange(len(idx)), lens))
        cols = torch.from_numpy(
            np.concatenate([ex.t_items[ex.t_indptr[i] : ex.t_indptr[i + 1]] for i in idx])
        )
        per_target = -logp[rows, cols]  # (T,)
        w = 1.0 / torch.from_numpy(lens.astype(np.float32))[rows]
        loss = (per_target * w).sum() / len(idx)
        if self._init is not None:
            # only the rows this batch touched (their gradients exist anyway)
            it = torch.unique(torch.cat([t["items"], cols]))
            d_in = self.model.in_emb.weight[it] - self._init[0][it]
            d_out = self.model.out_emb.weight[it] - self._init[1][it]
            loss = loss + self.config.anchor * ((d_in**2).sum() + (d_out**2).sum()) / len(idx)
        return loss

    def _choose_mix(self, train: Interactions, valid: Targets) -> float:
        """The repeat share of the mixture with the best validation NDCG@10."""
        best = (-1.0, 0.0)
        for m in self.config.mix_grid:
            self.mix = m
            v = self._valid(train, valid, exclude=False)["ndcg@10"]
            self.history.append({"mix": m, "ndcg@10": v})
            log.info("basket tower buy-again mix %.2f valid ndcg@10 %.4f", m, v)
            if v > best[0]:
                best = (v, m)
        return best[1]

    def _valid(self, train: Interactions, valid: Targets, exclude: bool) -> dict[str, float]:
        v = evaluate(self.score, valid, train, ks=(10,), exclude_seen=exclude)
        return {"ndcg@10": v["ndcg@10"], "recall@10": v["recall@10"]}

    # --- scoring ----------------------------------------------------------------------
    @torch.no_grad()
    def score(self, users: np.ndarray, history: Interactions) -> np.ndarray:
        """(B, n_items + 1) scores as of just after the latest event of ``history``."""
        if self.model is None:
            raise ModelError("two-tower (basket) is not fitted: call fit() or load() first")
        self.model.eval()
        bag = bag_for_users(history, np.asarray(users, np.int64))
        buy_again = self.config.targets == "all"
        s = self.model.scores(self.model.bag_tensors(bag), repeat=buy_again)  # (B, N+1)
        if buy_again and self.mix > 0:
            # own items: mix * p_repeat (their personal-top order); new items: (1 - mix) *
            # the tower's softmax over the items the customer has not bought
            rows = torch.from_numpy(bag.rows())
            own = (rows, torch.from_numpy(bag.items))
            s[:, 0] = -torch.inf
            p_exp = torch.softmax(s.index_put(own, torch.tensor(-torch.inf)), dim=1)  # (B, N+1)
            p_all = torch.softmax(s, dim=1)  # (B, N+1) with the repeat head on own items
            rf = torch.from_numpy(bag.recency_frequency(self.config.repeat_half_life_days))
            # ties among own items (one-off purchases of one invoice): the item's popularity
            # in the history log, then the tower (as personal top breaks them)
            pop = history.item_counts().astype(np.float32)
            pop_t = torch.from_numpy(pop / max(float(pop.max(initial=0.0)), 1.0))
            rf = rf.float() + 1e-3 * pop_t[own[1]] + 1e-6 * p_all[own]
            p_rep = torch.zeros_like(p_exp).index_put(own, rf, accumulate=True)
            p_rep = p_rep / p_rep.sum(1, keepdim=True).clamp(min=1e-12)
            has = (p_rep.sum(1, keepdim=True) > 0).float()  # no own items: explore only
            m = self.mix * has
            # mix = 1: the own items in personal-top order, then new items by the tower
            s = torch.log(m * p_rep + (1 - m).clamp(min=1e-9) * p_exp + 1e-30)
        out = np.zeros((len(users), history.n_items + 1), np.float32)
        k = min(out.shape[1], s.shape[1])
        out[:, :k] = s[:, :k].float().numpy()
        return out

    # --- persistence ------------------------------------------------------------------
    def save(self, path: Path) -> None:
        """``basket.pt`` (weights) + ``retriever.json`` (config, epochs)."""
        if self.model is None:
            raise ModelError("two-tower (basket) is not fitted")
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        torch.save(self.model.state_dict(), p / "basket.pt")
        write_retriever_meta(
            p,
            "basket-tower",
            self.config,
            n_items=self.model.n_items,
            mix=self.mix,
            history=self.history,
        )

    @classmethod
    def load(cls, path: Path) -> BasketRetriever:
        """Open a directory written by :meth:`save`."""
        p = Path(path)
        meta = read_retriever_meta(p, "basket-tower")
        r = cls(from_dict(BasketTrainConfig, meta["config"]))
        r.model = BasketTower(r.config.model, int(meta["n_items"]))
        r.model.load_state_dict(torch.load(p / "basket.pt", weights_only=True))
        r.model.eval()
        r.history = meta.get("history", [])
        r.mix = float(meta.get("mix", 0.0))
        return r
