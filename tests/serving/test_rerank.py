"""Re-ranking as pure functions: planted candidates with known right answers."""

from __future__ import annotations

import numpy as np
import pytest

from ecomrec.errors import ConfigError
from serving import rerank as rr


def _cands(
    rel: list[float],
    cats: list[str],
    price: list[float] | None = None,
    pop: list[float] | None = None,
) -> rr.Candidates:
    n = len(rel)
    return rr.Candidates(
        item_ids=np.arange(1, n + 1),
        relevance=np.asarray(rel, np.float32),
        categories=cats,
        price=np.asarray(price if price is not None else [np.nan] * n),
        popularity=np.asarray(pop if pop is not None else [0.0] * n, np.float32),
        external_ids=[f"I{i}" for i in range(1, n + 1)],
    )


def test_relevance_only_policy_keeps_ann_order() -> None:
    c = _cands([0.9, 0.8, 0.7, 0.6], ["A", "A", "B", "B"])
    out = rr.rerank(c, rr.UserContext(), rr.RerankPolicy(), k=4)
    assert [r.item_id for r in out] == [1, 2, 3, 4]
    assert all(rr.RELEVANT in r.reasons for r in out)


def test_mmr_diversity_interleaves_categories() -> None:
    c = _cands([0.90, 0.89, 0.88, 0.50, 0.49], ["A", "A", "A", "B", "C"])
    plain = rr.rerank(c, rr.UserContext(), rr.RerankPolicy(), k=3)
    div = rr.rerank(c, rr.UserContext(), rr.RerankPolicy(diversity=0.6), k=3)
    assert [r.item_id for r in plain] == [1, 2, 3]
    assert [r.item_id for r in div] == [1, 4, 5]
    assert rr.DIVERSITY in div[1].reasons and rr.DIVERSITY not in div[0].reasons


def test_popularity_and_price_promote_with_reasons() -> None:
    c = _cands([0.80, 0.79, 0.78], ["A", "B", "C"], price=[100.0, 10.0, 11.0], pop=[0.0, 0.1, 1.0])
    pol = rr.RerankPolicy(popularity=0.5)
    out = rr.rerank(c, rr.UserContext(), pol, k=3)
    assert out[0].item_id == 3 and rr.POPULAR_IN_SEGMENT in out[0].reasons
    user = rr.UserContext(price_center=float(np.log1p(10.0)))
    out = rr.rerank(c, user, rr.RerankPolicy(price_affinity=0.5), k=1)
    assert out[0].item_id == 2 and rr.PRICE_FIT in out[0].reasons


def test_novelty_and_boosts() -> None:
    c = _cands([0.8, 0.79, 0.78], ["Home > Mug", "Garden > Lantern", "Home > Scarf"])
    seen = frozenset({rr.category_key("Home > Mug", 3), rr.category_key("Home > Scarf", 3)})
    out = rr.rerank(c, rr.UserContext(seen_categories=seen), rr.RerankPolicy(novelty=0.1), k=1)
    assert out[0].item_id == 2 and rr.NEW_FOR_YOU in out[0].reasons
    pol = rr.RerankPolicy(
        boosts=(
            rr.Boost(category="Home > Scarf", weight=0.5),
            rr.Boost(item_ids=("I2",), weight=0.01),
        )
    )
    out = rr.rerank(c, rr.UserContext(), pol, k=3)
    assert out[0].item_id == 3 and rr.BOOSTED in out[0].reasons
    assert out[1].item_id == 2 and rr.BOOSTED in out[1].reasons


def test_category_key_and_price_fit() -> None:
    assert (
        rr.category_key("Beauty > Makeup > Nails > Polish | Beauty > Tools", 2) == "Beauty > Makeup"
    )
    assert rr.category_key(None, 3) == ""
    fit = rr.price_fit(np.array([10.0, np.nan, 1000.0]), float(np.log1p(10.0)))
    assert fit[0] == pytest.approx(1.0) and fit[1] == 0.0 and fit[2] < 0.05
    assert rr.price_fit(np.array([5.0]), None)[0] == 0.0


def test_policies_from_toml(tmp_path) -> None:
    p = tmp_path / "r.toml"
    p.write_text(
        '[default]\ndiversity = 0.2\n[segments."At Risk"]\npopularity = 0.3\n[[segments."At Risk".boosts]]\ncategory = "Mug"\nweight = 0.1\n'
    )
    pol = rr.RerankPolicies.load(p)
    name, at_risk = pol.for_segments(None, "At Risk")
    assert name == "At Risk" and at_risk.popularity == 0.3 and at_risk.boosts[0].category == "Mug"
    assert pol.for_segments("Champions")[1].diversity == 0.2
    p.write_text("[default]\nrelevence = 1.0\n")
    with pytest.raises(ConfigError, match="relevence"):
        rr.RerankPolicies.load(p)
    p.write_text("[default]\ndiversity = 1.5\n")
    with pytest.raises(ConfigError):
        rr.RerankPolicies.load(p)


def test_shipped_policies_load() -> None:
    from pathlib import Path

    pol = rr.RerankPolicies.load(
        Path(__file__).resolve().parents[2] / "ecomrec" / "configs" / "serving" / "rerank.toml"
    )
    assert pol.segments and all(0 <= p.diversity < 1 for p in pol.segments.values())


def test_median_equals_numpys() -> None:
    """rerank.median (the request path's, ~10x cheaper per call) is np.median's value."""
    from serving.rerank import median

    rng = np.random.default_rng(0)
    for n in range(1, 120):
        for scale in (1e-3, 1.0, 1e5):
            x = rng.normal(size=n) * scale
            assert median(x) == float(np.median(x))
        ties = rng.integers(0, 3, size=n).astype(np.float64)
        assert median(ties) == float(np.median(ties))
