"""Wire a :class:`~serving.engine.Recommender` from a run directory, a dataset and an index.

Shared by ``ecomrec serve``, the demo, the load benchmark and the tests, so every entry
point serves the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from indexing.base import ItemIndex
from serving.audience import UserVectors
from serving.catalog import ItemCatalog, SegmentPopularity
from serving.config import ServeConfig
from serving.discovery import discovery_parts
from serving.encoders import (
    FallbackEncoder,
    InProcessEncoder,
    MicroBatchingEncoder,
    OnnxEncoder,
    TowerEncoder,
    TritonEncoder,
)
from serving.engine import Recommender
from serving.history import EmbeddedHistoryStore, to_batch
from serving.observability import Metrics
from serving.rerank import RerankPolicies
from serving.segments import NoSegments, SegmentLookup

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    """What a service needs, loaded once."""

    model: Any  # towers.inference.TrainedModel
    dataset: Any  # intake.dataset.Dataset
    history: EmbeddedHistoryStore
    catalog: ItemCatalog


def load_parts(run_dir: str | Path, dataset: Any) -> Loaded:
    """Load the trained model and build the history store and catalogue of ``dataset``."""
    from ecomrec.errors import ModelError
    from towers.inference import load_run

    model = load_run(run_dir)
    if model.item_ids.external_ids != dataset.item_ids.external_ids:
        raise ModelError(f"model {run_dir} was trained on another catalogue than {dataset.name}")
    model.model.eval()  # once: encoders run concurrently and must never toggle train mode
    n_items = len(dataset.item_ids)
    hist = EmbeddedHistoryStore.from_events(dataset.events, len(dataset.users), n_items)
    catalog = ItemCatalog.from_items(dataset.items, n_items)
    return Loaded(model, dataset, hist, catalog)


def build_encoder(cfg: ServeConfig, model: Any) -> Any:
    """In-process encoder, or Triton with the in-process tower as fallback."""
    if cfg.encoder == "onnx":
        onnx = OnnxEncoder.from_run(str(model.run_dir), model.dim)
        return (
            MicroBatchingEncoder(onnx, cfg.batch_max, cfg.batch_wait_ms / 1e3)
            if cfg.batch_max > 1
            else onnx
        )
    if cfg.quantize == "int8":
        from serving.encoders import quantize_int8

        local = InProcessEncoder(quantize_int8(model), name="inprocess-int8")
    else:
        local = InProcessEncoder(TowerEncoder(model.model, model.max_len))
    if cfg.batch_max > 1:
        local = MicroBatchingEncoder(local, cfg.batch_max, cfg.batch_wait_ms / 1e3)  # type: ignore[assignment]
    if cfg.encoder == "inprocess":
        return local
    triton = TritonEncoder(
        cfg.triton_url,
        cfg.triton_model,
        model.max_len,
        dim=model.dim,
        timeout_s=cfg.triton_timeout_s,
    )
    return FallbackEncoder(triton, local if cfg.fallback_to_inprocess else None)


def all_user_vectors(
    encoder: Any, history: EmbeddedHistoryStore, max_len: int, batch: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """(user ids (N,), vectors (N, D)) for every user with a history."""
    users = history.users()
    out = []
    for s in range(0, len(users), batch):
        hs = [history.get(int(u)) for u in users[s : s + batch]]
        out.append(np.asarray(encoder.encode(to_batch(hs, max_len)), np.float32))
    vecs = np.concatenate(out) if out else np.zeros((0, encoder.dim), np.float32)
    return users, vecs


def build_recommender(
    cfg: ServeConfig,
    parts: Loaded,
    index: ItemIndex | None,
    segments: SegmentLookup | None = None,
    policies: RerankPolicies | None = None,
    metrics: Metrics | None = None,
    encoder: Any | None = None,
) -> Recommender:
    """The engine over loaded parts."""
    segments = segments or NoSegments()
    # ServeConfig checked that a configured file exists; "" means re-ranking off
    policies = policies or (
        RerankPolicies.load(cfg.rerank_policies) if cfg.rerank_policies else RerankPolicies()
    )
    inter = parts.history.inter
    seg_of: dict[int, str] = {}
    for u in parts.history.users().tolist():
        s = segments.user(u)
        if s is not None and (s.rfm or s.behavioural):
            seg_of[u] = str(s.rfm or s.behavioural)
    popularity = SegmentPopularity.from_histories(
        inter.user_of_row(), inter.items.astype(np.int64), inter.n_items, seg_of, inter.event_type
    )
    enc = encoder if encoder is not None else build_encoder(cfg, parts.model)
    model = parts.model
    local = InProcessEncoder(TowerEncoder(model.model, model.max_len))
    text = None
    if getattr(model.model.item_cfg, "use_text", False):
        text = model.embed_text
    complements, product_search = discovery_parts(cfg, parts)  # built on first use
    engine = Recommender(
        cfg=cfg,
        model_version=model.model_version,
        max_len=model.max_len,
        users=parts.dataset.users,
        items=parts.dataset.item_ids,
        encoder=enc,
        index=index,
        history=parts.history,
        catalog=parts.catalog,
        segments=segments,
        popularity=popularity,
        policies=policies,
        metrics=metrics,
        text_embedder=text,
        user_vectors=UserVectors(lambda: all_user_vectors(local, parts.history, model.max_len)),
        complements=complements,
        product_search=product_search,
    )
    if metrics is not None:
        metrics.set_versions(model.model_version, Recommender.index_version(index))
    return engine
