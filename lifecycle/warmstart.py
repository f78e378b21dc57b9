"""Carry a trained two-tower model over to a grown catalogue (warm start for a refresh).

A shop's catalogue grows between refreshes and the loaders number items in sorted
external-id order, so internal ids shift. :func:`transplant` builds a model over the NEW
catalogue whose weights come from the live checkpoint, matched by external id:

- user tower, text projection, brand/category/price embeddings: copied as they are (the
  live brand/category vocabulary is kept; brands/categories it never saw map to unknown);
- the live PCA basis of the text path is kept; items the live model knew keep their
  reduced text rows, new items are embedded with MiniLM (only the new ones) and reduced
  with the live basis;
- id embeddings of known items are copied; a NEW item's id embedding is initialised
  from its text path: the similarity-weighted mean of the id embeddings of its
  ``neighbours`` nearest known items in content space (``init_new_ids``), else left at
  zero with ``known = 0`` (the live model's cold-start behaviour: content only).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from towers.item_tower import build_item_features
from towers.model import Checkpoint, TwoTower
from towers.text_encoder import TEXT_DIM, encode_texts, item_texts

log = logging.getLogger(__name__)


@dataclass
class Transplant:
    """The carried-over model and what changed."""

    model: TwoTower
    vocab: dict[str, list[str]]
    new_items: np.ndarray  # (n_new,) internal ids (new catalogue) never seen by the live model
    old_of_new: np.ndarray  # (N+1,) live internal id of each new-catalogue id, 0 = new


def transplant(
    live: Checkpoint,
    items: pl.DataFrame,
    item_ids: list[str],
    counts: np.ndarray,
    *,
    init_new_ids: bool = True,
    neighbours: int = 5,
) -> Transplant:
    """The live model over the catalogue ``items`` (canonical frame, ids 1..N = ``item_ids``).

    ``counts`` (N+1,) interactions per new-catalogue item in the training data: items with
    interactions get (and train) an id embedding.
    """
    n = len(item_ids)
    old_index = {e: i + 1 for i, e in enumerate(live.item_ids)}
    old_of_new = np.zeros(n + 1, np.int64)
    old_of_new[1:] = [old_index.get(str(e), 0) for e in item_ids]
    lm = live.model
    cfg = live.item_cfg
    feats = build_item_features(items, n, None, vocab=live.vocab)
    model = TwoTower(cfg, live.user_cfg, n, feats)
    src = {k: v for k, v in lm.state_dict().items()}
    per_item = {
        "item_tower.id_emb.weight",
        "item_tower.text",
        "item_tower.brand",
        "item_tower.category",
        "item_tower.price",
        "item_tower.known",
    }
    dst = model.state_dict()
    for k, v in src.items():
        if k not in per_item and k in dst and dst[k].shape == v.shape:
            dst[k] = v.clone()
    have = old_of_new > 0  # (N+1,)
    it_old = lm.item_tower
    with torch.no_grad():
        # text: keep the live rows, embed only the new items, reduce with the live basis
        text = torch.zeros(n + 1, it_old.text_in)  # (N+1, k)
        text[have] = it_old.text[old_of_new[have]]
        new_ids = np.flatnonzero(~have)[1:] if len(have) else np.zeros(0, np.int64)
        new_ids = new_ids[new_ids > 0]
        if cfg.use_text and len(new_ids):
            sub = items.filter(pl.col("item_id").is_in(new_ids.tolist())).sort("item_id")
            raw = encode_texts(
                item_texts(sub, cfg.text_fields), cfg.text_max_tokens
            )  # (n_new, 384)
            assert raw.shape[1] == TEXT_DIM
            red = it_old.reduce_text(torch.from_numpy(raw))  # (n_new, k)
            text[sub["item_id"].to_numpy()] = red
        dst["item_tower.text"] = text
        dst["item_tower.brand"] = torch.from_numpy(feats.brand)
        dst["item_tower.category"] = torch.from_numpy(feats.category)
        dst["item_tower.price"] = torch.from_numpy(feats.price)
        known = torch.zeros(n + 1)
        old_known = it_old.known
        known[have] = old_known[old_of_new[have]]
        if cfg.use_id and it_old.id_emb is not None:
            emb = torch.zeros(n + 1, cfg.dim)
            emb[have] = it_old.id_emb.weight[old_of_new[have]]
            dst["item_tower.id_emb.weight"] = emb
        known = torch.maximum(known, torch.as_tensor(counts > 0, dtype=torch.float32))
        known[0] = 0.0
        dst["item_tower.known"] = known
        model.load_state_dict(dst)
        if cfg.use_id and model.item_tower.id_emb is not None and len(new_ids):
            _init_new_ids(model, new_ids, known, neighbours if init_new_ids else 0)
    model.train()
    log.info("warm start: %d items (%d carried over, %d new)", n, int(have[1:].sum()), len(new_ids))
    return Transplant(model, live.vocab, new_ids.astype(np.int64), old_of_new)


@torch.no_grad()
def _init_new_ids(model: TwoTower, new_ids: np.ndarray, known: torch.Tensor, k: int) -> None:
    """Id embeddings of new items from the id embeddings of their nearest known items in
    content space (cosine of the content-only vectors), weighted by similarity."""
    it = model.item_tower
    assert it.id_emb is not None
    old = torch.from_numpy(np.flatnonzero(known.numpy() > 0))
    old = old[~torch.isin(old, torch.from_numpy(new_ids))]
    if k <= 0 or len(old) == 0:
        return
    content = TwoTower.normalise(it.content(it.text, it.brand, it.category, it.price))  # (N+1, D)
    q = content[torch.from_numpy(new_ids)]  # (n_new, D)
    sims = q @ content[old].T  # (n_new, n_old)
    top = torch.topk(sims, min(k, len(old)), dim=1)
    w = torch.softmax(top.values / 0.1, dim=1)  # (n_new, k)
    neigh = it.id_emb.weight[old[top.indices]]  # (n_new, k, D)
    it.id_emb.weight[torch.from_numpy(new_ids)] = (w.unsqueeze(2) * neigh).sum(1)
