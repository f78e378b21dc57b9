"""BG/NBD (Fader, Hardie & Lee 2005) and Gamma-Gamma spend models, in numpy/scipy.

The classical "buy till you die" baseline for churn and customer value:

* :func:`transaction_summary` turns a canonical events frame into the per-customer
  ``(frequency x, recency t_x, age T, mean repeat value)`` summary at a cutoff, in a
  chosen time unit (weeks for CDNOW, as in the paper).
* :class:`BGNBD` fits ``r, alpha, a, b`` by maximum likelihood and gives P(alive),
  the expected number of purchases in the next ``t`` units, and the probability of
  no purchase in the next ``t`` units (our churn probability).
* :class:`GammaGamma` fits ``p, q, v`` on repeat customers' mean transaction value
  and gives the conditional expected value per transaction.

Conventions (those of the paper and of the Lifetimes summaries shipped with CDNOW):
purchases are aggregated per calendar day (UTC); ``x`` counts purchase days after the
first one; ``t_x`` is first-to-last purchase day; ``T`` is first purchase day to the
last calibration day (the day before the cutoff).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import polars as pl

from ecomrec.errors import DataError, ModelError

log = logging.getLogger(__name__)

DAY = 86400


def transaction_summary(
    events: pl.DataFrame, cutoff_ts: int, *, time_unit_days: float = 7.0
) -> pl.DataFrame:
    """Per-customer BG/NBD summary of the purchases strictly before ``cutoff_ts``.

    Returns ``user_id, frequency, recency, T, monetary_value, first_value`` with times in
    units of ``time_unit_days`` days; ``monetary_value`` is the mean value of the repeat
    purchase days (0 when ``frequency`` is 0). Customers with no purchase before the
    cutoff are absent. Returns are ignored (BG/NBD models purchase occasions).
    """
    if time_unit_days <= 0:
        raise DataError(f"time_unit_days must be > 0, got {time_unit_days}")
    cutoff_day = int(cutoff_ts) // DAY
    days = (
        events.filter((pl.col("event_type") == "purchase") & (pl.col("ts") < cutoff_ts))
        .with_columns(
            (pl.col("ts") // DAY).alias("day"),
            (pl.col("quantity").cast(pl.Float64) * pl.col("price").fill_null(0.0)).alias("value"),
        )
        .group_by(["user_id", "day"])
        .agg(pl.col("value").sum())
        .sort(["user_id", "day"])
    )
    last_day = cutoff_day - 1
    out = (
        days.group_by("user_id", maintain_order=True)
        .agg(
            (pl.len() - 1).alias("frequency"),
            (pl.col("day").max() - pl.col("day").min()).alias("recency_days"),
            (pl.lit(last_day) - pl.col("day").min()).alias("T_days"),
            pl.col("value").first().alias("first_value"),
            pl.col("value").slice(1).mean().alias("monetary_value"),
        )
        .with_columns(
            pl.col("frequency").cast(pl.Int64),
            (pl.col("recency_days") / time_unit_days).alias("recency"),
            (pl.col("T_days") / time_unit_days).alias("T"),
            pl.col("monetary_value").fill_null(0.0),
        )
        .select(["user_id", "frequency", "recency", "T", "monetary_value", "first_value"])
        .sort("user_id")
    )
    return out


def _arrays(x: np.ndarray, t_x: np.ndarray, T: np.ndarray) -> tuple[np.ndarray, ...]:
    x = np.asarray(x, dtype=np.float64)
    t_x = np.asarray(t_x, dtype=np.float64)
    T = np.asarray(T, dtype=np.float64)
    if not (x.shape == t_x.shape == T.shape):
        raise DataError("frequency, recency and T must have the same shape")
    if np.any(x < 0) or np.any(t_x < 0) or np.any(t_x > T + 1e-9):
        raise DataError("need frequency >= 0 and 0 <= recency <= T")
    return x, t_x, T


@dataclass(frozen=True)
class BGNBDParams:
    """Fitted BG/NBD parameters: purchase-rate Gamma(r, alpha), dropout Beta(a, b)."""

    r: float
    alpha: float
    a: float
    b: float
    log_likelihood: float


class BGNBD:
    """Beta-geometric / negative-binomial model of repeat purchasing (Fader, Hardie & Lee 2005)."""

    def __init__(self, params: BGNBDParams | None = None) -> None:
        self.params = params

    # --- likelihood ---------------------------------------------------------------
    @staticmethod
    def log_likelihood_terms(
        r: float, alpha: float, a: float, b: float, x: np.ndarray, t_x: np.ndarray, T: np.ndarray
    ) -> np.ndarray:
        """(n,) per-customer log-likelihood (equation 6 of the paper, in log space)."""
        from scipy import special  # lazy: scipy costs ~1 s to import

        a1 = special.gammaln(r + x) - special.gammaln(r) + r * np.log(alpha)
        a2 = (
            special.gammaln(a + b)
            + special.gammaln(b + x)
            - special.gammaln(b)
            - special.gammaln(a + b + x)
        )
        a3 = -(r + x) * np.log(alpha + T)
        with np.errstate(divide="ignore", invalid="ignore"):
            a4 = np.where(
                x > 0,
                np.log(a) - np.log(np.maximum(b + x - 1, 1e-300)) - (r + x) * np.log(alpha + t_x),
                -np.inf,
            )
        return np.asarray(a1 + a2 + np.logaddexp(a3, a4))

    def fit(
        self,
        frequency: np.ndarray,
        recency: np.ndarray,
        T: np.ndarray,
        *,
        init: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
    ) -> BGNBD:
        """Maximum-likelihood fit over log-parameters (L-BFGS-B, then Nelder-Mead polish)."""
        from scipy import optimize  # lazy: scipy costs ~1 s to import

        x, t_x, TT = _arrays(frequency, recency, T)
        if len(x) == 0:
            raise ModelError("cannot fit BG/NBD on zero customers")

        def nll(theta: np.ndarray) -> float:
            r, alpha, a, b = np.exp(np.clip(theta, -30, 30))
            ll = self.log_likelihood_terms(r, alpha, a, b, x, t_x, TT)
            val = -float(ll.sum())
            return val if np.isfinite(val) else 1e300

        theta0 = np.log(np.asarray(init, dtype=np.float64))
        res = optimize.minimize(nll, theta0, method="L-BFGS-B")
        res2 = optimize.minimize(
            nll,
            res.x,
            method="Nelder-Mead",
            options={"xatol": 1e-8, "fatol": 1e-10, "maxiter": 4000},
        )
        best = res2 if res2.fun <= res.fun else res
        r, alpha, a, b = (float(v) for v in np.exp(best.x))
        self.params = BGNBDParams(r, alpha, a, b, -float(best.fun))
        log.info("BG/NBD fit: %s", self.params)
        return self

    def _p(self) -> BGNBDParams:
        if self.params is None:
            raise ModelError("BG/NBD model is not fitted")
        return self.params

    # --- predictions --------------------------------------------------------------
    def _dead_ratio(self, x: np.ndarray, t_x: np.ndarray, T: np.ndarray) -> np.ndarray:
        """L(dead at t_x) / L(alive at T): 0 for customers without repeat purchases."""
        p = self._p()
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = (
                p.a
                / np.maximum(p.b + x - 1, 1e-300)
                * np.exp((p.r + x) * (np.log(p.alpha + T) - np.log(p.alpha + t_x)))
            )
        return np.where(x > 0, ratio, 0.0)

    def p_alive(self, frequency: np.ndarray, recency: np.ndarray, T: np.ndarray) -> np.ndarray:
        """(n,) P(customer still active at T | x, t_x, T)."""
        x, t_x, TT = _arrays(frequency, recency, T)
        return np.asarray(1.0 / (1.0 + self._dead_ratio(x, t_x, TT)))

    def p_no_purchase(
        self, t: float, frequency: np.ndarray, recency: np.ndarray, T: np.ndarray
    ) -> np.ndarray:
        """(n,) P(no purchase in (T, T + t] | history): the BG/NBD churn probability.

        Dead customers never buy; an alive one with rate lambda ~ Gamma(r + x, alpha + T)
        buys nothing for t units with probability ((alpha+T)/(alpha+T+t))^(r+x) (dropout
        happens only right after a purchase, so no purchase also means no dropout).
        """
        p = self._p()
        x, t_x, TT = _arrays(frequency, recency, T)
        pa = 1.0 / (1.0 + self._dead_ratio(x, t_x, TT))
        stay_quiet = np.exp((p.r + x) * (np.log(p.alpha + TT) - np.log(p.alpha + TT + t)))
        return np.asarray((1.0 - pa) + pa * stay_quiet)

    def expected_purchases(
        self, t: float, frequency: np.ndarray, recency: np.ndarray, T: np.ndarray
    ) -> np.ndarray:
        """(n,) E[number of purchases in (T, T + t] | history] (equation 10 of the paper)."""
        from scipy import special  # lazy: scipy costs ~1 s to import

        p = self._p()
        x, t_x, TT = _arrays(frequency, recency, T)
        z = t / (p.alpha + TT + t)
        hyp = special.hyp2f1(p.r + x, p.b + x, p.a + p.b + x - 1, z)
        head = (p.a + p.b + x - 1) / (p.a - 1)
        tail = 1.0 - np.exp((p.r + x) * (np.log(p.alpha + TT) - np.log(p.alpha + TT + t))) * hyp
        return np.asarray(head * tail / (1.0 + self._dead_ratio(x, t_x, TT)))


@dataclass(frozen=True)
class GammaGammaParams:
    """Fitted Gamma-Gamma spend parameters (Fader, Hardie & Lee 2005b)."""

    p: float
    q: float
    v: float
    log_likelihood: float


class GammaGamma:
    """Gamma-Gamma model of the mean transaction value of repeat customers."""

    def __init__(self, params: GammaGammaParams | None = None) -> None:
        self.params = params

    @staticmethod
    def log_likelihood_terms(
        p: float, q: float, v: float, x: np.ndarray, m: np.ndarray
    ) -> np.ndarray:
        """(n,) log density of the mean value ``m`` of ``x >= 1`` transactions."""
        from scipy import special  # lazy: scipy costs ~1 s to import

        return np.asarray(
            special.gammaln(p * x + q)
            - special.gammaln(p * x)
            - special.gammaln(q)
            + q * np.log(v)
            + (p * x - 1) * np.log(m)
            + p * x * np.log(x)
            - (p * x + q) * np.log(v + m * x)
        )

    def fit(self, frequency: np.ndarray, monetary_value: np.ndarray) -> GammaGamma:
        """Fit on customers with ``frequency > 0`` and positive mean value (others ignored)."""
        from scipy import optimize  # lazy: scipy costs ~1 s to import

        x = np.asarray(frequency, dtype=np.float64)
        m = np.asarray(monetary_value, dtype=np.float64)
        keep = (x > 0) & (m > 0)
        x, m = x[keep], m[keep]
        if len(x) < 3:
            raise ModelError("Gamma-Gamma needs at least 3 repeat customers with positive value")

        def nll(theta: np.ndarray) -> float:
            p, q, v = np.exp(np.clip(theta, -30, 30))
            val = -float(self.log_likelihood_terms(p, q, v, x, m).sum())
            return val if np.isfinite(val) else 1e300

        res = optimize.minimize(nll, np.zeros(3), method="L-BFGS-B")
        res2 = optimize.minimize(
            nll,
            res.x,
            method="Nelder-Mead",
            options={"xatol": 1e-8, "fatol": 1e-10, "maxiter": 4000},
        )
        best = res2 if res2.fun <= res.fun else res
        p, q, v = (float(t) for t in np.exp(best.x))
        self.params = GammaGammaParams(p, q, v, -float(best.fun))
        log.info("Gamma-Gamma fit: %s", self.params)
        return self

    def expected_value(self, frequency: np.ndarray, monetary_value: np.ndarray) -> np.ndarray:
        """(n,) E[mean transaction value | x, m]; the population mean for ``x == 0``."""
        if self.params is None:
            raise ModelError("Gamma-Gamma model is not fitted")
        p, q, v = self.params.p, self.params.q, self.params.v
        x = np.asarray(frequency, dtype=np.float64)
        m = np.asarray(monetary_value, dtype=np.float64)
        pop = p * v / (q - 1) if q > 1 else float(np.mean(m[x > 0])) if np.any(x > 0) else 0.0
        cond = (p * (v + x * m)) / (p * x + q - 1)
        return np.asarray(np.where(x > 0, cond, pop))


def expected_spend(bgnbd: BGNBD, gg: GammaGamma, t: float, summary: pl.DataFrame) -> np.ndarray:
    """(n,) expected spend in the next ``t`` units: E[purchases] x E[value per purchase]."""
    x = summary["frequency"].to_numpy().astype(np.float64)
    n = bgnbd.expected_purchases(t, x, summary["recency"].to_numpy(), summary["T"].to_numpy())
    val = gg.expected_value(x, summary["monetary_value"].to_numpy())
    return np.asarray(n * val)
