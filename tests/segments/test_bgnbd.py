"""BG/NBD + Gamma-Gamma: the published CDNOW fit, the summary from raw transactions, and
parameter recovery / calibration on data simulated from the model itself."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ecomrec.errors import ModelError
from segments.bgnbd import BGNBD, GammaGamma, transaction_summary

PUBLISHED = {"r": 0.243, "alpha": 4.414, "a": 0.793, "b": 2.426}
CAL_END = int(dt.datetime(1997, 10, 1, tzinfo=dt.UTC).timestamp())  # 39-week calibration


@pytest.mark.realdata
def test_cdnow_published_fit(data_dir: Path) -> None:
    s = pl.read_csv(data_dir / "cdnow" / "cdnow_customers_summary.csv")
    m = BGNBD().fit(s["frequency"].to_numpy(), s["recency"].to_numpy(), s["T"].to_numpy())
    assert m.params is not None
    for k, v in PUBLISHED.items():
        assert getattr(m.params, k) == pytest.approx(v, abs=0.01), k
    assert m.params.log_likelihood == pytest.approx(-9582.4, abs=0.1)


@pytest.mark.realdata
def test_summary_from_raw_sample_matches_published_summary(data_dir: Path) -> None:
    from intake.loaders import load_dataset

    ds = load_dataset("cdnow-sample", data_dir=data_dir)
    s = transaction_summary(ds.events, CAL_END, time_unit_days=7.0)
    ref = pl.read_csv(data_dir / "cdnow" / "cdnow_customers_summary_with_transactions.csv")
    # the sample file's second column is the summary's ID; the loader keys on the first
    sample_id = {}
    for line in (data_dir / "cdnow" / "CDNOW_sample.txt").read_text().splitlines():
        p = line.split()
        if p:
            sample_id[p[0]] = int(p[1])
    ids = [sample_id[ds.users.to_external(int(u))] for u in s["user_id"].to_list()]
    j = s.with_columns(pl.Series("ID", ids)).join(ref, on="ID", how="inner")
    assert j.height == ref.height == 2357
    assert (j["frequency"] == j["x"]).all()
    assert np.abs(j["recency"] - j["t_x"]).max() < 0.006  # the csv is rounded to 2 decimals
    assert np.abs(j["T"] - j["T_right"]).max() < 0.006
    assert np.abs(j["monetary_value"] - j["zbar"]).max() < 0.006
    # and fitting on our own summary gives the published parameters too
    m = BGNBD().fit(s["frequency"].to_numpy(), s["recency"].to_numpy(), s["T"].to_numpy())
    for k, v in PUBLISHED.items():
        assert getattr(m.params, k) == pytest.approx(v, abs=0.01), k


@pytest.mark.realdata
def test_cdnow_gamma_gamma(data_dir: Path) -> None:
    s = pl.read_csv(data_dir / "cdnow" / "cdnow_customers_summary_with_transactions.csv")
    g = GammaGamma().fit(s["x"].to_numpy(), s["zbar"].to_numpy())
    assert g.params is not None
    # the values Lifetimes documents for this file
    assert g.params.p == pytest.approx(6.25, abs=0.02)
    assert g.params.q == pytest.approx(3.74, abs=0.02)
    assert g.params.v == pytest.approx(15.44, abs=0.05)


def simulate(
    n: int, r: float, alpha: float, a: float, b: float, T: float, t_future: float, seed: int = 0
):
    """Draw customers from the BG/NBD process; return (x, t_x, T, purchases in (T, T+t])."""
    rng = np.random.default_rng(seed)
    lam = rng.gamma(r, 1.0 / alpha, n)
    p = rng.beta(a, b, n)
    t = np.zeros(n)
    alive = np.ones(n, bool)
    x = np.zeros(n)
    t_x = np.zeros(n)
    future = np.zeros(n)
    end = T + t_future
    while alive.any():
        t = t + rng.exponential(1.0 / lam)
        ok = alive & (t <= end)
        cal = ok & (t <= T)
        x[cal] += 1
        t_x[cal] = t[cal]
        future[ok & (t > T)] += 1
        alive &= ok & (rng.random(n) >= p)  # after each purchase the customer may drop out
    return x, t_x, np.full(n, T), future


@pytest.mark.slow
def test_parameter_recovery_and_holdout_calibration() -> None:
    true = (0.5, 6.0, 0.8, 2.5)
    x, t_x, T, fut = simulate(20000, *true, T=40.0, t_future=30.0, seed=1)
    m = BGNBD().fit(x, t_x, T)
    assert m.params is not None
    for got, want in zip((m.params.r, m.params.alpha, m.params.a, m.params.b), true):
        assert got == pytest.approx(want, rel=0.15)
    # the conditional predictions agree with what the simulated customers then did
    e = m.expected_purchases(30.0, x, t_x, T)
    p0 = m.p_no_purchase(30.0, x, t_x, T)
    assert e.sum() == pytest.approx(fut.sum(), rel=0.05)
    assert p0.mean() == pytest.approx((fut == 0).mean(), abs=0.02)
    # and they rank: customers with the highest predicted churn buy less
    hi = p0 > np.quantile(p0, 0.8)
    lo = p0 < np.quantile(p0, 0.2)
    assert fut[hi].mean() < fut[lo].mean()
    pa = m.p_alive(x, t_x, T)
    assert ((pa >= 0) & (pa <= 1)).all() and (pa[x == 0] == 1).all()


def test_unfitted_model_refuses() -> None:
    with pytest.raises(ModelError):
        BGNBD().p_alive(np.array([1.0]), np.array([1.0]), np.array([2.0]))
