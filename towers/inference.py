"""The towers' inference API used by indexing, serving and segments.

:func:`load_run` opens a training run directory and returns a :class:`TrainedModel`:
item vectors for the index, content-only vectors for catalogue rows never seen in
training, an in-process :class:`UserEncoder` over :class:`~towers.sequences.SequenceBatch`
(the same feature path as training) and text queries embedded into the item space.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import polars as pl
import torch

from ecomrec.errors import MismatchError, ModelError, NotFoundError
from intake.dataset import Dataset, IdMap, id_map_hash
from towers.item_tower import build_item_features
from towers.model import Checkpoint, TwoTower, load_checkpoint
from towers.sequences import Interactions, SequenceBatch, batch_for_users
from towers.text_encoder import encode_texts, item_texts

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
MANIFEST_FILE = "manifest.json"
FINGERPRINT_FILE = "fingerprint.json"  # the training dataset's fingerprint (Dataset.fingerprint)


@runtime_checkable
class UserEncoder(Protocol):
    """Turns padded behaviour sequences into L2-normalised user vectors."""

    dim: int

    def encode(self, batch: SequenceBatch) -> np.ndarray:
        """(B, D) float32, L2-normalised."""
        ...


def batch_tensors(
    batch: SequenceBatch, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """The int64 tensors of a :class:`SequenceBatch` (the user tower's four inputs)."""
    return {
        "items": torch.as_tensor(batch.items, dtype=torch.long, device=device),
        "event_type": torch.as_tensor(batch.event_type, dtype=torch.long, device=device),
        "gap": torch.as_tensor(batch.gap, dtype=torch.long, device=device),
        "lengths": torch.as_tensor(batch.lengths, dtype=torch.long, device=device),
    }


class TorchUserEncoder:
    """In-process user encoder; the item table is computed once and reused."""

    def __init__(self, model: TwoTower, max_len: int) -> None:
        self.model = model
        self.max_len = max_len
        self.dim = model.dim
        dev = next(model.parameters()).device
        # The encoder owns an inference-mode model: eval is set once here, never toggled per
        # call (toggling is not thread-safe under concurrent requests and costs ~1.5 ms).
        model.eval()
        with torch.inference_mode():
            self._table = model.item_table()  # (N+1, D)
        self._device = dev

    @torch.inference_mode()
    def encode(self, batch: SequenceBatch) -> np.ndarray:
        """(B, D) float32 L2-normalised user vectors; empty sequences give zero vectors."""
        t = batch_tensors(batch, self._device)
        if t["items"].shape[1] > self.max_len:
            t = {k: (v[:, -self.max_len :] if v.dim() == 2 else v) for k, v in t.items()}
        u = self.model.encode(
            t["items"], t["event_type"], t["gap"], t["lengths"], table=self._table
        )
        u = u * (t["lengths"] > 0).unsqueeze(1).to(u.dtype)
        return u.float().cpu().numpy()


@torch.no_grad()
def score_users(
    model: TwoTower, users: np.ndarray, history: Interactions, max_len: int, batch_size: int = 1024
) -> np.ndarray:
    """(B, N+1) cosine scores of every item for ``users`` given their ``history``."""
    was = model.training
    model.eval()
    table = model.item_table()  # (N+1, D)
    vn = model.item_vectors(table)  # (N+1, D)
    out = []
    for s in range(0, len(users), batch_size):
        t = batch_tensors(batch_for_users(history, users[s : s + batch_size], max_len), vn.device)
        u = model.encode(t["items"], t["event_type"], t["gap"], t["lengths"], table=table)  # (b, D)
        out.append((u @ vn.T).float().cpu().numpy())  # (b, N+1)
    model.train(was)
    return np.concatenate(out) if out else np.zeros((0, model.n_items + 1), np.float32)


@dataclass
class TrainedModel:
    """A trained two-tower model loaded from a run directory."""

    run_dir: Path
    model_version: str
    config_hash: str
    max_len: int
    dim: int
    item_ids: IdMap
    model: TwoTower = field(repr=False)
    checkpoint: Checkpoint = field(repr=False)
    dataset_fingerprint: dict[str, object] | None = None  # None: a run from before issue 11

    @property
    def items_hash(self) -> str:
        """Hash of the item id map the model was trained with (its catalogue)."""
        return id_map_hash(self.item_ids.external_ids)

    def provenance(self) -> dict[str, object]:
        """What an artifact made from this model records: model id, catalogue, dataset."""
        return {
            "model_version": self.model_version,
            "model_items": self.items_hash,
            "run_dir": str(self.run_dir),
            "dataset": self.dataset_fingerprint or {},
        }

    def check_dataset(self, ds: Dataset, what: str) -> None:
        """Raise :class:`MismatchError` unless ``ds`` has the catalogue this model was trained on."""
        check_same_catalogue(
            self.item_ids.external_ids, ds, f"run {self.run_dir}", what, self.dataset_fingerprint
        )

    @torch.no_grad()
    def item_vectors(self) -> np.ndarray:
        """(n_items + 1, D) float32 L2-normalised item vectors; row 0 is zeros."""
        v = self.model.item_vectors().float().cpu().numpy()
        v[0] = 0.0
        return v

    @torch.no_grad()
    def embed_items(self, items: pl.DataFrame) -> np.ndarray:
        """(N, D) vectors for catalogue rows (canonical items frame), in frame order.

        Rows whose ``external_id`` was seen in training get their trained vector; others
        (new products) get the content-only vector from title/brand/category/price.
        """
        n = items.height
        out = np.zeros((n, self.dim), np.float32)
        if n == 0:
            return out
        ext = items["external_id"].cast(pl.Utf8).to_list()
        ids = [self.item_ids.get(e) for e in ext]
        trained = self.item_vectors()
        known = self.model.item_tower.known.cpu().numpy()
        cold = [i for i, x in enumerate(ids) if x is None or known[x] == 0]
        for i, x in enumerate(ids):
            if x is not None and known[x] > 0:
                out[i] = trained[x]
        cfg = self.model.item_cfg
        if cold and not (cfg.use_text or cfg.use_brand or cfg.use_category or cfg.use_price):
            # no content path (ids only, a factor or basket model): no vector to give them;
            # they stay zero and the index build leaves them out (indexing.build)
            log.info("%d catalogue rows without a trained vector (no product content)", len(cold))
            return out
        if cold:
            sub = items[cold].with_columns(
                pl.int_range(1, len(cold) + 1, dtype=pl.Int32).alias("item_id")
            )
            text = (
                encode_texts(item_texts(sub, cfg.text_fields), cfg.text_max_tokens)
                if cfg.use_text
                else None
            )
            f = build_item_features(sub, len(cold), text, vocab=self.checkpoint.vocab)
            it = self.model.item_tower
            v = it.content(
                it.reduce_text(torch.from_numpy(f.text[1:])),
                torch.from_numpy(f.brand[1:]),
                torch.from_numpy(f.category[1:]),
                torch.from_numpy(f.price[1:]),
            )  # (C, D)
            out[cold] = TwoTower.normalise(v).float().cpu().numpy()
        return out

    def user_encoder(self) -> UserEncoder:
        """The in-process torch user encoder."""
        return TorchUserEncoder(self.model, self.max_len)

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> np.ndarray:
        """(N, D) L2-normalised query vectors in item space via the item tower's text path."""
        if not self.model.item_cfg.use_text:
            raise ModelError("this model's item tower has no text path")
        emb = encode_texts(texts, self.model.item_cfg.text_max_tokens)  # (N, 384)
        it = self.model.item_tower
        z = torch.zeros(len(texts), dtype=torch.long)
        v = it.content(it.reduce_text(torch.from_numpy(emb)), z, z, z)
        return TwoTower.normalise(v).float().cpu().numpy()


def check_same_catalogue(
    model_items: list[str],
    ds: Dataset,
    source: str,
    what: str,
    fingerprint: dict[str, object] | None = None,
) -> None:
    """Raise :class:`MismatchError` when ``ds``'s item id map differs from ``model_items``."""
    if model_items == ds.item_ids.external_ids:
        return
    name = (fingerprint or {}).get("name", "?")
    shared = len(set(model_items) & set(ds.item_ids.external_ids))
    raise MismatchError(
        f"{what}: {source} was trained on another catalogue ({len(model_items):,} products, "
        f"items fingerprint {id_map_hash(model_items)}, dataset {name!r}) than dataset "
        f"{ds.name!r} ({ds.n_items:,} products, {ds.fingerprint()['items']}; {shared:,} ids in "
        f"common). Use the dataset the run was trained on, or train a run on this one "
        f"(ecomrec train --dataset ... --out NEW_RUN)"
    )


def read_run_fingerprint(run_dir: str | Path) -> dict[str, object] | None:
    """The training dataset's fingerprint recorded in a run directory, or None."""
    p = Path(run_dir) / FINGERPRINT_FILE
    if not p.exists():
        return None
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{p}: invalid JSON: {e}") from e
    fp = data.get("dataset") if isinstance(data, dict) else None
    return fp if isinstance(fp, dict) else None


SERVED_KEY = "served"  # manifest: {"kind": "two-tower" | "basket" | "als" | "ease", "path": ...}


def served_kind(run_dir: str | Path) -> str:
    """Which retriever a run serves (``two-tower`` unless a baseline won on validation)."""
    mf = Path(run_dir) / MANIFEST_FILE
    if not mf.exists():
        return "two-tower"
    return str(json.loads(mf.read_text()).get(SERVED_KEY, {}).get("kind", "two-tower"))


def _load_factor_run(d: Path, manifest: dict) -> TrainedModel:
    """A run whose served retriever is a baseline (``towers.factor.FactorTower``)."""
    from towers.factor import load_factor_tower
    from towers.user_tower import UserTowerConfig

    fm, item_ids, meta = load_factor_tower(d / manifest[SERVED_KEY]["path"])
    vocab: dict[str, list[str]] = {"brands": [], "categories": [], "price_edges": []}
    ck = Checkpoint(
        model=fm,  # type: ignore[arg-type]  # same interface as TwoTower (towers.factor)
        item_cfg=fm.item_cfg,
        user_cfg=UserTowerConfig(max_len=fm.cfg.max_len),
        item_ids=item_ids,
        vocab=vocab,
        meta={**manifest, **meta},
    )
    version = f"{manifest.get('model_version', d.name)}-{fm.cfg.kind}"
    return TrainedModel(
        run_dir=d,
        model_version=version,
        config_hash=str(manifest.get("config_hash", "")),
        max_len=fm.cfg.max_len,
        dim=fm.dim,
        item_ids=IdMap(item_ids),
        model=fm,  # type: ignore[arg-type]
        checkpoint=ck,
        dataset_fingerprint=read_run_fingerprint(d),
    )


def _load_basket_run(d: Path, manifest: dict) -> TrainedModel:
    """A run whose served retriever is the basket tower (``towers.basket.BasketServed``)."""
    from towers.basket import load_basket_served
    from towers.user_tower import UserTowerConfig

    bm, item_ids, meta = load_basket_served(d / manifest[SERVED_KEY]["path"])
    ck = Checkpoint(
        model=bm,  # type: ignore[arg-type]  # same interface as TwoTower (towers.basket)
        item_cfg=bm.item_cfg,
        user_cfg=UserTowerConfig(max_len=bm.max_len),
        item_ids=item_ids,
        vocab={"brands": [], "categories": [], "price_edges": []},
        meta={**manifest, **meta},
    )
    return TrainedModel(
        run_dir=d,
        model_version=f"{manifest.get('model_version', d.name)}-basket",
        config_hash=str(manifest.get("config_hash", "")),
        max_len=bm.max_len,
        dim=bm.dim,
        item_ids=IdMap(item_ids),
        model=bm,  # type: ignore[arg-type]
        checkpoint=ck,
        dataset_fingerprint=read_run_fingerprint(d),
    )


def load_run(run_dir: str | Path) -> TrainedModel:
    """Load the served model of a training run directory: the sequence two-tower
    checkpoint, the basket tower, or the baseline (ALS / EASE factor tower) that won on
    validation (``manifest.json`` ``served.kind``: ``two-tower``, ``basket``, ``als``,
    ``ease``). Every kind has the :class:`TwoTower` interface."""
    d = Path(run_dir)
    kind = served_kind(d)
    if kind == "basket":
        return _load_basket_run(d, json.loads((d / MANIFEST_FILE).read_text()))
    if kind != "two-tower":
        return _load_factor_run(d, json.loads((d / MANIFEST_FILE).read_text()))
    path = d / MODEL_FILE
    if not path.exists():
        raise NotFoundError(f"no trained model in {d} (missing {MODEL_FILE})")
    ck, _ = load_checkpoint(path)
    meta = ck.meta
    manifest = d / MANIFEST_FILE
    if manifest.exists():
        meta = {**json.loads(manifest.read_text()), **meta}
    return TrainedModel(
        run_dir=d,
        model_version=str(meta.get("model_version", d.name)),
        config_hash=str(meta.get("config_hash", "")),
        max_len=ck.user_cfg.max_len,
        dim=ck.item_cfg.dim,
        item_ids=IdMap(ck.item_ids),
        model=ck.model,
        checkpoint=ck,
        dataset_fingerprint=read_run_fingerprint(d),
    )
