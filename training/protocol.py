"""The benchmark protocol: choose hyperparameters on validation, then test honestly.

CF models (``refit_on_train_valid``): every grid point is fit on ``train`` and scored on
the validation targets; the best (by validation NDCG@10) is refit on ``train_valid`` and
tested with ``train_valid`` as history. Sequential models are fit once (their own early
stopping uses validation) and read ``train_valid`` as the input sequence at test time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ecomrec.config import to_dict
from training.evaluation import evaluate
from training.retriever import Retriever
from training.splits import Split

log = logging.getLogger(__name__)

SELECT_METRIC = "ndcg@10"


@dataclass
class ModelResult:
    name: str
    config: dict[str, Any]
    test: dict[str, float]
    valid: dict[str, float]
    train_seconds: float
    eval_seconds: float
    grid: list[dict[str, Any]] = field(default_factory=list)


def _validation_split(model: Retriever, split: Split) -> Split:
    """The split ``model`` trains and validates on: a model may validate on a sample of
    users and train on the others' validation events (TwoTowerRetriever.validation_split);
    test targets and history are the same either way."""
    own = getattr(model, "validation_split", None)
    return own(split) if own is not None else split


def run_protocol(
    name: str,
    make: Callable[[dict[str, Any]], Retriever],
    grid: list[dict[str, Any]],
    split: Split,
    ks: tuple[int, ...] = (5, 10, 20),
    progress: bool = True,
) -> ModelResult:
    """Fit, select on validation, (refit,) and test one model family."""
    best: tuple[float, dict[str, Any], dict[str, float]] | None = None
    tried = []
    train_seconds = 0.0
    model: Retriever | None = None
    # buy-again protocol: history items stay rankable (repurchases are targets too)
    exclude = bool(split.protocol.get("exclude_seen", True))
    for params in grid:
        t0 = time.perf_counter()
        model = make(params)
        vsplit = _validation_split(model, split)
        model.fit(vsplit.train, vsplit.valid)
        dt = time.perf_counter() - t0
        train_seconds += dt
        v = evaluate(
            model.score,
            vsplit.valid,
            vsplit.train,
            ks,
            exclude_seen=exclude,
            progress=progress,
            desc=f"{name} valid",
        )
        tried.append(
            {"params": params, "valid_" + SELECT_METRIC: v[SELECT_METRIC], "fit_seconds": dt}
        )
        log.info("%s %s valid %s=%.4f (%.1fs)", name, params, SELECT_METRIC, v[SELECT_METRIC], dt)
        if best is None or v[SELECT_METRIC] > best[0]:
            best = (v[SELECT_METRIC], params, v)
    assert best is not None and model is not None
    _, params, valid = best
    t0 = time.perf_counter()
    final = make(params)
    if final.refit_on_train_valid:
        final.fit(split.train_valid, None)
    elif params is grid[-1]:
        final = model  # sequential model: the last one fitted is the chosen one
    else:
        vsplit = _validation_split(final, split)
        final.fit(vsplit.train, vsplit.valid)
    refit_seconds = time.perf_counter() - t0
    test = evaluate(
        final.score,
        split.test,
        split.train_valid,
        ks,
        exclude_seen=exclude,
        progress=progress,
        desc=f"{name} test",
    )
    cfg = getattr(final, "config", None)
    return ModelResult(
        name=name,
        config=to_dict(cfg)
        if cfg is not None and hasattr(cfg, "__dataclass_fields__")
        else dict(params),
        test=test,
        valid=valid,
        train_seconds=train_seconds + refit_seconds,
        eval_seconds=test["eval_seconds"],
        grid=tried,
    )


def with_params(config: Any, params: dict[str, Any]) -> Any:
    """A copy of a frozen config with ``params`` replaced."""
    return replace(config, **params)


def is_transaction_log(dataset: Any) -> bool:
    """True for a shop's invoice log rather than a review/click stream, from the data's
    shape only (no dataset names, ids or dates): the events carry invoice numbers (the
    Online Retail columns), or purchases come in baskets: >= 3 items per (customer,
    timestamp) on average, or >= 1.5 with times of day (review logs such as the Amazon
    S3-Rec files have day-granular timestamps, so same-day reviews look like small
    baskets: Beauty 1.64 items per (customer, day); Online Retail 21.6 per invoice)."""
    ev = getattr(dataset, "events", None)
    if ev is None or ev.height == 0:
        return False
    if "InvoiceNo" in ev.columns:
        return True
    pur = ev.filter(ev["event_type"] == "purchase")
    if pur.height == 0:
        return False
    per_basket = pur.height / max(pur.select(["user_id", "ts"]).unique().height, 1)
    time_of_day = float((pur["ts"] % 86400 != 0).mean() or 0.0) > 0.5
    return per_basket >= 3.0 or (per_basket >= 1.5 and time_of_day)


def model_family(
    spec: str,
    dataset: Any = None,
    protocol: str = "new-items",
    tower_overrides: dict[str, Any] | None = None,
) -> tuple[str, Callable[[dict[str, Any]], Retriever], list[dict[str, Any]]]:
    """``popularity``, ``personal-top``, ``als``, ``bpr``, ``itemknn``, ``ease`` or
    ``two-tower[:CONFIG.toml | :basket | :sequence]`` -> (name, factory from grid params, grid).

    ``two-tower`` is the sequence transformer (:mod:`training.two_tower`) except on
    transaction logs (:func:`is_transaction_log`), where it is the basket tower
    (:mod:`training.basket`; ``two-tower:sequence`` / ``two-tower:basket`` force one).
    ``protocol="buy-again"`` trains the basket tower with repurchases as targets.
    ``tower_overrides`` (nested, as ``ecomrec train --set``) apply to the sequence tower's
    run config."""
    from ecomrec.config import from_dict
    from ecomrec.errors import ConfigError
    from training.baselines import BASELINES

    name, _, arg = spec.partition(":")
    if name in BASELINES:
        cls, cfg_cls = BASELINES[name]
        return name, (lambda p: cls(from_dict(cfg_cls, p))), list(cls.grid)
    if name == "two-tower":
        if arg == "basket" or (not arg and is_transaction_log(dataset)):
            from training.basket import BasketRetriever

            return name, basket_factory(protocol), list(BasketRetriever.grid)
        from training.two_tower import TwoTowerRetriever

        cfg_path = None if arg in ("", "sequence") else arg
        return (
            name,
            (lambda p: TwoTowerRetriever.for_dataset(dataset, cfg_path, overrides=tower_overrides)),
            [{}],
        )
    raise ConfigError(f"unknown model {spec!r}; known: {sorted(BASELINES)} and two-tower[:CONFIG]")


def basket_factory(
    protocol: str = "new-items", **overrides: Any
) -> Callable[[dict[str, Any]], Retriever]:
    """Factory of :class:`training.basket.BasketRetriever` for :func:`run_protocol`: the
    model fitted with validation picks its best epoch; the refit on train+validation that
    follows trains exactly that many epochs (as the CF baselines are refit)."""
    import json

    from ecomrec.config import from_dict
    from training.basket import BasketRetriever, BasketTrainConfig

    fitted: dict[str, BasketRetriever] = {}  # grid point -> the model fitted with validation
    targets = "all" if protocol == "buy-again" else "new"

    def make(params: dict[str, Any]) -> Retriever:
        cfg = from_dict(BasketTrainConfig, {"targets": targets, **overrides, **params})
        r = BasketRetriever(cfg)
        key = json.dumps(params, sort_keys=True)
        if key in fitted:
            r.refit_epochs = fitted[key].best_epoch
            r.refit_mix = fitted[key].mix
        else:
            fitted[key] = r
        return r

    return make
