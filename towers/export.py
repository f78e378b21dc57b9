"""ONNX export of a trained run: the user tower (sequence -> user vector) and the item
tower's content path (text/brand/category/price -> item vector), dynamic batch and
sequence axes, plus the catalogue's item vectors as ``item_vectors.npy``.

User tower inputs (all int64): ``items (B, T)``, ``event_type (B, T)``, ``gap (B, T)``,
``lengths (B,)`` exactly as :func:`towers.sequences.pad_batch` builds them; output
``user_vector (B, D)`` float32, L2-normalised. The item table is baked into the graph.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ecomrec.errors import ModelError
from towers.inference import load_run
from towers.model import TwoTower
from towers.text_encoder import TEXT_DIM

log = logging.getLogger(__name__)

USER_INPUTS = ("items", "event_type", "gap", "lengths")
ITEM_INPUTS = ("text", "brand", "category", "price")


class UserTowerGraph(nn.Module):
    """The user tower with the item table as a constant: 4 int64 inputs -> (B, D)."""

    table: torch.Tensor

    def __init__(self, model: TwoTower) -> None:
        super().__init__()
        self.model = model
        with torch.no_grad():
            self.register_buffer("table", model.item_table().detach().clone())  # (N+1, D)

    def forward(
        self,
        items: torch.Tensor,  # (B, T)
        event_type: torch.Tensor,  # (B, T)
        gap: torch.Tensor,  # (B, T)
        lengths: torch.Tensor,  # (B,)
    ) -> torch.Tensor:
        return self.model.encode(items, event_type, gap, lengths, table=self.table)  # (B, D)


class ItemContentGraph(nn.Module):
    """The item tower's content path for new items: raw MiniLM text vector + ids -> (N, D)."""

    def __init__(self, model: TwoTower) -> None:
        super().__init__()
        self.tower = model.item_tower

    def forward(
        self,
        text: torch.Tensor,  # (N, 384) float32 MiniLM vectors
        brand: torch.Tensor,  # (N,) int64
        category: torch.Tensor,  # (N,) int64
        price: torch.Tensor,  # (N,) int64 price bucket
    ) -> torch.Tensor:
        v = self.tower.content(self.tower.reduce_text(text), brand, category, price)  # (N, D)
        return TwoTower.normalise(v)


def _export(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    names: tuple[str, ...],
    out_name: str,
    dyn: dict[str, dict[int, str]],
) -> None:
    try:
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=list(names),
            output_names=[out_name],
            dynamic_axes={**dyn, out_name: {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    except Exception as e:  # the exporter raises many kinds
        raise ModelError(f"ONNX export of {path.name} failed: {e}") from e


def export_onnx(run_dir: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Export the run's towers to ``out_dir``; returns the written paths by role."""
    from towers.inference import served_kind

    kind = served_kind(run_dir)
    if kind != "two-tower":
        raise ModelError(
            f"run {run_dir} serves the {kind!r} baseline (it beat the tower on validation): "
            "it has no ONNX export; serve it with the in-process encoder"
        )
    tm = load_run(run_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = tm.model.eval()
    user = UserTowerGraph(model).eval()
    b, t = 2, 3
    ex = (
        torch.tensor([[1, 2, 3], [4, 5, 0]], dtype=torch.long).clamp(max=model.n_items),
        torch.full((b, t), 3, dtype=torch.long),
        torch.ones((b, t), dtype=torch.long),
        torch.tensor([3, 2], dtype=torch.long),
    )
    seq_axes = {0: "batch", 1: "seq"}
    paths = {"user_tower": out / "user_tower.onnx", "item_content": out / "item_content.onnx"}
    with torch.no_grad():
        _export(
            user,
            ex,
            paths["user_tower"],
            USER_INPUTS,
            "user_vector",
            {"items": seq_axes, "event_type": seq_axes, "gap": seq_axes, "lengths": {0: "batch"}},
        )
        item = ItemContentGraph(model).eval()
        iex = (
            torch.randn(2, TEXT_DIM),
            torch.zeros(2, dtype=torch.long),
            torch.zeros(2, dtype=torch.long),
            torch.zeros(2, dtype=torch.long),
        )
        _export(
            item,
            iex,
            paths["item_content"],
            ITEM_INPUTS,
            "item_vector",
            {k: {0: "batch"} for k in ITEM_INPUTS},
        )
    paths["item_vectors"] = out / "item_vectors.npy"
    np.save(paths["item_vectors"], tm.item_vectors())
    paths["manifest"] = out / "export.json"
    paths["manifest"].write_text(
        json.dumps(
            {
                "model_version": tm.model_version,
                "config_hash": tm.config_hash,
                "dim": tm.dim,
                "max_len": tm.max_len,
                "user_inputs": list(USER_INPUTS),
                "user_output": "user_vector",
                "item_inputs": list(ITEM_INPUTS),
                "item_output": "item_vector",
                "n_items": model.n_items,
            },
            indent=2,
        )
    )
    log.info("exported %s to %s", tm.model_version, out)
    return paths
