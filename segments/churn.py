"""Churn and high-value prediction: BG/NBD, gradient-boosted trees, and heads on the user tower.

One temporal protocol for every model (:func:`temporal_split`): the *test* cutoff is
the latest day whose ``horizon_days`` label window fits in the data; the *train*
cutoff is one horizon earlier, so the training labels end exactly at the test cutoff
and nothing of the test window is seen in training. Features at each cutoff read only
the events before it.

Models (each gives ``churn`` and ``high_value`` probabilities and a spend estimate):

* :class:`BGNBDModel`: BG/NBD fitted on the purchase summary before the cutoff; churn
  = P(no purchase in the horizon); spend = E[purchases] x Gamma-Gamma value; the
  high-value probability is a logistic calibration of log expected spend fitted on
  the training cutoff (BG/NBD itself has no notion of "top 20%").
* :class:`GBDTModel`: sklearn HistGradientBoosting on the RFM features.
* :class:`TowerHeads` ("ours"): a two-output MLP head over the user-tower sequence
  embedding concatenated with the standardised RFM features. ``mode="frozen"`` trains
  the head on precomputed embeddings; ``"lora"`` / ``"full"`` back-propagate into the
  user tower (LoRA adapters on the BERT attention via ``peft``, or every weight).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import polars as pl

from ecomrec.errors import DataError, ModelError
from intake.dataset import Dataset
from segments.bgnbd import BGNBD, GammaGamma, transaction_summary
from segments.labels import LabelConfig, cutoff_for, make_labels
from segments.rfm import FEATURE_COLUMNS, RFMScorer, customer_features

log = logging.getLogger(__name__)

DAY = 86400
TASKS: tuple[str, str] = ("churn", "high_value")
Mode = Literal["frozen", "lora", "full"]


@dataclass(frozen=True)
class ChurnConfig:
    """Everything that defines a churn / high-value run (saved with its outputs)."""

    horizon_days: int = 90
    high_value_quantile: float = 0.8
    seed: int = 0
    gbdt_max_iter: int = 300
    gbdt_learning_rate: float = 0.05
    gbdt_max_leaf_nodes: int = 15
    gbdt_min_samples_leaf: int = 40
    head_hidden: int = 64
    head_dropout: float = 0.2
    epochs: int = 60
    batch_size: int = 256
    lr: float = 3e-3
    tower_lr: float = 3e-4
    weight_decay: float = 1e-3
    valid_fraction: float = 0.2
    patience: int = 8
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ("query", "value")
    # BLAS / OpenMP / torch threads for these small fits (thousands of customers): on a
    # busy machine more threads only spin (k-means 13x, GBDT 12x slower with 2 than 1)
    threads: int = 1


@contextmanager
def limited_threads(n: int = 1) -> Iterator[None]:
    """Run the block with at most ``n`` BLAS/OpenMP threads (threadpoolctl) and ``n`` torch
    intra-op threads; the previous settings come back afterwards."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        with threadpool_limits(limits=max(1, n)):
            yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- data
@dataclass
class CutoffData:
    """Customers at one cutoff: features, labels (when the window is known) and BG/NBD summary."""

    cutoff_ts: int
    table: pl.DataFrame  # user_id, FEATURE_COLUMNS, r/f/m scores, rfm_segment[, labels]
    summary: pl.DataFrame  # BG/NBD summary (weeks), same user order as ``table``

    @property
    def users(self) -> np.ndarray:
        return self.table["user_id"].to_numpy().astype(np.int64)

    def features(self) -> np.ndarray:
        """(n, F) float64 RFM feature matrix (FEATURE_COLUMNS + r/f/m scores)."""
        cols = [*FEATURE_COLUMNS, "r_score", "f_score", "m_score"]
        return self.table.select(cols).to_numpy().astype(np.float64)

    def label(self, task: str) -> np.ndarray:
        if task not in self.table.columns:
            raise DataError(f"no {task!r} labels at this cutoff (window not observed)")
        return self.table[task].to_numpy().astype(np.float64)


def prepare(
    ds: Dataset,
    cutoff_ts: int,
    cfg: ChurnConfig,
    *,
    scorer: RFMScorer | None = None,
    with_labels: bool = True,
) -> tuple[CutoffData, RFMScorer]:
    """Features (and labels, if asked) of every customer who purchased before the cutoff."""
    feats = customer_features(ds.events, cutoff_ts, ds.items)
    sc = scorer or RFMScorer.fit(feats)
    table = sc.score(feats)
    if with_labels:
        lab = make_labels(
            ds.events,
            table["user_id"].to_numpy(),
            cutoff_ts,
            LabelConfig(cfg.horizon_days, cfg.high_value_quantile),
        )
        table = table.join(lab, on="user_id", how="left")
    summ = transaction_summary(ds.events, cutoff_ts, time_unit_days=7.0)
    summ = table.select("user_id").join(summ, on="user_id", how="left")
    return CutoffData(int(cutoff_ts), table, summ), sc


def temporal_split(ds: Dataset, cfg: ChurnConfig) -> tuple[CutoffData, CutoffData]:
    """(train, test): test cutoff = latest that fits the horizon; train one horizon earlier.

    Both use their own RFM quintiles (scores are relative to the population at the time).
    """
    test_cut = cutoff_for(ds.events, cfg.horizon_days)
    train_cut = cutoff_for(ds.events, cfg.horizon_days, offset_windows=1)
    train, _ = prepare(ds, train_cut, cfg)
    test, _ = prepare(ds, test_cut, cfg)
    log.info(
        "churn split: train cutoff %d (%d customers), test cutoff %d (%d customers)",
        train_cut,
        train.table.height,
        test_cut,
        test.table.height,
    )
    return train, test


# --------------------------------------------------------------------------- metrics
def lift_at(y: np.ndarray, p: np.ndarray, frac: float = 0.1) -> float:
    """Positive rate among the top ``frac`` by score over the overall positive rate."""
    n = len(y)
    k = max(1, math.ceil(frac * n))
    base = float(np.mean(y))
    if base == 0.0:
        return float("nan")
    top = np.argsort(-p, kind="stable")[:k]
    return float(np.mean(y[top]) / base)


def binary_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """ROC-AUC, PR-AUC (average precision), Brier score and lift in the top decile."""
    from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

    y = np.asarray(y, dtype=np.float64)
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    return {
        "roc_auc": float(roc_auc_score(y, p)),
        "pr_auc": float(average_precision_score(y, p)),
        "brier": float(brier_score_loss(y, p)),
        "lift@10": lift_at(y, p, 0.1),
        "positive_rate": float(y.mean()),
    }


def calibration_curve(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> dict[str, list[float]]:
    """Mean predicted vs observed rate in quantile bins of the prediction (scikit-learn's
    ``calibration_curve`` with ``strategy="quantile"``; empty bins are dropped)."""
    from sklearn.calibration import calibration_curve as sk_calibration_curve

    observed, predicted = sk_calibration_curve(
        np.asarray(y, dtype=np.int64),
        np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0),
        n_bins=n_bins,
        strategy="quantile",
    )
    return {"predicted": [float(v) for v in predicted], "observed": [float(v) for v in observed]}


@dataclass
class Predictions:
    """Per-customer outputs of one model at one cutoff."""

    users: np.ndarray  # (n,)
    churn: np.ndarray  # (n,) probability
    high_value: np.ndarray  # (n,) probability
    spend: np.ndarray | None = None  # (n,) expected spend in the horizon
    extra: dict[str, Any] = field(default_factory=dict)

    def of(self, task: str) -> np.ndarray:
        return np.asarray(getattr(self, task))


# --------------------------------------------------------------------------- BG/NBD
class BGNBDModel:
    """BG/NBD + Gamma-Gamma, refitted on each cutoff's own history (it needs no labels)."""

    def __init__(self, cfg: ChurnConfig) -> None:
        self.cfg = cfg
        self.calib: Any = None

    @staticmethod
    def _fit_predict(data: CutoffData, weeks: float) -> tuple[np.ndarray, np.ndarray, BGNBD]:
        s = data.summary
        x = s["frequency"].to_numpy().astype(np.float64)
        t_x = s["recency"].to_numpy()
        T = s["T"].to_numpy()
        bg = BGNBD().fit(x, t_x, T)
        gg = GammaGamma().fit(x, s["monetary_value"].to_numpy())
        p0 = bg.p_no_purchase(weeks, x, t_x, T)
        value = gg.expected_value(x, s["monetary_value"].to_numpy())
        spend = bg.expected_purchases(weeks, x, t_x, T) * value
        return p0, spend, bg

    def fit(self, train: CutoffData) -> BGNBDModel:
        """Fit the spend -> P(high value) calibration on the training cutoff."""
        from sklearn.linear_model import LogisticRegression

        _, spend, _ = self._fit_predict(train, self.cfg.horizon_days / 7.0)
        self.calib = LogisticRegression().fit(
            np.log1p(np.maximum(spend, 0)).reshape(-1, 1), train.label("high_value")
        )
        return self

    def predict(self, data: CutoffData) -> Predictions:
        p0, spend, bg = self._fit_predict(data, self.cfg.horizon_days / 7.0)
        if self.calib is None:
            raise ModelError("BGNBDModel.fit must run before predict")
        hv = self.calib.predict_proba(np.log1p(np.maximum(spend, 0)).reshape(-1, 1))[:, 1]
        return Predictions(data.users, p0, hv, spend, {"params": bg.params})


# --------------------------------------------------------------------------- GBDT
class GBDTModel:
    """HistGradientBoosting classifiers (churn, high value) and a spend regressor on RFM features."""

    def __init__(self, cfg: ChurnConfig) -> None:
        self.cfg = cfg
        self.models: dict[str, Any] = {}

    def _clf(self) -> Any:
        from sklearn.ensemble import HistGradientBoostingClassifier

        c = self.cfg
        return HistGradientBoostingClassifier(
            max_iter=c.gbdt_max_iter,
            learning_rate=c.gbdt_learning_rate,
            max_leaf_nodes=c.gbdt_max_leaf_nodes,
            min_samples_leaf=c.gbdt_min_samples_leaf,
            early_stopping=True,
            validation_fraction=c.valid_fraction,
            n_iter_no_change=20,
            random_state=c.seed,
        )

    def fit(self, train: CutoffData) -> GBDTModel:
        x = train.features()
        for task in TASKS:
            self.models[task] = self._clf().fit(x, train.label(task))
        return self.fit_spend(train)

    def fit_spend(self, train: CutoffData) -> GBDTModel:
        """Only the spend regressor (log1p of the window's spend on the RFM features)."""
        from sklearn.ensemble import HistGradientBoostingRegressor

        x = train.features()
        self.models["spend"] = HistGradientBoostingRegressor(
            loss="squared_error",
            max_iter=self.cfg.gbdt_max_iter,
            learning_rate=self.cfg.gbdt_learning_rate,
            max_leaf_nodes=self.cfg.gbdt_max_leaf_nodes,
            min_samples_leaf=self.cfg.gbdt_min_samples_leaf,
            early_stopping=True,
            random_state=self.cfg.seed,
        ).fit(x, np.log1p(train.table["future_spend"].to_numpy()))
        return self

    def predict_spend(self, data: CutoffData) -> np.ndarray:
        """(n,) expected spend in the horizon (the regressor's expm1, floored at 0)."""
        if "spend" not in self.models:
            raise ModelError("GBDTModel.fit_spend must run before predict_spend")
        return np.asarray(np.expm1(self.models["spend"].predict(data.features())).clip(min=0.0))

    def predict(self, data: CutoffData) -> Predictions:
        if not self.models:
            raise ModelError("GBDTModel.fit must run before predict")
        x = data.features()
        return Predictions(
            data.users,
            self.models["churn"].predict_proba(x)[:, 1],
            self.models["high_value"].predict_proba(x)[:, 1],
            np.expm1(self.models["spend"].predict(x)).clip(min=0.0),
        )


# --------------------------------------------------------------------------- spend
SPEND_METHODS: tuple[str, str] = ("gbdt", "last_window")


def recent_spend(ds: Dataset, cutoff_ts: int, users: np.ndarray, horizon_days: int) -> np.ndarray:
    """(n,) net spend of ``users`` (in that order) in ``[cutoff - H days, cutoff)``: the
    "same as the last H days" prediction, with the label's definition (purchased minus
    returned value, floored at 0; :func:`segments.labels.make_labels`)."""
    start = int(cutoff_ts) - horizon_days * DAY
    lab = make_labels(
        ds.events.filter(pl.col("ts") < cutoff_ts),
        users,
        start,
        LabelConfig(horizon_days, require_full_window=False),
    )
    ids = lab["user_id"].to_numpy().astype(np.int64)  # sorted, unique
    val = lab["future_spend"].to_numpy().astype(np.float64)
    u = np.asarray(users, dtype=np.int64)
    if len(ids) == 0:
        return np.zeros(len(u), np.float64)
    pos = np.clip(np.searchsorted(ids, u), 0, len(ids) - 1)
    return np.where(ids[pos] == u, val[pos], 0.0)


def spend_errors(actual: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """MAE, RMSE and the relative error on the total (sum predicted / sum actual - 1)."""
    a = np.asarray(actual, dtype=np.float64)
    p = np.asarray(predicted, dtype=np.float64)
    tot = float(a.sum())
    return {
        "mae": float(np.mean(np.abs(p - a))),
        "rmse": float(np.sqrt(np.mean((p - a) ** 2))),
        "total_error": float(p.sum() / tot - 1.0) if tot > 0 else float("nan"),
        "actual_total": tot,
        "predicted_total": float(p.sum()),
        "n": float(len(a)),
    }


@dataclass(frozen=True)
class SpendChoice:
    """Which spend prediction to show, chosen by MAE on a validation window."""

    method: str  # one of SPEND_METHODS
    valid_cutoff_ts: int  # the cutoff whose observed window decided
    valid: dict[str, dict[str, float]]  # method -> spend_errors on that window

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "valid_cutoff_ts": self.valid_cutoff_ts, "valid": self.valid}


def choose_spend(ds: Dataset, cfg: ChurnConfig, valid: CutoffData) -> SpendChoice:
    """GBDT regressor or "same as the last H days", whichever has the lower MAE on the
    observed window of ``valid`` (a cutoff whose labels are known and that is never the
    test cutoff). The regressor is trained one horizon before ``valid`` (its window ends at
    ``valid``'s cutoff), as it is trained one horizon before the scored cutoff in use."""
    h = cfg.horizon_days
    if "future_spend" not in valid.table.columns:
        raise DataError("choose_spend needs a cutoff with an observed spend window")
    actual = valid.label("future_spend")
    last = recent_spend(ds, valid.cutoff_ts, valid.users, h)
    errs = {"last_window": spend_errors(actual, last)}
    fit_cut = valid.cutoff_ts - h * DAY
    fit, _ = prepare(ds, fit_cut, cfg)
    if fit.table.height >= 20:
        g = GBDTModel(cfg).fit_spend(fit).predict_spend(valid)
        errs["gbdt"] = spend_errors(actual, g)
    else:
        log.warning(
            "spend choice: only %d customers before %d; the GBDT regressor is not validated "
            "and the last-window spend is used",
            fit.table.height,
            fit_cut,
        )
    method = min(errs, key=lambda m: (errs[m]["mae"], m != "gbdt"))
    log.info(
        "predicted spend: %s (validation MAE %s)",
        method,
        {m: round(e["mae"], 2) for m, e in errs.items()},
    )
    return SpendChoice(method, int(valid.cutoff_ts), errs)


def predict_spend(
    ds: Dataset, cfg: ChurnConfig, choice: SpendChoice, train: CutoffData, data: CutoffData
) -> np.ndarray:
    """(n,) spend of ``data``'s customers in the next horizon by the chosen method; the GBDT
    regressor is fitted on ``train`` (a cutoff whose window is observed)."""
    if choice.method == "last_window":
        return recent_spend(ds, data.cutoff_ts, data.users, cfg.horizon_days)
    return GBDTModel(cfg).fit_spend(train).predict_spend(data)


# --------------------------------------------------------------------------- ours
def rfm_inputs(
    x: np.ndarray, stats: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Signed log1p then standardisation (statistics from the training cutoff)."""
    z = np.sign(x) * np.log1p(np.abs(x))
    if stats is None:
        stats = (z.mean(0), z.std(0) + 1e-6)
    return ((z - stats[0]) / stats[1]).astype(np.float32), stats


class TowerHeads:
    """Churn + high-value heads on [user-tower embedding, RFM features] ("ours").

    ``fit_frozen`` trains the MLP head on precomputed embeddings; ``fit_tower`` trains the
    head together with the user tower of a :class:`towers.model.TwoTower` (``mode`` lora or
    full), the item table frozen. Early stopping on a held-out slice of the *training*
    cutoff's customers (mean ROC-AUC of the two tasks), never on test.
    """

    def __init__(self, cfg: ChurnConfig) -> None:
        self.cfg = cfg
        self.head: Any = None
        self.tower: Any = None
        self.table: Any = None  # (N+1, D) frozen item table for the tower modes
        self.stats: tuple[np.ndarray, np.ndarray] | None = None
        self.mode: Mode = "frozen"
        self.history: list[dict[str, float]] = []
        self.trainable_params = 0
        self.train_seconds = 0.0

    def _make_head(self, d_in: int) -> Any:
        import torch
        from torch import nn

        torch.manual_seed(self.cfg.seed)
        h = self.cfg.head_hidden
        return nn.Sequential(
            nn.Linear(d_in, h), nn.GELU(), nn.Dropout(self.cfg.head_dropout), nn.Linear(h, 2)
        )

    def _split(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.cfg.seed)
        perm = rng.permutation(n)
        n_val = max(1, round(self.cfg.valid_fraction * n))
        return perm[n_val:], perm[:n_val]

    # --- frozen -------------------------------------------------------------------
    def fit_frozen(self, emb: np.ndarray, train: CutoffData) -> TowerHeads:
        """Train the head on fixed ``emb`` (n, D) aligned with ``train.users``."""
        if emb.shape[0] != train.table.height:
            raise DataError(
                f"embeddings have {emb.shape[0]} rows for {train.table.height} customers"
            )
        self.mode = "frozen"
        xr, self.stats = rfm_inputs(train.features())
        x = np.concatenate([emb.astype(np.float32), xr], 1)
        self.head = self._make_head(x.shape[1])
        self._train(lambda idx: self._head_logits_np(x, idx), train, list(self.head.parameters()))
        return self

    def _head_logits_np(self, x: np.ndarray, idx: np.ndarray) -> Any:
        import torch

        return self.head(torch.from_numpy(x[idx]))  # (B, 2)

    def predict_frozen(self, emb: np.ndarray, data: CutoffData) -> Predictions:
        import torch

        if self.head is None or self.stats is None:
            raise ModelError("TowerHeads is not fitted")
        xr, _ = rfm_inputs(data.features(), self.stats)
        x = torch.from_numpy(np.concatenate([emb.astype(np.float32), xr], 1))
        self.head.eval()
        with torch.no_grad():
            p = torch.sigmoid(self.head(x)).numpy()  # (n, 2)
        return Predictions(data.users, p[:, 0], p[:, 1], extra={"mode": "frozen"})

    # --- fine-tuning ----------------------------------------------------------------
    def fit_tower(
        self, two_tower: Any, batches: Any, train: CutoffData, mode: Mode = "lora"
    ) -> TowerHeads:
        """Fine-tune ``two_tower.user_tower`` (copied, the input model is untouched) with the head.

        ``batches(idx) -> SequenceBatch`` gives the padded sequences of ``train.users[idx]``
        at the training cutoff.
        """
        import torch

        if mode not in ("lora", "full"):
            raise ModelError(f"fit_tower mode must be lora or full, got {mode!r}")
        self.mode = mode
        model = copy.deepcopy(two_tower)
        model.eval()
        with torch.no_grad():
            self.table = model.item_table().detach()  # (N+1, D) frozen item inputs
        tower = model.user_tower
        for p in tower.parameters():
            p.requires_grad_(mode == "full")
        if mode == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            lcfg = LoraConfig(
                r=self.cfg.lora_r,
                lora_alpha=self.cfg.lora_alpha,
                target_modules=list(self.cfg.lora_targets),
                lora_dropout=0.0,
            )
            tower = inject_adapter_in_model(lcfg, tower)
            for n, p in tower.named_parameters():
                p.requires_grad_("lora_" in n)
        self.tower = tower
        xr, self.stats = rfm_inputs(train.features())
        d = int(self.table.shape[1])
        self.head = self._make_head(d + xr.shape[1])
        tower_params = [p for p in tower.parameters() if p.requires_grad]
        groups = [
            {"params": list(self.head.parameters()), "lr": self.cfg.lr},
            {"params": tower_params, "lr": self.cfg.tower_lr},
        ]
        self._train(lambda idx: self._tower_logits(batches(idx), xr[idx]), train, groups)
        return self

    def _tower_logits(self, batch: Any, xr: np.ndarray) -> Any:
        import torch

        t = {
            k: torch.from_numpy(getattr(batch, k))
            for k in ("items", "event_type", "gap", "lengths")
        }
        u = self.tower(self.table[t["items"]], t["event_type"], t["gap"], t["lengths"])  # (B, D)
        u = torch.nn.functional.normalize(u, dim=-1)
        return self.head(torch.cat([u, torch.from_numpy(xr)], 1))  # (B, 2)

    def predict_tower(self, batches: Any, data: CutoffData) -> Predictions:
        """``batches(idx)`` gives the sequences of ``data.users[idx]`` at that cutoff."""
        import torch

        if self.tower is None or self.stats is None:
            raise ModelError("TowerHeads.fit_tower must run before predict_tower")
        xr, _ = rfm_inputs(data.features(), self.stats)
        self.tower.eval()
        self.head.eval()
        out = []
        with torch.no_grad():
            for s in range(0, len(xr), 512):
                idx = np.arange(s, min(s + 512, len(xr)))
                out.append(torch.sigmoid(self._tower_logits(batches(idx), xr[idx])).numpy())
        p = np.concatenate(out, 0)  # (n, 2)
        return Predictions(data.users, p[:, 0], p[:, 1], extra={"mode": self.mode})

    # --- shared loop ------------------------------------------------------------------
    def _train(self, logits_of: Any, train: CutoffData, params: Any) -> None:
        import torch
        from sklearn.metrics import roc_auc_score

        torch.manual_seed(self.cfg.seed)
        y = np.stack([train.label(t) for t in TASKS], 1).astype(np.float32)  # (n, 2)
        tr, va = self._split(len(y))
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        modules = [m for m in (self.head, self.tower) if m is not None]
        self.trainable_params = sum(
            p.numel() for m in modules for p in m.parameters() if p.requires_grad
        )
        rng = np.random.default_rng(self.cfg.seed)
        best, best_state, bad = -1.0, None, 0
        t0 = time.perf_counter()
        loss_fn = torch.nn.BCEWithLogitsLoss()
        for epoch in range(self.cfg.epochs):
            for m in modules:
                m.train()
            perm = rng.permutation(tr)
            for s in range(0, len(perm), self.cfg.batch_size):
                idx = perm[s : s + self.cfg.batch_size]
                loss = loss_fn(logits_of(idx), torch.from_numpy(y[idx]))
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(
                    [p for g in opt.param_groups for p in g["params"]], 1.0
                )
                opt.step()
            for m in modules:
                m.eval()
            with torch.no_grad():
                pv = np.concatenate(
                    [
                        torch.sigmoid(logits_of(va[s : s + 512])).numpy()
                        for s in range(0, len(va), 512)
                    ],
                    0,
                )
            aucs = [
                roc_auc_score(y[va, j], pv[:, j]) if 0 < y[va, j].mean() < 1 else 0.5
                for j in range(2)
            ]
            score = float(np.mean(aucs))
            self.history.append(
                {"epoch": epoch, "valid_auc_churn": aucs[0], "valid_auc_hv": aucs[1]}
            )
            if score > best + 1e-4:
                best, bad = score, 0
                best_state = [copy.deepcopy(m.state_dict()) for m in modules]
            else:
                bad += 1
                if bad >= self.cfg.patience:
                    break
        if best_state is not None:
            for m, st in zip(modules, best_state):
                m.load_state_dict(st)
        self.train_seconds = time.perf_counter() - t0
        log.info(
            "heads (%s): best valid mean AUC %.4f after %d epochs, %d trainable params, %.1fs",
            self.mode,
            best,
            len(self.history),
            self.trainable_params,
            self.train_seconds,
        )


# --------------------------------------------------------------------------- comparison
@dataclass
class Comparison:
    """Metrics and predictions of every model on the held-out cutoff of one split."""

    metrics: dict[str, dict[str, dict[str, float]]]  # task -> model -> metric -> value
    predictions: dict[str, Predictions]  # model -> predictions on the test cutoff
    train: CutoffData
    test: CutoffData
    info: dict[str, Any]
    # spend in the test window: method -> spend_errors; "chosen" -> the validated choice
    spend: dict[str, Any] = field(default_factory=dict)


def compare(
    ds: Dataset,
    cfg: ChurnConfig = ChurnConfig(),
    *,
    source: str = "text",
    run_dir: str | None = None,
    modes: tuple[str, ...] = ("frozen",),
) -> Comparison:
    """BG/NBD, GBDT and the heads ("ours", one entry per fine-tuning mode) on one split.

    ``ours`` is the mode with the best mean ROC-AUC on the validation slice of the
    *training* cutoff (never chosen on test). Modes ``lora``/``full`` need ``run_dir``;
    mode ``rfm_only`` is the ablation "same head, no embedding" (``heads_rfm_only``).
    The predicted spend is checked too (``Comparison.spend``): GBDT, BG/NBD and "same as
    the last H days" against the test window's actual spend, and the method the export
    would show, chosen on the training cutoff's window (:func:`choose_spend`).
    """
    with limited_threads(cfg.threads):
        return _compare(ds, cfg, source=source, run_dir=run_dir, modes=modes)


def _compare(
    ds: Dataset, cfg: ChurnConfig, *, source: str, run_dir: str | None, modes: tuple[str, ...]
) -> Comparison:
    from segments.behaviour import tower_batches, user_embeddings

    train, test = temporal_split(ds, cfg)
    preds: dict[str, Predictions] = {}
    info: dict[str, Any] = {
        "train_cutoff": train.cutoff_ts,
        "test_cutoff": test.cutoff_ts,
        "n_train": train.table.height,
        "n_test": test.table.height,
        "ours_source": source,
    }
    t0 = time.perf_counter()
    preds["bgnbd"] = BGNBDModel(cfg).fit(train).predict(test)
    info["bgnbd_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    preds["gbdt"] = GBDTModel(cfg).fit(train).predict(test)
    info["gbdt_seconds"] = time.perf_counter() - t0
    valid: dict[str, float] = {}
    for mode in modes:
        heads = TowerHeads(cfg)
        if mode == "frozen":
            e_tr = user_embeddings(ds, train.cutoff_ts, train.users, source=source, run_dir=run_dir)  # type: ignore[arg-type]
            e_te = user_embeddings(ds, test.cutoff_ts, test.users, source=source, run_dir=run_dir)  # type: ignore[arg-type]
            heads.fit_frozen(e_tr, train)
            p = heads.predict_frozen(e_te, test)
        elif mode == "rfm_only":  # ablation: the same head without any embedding
            heads.fit_frozen(np.zeros((train.table.height, 0), np.float32), train)
            p = heads.predict_frozen(np.zeros((test.table.height, 0), np.float32), test)
        elif mode in ("lora", "full"):
            if run_dir is None:
                raise ModelError(
                    f"mode {mode} fine-tunes the user tower: give a tower run directory"
                )
            from towers.inference import load_run

            tm = load_run(run_dir)
            b_tr = tower_batches(tm, ds, train.cutoff_ts, train.users)
            b_te = tower_batches(tm, ds, test.cutoff_ts, test.users)
            heads.fit_tower(tm.model, b_tr, train, mode=mode)  # type: ignore[arg-type]
            p = heads.predict_tower(b_te, test)
        else:
            raise ModelError(f"unknown mode {mode!r}")
        name = "heads_rfm_only" if mode == "rfm_only" else f"ours_{mode}"
        preds[name] = p
        best = max(
            (0.5 * (h["valid_auc_churn"] + h["valid_auc_hv"]) for h in heads.history), default=0.0
        )
        if mode != "rfm_only":
            valid[name] = best
        info[f"{name}_trainable_params"] = heads.trainable_params
        info[f"{name}_seconds"] = heads.train_seconds
        info[f"{name}_epochs"] = len(heads.history)
        info[f"{name}_valid_mean_auc"] = best
    if valid:
        chosen = max(valid, key=lambda k: valid[k])
        preds["ours"] = preds[chosen]
        info["ours_mode"] = chosen
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    for task in TASKS:
        y = test.label(task)
        metrics[task] = {name: binary_metrics(y, p.of(task)) for name, p in preds.items()}
    choice = choose_spend(ds, cfg, train)
    actual = test.label("future_spend")
    candidates = {
        "gbdt": preds["gbdt"].spend,
        "last_window": recent_spend(ds, test.cutoff_ts, test.users, cfg.horizon_days),
        "bgnbd": preds["bgnbd"].spend,
    }
    spend: dict[str, Any] = {
        m: spend_errors(actual, v) for m, v in candidates.items() if v is not None
    }
    spend["chosen"] = choice.to_dict()
    return Comparison(metrics, preds, train, test, info, spend)


def pre_cutoff_dataset(ds: Dataset, horizon_days: int) -> Dataset:
    """``ds`` truncated before the test cutoff of :func:`temporal_split` (same id maps), to
    train a user tower that cannot have seen the test window; save it and pass its
    directory to ``ecomrec train --dataset``."""
    cut = cutoff_for(ds.events, horizon_days)
    return Dataset(
        name=f"{ds.name}-before-{cut}",
        events=ds.events.filter(pl.col("ts") < cut),
        items=ds.items,
        users=ds.users,
        item_ids=ds.item_ids,
        report=ds.report,
        extra={**ds.extra, "truncated_before_ts": cut},
    )
