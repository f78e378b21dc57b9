"""The retriever protocol every recommender implements (popularity, ALS, BPR, kNN, two-tower)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from towers.sequences import Interactions
from training.splits import Targets


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
