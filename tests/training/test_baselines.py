"""One retriever contract run against every baseline, plus planted-answer checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from towers.sequences import Interactions
from training.baselines import (
    ALS,
    BPR,
    EASE,
    ALSConfig,
    BPRConfig,
    EASEConfig,
    ItemKNN,
    ItemKNNConfig,
    Popularity,
)
from training.evaluation import evaluate
from training.retriever import Retriever
from training.splits import leave_one_out

MODELS = {
    "popularity": lambda: Popularity(),
    "als": lambda: ALS(ALSConfig(factors=16, iterations=10)),
    "bpr": lambda: BPR(BPRConfig(factors=16, iterations=60, learning_rate=0.05)),
    "itemknn": lambda: ItemKNN(ItemKNNConfig(neighbours=50)),
    "ease": lambda: EASE(EASEConfig(l2=50.0)),
    "ease-sparse": lambda: EASE(EASEConfig(l2=50.0, neighbours=10)),
}


@pytest.fixture(scope="module")
def split(shop):  # type: ignore[no-untyped-def]
    return leave_one_out(Interactions.from_events(shop.events, shop.n_users, shop.n_items))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_retriever_contract(name: str, split, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = MODELS[name]()
    assert isinstance(model, Retriever)
    model.fit(split.train, split.valid)
    users = split.test.users[:7]
    s = model.score(users, split.train_valid)
    assert s.shape == (7, split.train.n_items + 1) and s.dtype == np.float32
    # batch vs single
    one = model.score(users[2:3], split.train_valid)
    np.testing.assert_allclose(one[0], s[2], rtol=1e-5, atol=1e-6)
    # save -> load round trip gives the same scores
    model.save(tmp_path / name)
    back = type(model).load(tmp_path / name)
    np.testing.assert_allclose(back.score(users, split.train_valid), s, rtol=1e-5, atol=1e-6)


def test_personalised_models_beat_popularity_on_planted_tastes(split) -> None:  # type: ignore[no-untyped-def]
    res = {}
    for name in ("popularity", "als", "itemknn", "ease"):
        m = MODELS[name]()
        m.fit(split.train_valid)
        res[name] = evaluate(m.score, split.test, split.train_valid, ks=(10,))["ndcg@10"]
    assert res["als"] > 1.5 * res["popularity"]
    assert res["itemknn"] > 1.5 * res["popularity"]
    assert res["ease"] > 1.5 * res["popularity"]


def test_ease_matches_its_closed_form_and_learns_a_planted_pair() -> None:
    """Item 2 always follows item 1: EASE must give (1 -> 2) the largest weight, and B must
    solve the normal equations of ||X - XB||^2 + lambda ||B||^2 off the diagonal."""
    lists = [[1, 2], [1, 2, 3], [1, 2], [3, 4], [4, 3], [1, 2, 4]] * 5
    inter = Interactions.from_lists(lists, n_items=4)
    m = EASE(EASEConfig(l2=1.0))
    m.fit(inter)
    b = np.asarray(m.weights)
    assert np.all(np.diag(b) == 0)
    assert b[1, 2] == b[1].max() and b[2, 1] == b[2].max()
    x = inter.to_csr().toarray()[:, 1:].astype(np.float64)
    g = x.T @ x + 1.0 * np.eye(4)
    bb = b[1:, 1:].astype(np.float64)
    resid = g @ bb - x.T @ x  # zero off the diagonal for the constrained optimum
    off = ~np.eye(4, dtype=bool)
    np.testing.assert_allclose(resid[off], 0.0, atol=1e-4)
    top = np.argsort(-m.score(np.array([1]), Interactions.from_lists([[1]], n_items=4))[0])
    assert top[0] == 2


def test_popularity_ranks_by_count() -> None:
    inter = Interactions.from_lists([[3, 1], [3, 2], [3, 1], [2]], n_items=4)
    p = Popularity()
    p.fit(inter)
    top = np.argsort(-p.score(np.array([4]), inter)[0])[:3].tolist()
    assert top == [3, 1, 2]


def test_unfitted_model_raises_clear_error() -> None:
    from ecomrec.errors import ModelError

    with pytest.raises(ModelError, match="not fitted"):
        ALS().score(np.array([1]), Interactions.from_lists([[1]], n_items=1))
