"""The retriever protocol every recommender implements (popularity, ALS, BPR, kNN, two-tower)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ecomrec.config import to_dict
from ecomrec.errors import ModelError
from towers.sequences import Interactions
from training.splits import Targets

#: The file naming a saved retriever's kind and config (beside its weights).
RETRIEVER_FILE = "retriever.json"


@runtime_checkable
class Retriever(Protocol):
    """Fit on a split's history, score users against the whole catalogue, save and load.

    ``refit_on_train_valid``: collaborative-filtering models are refit on train+validation
    (hyperparameters chosen on validation) before the test; sequential models are not,
    they read train+validation as their input sequence.
    """

    name: str
    refit_on_train_valid: bool

    def fit(self, train: Interactions, valid: Targets | None = None) -> None:
        """Learn from ``train``; a model with early stopping may use ``valid``."""
        ...

    def score(self, users: np.ndarray, history: Interactions) -> np.ndarray:
        """(B, n_items + 1) float32 scores of every item for ``users``; column 0 is ignored."""
        ...

    def save(self, path: Path) -> None:
        """Write everything needed to score again (config included) under directory ``path``."""
        ...


def write_retriever_meta(path: Path, kind: str, config: Any, **extra: Any) -> None:
    """``path/retriever.json``: ``{"kind", "config", **extra}`` (creates ``path``)."""
    path.mkdir(parents=True, exist_ok=True)
    meta = {"kind": kind, "config": to_dict(config), **extra}
    (path / RETRIEVER_FILE).write_text(json.dumps(meta, indent=2))


def read_retriever_meta(path: Path, kind: str) -> dict[str, Any]:
    """The ``retriever.json`` of a retriever of ``kind`` saved in ``path``; a
    :class:`ModelError` when there is none or it holds another kind."""
    meta_path = path / RETRIEVER_FILE
    if not meta_path.exists():
        raise ModelError(f"no saved retriever in {path}")
    meta = json.loads(meta_path.read_text())
    if meta.get("kind") != kind:
        raise ModelError(f"{path} holds a {meta.get('kind')!r} model, not {kind!r}")
    return dict(meta)
