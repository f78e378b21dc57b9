"""The two-tower model (item tower + user tower, cosine similarity) and its checkpoint format.

Scores are cosine similarities: item vectors and user vectors are both L2-normalised,
so the same vectors serve training (divided by a temperature), the vector index
(cosine distance) and serving. Item-tower vectors are also the user tower's inputs
(tied input/output item representations).

A checkpoint file holds the weights, every config, the content vocabularies, the
external item ids and the validation metrics, so :func:`load_checkpoint` rebuilds the
model without any other file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ecomrec.config import from_dict, to_dict
from ecomrec.errors import ModelError, NotFoundError
from towers.item_tower import ItemFeatures, ItemTower, ItemTowerConfig
from towers.text_encoder import TEXT_DIM
from towers.user_tower import UserTower, UserTowerConfig

__all__ = [
    "Checkpoint",
    "ItemTowerConfig",
    "TwoTower",
    "UserTowerConfig",
    "load_checkpoint",
    "save_checkpoint",
]


class TwoTower(nn.Module):
    """Item tower + user tower; ``encode`` is the one path from a padded batch to user vectors."""

    def __init__(
        self,
        item_cfg: ItemTowerConfig,
        user_cfg: UserTowerConfig,
        n_items: int,
        feats: ItemFeatures,
    ) -> None:
        super().__init__()
        self.item_cfg = item_cfg
        self.user_cfg = user_cfg
        self.n_items = n_items
        self.item_tower = ItemTower(item_cfg, n_items, feats)
        self.user_tower = UserTower(user_cfg, item_cfg.dim)

    @property
    def dim(self) -> int:
        return self.item_cfg.dim

    def item_table(self) -> torch.Tensor:
        """(N+1, D) fused item vectors before normalisation (user-tower inputs)."""
        return self.item_tower()

    @staticmethod
    def normalise(x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x, dim=-1, eps=1e-12)

    def item_vectors(self, table: torch.Tensor | None = None) -> torch.Tensor:
        """(N+1, D) L2-normalised item vectors; row 0 stays zero."""
        t = self.item_table() if table is None else table
        return self.normalise(t)

    def sequence_hidden(
        self,
        table: torch.Tensor,  # (N+1, D)
        items: torch.Tensor,  # (B, T)
        event_type: torch.Tensor,  # (B, T)
        gap: torch.Tensor,  # (B, T)
        lengths: torch.Tensor,  # (B,)
    ) -> torch.Tensor:
        """(B, T, D) hidden state of every position (training: every position predicts)."""
        return self.user_tower.hidden_states(table[items], event_type, gap, lengths)

    def encode(
        self,
        items: torch.Tensor,  # (B, T) int64
        event_type: torch.Tensor,  # (B, T) int64
        gap: torch.Tensor,  # (B, T) int64
        lengths: torch.Tensor,  # (B,) int64
        table: torch.Tensor | None = None,  # (N+1, D)
    ) -> torch.Tensor:
        """(B, D) L2-normalised user vectors."""
        t = self.item_table() if table is None else table
        u = self.user_tower(t[items], event_type, gap, lengths)  # (B, D)
        return self.normalise(u)


@dataclass
class Checkpoint:
    """Everything needed to rebuild and use a trained model."""

    model: TwoTower
    item_cfg: ItemTowerConfig
    user_cfg: UserTowerConfig
    item_ids: list[str]  # external item ids in internal-id order (padding excluded)
    vocab: dict[str, list[str]]
    meta: dict[str, Any] = field(default_factory=dict)  # run config, metrics, epoch, timings


def save_checkpoint(
    path: str | Path,
    model: TwoTower,
    item_ids: list[str],
    vocab: dict[str, list[str]],
    meta: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> None:
    """Atomically write a checkpoint file (``extra`` e.g. optimizer state for resuming)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "format": "ecomrec-two-tower/1",
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "item_cfg": to_dict(model.item_cfg),
        "user_cfg": to_dict(model.user_cfg),
        "n_items": model.n_items,
        "item_ids": list(item_ids),
        "vocab": vocab,
        "meta": meta,
        "extra": extra or {},
    }
    tmp = p.with_suffix(p.suffix + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(p)


def load_checkpoint(
    path: str | Path, with_extra: bool = False
) -> tuple[Checkpoint, dict[str, Any]]:
    """Rebuild the model of a checkpoint file (eval mode, CPU)."""
    p = Path(path)
    if not p.exists():
        raise NotFoundError(f"no checkpoint at {p}")
    try:
        blob = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types on a corrupt file
        raise ModelError(f"cannot read checkpoint {p}: {e}") from e
    if blob.get("format") != "ecomrec-two-tower/1":
        raise ModelError(f"{p} is not an ecomrec two-tower checkpoint")
    item_cfg = from_dict(ItemTowerConfig, blob["item_cfg"])
    user_cfg = from_dict(UserTowerConfig, blob["user_cfg"])
    n = int(blob["n_items"])
    feats = ItemFeatures(
        text=np.zeros((n + 1, TEXT_DIM), np.float32),
        brand=np.zeros(n + 1, np.int64),
        category=np.zeros(n + 1, np.int64),
        price=np.zeros(n + 1, np.int64),
        vocab=blob["vocab"],
    )
    model = TwoTower(item_cfg, user_cfg, n, feats)
    model.load_state_dict(blob["state_dict"])
    model.eval()
    ck = Checkpoint(model, item_cfg, user_cfg, blob["item_ids"], blob["vocab"], blob["meta"])
    return ck, (blob["extra"] if with_extra else {})
