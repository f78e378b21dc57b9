"""Item tower: id embedding + frozen MiniLM text + brand/category/price embeddings, fused.

Every catalogue item gets a vector from its content; items seen in training add a
learned id embedding on top. Items never seen in training (cold start) keep only
the content part, so :meth:`ItemTower.content` alone must give a useful vector
(``id_dropout`` trains for that). Output vectors are L2-normalised by the caller
(:class:`towers.model.TwoTower`); row 0 is padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import polars as pl
import torch
from torch import nn

from ecomrec.errors import ConfigError
from towers.text_encoder import DEFAULT_FIELDS, TEXT_DIM

N_PRICE_BUCKETS = 8


@dataclass(frozen=True)
class ItemTowerConfig:
    """Which item features are used and how they are fused."""

    dim: int = 64
    use_id: bool = True
    use_text: bool = True
    use_brand: bool = True
    use_category: bool = True
    use_price: bool = True
    text_fields: tuple[str, ...] = DEFAULT_FIELDS
    text_max_tokens: int = 64
    text_hidden: int = 0  # 0: linear projection of the text vector; > 0: 2-layer MLP
    # the frozen 384-d text vectors are reduced by PCA (fitted on the catalogue) to this many
    # dimensions before the trained projection: same information, a fraction of the CPU
    # time per step (the whole catalogue's item vectors are recomputed every step); 0 = off
    text_pca: int = 64
    # probability, per item and training step, that the id embedding is dropped so the
    # content path learns to stand alone (cold start)
    id_dropout: float = 0.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ConfigError("item.dim must be >= 1")
        if not 0.0 <= self.id_dropout < 1.0:
            raise ConfigError("item.id_dropout must be in [0, 1)")
        if not (self.use_id or self.use_text or self.use_brand or self.use_category):
            raise ConfigError("item tower needs at least one of id/text/brand/category")


@dataclass
class ItemFeatures:
    """Content features of catalogue rows, indexed by internal item id (row 0 = padding)."""

    text: np.ndarray  # (N+1, 384) float32, zeros where missing
    brand: np.ndarray  # (N+1,) int64, 0 = unknown
    category: np.ndarray  # (N+1,) int64, 0 = unknown
    price: np.ndarray  # (N+1,) int64 bucket, 0 = unknown
    vocab: dict[str, list[str]] = field(default_factory=dict)  # brands, categories, price edges


def _has_values(items: pl.DataFrame, col: str) -> bool:
    """Whether ``col`` exists and holds at least one usable (non-empty, known) value."""
    if col not in items.columns or items.height == 0:
        return False
    vals = items[col].drop_nulls()
    if vals.dtype == pl.Utf8:
        vals = vals.str.strip_chars().str.to_lowercase()
        vals = vals.filter(~vals.is_in(["", "unknown", "nan", "none"]))
    else:
        vals = vals.cast(pl.Float64, strict=False).drop_nulls()
        vals = vals.filter(vals > 0)
    return len(vals) > 0


def adapt_to_catalogue(cfg: ItemTowerConfig, items: pl.DataFrame) -> ItemTowerConfig:
    """``cfg`` with the content features the catalogue cannot feed turned off.

    A catalogue without any product content (no items file, ``--no-text``: no usable
    title/``text_fields``, brand or category) gets an id-only item tower. Otherwise only
    ``use_text`` follows the data (no text column: no text model); brand/category/price
    flags stay as configured (an empty column embeds to zeros), so a run on a
    catalogue with content keeps its parameters and seeded initialisation. Raises when
    nothing is left.
    """
    has_text = any(_has_values(items, f) for f in cfg.text_fields)
    has_content = has_text or _has_values(items, "brand") or _has_values(items, "category")
    if has_content:
        out = replace(cfg, use_text=cfg.use_text and has_text)
    else:
        out = replace(cfg, use_text=False, use_brand=False, use_category=False, use_price=False)
    if not (out.use_id or out.use_text or out.use_brand or out.use_category):
        raise ConfigError(
            "the catalogue has no title/brand/category to build item vectors from and "
            "item.use_id is false; enable item.use_id"
        )
    return out


def content_features(cfg: ItemTowerConfig) -> list[str]:
    """Names of the item features ``cfg`` uses (for manifests and reports)."""
    names = ["id", "text", "brand", "category", "price"]
    flags = [cfg.use_id, cfg.use_text, cfg.use_brand, cfg.use_category, cfg.use_price]
    return [n for n, f in zip(names, flags, strict=True) if f]


def _first_category(c: str | None) -> str | None:
    if c is None:
        return None
    s = str(c).split(" | ")[0].strip()
    return s or None


def _clean(v: str | None) -> str | None:
    if v is None:
        return None
    s = str(v).strip()
    return None if not s or s.lower() in ("unknown", "nan", "none") else s


def build_item_features(
    items: pl.DataFrame,
    n_items: int,
    text: np.ndarray | None,
    vocab: dict[str, list[str]] | None = None,
) -> ItemFeatures:
    """Features for ``items`` (canonical items frame) laid out by ``item_id``.

    ``vocab`` (from a checkpoint) maps brand/category names to the trained ids; without it
    a vocabulary is built from this catalogue. ``text`` is aligned with the frame rows.
    """
    ids = items["item_id"].to_numpy().astype(np.int64)
    if len(ids) and (ids.min() < 1 or ids.max() > n_items):
        raise ConfigError(f"item ids must be within 1..{n_items}")
    brands = (
        [_clean(b) for b in items["brand"].to_list()]
        if "brand" in items.columns
        else [None] * len(ids)
    )
    cats = (
        [_clean(_first_category(c)) for c in items["category"].to_list()]
        if "category" in items.columns
        else [None] * len(ids)
    )
    prices = (
        items["price"].to_numpy().astype(np.float64)
        if "price" in items.columns
        else np.full(len(ids), np.nan)
    )
    if vocab is None:
        bvocab = sorted({b for b in brands if b is not None})
        cvocab = sorted({c for c in cats if c is not None})
        finite = prices[np.isfinite(prices) & (prices > 0)]
        edges = (
            np.quantile(np.log(finite), np.linspace(0, 1, N_PRICE_BUCKETS + 1)[1:-1]).tolist()
            if len(finite)
            else []
        )
        vocab = {"brands": bvocab, "categories": cvocab, "price_edges": [str(e) for e in edges]}
    bidx = {b: i + 1 for i, b in enumerate(vocab["brands"])}
    cidx = {c: i + 1 for i, c in enumerate(vocab["categories"])}
    edges_arr = np.array([float(e) for e in vocab["price_edges"]], dtype=np.float64)
    out = ItemFeatures(
        text=np.zeros((n_items + 1, TEXT_DIM), np.float32),
        brand=np.zeros(n_items + 1, np.int64),
        category=np.zeros(n_items + 1, np.int64),
        price=np.zeros(n_items + 1, np.int64),
        vocab=vocab,
    )
    if text is not None:
        out.text[ids] = text
    out.brand[ids] = [bidx.get(b, 0) if b is not None else 0 for b in brands]
    out.category[ids] = [cidx.get(c, 0) if c is not None else 0 for c in cats]
    ok = np.isfinite(prices) & (prices > 0)
    pb = np.zeros(len(ids), np.int64)
    if len(edges_arr):
        pb[ok] = np.searchsorted(edges_arr, np.log(prices[ok])) + 1
    out.price[ids] = pb
    return out


class ItemTower(nn.Module):
    """Fuses id, text, brand, category and price embeddings into one (unnormalised) vector."""

    text: torch.Tensor
    text_mean: torch.Tensor
    text_basis: torch.Tensor
    brand: torch.Tensor
    category: torch.Tensor
    price: torch.Tensor
    known: torch.Tensor

    def __init__(self, cfg: ItemTowerConfig, n_items: int, feats: ItemFeatures) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_items = n_items
        d = cfg.dim
        self.n_brands = len(feats.vocab.get("brands", []))
        self.n_categories = len(feats.vocab.get("categories", []))
        self.id_emb = nn.Embedding(n_items + 1, d, padding_idx=0) if cfg.use_id else None
        k = cfg.text_pca if 0 < cfg.text_pca < TEXT_DIM else TEXT_DIM
        self.text_in = k
        if cfg.use_text:
            self.text_proj: nn.Module | None = (
                nn.Linear(k, d)
                if cfg.text_hidden <= 0
                else nn.Sequential(
                    nn.Linear(k, cfg.text_hidden), nn.GELU(), nn.Linear(cfg.text_hidden, d)
                )
            )
        else:
            self.text_proj = None
        self.brand_emb = (
            nn.Embedding(self.n_brands + 1, d, padding_idx=0) if cfg.use_brand else None
        )
        self.cat_emb = (
            nn.Embedding(self.n_categories + 1, d, padding_idx=0) if cfg.use_category else None
        )
        self.price_emb = (
            nn.Embedding(N_PRICE_BUCKETS + 1, d, padding_idx=0) if cfg.use_price else None
        )
        # content features and the "seen in training" mask travel with the state dict
        text = torch.from_numpy(feats.text)  # (N+1, 384)
        mean, basis = (
            _pca(text, k) if cfg.use_text else (torch.zeros(TEXT_DIM), torch.eye(TEXT_DIM)[:, :k])
        )
        self.register_buffer("text_mean", mean, persistent=True)  # (384,)
        self.register_buffer("text_basis", basis, persistent=True)  # (384, k)
        self.register_buffer("text", self.reduce_text(text), persistent=True)  # (N+1, k)
        self.register_buffer("brand", torch.from_numpy(feats.brand), persistent=True)
        self.register_buffer("category", torch.from_numpy(feats.category), persistent=True)
        self.register_buffer("price", torch.from_numpy(feats.price), persistent=True)
        self.register_buffer("known", torch.ones(n_items + 1, dtype=torch.float32), persistent=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for emb in (self.id_emb, self.brand_emb, self.cat_emb, self.price_emb):
            if emb is not None:
                nn.init.normal_(emb.weight, std=self.cfg.init_std)
                with torch.no_grad():
                    emb.weight[0].zero_()
        if self.text_proj is not None:
            for m in self.text_proj.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=1.0 / math.sqrt(m.in_features))
                    nn.init.zeros_(m.bias)

    def set_known(self, counts: np.ndarray) -> None:
        """Mark items with a training interaction; the others get no id embedding."""
        k = torch.as_tensor(counts > 0, dtype=torch.float32, device=self.known.device)
        k[0] = 0.0
        self.known.copy_(k)

    def reduce_text(self, text: torch.Tensor) -> torch.Tensor:
        """(N, 384) MiniLM vectors -> (N, k) PCA coordinates (rows of zeros stay zero)."""
        if self.text_in == TEXT_DIM:
            return text
        present = (text.abs().sum(1, keepdim=True) > 0).to(text.dtype)  # (N, 1)
        return ((text - self.text_mean) @ self.text_basis) * present

    def content(
        self,
        text: torch.Tensor,  # (N, k) reduced text (see reduce_text)
        brand: torch.Tensor,  # (N,)
        category: torch.Tensor,  # (N,)
        price: torch.Tensor,  # (N,)
    ) -> torch.Tensor:
        """(N, D) content-only vectors (no id embedding)."""
        out = torch.zeros(text.shape[0], self.cfg.dim, device=text.device, dtype=torch.float32)
        if self.text_proj is not None:
            out = out + self.text_proj(text)  # (N, D)
        if self.brand_emb is not None:
            out = out + self.brand_emb(brand.clamp(max=self.n_brands))
        if self.cat_emb is not None:
            out = out + self.cat_emb(category.clamp(max=self.n_categories))
        if self.price_emb is not None:
            out = out + self.price_emb(price)
        return out

    def forward(self) -> torch.Tensor:
        """(N+1, D) fused vectors of the whole catalogue; row 0 is zeros."""
        out = self.content(self.text, self.brand, self.category, self.price)  # (N+1, D)
        if self.id_emb is not None:
            keep = self.known  # (N+1,)
            if self.training and self.cfg.id_dropout > 0:
                drop = torch.rand_like(keep) < self.cfg.id_dropout
                keep = keep * (~drop).to(keep.dtype)
            ids = torch.arange(self.n_items + 1, device=keep.device)
            out = out + self.id_emb(ids) * keep.unsqueeze(1)  # (N+1, D)
        mask = torch.ones_like(out[:, :1])
        mask[0] = 0.0
        return out * mask


def _pca(text: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (384,) and top-k principal directions (384, k) of the non-empty text rows."""
    rows = text[text.abs().sum(1) > 0]
    if k >= TEXT_DIM or len(rows) < 2:
        return torch.zeros(TEXT_DIM), torch.eye(TEXT_DIM)[:, :k]
    mean = rows.mean(0)
    _, _, vh = torch.linalg.svd(rows - mean, full_matrices=False)  # vh: (384, 384)
    basis = vh[:k].T.contiguous()  # (384, k)
    if basis.shape[1] < k:  # fewer rows than k: pad with zero directions
        basis = torch.cat([basis, torch.zeros(TEXT_DIM, k - basis.shape[1])], 1)
    return mean, basis
