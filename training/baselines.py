"""Baselines behind the :class:`~training.retriever.Retriever` protocol.

Popularity, EASE (closed-form item-item, Steck 2019), and from ``implicit``: ALS, BPR
and item-item cosine kNN. The
collaborative-filtering models are refit on train+validation before the test with the
hyperparameters chosen on validation (``refit_on_train_valid = True``).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp

from ecomrec.config import from_dict
from ecomrec.errors import ModelError
from towers.ease import ease_weights
from towers.sequences import Interactions
from training.retriever import read_retriever_meta, write_retriever_meta
from training.splits import Targets

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _check_fitted(x: object, name: str) -> None:
    if x is None:
        raise ModelError(f"{name} is not fitted: call fit() or load() first")


def _write(path: Path, kind: str, config: Any, arrays: dict[str, np.ndarray]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    np.savez(path / "weights.npz", **arrays)  # type: ignore[arg-type]
    write_retriever_meta(path, kind, config)


def _read(path: Path, kind: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    meta = read_retriever_meta(path, kind)
    with np.load(path / "weights.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return meta["config"], arrays


# --- popularity -------------------------------------------------------------------------
@dataclass(frozen=True)
class PopularityConfig:
    recent_days: int | None = None  # count only the last N days of the history (None: all)


class Popularity:
    """Ranks items by how often they occur in the fitted history."""

    name = "popularity"
    refit_on_train_valid = True
    grid: ClassVar[list[dict[str, Any]]] = [{}]

    def __init__(self, config: PopularityConfig = PopularityConfig()) -> None:
        self.config = config
        self.counts: np.ndarray | None = None

    def fit(self, train: Interactions, valid: Targets | None = None) -> None:
        if self.config.recent_days is not None:
            cutoff = int(train.ts.max(initial=0)) - self.config.recent_days * 86400
            items = train.items[train.ts >= cutoff]
            c = np.bincount(items, minlength=train.n_items + 1).astype(np.float32)
        else:
            c = train.item_counts().astype(np.float32)
        c[0] = 0
        self.counts = c

    def score(self, users: np.ndarray, history: Interactions) -> np.ndarray:
        _check_fitted(self.counts, self.name)
        assert self.counts is not None
        return np.broadcast_to(self.counts, (len(users), len(self.counts))).copy()

    def save(self, path: Path) -> None:
        _check_fitted(self.counts, self.name)
        assert self.counts is not None
        _write(Path(path), self.name, self.config, {"counts": self.counts})

    @classmethod
    def load(cls, path: Path) -> Popularity:
        cfg, arr = _read(Path(path), cls.name)
        m = cls(from_dict(PopularityConfig, cfg))
        m.counts = arr["counts"]
        return m


# --- matrix factorisation (ALS, BPR) ----------------------------------------------------
@dataclass(frozen=True)
class ALSConfig:
    factors: int = 128
    regularization: float = 0.1
    alpha: float = 40.0
    iterations: int = 15
    seed: int = 0


@dataclass(frozen=True)
class BPRConfig:
    factors: int = 64
    learning_rate: float = 0.01
    regularization: float = 0.01
    iterations: int = 100
    seed: int = 0


class _FactorModel:
    """Scores = user factors . item factors; users unseen at fit time score zero."""

    name: ClassVar[str]
    refit_on_train_valid = True
    user_factors: np.ndarray | None
    item_factors: np.ndarray | None
    config: Any

    def score(self, users: np.ndarray, history: Interactions) -> np.ndarray:
        _check_fitted(self.item_factors, self.name)
        assert self.user_factors is not None and self.item_factors is not None
        uf = self.user_factors[np.minimum(users, len(self.user_factors) - 1)]  # (B, F)
        s = uf @ self.item_factors.T  # (B, N+1)
        out = np.zeros((len(users), history.n_items + 1), np.float32)
        n = min(out.shape[1], s.shape[1])
        out[:, :n] = s[:, :n]
        return out

    def save(self, path: Path) -> None:
        _check_fitted(self.item_factors, self.name)
        assert self.user_factors is not None and self.item_factors is not None
        _write(
            Path(path),
            self.name,
            self.config,
            {"user": self.user_factors, "item": self.item_factors},
        )


def _to_numpy(x: Any) -> np.ndarray:
    return np.asarray(x.to_numpy() if hasattr(x, "to_numpy") else x, dtype=np.float32)


class ALS(_FactorModel):
    """``implicit`` alternating least squares (confidence 1 + alpha * count)."""

    name = "als"
    grid: ClassVar[list[dict[str, Any]]] = [
        {"factors": f, "regularization": r, "alpha": a}
        for f in (128, 256)
        for r in (0.1, 1.0)
        for a in (10.0, 40.0)
    ]

    def __init__(self, config: ALSConfig = ALSConfig()) -> None:
        self.config = config
        self.user_factors = None
        self.item_factors = None

    def fit(self, train: Interactions, valid: Targets | None = None) -> None:
        from implicit.als import AlternatingLeastSquares

        c = self.config
        m = AlternatingLeastSquares(
            factors=c.factors,
            regularization=c.regularization,
            alpha=c.alpha,
            iterations=c.iterations,
            random_state=c.seed,
            calculate_training_loss=False,
        )
        m.fit(train.to_csr(binary=False), show_progress=False)
        self.user_factors, self.item_factors = _to_numpy(m.user_factors), _to_numpy(m.item_factors)

    @classmethod
    def load(cls, path: Path) -> ALS:
        cfg, arr = _read(Path(path), cls.name)
        m = cls(from_dict(ALSConfig, cfg))
        m.user_factors, m.item_factors = arr["user"], arr["item"]
        return m


class BPR(_FactorModel):
    """``implicit`` Bayesian personalised ranking (SGD on sampled triples)."""

    name = "bpr"
    grid: ClassVar[list[dict[str, Any]]] = [
        {"factors": f, "learning_rate": lr} for f in (128, 256) for lr in (0.05, 0.1)
    ]

    def __init__(self, config: BPRConfig = BPRConfig()) -> None:
        self.config = config
        self.user_factors = None
        self.item_factors = None

    def fit(self, train: Interactions, valid: Targets | None = None) -> None:
        from implicit.bpr import BayesianPersonalizedRanking

        c = self.config
        m = BayesianPersonalizedRanking(
            factors=c.factors,
            learning_rate=c.learning_rate,
            regularization=c.regularization,
            iterations=c.iterations,
            random_state=c.seed,
        )
        m.fit(train.to_csr(), show_progress=False)
        self.user_factors, self.item_factors = _to_numpy(m.user_factors), _to_numpy(m.item_factors)

    @classmethod
    def load(cls, path: Path) -> BPR:
        cfg, arr = _read(Path(path), cls.name)
        m = cls(from_dict(BPRConfig, cfg))
        m.user_factors, m.item_factors = arr["user"], arr["item"]
        return m


# --- item-item kNN ----------------------------------------------------------------------
@dataclass(frozen=True)
class ItemKNNConfig:
    neighbours: int = 100


class ItemKNN:
    """``implicit`` item-item cosine kNN; a user's score is the sum of similarities to the
    items of the history passed to :meth:`score` (so it needs no refit for new history)."""

    name = "itemknn"
    refit_on_train_valid = True
    grid: ClassVar[list[dict[str, Any]]] = [{"neighbours": k} for k in (100, 400, 1000)]

    def __init__(self, config: ItemKNNConfig = ItemKNNConfig()) -> None:
        self.config = config
        self.similarity: sp.csr_matrix | None = None

    def fit(self, train: Interactions, valid: Targets | None = None) -> None:
        from implicit.nearest_neighbours import CosineRecommender

        m = CosineRecommender(K=self.config.neighbours)
        with warnings.catch_warnings():
            # implicit's own all_pairs_knn converts an internal COO matrix and warns about it
            from implicit.utils import ParameterWarning

            warnings.simplefilter("ignore", category=ParameterWarning)
            m.fit(train.to_csr(), show_progress=False)
        self.similarity = sp.csr_matrix(m.similarity)

    def score(self, users: np.ndarray, history: Interactions) -> np.ndarray:
        _check_fitted(self.similarity, self.name)
        assert self.similarity is not None
        ui = history.to_csr()[users]  # (B, N+1)
        s = ui @ self.similarity
        out = np.zeros((len(users), history.n_items + 1), np.float32)
        dense = np.asarray(s.todense(), dtype=np.float32)
        n = min(out.shape[1], dense.shape[1])
        out[:, :n] = dense[:, :n]
        return out

    def save(self, path: Path) -> None:
        _check_fitted(self.similarity, self.name)
        assert self.similarity is not None
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sp.save_npz(path / "similarity.npz", self.similarity)
        write_retriever_meta(path, self.name, self.config)

    @classmethod
    def load(cls, path: Path) -> ItemKNN:
        path = Path(path)
        meta = read_retriever_meta(path, cls.name)
        m = cls(from_dict(ItemKNNConfig, meta["config"]))
        m.similarity = sp.load_npz(path / "similarity.npz").tocsr()
        return m


# --- EASE (Steck 2019) -----------------------------------------------------------------
@dataclass(frozen=True)
class EASEConfig:
    l2: float = 500.0  # lambda on the diagonal of the Gram matrix
    neighbours: int = 0  # keep the top-N weights per item column (0: dense, exact)
    max_dense_items: int = 40_000  # the closed form inverts an (N, N) matrix in memory


class EASE:
    """Embarrassingly shallow autoencoder: closed-form item-item weights
    ``B = I - P / diag(P)``, ``P = (X^T X + lambda I)^-1``, diagonal zero (Steck, WWW 2019).
    A user's scores are ``x_u B`` over the binary history passed to :meth:`score` (so it
    needs no refit for new history). ``neighbours > 0`` sparsifies B to its top weights per
    item column (for catalogues where a dense (N, N) matrix is too large to serve)."""

    name = "ease"
    refit_on_train_valid = True
    grid: ClassVar[list[dict[str, Any]]] = [{"l2": lam} for lam in (50.0, 200.0, 500.0, 1000.0)]

    def __init__(self, config: EASEConfig = EASEConfig()) -> None:
        self.config = config
        self.weights: np.ndarray | sp.csr_matrix | None = None  # (N+1, N+1)

    def fit(self, train: Interactions, valid: Targets | None = None) -> None:
        n = train.n_items + 1
        if n > self.config.max_dense_items:
            raise ModelError(
                f"EASE needs a dense {n:,} x {n:,} inverse; the catalogue is larger than "
                f"max_dense_items={self.config.max_dense_items:,}"
            )
        b32 = ease_weights(train.to_csr(binary=True), self.config.l2)  # (N+1, N+1)
        self.weights = (
            _top_per_column(b32, self.config.neighbours) if self.config.neighbours else b32
        )

    def score(self, users: np.ndarray, history: Interactions) -> np.ndarray:
        _check_fitted(self.weights, self.name)
        assert self.weights is not None
        x = history.to_csr(binary=True)[users]  # (B, N+1)
        w = self.weights
        m = w.shape[0]
        s = x[:, :m] @ w  # (B, N+1)
        dense = np.asarray(s.todense() if sp.issparse(s) else s, dtype=np.float32)
        out = np.zeros((len(users), history.n_items + 1), np.float32)
        k = min(out.shape[1], dense.shape[1])
        out[:, :k] = dense[:, :k]
        return out

    def save(self, path: Path) -> None:
        _check_fitted(self.weights, self.name)
        assert self.weights is not None
        path = Path(path)
        if sp.issparse(self.weights):
            path.mkdir(parents=True, exist_ok=True)
            sp.save_npz(path / "weights_sparse.npz", sp.csr_matrix(self.weights))
            write_retriever_meta(path, self.name, self.config)
        else:
            _write(path, self.name, self.config, {"weights": np.asarray(self.weights)})

    @classmethod
    def load(cls, path: Path) -> EASE:
        path = Path(path)
        if (path / "weights_sparse.npz").exists():
            meta = read_retriever_meta(path, cls.name)
            m = cls(from_dict(EASEConfig, meta["config"]))
            m.weights = sp.load_npz(path / "weights_sparse.npz").tocsr()
            return m
        cfg, arr = _read(path, cls.name)
        m = cls(from_dict(EASEConfig, cfg))
        m.weights = arr["weights"]
        return m


def _top_per_column(b: np.ndarray, k: int) -> sp.csr_matrix:
    """Keep the ``k`` largest weights of each column of ``b`` (N, N) as a sparse matrix."""
    n = b.shape[0]
    k = min(k, n)
    rows = np.argpartition(-b, k - 1, axis=0)[:k]  # (k, N)
    cols = np.broadcast_to(np.arange(n), rows.shape)
    vals = b[rows, cols]
    keep = vals > 0
    return sp.csr_matrix((vals[keep], (rows[keep], cols[keep])), shape=b.shape)


# --- personal top (buy-again) ----------------------------------------------------------
@dataclass(frozen=True)
class PersonalTopConfig:
    half_life_days: float = 90.0  # a purchase this many days old counts half


class PersonalTop:
    """The customer's own items by recency-weighted purchase frequency (invoices with the
    item x 2^(-age / half-life), :meth:`towers.sequences.ItemBag.recency_frequency`), then
    the catalogue by popularity. The strong buy-again baseline of a shop; it never
    recommends a new item before an own one."""

    name = "personal-top"
    refit_on_train_valid = True
    grid: ClassVar[list[dict[str, Any]]] = [{"half_life_days": h} for h in (7.0, 30.0, 90.0, 365.0)]

    def __init__(self, config: PersonalTopConfig = PersonalTopConfig()) -> None:
        self.config = config
        self.popularity: np.ndarray | None = None

    def fit(self, train: Interactions, valid: Targets | None = None) -> None:
        c = train.item_counts().astype(np.float64)
        self.popularity = (c / max(c.max(initial=0.0), 1.0) * 1e-3).astype(np.float32)

    def score(self, users: np.ndarray, history: Interactions) -> np.ndarray:
        from towers.sequences import bag_for_users

        _check_fitted(self.popularity, self.name)
        assert self.popularity is not None
        out = np.zeros((len(users), history.n_items + 1), np.float32)
        n = min(out.shape[1], len(self.popularity))
        out[:, :n] = self.popularity[:n]
        bag = bag_for_users(history, np.asarray(users, np.int64))
        # own items score above any popularity-only item (popularity <= 1e-3)
        own = 2e-3 + bag.recency_frequency(self.config.half_life_days)
        out[bag.rows(), bag.items] += own.astype(np.float32)
        return out

    def save(self, path: Path) -> None:
        _check_fitted(self.popularity, self.name)
        assert self.popularity is not None
        _write(Path(path), self.name, self.config, {"popularity": self.popularity})

    @classmethod
    def load(cls, path: Path) -> PersonalTop:
        cfg, arr = _read(Path(path), cls.name)
        m = cls(from_dict(PersonalTopConfig, cfg))
        m.popularity = arr["popularity"]
        return m


BASELINES: dict[str, tuple[Any, Any]] = {
    "personal-top": (PersonalTop, PersonalTopConfig),
    "popularity": (Popularity, PopularityConfig),
    "als": (ALS, ALSConfig),
    "bpr": (BPR, BPRConfig),
    "itemknn": (ItemKNN, ItemKNNConfig),
    "ease": (EASE, EASEConfig),
}
